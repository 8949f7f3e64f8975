"""The faces stage: every clip of a dataset -> aligned face chips in one resumable faces store.

Each clip is decoded, aligned and written in chunks of frames (CHUNK_FRAMES), so memory does not grow
with a clip's length. With one worker the clip is written straight into the store. With several (joblib
loky processes, or a dask cluster), each worker writes its clip, encoded with the store's codec, into a
part file of its own under ``<out>.parts/``; the main process, the only writer of the store, copies the
finished clip in (HDF5 object copies, no decoding) and commits it whole with its ``complete`` mark last.
Chips thus never travel through a pipe, and the store is the same whatever the worker count. A rerun
skips complete clips; a bad clip goes into the failure log and the run carries on; a full disk stops the
run with StoreFull (committed clips kept, the workers ended) and a rerun finishes it.
"""
from __future__ import annotations

import importlib.util
import shutil
import time
import warnings
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Callable, Iterable, Iterator, Optional, Sequence

import cv2
import numpy as np
from joblib import Parallel, delayed, parallel_config
from tqdm import tqdm

from emotion_attention.cache import HOW, FacesStore, StoreFull
from emotion_attention.cache.codecs import bytes_per_frame
from emotion_attention.cache.errors import ConfigError, clip_filename
from emotion_attention.cache.faces_store import ENCODED_FACES
from emotion_attention.cache.merge import copy_clip
from emotion_attention.pipeline import __version__
from emotion_attention.pipeline.configs import DecodeConfig, FaceConfig, PreprocessConfig
from emotion_attention.pipeline.core.runtime import (
    Failure,
    FailureLog,
    check_memory_fits,
    failure_log_path,
    parse_shard,
    select_shard,
    usable_cores,
    warn_oversubscribed,
)
from emotion_attention.pipeline.core.stage import Output, StageSummary, write_resolved_config
from emotion_attention.pipeline.data.clips import Clip, Problem
from emotion_attention.pipeline.data.decode import (
    DecodeStats,
    folder_is_square,
    is_short,
    iter_clip_frames,
    list_frame_images,
    probe_video,
)
from emotion_attention.pipeline.data.layouts import scan_dataset
from emotion_attention.pipeline.faces.align import (
    CHUNK_FRAMES,
    align_clip_chunks,
    concat_chunks,
    load_aligner,
    resize_prealigned_chunks,
)

HOW_NAMES = {code: name for name, code in HOW.items()}
PARTS_SUFFIX = ".parts"  # <out>.parts/: one part file per clip in flight with several workers


# -- one clip, no store ---------------------------------------------------------------------------
def is_prealigned(clip: Clip, cfg: FaceConfig) -> bool:
    """Frame folders of already aligned faces skip detection. auto: every image is square (read from the
    image headers, so one full frame among square faces sends the whole folder to detection)."""
    if clip.kind != "frames" or cfg.prealigned == "no":
        return False
    if cfg.prealigned == "yes":
        return True
    return folder_is_square(clip.path)


def process_clip_chunks(clip: Clip, cfg: PreprocessConfig) -> tuple[Iterator[dict], Callable[[], dict]]:
    """Decode one clip and align its subject's face in every kept frame, CHUNK_FRAMES frames at a time.

    Arguments:
        clip: a Clip from scan_dataset (video file or frame folder).
        cfg: PreprocessConfig (its face and decode parts are used).
    Returns:
        (chunks, clip_attrs): an iterator of faces-store arrays for consecutive runs of frames (see
        align_clip_chunks), and a function giving the clip attributes (label, split, source, kind, fps,
        total_frames, decode record) once the chunks are consumed. Raises DecodeError naming the file
        when the clip cannot be decoded.
    """
    if clip.kind == "video":
        info = probe_video(clip.path)
        fps, total = info.fps, info.frame_count
    else:
        fps, total = cfg.decode.folder_fps, len(list_frame_images(clip.path))
    stats = DecodeStats()  # decode side of the damage record: frames decoded vs the container's count
    frames = iter_clip_frames(clip.path, clip.kind, cfg.decode, stats)
    if is_prealigned(clip, cfg.face):
        chunks = resize_prealigned_chunks(frames, cfg.face)
    else:
        chunks = align_clip_chunks(frames, load_aligner(cfg.face.predictor_path), cfg.face)

    def clip_attrs() -> dict:
        return {**clip.store_attrs(), "fps": float(fps), "total_frames": int(total), **stats.attrs(),
                "truncated": bool(stats.reached_end and is_short(stats.decoded, int(total)))}
    return chunks, clip_attrs


