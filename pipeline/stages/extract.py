"""Stage `extract`: backbone maps of every aligned face, from a faces store into a features store.

``FeatureExtractor`` is the in-memory part (uint8 faces in, float16 (V, N, L, D) maps out); it is used
without any store by ``emo-predict``. ``extract_features`` is the stage: faces store -> features store.

Speed (the CPU has bf16 dot-product units, often; a GPU, sometimes):
- faces from many clips are packed into batches of exactly ``batch_size`` (the last one zero-padded), so a
  face's maps never depend on which faces shared its batch: a resumed run equals an uninterrupted one;
- channels_last memory format and bf16 weights/activations where the hardware supports bf16;
- a reader thread reads the next faces and a writer thread writes finished maps while the main thread
  computes (torch releases the GIL inside its kernels); one lock serialises every HDF5 call;
- on CUDA: pinned host memory, non-blocking copies, half precision.

Memory is bounded whatever the clip length: faces are read in chunks of ``batch_size`` and maps written
batch by batch into the clip's group (``FeaturesStore.begin_clip``), whose ``complete`` mark comes last.
Scale: ``--frames-per-clip`` and ``--map-dtype uint8`` shrink the store; ``--shard K/N`` and torchrun
(one rank per GPU, rank 0 merges) spread the work.
"""
from __future__ import annotations

import json
import os
import queue
import shutil
import threading
import time
from collections import deque
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Callable, Iterator, Optional, Sequence

import numpy as np
from tqdm import tqdm

from emotion_attention.cache import ConfigError, FacesStore, FeaturesStore, StoreDamaged, StoreFull
from emotion_attention.cache.common import is_disk_full
from emotion_attention.pipeline.configs import ExtractConfig
from emotion_attention.pipeline.core.runtime import (
    Failure,
    FailureLog,
    failure_log_path,
    parse_shard,
    select_shard,
)
from emotion_attention.pipeline.core.stage import Output, StageSummary, write_resolved_config
from emotion_attention.pipeline.models.extractor import FeatureExtractor

DISK_MARGIN = 1.02  # refuse unless the free disk holds the planned bytes plus 2 % (HDF5 metadata, chunk index)


# What "auto" precision means per backbone is its registry entry's policy (pipeline.backbones.REGISTRY).


# -- the stage ---------------------------------------------------------------------------------
READ_ERRORS = (OSError, KeyError, ValueError, RuntimeError, StoreDamaged)  # a clip the faces store cannot give


def select_frames(present: np.ndarray, frames_per_clip: Optional[int]) -> np.ndarray:
    """Faces-store rows a clip keeps: every frame (None), or N present frames spread uniformly over them.

    Deterministic (np.linspace over the present frames, rounded), so a rerun keeps the same rows.

    >>> select_frames(np.array([1, 0, 1, 1, 1, 0, 1], bool), 3).tolist()
    [0, 3, 6]
    """
    if frames_per_clip is None:
        return np.arange(len(present))
    idx = np.flatnonzero(present)
    if len(idx) <= frames_per_clip:
        return idx
    return idx[np.rint(np.linspace(0, len(idx) - 1, frames_per_clip)).astype(np.int64)]


def bytes_per_row(views: int, L: int, D: int, map_dtype: str) -> int:
    """Bytes one kept frame takes in the features store (all views), before compression."""
    if map_dtype == "uint8":
        return views * (L * D + 2 * 2 * D)  # uint8 codes, float16 lo and scale per channel
    return views * L * D * 2                # float16


@dataclass
class ClipJob:
    """One clip in flight. Its faces travel in chunks of at most ``batch_size``; its maps are written as
    each batch is computed, so neither the clip's pixels nor its maps are ever in memory whole."""
    clip_id: str
    rows: np.ndarray         # int (F,): the faces-store rows the features store keeps, in time order
    present: np.ndarray      # bool (F,): the faces store's mask of those rows
    attrs: dict
    compute: np.ndarray      # int (P,): positions (in rows) of the present faces, the ones the network sees
    done: int = 0            # present faces computed so far
    aborted: bool = False    # a chunk could not be read: the clip is a failure, never committed
    writer: object = None    # cache.features_store.ClipWriter, set by the writer thread

    @property
    def finished(self) -> bool:
        return self.done == len(self.compute)


