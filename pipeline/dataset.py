"""Find the clips of a dataset and check them. The layouts (AFEW, generic <split>/<label>/<clip>, CSV, DFEW,
FERV39k, MAFW, CK+, annotation lists) live in ``pipeline.layouts``, one function and one registry entry each.

Clip ids are ``f"{split}/{label}/{name}"`` (``name`` may hold "/", e.g. ``All/Happy/S005/001`` for CK+);
labels are canonical class names. A dataset with folds gives every clip the split ``All`` and its fold
membership in ``Clip.folds`` ({fold: "train" | "test"}), so one store serves every fold.
"""
from __future__ import annotations

from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

from tqdm import tqdm

from cache.errors import UserError
from pipeline.decode import (IMAGE_EXTENSIONS, VIDEO_EXTENSIONS, DecodeError, count_video_frames, is_short,
                             list_frame_images, probe_video)

AFEW_CLASSES = ("Angry", "Disgust", "Fear", "Happy", "Neutral", "Sad", "Surprise")
CLASSES_FILE = "classes.txt"   # optional, one class per line: a dataset naming its own class order
KNOWN_SPLITS = {"train": "Train", "val": "Val", "valid": "Val", "validation": "Val", "test": "Test"}
IGNORED_NAMES = {".DS_Store", "Thumbs.db", "desktop.ini", CLASSES_FILE}


FOLD_SPLIT = "All"  # the split of every clip of a dataset with folds: fold membership is in Clip.folds


@dataclass(frozen=True)
class Clip:
    """One labelled clip: a video file or a folder of frame images."""
    clip_id: str   # "split/label/name", unique in a dataset whatever the fold
    path: Path
    label: str     # canonical class name
    split: str     # "Train", "Val", "Test", the folder's own name, or "All" for a dataset with folds
    kind: str      # "video" | "frames"
    folds: tuple = ()  # ((fold, "train" | "test"), ...) sorted by fold; () for a dataset without folds

    def folds_attr(self) -> Optional[str]:
        """The ``folds`` clip attribute of the stores: JSON {"1": "train", "2": "test", ...}, or None."""
        import json
        return json.dumps({str(k): part for k, part in self.folds}, sort_keys=True) if self.folds else None

    def store_attrs(self) -> dict:
        """The clip attributes every store records from the dataset side (label, split, kind, folds)."""
        attrs = {"label": self.label, "split": self.split, "source": str(self.path), "kind": self.kind}
        if self.folds:
            attrs["folds"] = self.folds_attr()
        return attrs


class DatasetError(UserError):
    """A dataset, or a file of it, cannot be read as the layout asks; the message names the file."""


@dataclass(frozen=True)
class Problem:
    """Something wrong in a dataset, naming the file it is about."""
    severity: str  # "error": the clip cannot be used; "warning": worth a look; "info": counted, by design
    path: str
    message: str

    def __str__(self) -> str:
        return f"{self.severity}: {self.path}: {self.message}"


@dataclass
class DatasetScan:
    """What scan_dataset found: usable clips, problems, and the class order."""
    source: Path
    layout: str                     # a name in pipeline.layouts.LAYOUTS: "afew", "folders", "csv", "dfew", ...
    class_names: tuple[str, ...]
    clips: list[Clip] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)
    options: dict = field(default_factory=dict)  # layout options, e.g. {"fold_count": 10} for CK+

    @property
    def errors(self) -> list[Problem]:
        return [p for p in self.problems if p.severity == "error"]

    def counts(self) -> dict[str, Counter]:
        """Clips per split, then per class: {"Train": Counter({"Happy": 3, ...}), ...}."""
        table: dict[str, Counter] = defaultdict(Counter)
        for clip in self.clips:
            table[clip.split][clip.label] += 1
        return dict(table)

    @property
    def folds(self) -> list[int]:
        """The fold numbers of the dataset, sorted ([] without folds)."""
        return sorted({k for clip in self.clips for k, _ in clip.folds})

    def fold_counts(self) -> dict[int, Counter]:
        """Clips per fold and part: {1: Counter({"train": 12, "test": 3}), ...}."""
        table: dict[int, Counter] = defaultdict(Counter)
        for clip in self.clips:
            for k, part in clip.folds:
                table[k][part] += 1
        return dict(sorted(table.items()))


def canonical_split(name: str) -> str:
    """"train"/"TRAIN" -> "Train", "val" -> "Val"; other names are kept as they are."""
    return KNOWN_SPLITS.get(name.lower(), name)


def resolve_class_names(source: Path, class_names: Optional[Sequence[str]],
                        layout_classes: Optional[Sequence[str]] = None) -> tuple[str, ...]:
    """Explicit names win, then ``classes.txt`` beside the data, then the layout's own, then AFEW's order."""
    if class_names:
        return tuple(class_names)
    listed = Path(source) / CLASSES_FILE if Path(source).is_dir() else Path(source).parent / CLASSES_FILE
    if listed.is_file():
        names = [line.strip() for line in listed.read_text().splitlines() if line.strip()]
        if names:
            return tuple(names)
    return tuple(layout_classes) if layout_classes else AFEW_CLASSES


