"""Find the clips of a dataset (AFEW, generic <split>/<label>/<clip>, or a CSV) and check them.

Clip ids are ``f"{split}/{label}/{filename}"``; labels are canonical class names.
"""
from __future__ import annotations

import csv
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

from tqdm import tqdm

from pipeline.decode import (IMAGE_EXTENSIONS, VIDEO_EXTENSIONS, DecodeError, list_frame_images,
                             probe_video)

AFEW_CLASSES = ("Angry", "Disgust", "Fear", "Happy", "Neutral", "Sad", "Surprise")
CLASSES_FILE = "classes.txt"   # optional, one class per line: a dataset naming its own class order
KNOWN_SPLITS = {"train": "Train", "val": "Val", "valid": "Val", "validation": "Val", "test": "Test"}
IGNORED_NAMES = {".DS_Store", "Thumbs.db", "desktop.ini", CLASSES_FILE}


@dataclass(frozen=True)
class Clip:
    """One labelled clip: a video file or a folder of frame images."""
    clip_id: str   # "split/label/filename", unique in a dataset
    path: Path
    label: str     # canonical class name
    split: str     # "Train", "Val", "Test" or the folder's own name
    kind: str      # "video" | "frames"


@dataclass(frozen=True)
class Problem:
    """Something wrong in a dataset, naming the file it is about."""
    severity: str  # "error": the clip cannot be used; "warning": worth a look, nothing lost
    path: str
    message: str

    def __str__(self) -> str:
        return f"{self.severity}: {self.path}: {self.message}"


@dataclass
class DatasetScan:
    """What scan_dataset found: usable clips, problems, and the class order."""
    source: Path
    layout: str                     # "folders" | "csv"
    class_names: tuple[str, ...]
    clips: list[Clip] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)

    @property
    def errors(self) -> list[Problem]:
        return [p for p in self.problems if p.severity == "error"]

    def counts(self) -> dict[str, Counter]:
        """Clips per split, then per class: {"Train": Counter({"Happy": 3, ...}), ...}."""
        table: dict[str, Counter] = defaultdict(Counter)
        for clip in self.clips:
            table[clip.split][clip.label] += 1
        return dict(table)


def canonical_split(name: str) -> str:
    """"train"/"TRAIN" -> "Train", "val" -> "Val"; other names are kept as they are."""
    return KNOWN_SPLITS.get(name.lower(), name)


def resolve_class_names(source: Path, class_names: Optional[Sequence[str]]) -> tuple[str, ...]:
    """Explicit names win, then ``classes.txt`` beside the data, then AFEW's order."""
    if class_names:
        return tuple(class_names)
    listed = Path(source) / CLASSES_FILE if Path(source).is_dir() else Path(source).parent / CLASSES_FILE
    if listed.is_file():
        names = [line.strip() for line in listed.read_text().splitlines() if line.strip()]
        if names:
            return tuple(names)
    return AFEW_CLASSES


def clip_kind(path: Path) -> Optional[str]:
    """"video", "frames" (a folder holding images) or None (not a clip)."""
    if path.is_file() and path.suffix.lower() in VIDEO_EXTENSIONS:
        return "video"
    if path.is_dir():
        return "frames"
    return None


def scan_dataset(source: Path, class_names: Optional[Sequence[str]] = None) -> DatasetScan:
    """List a dataset's clips without decoding them.

    Arguments:
        source: a folder laid out as ``<split>/<label>/<clip>`` (AFEW is ``Train|Val/<Emotion>/*.avi``;
            names match case-insensitively), or a CSV file with a ``path,label,split`` header
            (paths relative to the CSV's folder).
        class_names: the class order; None: ``classes.txt`` in the folder, else AFEW's.
    Returns:
        DatasetScan with the clips (sorted by id), problems (unknown labels, duplicate ids, stray
        files, empty frame folders), and the class names.

    >>> scan = scan_dataset(Path("data/demo"))
    >>> scan.clips[0].clip_id
    'Train/Happy/single_face.mp4'
    """
    source = Path(source)
    names = resolve_class_names(source, class_names)
    if source.is_file() and source.suffix.lower() == ".csv":
        scan = DatasetScan(source, "csv", names)
        _scan_csv(source, scan)
    elif source.is_dir():
        scan = DatasetScan(source, "folders", names)
        _scan_folders(source, scan)
    else:
        raise FileNotFoundError(f"{source}: not a dataset folder or a .csv file; give the folder that"
                                " holds Train/ and Val/ (or <split>/<label>/<clip>), or a path,label,split CSV")
    _flag_duplicates(scan)
    scan.clips.sort(key=lambda c: c.clip_id)
    return scan


