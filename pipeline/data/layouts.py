"""Dataset layouts: one scan function and one registry entry each, detected or named with ``--layout``.

A layout's scan function fills a ``DatasetScan`` with clips and problems; it never decodes. Registering a
new layout is one function and one ``@register_layout`` line (see docs/datasets.md for the published
layouts these follow, the public loaders they were read from, and where they are uncertain).

The releases (DFEW, FERV39k, MAFW, RAF-DB) are found by content: their label lists by name pattern, to a bounded
depth below the folder the user names, and their frame root as the folder whose entries are the clips those
lists name (``pipeline.data.discover``), because releases and loaders name folders differently.

>>> sorted(LAYOUTS)[:3]
['afew', 'annotation-list', 'ckplus']
"""
from __future__ import annotations

import csv
import os
import re
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Optional, Sequence, Union

from emotion_attention.cache.errors import ConfigError
from emotion_attention.pipeline.configs import AFEW_CLASSES
from emotion_attention.pipeline.data.clips import (
    CLASSES_FILE,
    FOLD_SPLIT,
    IGNORED_NAMES,
    KNOWN_SPLITS,
    Clip,
    DatasetError,
    DatasetScan,
    Problem,
    add_clip,
    canonical_split,
    declare,
    empty_parts,
    label_for,
    resolve_class_names,
)
from emotion_attention.pipeline.data.decode import IMAGE_EXTENSIONS, VIDEO_EXTENSIONS
from emotion_attention.pipeline.data.discover import (
    MAX_DEPTH,
    RootChoice,
    TreeIndex,
    cached_walks,
    clip_entry,
    describe_index,
    find_clip_root,
    spread,
    tree_index,
)

# Class orders as each dataset publishes its label codes (code k is the k-th name, from 1; CK+ from 0).
DFEW_CLASSES = ("Happy", "Sad", "Neutral", "Angry", "Surprise", "Disgust", "Fear")   # codes 1..7
FERV39K_CLASSES = DFEW_CLASSES                                                       # names in its lists
MAFW_CLASSES = ("Happiness", "Sadness", "Neutral", "Anger", "Surprise", "Disgust", "Fear", "Contempt",
                "Anxiety", "Helplessness", "Disappointment")  # 0..10 in the peers' annotation lists
RAFDB_CLASSES = ("Surprise", "Fear", "Disgust", "Happiness", "Sadness", "Anger", "Neutral")  # codes 1..7 (SCN, DAN)
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


def read_header_csv(path: Path, required: Sequence[str], delimiter: str = ",",
                    headerless: bool = False) -> list[tuple[int, dict]]:
    """Rows of a CSV with a header, as (line number, {lower-case column: value}).

    Headers are matched case-insensitively, a UTF-8 byte-order mark is ignored; a missing column or an
    empty file is a DatasetError naming the file. With ``headerless``, a file whose first line is a row of
    ``required`` values (as many fields, the last a number, e.g. ``00001,1``) is read as those columns.
    """
    with open(path, newline="", encoding="utf-8-sig") as fh:
        reader = csv.reader(fh, delimiter=delimiter)
        header = next(reader, None)
        if not header or not any(h.strip() for h in header):
            raise DatasetError(f"{path}: empty; it needs a header line with {','.join(required)}")
        keys = [h.strip().lower() for h in header]
        missing = [k for k in required if k not in keys]
        first: list = []
        if missing and headerless and len(keys) == len(required) and keys[-1].lstrip("-").isdigit():
            keys, missing, first = list(required), [], [(1, header)]
        if missing:
            raise DatasetError(f"{path}: the header {','.join(h.strip() for h in header)!r} lacks"
                               f" {', '.join(missing)}; the first line must name the columns"
                               f" {','.join(required)}")
        rows = first + list(enumerate(reader, start=2))
        return [(n, dict(zip(keys, (v.strip() for v in row)))) for n, row in rows if any(v.strip() for v in row)]


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


# -- the releases: label lists and a frame root found by content -----------------------------------------
@dataclass(frozen=True)
class ListFamily:
    """One way a dataset's label lists are named, as a release or a public loader lays them out."""
    name: str            # as the docs call it, for notes and errors
    pattern: str         # regex on the lower-case path relative to the dataset folder; named groups part and fold
    base: int = 1        # the code of the first class, when labels are numbers (S2D's copies count from 0)
    within: str = ""     # a regex the whole relative path must also match (e.g. MAFW's single/ lists)
    skip: str = ""       # a regex of relative paths to leave out (e.g. MAFW's compound, multi-label lists)


def find_lists(index: TreeIndex, families: Sequence[ListFamily]) -> tuple[Optional[ListFamily], list, list]:
    """(family, [(path, match)], notes): the lists of the first family found. Lists of one family under several
    folders (two copies, or MAFW's no_caption and with_caption) are told apart by the folder above the match;
    the shallowest (then the first by name) is taken and the others are named in the notes."""
    for family in families:
        groups: dict[str, list] = defaultdict(list)
        for path, m in index.match(family.pattern):
            rel = m.string
            if (family.within and not re.search(family.within, rel)) or (family.skip and re.search(family.skip, rel)):
                continue
            groups[path.relative_to(index.root).as_posix()[:m.start()]].append((path, m))  # as the disk spells it
        if not groups:
            continue
        chosen = min(groups, key=lambda k: (k.count("/"), k))
        notes = [f"also found {len(groups[k])} list(s) in {index.root / k}; not read" for k in sorted(groups)
                 if k != chosen]
        return family, groups[chosen], notes
    return None, [], []


