"""Dataset layouts: one scan function and one registry entry each, detected or named with ``--layout``.

A layout's scan function fills a ``DatasetScan`` with clips and problems; it never decodes. Registering a
new layout is one function and one ``@register_layout`` line (see docs_datasets.md for the published
layouts these follow, and where they are uncertain).

>>> sorted(LAYOUTS)[:3]
['afew', 'annotation-list', 'ckplus']
"""
from __future__ import annotations

import csv
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Optional, Sequence, Union

from emotion_attention.cache.errors import ConfigError
from emotion_attention.pipeline.configs import AFEW_CLASSES
from emotion_attention.pipeline.data.clips import (
    CLASSES_FILE,
    FOLD_SPLIT,
    IGNORED_NAMES,
    Clip,
    DatasetError,
    DatasetScan,
    Problem,
    add_clip,
    canonical_split,
    label_for,
    resolve_class_names,
)
from emotion_attention.pipeline.data.decode import IMAGE_EXTENSIONS, VIDEO_EXTENSIONS

# Class orders as each dataset publishes its label codes (code k is the k-th name, from 1; CK+ from 0).
DFEW_CLASSES = ("Happy", "Sad", "Neutral", "Angry", "Surprise", "Disgust", "Fear")   # codes 1..7
FERV39K_CLASSES = DFEW_CLASSES                                                       # names in its lists
MAFW_CLASSES = ("Happiness", "Sadness", "Neutral", "Anger", "Surprise", "Disgust", "Fear", "Contempt",
                "Anxiety", "Helplessness", "Disappointment")  # 0..10 in the peers' annotation lists
CKPLUS_CLASSES = ("Neutral", "Anger", "Contempt", "Disgust", "Fear", "Happy", "Sadness", "Surprise")  # 0..7
CKPLUS_FOLDS = 10  # subject-independent folds, the usual CK+ protocol


@dataclass(frozen=True)
class Layout:
    """One dataset layout: how to recognise it and how to list its clips."""
    name: str
    scan: Callable[[Path, DatasetScan], None]   # fills scan.clips and scan.problems
    detect: Callable[[Path], bool]              # True when ``source`` has this layout
    classes: Union[None, tuple, Callable[[Path], Optional[tuple]]] = None  # the dataset's own class order
    summary: str = ""                           # one line for --help and the docs
    accepts: Optional[Callable[[Path], bool]] = None  # named with --layout: what it can read (default: detect)

    def can_read(self, source: Path) -> bool:
        return (self.accepts or self.detect)(source)

    def default_classes(self, source: Path) -> Optional[tuple]:
        return self.classes(source) if callable(self.classes) else self.classes


LAYOUTS: dict[str, Layout] = {}  # detection order: specific layouts first, the generic folders last


def register_layout(name: str, detect: Callable[[Path], bool], classes=None, summary: str = "",
                    accepts: Optional[Callable[[Path], bool]] = None):
    """Decorator: add a scan function to the registry under ``name``."""
    def wrap(fn):
        LAYOUTS[name] = Layout(name, fn, detect, classes, summary, accepts)
        return fn
    return wrap


def get_layout(name: str, source: Optional[Path] = None) -> Layout:
    """The layout named ``name``; with ``source``, a DatasetError when the source is not laid out that way."""
    if name not in LAYOUTS:
        raise ConfigError(f"--layout {name!r}: unknown; use one of {', '.join(LAYOUTS)}")
    layout = LAYOUTS[name]
    if source is not None and not layout.can_read(Path(source)):
        raise DatasetError(f"{source}: does not have the {name} layout ({layout.summary}); check the path, or"
                           " leave --layout out to detect the layout")
    return layout


def detect_layout(source: Path) -> Layout:
    """The first registered layout whose detect function accepts ``source``."""
    source = Path(source)
    if source.is_file() and source.suffix.lower() in VIDEO_EXTENSIONS + IMAGE_EXTENSIONS:
        raise DatasetError(f"{source}: is a single video or image, not a dataset; give the dataset folder (or its"
                           " CSV / list file), or use `emo-predict` for single files")
    for layout in LAYOUTS.values():
        if layout.detect(source):
            return layout
    raise DatasetError(f"{source}: not a dataset this toolkit knows; give a folder laid out as"
                       " <split>/<label>/<clip>, a path,label,split CSV, or name the layout with --layout"
                       f" ({', '.join(LAYOUTS)})")


