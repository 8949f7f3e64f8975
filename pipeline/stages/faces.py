"""The faces stage: every clip of a dataset -> aligned face chips in one resumable faces store.

Clips are planned into worker tasks (``plan_tasks``): short clips (a photo, a 16-frame DFEW clip) are batched
into tasks of about ``task_frames`` frames, decoded and aligned in memory, their chips encoded with the store's
codec, and handed back to the writer in memory; a clip of more than ``stream_frames`` frames is written in
chunks (CHUNK_FRAMES), encoded, into a part file of its own under ``<out>.parts/``, so memory never grows with
a clip's length. Tasks run in this process (one worker) or in joblib loky processes or on a dask cluster; the
main process is the only writer of the store either way: it checks the disk space a clip needs, writes it
whole (or copies it in from its part file: HDF5 object copies, no decoding) and commits it with its
``complete`` mark last. No clip in flight is ever in the store's file, so a kill or a full disk loses at most
the clips in flight, and the store is the same whatever the worker count. A rerun skips complete clips; a bad
clip goes into the failure log and the run carries on; a full disk stops the run with StoreFull (committed
clips kept, the workers ended) and a rerun finishes it.
"""
from __future__ import annotations

import importlib.util
import shutil
import time
import warnings
from collections import Counter, defaultdict
from concurrent import futures
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Callable, Iterable, Iterator, Optional, Sequence

import cv2
import numpy as np
from tqdm import tqdm

from emotion_attention.cache import HOW, FacesStore, StoreFull
from emotion_attention.cache.codecs import bytes_per_frame
from emotion_attention.cache.common import FREE_RESERVE, free_bytes, is_disk_full
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
    worker_executor,
)
from emotion_attention.pipeline.core.stage import Output, StageSummary, write_resolved_config
from emotion_attention.pipeline.data.clips import Clip, DatasetError, Problem
from emotion_attention.pipeline.data.decode import (
    HOLD_BYTES,
    DecodeStats,
    folder_is_square,
    is_short,
    iter_clip_frames,
    list_frame_images,
    probe_video,
    square_frames,
)
from emotion_attention.pipeline.data.layouts import scan_dataset
from emotion_attention.pipeline.faces.align import (
    CHUNK_FRAMES,
    align_clip_chunks,
    concat_chunks,
    empty_clip_arrays,
    load_aligner,
    resize_prealigned_chunks,
)

HOW_NAMES = {code: name for name, code in HOW.items()}
MAX_CLIP_ROWS = 200  # rows of the per-clip coverage table printed; a larger run prints the worst ones
PARTS_SUFFIX = ".parts"  # <out>.parts/: one part file per long clip in flight (over stream_frames frames)


# -- one clip, no store ---------------------------------------------------------------------------
def is_prealigned(clip: Clip, cfg: FaceConfig) -> bool:
    """Frame folders and still images of already aligned faces skip detection. auto: every image is square
    (read from the image headers, so one full frame among square faces sends the whole folder to detection;
    process_clip_chunks applies the same rule to the frames it decodes: decode.square_frames)."""
    if clip.kind not in ("frames", "image") or cfg.prealigned == "no":
        return False
    if cfg.prealigned == "yes":
        return True
    return folder_is_square(clip.path)


def process_clip_chunks(clip: Clip, cfg: PreprocessConfig) -> tuple[Iterator[dict], Callable[[], dict]]:
    """Decode one clip and align its subject's face in every kept frame, CHUNK_FRAMES frames at a time.

    Arguments:
        clip: a Clip from scan_dataset (video file, frame folder or still image).
        cfg: PreprocessConfig (its face and decode parts are used).
    Returns:
        (chunks, clip_attrs): an iterator of faces-store arrays for consecutive runs of frames (see
        align_clip_chunks), and a function giving the clip attributes (label, split, source, kind, fps,
        total_frames, decode record) once the chunks are consumed. Raises DecodeError naming the file
        when the clip cannot be decoded.
    """
    images = None  # a folder's images, listed once for the count, the square check and the decode
    if clip.kind == "video":
        info = probe_video(clip.path)
        fps, total = info.fps, info.frame_count
    else:
        images = list_frame_images(clip.path)
        fps, total = cfg.decode.folder_fps, len(images)
    stats = DecodeStats()  # decode side of the damage record: frames decoded vs the container's count
    frames = iter_clip_frames(clip.path, clip.kind, cfg.decode, stats, images)
    if images is not None and cfg.face.prealigned == "auto":  # is_prealigned's rule, on the decoded frames
        prealigned, frames = square_frames(frames, images)
    else:
        prealigned = is_prealigned(clip, cfg.face)
    if prealigned:
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