def process_clip(clip: Clip, cfg: PreprocessConfig) -> tuple[dict[str, np.ndarray], dict]:
    """process_clip_chunks for one clip in memory; no store involved.

    Returns:
        (arrays, attrs): the whole clip's faces-store arrays and its clip attributes. With a lossy codec
        (jpeg) ``faces`` are the chips as the store gives them back, and ``encoded_faces`` their bytes.

    >>> clip = Clip("Train/Happy/single_face.mp4", Path("data/samples/single_face.mp4"), "Happy", "Train", "video")
    >>> arrays, attrs = process_clip(clip, PreprocessConfig())
    >>> arrays["faces"].shape
    (72, 256, 256, 3)
    """
    chunks, clip_attrs = process_clip_chunks(clip, cfg)
    arrays = concat_chunks(chunks, cfg.face.size)
    codec = cfg.store_codec
    if codec.name == "jpeg" and len(arrays["faces"]):
        # lossy: hand back the chips exactly as the store gives them back, and their bytes for writing them,
        # so maps computed here (emo-predict) equal those of `emo-cache extract` on the stored faces
        arrays[ENCODED_FACES] = codec.encode_many(arrays["faces"])
        arrays["faces"] = np.stack([codec.decode(row) for row in arrays[ENCODED_FACES]])
    return arrays, clip_attrs()


def write_clip(store: FacesStore, clip: Clip, cfg: PreprocessConfig) -> int:
    """Decode, align and write one clip into ``store`` chunk by chunk, then commit it whole; returns its
    frame count. A clip that fails midway leaves no group behind; StoreFull passes through."""
    chunks, clip_attrs = process_clip_chunks(clip, cfg)
    writer = store.begin_clip(clip.clip_id, cfg.face.size, cfg.compression)
    try:
        for chunk in chunks:
            writer.append(chunk)
    except StoreFull:
        raise
    except BaseException:
        writer.discard()
        raise
    writer.commit(clip_attrs())
    return writer.rows


@dataclass
class ClipResult:
    """What a clip job hands back to the writer: where its frames are, or why it failed."""
    clip: Clip
    part: Optional[Path] = None   # part file holding the committed clip (several workers); None: in the store
    error: Optional[str] = None   # why the clip failed (logged; the run carries on)
    full: bool = False            # the disk filled: the run stops
    seconds: float = 0.0