# -- shared helpers --------------------------------------------------------------------------------
def find_under(root: Path, candidates: Iterable[str]) -> Optional[Path]:
    """The first ``candidate`` (a relative path) that exists in ``root`` or in one of its sub-folders."""
    candidates = list(candidates)
    bases = [root] + sorted(p for p in root.iterdir() if p.is_dir()) if root.is_dir() else []
    for base in bases:
        for rel in candidates:
            if (base / rel).exists():
                return base / rel
    return None


def read_header_csv(path: Path, required: Sequence[str], delimiter: str = ",") -> list[tuple[int, dict]]:
    """Rows of a CSV with a header, as (line number, {lower-case column: value}).

    Headers are matched case-insensitively, a UTF-8 byte-order mark is ignored; a missing column or an
    empty file is a DatasetError naming the file.
    """
    with open(path, newline="", encoding="utf-8-sig") as fh:
        reader = csv.reader(fh, delimiter=delimiter)
        header = next(reader, None)
        if not header or not any(h.strip() for h in header):
            raise DatasetError(f"{path}: empty; it needs a header line with {','.join(required)}")
        keys = [h.strip().lower() for h in header]
        missing = [k for k in required if k not in keys]
        if missing:
            raise DatasetError(f"{path}: the header {','.join(h.strip() for h in header)!r} lacks"
                               f" {', '.join(missing)}; the first line must name the columns"
                               f" {','.join(required)}")
        return [(n, dict(zip(keys, (v.strip() for v in row)))) for n, row in enumerate(reader, start=2)
                if any(v.strip() for v in row)]


def resolve_listed_path(text: str, bases: Sequence[Path]) -> Optional[Path]:
    """A path from a list file: as given (absolute, or relative to a base), else its trailing components
    under a base, so lists written on another machine (``/data/.../DFEW/00025``) still resolve."""
    path = Path(text)
    if path.is_absolute() and path.exists():
        return path
    parts = path.parts[1:] if path.is_absolute() else path.parts
    for tail in range(len(parts), 0, -1):
        for base in bases:
            candidate = base.joinpath(*parts[-tail:])
            if candidate.exists():
                return candidate
    return None


def fold_part(name: str) -> tuple[Optional[int], Optional[str]]:
    """(fold number, "train" | "test" | "val") read from a list file's name, either may be None.

    >>> fold_part("DFEW_set_3_train.txt"), fold_part("test_All.csv")
    ((3, 'train'), (None, 'test'))
    """
    lower = name.lower()
    match = re.search(r"(?:set|fold|split)[_-]?(\d+)", lower)
    part = next((p for p in ("train", "test", "val") if p in lower), None)
    return (int(match.group(1)) if match else None), part


def add_fold_clips(scan: DatasetScan, members: dict, labels: dict, paths: dict) -> None:
    """Clips of a dataset with folds: ``members`` clip name -> {fold: part}; one clip each, split "All"."""
    for name in sorted(members):
        add_clip(scan, paths[name], labels[name], FOLD_SPLIT, name=name, folds=tuple(members[name].items()))


def note_membership(scan: DatasetScan, where: str, members: dict, labels: dict, paths: dict, name: str,
                    label: str, path: Path, fold: int, part: str) -> None:
    """Record that clip ``name`` is in ``part`` of ``fold``; a clip with two labels is an error."""
    if name in labels and labels[name] != label:
        scan.problems.append(Problem("error", where, f"clip {name!r} is labelled {label} here but {labels[name]}"
                                     " in another list; fix one of the lists"))
        return
    labels[name], paths[name] = label, path
    members.setdefault(name, {})[fold] = part


# -- AFEW and the generic <split>/<label>/<clip> -----------------------------------------------------
def _is_afew(source: Path) -> bool:
    if not source.is_dir():
        return False
    splits = [p for p in source.iterdir() if p.is_dir()]
    if not splits or any(p.name.lower() not in ("train", "val") for p in splits):
        return False
    known = {c.lower() for c in AFEW_CLASSES}
    return all(label.name.lower() in known for split in splits for label in split.iterdir() if label.is_dir())


@register_layout("afew", _is_afew, AFEW_CLASSES, "Train|Val/<Emotion>/*.avi, AFEW's 7 classes")
def scan_afew(root: Path, scan: DatasetScan) -> None:
    scan_folders(root, scan)


@register_layout("dfew", lambda s: s.is_dir() and _dfew_labels(s, 1, "train") is not None, DFEW_CLASSES,
                 "data_affine/single_label/data/<id>/ + label/single_{train,test}set_{1..5}.csv (5 folds)")
