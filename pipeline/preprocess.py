"""The faces stage: every clip of a dataset -> aligned face chips in one resumable faces store.

Workers (joblib loky processes, or a dask cluster) decode and align whole clips; the main process is
the only writer and commits each finished clip whole. A rerun skips complete clips; a bad clip goes
into the failure log and the run carries on.
"""
from __future__ import annotations

import importlib.util
import json
import time
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterable, Iterator, Optional, Sequence, TextIO

import cv2
import numpy as np
from joblib import Parallel, delayed, parallel_config
from tqdm import tqdm

from cache import HOW, FacesStore
from pipeline import __version__
from pipeline.dataset import Clip, Problem, scan_dataset
from pipeline.decode import DecodeConfig, iter_clip_frames, list_frame_images, probe_video
from pipeline.faces import FaceConfig, align_clip_frames, load_aligner, resize_prealigned_frames
from pipeline.runtime import failure_log_path

HOW_NAMES = {code: name for name, code in HOW.items()}
BACKENDS = ("loky", "dask")


@dataclass(frozen=True)
class PreprocessConfig:
    """Everything that decides the faces in a store (saved at the store's root) plus run policy."""
    face: FaceConfig = field(default_factory=FaceConfig)       # detection, tracking, alignment
    decode: DecodeConfig = field(default_factory=DecodeConfig)  # which frames are decoded
    class_names: Optional[tuple[str, ...]] = None  # None: classes.txt beside the data, else AFEW's order
    compression: Optional[str] = None   # None: fastest reads for training; "lzf" or "gzip" make the store
                                        # smaller at some read cost
    max_fail_fraction: float = 0.05     # the run fails (non-zero exit) when more than this share of clips
                                        # fail: a few bad files are normal, many mean a broken setup

    def validate(self) -> None:
        """Raise ValueError naming the bad field; never changes a value."""
        self.face.validate()
        self.decode.validate()
        if self.compression not in (None, "lzf", "gzip"):
            raise ValueError(f"compression={self.compression!r}: use None, 'lzf' or 'gzip'")
        if not 0 <= self.max_fail_fraction <= 1:
            raise ValueError(f"max_fail_fraction={self.max_fail_fraction}: must be in [0, 1]")

    def store_config(self, class_names: Sequence[str]) -> dict:
        """The settings that make the faces: a store built with other settings is refused."""
        return {"face": asdict(self.face), "decode": asdict(self.decode), "compression": self.compression,
                "class_names": list(class_names)}


# -- one clip, no store ---------------------------------------------------------------------------
def is_prealigned(clip: Clip, cfg: FaceConfig) -> bool:
    """Frame folders of already aligned faces skip detection. auto: the first image is square."""
    if clip.kind != "frames" or cfg.prealigned == "no":
        return False
    if cfg.prealigned == "yes":
        return True
    first = cv2.imread(str(list_frame_images(clip.path)[0]), cv2.IMREAD_UNCHANGED)
    return first is not None and first.shape[0] == first.shape[1]


def process_clip(clip: Clip, cfg: PreprocessConfig) -> tuple[dict[str, np.ndarray], dict]:
    """Decode one clip and align its subject's face in every kept frame; no store involved.

    Arguments:
        clip: a Clip from scan_dataset (video file or frame folder).
        cfg: PreprocessConfig (its face and decode parts are used).
    Returns:
        (arrays, attrs): the faces-store arrays (see align_clip_frames) and the clip attributes
        label, split, source, kind, fps, total_frames. Raises DecodeError naming the file when the
        clip cannot be decoded.

    >>> clip = Clip("Train/Happy/single_face.mp4", Path("data/samples/single_face.mp4"), "Happy", "Train", "video")
    >>> arrays, attrs = process_clip(clip, PreprocessConfig())
    >>> arrays["faces"].shape
    (72, 256, 256, 3)
    """
    if clip.kind == "video":
        info = probe_video(clip.path)
        fps, total = info.fps, info.frame_count
    else:
        fps, total = cfg.decode.folder_fps, len(list_frame_images(clip.path))
    frames = iter_clip_frames(clip.path, clip.kind, cfg.decode)
    if is_prealigned(clip, cfg.face):
        arrays = resize_prealigned_frames(frames, cfg.face)
    else:
        arrays = align_clip_frames(frames, load_aligner(cfg.face.predictor_path), cfg.face)
    attrs = {"label": clip.label, "split": clip.split, "source": str(clip.path), "kind": clip.kind,
             "fps": float(fps), "total_frames": int(total)}
    return arrays, attrs


