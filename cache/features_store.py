"""Features store: one HDF5 file per backbone setting, one group per clip (see README).

Layout of a clip group (same name as in the faces store):
    maps       float16 (V, F, L, D)  backbone maps; V views (0 = original, 1 = mirror), L positions;
               or uint8 (V, F, L, D) with ``map_lo``/``map_scale`` (map_dtype "uint8", below)
    map_lo     float16 (V, F, D)     uint8 stores only: per view, frame and channel, value = lo + q * scale
    map_scale  float16 (V, F, D)     uint8 stores only
    present    bool    (F,)          copy of the faces store's mask for these rows; absent frames have zero maps
    rows       int32   (F,)          which faces-store frame (position in its clip) each row holds: 0..F-1 when
                                     every frame is kept, fewer with ``--frames-per-clip``; absent in old stores
attrs: clip_id, label, split, complete (written last).
Root attrs: format, provenance (JSON), one ``prov_<key>`` attr per provenance key for h5dump,
class_names (JSON list), and ``shard`` ("K/N") in a store written by ``--shard K/N``.

A clip is written in pieces (``begin_clip`` -> ``ClipWriter.write`` ... -> ``ClipWriter.commit``), so a long
clip never sits in memory whole; the ``complete`` mark is still written last. Readers always get float16
maps: a uint8 store is dequantised in ``read_clip``.
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Iterator, Optional

import numpy as np

from emotion_attention.cache.common import (
    ClipStore,
    canonical_json,
    create_checked_dataset,
    diff_settings,
    group_names,
    is_disk_full,
    open_for_append,
    open_h5,
    read_checked,
    read_rows,
    to_attr,
    write_chunks,
)
from emotion_attention.cache.errors import StoreError, StoreMismatch, key_to_id

FORMAT = "emotion-features/1"
MAP_DTYPES = ("float16", "uint8")  # uint8: 8-bit maps with a per (view, frame, channel) offset and scale
LEVELS = 255                       # uint8 codes 0..255


def quantise(maps: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """float (V, n, L, D) -> (uint8 codes (V, n, L, D), lo float16 (V, n, D), scale float16 (V, n, D)).

    Each (view, frame, channel) gets its own range over the L positions, so a quiet channel keeps its
    resolution next to a loud one. ``dequantise(*quantise(x))`` is within scale/2 of x (plus float16 rounding
    of lo).

    >>> q, lo, s = quantise(np.array([[[[0.0], [1.0], [0.5]]]], np.float16))
    >>> q[0, 0, :, 0].tolist(), float(lo[0, 0, 0])  # 0.5 sits half-way: the scale, rounded up in float16, gives 127
    ([0, 255, 127], 0.0)
    """
    x = np.asarray(maps, dtype=np.float32)
    lo = x.min(axis=2).astype(np.float16)                               # (V, n, D)
    hi = x.max(axis=2)
    scale = ((hi - lo.astype(np.float32)) / LEVELS).astype(np.float16)  # (V, n, D)
    short = lo.astype(np.float32) + scale.astype(np.float32) * LEVELS < hi  # float16 rounded the scale down
    scale = np.where(short, np.nextafter(scale, np.float16(np.inf)), scale)
    safe = np.where(scale > 0, scale.astype(np.float32), 1.0)[:, :, None, :]
    codes = np.rint((x - lo.astype(np.float32)[:, :, None, :]) / safe)
    return np.clip(codes, 0, LEVELS).astype(np.uint8), lo, scale


def dequantise(codes: np.ndarray, lo: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """uint8 (V, n, L, D) codes with (V, n, D) lo and scale -> float16 (V, n, L, D)."""
    out = np.empty(codes.shape, np.float32)
    np.multiply(codes, scale.astype(np.float32)[:, :, None, :], out=out)
    out += lo.astype(np.float32)[:, :, None, :]
    return out.astype(np.float16)


class FeaturesStore(ClipStore):
    """Open a features store for reading (``"r"``) or resumable writing (``"a"``).

    Arguments:
        path: the ``.h5`` file.
        mode: ``"r"`` or ``"a"``.
        provenance: for ``"a"``, the settings that made the maps (backbone, layer, weights hash,
            input size, crop, normalisation, faces-store fingerprint, map_dtype, frames_per_clip, ...).
            An existing store with other provenance is refused with the differing keys named. For ``"r"``
            it is optional and, when given, checked the same way.
        class_names: recorded when the store is created.
        shard: "K/N" when this store holds shard K of N (recorded at the root, not in the provenance, so
            the shards of one run can be merged).
        take_lock: False in a writer process whose parent holds the writer lock (``ClipStore.detach``).

    >>> import tempfile
    >>> tmp = tempfile.TemporaryDirectory()
    >>> maps, present = np.ones((2, 3, 4, 5), np.float16), np.array([True, False, True])  # (V, F, L, D), (F,)
    >>> with FeaturesStore(Path(tmp.name) / "feats.h5", "a", provenance={"backbone": "vgg16"},
    ...                    class_names=["Happy", "Sad"]) as store:
    ...     store.write_clip("Train/Happy/a.mp4", maps, present, {"label": "Happy", "split": "Train"})
    >>> with FeaturesStore(Path(tmp.name) / "feats.h5") as store:
    ...     print(store.complete_ids("Train"), store.shape("Train/Happy/a.mp4"), store.class_names)
    ['Train/Happy/a.mp4'] (2, 3, 4, 5) ['Happy', 'Sad']
    >>> tmp.cleanup()
    """

    STAGE = "emo-cache extract"

    def __init__(self, path, mode: str = "r", provenance: Optional[dict] = None,
                 class_names: Optional[list[str]] = None, log=print, shard: Optional[str] = None,
                 faces_config: Optional[dict] = None, take_lock: bool = True):
        self.path = Path(path)
        if mode == "a":
            if provenance is None:
                raise ValueError("FeaturesStore(mode='a') needs the provenance dict")
            self._f = open_for_append(self.path, log=log, fmt=FORMAT, take_lock=take_lock)
            if "provenance" not in self._f.attrs:
                self._create(provenance, class_names, shard)
                if faces_config is not None:  # not provenance (the fingerprint is): lets a refusal name settings
                    self._f.attrs["faces_config"] = canonical_json(faces_config)
        elif mode == "r":
            self._f = open_h5(self.path, "r")
        else:
            raise ValueError(f"mode must be 'r' or 'a', not {mode!r}")
        if self._f.attrs.get("format") != FORMAT:
            fmt = self._f.attrs.get("format")
            self.close()
            raise StoreError(f"{self.path}: not a features store (format={fmt!r});"
                             " build one with `emo-cache extract`")
        if provenance is not None:
            try:
                self.check_provenance(provenance, faces_config=faces_config)
            except StoreMismatch:
                self.close()  # releases the writer lock at once
                raise
        stored = str(self._f.attrs.get("shard", ""))
        if mode == "a" and stored != (shard or ""):
            self.close()
            raise StoreMismatch(f"{self.path} holds {f'shard {stored}' if stored else 'all clips (no shard)'}, this"
                                f" run writes {f'shard {shard}' if shard else 'all clips'}; give each shard its own"
                                " --out")

    def _create(self, provenance: dict, class_names: Optional[list[str]], shard: Optional[str]) -> None:
        self._f.attrs["format"] = FORMAT
        self._f.attrs["provenance"] = canonical_json(provenance)
        for k, v in provenance.items():
            self._f.attrs[f"prov_{k}"] = to_attr(v)
        self._f.attrs["class_names"] = canonical_json(list(class_names or []))
        if shard:
            self._f.attrs["shard"] = shard
        self._f.flush()

    def check_provenance(self, expected: dict, want: str = "this run asks for",
                         action: str = "Features from different settings are never mixed: use a new --out path.",
                         faces_config: Optional[dict] = None) -> None:
        """Raise StoreMismatch naming every provenance key that differs from ``expected`` and ``action``, the
        fix for the command at hand. A differing faces fingerprint also names the faces settings that differ,
        when both faces configs are known (``faces_config``: the faces store this run reads)."""
        diffs = diff_settings(self.provenance, expected, want=want)
        if diffs:
            stored = self._f.attrs.get("faces_config")
            if faces_config is not None and stored is not None and \
                    self.provenance.get("faces_fingerprint") != expected.get("faces_fingerprint"):
                diffs += [f"faces store {d}" for d in diff_settings(json.loads(stored), faces_config, want=want)]
            raise StoreMismatch(f"{self.path} was made with other settings:\n  " + "\n  ".join(diffs) + "\n" + action)

    @property
    def provenance(self) -> dict:
        return json.loads(self._f.attrs["provenance"])

    @property
    def faces_config(self) -> Optional[dict]:
        """The settings of the faces store these features were made from; None in a store made before they
        were recorded (then only its fingerprint, in the provenance, is known)."""
        stored = self._f.attrs.get("faces_config")
        return None if stored is None else json.loads(stored)

    @property
    def shard(self) -> Optional[str]:
        """"K/N" in a store written by ``--shard K/N``, else None."""
        return str(self._f.attrs.get("shard", "")) or None

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

    def storage_bytes(self, clip_id: str) -> int:
        """Bytes a clip's datasets take on disk (maps, offsets and scales, mask, rows), metadata aside."""
        grp = self._group(clip_id)
        return sum(grp[name].id.get_storage_size() for name in grp)

    def source_rows(self, clip_id: str) -> np.ndarray:
        """int (F,): the faces-store frame (position in the clip) each row of the maps holds."""
        grp = self._group(clip_id)
        if "rows" in grp:
            return grp["rows"][()].astype(np.int64)
        return np.arange(grp["present"].shape[0], dtype=np.int64)  # a store from before --frames-per-clip

    def read_clip(self, clip_id: str, frames: Optional[np.ndarray] = None,
                  views: Optional[list[int]] = None) -> tuple[np.ndarray, np.ndarray]:
        """(maps float16 (V, F, L, D), present bool (F,)), optionally for chosen rows/views.

        ``frames`` are row positions (0..F-1), may repeat and come in any order; the result follows it.
        8-bit stores are dequantised here, so every reader sees float16.
        """
        grp = self._group(clip_id)
        present = read_checked(grp["present"])
        vsel = list(range(grp["maps"].shape[0])) if views is None else list(views)
        names = ("maps", "map_lo", "map_scale") if "map_scale" in grp else ("maps",)
        parts = [self._read_part(grp[name], frames, views, vsel) for name in names]
        maps = dequantise(*parts) if len(parts) == 3 else parts[0]
        if frames is None:
            return maps, present
        return maps, present[np.asarray(frames, dtype=np.int64)]

    @staticmethod
    def _read_part(ds, frames, views, vsel: list[int]) -> np.ndarray:
        if frames is None:
            return read_checked(ds) if views is None else np.stack([read_checked(ds, v) for v in vsel])
        frames = np.asarray(frames, dtype=np.int64)
        return np.stack([read_rows(ds, frames, lead=(v,)) for v in vsel])

    def iter_clips(self, split: Optional[str] = None) -> Iterator[tuple[str, np.ndarray, np.ndarray, dict]]:
        for cid in self.complete_ids(split):
            maps, present = self.read_clip(cid)
            yield cid, maps, present, self.attrs(cid)

    def begin_clip(self, clip_id: str, views: int, rows: np.ndarray, L: int, D: int,
                   compression: Optional[str] = None, map_dtype: str = "float16") -> "ClipWriter":
        """Start writing a clip in pieces; an earlier incomplete group of it is replaced. See ``ClipWriter``."""
        return ClipWriter(self, clip_id, views, rows, L, D, compression, map_dtype)

    def commit_clips(self, finished: list[tuple["ClipWriter", np.ndarray, dict]]) -> None:
        """Commit several written clips, each ``(writer, present, attrs)``, with two flushes in all (every
        clip's data and attributes, then every ``complete`` mark): a kill loses these clips, never commits
        one in part."""
        self._commit_many([writer.finish(present, attrs) for writer, present, attrs in finished])

    def write_clip(self, clip_id: str, maps: np.ndarray, present: np.ndarray, attrs: dict,
                   compression: Optional[str] = None, rows: Optional[np.ndarray] = None,
                   map_dtype: str = "float16") -> None:
        """Commit one clip whole: maps and mask first, ``complete`` last, then flush."""
        maps = np.asarray(maps, dtype=np.float16)
        present = np.asarray(present, dtype=bool)
        if maps.ndim != 4 or maps.shape[1] != len(present):
            raise ValueError(f"clip {clip_id}: maps must be (V, F, L, D) with F={len(present)},"
                             f" got {maps.shape}")
        v, f, l, d = maps.shape
        writer = self.begin_clip(clip_id, v, np.arange(f) if rows is None else rows, l, d, compression, map_dtype)
        writer.write(0, maps)
        writer.commit(present, attrs)