def scan_dfew(root: Path, scan: DatasetScan) -> None:
    """DFEW: aligned-face frame folders per clip id, and per fold a train and a test CSV of ``video_name,label``
    with codes 1 Happy, 2 Sad, 3 Neutral, 4 Angry, 5 Surprise, 6 Disgust, 7 Fear."""
    frames_root = find_under(root, ("data_affine/single_label/data", "Clip/clip_224x224", "Clip/clip_224x16f"))
    if frames_root is None:
        raise DatasetError(f"{root}: DFEW labels found, but no frame folder tree"
                           " (data_affine/single_label/data/ or Clip/clip_224x224/)")
    members, labels, paths = {}, {}, {}
    fold = 1
    while (train := _dfew_labels(root, fold, "train")) is not None:
        for part, table in (("train", train), ("test", _dfew_labels(root, fold, "test"))):
            if table is None:
                scan.problems.append(Problem("error", str(train), f"fold {fold} has a train list but no test list"))
                continue
            for line, row in read_header_csv(table, ("video_name", "label")):
                where = f"{table}:{line}"
                code, name = row["label"], row["video_name"]
                if not code.isdigit() or not 1 <= int(code) <= len(DFEW_CLASSES):
                    scan.problems.append(Problem("error", where, f"label code {code!r} is not one of DFEW's 1..7"))
                    continue
                label = label_for(DFEW_CLASSES[int(code) - 1], scan.class_names)
                clip_dir = _dfew_clip_dir(frames_root, name)
                if label is None or clip_dir is None:
                    scan.problems.append(Problem("error", where, f"no frame folder for video {name!r} under"
                                                 f" {frames_root}" if clip_dir is None else
                                                 f"class {DFEW_CLASSES[int(code) - 1]} is not in the class list"))
                    continue
                note_membership(scan, where, members, labels, paths, clip_dir.name, label, clip_dir, fold, part)
        fold += 1
    add_fold_clips(scan, members, labels, paths)


def _dfew_labels(root: Path, fold: int, part: str) -> Optional[Path]:
    return find_under(root, (f"label/single_{part}set_{fold}.csv",
                             f"EmoLabel_DataSplit/{part}(single-labeled)/set_{fold}.csv",
                             f"EmoLabel_DataSplit/{part}/set_{fold}.csv"))


def _dfew_clip_dir(frames_root: Path, name: str) -> Optional[Path]:
    for candidate in (name, name.zfill(5), name.lstrip("0") or "0"):
        if (frames_root / candidate).is_dir():
            return frames_root / candidate
    return None


# -- FERV39k ---------------------------------------------------------------------------------------
def _ferv39k_lists(root: Path) -> Optional[Path]:
    found = find_under(root, ("4_setups/All_scenes/train_All.csv", "FERV39k/4_setups/All_scenes/train_All.csv"))
    return found.parent if found else None


@register_layout("ferv39k", lambda s: s.is_dir() and _ferv39k_lists(s) is not None, FERV39K_CLASSES,
                 "2_ClipsforFaceCrop/<Scene>/<Emotion>/<clip>/ + 4_setups/All_scenes/{train,test}_All.csv")
def scan_ferv39k(root: Path, scan: DatasetScan) -> None:
    """FERV39k: face-crop frame folders ``<Scene>/<Emotion>/<nnnn>`` and two lists of ``<Scene>/<Emotion>/<nnnn>
    <Emotion>`` lines (space-separated, no header), train_All.csv and test_All.csv."""
    lists = _ferv39k_lists(root)
    frames_root = find_under(root, ("2_ClipsforFaceCrop", "2_ClipsforFaceCrop-002/2_ClipsforFaceCrop",
                                    "FERV39k/2_ClipsforFaceCrop"))
    if frames_root is None:
        raise DatasetError(f"{root}: FERV39k lists found in {lists}, but no 2_ClipsforFaceCrop/ frame tree")
    for split, name in (("Train", "train_All.csv"), ("Test", "test_All.csv")):
        table = lists / name
        if not table.is_file():
            scan.problems.append(Problem("error", str(table), "missing: FERV39k ships train_All.csv and test_All.csv"))
            continue
        for line_no, line in enumerate(table.read_text(encoding="utf-8-sig").splitlines(), start=1):
            fields = line.replace(",", " ").split()
            if not fields:
                continue
            where = f"{table}:{line_no}"
            rel = fields[0]
            label = label_for(fields[1] if len(fields) > 1 else Path(rel).parent.name, scan.class_names)
            if label is None:
                scan.problems.append(Problem("error", where, f"unknown label in {line.strip()!r}; known classes"
                                             f" are {', '.join(scan.class_names)}"))
            elif not (frames_root / rel).is_dir():
                scan.problems.append(Problem("error", where, f"{frames_root / rel} does not exist"))
            else:
                add_clip(scan, frames_root / rel, label, split, name=rel)


