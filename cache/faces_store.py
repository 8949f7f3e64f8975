"""Faces store: one HDF5 file per dataset, one group per clip (see README, "Faces store").

Layout of a clip group (name = ``clip_key(clip_id)``):
    faces         uint8   (F, S, S, 3)  RGB aligned chips, one chunk per frame (codec "raw");
                  or vlen uint8 (F,)    one PNG/JPEG image per frame (codec "png"/"jpeg", cache/codecs.py)
    frame_index   int32   (F,)          index of the frame in the decoded video
    timestamp_ms  float32 (F,)
    present       bool    (F,)          False: no face in that frame (the row is kept)
    box           float32 (F, 4)        x0, y0, x1, y1 in source pixels (NaN when missing)
    landmarks     float32 (F, 68, 2)    in source pixels (NaN when missing)
    score         float32 (F,)          detector score (NaN when not detected)
    how           uint8   (F,)          codes in ``HOW``
attrs: clip_id, label, split, source, fps, total_frames, complete (written last).
Root attrs: format, config (JSON of the resolved config; ``codec``/``jpeg_quality`` when not raw),
code_version, fingerprint, and ``shard`` ("K/N") in a store written by ``--shard K/N``.

A clip is written in pieces (``begin_clip`` -> ``FacesClipWriter.append`` ... -> ``commit``), so a long
clip never sits in memory whole; the ``complete`` mark is still written last. Fixed-size datasets carry
fletcher32 checksums; HDF5 allows no filter on variable-length data, so encoded chips rely on the
image format's own checks (PNG's CRCs, JPEG's markers) and a chip that does not decode is reported as damage.
"""
from __future__ import annotations

import json
import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Optional

import h5py
import numpy as np

from emotion_attention.cache.codecs import Codec, codec_of_config
from emotion_attention.cache.common import (
    CRC_DATASET,
    ClipStore,
    canonical_json,
    check_crc32,
    crc32_rows,
    create_checked_dataset,
    create_dataset,
    damaged,
    diff_settings,
    group_names,
    is_disk_full,
    open_for_append,
    open_h5,
    read_checked,
    read_rows,
    sha256_text,
)
from emotion_attention.cache.errors import StoreDamaged, StoreError, StoreMismatch, key_to_id

FORMAT = "emotion-faces/1"
Timed = Callable[[str, float], None]  # receives (phase, thread CPU seconds) from the read path


FRAME_DATASETS = {
    "faces": np.uint8, "frame_index": np.int32, "timestamp_ms": np.float32, "present": np.bool_,
    "box": np.float32, "landmarks": np.float32, "score": np.float32, "how": np.uint8,
}
ENCODED_FACES = "encoded_faces"  # optional key of written arrays: the chips already encoded with the store's codec
ROW_SHAPES = {"box": (4,), "landmarks": (68, 2)}  # per-frame shape of the meta datasets (others scalar)
META_CHUNK = 256      # rows per chunk of the meta datasets (a few KiB each)
ENCODED_CHUNK = 64    # rows per chunk of an encoded faces dataset (pointers into HDF5's heap)