class ClipWriter:
    """Writes one clip's maps in pieces; ``commit`` writes the mask and attributes, then the ``complete`` mark.

    Rows never written read back as zero (the datasets' fill value), which is what absent frames hold.

    >>> w = store.begin_clip("Train/Happy/a.mp4", views=1, rows=np.arange(100), L=256, D=512)  # doctest: +SKIP
    >>> w.write(0, maps_of_rows_0_to_15); w.write(16, ...); w.commit(present, {"label": "Happy"})  # doctest: +SKIP
    """

    def __init__(self, store: FeaturesStore, clip_id: str, views: int, rows: np.ndarray, L: int, D: int,
                 compression: Optional[str], map_dtype: str):
        if map_dtype not in MAP_DTYPES:
            raise ValueError(f"map_dtype must be one of {MAP_DTYPES}, got {map_dtype!r}")
        self.store, self.clip_id, self.map_dtype = store, clip_id, map_dtype
        self.rows = np.asarray(rows, dtype=np.int32)
        f = len(self.rows)
        self.grp = store._new_group(clip_id, nbytes=views * f * L * D * np.dtype(map_dtype).itemsize)
        kw = {"chunks": (views, 1, L, D), "compression": compression} if f else {}
        self.maps = create_checked_dataset(self.grp, "maps", shape=(views, f, L, D), dtype=np.dtype(map_dtype),
                                           fillvalue=0, **kw)
        # float16 maps, one fletcher32-summed chunk per frame: written whole from the caller's rows (write_faces)
        self.direct = f > 0 and compression is None and map_dtype == "float16"
        self.shape = (views, L, D)
        if map_dtype == "uint8":
            skw = {"chunks": (views, min(f, 256), D)} if f else {}
            self.lo = create_checked_dataset(self.grp, "map_lo", shape=(views, f, D), dtype=np.float16, fillvalue=0,
                                             **skw)
            self.scale = create_checked_dataset(self.grp, "map_scale", shape=(views, f, D), dtype=np.float16,
                                                fillvalue=0, **skw)

    def write(self, start: int, maps: np.ndarray) -> None:
        """Write float (V, n, L, D) maps into rows start..start+n-1."""
        n = maps.shape[1]
        if start < 0 or start + n > self.maps.shape[1]:
            raise ValueError(f"clip {self.clip_id}: rows {start}..{start + n} outside 0..{self.maps.shape[1]}")
        if n == 0:
            return
        if self.map_dtype == "uint8":
            codes, lo, scale = quantise(maps)
            self.maps[:, start:start + n] = codes
            self.lo[:, start:start + n] = lo
            self.scale[:, start:start + n] = scale
        else:
            self.maps[:, start:start + n] = np.asarray(maps, dtype=np.float16)

    def write_rows(self, positions: np.ndarray, maps: np.ndarray) -> None:
        """Write (V, n, L, D) maps at increasing row positions, one slice per consecutive run."""
        positions = np.asarray(positions, dtype=np.int64)
        if len(positions) == 0:
            return
        breaks = np.flatnonzero(np.diff(positions) != 1) + 1
        for lo, hi in zip(np.r_[0, breaks], np.r_[breaks, len(positions)]):
            self.write(int(positions[lo]), maps[:, lo:hi])

    def write_faces(self, positions: np.ndarray, rows: np.ndarray, timed=None) -> None:
        """Write the maps of frames at increasing row ``positions`` from ``rows``: uint8 (n, V*L*D*2 + 4), each
        row one frame's float16 (V, L, D) maps then 4 spare bytes (``pipeline.models.extractor.MapsBuffer``).

        A float16 store without compression gets each frame's chunk written whole from its row, the spare bytes
        taking its fletcher32 sum: the bytes HDF5's filter would write, without its copies. Other stores
        (uint8 maps, lzf) go through ``write_rows``.
        ``timed(phase, seconds)``, when given, receives the thread CPU seconds of the "checksum" and
        "write" work.
        """
        positions = np.asarray(positions, dtype=np.int64)
        if len(positions) and (positions[0] < 0 or positions[-1] >= self.maps.shape[1]):
            raise ValueError(f"clip {self.clip_id}: rows {positions[0]}..{positions[-1]} outside"
                             f" 0..{self.maps.shape[1]}")
        if self.direct:
            write_chunks(self.maps, positions, rows, timed)
            return
        t = time.thread_time()
        maps = rows[:, :-4].view(np.float16).reshape((len(rows),) + self.shape)  # (n, V, L, D)
        self.write_rows(positions, maps.transpose(1, 0, 2, 3))                    # (V, n, L, D)
        if timed:
            timed("write", time.thread_time() - t)

    def commit(self, present: np.ndarray, attrs: dict) -> None:
        """Mask, source rows and attributes, flushed; then the ``complete`` mark, flushed."""
        self.store._commit(*self.finish(present, attrs))

    def finish(self, present: np.ndarray, attrs: dict) -> tuple:
        """Write the mask and source rows; returns what ``ClipStore._commit_many`` takes, so that several
        finished clips are committed with two flushes in all (``commit_clips``)."""
        present = np.asarray(present, dtype=bool)
        if len(present) != len(self.rows):
            raise ValueError(f"clip {self.clip_id}: present has {len(present)} rows, maps {len(self.rows)}")
        create_checked_dataset(self.grp, "present", data=present)
        create_checked_dataset(self.grp, "rows", data=self.rows)
        return self.grp, self.clip_id, attrs