def lists_of(index: TreeIndex, families: Sequence[ListFamily]) -> bool:
    return find_lists(index, families)[0] is not None


def has_lists(source: Path, families: Sequence[ListFamily]) -> bool:
    """Detection: ``source`` is a folder holding, to a bounded depth, lists of one of ``families``."""
    return source.is_dir() and lists_of(tree_index(source), families)


def fold_tables(scan: DatasetScan, tables: list) -> dict[int, dict[str, Path]]:
    """{fold: {"train": path, "test": path}} from (path, match) pairs with part and fold groups; a fold that
    lacks one of its two lists is an error (and is left out)."""
    folds: dict[int, dict[str, Path]] = defaultdict(dict)
    for path, m in tables:
        folds[int(m.group("fold"))][m.group("part")] = path
    for fold, parts in sorted(folds.items()):
        for part in ("train", "test"):
            if part not in parts:
                other = next(iter(parts.values()))
                scan.problems.append(Problem("error", str(other), f"fold {fold} has a {next(iter(parts))} list but"
                                             f" no {part} list beside it; add it, or remove fold {fold}'s list",
                                             reason=f"a fold without its {part} list"))
    return {k: v for k, v in sorted(folds.items()) if len(v) == 2}


def frames_option(scan: DatasetScan) -> Optional[Path]:
    """``--frame-root DIR`` (a layout option): the folder to read the clips from, when several hold them."""
    given = scan.options.get("frame_root")
    return Path(given) if given else None


def choose_clip_root(scan: DatasetScan, index: TreeIndex, names: Sequence[str], prefer: Sequence[str],
                     what: str, family: ListFamily, lists: Sequence[Path], video_ok: bool = True) -> RootChoice:
    """The folder of the clips the lists name (see discover.find_clip_root); a DatasetError naming what was
    found and what was looked for when there is none. The choice is noted in the report."""
    given = frames_option(scan)
    choice = find_clip_root(index, names, prefer, given, video_ok)
    sample = ", ".join(spread(sorted(set(names)), 3))
    if choice.root is None:
        where = (f"--frame-root {given} holds none of them" if given is not None else
                 f"no folder within {MAX_DEPTH} levels of {index.root} holds them ({describe_index(index)})")
        raise DatasetError(f"{index.root}: {what} lists found ({family.name}: {_list_names(lists)}), but not the"
                           f" clips they name (e.g. {sample}): looked for a folder whose sub-folders (or videos)"
                           f" are those names; {where}. Give the folder with --frame-root DIR")
    others = [f"{f} ({h}/{choice.sample})" for f, h in choice.others[:4]]
    scan.notes.append(f"labels: {family.name}, {_list_names(lists)}; clips: {choice.root}"
                      f" ({choice.kind}, {choice.hits} of {choice.sample} sampled names found)"
                      + (f"; also holding clips: {', '.join(others)} (choose with --frame-root DIR)" if others else ""))
    if choice.hits < choice.sample:
        scan.notes.append(f"{choice.sample - choice.hits} of {choice.sample} sampled clip names are not in"
                          f" {choice.root}: their rows are reported below")
    return choice


def _list_names(paths: Sequence[Path]) -> str:
    """"10 lists in /data/DFEW/EmoLabel_DataSplit" (or the one list's path)."""
    paths = sorted(str(p) for p in paths)
    if len(paths) == 1:
        return paths[0]
    return f"{len(paths)} lists in {os.path.commonpath(paths)}"


def no_lists_error(root: Path, what: str, families: Sequence[ListFamily]) -> DatasetError:
    index = tree_index(root)
    looked = "; ".join(f.name for f in families)
    return DatasetError(f"{root}: no {what} label lists found within {MAX_DEPTH} folder levels (looked for {looked});"
                        f" {describe_index(index)}")


def read_code(text: str, classes: Sequence[str], base: int) -> Optional[str]:
    """The class of a numeric code counted from ``base``, or None when it is out of range."""
    text = text.strip()
    if not text.lstrip("-").isdigit() or not 0 <= int(text) - base < len(classes):
        return None
    return classes[int(text) - base]


def fold_clip(scan: DatasetScan, where: str, acc: dict, name: str, label: str, path: Path, fold: int,
              part: str) -> None:
    """note_membership on the accumulator ``acc`` of a dataset with folds (members, labels, paths)."""
    note_membership(scan, where, acc["members"], acc["labels"], acc["paths"], name, label, path, fold, part)


def new_folds() -> dict:
    return {"members": {}, "labels": {}, "paths": {}}


# -- DFEW ------------------------------------------------------------------------------------------
_SINGLE = r"\(single[-_ ]labell?ed\)"   # MAE-DFER's "(single-labeled)"; the release README's "(single_labeled)"
DFEW_LISTS = (
    ListFamily("EmoLabel_DataSplit/{train,test}(single-labeled)/set_K.csv (the release; MAE-DFER, DFER-CLIP)",
               rf"(?:^|/)emolabel_datasplit/(?P<part>train|test){_SINGLE}/set_(?P<fold>\d+)\.csv$"),
    ListFamily("EmoLabel_DataSplit/{train,test}/set_K.csv",
               r"(?:^|/)emolabel_datasplit/(?P<part>train|test)/set_(?P<fold>\d+)\.csv$"),
    ListFamily("label/single_{train,test}set_K.csv (the authors' data_affine baseline)",
               r"(?:^|/)single_(?P<part>train|test)set_(?P<fold>\d+)\.csv$"),
    ListFamily("{train,test}(single-labeled)/{train,test}_set_K.csv (S2D's copies, codes 0..6)",
               rf"(?:^|/)(?P<part>train|test){_SINGLE}/(?P=part)_set_(?P<fold>\d+)\.csv$", base=0),
    ListFamily("DFEW_set_K_{train,test}.txt (DFER-CLIP's and Former-DFER's annotation/: path num_frames code,"
               " codes 0..6)",
               r"(?:^|/)dfew_set_(?P<fold>\d+)_(?P<part>train|test)\.txt$", base=0),
)
DFEW_FRAMES = ("clip_224x224", "jpg_256", "clip_224x224_16f", "dfew_frame_face", "dfew_face", "data")  # among
#   folders holding every clip, in order (DFEW_Frame_Face/: DFER-CLIP's face frames; DFEW_Face/: Former-DFER's)