class FacesStore(ClipStore):
    """Open a faces store for reading (``mode="r"``) or resumable writing (``mode="a"``).

    Arguments:
        path: the ``.h5`` file.
        mode: ``"r"`` or ``"a"``. ``"a"`` creates the file, or checks that an existing one was
            built with the same ``config`` (codec included: a store never mixes codecs).
        config: the resolved preprocessing config (a JSON-able dict); required for ``"a"``.
        code_version: recorded at the root when the store is created.
        shard: "K/N" when this store holds shard K of N (a root attribute, not part of the config, so
            the shards of one run can be merged by ``emo-cache merge``).

    >>> import tempfile
    >>> tmp = tempfile.TemporaryDirectory()
    >>> arrays = {name: np.zeros((2,) + ((8, 8, 3) if name == "faces" else ROW_SHAPES.get(name, ())), dtype)
    ...           for name, dtype in FRAME_DATASETS.items()}  # two 8 px frames
    >>> with FacesStore(Path(tmp.name) / "faces.h5", "a", config={"size": 8}, code_version="0.1.0") as store:
    ...     store.write_clip("Train/Happy/a.mp4", arrays, {"label": "Happy", "split": "Train"})
    >>> with FacesStore(Path(tmp.name) / "faces.h5") as store:
    ...     print(store.complete_ids(), store.read_faces("Train/Happy/a.mp4").shape)
    ['Train/Happy/a.mp4'] (2, 8, 8, 3)
    >>> tmp.cleanup()
    """

    STAGE = "emo-cache faces"

    def __init__(self, path, mode: str = "r", config: Optional[dict] = None,
                 code_version: str = "", log=print, shard: Optional[str] = None):
        self.path = Path(path)
        if mode not in ("r", "a"):
            raise ValueError(f"mode must be 'r' or 'a', not {mode!r}")
        if mode == "a":
            if config is None:
                raise ValueError("FacesStore(mode='a') needs the resolved config")
            self._f = open_for_append(self.path, log=log, fmt=FORMAT)
            try:
                self._init_or_check(config, code_version, shard)
            except BaseException:
                self.close()
                raise
        else:
            self._f = open_h5(self.path, "r")
            if self._f.attrs.get("format") != FORMAT:
                fmt = self._f.attrs.get("format")
                self.close()
                raise StoreError(f"{self.path}: not a faces store (format={fmt!r}); build one with `emo-cache faces`")
        config = self.config  # fixed from here on: parsed once (it was parsed for every clip written, issue 15)
        self.codec = codec_of_config(config)
        size = config.get("face", {}).get("size", config.get("size", 256))
        self._chip_shape = (size, size, 3)

    def _init_or_check(self, config: dict, code_version: str, shard: Optional[str]) -> None:
        attrs = self._f.attrs
        if "config" not in attrs:
            attrs["format"] = FORMAT
            attrs["config"] = canonical_json(config)
            attrs["code_version"] = code_version
            attrs["fingerprint"] = sha256_text(canonical_json(config))
            if shard:
                attrs["shard"] = shard
            self._f.flush()
            return
        diffs = diff_settings(json.loads(attrs["config"]), config)
        if diffs:
            raise StoreMismatch(f"{self.path} was built with other settings:\n  " + "\n  ".join(diffs)
                                + "\nUse a new --out path, or rerun with the store's settings.")
        have = str(attrs.get("shard", ""))
        if have != (shard or ""):
            raise StoreMismatch(f"{self.path} holds {('shard ' + have) if have else 'the whole dataset'}, this run"
                                f" writes {('shard ' + shard) if shard else 'the whole dataset'}; use another --out")

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
        return {name: read_checked(grp[name]) for name in FRAME_DATASETS if name != "faces"}

    def read_faces(self, clip_id: str, frames: Optional[np.ndarray] = None) -> np.ndarray:
        """uint8 (F, S, S, 3) RGB chips, all frames or the given frame positions (any order, repeats
        allowed), decoded from the store's codec."""
        ds = self._group(clip_id)["faces"]
        if ds.dtype == np.uint8:  # raw chips (also every store written before codecs existed)
            return read_checked(ds) if frames is None else read_rows(ds, frames)
        frames = np.arange(ds.shape[0]) if frames is None else np.asarray(frames, dtype=np.int64)
        unique = np.unique(frames)
        if len(unique) == 0:
            return np.zeros((0,) + self.chip_shape(), np.uint8)
        rows = self._encoded_rows(ds, clip_id, unique)
        try:
            chips = np.stack(decode_rows(self.codec, rows))              # (U, S, S, 3)
        except ValueError as exc:
            raise self.undecodable(clip_id, exc) from None
        return chips[np.searchsorted(unique, frames)]

    def read_chips(self, clip_id: str, frames: np.ndarray, timed: Optional[Timed] = None) -> list[np.ndarray] | np.ndarray:
        """The stored form of the given frame positions (increasing, no repeats), not decoded: for an encoded
        store a list of uint8 rows, each checked against its crc32 (for a decoder elsewhere: a thread pool, the
        GPU); for a raw store the uint8 (n, S, S, 3) chips. See ``open_chips`` to read one clip in pieces."""
        return self.open_chips(clip_id).read(frames, timed)

    def open_chips(self, clip_id: str) -> "ChipReader":
        """A clip's chips opened once for reading in pieces (``ChipReader.read``); opens only the data sets it
        reads, so a reader of many short clips pays little per clip."""
        grp = self._complete_group(clip_id)
        try:
            ds = grp["faces"]
            crc = grp[CRC_DATASET] if ds.dtype != np.uint8 and CRC_DATASET in grp else None
        except (OSError, RuntimeError, KeyError) as exc:
            raise damaged(self.path, f"its data sets cannot be opened: {exc}", clip_id) from None
        return ChipReader(self, clip_id, ds, crc)

    def _encoded_rows(self, ds: h5py.Dataset, clip_id: str, unique: np.ndarray, timed: Optional[Timed] = None,
                      t: float = 0.0, crc: Optional[h5py.Dataset] = None) -> list[np.ndarray]:
        """crc32-checked encoded rows at increasing positions: one read of the span when it is dense. ``crc``:
        the clip's crc32 data set, when the caller opened it already."""
        if len(unique) == 0:
            return []
        lo, hi = int(unique[0]), int(unique[-1]) + 1
        if hi - lo <= 8 * len(unique):  # one read of the span, as read_rows does
            rows = read_checked(ds, slice(lo, hi))
            rows = list(rows) if hi - lo == len(unique) else list(rows[unique - lo])
        else:
            rows = [read_checked(ds, int(i)) for i in unique]
        if crc is None and CRC_DATASET in ds.parent:
            crc = ds.parent[CRC_DATASET]
        stored = read_checked(crc, slice(lo, hi))[unique - lo] if crc is not None else None  # none in old stores
        if timed:
            t2 = time.thread_time()
            timed("read", t2 - t)
        if stored is not None:
            check_crc32(rows, stored, unique, self.path, clip_id)
        if timed:
            timed("checksum", time.thread_time() - t2)
        return rows

    def undecodable(self, clip_id: str, exc: Exception) -> StoreDamaged:
        """The StoreDamaged error of a chip whose bytes pass their crc32 but do not decode."""
        return damaged(self.path, f"a face chip does not decode ({exc})", clip_id)

    def chip_shape(self) -> tuple:
        """(S, S, 3) of the store's chips, from its config."""
        return self._chip_shape

    # -- writing ---------------------------------------------------------------------------------
    def begin_clip(self, clip_id: str, size: int, compression: Optional[str] = None) -> "FacesClipWriter":
        """Start writing a clip in pieces (an earlier incomplete group of it is replaced); see FacesClipWriter."""
        return FacesClipWriter(self, clip_id, size, compression)

    def write_clip(self, clip_id: str, arrays: dict[str, np.ndarray], attrs: dict,
                   compression: Optional[str] = None) -> None:
        """Commit one clip whole: data first, ``complete`` last, then flush.

        An earlier, incomplete group of the same clip is replaced.
        """
        self.write_clips([(clip_id, arrays, attrs)], compression)

    def write_clips(self, clips: list[tuple[str, dict, dict]], compression: Optional[str] = None) -> None:
        """Commit several clips, each ``(clip_id, arrays, attrs)`` whole, with two flushes in all (data and
        attributes of every clip, then every ``complete`` mark): what a short clip costs is mostly its flushes.
        A kill loses these clips, never commits one in part; earlier incomplete groups are replaced."""
        with self.space_for(clips[0][0] if clips else "", sum(arrays_nbytes(a) for _c, a, _t in clips)):
            self._write_clips(clips, compression)

    def _write_clips(self, clips: list[tuple[str, dict, dict]], compression: Optional[str]) -> None:
        writers = []
        for clip_id, arrays, attrs in clips:
            missing = set(FRAME_DATASETS) - set(arrays)
            if missing:
                raise ValueError(f"clip {clip_id}: arrays lack {sorted(missing)}")
            faces = np.asarray(arrays["faces"])
            size = faces.shape[1] if faces.ndim == 4 else self.chip_shape()[0]
            writer = FacesClipWriter(self, clip_id, size, compression, whole=True)
            writer.append(arrays)
            writers.append((writer, attrs))
        try:
            for writer, _attrs in writers:
                writer.ensure_datasets()
            self._commit_many([(w.grp, w.clip_id, attrs) for w, attrs in writers])
        except OSError as exc:
            writers[-1][0]._raise(exc)


