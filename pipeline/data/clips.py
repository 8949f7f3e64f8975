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

from emotion_attention.cache.errors import UserError
from emotion_attention.pipeline.configs import AFEW_CLASSES
from emotion_attention.pipeline.data.decode import (
    IMAGE_EXTENSIONS,
    VIDEO_EXTENSIONS,
    list_frame_images,
)

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


