"""Shared HDF5 plumbing: opening with clear errors, salvage after a kill, settings diffs."""
from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path
from typing import Any, Iterable

import h5py
import numpy as np


from cache.errors import (StoreDamaged, StoreError, StoreFull, StoreLocked, StoreMismatch,  # noqa: F401
                          UserError, clip_key, key_to_id)


def canonical_json(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)


def sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def diff_settings(stored: dict, wanted: dict) -> list[str]:
    """Human-readable lines for every key whose value differs between two settings dicts."""
    lines = []
    for key in sorted(set(stored) | set(wanted)):
        a, b = stored.get(key, "<absent>"), wanted.get(key, "<absent>")
        if canonical_json(a) != canonical_json(b):
            lines.append(f"{key}: store has {a!r}, this run asks for {b!r}")
    return lines


def to_attr(value: Any) -> Any:
    """HDF5 attributes hold scalars and strings; everything else is stored as JSON text."""
    if isinstance(value, (bool, int, float, str, np.integer, np.floating, np.bool_)):
        return value
    return canonical_json(value)


def open_h5(path: Path, mode: str) -> h5py.File:
    """Open ``path``; turn h5py's errors into messages that say what to do."""
    path = Path(path)
    if mode == "r" and not path.exists():
        raise StoreError(f"{path}: no such store; build it first (see `emo-cache --help`)")
    try:
        return h5py.File(path, mode)
    except BlockingIOError as exc:
        raise StoreError(f"{path}: another process is writing this store; wait for it or stop it"
                         f" (only one writer per HDF5 file) [{exc}]") from exc
    except OSError as exc:
        if "lock" in str(exc).lower():
            raise StoreError(f"{path}: another process holds this store open for writing; wait for it"
                             f" or stop it [{exc}]") from exc
        raise StoreDamaged(f"{path}: cannot be read as HDF5 ({exc}). If a run was killed while writing,"
                           " rerun the same command: it salvages the complete clips and redoes the rest.") from exc


def salvage(path: Path, complete_attr: str = "complete") -> Path:
    """Copy every readable, complete clip of a damaged store into a fresh file in its place.

    The damaged file is kept beside it as ``<name>.damaged-<time>`` so nothing is lost.
    Returns the path of the kept damaged file.
    """
    path = Path(path)
    damaged = path.with_name(f"{path.name}.damaged-{int(time.time())}")
    os.replace(path, damaged)
    try:
        src = h5py.File(damaged, "r")
    except OSError:
        return damaged  # nothing readable: the rerun starts from an empty store
    with src, h5py.File(path, "w") as dst:
        for name, value in src.attrs.items():
            dst.attrs[name] = value
        for key in list(src.keys()):
            try:
                if src[key].attrs.get(complete_attr, False):
                    src.copy(src[key], dst, name=key)
            except (OSError, KeyError, RuntimeError):
                continue  # an unreadable clip was in flight; the rerun redoes it
    return damaged


def open_for_append(path: Path, log=print) -> h5py.File:
    """Open or create a store for writing, salvaging it first if a kill left it unreadable."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        return open_h5(path, "a")
    except StoreDamaged as exc:
        kept = salvage(path)
        log(f"warning: {exc}\n  salvaged complete clips into a new {path}; the damaged file is kept as {kept}")
        return open_h5(path, "a")


def group_names(f: h5py.File, complete_only: bool = True) -> Iterable[str]:
    for key in f.keys():
        if not complete_only or f[key].attrs.get("complete", False):
            yield key


def read_rows(ds: h5py.Dataset, frames: np.ndarray, lead: tuple = ()) -> np.ndarray:
    """``ds[lead + (frames,)]`` for frame indices in any order, repeats allowed.

    h5py's multi-index selection costs ~100 ms a clip (bench/bench_heads.py), so a dense span is read as
    one slice and a sparse selection frame by frame.
    """
    frames = np.asarray(frames, dtype=np.int64)
    row_shape = ds.shape[len(lead) + 1:]
    if len(frames) == 0:
        return np.zeros((0,) + row_shape, ds.dtype)
    lo, hi = int(frames.min()), int(frames.max()) + 1
    unique = np.unique(frames)
    if hi - lo <= 8 * len(unique):
        return ds[lead + (slice(lo, hi),)][frames - lo]
    block = np.stack([ds[lead + (int(i),)] for i in unique])
    return block[np.searchsorted(unique, frames)]


class ClipStore:
    """What both stores share: one group per clip, committed whole with a ``complete`` mark written last.

    Subclasses open ``self._f`` and set ``self.path`` and ``STAGE`` (the command that fills the store).
    """
    STAGE = ""
    path: Path
    _f: h5py.File

    def is_complete(self, clip_id: str) -> bool:
        key = clip_key(clip_id)
        return key in self._f and bool(self._f[key].attrs.get("complete", False))

    def attrs(self, clip_id: str) -> dict:
        grp = self._group(clip_id)
        return {k: (v.item() if hasattr(v, "item") else v) for k, v in grp.attrs.items()}

    def read_present(self, clip_id: str) -> np.ndarray:
        """bool (F,) face mask of a clip, without reading its pixels or maps."""
        return self._group(clip_id)["present"][()]

    def _group(self, clip_id: str) -> h5py.Group:
        if not self.is_complete(clip_id):
            raise StoreError(f"{self.path}: clip {clip_id!r} is not in the store (or was not completed);"
                             f" rerun `{self.STAGE}` to finish it")
        return self._f[clip_key(clip_id)]

    def _new_group(self, clip_id: str) -> h5py.Group:
        """An empty group for the clip, replacing an earlier (incomplete or outdated) one."""
        key = clip_key(clip_id)
        if key in self._f:
            del self._f[key]
        return self._f.create_group(key)

    def _commit(self, grp: h5py.Group, clip_id: str, attrs: dict) -> None:
        """Attributes and data flushed first, then the ``complete`` mark, flushed again."""
        for k, v in {**attrs, "clip_id": clip_id}.items():
            grp.attrs[k] = to_attr(v)
        self._f.flush()
        grp.attrs["complete"] = True
        self._f.flush()

    def close(self) -> None:
        if self._f:
            self._f.close()
            self._f = None

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()