class ChipReader:
    """One clip's stored chips, opened once: ``read(frames)`` gives the bytes (encoded store, crc32-checked) or
    the uint8 chips (raw store) of increasing frame positions; ``timed(phase, seconds)``, when given, receives
    the thread CPU seconds of the "read" and the "checksum" work."""

    def __init__(self, store: FacesStore, clip_id: str, ds: h5py.Dataset, crc: Optional[h5py.Dataset]):
        self.store, self.clip_id, self.ds, self.crc = store, clip_id, ds, crc
        self.raw = ds.dtype == np.uint8  # raw chips (also every store written before codecs existed)

    def read(self, frames: np.ndarray, timed: Optional[Timed] = None) -> list[np.ndarray] | np.ndarray:
        t = time.thread_time() if timed else 0.0
        frames = np.asarray(frames, dtype=np.int64)
        if self.raw:
            chips = read_rows(self.ds, frames)
            if timed:
                timed("read", time.thread_time() - t)
            return chips
        return self.store._encoded_rows(self.ds, self.clip_id, frames, timed, t, self.crc)


class FacesClipWriter:
    """Writes one clip's rows in pieces; ``commit`` writes the attributes, then the ``complete`` mark.

    The datasets grow with each ``append``; until ``commit`` the group has no ``complete`` mark, so a kill
    leaves a clip that readers do not see and a rerun redoes.

    >>> w = store.begin_clip("Train/Happy/a.mp4", size=256)  # doctest: +SKIP
    >>> w.append(rows_0_to_63); w.append(rows_64_to_127); w.commit({"label": "Happy"})  # doctest: +SKIP
    """

    def __init__(self, store: FacesStore, clip_id: str, size: int, compression: Optional[str] = None,
                 whole: bool = False):
        self.store, self.clip_id, self.rows = store, clip_id, 0
        self.whole = whole  # written in one append: chunks no longer than the clip (a 3-frame clip's landmarks
        #   took a 139 KB chunk of 256 rows; 16,000 such clips: 3.7 GB -> 1.6 GB, issue 15)
        self.codec: Codec = store.codec
        self.size, self.compression = size, compression
        self.datasets: dict[str, h5py.h5d.DatasetID] = {}  # created by the first append, at its row count: a clip
        #   written in one piece (most clips) pays one creation per data set and no resize (issue 15's per-clip cost)
        try:
            self.grp = store._new_group(clip_id)
        except OSError as exc:
            self._raise(exc)

    def _chunk(self, rows: int, most: int) -> int:
        """Rows per chunk: ``most``, or the clip's row count when it is written whole and shorter."""
        return min(most, rows) if self.whole and rows else most

    def _create(self, name: str, dtype, rows: int) -> h5py.h5d.DatasetID:
        if name == "faces" and self.codec.encoded:
            return create_dataset(self.grp, name, shape=(rows,), maxshape=(None,), wrap=False,
                                  chunks=(self._chunk(rows, ENCODED_CHUNK),), dtype=h5py.vlen_dtype(np.uint8))
        row = (self.size, self.size, 3) if name == "faces" else ROW_SHAPES.get(name, ())
        chunks = (1,) + row if name == "faces" else (self._chunk(rows, META_CHUNK),) + row
        return create_dataset(self.grp, name, shape=(rows,) + row, maxshape=(None,) + row, chunks=chunks,
                              dtype=dtype, fletcher32=True, compression=self.compression if name == "faces" else None,
                              wrap=False)

    def _create_all(self, rows: int) -> None:
        for name, dtype in FRAME_DATASETS.items():
            self.datasets[name] = self._create(name, dtype, rows)
        if self.codec.encoded:  # vlen data has no fletcher32: each chip's crc32 instead
            self.datasets[CRC_DATASET] = create_checked_dataset(
                self.grp, CRC_DATASET, shape=(rows,), maxshape=(None,), chunks=(self._chunk(rows, META_CHUNK),),
                dtype=np.uint32, wrap=False)

    def append(self, arrays: dict[str, np.ndarray]) -> None:
        """Append rows: every FRAME_DATASETS key, with equal row counts; ``faces`` as uint8 (n, S, S, 3), and
        optionally ``encoded_faces`` (object (n,) of uint8 rows in the store's codec) to store those bytes."""
        n = len(arrays["present"])
        for name in FRAME_DATASETS:
            if len(arrays[name]) != n:
                raise ValueError(f"clip {self.clip_id}: {name} has {len(arrays[name])} rows, present has {n}")
        if n == 0:
            return
        if self.codec.encoded:  # chips encoded by the caller (process_clip, for a lossy codec) are kept as they are
            faces = arrays[ENCODED_FACES] if ENCODED_FACES in arrays else self.codec.encode_many(arrays["faces"])
        else:
            faces = arrays["faces"]
        self.store.ensure_space(self.clip_id, arrays_nbytes(arrays))  # before HDF5 writes
        try:
            whole = not self.datasets  # created below at these rows: the rows are each data set whole
            if whole:
                self._create_all(n)
            else:
                for dsid in self.datasets.values():
                    dsid.set_extent((self.rows + n,) + tuple(dsid.shape[1:]))
            for name, dtype in FRAME_DATASETS.items():
                dsid = self.datasets[name]
                if name == "faces" and self.codec.encoded:
                    write_vlen_rows(dsid, self.rows, faces, whole)
                else:
                    write_rows(dsid, self.rows, faces if name == "faces" else arrays[name], dtype, whole)
            if self.codec.encoded:
                write_rows(self.datasets[CRC_DATASET], self.rows, crc32_rows(faces), np.uint32, whole)
        except OSError as exc:
            self._raise(exc)
        self.rows += n

    def discard(self) -> None:
        """Drop the unfinished clip (its data never becomes visible); a rerun redoes it."""
        try:
            del self.store._f[self.grp.name]
        except (OSError, KeyError, RuntimeError):
            pass  # nothing to drop, or the file is failing: the group has no complete mark either way

    def ensure_datasets(self) -> None:
        """A clip of no rows still has every data set, empty."""
        if not self.datasets:
            self._create_all(0)

    def commit(self, attrs: dict) -> None:
        """Attributes, flushed; then the ``complete`` mark, flushed."""
        try:
            self.ensure_datasets()
            self.store._commit(self.grp, self.clip_id, attrs)
        except OSError as exc:
            self._raise(exc)

    def _raise(self, exc: OSError):
        if is_disk_full(exc):
            raise self.store.disk_full(exc, f"clip {self.clip_id!r}") from None
        raise exc


