"""Faces store: one HDF5 file per dataset, one group per clip (see README, "Faces store").

Layout of a clip group (name = ``clip_key(clip_id)``):
    faces         uint8   (F, S, S, 3)  RGB aligned chips, one chunk per frame
    frame_index   int32   (F,)          index of the frame in the decoded video
    timestamp_ms  float32 (F,)
    present       bool    (F,)          False: no face in that frame (the row is kept)
    box           float32 (F, 4)        x0, y0, x1, y1 in source pixels (NaN when missing)
    landmarks     float32 (F, 68, 2)    in source pixels (NaN when missing)
    score         float32 (F,)          detector score (NaN when not detected)
    how           uint8   (F,)          codes in ``HOW``
attrs: clip_id, label, split, source, fps, total_frames, complete (written last).
Root attrs: format, config (JSON of the resolved config), code_version, fingerprint.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import numpy as np

from cache.common import (ClipStore, StoreError, StoreMismatch, canonical_json, diff_settings, group_names,
                          key_to_id, open_for_append, open_h5, read_rows, sha256_text)

FORMAT = "emotion-faces/1"

# How each frame's face was found. Stored per frame in ``how``.
HOW = {
    "missing": 0,      # no face found by any step; present=False
    "detector": 1,     # HOG detector on the (downscaled) frame
    "upsampled": 2,    # HOG detector retried with upsampling
    "equalized": 3,    # HOG detector retried on a histogram-equalised frame
    "tracked": 4,      # landmarks tracked from the previous frame's face
    "fallback": 5,     # box carried over from a neighbour frame (no fresh detection)
    "prealigned": 6,   # input was an already aligned face image: resized only
}

FRAME_DATASETS = {
    "faces": np.uint8, "frame_index": np.int32, "timestamp_ms": np.float32, "present": np.bool_,
    "box": np.float32, "landmarks": np.float32, "score": np.float32, "how": np.uint8,
}


class FacesStore(ClipStore):
    """Open a faces store for reading (``mode="r"``) or resumable writing (``mode="a"``).

    Arguments:
        path: the ``.h5`` file.
        mode: ``"r"`` or ``"a"``. ``"a"`` creates the file, or checks that an existing one was
            built with the same ``config`` and salvages it if a kill left it unreadable.
        config: the resolved preprocessing config (a JSON-able dict); required for ``"a"``.
        code_version: recorded at the root when the store is created.

    >>> with FacesStore("faces.h5", "a", config={"size": 256}, code_version="0.1.0") as store:
    ...     store.write_clip("Train/Happy/a.mp4", arrays, {"label": "Happy", "split": "Train"})
    """

    STAGE = "emo-cache faces"

    def __init__(self, path, mode: str = "r", config: Optional[dict] = None,
                 code_version: str = "", log=print):
        self.path = Path(path)
        if mode not in ("r", "a"):
            raise ValueError(f"mode must be 'r' or 'a', not {mode!r}")
        if mode == "a":
            if config is None:
                raise ValueError("FacesStore(mode='a') needs the resolved config")
            self._f = open_for_append(self.path, log=log)
            self._init_or_check(config, code_version)
        else:
            self._f = open_h5(self.path, "r")
            if self._f.attrs.get("format") != FORMAT:
                raise StoreError(f"{self.path}: not a faces store (format={self._f.attrs.get('format')!r});"
                                 " build one with `emo-cache faces`")

    def _init_or_check(self, config: dict, code_version: str) -> None:
        attrs = self._f.attrs
        if "config" not in attrs:
            attrs["format"] = FORMAT
            attrs["config"] = canonical_json(config)
            attrs["code_version"] = code_version
            attrs["fingerprint"] = sha256_text(canonical_json(config))
            self._f.flush()
            return
        diffs = diff_settings(json.loads(attrs["config"]), config)
        if diffs:
            raise StoreMismatch(f"{self.path} was built with other settings:\n  " + "\n  ".join(diffs)
                                + "\nUse a new --out path, or rerun with the store's settings.")

    # -- metadata ----------------------------------------------------------------------------
    @property
    def config(self) -> dict:
        return json.loads(self._f.attrs["config"])

    @property
    def code_version(self) -> str:
        return str(self._f.attrs.get("code_version", ""))

    @property
    def fingerprint(self) -> str:
        """sha256 of the resolved config: equal fingerprints mean faces made the same way."""
        return str(self._f.attrs["fingerprint"])

    def complete_ids(self) -> list[str]:
        return sorted(key_to_id(k) for k in group_names(self._f, complete_only=True))

    def num_frames(self, clip_id: str) -> int:
        return int(self._group(clip_id)["present"].shape[0])

    # -- data --------------------------------------------------------------------------------
    def read_meta(self, clip_id: str) -> dict[str, np.ndarray]:
        """Every per-frame dataset except the pixels."""
        grp = self._group(clip_id)
        return {name: grp[name][()] for name in FRAME_DATASETS if name != "faces"}

    def read_faces(self, clip_id: str, frames: Optional[np.ndarray] = None) -> np.ndarray:
        """uint8 (F, S, S, 3) RGB chips, all frames or the given frame positions (any order)."""
        ds = self._group(clip_id)["faces"]
        if frames is None:
            return ds[()]
        return read_rows(ds, frames)

    def write_clip(self, clip_id: str, arrays: dict[str, np.ndarray], attrs: dict,
                   compression: Optional[str] = None) -> None:
        """Commit one clip whole: data first, ``complete`` last, then flush.

        An earlier, incomplete group of the same clip is replaced.
        """
        missing = set(FRAME_DATASETS) - set(arrays)
        if missing:
            raise ValueError(f"clip {clip_id}: arrays lack {sorted(missing)}")
        n = len(arrays["present"])
        grp = self._new_group(clip_id)
        for name, dtype in FRAME_DATASETS.items():
            data = np.asarray(arrays[name], dtype=dtype)
            if len(data) != n:
                raise ValueError(f"clip {clip_id}: {name} has {len(data)} rows, present has {n}")
            chunks = (1,) + data.shape[1:] if name == "faces" and n else None
            grp.create_dataset(name, data=data, chunks=chunks,
                               compression=compression if name == "faces" and n else None)
        self._commit(grp, clip_id, attrs)