def _dfew_rows(table: Path) -> list[tuple[int, str, str]]:
    """(line, video name, code) of a DFEW list: a ``video_name,label`` CSV, or DFER-CLIP's ``path num_frames code``
    lines (the name is the path's last folder)."""
    if table.suffix.lower() == ".csv":
        return [(line, row["video_name"], row["label"])
                for line, row in read_header_csv(table, ("video_name", "label"), headerless=True)]
    rows = []
    for line_no, line in enumerate(table.read_text(encoding="utf-8-sig").splitlines(), start=1):
        parsed = split_list_line(line)
        if parsed is not None:
            rows.append((line_no, Path(parsed[0]).name, parsed[1]))
    return rows


@register_layout("dfew", lambda s: has_lists(s, DFEW_LISTS), DFEW_CLASSES,
                 "frame folders per clip id (Clip/clip_224x224/, Clip/jpg_256/, data_affine/single_label/data/,"
                 " ...) + EmoLabel_DataSplit/{train,test}(single-labeled)/set_K.csv or"
                 " label/single_{train,test}set_K.csv (5 folds)")
def scan_dfew(root: Path, scan: DatasetScan) -> None:
    """DFEW: frame folders per clip id (``00001``), and per fold a train and a test CSV of ``video_name,label``
    with codes 1 Happy, 2 Sad, 3 Neutral, 4 Angry, 5 Surprise, 6 Disgust, 7 Fear (S2D's copies: 0..6). The
    lists are found by name and the frame root by content (a folder whose sub-folders are the listed ids)."""
    index = tree_index(root)
    family, tables, notes = find_lists(index, DFEW_LISTS)
    if family is None:
        raise no_lists_error(root, "DFEW", DFEW_LISTS)
    rows = []
    for fold, parts in fold_tables(scan, tables).items():
        for part, table in sorted(parts.items(), reverse=True):   # train, then test
            declare(scan, part, table, fold)
            rows += [(fold, part, f"{table}:{line}", name, code) for line, name, code in _dfew_rows(table)]
    choice = choose_clip_root(scan, index, [r[3] for r in rows], DFEW_FRAMES, "DFEW", family,
                              [p for p, _ in tables])
    scan.notes += notes
    acc, top = new_folds(), family.base + len(DFEW_CLASSES) - 1
    for fold, part, where, name, code in rows:
        cls = read_code(code, DFEW_CLASSES, family.base)
        if cls is None:
            scan.problems.append(Problem("error", where, f"label code {code!r} is not one of DFEW's"
                                         f" {family.base}..{top}", reason=f"a label code outside {family.base}..{top}"))
            continue
        label = label_for(cls, scan.class_names)
        path = clip_entry(choice.root, name, video_ok=choice.kind == "video")
        if label is None or path is None:
            scan.problems.append(Problem("error", where, f"no frame folder for video {name!r} under {choice.root}"
                                         if path is None else f"class {cls} is not in the class list",
                                         reason="a listed clip that is not there" if path is None else
                                         "a class not in the class list"))
            continue
        fold_clip(scan, where, acc, path.stem if choice.kind == "video" else path.name, label, path, fold, part)
    add_fold_clips(scan, acc["members"], acc["labels"], acc["paths"])


# -- FERV39k ---------------------------------------------------------------------------------------
FERV39K_LISTS = (ListFamily("4_setups/All_scenes/{train,test}_All.csv (the release; MAE-DFER)",
                            r"(?:^|/)(?P<part>train|test)_all\.csv$"),
                 ListFamily("FERV39K_{train,test}.txt (DFER-CLIP's annotation/: path num_frames code, codes 0..6)",
                            r"(?:^|/)ferv39k_(?P<part>train|test)\.txt$", base=0))
FERV39K_FRAMES = ("2_ClipsforFaceCrop",)   # the face crops, before the scene images (3_ClipsforScenImages)


@register_layout("ferv39k", lambda s: has_lists(s, FERV39K_LISTS), FERV39K_CLASSES,
                 "2_ClipsforFaceCrop/<Scene>/<Emotion>/<clip>/ + 4_setups/All_scenes/{train,test}_All.csv")