_DECODE_POOL: dict = {}  # pid -> thread pool, made on first use (a forked child makes its own)


def decode_rows(codec: Codec, rows) -> list[np.ndarray]:
    """Decode encoded chips, on a few threads for many rows (OpenCV releases the GIL while decoding), so a
    GPU extraction is not held up by JPEG decoding on one core (2 threads: 1.05 -> 0.52 ms per chip)."""
    if len(rows) < 16:
        return [codec.decode(r) for r in rows]
    pool = _DECODE_POOL.get(os.getpid())
    if pool is None:  # keyed by pid: a pool inherited through fork has no threads and would hang
        pool = _DECODE_POOL[os.getpid()] = ThreadPoolExecutor(max(1, min(4, len(os.sched_getaffinity(0)))),
                                                              thread_name_prefix="faces-decode")
    return list(pool.map(codec.decode, rows, chunksize=8))


def arrays_nbytes(arrays: dict) -> int:
    """Bytes a clip's arrays put on disk, what its free-space check asks for: encoded chips counted by their
    length, not their pointers, and once (``encoded_faces`` is the same rows as ``faces``)."""
    total = 0
    for name, value in arrays.items():
        if name == ENCODED_FACES and "faces" in arrays:
            continue
        value = np.asarray(value)
        total += sum(len(row) for row in value) if value.dtype == object else value.nbytes
    return total