def plan_size(faces: FacesStore, todo: list[str], cfg: ExtractConfig, L: int, D: int) -> tuple[int, int, int]:
    """(frames, present faces, bytes) the clips in ``todo`` will take in the features store.

    A clip whose mask cannot be read is left out of the plan; the reader logs it as a failure.
    """
    frames = present = 0
    for cid in todo:
        try:
            mask = faces.read_present(cid).astype(bool)
        except READ_ERRORS:
            continue
        rows = select_frames(mask, cfg.frames_per_clip)
        frames, present = frames + len(rows), present + int(mask[rows].sum())
    return frames, present, frames * bytes_per_row(cfg.views, L, D, cfg.map_dtype)


def check_disk(out_path: Path, planned: int, log: Callable) -> None:
    """Print the planned size and the free disk; raise StoreFull when the output cannot fit."""
    free = shutil.disk_usage(out_path.parent).free
    log(f"extract: planned {planned / 2**30:.2f} GiB in {out_path} (uncompressed upper bound);"
        f" free disk {free / 2**30:.2f} GiB")
    if planned * DISK_MARGIN > free:
        raise StoreFull(f"{out_path}: needs about {planned * DISK_MARGIN / 2**30:.2f} GiB but only"
                        f" {free / 2**30:.2f} GiB are free; free space, choose another --out, or make it smaller"
                        " (--crop 224, --map-dtype uint8, --frames-per-clip N)")


def read_clips(faces: FacesStore, todo: list[str], cfg: ExtractConfig, lock: threading.Lock,
               out: queue.Queue, stop: threading.Event, errors: list) -> None:
    """Reader thread: per clip, ("clip", job) then ("faces", job, start, chips) chunks of <= batch_size faces;
    ("error", clip_id, message) for a clip it cannot read, ("abort", job, message) when a later chunk fails;
    None at the end.

    A clip that cannot be read is a failure and the run goes on; anything else (out of memory, a bug)
    goes into ``errors`` for the main thread to raise, so no clip is dropped silently.
    """
    try:
        for cid in todo:
            if stop.is_set():
                return
            try:
                with lock:
                    mask = faces.read_present(cid).astype(bool)
                    attrs = faces.attrs(cid)
            except READ_ERRORS as exc:
                out.put(("error", cid, f"cannot read faces: {exc}"))
                continue
            rows = select_frames(mask, cfg.frames_per_clip)
            job = ClipJob(cid, rows, mask[rows], attrs, np.flatnonzero(mask[rows]))
            out.put(("clip", job))
            for start in range(0, len(job.compute), cfg.batch_size):
                if stop.is_set():
                    return
                try:
                    with lock:
                        chips = faces.read_faces(cid, rows[job.compute[start:start + cfg.batch_size]])
                except READ_ERRORS as exc:
                    out.put(("abort", job, f"cannot read faces: {exc}"))
                    break
                out.put(("faces", job, start, chips))
    except Exception as exc:  # noqa: BLE001 - handed to the main thread, which re-raises it
        errors.append(exc)
    finally:
        out.put(None)


class WriteTally:
    """Bytes still to write, for the StoreFull message; updated by the writer thread only."""

    def __init__(self, planned: int, row_bytes: int):
        self.remaining, self.row_bytes = planned, row_bytes

    def committed(self, job: ClipJob) -> None:
        self.remaining -= len(job.rows) * self.row_bytes