def scan_ferv39k(root: Path, scan: DatasetScan) -> None:
    """FERV39k: face-crop frame folders ``<Scene>/<Emotion>/<nnnn>`` and two lists of ``<Scene>/<Emotion>/<nnnn>
    <Emotion>`` lines (space-separated, no header), train_All.csv and test_All.csv."""
    index = tree_index(root)
    family, tables, notes = find_lists(index, FERV39K_LISTS)
    if family is None:
        raise no_lists_error(root, "FERV39k", FERV39K_LISTS)
    parts = {m.group("part"): path for path, m in tables}
    for part in ("train", "test"):
        if part not in parts:
            scan.problems.append(Problem("error", str(next(iter(parts.values())).parent),
                                         f"missing: the {part} list of {family.name}"))
    rows = []
    for part, table in sorted(parts.items(), reverse=True):
        split = canonical_split(part)
        declare(scan, split, table)
        for line_no, line in enumerate(table.read_text(encoding="utf-8-sig").splitlines(), start=1):
            fields = _ferv39k_fields(line.replace(",", " ").split(), family)
            if fields:
                rows.append((split, f"{table}:{line_no}", fields, line))
    choice = choose_clip_root(scan, index, [r[2][0] for r in rows], FERV39K_FRAMES, "FERV39k", family,
                              list(parts.values()), video_ok=False)
    scan.notes += notes
    for split, where, fields, line in rows:
        rel = fields[0]
        label = label_for(fields[1] if len(fields) > 1 else Path(rel).parent.name, scan.class_names)
        if label is None:
            scan.problems.append(Problem("error", where, f"unknown label in {line.strip()!r}; known classes"
                                         f" are {', '.join(scan.class_names)}", reason="an unknown label"))
        elif not (choice.root / rel).is_dir():
            scan.problems.append(Problem("error", where, f"{choice.root / rel} does not exist",
                                         reason="a listed clip that is not there"))
        else:
            add_clip(scan, choice.root / rel, label, split, name=rel)


def _ferv39k_fields(fields: list, family: ListFamily) -> list:
    """``[<Scene>/<Emotion>/<nnnn>, <Emotion>]`` of a list line: the release's as they are; DFER-CLIP's
    ``/.../2_ClipsforFaceCrop/<Scene>/<Emotion>/<nnnn> num_frames code`` re-rooted, its code named."""
    if family.base != 0 or len(fields) < 3:
        return fields
    return ["/".join(Path(fields[0]).parts[-3:]), read_code(fields[-1], FERV39K_CLASSES, 0) or fields[-1]]


# -- MAFW ------------------------------------------------------------------------------------------
MAFW_LISTS = (
    ListFamily("single/[no_caption/]set_K/{train,test}.txt (the release's `Train & Test Set`, MAE-DFER's split/)",
               r"(?:^|/)set_(?P<fold>\d+)/(?P<part>train|test)\.txt$", within=r"(?:^|/)single/",
               skip=r"(?:^|/)(?:compound|multi)[^/]*/"),
    ListFamily("MAFW_set_K_{train,test}.txt (DFER-CLIP's annotation/, codes 0..10)",
               r"(?:^|/)mafw_set_(?P<fold>\d+)_(?P<part>train|test)\.txt$", base=0),
)
MAFW_FRAMES = ("frames", "faces", "frames_crop_align_224", "clips")  # among folders holding every clip, in order
_MAFW_SYNONYMS = {"happy": "happiness", "sad": "sadness", "angry": "anger"}


@register_layout("mafw", lambda s: has_lists(s, MAFW_LISTS), MAFW_CLASSES,
                 "data/frames/<id>/ (or data/clips/<id>.mp4, face-crop folders) + single/[no_caption/]set_K/"
                 "{train,test}.txt or MAFW_set_K_{train,test}.txt (5 folds, 11 classes)")
def scan_mafw(root: Path, scan: DatasetScan) -> None:
    """MAFW: 11 single-label classes, 5 folds. A list line is ``00001.mp4 anger`` (the release and MAE-DFER;
    tab-separated with captions in with_caption/), ``00001.mp4`` alone (the label then comes from the release's
    single_label.txt), or DFER-CLIP's ``frames_dir num_frames code`` (codes 0..10 in MAFW_CLASSES order). A clip
    is the frame folder of its id (MAE-DFER's data/frames/, peers' face crops) when one exists, else its video."""
    index = tree_index(root)
    family, tables, notes = find_lists(index, MAFW_LISTS)
    if family is None:
        raise no_lists_error(root, "MAFW", MAFW_LISTS)
    single = [p for p, _ in index.match(r"(?:^|/)single_label\.txt$")]
    names = _mafw_names(single[0] if single else None, scan)
    rows = []
    for fold, parts in fold_tables(scan, tables).items():
        for part, table in sorted(parts.items(), reverse=True):
            declare(scan, part, table, fold)
            for line_no, line in enumerate(table.read_text(encoding="utf-8-sig").splitlines(), start=1):
                fields = [f.strip() for f in line.split("\t")] if "\t" in line else line.split()
                if fields and fields[0]:
                    rows.append((fold, part, f"{table}:{line_no}", fields, table))
    choice = choose_clip_root(scan, index, [Path(r[3][0]).stem for r in rows], MAFW_FRAMES, "MAFW", family,
                              [p for p, _ in tables])
    scan.notes += notes
    acc = new_folds()
    for fold, part, where, fields, table in rows:
        clip_id = Path(fields[0]).stem
        label = _mafw_label(fields, family, names.get(clip_id), scan)
        path = _mafw_path(fields[0], clip_id, choice, [root, table.parent])
        if label is None or path is None:
            reason = (f"clip {clip_id} not found under {choice.root}" if label is not None else
                      f"label {fields[-1]} is not a class" if len(fields) > 1 else f"no label for clip {clip_id}")
            scan.problems.append(Problem("error", where, f"cannot use {' '.join(fields[:3])!r}: {reason}",
                                         reason="a listed clip that is not there" if label is not None else
                                         "a clip without a known label"))
            continue
        fold_clip(scan, where, acc, clip_id, label, path, fold, part)
    add_fold_clips(scan, acc["members"], acc["labels"], acc["paths"])