# -- peers' annotation lists (DFER-CLIP, MAE-DFER, ...): frames_dir num_frames label ------------------
KNOWN_LIST_CLASSES = {"dfew": DFEW_CLASSES, "ferv39k": FERV39K_CLASSES, "mafw": MAFW_CLASSES}


def _list_files(source: Path) -> list[Path]:
    if source.is_file():
        return [source]
    return sorted(p for p in source.glob("*.txt") if fold_part(p.name)[1] is not None)


def _list_classes(source: Path) -> Optional[tuple]:
    """A known dataset's order when the lists are named after it (DFER-CLIP's DFEW_/FERV39K_/MAFW_ lists)."""
    names = [p.name.lower() for p in _list_files(source)] if source.exists() else []
    for prefix, classes in KNOWN_LIST_CLASSES.items():
        if names and all(n.startswith(prefix) for n in names):
            return classes
    return None


@register_layout("annotation-list",
                 lambda s: s.is_file() and s.suffix.lower() == ".txt" and fold_part(s.name)[1] is not None,
                 _list_classes, "frames_dir num_frames label lines; set_K/train|test in the file names give folds",
                 accepts=lambda s: bool(s.exists() and _list_files(s)))
def scan_annotation_lists(source: Path, scan: DatasetScan) -> None:
    """One clip per line, ``frames_dir num_frames label`` (label: a 0-based index into the class order, or a
    name). A list named ``*set_K*train*`` / ``*set_K*test*`` gives fold K; without a fold number the name's
    train/test/val is the split."""
    files = _list_files(source)
    if not files:
        raise DatasetError(f"{source}: no annotation list (*train*.txt / *test*.txt) found")
    members, labels, paths = {}, {}, {}
    for table in files:
        fold, part = fold_part(table.name)
        bases = [table.parent, table.parent.parent, table.parent.parent.parent]
        for line_no, line in enumerate(table.read_text(encoding="utf-8-sig").splitlines(), start=1):
            fields = line.split()
            if not fields:
                continue
            where = f"{table}:{line_no}"
            if len(fields) < 3:
                scan.problems.append(Problem("error", where, f"expected 'frames_dir num_frames label', got {line!r}"))
                continue
            label = _list_label(fields[-1], scan, table)
            path = resolve_listed_path(" ".join(fields[:-2]), bases)
            if label is None:
                scan.problems.append(Problem("error", where, f"label {fields[-1]!r} is not a class of"
                                             f" {', '.join(scan.class_names)}"))
            elif path is None:
                scan.problems.append(Problem("error", where, f"frame folder {fields[0]} not found (also looked"
                                             f" for its trailing folders under {table.parent})"))
            elif fold is None:
                add_clip(scan, path, label, canonical_split(part), name=_list_name(path, bases))
            else:
                note_membership(scan, where, members, labels, paths, _list_name(path, bases), label, path,
                                fold, "test" if part == "test" else "train")
    add_fold_clips(scan, members, labels, paths)


def _list_label(text: str, scan: DatasetScan, table: Path) -> Optional[str]:
    if not text.isdigit():
        return label_for(text, scan.class_names)
    if scan.options.get("class_source") == "afew default":
        raise DatasetError(f"{table}: labels are numbers, so the class order must be named: --classes A,B,..."
                           f" or a {CLASSES_FILE} beside the list (one class per line, code 0 first)")
    return scan.class_names[int(text)] if int(text) < len(scan.class_names) else None


def _list_name(path: Path, bases: Sequence[Path]) -> str:
    """A clip's name in its id: its path relative to the list's folder tree (unique), else the full path."""
    for base in bases:
        try:
            return path.resolve().relative_to(base.resolve()).as_posix()
        except ValueError:
            continue
    return path.as_posix().lstrip("/")