def clip_kind(path: Path) -> Optional[str]:
    """"video", "frames" (a folder holding images) or None (not a clip)."""
    if path.is_file() and path.suffix.lower() in VIDEO_EXTENSIONS:
        return "video"
    if path.is_dir():
        return "frames"
    return None


def scan_dataset(source: Path, class_names: Optional[Sequence[str]] = None, layout: Optional[str] = None,
                 **options) -> DatasetScan:
    """List a dataset's clips without decoding them.

    Arguments:
        source: a dataset folder or list file. Its layout is detected (see ``pipeline.layouts``):
            AFEW ``Train|Val/<Emotion>/*.avi`` and the generic ``<split>/<label>/<clip>`` (names match
            case-insensitively), a ``path,label,split`` CSV (paths relative to it), DFEW, FERV39k,
            MAFW, CK+, or a ``frames_dir num_frames label`` annotation list.
        class_names: the class order; None: ``classes.txt`` beside the data, else the layout's own
            (DFEW, FERV39k, MAFW, CK+), else AFEW's.
        layout: a layout name (``emo-cache check --layout``); None detects it.
        options: layout options, e.g. ``fold_count=10`` for CK+.
    Returns:
        DatasetScan with the clips (sorted by id), problems (unknown labels, duplicate ids, stray
        files, empty frame folders, ...), the class names and, for datasets with folds, each clip's folds.

    >>> scan = scan_dataset(Path("data/demo"))
    >>> scan.clips[0].clip_id
    'Train/Happy/single_face.mp4'
    """
    from pipeline.layouts import detect_layout, get_layout  # the registry imports this module

    source = Path(source)
    if not source.exists():
        raise DatasetError(f"{source}: no such dataset folder or list file")
    entry = get_layout(layout, source) if layout else detect_layout(source)
    layout_classes = entry.default_classes(source)
    names = resolve_class_names(source, class_names, layout_classes)
    given = class_names or layout_classes or names != AFEW_CLASSES
    scan = DatasetScan(source, entry.name, names,
                       options={**options, "class_source": "given" if given else "afew default"})
    entry.scan(source, scan)
    _flag_duplicates(scan)
    scan.clips.sort(key=lambda c: c.clip_id)
    return scan


def label_for(name: str, names: tuple[str, ...]) -> Optional[str]:
    """The canonical class name matching ``name`` case-insensitively, or None."""
    lookup = {n.lower(): n for n in names}
    return lookup.get(str(name).strip().lower())


_label_for = label_for


def add_clip(scan: DatasetScan, path: Path, label: str, split: str, name: Optional[str] = None,
             folds: tuple = ()) -> None:
    """Add a clip (id ``split/label/name``; name defaults to the file name) or the problem that stops it."""
    kind = clip_kind(path)
    if kind == "frames" and not list_frame_images(path):
        scan.problems.append(Problem("error", str(path), "folder holds no frame images"
                                     f" ({', '.join(IMAGE_EXTENSIONS)}); remove it or add its frames"))
        return
    if kind is None:
        scan.problems.append(Problem("warning", str(path), "stray file: not a video"
                                     f" ({', '.join(VIDEO_EXTENSIONS)}) or a frame folder; ignored"))
        return
    scan.clips.append(Clip(f"{split}/{label}/{name or path.name}", path, label, split, kind, tuple(sorted(folds))))


_add_clip = add_clip


def _flag_duplicates(scan: DatasetScan) -> None:
    """Two clips with one id would overwrite each other in the store: keep the first, flag the rest."""
    seen: dict[str, Clip] = {}
    kept = []
    for clip in scan.clips:
        if clip.clip_id in seen:
            scan.problems.append(Problem("error", str(clip.path), f"duplicate clip id {clip.clip_id!r}"
                                         f" (also {seen[clip.clip_id].path}); rename one of them"))
        else:
            seen[clip.clip_id] = clip
            kept.append(clip)
    scan.clips = kept


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
    middle; it is an error, since `faces` would store it short. Frame folders are listed, not decoded.
    """
    if clip.kind != "video":
        return check_frame_folder(clip)
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


def check_frame_folder(clip: Clip) -> Optional[Problem]:
    """A warning when images of a frame folder cannot be read (headers only); `faces` keeps them as frames
    without a face, so the clip stays usable."""
    from pipeline.decode import image_size

    images = list_frame_images(clip.path)
    bad = [p for p in images if image_size(p) is None]
    if not bad:
        return None
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

    >>> report = check_dataset(Path("data/demo"))
    >>> report.ok
    True
    """
    scan = scan_dataset(source, class_names, layout, **options)
    if workers > 1 and len(scan.clips) > workers:
        from joblib import Parallel, delayed

        found = Parallel(n_jobs=workers, return_as="generator")(delayed(check_clip)(c, quick) for c in scan.clips)
    else:
        found = (check_clip(c, quick) for c in scan.clips)
    found = tqdm(found, total=len(scan.clips), desc="check", unit="clip", disable=not progress)
    return CheckReport(scan, list(scan.problems) + [p for p in found if p is not None])