def _mafw_label(fields: list, family: ListFamily, named: Optional[str], scan: DatasetScan) -> Optional[str]:
    """A line's class: its label name (release lines), its code (DFER-CLIP's lines), else single_label.txt's."""
    if family.base == 0 and len(fields) >= 3:
        cls = read_code(fields[-1], MAFW_CLASSES, 0)
        return label_for(cls, scan.class_names) if cls else None
    if len(fields) >= 2:
        return label_for(_MAFW_SYNONYMS.get(fields[1].lower(), fields[1]), scan.class_names)
    return named


def _mafw_path(text: str, clip_id: str, choice: RootChoice, bases: list) -> Optional[Path]:
    """The clip a list line names: a path in the line (DFER-CLIP's, re-rooted when written on another machine)
    when it resolves, else the clip id under the chosen root."""
    if "/" in text:
        listed = resolve_listed_path(text, bases)
        if listed is not None:
            return listed
    return clip_entry(choice.root, clip_id, video_ok=choice.kind == "video")


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
                                         f" are {', '.join(scan.class_names)}", reason="an unknown label"))
            continue
        names[Path(fields[0]).stem] = label
    return names


# -- RAF-DB (basic) --------------------------------------------------------------------------------
RAFDB_LISTS = (ListFamily("EmoLabel/list_patition_label.txt (the release; SCN, DAN)",
                          r"(?:^|/)list_pa(?:r)?tition_label\.txt$"),)
RAFDB_IMAGES = ("aligned", "original")  # the aligned 100x100 faces first (SCN, DAN); --frame-root picks another


@register_layout("rafdb", lambda s: has_lists(s, RAFDB_LISTS), RAFDB_CLASSES,
                 "basic/Image/{aligned,original}/ + basic/EmoLabel/list_patition_label.txt (still images,"
                 " train/test from the file names)")
def scan_rafdb(root: Path, scan: DatasetScan) -> None:
    """RAF-DB basic: still images (one-frame clips) listed as ``train_00001.jpg 5`` with codes 1 Surprise,
    2 Fear, 3 Disgust, 4 Happiness, 5 Sadness, 6 Anger, 7 Neutral; the split is the name's prefix. The images
    are ``Image/aligned/<stem>_aligned.jpg`` (preferred) or ``Image/original/<name>``."""
    index = tree_index(root)
    family, tables, notes = find_lists(index, RAFDB_LISTS)
    if family is None:
        raise no_lists_error(root, "RAF-DB", RAFDB_LISTS)
    table = tables[0][0]
    rows = [(f"{table}:{n}", line.split()) for n, line in
            enumerate(table.read_text(encoding="utf-8-sig").splitlines(), start=1) if line.split()]
    folder = _rafdb_images(scan, index, [r[1][0] for r in rows], family, table)
    scan.notes += notes
    for where, fields in rows:
        name, split = fields[0], canonical_split(fields[0].split("_", 1)[0])
        cls = read_code(fields[1], RAFDB_CLASSES, 1) if len(fields) > 1 else None
        label = label_for(cls, scan.class_names) if cls else None
        image = _rafdb_image(folder, name)
        if split in ("Train", "Test"):
            declare(scan, split, table)
        if label is None or image is None or split not in ("Train", "Test"):
            why = (f"label {fields[1:2]} is not one of RAF-DB's codes 1..7" if label is None else
                   f"{name} is not in {folder}" if image is None else "its name starts with neither train nor test")
            scan.problems.append(Problem("error", where, f"cannot use {' '.join(fields)!r}: {why}",
                                         reason="a listed image that cannot be used"))
            continue
        add_clip(scan, image, label, split, name=name)


def _rafdb_image(folder: Path, name: str) -> Optional[Path]:
    for candidate in (folder / name, folder / f"{Path(name).stem}_aligned{Path(name).suffix}"):
        if candidate.is_file():
            return candidate
    return None


def _rafdb_images(scan: DatasetScan, index: TreeIndex, names: list, family: ListFamily, table: Path) -> Path:
    """The image folder: the one holding most of a sample of the listed images; aligned/ before original/."""
    given, sample = frames_option(scan), spread(sorted(names))
    folders = [given] if given is not None else [index.root / d for d in sorted(index.frame_folders)]
    rank = {n: i for i, n in enumerate(RAFDB_IMAGES)}
    scored = sorted(((sum(_rafdb_image(f, n) is not None for n in sample), f) for f in folders),
                    key=lambda hf: (-hf[0], rank.get(hf[1].name.lower(), len(rank)), str(hf[1])))
    if not scored or scored[0][0] == 0:
        raise DatasetError(f"{index.root}: RAF-DB list found ({table}), but not the images it names (e.g."
                           f" {', '.join(sample[:2])}): looked for a folder holding <name> or <stem>_aligned.jpg;"
                           f" {describe_index(index)}. Give the folder with --frame-root DIR")
    others = [f"{f} ({h}/{len(sample)})" for h, f in scored[1:4] if h]
    scan.notes.append(f"labels: {family.name}, {table}; images: {scored[0][1]} ({scored[0][0]} of {len(sample)}"
                      " sampled names found)" + (f"; also holding them: {', '.join(others)} (choose with"
                                                 " --frame-root DIR)" if others else ""))
    return scored[0][1]


# RAF-DB as <split>/<code>/<image> (the Kaggle copy's DATASET/{train,test}/1..7/, others' train_set/1..7/)
RAFDB_CODE_FOLDERS = frozenset(str(code) for code in range(1, len(RAFDB_CLASSES) + 1))