def write_clips(store: FeaturesStore, cfg: ExtractConfig, L: int, D: int, lock: threading.Lock,
                items: queue.Queue, errors: list, tally: WriteTally) -> None:
    """Writer thread: ("begin", job), ("maps", job, positions, maps), ("commit", job) until None.

    After an error it only drains; a full disk becomes StoreFull naming the store and the space needed.
    """
    compression = None if cfg.compression == "none" else cfg.compression
    while True:
        item = items.get()
        if item is None:
            return
        if errors:
            continue  # the main thread re-raises the first error; keep the queue moving until then
        kind, job = item[0], item[1]
        try:
            with lock:
                if kind == "begin":
                    job.writer = store.begin_clip(job.clip_id, cfg.views, job.rows, L, D, compression, cfg.map_dtype)
                elif kind == "maps":
                    job.writer.write_rows(item[2], item[3])
                else:
                    job.writer.commit(job.present, clip_attrs(job.attrs))
                    tally.committed(job)
        except OSError as exc:
            errors.append(store.disk_full(exc, f"clip {job.clip_id!r}", tally.remaining) if is_disk_full(exc) else exc)
        except Exception as exc:  # noqa: BLE001 - handed to the main thread, which re-raises it
            errors.append(exc)


def clip_attrs(attrs: dict) -> dict:
    """The faces-store clip attributes the features store keeps."""
    return {k: attrs[k] for k in ("label", "split", "source", "fps", "total_frames", "folds", "decoded_frames",
                                   "truncated") if k in attrs}  # folds: one features store serves every fold


def pack_batches(items: queue.Queue, batch_size: int, started: Callable[[ClipJob], None],
                 failed: Callable[[str, str], None]) -> Iterator[tuple[np.ndarray, list[tuple[ClipJob, int, int]]]]:
    """Yield (faces (n, S, S, 3), pieces) batches across clips; a piece (job, start, n) says that rows
    start..start+n-1 of the job's present faces are in the batch. Every batch but the last has n = batch_size.
    """
    pending: deque = deque()  # [job, start, chips] chunks not handed out yet, oldest first
    count, reader_done = 0, False
    while True:
        while not reader_done and count < batch_size:
            item = items.get()
            if item is None:
                reader_done = True
            elif item[0] == "error":
                failed(item[1], item[2])
            elif item[0] == "abort":
                job = item[1]
                job.aborted = True
                failed(job.clip_id, item[2])
                count -= sum(len(c[2]) for c in pending if c[0] is job)
                pending = deque(c for c in pending if c[0] is not job)
            elif item[0] == "clip":
                started(item[1])
            else:
                pending.append(list(item[1:]))
                count += len(item[3])
        if count == 0:
            return
        chunks, pieces, taken = [], [], 0
        while taken < batch_size and pending:
            job, start, chips = pending[0]
            n = min(batch_size - taken, len(chips))
            chunks.append(chips[:n])
            pieces.append((job, start, n))
            taken += n
            if n == len(chips):
                pending.popleft()
            else:
                pending[0] = [job, start + n, chips[n:]]
        count -= taken
        yield np.concatenate(chunks), pieces


def scatter_maps(maps: np.ndarray, pieces: list[tuple[ClipJob, int, int]], put: Callable[[tuple], None]) -> None:
    """Hand a batch's (V, n, L, D) maps to the writer, piece by piece; a clip's last piece is followed by
    its commit."""
    offset = 0
    for job, start, n in pieces:
        if not job.aborted:
            put(("maps", job, job.compute[start:start + n], maps[:, offset:offset + n]))
            job.done += n
            if job.finished:
                put(("commit", job))
        offset += n


def refuse_same_path(faces_path: Path, out_path: Path) -> None:
    """--out must not be the faces store being read (checked before anything is written)."""
    same = out_path.resolve() == faces_path.resolve() or (
        out_path.exists() and faces_path.exists() and os.path.samefile(out_path, faces_path))
    if same:
        raise ConfigError(f"--out {out_path} is the faces store this run reads ({faces_path}); give the features"
                          " store its own path, e.g. features.h5")


def torchrun_rank() -> Optional[tuple[int, int]]:
    """(RANK, WORLD_SIZE) when started by torchrun with more than one process, else None."""
    if "RANK" in os.environ and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        return int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    return None


def shard_path(out_path: Path, rank: int, world: int) -> Path:
    """``features.h5`` -> ``features.shard-1-of-4.h5``: where rank 1 of 4 writes under torchrun."""
    return out_path.with_name(f"{out_path.stem}.shard-{rank}-of-{world}{out_path.suffix}")