# -- MAFW ------------------------------------------------------------------------------------------
def _mafw_fold_lists(root: Path) -> list[Path]:
    """Fold lists of MAFW: DFER-CLIP's ``MAFW_set_K_{train,test}.txt``, or any ``set_K/{train,test}.txt``."""
    if not root.is_dir():
        return []
    peers = find_under(root, ("MAFW_set_1_train.txt", "annotation/MAFW_set_1_train.txt"))
    if peers is not None:
        return sorted(peers.parent.glob("MAFW_set_*_*.txt"))
    if _mafw_single_labels(root) is None:  # the release's label file first: no deep walk of other datasets
        return []
    found = []
    for depth in ("set_*/*.txt", "*/set_*/*.txt", "*/*/set_*/*.txt", "*/*/*/set_*/*.txt"):
        found += [p for p in root.glob(depth) if fold_part(p.parent.name)[0] is not None and fold_part(p.name)[1]]
    return sorted(found)


def _mafw_single_labels(root: Path) -> Optional[Path]:
    return find_under(root, ("single_label.txt", "caption-label/single_label.txt", "labels/single_label.txt",
                             "Labels/single_label.txt")) if root.is_dir() else None


def _is_mafw(source: Path) -> bool:
    return source.is_dir() and bool(_mafw_fold_lists(source))


@register_layout("mafw", _is_mafw, MAFW_CLASSES,
                 "clips/<id>.mp4 (or face-frame folders) + single_label.txt + 5 fold lists set_K train/test")
def scan_mafw(root: Path, scan: DatasetScan) -> None:
    """MAFW: 11 single-label classes, 5 folds. A clip's label comes from the release's ``single_label.txt``
    (``03747.mp4  anger  <br>caption``) when present, else from the fold list (DFER-CLIP's lists:
    ``frames_dir num_frames code``, codes 0..10 in MAFW_CLASSES order). A clip is the frame folder a list
    names when it exists (peers' face crops), else ``clips/<id>.mp4``."""
    lists = _mafw_fold_lists(root)
    names = _mafw_names(_mafw_single_labels(root), scan)
    clips_dir = find_under(root, ("clips", "data/clips"))
    members, labels, paths = {}, {}, {}
    bases = [root] + sorted({p.parent for p in lists})
    for table in lists:
        fold = fold_part(table.name)[0] or fold_part(table.parent.name)[0]
        part = fold_part(table.name)[1]
        for line_no, line in enumerate(table.read_text(encoding="utf-8-sig").splitlines(), start=1):
            fields = line.split()
            if not fields:
                continue
            where = f"{table}:{line_no}"
            clip_id = Path(fields[0]).stem
            label = names.get(clip_id) if names else (_list_label(fields[-1], scan, table) if len(fields) >= 3 else None)
            path = resolve_listed_path(fields[0], bases)
            if path is None and clips_dir is not None and (clips_dir / f"{clip_id}.mp4").exists():
                path = clips_dir / f"{clip_id}.mp4"
            if label is None or path is None:
                reason = (f"clip {clip_id} not found under {root}" if label is not None else
                          f"no label for clip {clip_id}" if names else f"label {fields[-1]} is not a class")
                scan.problems.append(Problem("error", where, f"cannot use {line.strip()!r}: {reason}"))
                continue
            note_membership(scan, where, members, labels, paths, clip_id, label, path, fold,
                            "test" if part == "test" else "train")
    add_fold_clips(scan, members, labels, paths)


def _mafw_names(table: Optional[Path], scan: DatasetScan) -> dict:
    """clip id -> class from MAFW's single_label.txt (``<id>.mp4  <label>  <br>...``)."""
    if table is None:
        return {}
    names = {}
    for line_no, line in enumerate(table.read_text(encoding="utf-8-sig").splitlines(), start=1):
        fields = line.split()
        if len(fields) < 2:
            continue
        label = label_for(_MAFW_SYNONYMS.get(fields[1].lower(), fields[1]), scan.class_names)
        if label is None:
            scan.problems.append(Problem("error", f"{table}:{line_no}", f"unknown label {fields[1]!r}; known classes"
                                         f" are {', '.join(scan.class_names)}"))
            continue
        names[Path(fields[0]).stem] = label
    return names


_MAFW_SYNONYMS = {"happy": "happiness", "sad": "sadness", "angry": "anger"}


# -- CK+ -------------------------------------------------------------------------------------------
def _ckplus_root(source: Path) -> Optional[Path]:
    found = find_under(source, ("cohn-kanade-images",)) if source.is_dir() else None
    return found.parent if found and (found.parent / "Emotion").is_dir() else None