def _rafdb_code_root(source: Path) -> Optional[Path]:
    """``source`` or one of its few sub-folders (``DATASET/``) when its split folders hold only folders named
    by RAF-DB's codes 1..7, and those hold images."""
    if not source.is_dir():
        return None
    try:  # detection: a folder that cannot be listed is not this layout (the scan that follows names it)
        subdirs = sorted(p for p in source.iterdir() if p.is_dir())
        for candidate in [source] + (subdirs if len(subdirs) <= 4 else []):
            splits = [p for p in candidate.iterdir() if p.is_dir() and p.name.lower() in KNOWN_SPLITS]
            codes = [c for split in splits for c in split.iterdir() if c.is_dir()]
            if codes and all(c.name in RAFDB_CODE_FOLDERS for c in codes) and any(
                    f.suffix.lower() in IMAGE_EXTENSIONS for f in codes[0].iterdir()):
                return candidate
    except OSError:
        return None
    return None


@register_layout("rafdb-folders", lambda s: _rafdb_code_root(s) is not None, RAFDB_CLASSES,
                 "<split>/<1..7>/<image>: label folders named by RAF-DB's codes (the Kaggle copy's"
                 " DATASET/{train,test}/)")
def scan_rafdb_folders(source: Path, scan: DatasetScan) -> None:
    """Still images in folders named by RAF-DB's codes 1 Surprise .. 7 Neutral, under train/test folders."""
    root = _rafdb_code_root(source)
    if root is None:
        raise DatasetError(f"{source}: no <split>/<1..7>/ folders of images (RAF-DB's codes) found here or one"
                           " level down")
    scan_folders(root, scan, lambda name: label_for(read_code(name, RAFDB_CLASSES, 1) or "", scan.class_names))
    codes = ", ".join(f"{k} {name}" for k, name in enumerate(RAFDB_CLASSES, start=1))
    scan.notes.append(f"labels: the folder names, read as RAF-DB's codes ({codes}; for another order, rename the"
                      f" folders to class names); images: {root} ({len(scan.clips)} found)")


# -- AFEW and the generic <split>/<label>/<clip> -----------------------------------------------------
def _is_afew(source: Path) -> bool:
    if not source.is_dir():
        return False
    splits = [p for p in source.iterdir() if p.is_dir()]
    if not splits or any(canonical_split(p.name) not in ("Train", "Val") for p in splits):  # also Train_AFEW/
        return False
    known = {c.lower() for c in AFEW_CLASSES}
    return all(label.name.lower() in known for split in splits for label in split.iterdir() if label.is_dir())


@register_layout("afew", _is_afew, AFEW_CLASSES, "Train|Val/<Emotion>/*.avi, AFEW's 7 classes")
def scan_afew(root: Path, scan: DatasetScan) -> None:
    scan_folders(root, scan)


# -- peers' annotation lists (DFER-CLIP, MAE-DFER, SCN, ...): path [num_frames] label -----------------
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


def split_list_line(line: str) -> Optional[tuple[str, str]]:
    """(path, label) of ``path num_frames label`` (DFER-CLIP) or ``path label`` (MAE-DFER, SCN's image lists);
    None when the line has a single field."""
    fields = line.split()
    if len(fields) < 2:
        return None
    if len(fields) >= 3 and fields[-2].isdigit():
        return " ".join(fields[:-2]), fields[-1]
    return " ".join(fields[:-1]), fields[-1]


@register_layout("annotation-list",
                 lambda s: s.is_file() and s.suffix.lower() == ".txt" and fold_part(s.name)[1] is not None,
                 _list_classes, "path [num_frames] label lines (a frame folder, video or image each);"
                 " set_K/train|test in the file names give folds",
                 accepts=lambda s: bool(s.exists() and _list_files(s)))
def scan_annotation_lists(source: Path, scan: DatasetScan) -> None:
    """One clip per line, ``path num_frames label`` or ``path label`` (label: a 0-based index into the class
    order, or a name; path: a frame folder, a video or a still image). A list named ``*set_K*train*`` /
    ``*set_K*test*`` gives fold K; without a fold number the name's train/test/val is the split."""
    files = _list_files(source)
    if not files:
        raise DatasetError(f"{source}: no annotation list (*train*.txt / *test*.txt) found")
    members, labels, paths = {}, {}, {}
    for table in files:
        fold, part = fold_part(table.name)
        if fold is None:
            declare(scan, canonical_split(part), table)
        else:
            declare(scan, "test" if part == "test" else "train", table, fold)
        bases = [table.parent, table.parent.parent, table.parent.parent.parent]
        for line_no, line in enumerate(table.read_text(encoding="utf-8-sig").splitlines(), start=1):
            if not line.strip():
                continue
            where, parsed = f"{table}:{line_no}", split_list_line(line)
            if parsed is None:
                scan.problems.append(Problem("error", where, f"expected 'path num_frames label' or 'path label',"
                                             f" got {line!r}", reason="a line that is not 'path [num_frames] label'"))
                continue
            text, code = parsed
            label = _list_label(code, scan, table)
            path = resolve_listed_path(text, bases)
            if label is None:
                scan.problems.append(Problem("error", where, f"label {code!r} is not a class of"
                                             f" {', '.join(scan.class_names)}", reason="an unknown label"))
            elif path is None:
                scan.problems.append(Problem("error", where, f"{text} not found (also looked for its trailing"
                                             f" folders under {table.parent})",
                                             reason="a listed clip that is not there"))
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


