"""Finding a dataset's label files and its frame root by content, to a bounded depth below the folder the user
names, because the releases and the loaders that read them (MAE-DFER, DFER-CLIP, S2D, ...) name folders
differently (docs: "Datasets as released").

One walk of the top of the tree (``TreeIndex``) serves every layout's detection and scan. It never lists the
inside of a frame folder's siblings one by one: a folder holding many sub-folders whose first few hold images
is a *clip container* (a frame root), recorded and not entered, so a tree of 16,000 clip folders costs a few
directory listings, not 16,000.

>>> index = tree_index(Path("DFEW"))                                        # doctest: +SKIP
>>> [str(p) for p, _ in index.match(r"(?:^|/)set_(\\d+)\\.csv$")][:1]         # doctest: +SKIP
['EmoLabel_DataSplit/train(single-labeled)/set_1.csv']
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Optional, Sequence

from emotion_attention.pipeline.data.decode import IMAGE_EXTENSIONS, VIDEO_EXTENSIONS

MAX_DEPTH = 6        # label files sit at most this deep below the named folder (MAFW's set lists: 5 below its root)
PEEK_OVER = 24       # a folder with more sub-folders than this is peeked at before it is entered
PEEK = 3             # sub-folders peeked into: all holding images (or none holding sub-folders) -> a clip container
MAX_DIRS = 20_000    # folders listed at most: bounds the walk on a tree that is not a dataset (a home folder)
MEDIA = set(IMAGE_EXTENSIONS) | set(VIDEO_EXTENSIONS)


@dataclass
class TreeIndex:
    """What one bounded walk below ``root`` found: folders (relative paths) and the non-media files in them."""
    root: Path
    dirs: list[Path] = field(default_factory=list)        # every folder listed or recognised, relative to root
    files: list[Path] = field(default_factory=list)       # non-media files (label lists, spreadsheets, ...)
    containers: set = field(default_factory=set)          # folders of many clip folders, not entered
    frame_folders: set = field(default_factory=set)       # folders holding images directly
    truncated: bool = False                               # the walk stopped at MAX_DIRS

    def match(self, pattern: str) -> list[tuple[Path, re.Match]]:
        """Files whose relative path (posix, lower case) matches ``pattern``, as (absolute path, match)."""
        regex = re.compile(pattern)
        found = []
        for rel in self.files:
            m = regex.search(rel.as_posix().lower())
            if m:
                found.append((self.root / rel, m))
        return sorted(found, key=lambda item: item[0].as_posix())

    def candidate_roots(self) -> list[Path]:
        """Folders that may hold clips (not frame folders themselves), absolute, shallowest first."""
        rels = [d for d in self.dirs if d not in self.frame_folders]
        return [self.root / d for d in sorted(rels, key=lambda d: (len(d.parts), d.as_posix()))]


def _listing(folder: Path) -> tuple[list[str], list[str]]:
    """(sub-folder names, file names) of a folder; ([], []) when it cannot be listed."""
    dirs, files = [], []
    try:
        with os.scandir(folder) as entries:
            for entry in entries:
                try:
                    (dirs if entry.is_dir() else files).append(entry.name)
                except OSError:
                    continue
    except OSError:
        return [], []
    return sorted(dirs), sorted(files)


def _holds_images(files: Iterable[str]) -> bool:
    return any(os.path.splitext(f)[1].lower() in IMAGE_EXTENSIONS for f in files)


def _is_container(folder: Path, subdirs: Sequence[str]) -> bool:
    """Many sub-folders whose first few are frame folders (or leaves): clips, not more of the tree."""
    if len(subdirs) <= PEEK_OVER:
        return False
    for name in subdirs[:PEEK]:
        inner_dirs, inner_files = _listing(folder / name)
        if inner_dirs and not _holds_images(inner_files):
            return False
    return True


def tree_index(root: Path, max_depth: int = MAX_DEPTH) -> TreeIndex:
    """Walk ``root`` breadth first, at most ``max_depth`` folders deep; see TreeIndex. Cached per scan."""
    root = Path(root)
    key = (str(root.resolve()), max_depth)
    if _CACHE.get("on") and key in _CACHE:
        return _CACHE[key]
    index = TreeIndex(root)
    level = [Path(".")]
    for depth in range(max_depth + 1):
        nxt = []
        for rel in level:
            if len(index.dirs) >= MAX_DIRS:
                index.truncated = True
                break
            subdirs, files = _listing(root / rel)
            index.dirs.append(rel)
            index.files += [rel / f for f in files if os.path.splitext(f)[1].lower() not in MEDIA]
            if _holds_images(files):
                index.frame_folders.add(rel)
                continue
            if _is_container(root / rel, subdirs):
                index.containers.add(rel)
                continue
            nxt += [rel / d for d in subdirs if not d.startswith(".")]
        level = nxt
        if not level:
            break
    if _CACHE.get("on"):
        _CACHE[key] = index
    return index


_CACHE: dict = {}


class cached_walks:
    """``with cached_walks():`` one walk per folder for a whole detection and scan (layouts ask many times)."""

    def __enter__(self):
        self._outer = _CACHE.get("on", False)
        _CACHE["on"] = True
        return self

    def __exit__(self, *exc) -> None:
        if not self._outer:
            _CACHE.clear()


def spread(items: Sequence, n: int = 24) -> list:
    """Up to ``n`` items spread over the whole sequence (first and last included): a fair sample to test."""
    if len(items) <= n:
        return list(items)
    step = (len(items) - 1) / (n - 1)
    return [items[round(i * step)] for i in range(n)]


def clip_entry(folder: Path, name: str, video_ok: bool = True) -> Optional[Path]:
    """``folder/name`` as a clip: a frame folder of that name (also zero-padded to 5 digits or unpadded, as the
    releases and the loaders disagree), else a video ``name.<ext>`` when ``video_ok``. A name listed with its
    video's extension (``00001.mp4``) also finds the frame folder ``00001``."""
    stem, ext = os.path.splitext(name)
    if ext.lower() in VIDEO_EXTENSIONS:
        name = stem
    variants = [name]
    if name.isdigit():
        variants += [name.zfill(5), name.lstrip("0") or "0"]
    for candidate in variants:
        if (folder / candidate).is_dir():
            return folder / candidate
    if video_ok:
        for candidate in variants:
            for ext in VIDEO_EXTENSIONS:
                if (folder / f"{candidate}{ext}").is_file():
                    return folder / f"{candidate}{ext}"
    return None


