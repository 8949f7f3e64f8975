"""Find the clips of a dataset and check them. The layouts (AFEW, generic <split>/<label>/<clip>, CSV, DFEW,
FERV39k, MAFW, RAF-DB, CK+, annotation lists) live in ``pipeline.layouts``, one function and one registry entry
each. A clip is a video, a folder of frame images, or one still image (a one-frame clip).

Clip ids are ``f"{split}/{label}/{name}"`` (``name`` may hold "/", e.g. ``All/Happy/S005/001`` for CK+);
labels are canonical class names. A dataset with folds gives every clip the split ``All`` and its fold
membership in ``Clip.folds`` ({fold: "train" | "test"}), so one store serves every fold.
"""
from __future__ import annotations

import json
import os
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
KNOWN_SPLITS = {"train": "Train", "val": "Val", "valid": "Val", "validation": "Val", "test": "Test",
                "train_set": "Train", "val_set": "Val", "test_set": "Test",     # RAF-DB copies in code folders
                "train_afew": "Train", "val_afew": "Val"}    # Emotion-FAN's data/face/ (its readme.md)
IGNORED_NAMES = {".DS_Store", "Thumbs.db", "desktop.ini", CLASSES_FILE}


FOLD_SPLIT = "All"  # the split of every clip of a dataset with folds: fold membership is in Clip.folds


@dataclass(frozen=True)
class Clip:
    """One labelled clip: a video file, a folder of frame images, or one still image (a one-frame clip)."""
    clip_id: str   # "split/label/name", unique in a dataset whatever the fold
    path: Path
    label: str     # canonical class name
    split: str     # "Train", "Val", "Test", the folder's own name, or "All" for a dataset with folds
    kind: str      # "video" | "frames" | "image"
    folds: tuple = ()  # ((fold, "train" | "test"), ...) sorted by fold; () for a dataset without folds
    frames: int = -1   # images of a frame folder (1 for an image), counted once by the scan; -1: a video

    def folds_attr(self) -> Optional[str]:
        """The ``folds`` clip attribute of the stores: JSON {"1": "train", "2": "test", ...}, or None."""
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
    reason: str = ""  # a short, file-independent why ("broken link", ".txt is not a clip"), for summaries

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
    declared: dict = field(default_factory=dict)  # part -> where the dataset names it: {"split Val": "Val/",
                                                  # "fold 3 test": ".../set_3.csv"}; an empty one is an error
    notes: list = field(default_factory=list)     # what the layout chose and why (frame root, list files)
    dropped: list = field(default_factory=list)   # (clip, problem) of clips found, then left out (one file twice)

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
    """"video", "frames" (a folder holding images), "image" (a still: a one-frame clip) or None (not a clip)."""
    if path.is_file():
        suffix = path.suffix.lower()
        return "video" if suffix in VIDEO_EXTENSIONS else "image" if suffix in IMAGE_EXTENSIONS else None
    if path.is_dir():
        return "frames"
    return None


def label_for(name: str, names: tuple[str, ...]) -> Optional[str]:
    """The canonical class name matching ``name`` case-insensitively, or None."""
    lookup = {n.lower(): n for n in names}
    return lookup.get(str(name).strip().lower())


_label_for = label_for

CLIP_FORMS = (f"clips are videos ({', '.join(VIDEO_EXTENSIONS)}), frame folders or still images"
              f" ({', '.join(IMAGE_EXTENSIONS)})")


def not_a_clip(path: Path) -> Problem:
    """Why ``path`` is no clip: a broken link, or a file that is neither a video nor an image."""
    if path.is_symlink() and not path.exists():
        return Problem("error", str(path), f"broken link: it points to {os.readlink(path)}, which does not exist;"
                       " fix the link or remove it", reason="broken link (its target does not exist)")
    suffix = path.suffix.lower() or "a file without extension"
    return Problem("warning", str(path), f"stray file: {suffix} is not a video or an image ({CLIP_FORMS}); ignored",
                   reason=f"{suffix} is not a video or an image")


def add_clip(scan: DatasetScan, path: Path, label: str, split: str, name: Optional[str] = None,
             folds: tuple = ()) -> Optional[Clip]:
    """Add a clip (id ``split/label/name``; name defaults to the file name) or the problem that stops it."""
    kind = clip_kind(path)
    frames = -1
    if kind == "frames":
        frames = len(list_frame_images(path))
        if not frames:
            scan.problems.append(Problem("error", str(path), "folder holds no frame images"
                                         f" ({', '.join(IMAGE_EXTENSIONS)}); remove it or add its frames",
                                         reason="frame folder without images"))
            return None
    elif kind == "image":
        frames = 1
    elif kind is None:
        scan.problems.append(not_a_clip(path))
        return None
    clip = Clip(f"{split}/{label}/{name or path.name}", path, label, split, kind, tuple(sorted(folds)), frames)
    scan.clips.append(clip)
    return clip


_add_clip = add_clip


def declare(scan: DatasetScan, split: str, where, fold: Optional[int] = None) -> None:
    """Note that the dataset names this split (or this part of a fold) at ``where``: it must yield a clip."""
    scan.declared.setdefault(f"fold {fold} {split}" if fold is not None else f"split {split}", str(where))


def ignored_summary(problems: Sequence[Problem]) -> str:
    """"1,953 entries ignored: .txt is not a video or an image; 2 entries ignored: broken link ..." (by reason)."""
    counts = Counter(p.reason or p.message for p in problems if p.severity != "info")
    if not counts:
        return "nothing was ignored either"
    parts = [f"{n:,} ignored: {why}" for why, n in counts.most_common(4)]
    if len(counts) > 4:
        parts.append(f"{sum(n for _, n in counts.most_common()[4:]):,} more for {len(counts) - 4} other reason(s)")
    return "; ".join(parts)


def empty_parts(scan: DatasetScan) -> list[Problem]:
    """An error for the dataset, and for each split or fold part it names, that yields no clip."""
    if not scan.clips:
        return [Problem("error", str(scan.source), f"no clip found ({scan.layout} layout): "
                        f"{ignored_summary(scan.problems)}; {CLIP_FORMS}", reason="empty")]
    have = Counter(part for c in scan.clips for part in clip_parts(c))
    empty = []
    for part, where in sorted(scan.declared.items()):
        if have[part]:
            continue
        ignored = [p for p in scan.problems if _concerns(p, where)]
        ignored += [p for clip, p in scan.dropped if part in clip_parts(clip)]
        empty.append(Problem("error", where, f"{part} yields no clip ({scan.layout} layout):"
                             f" {ignored_summary(ignored)}", reason="empty"))
    return empty


def clip_parts(clip: Clip) -> list[str]:
    """The parts a clip belongs to, as DatasetScan.declared names them: "split Val" or "fold 3 test", ..."""
    return [f"fold {k} {part}" for k, part in clip.folds] if clip.folds else [f"split {clip.split}"]


def _concerns(problem: Problem, where: str) -> bool:
    """Whether a problem is about the file or folder ``where`` (or a line of it, or a file under it)."""
    return problem.path == where or problem.path.startswith(where.rstrip("/") + ":") \
        or problem.path.startswith(where.rstrip("/") + "/")