def apply_writes(store: FeaturesStore, open_clips: dict, ops: list, rows: Optional[np.ndarray], remaining: int = 0,
                 timed=None) -> list[str]:
    """Apply one batch's store operations in order; returns the ids of the clips they committed.

    The operations (``pipeline.stages.extract.Writer.plan`` makes them; a writer process gets them pickled):
        ("begin", clip_id, views, rows, L, D, compression, map_dtype)  a new clip group (``begin_clip``)
        ("faces", clip_id, positions, first, n)  rows ``first .. first + n - 1`` of ``rows`` (``write_faces``)
        ("commit", [(clip_id, present, attrs), ...])  those clips committed, two flushes in all
    ``open_clips`` maps the clip ids begun and not yet committed to their ClipWriter. A full disk is StoreFull
    naming the clip and about ``remaining`` bytes still to write. ``timed(phase, seconds)`` gets the thread CPU
    seconds of the "checksum" and "write" work.
    """
    committed, clip_id = [], None
    try:
        for op in ops:
            t = time.thread_time()
            if op[0] == "begin":
                clip_id = op[1]
                open_clips[clip_id] = store.begin_clip(*op[1:])
            elif op[0] == "faces":
                _, clip_id, positions, first, n = op
                open_clips[clip_id].write_faces(positions, rows[first:first + n], timed=timed)
                continue  # write_faces times its own phases
            else:
                clip_id = op[1][0][0]
                store.commit_clips([(open_clips.pop(cid), present, attrs) for cid, present, attrs in op[1]])
                committed += [cid for cid, _, _ in op[1]]
            if timed:
                timed("write", time.thread_time() - t)
    except OSError as exc:
        if is_disk_full(exc):
            raise store.disk_full(exc, f"clip {clip_id!r}", remaining) from None
        raise
    return committed