def extract_features(faces_path, out_path, cfg: ExtractConfig, log: Callable = print) -> dict:
    """Stage `extract`: maps of every complete clip of a faces store, into a features store.

    Complete clips already in the output are skipped (resume); a different backbone setting or faces
    store is refused with the differing provenance keys named. Absent frames get zero maps. With
    ``cfg.shard = "K/N"`` only shard K's clips are done. Started by torchrun (WORLD_SIZE > 1), each rank
    extracts its shard into ``shard_path(out)`` on its own GPU, and rank 0 merges the shards into ``out``.

    Arguments:
        faces_path: faces store (``emo-cache faces``).
        out_path: features store to create or extend; ``<out>.config.json`` gets the resolved config.
        cfg: ExtractConfig.
        log: where one-line messages go.
    Returns:
        summary dict: clips_total, clips_skipped, clips_written, failures, frames, faces, seconds,
        faces_per_s, planned_bytes, out, provenance (and shards, under torchrun).

    >>> extract_features("runs/faces.h5", "runs/features.h5",
    ...                  ExtractConfig(weights="vgg_face_dag.pth", views=2))  # doctest: +SKIP
    """
    cfg.validate()
    faces_path, out_path = Path(faces_path), Path(out_path)
    refuse_same_path(faces_path, out_path)
    ranked = torchrun_rank()
    if ranked is not None and cfg.shard is None:
        return extract_ranked(faces_path, out_path, cfg, log, *ranked)
    return extract_store(faces_path, out_path, cfg, log)


def extract_store(faces_path: Path, out_path: Path, cfg: ExtractConfig, log: Callable) -> dict:
    """One process, one device, one output store (the whole store or ``cfg.shard``)."""
    shard = parse_shard(cfg.shard)
    with FacesStore(faces_path, "r") as faces:
        fx = FeatureExtractor(cfg)
        prov = fx.provenance(faces.fingerprint)
        class_names = list(faces.config.get("class_names", []))
        with FeaturesStore(out_path, "a", provenance=prov, class_names=class_names, log=log,
                           shard=cfg.shard, faces_config=faces.config) as store:
            write_resolved_config(out_path, "extract", [faces_path], {"config": asdict(cfg), "provenance": prov})
            all_ids = faces.complete_ids()
            if shard is not None:
                all_ids = select_shard(all_ids, *shard)
            todo = [cid for cid in all_ids if not store.is_complete(cid)]
            L, D = fx.spec.L, fx.spec.D
            frames, present, planned = plan_size(faces, todo, cfg, L, D)
            log(f"extract: {len(all_ids)} clips in {faces_path}{f' (shard {cfg.shard})' if shard else ''},"
                f" {len(all_ids) - len(todo)} already done, {len(todo)} to do: {frames} frames x"
                f" {bytes_per_row(cfg.views, L, D, cfg.map_dtype)} bytes/frame ({present} faces to compute;"
                f" {fx.spec.name}, {fx.precision}, {fx.device}, maps {cfg.map_dtype})")
            check_disk(out_path, planned, log)
            t0 = time.perf_counter()
            failures = run_pipeline(fx, faces, store, todo, present, out_path, planned)
            seconds = time.perf_counter() - t0
    failed_ids = {f["clip_id"] for f in failures}
    with FailureLog(failure_log_path(out_path)) as flog:  # clips done now leave the log of earlier runs
        for cid in todo:
            if cid not in failed_ids:
                flog.succeeded(cid)
    if failures:
        log(f"extract: {len(failures)} clips failed; see {failure_log_path(out_path)}")
    return {"clips_total": len(all_ids), "clips_skipped": len(all_ids) - len(todo),
            "clips_written": len(todo) - len(failures), "failures": failures, "frames": frames,
            "faces": present, "seconds": seconds, "faces_per_s": present / seconds if seconds > 0 else 0.0,
            "planned_bytes": planned, "out": str(out_path), "provenance": prov}