def write_rows(dsid: h5py.h5d.DatasetID, start: int, rows: np.ndarray, dtype, whole: bool = False) -> None:
    """Write rows of ``dtype`` at ``start`` through the low-level call: the same bytes as ``ds[a:b] = rows``
    without h5py's selection machinery, which cost more than the write for the few rows of a short clip.
    ``whole``: the rows are the whole data set (a clip written in one piece)."""
    rows = np.ascontiguousarray(rows, dtype=dtype)
    if whole:
        dsid.write(h5py.h5s.ALL, h5py.h5s.ALL, rows)
        return
    space = dsid.get_space()
    space.select_hyperslab((start,) + (0,) * (rows.ndim - 1), rows.shape)
    dsid.write(h5py.h5s.create_simple(rows.shape), space, rows)


def write_vlen_rows(dsid: h5py.h5d.DatasetID, start: int, rows: np.ndarray, whole: bool = False) -> None:
    """Write an object array of uint8 rows at ``start``. Through the low-level call because h5py's
    slice assignment turns rows of equal length (e.g. identical blank chips) into a 2-D array and fails."""
    if whole:
        dsid.write(h5py.h5s.ALL, h5py.h5s.ALL, rows)
        return
    space = dsid.get_space()
    space.select_hyperslab((start,), (len(rows),))
    dsid.write(h5py.h5s.create_simple((len(rows),)), space, rows)