def _label_for(name: str, names: tuple[str, ...]) -> Optional[str]:
    lookup = {n.lower(): n for n in names}
    return lookup.get(name.strip().lower())


def _add_clip(scan: DatasetScan, path: Path, label: str, split: str) -> None:
    kind = clip_kind(path)
    if kind == "frames" and not list_frame_images(path):
        scan.problems.append(Problem("error", str(path), "folder holds no frame images"
                                     f" ({', '.join(IMAGE_EXTENSIONS)}); remove it or add its frames"))
        return
    if kind is None:
        scan.problems.append(Problem("warning", str(path), "stray file: not a video"
                                     f" ({', '.join(VIDEO_EXTENSIONS)}) or a frame folder; ignored"))
        return
    scan.clips.append(Clip(f"{split}/{label}/{path.name}", path, label, split, kind))


def _scan_folders(root: Path, scan: DatasetScan) -> None:
    for split_dir in sorted(root.iterdir()):
        if not split_dir.is_dir():
            if split_dir.name not in IGNORED_NAMES and split_dir.suffix.lower() != ".csv":
                scan.problems.append(Problem("warning", str(split_dir), "stray file at the dataset root;"
                                             " expected only <split>/ folders"))
            continue
        split = canonical_split(split_dir.name)
        for label_dir in sorted(split_dir.iterdir()):
            if not label_dir.is_dir():
                if label_dir.name not in IGNORED_NAMES:
                    scan.problems.append(Problem("warning", str(label_dir), "stray file in a split folder;"
                                                 " expected only <label>/ folders"))
                continue
            label = _label_for(label_dir.name, scan.class_names)
            if label is None:
                scan.problems.append(Problem("error", str(label_dir), f"unknown label folder; known classes"
                                             f" are {', '.join(scan.class_names)} (rename it, or list"
                                             f" the classes in {CLASSES_FILE} or with --classes)"))
                continue
            for clip_path in sorted(label_dir.iterdir()):
                if clip_path.name in IGNORED_NAMES:
                    continue
                _add_clip(scan, clip_path, label, split)


def _scan_csv(csv_path: Path, scan: DatasetScan) -> None:
    with open(csv_path, newline="") as fh:
        reader = csv.DictReader(fh)
        missing = {"path", "label", "split"} - set(reader.fieldnames or [])
        if missing:
            raise ValueError(f"{csv_path}: the CSV needs a header with path,label,split; it lacks"
                             f" {', '.join(sorted(missing))}")
        for line_no, row in enumerate(reader, start=2):
            path = Path(row["path"])
            path = path if path.is_absolute() else csv_path.parent / path
            label = _label_for(row["label"] or "", scan.class_names)
            where = f"{csv_path}:{line_no}"
            if label is None:
                scan.problems.append(Problem("error", where, f"unknown label {row['label']!r}; known classes"
                                             f" are {', '.join(scan.class_names)}"))
            elif not path.exists():
                scan.problems.append(Problem("error", where, f"{path} does not exist"))
            else:
                _add_clip(scan, path, label, canonical_split((row["split"] or "").strip() or "Train"))


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
        errors = sum(p.severity == "error" for p in self.problems)
        lines.append(f"{len(self.problems)} problem(s): {errors} error(s),"
                     f" {len(self.problems) - errors} warning(s)")
        lines += [f"  {p}" for p in self.problems]
        return "\n".join(lines)


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


def check_clip(clip: Clip) -> Optional[Problem]:
    """Open a clip and decode its first frame; a Problem naming the file, or None when it reads."""
    try:
        if clip.kind == "video":
            probe_video(clip.path)
    except DecodeError as exc:
        return Problem("error", str(clip.path), str(exc).split(": ", 1)[-1])
    return None


def check_dataset(source: Path, class_names: Optional[Sequence[str]] = None, progress: bool = True) -> CheckReport:
    """Scan a dataset and open every video, before hours are spent on it.

    Arguments:
        source: dataset folder or CSV (see scan_dataset).
        class_names: class order (None: classes.txt, else AFEW).
        progress: show a tqdm bar while videos are opened.
    Returns:
        CheckReport: clips per split x class and every problem (unknown label folders, duplicate ids,
        stray files, empty, corrupt, unreadable or zero-frame videos), each naming its file.

    >>> report = check_dataset(Path("data/demo"))
    >>> report.ok
    True
    """
    scan = scan_dataset(source, class_names)
    problems = list(scan.problems)
    for clip in tqdm(scan.clips, desc="check", unit="clip", disable=not progress):
        problem = check_clip(clip)
        if problem is not None:
            problems.append(problem)
    return CheckReport(scan, problems)