@dataclass
class ClipResult:
    """What a worker hands back to the writer: arrays and attrs, or the reason the clip failed."""
    clip: Clip
    arrays: Optional[dict] = None
    attrs: Optional[dict] = None
    error: Optional[str] = None
    seconds: float = 0.0


def run_clip(clip: Clip, cfg: PreprocessConfig) -> ClipResult:
    """process_clip that never raises for a bad clip: the error goes back to the writer for the log."""
    start = time.perf_counter()
    try:
        arrays, attrs = process_clip(clip, cfg)
    except Exception as exc:  # any failure of one clip is logged and the run carries on
        return ClipResult(clip, error=f"{type(exc).__name__}: {exc}", seconds=time.perf_counter() - start)
    return ClipResult(clip, arrays, attrs, seconds=time.perf_counter() - start)


# -- many clips ------------------------------------------------------------------------------------
def clip_cost(clip: Clip) -> int:
    """Rough work estimate, to start the longest clips first so workers finish together."""
    if clip.kind == "video":
        return clip.path.stat().st_size if clip.path.is_file() else 0
    return len(list_frame_images(clip.path)) * 50_000


def run_clips(clips: list[Clip], cfg: PreprocessConfig, workers: int, backend: str,
              scheduler: Optional[str]) -> Iterator[ClipResult]:
    """Results in completion order: in this process (1 loky worker), loky processes, or a dask cluster."""
    if backend == "loky" and workers == 1:
        return (run_clip(clip, cfg) for clip in clips)
    if backend == "loky":
        return Parallel(n_jobs=workers, backend="loky", return_as="generator_unordered")(
            delayed(run_clip)(clip, cfg) for clip in clips)
    return run_on_dask(clips, cfg, workers, scheduler)


def run_on_dask(clips: list[Clip], cfg: PreprocessConfig, workers: int, scheduler: str) -> Iterator[ClipResult]:
    """The same clip jobs through joblib's dask backend on the cluster at ``scheduler``."""
    from dask.distributed import Client  # optional: only a dask run needs it

    with Client(scheduler), parallel_config(backend="dask"):
        results = Parallel(n_jobs=workers, return_as="generator_unordered")(
            delayed(run_clip)(clip, cfg) for clip in clips)
        yield from results


@dataclass
class PreprocessSummary:
    """What a faces run did: counts, failures, and coverage per clip and per class."""
    out_path: Path
    failure_log: Path
    total: int                      # clips in the dataset (plus unusable entries found by the scan)
    written: int                    # clips committed by this run
    skipped: int                    # clips already complete from an earlier run
    failures: list[dict]            # {"file", "clip_id", "reason"} for this run
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
            lines.append(f"{row['clip_id']:<48} {row['frames']:>6} {row['present']:>6} {row['coverage']:>6.1%}  {how}")
        lines.append(f"{'class':<12} {'clips':>6} {'frames':>7} {'face':>7} {'cover':>6}")
        for row in self.class_coverage:
            lines.append(f"{row['label']:<12} {row['clips']:>6} {row['frames']:>7} {row['present']:>7}"
                         f" {row['coverage']:>6.1%}")
        lines.append(f"store {self.out_path}: {self.written} clip(s) written, {self.skipped} already complete,"
                     f" {len(self.failures)} failed of {self.total}"
                     + (f" (see {self.failure_log})" if self.failures else ""))
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
                         "coverage": present / max(frames, 1), "how": dict(sorted(how.items()))})
        per_class[clip.label].update(clips=1, frames=frames, present=present)
    classes = [{"label": label, "clips": c["clips"], "frames": c["frames"], "present": c["present"],
                "coverage": c["present"] / max(c["frames"], 1)} for label, c in sorted(per_class.items())]
    return per_clip, classes