def encoded_clip(clip: Clip, cfg: PreprocessConfig) -> tuple[dict[str, np.ndarray], dict]:
    """A short clip's faces-store arrays with its chips already encoded in the store's codec (``faces`` and
    ``encoded_faces`` are then the same object array of bytes), chunk by chunk: what a worker hands the writer
    in memory, a few KiB per JPEG chip instead of S x S x 3 bytes."""
    chunks, clip_attrs = process_clip_chunks(clip, cfg)
    codec = cfg.store_codec
    parts = []
    for chunk in chunks:
        if codec.encoded:
            chunk = {**chunk, "faces": codec.encode_many(chunk["faces"])}
        parts.append(chunk)
    if not parts:
        arrays = empty_clip_arrays(cfg.face.size)
    else:
        arrays = {name: np.concatenate([p[name] for p in parts]) for name in parts[0]}
    if codec.encoded:
        arrays[ENCODED_FACES] = arrays["faces"]
    return arrays, clip_attrs()


def write_clip(store: FacesStore, clip: Clip, cfg: PreprocessConfig) -> int:
    """Decode, align and write one clip into ``store`` chunk by chunk, then commit it whole; returns its
    frame count. A clip that fails midway leaves no group behind; StoreFull passes through. (The stage
    itself writes in-flight clips into part files or memory first, never into the store: see run_task.)"""
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
    """What a clip job hands back to the writer: its rows in memory, the part file holding it, or why it failed."""
    clip: Clip
    part: Optional[Path] = None     # part file holding the committed clip (a long clip); None otherwise
    arrays: Optional[dict] = None   # a short clip's rows, chips encoded in the store's codec (encoded_clip)
    attrs: Optional[dict] = None    # its clip attributes (with ``arrays``)
    error: Optional[str] = None     # why the clip failed (logged; the run carries on)
    full: bool = False              # the disk filled: the run stops
    seconds: float = 0.0


