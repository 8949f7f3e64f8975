"""Stage `check`: scan a dataset and decode every video before hours are spent on it."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

from tqdm import tqdm

from emotion_attention.pipeline.configs import CheckConfig
from emotion_attention.pipeline.core.runtime import Failure, usable_cores, worker_executor
from emotion_attention.pipeline.core.stage import StageSummary
from emotion_attention.pipeline.data.clips import Clip, DatasetScan, Problem
from emotion_attention.pipeline.data.decode import (
    DecodeError,
    count_video_frames,
    image_size,
    is_short,
    list_frame_images,
    probe_video,
)
from emotion_attention.pipeline.data.layouts import scan_dataset


@dataclass
class CheckReport:
    """check_dataset's result: the scan plus decode problems; ``ok`` is False when any error exists."""
    scan: DatasetScan
    problems: list[Problem]

    @property
    def ok(self) -> bool:
        return not any(p.severity == "error" for p in self.problems)

    def format(self) -> str:
        """A plain-text report: clips per split x class, then every problem on its own line."""
        lines = [f"dataset {self.scan.source} ({self.scan.layout} layout), classes: "
                 f"{', '.join(self.scan.class_names)}"]
        lines += format_counts(self.scan)
        lines += format_fold_counts(self.scan)
        notes = [p for p in self.problems if p.severity == "info"]
        problems = [p for p in self.problems if p.severity != "info"]
        errors = sum(p.severity == "error" for p in problems)
        lines += [f"note: {note}" for note in self.scan.notes]
        lines += [f"note: {p.path}: {p.message}" for p in notes]
        lines.append(f"{len(problems)} problem(s): {errors} error(s), {len(problems) - errors} warning(s)")
        lines += [f"  {p}" for p in problems]
        return "\n".join(lines)


def format_fold_counts(scan: DatasetScan) -> list[str]:
    """One line per fold: its train and test clip counts (nothing for a dataset without folds)."""
    return [f"fold {k:>2}: train {c.get('train', 0):>6}  test {c.get('test', 0):>6}"
            for k, c in scan.fold_counts().items()]


def format_counts(scan: DatasetScan) -> list[str]:
    counts = scan.counts()
    width = max([len(n) for n in scan.class_names] + [5])
    header = "split".ljust(8) + "".join(n.rjust(width + 1) for n in scan.class_names) + "total".rjust(width + 1)
    rows = [header]
    for split in sorted(counts):
        row = [counts[split].get(n, 0) for n in scan.class_names]
        rows.append(split.ljust(8) + "".join(str(v).rjust(width + 1) for v in row)
                    + str(sum(row)).rjust(width + 1))
    return rows


def check_clip(clip: Clip, quick: bool = False) -> Optional[Problem]:
    """Open a video and decode every frame (``quick``: the first only); a Problem naming the file, or None.

    A video in which fewer frames decode than its container announces is truncated or damaged in the
    middle; it is an error, since `faces` would store it short. Frame folders and images are checked from
    their image headers (``quick``: the first image only), not decoded.
    """
    if clip.kind != "video":
        return check_frame_folder(clip, quick)
    try:
        probe_video(clip.path)
        if quick:
            return None
        decoded, total = count_video_frames(clip.path)
    except DecodeError as exc:
        return Problem("error", str(clip.path), str(exc).split(": ", 1)[-1])
    if is_short(decoded, total):
        return Problem("error", str(clip.path), f"only {decoded} of the {total} frames its container announces"
                       " decode (truncated, or damaged in the middle); re-copy or re-encode it")
    return None


def check_frame_folder(clip: Clip, quick: bool = False) -> Optional[Problem]:
    """A warning when images of a frame folder cannot be read (headers only); `faces` keeps them as frames
    without a face, so the clip stays usable. A still image that cannot be read is an error: it is the clip."""
    images = list_frame_images(clip.path)
    bad = [p for p in (images[:1] if quick else images) if image_size(p) is None]
    if not bad:
        return None
    if clip.kind == "image":
        return Problem("error", str(clip.path), "not a readable image (corrupt, truncated, or another format under"
                       " an image name); re-export or remove it")
    return Problem("warning", str(clip.path), f"{len(bad)} of {len(images)} images cannot be read (first:"
                   f" {bad[0].name}); they become frames without a face")