def check_run_arguments(source: Path, cfg: PreprocessConfig, workers: int, backend: str,
                        scheduler: Optional[str]) -> None:
    """Stop on a bad argument before any work is done."""
    cfg.validate()
    if not Path(source).exists():
        raise FileNotFoundError(f"{source}: no such dataset folder or CSV")
    if workers < 1:
        raise ValueError(f"workers={workers}: must be >= 1")
    if backend not in BACKENDS:
        raise ValueError(f"backend={backend!r}: use one of {', '.join(BACKENDS)}")
    if backend == "dask" and not scheduler:
        raise ValueError("backend 'dask' needs a scheduler address (--scheduler tcp://HOST:8786)")
    if backend == "dask" and importlib.util.find_spec("distributed") is None:
        raise ValueError("backend 'dask' needs dask.distributed: pip install 'dask[distributed]'")


def problem_failure(problem: Problem) -> dict:
    return {"file": problem.path, "clip_id": None, "reason": problem.message}


def preprocess_dataset(source: Path, out_path: Path, cfg: PreprocessConfig = PreprocessConfig(),
                       workers: int = 2, backend: str = "loky", scheduler: Optional[str] = None,
                       progress: bool = True) -> PreprocessSummary:
    """Align every clip's faces into a faces store; resumable, one writer, failures logged.

    Arguments:
        source: dataset folder (AFEW or ``<split>/<label>/<clip>``) or ``path,label,split`` CSV.
        out_path: the faces store (``.h5``); created, or resumed when it holds the same config.
        cfg: PreprocessConfig (face, decode, class names, compression, max_fail_fraction).
        workers: parallel clip workers (loky processes, or dask jobs).
        backend: "loky" (this machine) or "dask" (a cluster at ``scheduler``).
        scheduler: dask scheduler address, e.g. ``tcp://10.0.0.5:8786`` (dask only).
        progress: show a tqdm bar.
    Returns:
        PreprocessSummary: counts, failures (also in ``<out>.failures.jsonl``) and per-clip and
        per-class coverage. ``summary.ok`` is False when more than max_fail_fraction of clips failed.

    >>> summary = preprocess_dataset(Path("data/demo"), Path("runs/faces.h5"), PreprocessConfig(), workers=2)
    >>> print(summary.format())
    """
    check_run_arguments(source, cfg, workers, backend, scheduler)
    scan = scan_dataset(Path(source), cfg.class_names)
    out_path, log_path = Path(out_path), failure_log_path(out_path)
    store_config = cfg.store_config(scan.class_names)
    failures = [problem_failure(p) for p in scan.errors]
    with FacesStore(out_path, "a", config=store_config, code_version=__version__,
                    log=tqdm.write) as store, open(log_path, "w") as log:
        save_run_config(out_path, store_config, cfg, source, workers, backend, scheduler)
        for failure in failures:
            log.write(json.dumps(failure) + "\n")
        todo = sorted((c for c in scan.clips if not store.is_complete(c.clip_id)), key=clip_cost, reverse=True)
        results = tqdm(run_clips(todo, cfg, workers, backend, scheduler), total=len(todo), desc="faces",
                       unit="clip", disable=not progress)
        clip_failures = commit_results(store, results, log, cfg.compression)
        clip_cov, class_cov = coverage_report(store, scan.clips)
    return PreprocessSummary(out_path, log_path, len(scan.clips) + len(scan.errors), len(todo) - len(clip_failures),
                             len(scan.clips) - len(todo), failures + clip_failures, clip_cov, class_cov,
                             cfg.max_fail_fraction)


def commit_results(store: FacesStore, results: Iterable[ClipResult], log: TextIO,
                   compression: Optional[str]) -> list[dict]:
    """The single writer: commit each finished clip whole; log each failed one (flushed at once)."""
    failures = []
    for result in results:
        if result.error is None:
            store.write_clip(result.clip.clip_id, result.arrays, result.attrs, compression=compression)
            continue
        failure = {"file": str(result.clip.path), "clip_id": result.clip.clip_id, "reason": result.error}
        failures.append(failure)
        log.write(json.dumps(failure) + "\n")
        log.flush()
    return failures


def save_run_config(out_path: Path, store_config: dict, cfg: PreprocessConfig, source: Path, workers: int,
                    backend: str, scheduler: Optional[str]) -> None:
    """The resolved config of this run, beside the store (the store's root holds the same store_config)."""
    run = {**store_config, "max_fail_fraction": cfg.max_fail_fraction, "source": str(source),
           "workers": workers, "backend": backend, "scheduler": scheduler, "code_version": __version__}
    out_path.with_name(out_path.name + ".config.json").write_text(json.dumps(run, indent=2) + "\n")