def failure_reason(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


def run_clip_in_memory(clip: Clip, cfg: PreprocessConfig) -> ClipResult:
    """A short clip, decoded and aligned into memory (chips encoded); never raises for a bad clip."""
    start = time.perf_counter()
    try:
        arrays, attrs = encoded_clip(clip, cfg)
    except Exception as exc:  # any failure of one clip is logged and the run carries on
        return ClipResult(clip, error=failure_reason(exc), seconds=time.perf_counter() - start)
    return ClipResult(clip, arrays=arrays, attrs=attrs, seconds=time.perf_counter() - start)


def run_clip(clip: Clip, cfg: PreprocessConfig, store_config: dict, parts_dir: Path) -> ClipResult:
    """A long clip: written, committed, into a part file of its own (``parts_dir``), encoded with the store's
    codec, so memory stays at one chunk; the writer copies it into the store. Never raises for a bad clip; a
    full disk (also one that breaks HDF5's close of the part) is reported as ``full``."""
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
        if is_disk_full(exc) or free_bytes(part) < FREE_RESERVE:  # HDF5 met the full disk (a close, a flush)
            return ClipResult(clip, error=f"{part}: the disk filled while writing clip {clip.clip_id!r} ({exc})",
                              full=True, seconds=time.perf_counter() - start)
        return ClipResult(clip, error=failure_reason(exc), seconds=time.perf_counter() - start)
    return ClipResult(clip, part=part, seconds=time.perf_counter() - start)


@dataclass(frozen=True)
class Task:
    """One worker job: short clips that travel in memory, or one long clip that streams into a part file."""
    clips: tuple
    stream: bool = False


def run_task(task: Task, cfg: PreprocessConfig, store_config: dict, parts_dir: Path) -> list[ClipResult]:
    """A worker's job (see plan_tasks); never raises for a bad clip."""
    if task.stream:
        return [run_clip(task.clips[0], cfg, store_config, parts_dir)]
    return [run_clip_in_memory(clip, cfg) for clip in task.clips]


# -- many clips ------------------------------------------------------------------------------------
MAX_TASK_CLIPS = 256  # clips per task at most (clips of zero planned frames would otherwise pile up)


def plan_tasks(clips: list[Clip], cfg: PreprocessConfig, frames: dict) -> list[Task]:
    """Clips (longest first) in worker tasks: a clip of more than stream_frames planned frames alone, through a
    part file; one of task_frames or more alone, in memory; shorter ones together until a task holds about
    task_frames frames. One task per clip costs a dispatch, a pickle and a wake-up each, more than the faces
    of one photo (bench/bench_faces_clips.py)."""
    tasks, batch, held = [], [], 0
    for clip in clips:
        n = frames[clip.clip_id]
        if n > cfg.stream_frames or n >= cfg.task_frames:
            tasks.append(Task((clip,), stream=n > cfg.stream_frames))
            continue
        batch.append(clip)
        held += n
        if held >= cfg.task_frames or len(batch) >= MAX_TASK_CLIPS:
            tasks.append(Task(tuple(batch)))
            batch, held = [], 0
    return tasks + ([Task(tuple(batch))] if batch else [])


def clip_cost(clip: Clip) -> int:
    """Rough work estimate, to start the longest clips first so workers finish together."""
    if clip.kind == "video":
        return clip.path.stat().st_size if clip.path.is_file() else 0
    return max(clip.frames, 0) * 50_000


AHEAD = 2  # tasks submitted per worker ahead of the writer: workers never wait, results never pile up


def run_tasks(tasks: list[Task], cfg: PreprocessConfig, workers: int, backend: str, scheduler: Optional[str],
              store_config: dict, parts_dir: Path) -> Iterator[list[ClipResult]]:
    """Each task's results in completion order: in this process (1 loky worker), or from joblib's loky
    processes or a dask cluster (whose workers must see ``parts_dir`` for the long clips)."""
    if backend == "loky" and workers == 1:
        return (run_task(task, cfg, store_config, parts_dir) for task in tasks)
    if backend == "loky":
        executor = worker_executor(workers)
        return bounded(lambda task: executor.submit(run_task, task, cfg, store_config, parts_dir), tasks,
                       AHEAD * workers, lambda fs: futures.wait(fs, return_when=futures.FIRST_COMPLETED))
    return run_on_dask(tasks, cfg, workers, scheduler, store_config, parts_dir)


def run_on_dask(tasks: list[Task], cfg: PreprocessConfig, workers: int, scheduler: str, store_config: dict,
                parts_dir: Path) -> Iterator[list[ClipResult]]:
    """The same tasks on the dask cluster at ``scheduler``."""
    from dask.distributed import Client, wait  # optional: only a dask run needs it

    with Client(scheduler) as client:
        yield from bounded(lambda task: client.submit(run_task, task, cfg, store_config, parts_dir, pure=False),
                           tasks, AHEAD * workers, lambda fs: wait(fs, return_when="FIRST_COMPLETED"))


def bounded(submit: Callable, tasks: Iterable, ahead: int, wait_first: Callable) -> Iterator:
    """Results of ``submit(task)`` futures in completion order, with at most ``ahead`` tasks submitted and not
    yet handed to the caller: when the single writer is slower than the workers (short prealigned clips), their
    results wait as futures, not as a pile of every clip's chips in memory (joblib's Parallel dispatches the
    next task when one completes, not when its result is consumed)."""
    todo, pending = iter(tasks), set()
    try:
        for task in todo:
            pending.add(submit(task))
            if len(pending) >= ahead:
                break
        while pending:
            done, pending = wait_first(pending)
            for future in done:
                yield future.result()
                task = next(todo, None)
                if task is not None:
                    pending.add(submit(task))
    finally:
        for future in pending:  # the writer stopped (a full disk, an interrupt): drop what has not started
            future.cancel()


def stop_workers(results: Iterable) -> None:
    """End a run's workers at once (a full disk, an interrupt): drop the queued jobs and kill loky's
    processes, so none is left running or holding a part file."""
    close = getattr(results, "close", None)
    if close is not None:
        with warnings.catch_warnings():  # joblib warns that queued tasks were cancelled: that is the intent
            warnings.filterwarnings("ignore", message=".*tasks which were still being processed")
            close()
    from joblib.externals.loky import reusable_executor  # lazy: joblib, only when a run is cut short

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

    def format(self, max_clip_rows: int = MAX_CLIP_ROWS) -> str:
        """Plain-text coverage tables (per clip, per class) and the run's counts. Past ``max_clip_rows`` clips,
        the clip table lists the damaged clips and those with the lowest coverage only, and says so."""
        lines = [f"{'clip':<48} {'frames':>6} {'face':>6} {'cover':>6}  how"]
        rows = self.clip_coverage
        if len(rows) > max_clip_rows:
            rows = sorted(rows, key=lambda r: (not r.get("damage"), r["coverage"]))[:max_clip_rows]
            lines[0] += (f"   ({max_clip_rows} of {len(self.clip_coverage)} clips: the damaged ones, then the lowest"
                         " coverage)")
        for row in rows:
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


def coverage_report(store: FacesStore, clips: list[Clip], seen: Optional[dict] = None) -> tuple[list[dict], list[dict]]:
    """Per-clip and per-class face coverage of the complete clips in the store (meta only, no pixels).
    ``seen``: clip id -> its coverage row, for the clips this run committed (the writer keeps them, so a
    run of tens of thousands of clips does not read them all back); the others are read from the store."""
    per_clip, per_class = [], defaultdict(Counter)
    seen = seen or {}
    for clip in clips:
        row = seen.get(clip.clip_id)
        if row is None:
            if not store.is_complete(clip.clip_id):
                continue
            meta = store.read_meta(clip.clip_id)
            row = coverage_row(clip, meta["present"], meta["how"], store.attrs(clip.clip_id))
        per_clip.append(row)
        per_class[clip.label].update(clips=1, frames=row["frames"], present=row["present"])
    classes = [{"label": label, "clips": c["clips"], "frames": c["frames"], "present": c["present"],
                "coverage": c["present"] / max(c["frames"], 1)} for label, c in sorted(per_class.items())]
    return per_clip, classes


def coverage_row(clip: Clip, present: np.ndarray, how: np.ndarray, attrs: dict) -> dict:
    """One clip's row of the coverage table."""
    frames, found = len(present), int(np.sum(present))
    counts = Counter(HOW_NAMES.get(int(c), str(c)) for c in how)
    return {"clip_id": clip.clip_id, "label": clip.label, "frames": frames, "present": found,
            "coverage": found / max(frames, 1), "how": dict(sorted(counts.items())), "damage": damage_note(attrs)}


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
    """Rough memory of one faces worker: interpreter, OpenCV and dlib's models, the decoded frames held while
    the prealigned rule is decided (decode.HOLD_BYTES at most), plus a chunk of chips (CHUNK_FRAMES chips of
    size x size x 3, about three copies while aligning and encoding)."""
    return (300 << 20) + HOLD_BYTES + CHUNK_FRAMES * size * size * 3 * 3


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
    """Frames a clip will keep, from the container's count (no decoding) or the folder's images (counted by
    the scan)."""
    if clip.kind in ("frames", "image"):
        total = clip.frames if clip.frames >= 0 else len(list_frame_images(clip.path))
        fps = cfg.folder_fps
    else:
        cap = cv2.VideoCapture(str(clip.path))
        total, fps = int(cap.get(cv2.CAP_PROP_FRAME_COUNT) or 0), float(cap.get(cv2.CAP_PROP_FPS) or 0)
        cap.release()
    kept = -(-max(total, 0) // cfg.every_nth)
    if cfg.fps_cap is not None and fps > cfg.fps_cap:
        kept = int(kept * cfg.fps_cap / fps) + 1
    return min(kept, cfg.max_frames) if cfg.max_frames is not None else kept


def check_space(out_path: Path, clips: list[Clip], cfg: PreprocessConfig, planned: Optional[dict] = None) -> int:
    """Refuse a run whose store cannot fit on its disk (frames x bytes per frame of the codec), before any
    work; returns the estimated bytes still to write. ``planned``: clip id -> planned frames, when known."""
    frames = sum(planned[c.clip_id] if planned else planned_frames(c, cfg.decode) for c in clips)
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
                       shard: Optional[str] = None, frame_root: Optional[str] = None) -> PreprocessSummary:
    """Align every clip's faces into a faces store; resumable, one writer, failures logged.

    Arguments:
        source: dataset folder (AFEW, ``<split>/<label>/<clip>``, a release) or ``path,label,split`` CSV.
        out_path: the faces store (``.h5``); created, or resumed when it holds the same config.
        cfg: PreprocessConfig (face, decode, class names, compression, codec, max_fail_fraction, batching).
        workers, backend, scheduler, layout, shard, frame_root: override the config's run fields of the same
            names (``cfg.workers`` None: the cores this process may use; backend "loky" (this machine) or "dask"
            (a cluster at ``scheduler``, whose workers see ``out``'s folder); layout None: detected; shard
            "K/N": only shard K of N of the clips, into a store of its own, joined with ``emo-cache merge``;
            frame_root: the folder a release's clips are read from, when several hold them).
        progress: show a tqdm bar.
    Returns:
        PreprocessSummary: counts, failures (also in ``<out>.failures.jsonl``) and per-clip and
        per-class coverage. ``summary.ok`` is False when more than max_fail_fraction of clips failed.
        Raises StoreFull when the store cannot fit, or when the disk fills (committed clips are kept; a
        rerun finishes the job), and DatasetError when the dataset, a split or a fold yields no clip.

    >>> import shutil, tempfile
    >>> tmp = tempfile.TemporaryDirectory()
    >>> for clip in ("Train/Happy/0-f1-su-ph.jpg", "Train/Sad/45-m7-di-ph.jpg", "Val/Happy/single_face.jpg"):
    ...     (Path(tmp.name) / "data" / clip).parent.mkdir(parents=True, exist_ok=True)
    ...     _ = shutil.copy(Path("data/samples") / Path(clip).name, Path(tmp.name) / "data" / clip)
    >>> summary = preprocess_dataset(Path(tmp.name) / "data", Path(tmp.name) / "faces.h5", PreprocessConfig(),
    ...                              workers=1, progress=False)
    >>> summary.ok
    True
    >>> print(summary.format())
    clip                                             frames   face  cover  how
    Train/Happy/0-f1-su-ph.jpg                            1      1 100.0%  prealigned=1
    Train/Sad/45-m7-di-ph.jpg                             1      1 100.0%  prealigned=1
    Val/Happy/single_face.jpg                             1      1 100.0%  detector=1
    class         clips  frames    face  cover
    Happy             2       2       2 100.0%
    Sad               1       1       1 100.0%
    store .../faces.h5: 3 clip(s) written, 0 already complete, 0 failed of 3
    >>> tmp.cleanup()
    """
    cfg = replace(cfg, **{k: v for k, v in dict(workers=workers, backend=backend, scheduler=scheduler,
                                                layout=layout, shard=shard, frame_root=frame_root).items()
                          if v is not None})
    workers, backend, scheduler, layout, shard, frame_root = (
        usable_cores() if cfg.workers is None else cfg.workers, cfg.backend, cfg.scheduler, cfg.layout, cfg.shard,
        cfg.frame_root)
    check_run_arguments(source, cfg, workers, backend, scheduler)
    scan = scan_dataset(Path(source), cfg.class_names, layout, **({"frame_root": frame_root} if frame_root else {}))
    refuse_empty(scan)
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
        planned = {c.clip_id: planned_frames(c, cfg.decode) for c in todo}
        check_space(out_path, todo, cfg, planned)
        shutil.rmtree(parts_dir, ignore_errors=True)  # parts of a killed run: we hold the store's lock
        tasks = plan_tasks(todo, cfg, planned)
        if any(task.stream for task in tasks):
            parts_dir.mkdir(parents=True, exist_ok=True)
        results = run_tasks(tasks, cfg, workers, backend, scheduler, store_config, parts_dir)
        bar, seen = tqdm(total=len(todo), desc="faces", unit="clip", disable=not progress), {}
        try:
            clip_failures = commit_results(store, results, log, cfg, bar, seen)
        except BaseException:
            stop_workers(results)
            raise
        finally:
            bar.close()
            shutil.rmtree(parts_dir, ignore_errors=True)
        clip_cov, class_cov = coverage_report(store, clips, seen)
    return PreprocessSummary(out_path, log_path, len(clips) + len(scan.errors), len(todo) - len(clip_failures),
                             len(clips) - len(todo), failures + clip_failures, clip_cov, class_cov,
                             cfg.max_fail_fraction)


def refuse_empty(scan) -> None:
    """A dataset, split or fold that yields no clip stops the run before any work (DatasetError naming each,
    with what was ignored and why)."""
    empty = [p for p in scan.problems if p.reason == "empty"]
    if empty:
        raise DatasetError("\n  ".join(f"{p.path}: {p.message}" for p in empty)
                           + ("\n  " + "\n  ".join(scan.notes) if not scan.clips and scan.notes else "")
                           + "\n  (`emo-cache check` lists every problem)")


def commit_results(store: FacesStore, results: Iterable[list[ClipResult]], log: FailureLog,
                   cfg: Optional[PreprocessConfig] = None, bar=None, seen: Optional[dict] = None) -> list[Failure]:
    """The single writer: each finished clip is written whole from memory, or copied in from its part file,
    and committed with its ``complete`` mark last; each failed clip is logged (flushed at once); a full disk
    stops the run. Space is checked before a clip's first byte, so HDF5 never meets a full disk mid-clip.
    ``seen`` collects each committed clip's coverage row."""
    failures = []
    seen = {} if seen is None else seen
    compression = cfg.compression if cfg is not None else None
    for batch in results:
        batch = batch if isinstance(batch, list) else [batch]
        if any(result.full for result in batch):
            raise StoreFull(next(result.error for result in batch if result.full))
        in_memory = [result for result in batch if result.error is None and result.arrays is not None]
        if in_memory:  # a task's short clips committed together: two flushes, one free-space check for all
            store.write_clips([(r.clip.clip_id, r.arrays, r.attrs) for r in in_memory], compression)
        for result in batch:
            clip = result.clip
            if result.error is not None:
                failures.append(log.add(Failure("faces", str(clip.path), clip.clip_id, result.error)))
            elif result.part is not None:
                with FacesStore(result.part, "r") as part:
                    store.ensure_space(clip.clip_id, result.part.stat().st_size)
                    copy_clip(part, store, clip.clip_id)
                    meta = part.read_meta(clip.clip_id)
                    seen[clip.clip_id] = coverage_row(clip, meta["present"], meta["how"], part.attrs(clip.clip_id))
                result.part.unlink()
            elif result.arrays is not None:
                seen[clip.clip_id] = coverage_row(clip, result.arrays["present"], result.arrays["how"], result.attrs)
            if result.error is None:
                log.succeeded(clip.clip_id)
            if bar is not None:
                bar.update(1)
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
