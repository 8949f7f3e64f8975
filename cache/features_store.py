"""Features store: one HDF5 file per backbone setting, one group per clip (see README).

Layout of a clip group (same name as in the faces store):
    maps     float16 (V, F, L, D)  backbone maps; V views (0 = original, 1 = mirror), L positions
    present  bool    (F,)          copy of the faces store's mask; absent frames have zero maps
attrs: clip_id, label, split, complete (written last).
Root attrs: format, provenance (JSON), one ``prov_<key>`` attr per provenance key for h5dump,
class_names (JSON list).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator, Optional

import numpy as np

from cache.common import (ClipStore, StoreError, StoreMismatch, canonical_json, diff_settings, group_names,
                          key_to_id, open_for_append, open_h5, read_rows, to_attr)

FORMAT = "emotion-features/1"


class FeaturesStore(ClipStore):
    """Open a features store for reading (``"r"``) or resumable writing (``"a"``).

    Arguments:
        path: the ``.h5`` file.
        mode: ``"r"`` or ``"a"``.
        provenance: for ``"a"``, the settings that made the maps (backbone, layer, weights hash,
            input size, crop, normalisation, faces-store fingerprint, ...). An existing store
            with other provenance is refused with the differing keys named. For ``"r"`` it is
            optional and, when given, checked the same way.
        class_names: recorded when the store is created.

    >>> store = FeaturesStore("feats.h5", "a", provenance={"backbone": "vgg16"}, class_names=[...])
    >>> store.write_clip("Train/Happy/a.mp4", maps, present, {"label": "Happy", "split": "Train"})
    """

    STAGE = "emo-cache extract"

    def __init__(self, path, mode: str = "r", provenance: Optional[dict] = None,
                 class_names: Optional[list[str]] = None, log=print):
        self.path = Path(path)
        if mode == "a":
            if provenance is None:
                raise ValueError("FeaturesStore(mode='a') needs the provenance dict")
            self._f = open_for_append(self.path, log=log)
            if "provenance" not in self._f.attrs:
                self._f.attrs["format"] = FORMAT
                self._f.attrs["provenance"] = canonical_json(provenance)
                for k, v in provenance.items():
                    self._f.attrs[f"prov_{k}"] = to_attr(v)
                self._f.attrs["class_names"] = canonical_json(list(class_names or []))
                self._f.flush()
        elif mode == "r":
            self._f = open_h5(self.path, "r")
        else:
            raise ValueError(f"mode must be 'r' or 'a', not {mode!r}")
        if self._f.attrs.get("format") != FORMAT:
            raise StoreError(f"{self.path}: not a features store (format={self._f.attrs.get('format')!r});"
                             " build one with `emo-cache extract`")
        if provenance is not None:
            self.check_provenance(provenance)

    def check_provenance(self, expected: dict) -> None:
        """Raise StoreMismatch naming every provenance key that differs from ``expected``."""
        diffs = diff_settings(self.provenance, expected)
        if diffs:
            raise StoreMismatch(f"{self.path} was made with other settings:\n  " + "\n  ".join(diffs)
                                + "\nFeatures from different settings are never mixed: use a new --out path.")

    @property
    def provenance(self) -> dict:
        return json.loads(self._f.attrs["provenance"])

    @property
    def class_names(self) -> list[str]:
        return json.loads(self._f.attrs["class_names"])

    def complete_ids(self, split: Optional[str] = None) -> list[str]:
        ids = []
        for key in group_names(self._f, complete_only=True):
            if split is None or str(self._f[key].attrs.get("split", "")).lower() == split.lower():
                ids.append(key_to_id(key))
        return sorted(ids)

    def shape(self, clip_id: str) -> tuple[int, ...]:
        """(V, F, L, D) of a clip's maps, read from metadata only."""
        return tuple(self._group(clip_id)["maps"].shape)

    def read_clip(self, clip_id: str, frames: Optional[np.ndarray] = None,
                  views: Optional[list[int]] = None) -> tuple[np.ndarray, np.ndarray]:
        """(maps float16 (V, F, L, D), present bool (F,)), optionally for chosen frames/views.

        ``frames`` may repeat and come in any order; the result follows it.
        """
        grp = self._group(clip_id)
        ds, present = grp["maps"], grp["present"][()]
        vsel = list(range(ds.shape[0])) if views is None else list(views)
        if frames is None:
            maps = ds[()] if views is None else np.stack([ds[v] for v in vsel])
            return maps, present
        frames = np.asarray(frames, dtype=np.int64)
        return np.stack([read_rows(ds, frames, lead=(v,)) for v in vsel]), present[frames]

    def iter_clips(self, split: Optional[str] = None) -> Iterator[tuple[str, np.ndarray, np.ndarray, dict]]:
        for cid in self.complete_ids(split):
            maps, present = self.read_clip(cid)
            yield cid, maps, present, self.attrs(cid)

    def write_clip(self, clip_id: str, maps: np.ndarray, present: np.ndarray, attrs: dict,
                   compression: Optional[str] = None) -> None:
        """Commit one clip whole: maps and mask first, ``complete`` last, then flush."""
        maps = np.asarray(maps, dtype=np.float16)
        present = np.asarray(present, dtype=bool)
        if maps.ndim != 4 or maps.shape[1] != len(present):
            raise ValueError(f"clip {clip_id}: maps must be (V, F, L, D) with F={len(present)},"
                             f" got {maps.shape}")
        grp = self._new_group(clip_id)
        v, f, l, d = maps.shape
        chunks = (v, 1, l, d) if f else None
        grp.create_dataset("maps", data=maps, chunks=chunks, compression=compression if f else None)
        grp.create_dataset("present", data=present)
        self._commit(grp, clip_id, attrs)