@dataclass(frozen=True)
class RootChoice:
    """The folder a layout reads its clips from, and what else was found (for the report and the errors)."""
    root: Optional[Path]
    hits: int                                   # sampled clip names found under root
    sample: int                                 # clip names tried
    others: tuple = ()                          # (folder, hits) of the other candidates holding clips
    kind: str = "frames"                        # "frames" (folders per clip) or "video" (files per clip)


def find_clip_root(index: TreeIndex, names: Sequence[str], prefer: Sequence[str] = (),
                   given: Optional[Path] = None, video_ok: bool = True) -> RootChoice:
    """The folder whose entries are the clips ``names`` (frame folders first, then videos).

    Every folder of the walk is tried on a spread sample of the names; the one holding most of them wins; among
    equals, a folder named in ``prefer`` (earliest first), then the shallowest. ``given`` (``--frame-root``) is
    taken as it is, when it holds them.
    """
    sample = spread(sorted(set(names)))
    if not sample:
        return RootChoice(None, 0, 0)
    if given is not None:
        hits = sum(clip_entry(given, n, video_ok) is not None for n in sample)
        return RootChoice(given if hits else None, hits, len(sample))
    scored = []
    for folder in index.candidate_roots():
        frames = sum(clip_entry(folder, n, video_ok=False) is not None for n in sample)
        videos = 0 if frames or not video_ok else sum(clip_entry(folder, n) is not None for n in sample)
        if frames or videos:
            scored.append((folder, max(frames, videos), "frames" if frames else "video"))
    if not scored:
        return RootChoice(None, 0, len(sample))
    rank = {name.lower(): i for i, name in enumerate(prefer)}

    def order(item):
        folder, hits, kind = item
        return (-hits, kind != "frames", rank.get(folder.name.lower(), len(rank)), len(folder.parts), str(folder))

    scored.sort(key=order)
    best = scored[0]
    return RootChoice(best[0], best[1], len(sample), tuple((f, h) for f, h, _ in scored[1:]), best[2])


def describe_index(index: TreeIndex, limit: int = 4) -> str:
    """What the walk saw, for an error that cannot decide: some files and the folders holding clips."""
    files = ", ".join(p.as_posix() for p in index.files[:limit]) or "none"
    more = f" (+{len(index.files) - limit} more)" if len(index.files) > limit else ""
    roots = sorted(index.containers | {d.parent for d in index.frame_folders if d.parent != Path(".")})
    clips = ", ".join(p.as_posix() + "/" for p in roots[:limit]) or "none"
    return f"list files found: {files}{more}; folders of clip folders found: {clips}"