def failure_reason(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


def run_clip_in_store(store: FacesStore, clip: Clip, cfg: PreprocessConfig) -> ClipResult:
    """One worker: write the clip straight into the store; a bad clip becomes an error for the log."""
    start = time.perf_counter()
    try:
        write_clip(store, clip, cfg)
    except StoreFull:
        raise
    except Exception as exc:  # any failure of one clip is logged and the run carries on
        return ClipResult(clip, error=failure_reason(exc), seconds=time.perf_counter() - start)
    return ClipResult(clip, seconds=time.perf_counter() - start)


def run_clip(clip: Clip, cfg: PreprocessConfig, store_config: dict, parts_dir: Path) -> ClipResult:
    """A worker's job: write the clip, committed, into a part file of its own (``parts_dir``), encoded
    with the store's codec; the writer copies it into the store. Never raises for a bad clip."""
    start = time.perf_counter()
    part = Path(parts_dir) / clip_filename(clip.clip_id, ".h5")
    try:
        part.unlink(missing_ok=True)  # a part left by a killed run
        with FacesStore(part, "a", config=store_config, code_version=__version__) as store:
            write_clip(store, clip, cfg)
    except StoreFull as exc:
        part.unlink(missing_ok=True)
        return ClipResult(clip, error=str(exc), full=True, seconds=time.perf_counter() - start)
    except Exception as exc:  # any failure of one clip is logged and the run carries on
        part.unlink(missing_ok=True)
        return ClipResult(clip, error=failure_reason(exc), seconds=time.perf_counter() - start)
    return ClipResult(clip, part=part, seconds=time.perf_counter() - start)


# -- many clips ------------------------------------------------------------------------------------
def clip_cost(clip: Clip) -> int:
    """Rough work estimate, to start the longest clips first so workers finish together."""
    if clip.kind == "video":
        return clip.path.stat().st_size if clip.path.is_file() else 0
    return len(list_frame_images(clip.path)) * 50_000


def run_clips(clips: list[Clip], cfg: PreprocessConfig, workers: int, backend: str, scheduler: Optional[str],
              store: FacesStore, store_config: dict, parts_dir: Path) -> Iterator[ClipResult]:
    """Results in completion order: in this process straight into the store (1 loky worker), or as part
    files from loky processes or a dask cluster (whose workers must see ``parts_dir``)."""
    if backend == "loky" and workers == 1:
        return (run_clip_in_store(store, clip, cfg) for clip in clips)
    jobs = (delayed(run_clip)(clip, cfg, store_config, parts_dir) for clip in clips)
    if backend == "loky":
        return Parallel(n_jobs=workers, backend="loky", return_as="generator_unordered")(jobs)
    return run_on_dask(jobs, workers, scheduler)


def run_on_dask(jobs: Iterable, workers: int, scheduler: str) -> Iterator[ClipResult]:
    """The same clip jobs through joblib's dask backend on the cluster at ``scheduler``."""
    from dask.distributed import Client  # optional: only a dask run needs it

    with Client(scheduler), parallel_config(backend="dask"):
        yield from Parallel(n_jobs=workers, return_as="generator_unordered")(jobs)


def stop_workers(results: Iterable) -> None:
    """End a run's workers at once (a full disk, an interrupt): drop the queued jobs and kill loky's
    processes, so none is left running or holding a part file."""
    close = getattr(results, "close", None)
    if close is not None:
        with warnings.catch_warnings():  # joblib warns that queued tasks were cancelled: that is the intent
            warnings.filterwarnings("ignore", message=".*tasks which were still being processed")
            close()
    from joblib.externals.loky import reusable_executor

    executor = reusable_executor._executor
    if executor is not None:
        executor.shutdown(wait=True, kill_workers=True)


@dataclass
class PreprocessSummary:
    """What a faces run did: counts, failures, and coverage per clip and per class."""
    out_path: Path
    failure_log: Path
    total: int                      # clips in the dataset (plus unusable entries found by the scan)
    written: int                    # clips committed by this run
    skipped: int                    # clips already complete from an earlier run
    failures: list[Failure]         # this run's, also in the failure log
    clip_coverage: list[dict]       # per clip: clip_id, label, frames, present, coverage, how counts
    class_coverage: list[dict]      # per class: clips, frames, present, coverage
    max_fail_fraction: float

    @property
    def fail_fraction(self) -> float:
        return len(self.failures) / max(self.total, 1)

    @property
    def ok(self) -> bool:
        """False when more than max_fail_fraction of the clips failed (the CLI then exits non-zero)."""
        return self.fail_fraction <= self.max_fail_fraction

    def format(self) -> str:
        """Plain-text coverage tables (per clip, per class) and the run's counts."""
        lines = [f"{'clip':<48} {'frames':>6} {'face':>6} {'cover':>6}  how"]
        for row in self.clip_coverage:
            how = " ".join(f"{k}={v}" for k, v in row["how"].items())
            lines.append(f"{row['clip_id']:<48} {row['frames']:>6} {row['present']:>6} {row['coverage']:>6.1%}  {how}"
                         + (f"  WARNING {row['damage']}" if row.get("damage") else ""))
        lines.append(f"{'class':<12} {'clips':>6} {'frames':>7} {'face':>7} {'cover':>6}")
        for row in self.class_coverage:
            lines.append(f"{row['label']:<12} {row['clips']:>6} {row['frames']:>7} {row['present']:>7}"
                         f" {row['coverage']:>6.1%}")
        lines.append(f"store {self.out_path}: {self.written} clip(s) written, {self.skipped} already complete,"
                     f" {len(self.failures)} failed of {self.total}"
                     + (f" (see {self.failure_log})" if self.failures else ""))
        for failure in self.failures[:10]:  # name the files here, not only in the log
            lines.append(f"failed {failure.file}: {failure.reason}")
        if len(self.failures) > 10:
            lines.append(f"... and {len(self.failures) - 10} more in {self.failure_log}")
        if not self.ok:
            lines.append(f"error: {self.fail_fraction:.1%} of clips failed, more than the allowed"
                         f" {self.max_fail_fraction:.1%}; see {self.failure_log}")
        return "\n".join(lines)


def coverage_report(store: FacesStore, clips: list[Clip]) -> tuple[list[dict], list[dict]]:
    """Per-clip and per-class face coverage of the complete clips in the store (meta only, no pixels)."""
    per_clip, per_class = [], defaultdict(Counter)
    for clip in clips:
        if not store.is_complete(clip.clip_id):
            continue
        meta = store.read_meta(clip.clip_id)
        frames, present = len(meta["present"]), int(meta["present"].sum())
        how = Counter(HOW_NAMES.get(int(c), str(c)) for c in meta["how"])
        per_clip.append({"clip_id": clip.clip_id, "label": clip.label, "frames": frames, "present": present,
                         "coverage": present / max(frames, 1), "how": dict(sorted(how.items())),
                         "damage": damage_note(store.attrs(clip.clip_id))})
        per_class[clip.label].update(clips=1, frames=frames, present=present)
    classes = [{"label": label, "clips": c["clips"], "frames": c["frames"], "present": c["present"],
                "coverage": c["present"] / max(c["frames"], 1)} for label, c in sorted(per_class.items())]
    return per_clip, classes


def damage_note(attrs: dict) -> str:
    """"" for a clip that decoded whole, else what was wrong (for the coverage table's WARNING)."""
    notes = []
    if attrs.get("truncated"):
        notes.append(f"only {attrs.get('decoded_frames')} of {attrs.get('total_frames')} frames decode (truncated"
                     " or damaged video)")
    if attrs.get("unreadable_frames"):
        notes.append(f"{attrs['unreadable_frames']} unreadable image(s) kept as frames without a face")
    if attrs.get("fps_note"):  # pipeline.data.decode.video_rate replaced a nonsense header rate
        notes.append(str(attrs["fps_note"]))
    return "; ".join(notes)


def check_run_arguments(source: Path, cfg: PreprocessConfig, workers: int, backend: str,
                        scheduler: Optional[str]) -> None:
    """Stop on a bad argument before any work is done (the config's values were checked when it was built)."""
    cfg.validate()
    if not Path(source).exists():
        raise ConfigError(f"{source}: no such dataset folder or CSV")
    if backend == "dask" and importlib.util.find_spec("distributed") is None:
        raise ConfigError("backend 'dask' needs dask.distributed: pip install 'dask[distributed]'")
    check_settings_fit(cfg, workers, backend)


def worker_bytes(size: int) -> int:
    """Rough memory of one faces worker: interpreter, OpenCV and dlib's models, plus a chunk of chips
    (CHUNK_FRAMES chips of size x size x 3, about three copies while aligning and encoding)."""
    return (300 << 20) + CHUNK_FRAMES * size * size * 3 * 3


def check_settings_fit(cfg: PreprocessConfig, workers: int, backend: str) -> None:
    """A chip size that cannot fit in memory, or a --predictor that is not a dlib model, stop the run here;
    more workers than cores only warns (with the memory they take)."""
    per_worker = worker_bytes(cfg.face.size)
    if backend == "loky":  # a dask cluster's memory is not this machine's
        check_memory_fits(f"--size {cfg.face.size}", per_worker, workers + 1,
                          "use a smaller --size (the paper uses 256) or fewer --workers")
        warn_oversubscribed(workers, per_worker, tqdm.write)
    if cfg.face.predictor_path:  # checked once here, not once per clip in every worker
        try:
            load_aligner(cfg.face.predictor_path)
        except RuntimeError as exc:
            raise ConfigError(f"--predictor {cfg.face.predictor_path}: not a dlib shape predictor ({exc}); give"
                              " dlib's shape_predictor_68_face_landmarks.dat") from None


def problem_failure(problem: Problem) -> Failure:
    return Failure("faces", problem.path, None, problem.message)


def planned_frames(clip: Clip, cfg: DecodeConfig) -> int:
    """Frames a clip will keep, from the container's count (no decoding) or the folder's images."""
    if clip.kind == "frames":
        total, fps = len(list_frame_images(clip.path)), cfg.folder_fps
    else:
        cap = cv2.VideoCapture(str(clip.path))
        total, fps = int(cap.get(cv2.CAP_PROP_FRAME_COUNT) or 0), float(cap.get(cv2.CAP_PROP_FPS) or 0)
        cap.release()
    kept = -(-max(total, 0) // cfg.every_nth)
    if cfg.fps_cap is not None and fps > cfg.fps_cap:
        kept = int(kept * cfg.fps_cap / fps) + 1
    return min(kept, cfg.max_frames) if cfg.max_frames is not None else kept


def check_space(out_path: Path, clips: list[Clip], cfg: PreprocessConfig) -> int:
    """Refuse a run whose store cannot fit on its disk (frames x bytes per frame of the codec), before any
    work; returns the estimated bytes still to write."""
    frames = sum(planned_frames(c, cfg.decode) for c in clips)
    needed = frames * bytes_per_frame(cfg.store_codec, cfg.face.size)
    free = shutil.disk_usage(out_path.parent).free
    if needed > free:
        raise StoreFull(f"{out_path}: the {len(clips)} clips still to do hold about {frames} frames, about"
                        f" {needed / 2**30:.2f} GiB as {cfg.codec} chips, but {out_path.parent} has"
                        f" {free / 2**30:.2f} GiB free. Free space or choose another --out"
                        + (", or a smaller codec (--codec jpeg)." if cfg.codec != "jpeg" else "."))
    return needed


def shard_clips(clips: list[Clip], shard: Optional[str]) -> list[Clip]:
    """The clips of shard K/N (a stable hash of the clip id: pipeline.runtime.shard_of), or all."""
    parsed = parse_shard(shard)
    if parsed is None:
        return clips
    keep = set(select_shard([c.clip_id for c in clips], *parsed))
    return [c for c in clips if c.clip_id in keep]


def preprocess_dataset(source: Path, out_path: Path, cfg: PreprocessConfig = PreprocessConfig(),
                       workers: Optional[int] = None, backend: Optional[str] = None,
                       scheduler: Optional[str] = None, progress: bool = True, layout: Optional[str] = None,
                       shard: Optional[str] = None) -> PreprocessSummary:
    """Align every clip's faces into a faces store; resumable, one writer, failures logged.

    Arguments:
        source: dataset folder (AFEW or ``<split>/<label>/<clip>``) or ``path,label,split`` CSV.
        out_path: the faces store (``.h5``); created, or resumed when it holds the same config.
        cfg: PreprocessConfig (face, decode, class names, compression, codec, max_fail_fraction).
        workers, backend, scheduler, layout, shard: override the config's run fields of the same names
            (``cfg.workers`` None: the cores this process may use; backend "loky" (this machine) or "dask" (a
            cluster at ``scheduler``, whose workers see ``out``'s folder); layout None: detected; shard "K/N":
            only shard K of N of the clips, into a store of its own, joined with ``emo-cache merge``).
        progress: show a tqdm bar.
    Returns:
        PreprocessSummary: counts, failures (also in ``<out>.failures.jsonl``) and per-clip and
        per-class coverage. ``summary.ok`` is False when more than max_fail_fraction of clips failed.
        Raises StoreFull when the store cannot fit, or when the disk fills (committed clips are kept; a
        rerun finishes the job).

    >>> summary = preprocess_dataset(Path("data/demo"), Path("runs/faces.h5"), PreprocessConfig(), workers=2)
    >>> print(summary.format())
    """
    cfg = replace(cfg, **{k: v for k, v in dict(workers=workers, backend=backend, scheduler=scheduler,
                                                layout=layout, shard=shard).items() if v is not None})
    workers, backend, scheduler, layout, shard = (usable_cores() if cfg.workers is None else cfg.workers,
                                                  cfg.backend, cfg.scheduler, cfg.layout, cfg.shard)
    check_run_arguments(source, cfg, workers, backend, scheduler)
    scan = scan_dataset(Path(source), cfg.class_names, layout)
    clips = shard_clips(scan.clips, shard)
    out_path, log_path = Path(out_path), failure_log_path(out_path)
    store_config = cfg.store_config(scan.class_names)
    failures = [problem_failure(p) for p in scan.errors]
    parts_dir = out_path.with_name(out_path.name + PARTS_SUFFIX)
    with FacesStore(out_path, "a", config=store_config, code_version=__version__, log=tqdm.write,
                    shard=shard) as store, FailureLog(log_path) as log:
        write_resolved_config(out_path, "faces", [source], {"config": asdict(cfg), "store_config": store_config,
                                                             "workers": workers, "code_version": __version__})
        for failure in failures:
            log.add(failure)
        todo = sorted((c for c in clips if not store.is_complete(c.clip_id)), key=clip_cost, reverse=True)
        check_space(out_path, todo, cfg)
        shutil.rmtree(parts_dir, ignore_errors=True)  # parts of a killed run: we hold the store's lock
        if workers > 1 or backend != "loky":
            parts_dir.mkdir(parents=True, exist_ok=True)
        results = run_clips(todo, cfg, workers, backend, scheduler, store, store_config, parts_dir)
        try:
            clip_failures = commit_results(store, tqdm(results, total=len(todo), desc="faces", unit="clip",
                                                       disable=not progress), log)
        except BaseException:
            stop_workers(results)
            raise
        finally:
            shutil.rmtree(parts_dir, ignore_errors=True)
        clip_cov, class_cov = coverage_report(store, clips)
    return PreprocessSummary(out_path, log_path, len(clips) + len(scan.errors), len(todo) - len(clip_failures),
                             len(clips) - len(todo), failures + clip_failures, clip_cov, class_cov,
                             cfg.max_fail_fraction)


def commit_results(store: FacesStore, results: Iterable[ClipResult], log: FailureLog) -> list[Failure]:
    """The single writer: copy each finished part file's clip in and commit it whole (clips written in
    place are committed already); log each failed clip (flushed at once); stop on a full disk."""
    failures = []
    for result in results:
        if result.full:
            raise StoreFull(result.error)
        if result.error is None:
            if result.part is not None:
                with FacesStore(result.part, "r") as part:
                    copy_clip(part, store, result.clip.clip_id)
                result.part.unlink()
            log.succeeded(result.clip.clip_id)
            continue
        failures.append(log.add(Failure("faces", str(result.clip.path), result.clip.clip_id, result.error)))
    return failures


def run(cfg: PreprocessConfig, inputs: Sequence[Path], out: Path, *, log=print, progress: bool = True
        ) -> StageSummary:
    """Stage `faces`: align every clip of the dataset ``inputs[0]`` into the faces store ``out``.

    Resumable (complete clips are skipped; a store of other settings is refused naming the key); failures
    go to ``<out>.failures.jsonl`` and the resolved config to ``<out>.config.json``.
    """
    (source,) = inputs
    Output(out).check_writable()
    summary = preprocess_dataset(Path(source), Path(out), cfg, progress=progress)
    return StageSummary("faces", summary.ok, {"store": Path(out), "failures": summary.failure_log},
                        summary.failures, summary.format().splitlines(), result=summary)