# -- CK+ -------------------------------------------------------------------------------------------
CKPLUS_EMOTION = ("Emotion", "Emotion_labels/Emotion", "Emotion_labels")  # beside the images; the release's
#   Emotion_labels.zip unpacked into a folder of its own name or not


def _ckplus_root(source: Path) -> Optional[Path]:
    found = find_under(source, ("cohn-kanade-images",)) if source.is_dir() else None
    return found.parent if found and _ckplus_emotion(found.parent) else None


def _ckplus_emotion(root: Path) -> Optional[Path]:
    """The folder of Sxxx/nnn/*_emotion.txt beside cohn-kanade-images/."""
    try:
        return next((root / rel for rel in CKPLUS_EMOTION if (root / rel).is_dir() and any(
            p.is_dir() and p.name.upper().startswith("S") for p in (root / rel).iterdir())), None)
    except OSError:  # an unreadable label folder: no CK+ here (detection), or named by the scan's error
        return None


@register_layout("ckplus", lambda s: _ckplus_root(s) is not None, CKPLUS_CLASSES,
                 "cohn-kanade-images/Sxxx/nnn/*.png + Emotion/Sxxx/nnn/*_emotion.txt, 10 subject folds")
def scan_ckplus(source: Path, scan: DatasetScan) -> None:
    """CK+: one frame folder per posed sequence; its label is the code (0-7) in the sequence's
    ``*_emotion.txt``. Sequences without one are skipped and counted. Folds keep subjects apart: subjects
    sorted by name, subject i goes to the test part of fold ``i % fold_count + 1``."""
    root = _ckplus_root(source)
    images, emotion = root / "cohn-kanade-images", _ckplus_emotion(root)
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
    scan.notes.append(f"labels: {emotion} (Sxxx/nnn/*_emotion.txt, codes 0-7); clips: {images}"
                      f" ({len(scan.clips)} labelled sequences of {len(subjects)} subjects)")
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
                 "a CSV with a path,label,split header, paths relative to it (videos, frame folders or images)")
def scan_csv(csv_path: Path, scan: DatasetScan) -> None:
    for line_no, row in read_header_csv(csv_path, ("path", "label", "split")):
        where = f"{csv_path}:{line_no}"
        split = canonical_split((row.get("split") or "").strip() or "Train")
        declare(scan, split, csv_path)
        if not row.get("path"):
            scan.problems.append(Problem("error", where, "row has no path", reason="a row without a path"))
            continue
        path = Path(row["path"])
        path = path if path.is_absolute() else csv_path.parent / path
        label = label_for(row.get("label") or "", scan.class_names)
        if label is None:
            scan.problems.append(Problem("error", where, f"unknown label {row.get('label')!r}; known classes"
                                         f" are {', '.join(scan.class_names)}", reason="an unknown label"))
        elif not path.exists() and not path.is_symlink():
            scan.problems.append(Problem("error", where, f"{path} does not exist",
                                         reason="a listed file that does not exist"))
        else:
            add_clip(scan, path, label, split)


# -- the generic <split>/<label>/<clip>: last, it accepts any folder ----------------------------------
@register_layout("folders", lambda s: s.is_dir(), None,
                 "<split>/<label>/<clip>, clip = video, frame folder or still image")
def scan_folders(root: Path, scan: DatasetScan, label_of: Optional[Callable[[str], Optional[str]]] = None) -> None:
    """Every <split>/<label>/<clip>; ``label_of`` maps a label folder's name to a class (default: its name)."""
    label_of = label_of or (lambda name: label_for(name, scan.class_names))
    for split_dir in sorted(root.iterdir()):
        if not split_dir.is_dir():
            if split_dir.name not in IGNORED_NAMES and split_dir.suffix.lower() != ".csv":
                scan.problems.append(Problem("warning", str(split_dir), "stray file at the dataset root;"
                                             " expected only <split>/ folders", reason="a file at the dataset root"))
            continue
        split = canonical_split(split_dir.name)
        declare(scan, split, split_dir)
        for label_dir in sorted(split_dir.iterdir()):
            if not label_dir.is_dir():
                if label_dir.name not in IGNORED_NAMES:
                    scan.problems.append(Problem("warning", str(label_dir), "stray file in a split folder;"
                                                 " expected only <label>/ folders", reason="a file in a split folder"))
                continue
            label = label_of(label_dir.name)
            if label is None:
                scan.problems.append(Problem("error", str(label_dir), f"unknown label folder; known classes"
                                             f" are {', '.join(scan.class_names)} (rename it, or list"
                                             f" the classes in {CLASSES_FILE} or with --classes)",
                                             reason="an unknown label folder"))
                continue
            scan_label_folder(scan, label_dir, label, split)


def scan_label_folder(scan: DatasetScan, label_dir: Path, label: str, split: str) -> None:
    """Every clip of one <split>/<label>/ folder; videos and stills mixed in one folder are worth a warning
    (thumbnails beside videos would become one-frame clips)."""
    kinds = Counter()
    for entry in sorted(os.scandir(label_dir), key=lambda e: e.name):
        if entry.name in IGNORED_NAMES:
            continue
        clip = add_clip(scan, Path(entry.path), label, split)
        if clip is not None:
            kinds[clip.kind] += 1
    if kinds["video"] and kinds["image"]:
        scan.problems.append(Problem("warning", str(label_dir), f"mixes {kinds['video']} video(s) and"
                                     f" {kinds['image']} still image(s); each image is a one-frame clip (if they are"
                                     " thumbnails of the videos, move them out)", reason="videos mixed with images"))