def check_dataset(source: Path, class_names: Optional[Sequence[str]] = None, progress: bool = True,
                  layout: Optional[str] = None, quick: bool = False, workers: int = 1, **options) -> CheckReport:
    """Scan a dataset and decode every video, before hours are spent on it.

    Arguments:
        source: dataset folder or list file (see scan_dataset).
        class_names: class order (None: classes.txt, else the layout's, else AFEW).
        progress: show a tqdm bar while videos are decoded.
        layout: layout name; None detects it.
        quick: decode only each video's first frame (misses truncated and damaged videos).
        workers: clips decoded in parallel (joblib processes); 1 decodes in this process.
        options: layout options (see scan_dataset).
    Returns:
        CheckReport: clips per split x class (and per fold) and every problem (unknown label folders,
        duplicate ids, stray files, empty, corrupt, truncated, unreadable or zero-frame videos), each
        naming its file.

    >>> import shutil, tempfile
    >>> tmp = tempfile.TemporaryDirectory()
    >>> for clip in ("Train/Happy/single_face.mp4", "Train/Sad/45-m7-di-ph.jpg", "Val/Happy/0-f1-su-ph.jpg"):
    ...     (Path(tmp.name) / clip).parent.mkdir(parents=True, exist_ok=True)
    ...     _ = shutil.copy(Path("data/samples") / Path(clip).name, Path(tmp.name) / clip)
    >>> report = check_dataset(Path(tmp.name), progress=False)
    >>> report.ok
    True
    >>> print(report.format())
    dataset ... (afew layout), classes: Angry, Disgust, Fear, Happy, Neutral, Sad, Surprise
    split       Angry  Disgust     Fear    Happy  Neutral      Sad Surprise    total
    Train           0        0        0        1        0        1        0        2
    Val             0        0        0        1        0        0        0        1
    0 problem(s): 0 error(s), 0 warning(s)
    >>> tmp.cleanup()
    """
    scan = scan_dataset(source, class_names, layout, **options)
    bar = tqdm(total=len(scan.clips), desc="check", unit="clip", disable=not progress)
    found = []
    for problems, done in check_batches(batch_clips(scan.clips), quick, workers):
        found += problems
        bar.update(done)
    bar.close()
    return CheckReport(scan, list(scan.problems) + found)


CHECK_BATCH = 64  # clips per job whose check only reads image headers: one job per clip costs more than the work


def batch_clips(clips: Sequence[Clip]) -> list[list[Clip]]:
    """Clips in jobs: each video alone (it is decoded whole), frame folders and images CHECK_BATCH at a time."""
    videos = [[c] for c in clips if c.kind == "video"]
    others = [c for c in clips if c.kind != "video"]
    return videos + [others[i:i + CHECK_BATCH] for i in range(0, len(others), CHECK_BATCH)]


def check_batch(clips: Sequence[Clip], quick: bool) -> tuple[list[Problem], int]:
    """(problems, clips checked) of one job."""
    return [p for p in (check_clip(c, quick) for c in clips) if p is not None], len(clips)


def check_batches(batches: list[list[Clip]], quick: bool, workers: int):
    """Each job's (problems, clip count) in job order, in loky processes when there are several workers and
    jobs (``worker_executor``: they end on their own when this process is killed)."""
    if workers > 1 and len(batches) > 1:
        return worker_executor(workers).map(check_batch, batches, [quick] * len(batches))
    return (check_batch(b, quick) for b in batches)


def run(cfg: CheckConfig, inputs: Sequence[Path], out: Optional[Path] = None, *, log=print,
        progress: bool = True) -> StageSummary:
    """Stage `check`: the report of ``check_dataset`` on ``inputs[0]``; ``out`` is unused (the report is
    the terminal output). ``ok`` is False when any error was found.

    >>> print(run(CheckConfig(), [Path("data/demo")]).format())  # doctest: +SKIP
    """
    cfg.validate()
    (source,) = inputs
    report = check_dataset(Path(source), cfg.class_names, progress=progress, layout=cfg.layout, quick=cfg.quick,
                           workers=usable_cores() if cfg.workers is None else cfg.workers,
                           **({"frame_root": cfg.frame_root} if cfg.frame_root else {}))
    failures = [Failure("check", p.path, None, p.message) for p in report.problems if p.severity == "error"]
    return StageSummary("check", report.ok, {}, failures, report.format().splitlines(), result=report)