@register_layout("ckplus", lambda s: _ckplus_root(s) is not None, CKPLUS_CLASSES,
                 "cohn-kanade-images/Sxxx/nnn/*.png + Emotion/Sxxx/nnn/*_emotion.txt, 10 subject folds")
def scan_ckplus(source: Path, scan: DatasetScan) -> None:
    """CK+: one frame folder per posed sequence; its label is the code (0-7) in the sequence's
    ``*_emotion.txt``. Sequences without one are skipped and counted. Folds keep subjects apart: subjects
    sorted by name, subject i goes to the test part of fold ``i % fold_count + 1``."""
    root = _ckplus_root(source)
    images, emotion = root / "cohn-kanade-images", root / "Emotion"
    fold_count = int(scan.options.get("fold_count", CKPLUS_FOLDS))
    subjects = sorted(p for p in images.iterdir() if p.is_dir())
    unlabelled = 0
    for i, subject in enumerate(subjects):
        test_fold = i % fold_count + 1
        folds = tuple((k, "test" if k == test_fold else "train") for k in range(1, fold_count + 1))
        for sequence in sorted(p for p in subject.iterdir() if p.is_dir()):
            label_files = sorted((emotion / subject.name / sequence.name).glob("*_emotion.txt"))
            if not label_files:
                unlabelled += 1
                continue
            label = _ckplus_label(label_files[0], scan)
            if label is not None:
                add_clip(scan, sequence, label, FOLD_SPLIT, name=f"{subject.name}/{sequence.name}", folds=folds)
    if unlabelled:
        scan.problems.append(Problem("info", str(emotion), f"{unlabelled} sequence(s) have no *_emotion.txt"
                                     " (CK+ labels only some); skipped"))


def _ckplus_label(path: Path, scan: DatasetScan) -> Optional[str]:
    text = path.read_text().strip()
    try:
        code = int(float(text))
    except ValueError:
        code = -1
    if not 0 <= code < len(CKPLUS_CLASSES) or float(text) != code:
        scan.problems.append(Problem("error", str(path), f"emotion code {text!r} is not one of CK+'s 0..7"))
        return None
    label = label_for(CKPLUS_CLASSES[code], scan.class_names)
    if label is None:
        scan.problems.append(Problem("error", str(path), f"class {CKPLUS_CLASSES[code]} is not in the class list"))
    return label


# -- a path,label,split CSV ------------------------------------------------------------------------
@register_layout("csv", lambda s: s.is_file() and s.suffix.lower() == ".csv", None,
                 "a CSV with a path,label,split header, paths relative to it")
def scan_csv(csv_path: Path, scan: DatasetScan) -> None:
    for line_no, row in read_header_csv(csv_path, ("path", "label", "split")):
        where = f"{csv_path}:{line_no}"
        if not row.get("path"):
            scan.problems.append(Problem("error", where, "row has no path"))
            continue
        path = Path(row["path"])
        path = path if path.is_absolute() else csv_path.parent / path
        label = label_for(row.get("label") or "", scan.class_names)
        if label is None:
            scan.problems.append(Problem("error", where, f"unknown label {row.get('label')!r}; known classes"
                                         f" are {', '.join(scan.class_names)}"))
        elif not path.exists():
            scan.problems.append(Problem("error", where, f"{path} does not exist"))
        else:
            add_clip(scan, path, label, canonical_split((row.get("split") or "").strip() or "Train"))


# -- the generic <split>/<label>/<clip>: last, it accepts any folder ----------------------------------
@register_layout("folders", lambda s: s.is_dir(), None, "<split>/<label>/<clip>, clip = video or frame folder")
def scan_folders(root: Path, scan: DatasetScan) -> None:
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
            label = label_for(label_dir.name, scan.class_names)
            if label is None:
                scan.problems.append(Problem("error", str(label_dir), f"unknown label folder; known classes"
                                             f" are {', '.join(scan.class_names)} (rename it, or list"
                                             f" the classes in {CLASSES_FILE} or with --classes)"))
                continue
            for clip_path in sorted(label_dir.iterdir()):
                if clip_path.name in IGNORED_NAMES:
                    continue
                add_clip(scan, clip_path, label, split)


# detection order: the registry's insertion order, with the catch-all folders layout last
LAYOUTS = {name: LAYOUTS[name] for name in ("dfew", "ferv39k", "mafw", "ckplus", "annotation-list", "csv",
                                            "afew", "folders")}


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
    from emotion_attention.pipeline.data.layouts import detect_layout, get_layout  # the registry imports this module

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