def extract_ranked(faces_path: Path, out_path: Path, cfg: ExtractConfig, log: Callable, rank: int,
                   world: int) -> dict:
    """Under torchrun: this rank's shard into its own store, a barrier, then rank 0 merges every shard."""
    import datetime

    import torch.distributed as dist

    from emotion_attention.cache.merge import merge_stores

    own = shard_path(out_path, rank, world)
    summary = extract_store(faces_path, own, replace(cfg, shard=f"{rank}/{world}"), log)
    created = not dist.is_initialized()
    if created:  # gloo: a CPU barrier works whatever the device; the wait covers the slowest rank's extract
        dist.init_process_group("gloo", timeout=datetime.timedelta(days=7))
    try:
        dist.barrier()
        shards = [shard_path(out_path, r, world) for r in range(world)]
        if rank == 0:
            merge_stores(out_path, shards, log=log)
            log(f"extract: rank 0 merged {world} shards into {out_path} (the shard stores are kept beside it)")
        dist.barrier()  # no rank returns before the merged store exists
    finally:
        if created:
            dist.destroy_process_group()
    return {**summary, "out": str(out_path), "shard_out": str(own), "rank": rank, "world_size": world}


def run_pipeline(fx: FeatureExtractor, faces: FacesStore, store: FeaturesStore, todo: list[str],
                 n_faces: int, out_path: Path, planned: int = 0) -> list[dict]:
    """Reader thread -> batched compute (this thread) -> writer thread. Returns the failed clips."""
    cfg = fx.cfg
    lock = threading.Lock()  # HDF5 is not re-entrant: one store call at a time, whichever thread
    stop = threading.Event()
    to_compute: queue.Queue = queue.Queue(maxsize=cfg.queue_clips)  # chunks of <= batch_size faces
    to_write: queue.Queue = queue.Queue(maxsize=cfg.queue_clips)    # batches of maps
    thread_errors: list = []  # the first error of the writer or the reader thread, re-raised here
    failures: list[dict] = []
    L, D = fx.spec.L, fx.spec.D
    tally = WriteTally(planned, bytes_per_row(cfg.views, L, D, cfg.map_dtype))
    reader = threading.Thread(target=read_clips, name="extract-reader", daemon=True,
                              args=(faces, todo, cfg, lock, to_compute, stop, thread_errors))
    writer = threading.Thread(target=write_clips, name="extract-writer", daemon=True,
                              args=(store, cfg, L, D, lock, to_write, thread_errors, tally))

    def failed(clip_id: str, message: str) -> None:
        with FailureLog(failure_log_path(out_path)) as flog:  # the one schema (core.runtime.Failure)
            failures.append(asdict(flog.add(Failure("extract", str(faces.path), clip_id, message))))

    def put(item: tuple) -> None:
        if thread_errors:
            raise thread_errors[0]
        to_write.put(item)

    def started(job: ClipJob) -> None:
        put(("begin", job))
        if job.finished:  # no present face: nothing to compute, commit at once
            put(("commit", job))

    reader.start()
    writer.start()
    try:
        with tqdm(total=n_faces, unit="face", desc="extract", smoothing=0.1) as bar:
            for chips, pieces in pack_batches(to_compute, cfg.batch_size, started, failed):
                scatter_maps(fx.forward_batch(chips), pieces, put)
                bar.update(len(chips))
    finally:
        stop.set()
        while reader.is_alive():  # a reader unblocked by one drain may put a chunk, then its final None: keep emptying
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


def run(cfg: ExtractConfig, inputs: Sequence[Path], out: Path, *, log=print, progress: bool = True
        ) -> StageSummary:
    """Stage `extract`: backbone maps of every face of the faces store ``inputs[0]`` into the features store
    ``out`` (resumable; failures in ``<out>.failures.jsonl``, the resolved config in ``<out>.config.json``)."""
    (faces_path,) = inputs
    Output(out).check_writable()
    summary = extract_features(faces_path, out, cfg, log=log)
    failures = [Failure(**f) for f in summary["failures"]]
    lines = [json.dumps({k: v for k, v in summary.items() if k != "provenance"}, indent=1)]
    return StageSummary("extract", not failures, {"store": Path(out)}, failures, lines, result=summary)