# detection order: the registry's insertion order, with the catch-all folders layout last
LAYOUTS = {name: LAYOUTS[name] for name in ("dfew", "ferv39k", "mafw", "rafdb", "rafdb-folders", "ckplus",
                                            "annotation-list", "csv", "afew", "folders")}
RELEASES = {"dfew": DFEW_LISTS, "ferv39k": FERV39K_LISTS, "mafw": MAFW_LISTS, "rafdb": RAFDB_LISTS}


def scan_dataset(source: Path, class_names: Optional[Sequence[str]] = None, layout: Optional[str] = None,
                 **options) -> DatasetScan:
    """List a dataset's clips without decoding them.

    Arguments:
        source: a dataset folder (or any folder inside it holding its frames and label lists) or a list file.
            Its layout is detected (see ``pipeline.layouts``): AFEW ``Train|Val/<Emotion>/*.avi`` and the
            generic ``<split>/<label>/<clip>`` (names match case-insensitively), a ``path,label,split`` CSV
            (paths relative to it), DFEW, FERV39k, MAFW, RAF-DB, CK+, or a ``path [num_frames] label``
            annotation list. A clip is a video, a frame folder or a still image (a one-frame clip).
        class_names: the class order; None: ``classes.txt`` beside the data, else the layout's own
            (DFEW, FERV39k, MAFW, RAF-DB, CK+), else AFEW's.
        layout: a layout name (``emo-cache check --layout``); None detects it.
        options: layout options, e.g. ``fold_count=10`` for CK+, ``frame_root="DFEW/Clip/jpg_256"`` to choose the
            folder a release's clips are read from when several hold them.
    Returns:
        DatasetScan with the clips (sorted by id), problems (unknown labels, duplicate ids, one file listed
        twice, stray files, broken links, empty frame folders, and an error for a dataset, split or fold that
        yields no clip), the class names, notes (what a release layout chose) and, for datasets with folds,
        each clip's folds.

    >>> import shutil, tempfile
    >>> tmp = tempfile.TemporaryDirectory()
    >>> for clip in ("Train/Happy/single_face.mp4", "Train/Sad/45-m7-di-ph.jpg"):  # a video and a still image
    ...     (Path(tmp.name) / clip).parent.mkdir(parents=True)
    ...     _ = shutil.copy(Path("data/samples") / Path(clip).name, Path(tmp.name) / clip)
    >>> scan = scan_dataset(Path(tmp.name))
    >>> scan.layout, [(c.clip_id, c.kind) for c in scan.clips]
    ('afew', [('Train/Happy/single_face.mp4', 'video'), ('Train/Sad/45-m7-di-ph.jpg', 'image')])
    >>> tmp.cleanup()
    """
    source = Path(source)
    if not source.exists():
        raise DatasetError(f"{source}: no such dataset folder or list file")
    with cached_walks():
        entry = get_layout(layout, source) if layout else detect_layout(source)
        layout_classes = entry.default_classes(source)
        names = resolve_class_names(source, class_names, layout_classes)
        given = class_names or layout_classes or names != AFEW_CLASSES
        scan = DatasetScan(source, entry.name, names,
                           options={**options, "class_source": "given" if given else "afew default"})
        entry.scan(source, scan)
        _flag_duplicates(scan)
        _flag_same_file(scan)
        scan.problems += empty_parts(scan)
        if not scan.clips and entry.name in ("folders", "afew"):
            scan.notes.append(_releases_looked_for(source))
    scan.clips.sort(key=lambda c: c.clip_id)
    return scan


def _releases_looked_for(source: Path) -> str:
    """For a folder read as plain <split>/<label>/<clip> that yields nothing: the release lists looked for."""
    looked = "; ".join(f.name for families in RELEASES.values() for f in families)
    index = tree_index(source) if source.is_dir() else None
    seen = f"; {describe_index(index)}" if index is not None else ""
    return (f"read as <split>/<label>/<clip> because no release's label lists were found within {MAX_DEPTH} levels"
            f" (looked for: {looked}){seen}")


def _flag_duplicates(scan: DatasetScan) -> None:
    """Two clips with one id would overwrite each other in the store: keep the first, flag the rest."""
    seen: dict[str, Clip] = {}
    kept = []
    for clip in scan.clips:
        if clip.clip_id in seen:
            scan.problems.append(Problem("error", str(clip.path), f"duplicate clip id {clip.clip_id!r}"
                                         f" (also {seen[clip.clip_id].path}); rename one of them",
                                         reason="a duplicate clip id"))
        else:
            seen[clip.clip_id] = clip
            kept.append(clip)
    scan.clips = kept


def _flag_same_file(scan: DatasetScan) -> None:
    """One file (or link target) listed under two labels or in two splits: which one is right cannot be known,
    and a file in both train and test leaks; every such clip is left out and the file named once, so nothing
    wrong is stored."""
    by_file: dict[str, list[Clip]] = defaultdict(list)
    for clip in scan.clips:
        by_file[os.path.realpath(clip.path)].append(clip)
    dropped = set()
    for clips in by_file.values():
        if len(clips) < 2:
            continue
        ids = ", ".join(repr(c.clip_id) for c in clips)
        what = "under two labels" if len({c.label for c in clips}) > 1 else "in two splits"
        problem = Problem("error", str(clips[0].path), f"one file listed {what}: {ids}; keep one entry (all are"
                          " left out until then)", reason=f"one file listed {what}")
        scan.problems.append(problem)
        scan.dropped += [(clip, problem) for clip in clips]
        dropped.update(c.clip_id for c in clips)
    scan.clips = [c for c in scan.clips if c.clip_id not in dropped]
