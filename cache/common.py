"""Shared HDF5 plumbing: the writer lock, opening with precise errors, checked reads, salvage, settings diffs.

Rules every store follows (README, "Stores: safety"):
* One writer per store, on any file system: ``open_for_append`` takes a lock file of our own beside the store
  (``STORE.lock``, holding the writer's pid and host; a dead process's lock on the same host is broken on
  the next open). HDF5's own file lock stays on where the file system has it; readers take no lock of ours.
* Nothing is replaced or truncated in place. An --out that is another kind of store, not HDF5, or in a
  folder we cannot write is refused before anything is written. A damaged store is refused with the exact
  ``emo-cache salvage STORE`` command; writers never salvage on their own (no silent renames).
* Data sets are created with HDF5's fletcher32 chunk checksums; a failed checksum, unreadable metadata or a
  non-finite map on read is ``StoreDamaged`` naming the store, the clip and the salvage command.
"""
from __future__ import annotations

import ctypes
import errno
import hashlib
import json
import os
import shlex
import shutil
import socket
import time
import zlib
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence

import h5py
import numpy as np
from filelock import SoftFileLock, Timeout
from h5py import h5

from emotion_attention.cache.errors import (
    StoreDamaged,
    StoreError,
    StoreFull,
    StoreLocked,
    StoreMismatch,
    clip_key,
    key_to_id,
)

# Root ``format`` attribute of each kind of store, and what a user calls it.
STORE_KINDS = {"emotion-faces/1": ("faces store", "emo-cache faces"),
               "emotion-features/1": ("features store", "emo-cache extract")}
LOCK_SUFFIX = ".lock"
FREE_RESERVE = 4 << 20  # bytes of disk kept free for HDF5's metadata: a writer stops cleanly before the disk fills


def free_bytes(path: Path) -> int:
    """Free bytes on the file system that holds ``path`` (or would hold it)."""
    folder = Path(path).parent
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    return shutil.disk_usage(folder).free


def canonical_json(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)


def sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


# -- settings diffs -----------------------------------------------------------------------------------

def flatten_settings(settings: dict, prefix: str = "") -> dict:
    """Nested dicts -> one level with dotted keys, so a diff names the exact setting.

    >>> flatten_settings({"detect": {"width": 320, "mode": "fast"}, "size": 256})
    {'detect.width': 320, 'detect.mode': 'fast', 'size': 256}
    """
    flat = {}
    for key, value in settings.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            flat.update(flatten_settings(value, name + "."))
        else:
            flat[name] = value
    return flat


SAME_CLIP_ATTRS = ("total_frames", "fps")  # a clip's source video as the faces and features stores record it


def same_clip_diffs(want: dict, have: dict, have_name: str = "this store's") -> list[str]:
    """How two stores' records of one clip id show two different source videos: the file name (not its folder:
    datasets move), the frame count or the rate, each named with both values; [] when they agree.

    >>> same_clip_diffs({"source": "/a/x.mp4", "fps": 25.0}, {"source": "/b/y.mp4", "fps": 30.0})
    ["source: the features' clip has '/a/x.mp4', this store's has '/b/y.mp4'", "fps: the features' clip has 25.0, this store's has 30.0"]
    """
    diffs = [f"{key}: the features' clip has {want.get(key)!r}, {have_name} has {have.get(key)!r}"
             for key in SAME_CLIP_ATTRS if key in want and key in have and want[key] != have[key]]
    if Path(str(want.get("source", ""))).name != Path(str(have.get("source", ""))).name:
        diffs.insert(0, f"source: the features' clip has {want.get('source')!r}, {have_name} has"
                        f" {have.get('source')!r}")
    return diffs


def diff_settings(stored: dict, wanted: dict, have: str = "store has", want: str = "this run asks for") -> list[str]:
    """One line per setting (dotted key for nested dicts) whose value differs between two settings dicts.

    >>> diff_settings({"max_frames": 60, "fps": {"cap": 5}}, {"max_frames": None, "fps": {"cap": 5}})
    ['max_frames: store has 60, this run asks for None']
    """
    a_flat, b_flat = flatten_settings(stored), flatten_settings(wanted)
    lines = []
    for key in sorted(set(a_flat) | set(b_flat)):
        a, b = a_flat.get(key, "<absent>"), b_flat.get(key, "<absent>")
        if canonical_json(a) != canonical_json(b):
            lines.append(f"{key}: {have} {a!r}, {want} {b!r}")
    return lines


def to_attr(value: Any) -> Any:
    """HDF5 attributes hold scalars and strings; everything else is stored as JSON text."""
    if isinstance(value, (bool, int, float, str, np.integer, np.floating, np.bool_)):
        return value
    return canonical_json(value)


# -- error classification -----------------------------------------------------------------------------

def is_lock_error(exc: BaseException) -> bool:
    """True when h5py/the OS refused an open because another process holds the file's lock.

    HDF5 reports it as ``unable to lock file, errno = 11`` (EAGAIN, a BlockingIOError) or errno 13 on some
    file systems; a damaged superblock mentions "sblock", which is not a lock.
    """
    if isinstance(exc, BlockingIOError):
        return True
    return "unable to lock file" in str(exc).lower()


def is_disk_full(exc: BaseException) -> bool:
    """True when an OSError from h5py or the OS means the disk (or a quota) is full."""
    text = str(exc)
    return getattr(exc, "errno", None) in (errno.ENOSPC, errno.EDQUOT) or "errno = 28" in text \
        or "No space left" in text or "errno = 122" in text or "Disk quota exceeded" in text


def salvage_command(path: Path) -> str:
    return f"emo-cache salvage {shlex.quote(str(path))}"


def damaged(path: Path, what: str, clip_id: Optional[str] = None) -> StoreDamaged:
    """The one StoreDamaged message: the store, the clip (if known), what failed, and the salvage command."""
    where = f"{path}: clip {clip_id!r}" if clip_id is not None else str(path)
    return StoreDamaged(f"{where}: the store is damaged ({what}). Nothing was changed. Run `{salvage_command(path)}`"
                        " to copy its readable complete clips into a fresh file (the damaged one is kept beside"
                        " it), then rerun the stage that builds it to redo the rest.")


def _store_name(fmt: Optional[str]) -> str:
    return STORE_KINDS.get(fmt, (f"an HDF5 file of format {fmt!r}",))[0]


# -- the writer lock ---------------------------------------------------------------------------------

def lock_path(path: Path) -> Path:
    """``faces.h5`` -> ``faces.h5.lock``: the writer lock beside the store."""
    return Path(str(path) + LOCK_SUFFIX)


def lock_holder(path: Path) -> tuple[str, str]:
    """(host, pid) recorded in a store's writer lock, ``("?", "?")`` when unreadable."""
    try:
        lines = lock_path(path).read_text().splitlines()
    except (OSError, UnicodeDecodeError):
        return "?", "?"
    pid = lines[0].strip() if lines else "?"
    host = lines[1].strip() if len(lines) > 1 else "?"
    return host or "?", pid or "?"


def acquire_writer_lock(path: Path) -> SoftFileLock:
    """Take ``STORE.lock`` or raise StoreLocked naming the holder's host and pid.

    filelock's SoftFileLock writes this process's pid and host into the file and, on the same host, breaks a
    lock whose process is gone, so a killed run never blocks the next one. It needs no ``flock``, so it also
    guards stores on NFS/Lustre, where ``HDF5_USE_FILE_LOCKING=FALSE`` turns HDF5's own lock off.
    """
    lock = SoftFileLock(str(lock_path(path)), timeout=0)
    try:
        lock.acquire()
    except Timeout:
        host, pid = lock_holder(path)
        here = socket.gethostname()
        tail = (" If that process is gone (it ran on another host, so its lock cannot be checked from here),"
                f" delete {lock_path(path)} and rerun." if host not in (here, "?") else
                " Wait for it to finish, or stop it and rerun.")
        raise StoreLocked(f"{path}: another process (pid {pid} on host {host}) is writing this store"
                          f" (lock file {lock_path(path)}).{tail}") from None
    except PermissionError as exc:
        raise StoreError(f"{Path(path).parent}: folder not writable ({exc.strerror}); choose another --out"
                         " or fix the folder's permissions") from None
    return lock


class _LockedFile(h5py.File):
    """An h5py file opened for writing that releases the store's writer lock when closed."""
    _writer_lock: Optional[SoftFileLock] = None

    def close(self) -> None:
        try:
            super().close()
        finally:
            lock, self._writer_lock = self._writer_lock, None
            if lock is not None:
                lock.release()


# -- opening ---------------------------------------------------------------------------------------

def _open_error(path: Path, exc: OSError, mode: str) -> StoreError:
    """Turn h5py's refusal to open ``path`` into the precise StoreError subclass and advice."""
    text = str(exc)
    if is_lock_error(exc) and ("errno = 37" in text or "errno = 38" in text):
        return StoreError(f"{path}: this file system does not support HDF5's file locks ({text}); set"
                          " HDF5_USE_FILE_LOCKING=FALSE (the store's own .lock file still keeps one writer)")
    if is_lock_error(exc):
        host, pid = lock_holder(path) if lock_path(path).exists() else ("?", "?")
        who = f"pid {pid} on host {host} (its writer)" if pid != "?" else "another process (a reader or a writer)"
        return StoreLocked(f"{path}: {who} has this store open (HDF5 file lock); wait for it to finish, or stop"
                           " it and rerun")
    if isinstance(exc, PermissionError) or "errno = 13" in text or "errno = 30" in text \
            or "Permission denied" in text or "Read-only file system" in text:
        return StoreError(f"{path}: not {'writable' if mode != 'r' else 'readable'} ({text}); check its"
                          " permissions, or choose another --out")
    if is_disk_full(exc):
        return StoreFull(f"{path}: the disk is full ({text}); free space and rerun")
    if path.exists() and not h5py.is_hdf5(path):
        return StoreError(f"{path}: not an HDF5 file; refusing to touch it. Move it away or choose another path.")
    return damaged(path, f"cannot be opened: {text}")


def open_h5(path: Path, mode: str) -> h5py.File:
    """Open ``path`` with h5py (no writer lock; writers use ``open_for_append``); errors say what to do."""
    path = Path(path)
    if mode == "r" and not path.exists():
        raise StoreError(f"{path}: no such store; build it first (see `emo-cache --help`)")
    if mode == "r" and path.is_dir():
        raise StoreError(f"{path}: is a folder, not a store file")
    try:
        return h5py.File(path, mode)
    except OSError as exc:
        raise _open_error(path, exc, mode) from None


def check_writable_target(path: Path) -> None:
    """Refuse, before anything is written, an output path we must not or cannot write.

    A folder, a folder we cannot write into, or an existing file that is not HDF5 (an empty file is
    treated as new: it holds nothing).
    """
    path = Path(path)
    if path.is_dir():
        raise StoreError(f"{path}: is a folder; give a store file path such as {path / 'store.h5'}")
    parent = path.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise StoreError(f"{parent}: cannot create the output folder ({exc.strerror}); choose another --out") \
            from None
    if not os.access(parent, os.W_OK | os.X_OK):
        raise StoreError(f"{parent}: folder not writable; choose another --out or fix the folder's permissions")
    if path.exists() and path.stat().st_size > 0 and not h5py.is_hdf5(path):
        raise StoreError(f"{path}: exists and is not an HDF5 file; refusing to overwrite it. Move it away or"
                         " choose another --out.")
    if path.exists() and not os.access(path, os.W_OK):
        raise StoreError(f"{path}: the store file is not writable; fix its permissions or choose another --out")


def _check_kind(f: h5py.File, path: Path, fmt: Optional[str]) -> None:
    found = f.attrs.get("format")
    if found is None and (len(f.attrs) or len(f.keys())):
        raise StoreMismatch(f"{path}: an HDF5 file that is not a store of this project (no format attribute);"
                            " refusing to write into it. Choose another --out.")
    if found is not None and fmt is not None and found != fmt:
        raise StoreMismatch(f"{path}: is a {_store_name(found)}, not a {_store_name(fmt)}; refusing to write into"
                            " it. Choose another --out.")


def open_for_append(path: Path, log=print, fmt: Optional[str] = None, take_lock: bool = True) -> h5py.File:
    """Open or create a store for writing, holding its writer lock until the file is closed.

    Arguments:
        path: the store file.
        log: unused now (kept for callers); nothing is renamed or salvaged behind the user's back.
        fmt: the store's root ``format`` (e.g. ``"emotion-faces/1"``); an existing store of another
            format, or an HDF5 file of no format, is refused with StoreMismatch.
        take_lock: False in a writer process whose parent holds the lock and has let go of the file
            (``ClipStore.detach``).

    Raises StoreError (folder not writable, not HDF5), StoreLocked (another writer: host and pid),
    StoreDamaged (with the ``emo-cache salvage`` command), StoreMismatch (another kind of store).
    Nothing is written before these checks pass.
    """
    path = Path(path)
    check_writable_target(path)
    lock = acquire_writer_lock(path) if take_lock else None
    try:
        if path.exists() and path.stat().st_size == 0:
            path.unlink()  # an empty file (a kill before the first flush) holds nothing to keep
        if path.exists():
            try:
                f = _LockedFile(path, "r+")
            except OSError as exc:
                raise _open_error(path, exc, "a") from None
            try:
                _check_kind(f, path, fmt)
            except BaseException:
                h5py.File.close(f)
                raise
        else:
            try:
                f = _LockedFile(path, "w-")
            except OSError as exc:
                raise _open_error(path, exc, "a") from None
        f._writer_lock = lock
        return f
    except BaseException:
        if lock is not None:
            lock.release()
        raise


# -- checked reads -----------------------------------------------------------------------------------

FINITE_DATASETS = ("maps", "map_lo", "map_scale")  # must hold finite numbers (NaN marks "missing" elsewhere)


def _where(ds: h5py.Dataset) -> tuple[Path, Optional[str]]:
    """(store path, clip id) of a dataset, for messages."""
    try:
        path = Path(ds.file.filename)
        group = ds.name.rsplit("/", 1)[0].lstrip("/")
    except (OSError, RuntimeError, ValueError):
        return Path("?"), None
    return path, (key_to_id(group) if group else None)


def read_checked(ds: h5py.Dataset, sel: Any = ()) -> np.ndarray:
    """``ds[sel]``; a failed checksum or unreadable chunk becomes StoreDamaged naming store and clip.

    Data sets named in FINITE_DATASETS are also checked for NaN/inf (damaged bytes often decode to them).
    """
    try:
        data = read_whole(ds) if sel == () else ds[sel]
    except (OSError, RuntimeError, KeyError) as exc:
        path, clip = _where(ds)
        raise damaged(path, f"{ds.name.rsplit('/', 1)[-1]} cannot be read: {exc}", clip) from None
    if data.dtype.kind == "f" and ds.name.rsplit("/", 1)[-1] in FINITE_DATASETS:  # a name costs a lookup in HDF5
        check_finite(data, ds)
    return data


def read_whole(ds: h5py.Dataset) -> np.ndarray:
    """``ds[()]`` of a simple data set through the low-level call: the same array without h5py's selection
    machinery, which cost several times the read for the few rows of a short clip (issue 15)."""
    if ds.id.get_space().get_simple_extent_type() != h5py.h5s.SIMPLE or ds.dtype.kind == "O":
        return ds[()]
    data = np.empty(ds.shape, dtype=ds.dtype)
    if data.size:
        ds.id.read(h5py.h5s.ALL, h5py.h5s.ALL, data)
    return data


def check_finite(data: np.ndarray, ds: h5py.Dataset) -> None:
    """StoreDamaged when ``data`` (read from ``ds``) holds NaN or inf."""
    if np.issubdtype(data.dtype, np.floating) and not np.isfinite(data).all():
        path, clip = _where(ds)
        raise damaged(path, f"non-finite values (NaN or inf) in {ds.name.rsplit('/', 1)[-1]}", clip)


def create_checked_dataset(grp: h5py.Group, name: str, data: Optional[np.ndarray] = None, **kwargs) -> h5py.Dataset:
    """``grp.create_dataset`` with HDF5's fletcher32 chunk checksums, so damaged bytes are caught on read.

    fletcher32 needs a chunked layout: ``chunks`` defaults to h5py's automatic choice. An empty data set has
    no chunk to check and is stored plainly. Takes the same arguments as ``create_dataset``.
    """
    shape = kwargs.get("shape", None if data is None else np.shape(data))
    if shape is not None and int(np.prod(shape)) == 0:
        kwargs.pop("chunks", None)
        kwargs.pop("compression", None)
        wrap = kwargs.pop("wrap", True)
        ds = grp.create_dataset(name, data=data, **kwargs)
        return ds if wrap else ds.id
    if kwargs.get("chunks") is None:
        kwargs["chunks"] = True
    return create_dataset(grp, name, data=data, fletcher32=True, **kwargs)


_CREATION: dict = {}  # creation properties by kind, made once (bounded: cleared past _CREATION_MAX kinds)
_CREATION_MAX = 512


def create_dataset(grp: h5py.Group, name: str, shape=None, dtype=None, data=None, chunks=None, maxshape=None,
                   fletcher32: bool = False, compression=None, fillvalue=None, wrap: bool = True):
    """``grp.create_dataset`` with the same arguments and the same creation properties (compared with
    ``H5Pequal`` in tests/test_stores.py), the HDF5 type and property list made once per kind of data set.

    h5py builds and checks them anew for each data set, which was most of what a short clip's nine data sets
    cost the single writer of ``emo-cache faces`` (issue 15); the writes themselves are unchanged. ``wrap``
    False gives the low-level ``h5d.DatasetID`` (no h5py.Dataset object made, for the faces store's writer).
    """
    if data is not None:
        data = np.asarray(data, dtype=dtype)
        shape, dtype = data.shape if shape is None else tuple(shape), data.dtype if dtype is None else dtype
    shape = tuple(shape)
    dtype = np.dtype(dtype)
    key = (shape if chunks is True or chunks is None else None, None if maxshape is None else tuple(maxshape),
           chunks if chunks is True or chunks is None else tuple(chunks), dtype.str, repr(h5py.check_dtype(vlen=dtype)),
           bool(fletcher32), compression, None if fillvalue is None else np.asarray(fillvalue).tobytes())
    made = _CREATION.get(key)
    if made is None:
        if len(_CREATION) >= _CREATION_MAX:
            _CREATION.clear()
        from h5py._hl import filters  # h5py's own property-list builder, so the properties cannot drift from it

        dcpl = filters.fill_dcpl(h5py.h5p.create(h5py.h5p.DATASET_CREATE), shape, dtype, chunks, compression, None,
                                 None, fletcher32, maxshape, None, None)
        if fillvalue is not None:
            dcpl.set_fill_value(np.array(fillvalue, dtype=dtype))
        dcpl.set_obj_track_times(False)
        made = _CREATION[key] = (h5py.h5t.py_create(dtype, logical=1), dcpl)
    tid, dcpl = made
    maxdims = None if maxshape is None else tuple(h5py.h5s.UNLIMITED if m is None else m for m in maxshape)
    space = h5py.h5s.create_simple(shape, maxdims)
    dsid = h5py.h5d.create(grp.id, name.encode(), tid, space, dcpl=dcpl)
    if data is not None:
        dsid.write(h5py.h5s.ALL, h5py.h5s.ALL, np.ascontiguousarray(data))
    return h5py.Dataset(dsid) if wrap else dsid


COMPLETE = {"complete": True}  # the mark a committed clip gets last
_ATTR_TYPES: dict = {}  # (file type, memory type, space) by kind of attribute value, made once


def write_attrs(obj, attrs: dict, fresh: bool = False) -> None:
    """``obj.attrs[name] = value`` for each item, with the same HDF5 types and values (tests/test_stores.py),
    the types and the space made once per kind of value: h5py makes them anew for each attribute, which was
    most of what a short clip's dozen attributes cost the single writer of ``emo-cache faces`` (issue 15).
    ``fresh``: ``obj`` was just created and has none of these attributes, so none is looked up to be replaced
    (an attribute that does exist then fails to be created: an error, never a silent second value)."""
    from h5py._hl.base import array_for_new_object  # h5py's own conversion, so the types cannot drift from it

    oid = obj.id
    for name, value in attrs.items():
        data = array_for_new_object(value)
        key = (data.dtype.str, repr(data.dtype.metadata), data.shape)
        made = _ATTR_TYPES.get(key)
        if made is None:
            if len(_ATTR_TYPES) >= _CREATION_MAX:
                _ATTR_TYPES.clear()
            made = _ATTR_TYPES[key] = (h5py.h5t.py_create(data.dtype, logical=True), h5py.h5t.py_create(data.dtype),
                                       h5py.h5s.create_simple(data.shape))
        htype, mtype, space = made
        encoded = name.encode()
        if not fresh and h5py.h5a.exists(oid, encoded):
            h5py.h5a.delete(oid, encoded)
        attr = h5py.h5a.create(oid, encoded, htype, space)
        try:
            attr.write(data, mtype=mtype)
        except BaseException:
            attr.close()
            h5py.h5a.delete(oid, encoded)
            raise
        attr.close()


# -- chunks written whole, their fletcher32 sums computed here -------------------------------------------

def _hdf5_fletcher32():
    """HDF5's own ``H5_checksum_fletcher32`` (the function its fletcher32 filter calls), through ctypes, or
    None where the library h5py loaded does not export it. ctypes releases the GIL during the call."""
    path = None
    libdir = Path(h5py.__file__).resolve().parent.parent / "h5py.libs"  # the wheel's bundled library
    for candidate in sorted(libdir.glob("libhdf5-*.so*")) if libdir.is_dir() else []:
        if "_hl" not in candidate.name:
            path = candidate
    try:
        lib = ctypes.CDLL(str(path) if path else "libhdf5.so")
        fn = lib.H5_checksum_fletcher32
    except (OSError, AttributeError):
        return None
    if tuple(lib_version(lib)) != tuple(h5.get_libversion()):
        return None  # another libhdf5 than the one h5py uses: do not trust it
    fn.restype, fn.argtypes = ctypes.c_uint32, [ctypes.c_void_p, ctypes.c_size_t]
    return fn


def lib_version(lib) -> tuple[int, int, int]:
    v = [ctypes.c_uint(), ctypes.c_uint(), ctypes.c_uint()]
    if lib.H5get_libversion(*[ctypes.byref(x) for x in v]) < 0:
        return (0, 0, 0)
    return tuple(x.value for x in v)


def fletcher32_numpy(data: np.ndarray) -> int:
    """HDF5's fletcher32 of ``data``'s bytes (even length), in numpy: 16-bit big-endian words w_i, i < n,
    s1 = sum w_i and s2 = sum (n - i) w_i, each folded into 1..65535 (0 only when every word is 0) the way
    HDF5 folds them (H5checksum.c); the sum is s2 << 16 | s1.

    >>> hex(fletcher32_numpy(np.frombuffer(b"\\x01\\x02\\x03\\x04", np.uint8)))
    '0x5080406'
    """
    words = np.frombuffer(memoryview(np.ascontiguousarray(data)).cast("B"), dtype=">u2")
    n = len(words)
    block = 4096  # rows of a (k, 4096) view: sums of 4096 words of <= 65535 stay exact in int64
    pad = (-n) % block
    w = np.concatenate([words, np.zeros(pad, ">u2")]) if pad else words
    w = w.reshape(-1, block)
    rows = w.sum(axis=1, dtype=np.int64)                                     # per block: sum of words
    s1 = int(rows.sum())
    # sum (n - i) w_i over i = k * block + j: (n - k * block) * rows_k - sum_j j * w_kj
    starts = n - np.arange(len(rows), dtype=np.int64) * block
    inner = w.astype(np.int64) @ np.arange(block, dtype=np.int64)            # (k,) sum_j j * w_kj
    s2 = int((starts * rows).sum() - inner.sum())

    def fold(x: int) -> int:
        return 0 if x == 0 else (x - 1) % 65535 + 1
    return fold(s2) << 16 | fold(s1)


_FLETCHER = []  # [function]: HDF5's through ctypes, or fletcher32_numpy; found on first use


def fletcher32(row: np.ndarray, nbytes: int) -> int:
    """fletcher32 (HDF5's filter sum) of the first ``nbytes`` bytes of the contiguous uint8 ``row``."""
    if not _FLETCHER:
        _FLETCHER.append(_hdf5_fletcher32())
    fn = _FLETCHER[0]
    if fn is None:
        return fletcher32_numpy(row[:nbytes])
    return fn(row.ctypes.data, nbytes)


def writes_direct(ds: h5py.Dataset) -> bool:
    """True when ``ds``'s chunks can be written whole from memory, their fletcher32 sum appended here: one
    chunk per leading-axis-1 row, and fletcher32 the only filter (no compression)."""
    if ds.chunks is None or ds.chunks[1] != 1 or ds.chunks[0] != ds.shape[0] or ds.chunks[2:] != ds.shape[2:]:
        return False
    dcpl = ds.id.get_create_plist()
    return [dcpl.get_filter(i)[0] for i in range(dcpl.get_nfilters())] == [h5py.h5z.FILTER_FLETCHER32]


def write_chunks(ds: h5py.Dataset, positions: np.ndarray, rows: np.ndarray, timed=None) -> None:
    """Write whole chunks along axis 1 of ``ds`` (``writes_direct``) straight from ``rows``: uint8 (n, B + 4),
    row i holding chunk ``positions[i]``'s B bytes then 4 spare bytes, which receive its fletcher32 sum. The
    file gets exactly what HDF5's filter would write (the data, then the sum little-endian), without the
    filter pipeline's copies. ``timed(phase, seconds)`` gets the "checksum" and "write" thread CPU seconds."""
    nbytes = rows.shape[1] - 4
    lead = (0,) * (ds.ndim - 2)
    t = time.thread_time()
    sums = np.array([fletcher32(row, nbytes) for row in rows], "<u4")
    rows[:, nbytes:] = sums.view(np.uint8).reshape(len(rows), 4)
    t2 = time.thread_time()
    for pos, row in zip(positions, rows):
        ds.id.write_direct_chunk((0, int(pos)) + lead, row)
    if timed:
        timed("checksum", t2 - t)
        timed("write", time.thread_time() - t2)


CRC_DATASET = "faces_crc32"  # uint32 (F,): crc32 of each encoded chip; HDF5 allows no checksum filter on vlen data


def crc32_rows(rows) -> np.ndarray:
    """uint32 crc32 of each variable-length row (encoded PNG/JPEG chips).

    JPEG decodes damaged bytes into wrong pixels without an error, so encoded chips carry their own sums.
    """
    return np.array([zlib.crc32(np.asarray(r, dtype=np.uint8).tobytes()) for r in rows], dtype=np.uint32)


def check_crc32(rows, stored: np.ndarray, positions: np.ndarray, path: Path, clip_id: str) -> None:
    """StoreDamaged naming the first of ``rows`` (frames ``positions``) whose crc32 is not ``stored``."""
    bad = np.flatnonzero(crc32_rows(rows) != stored)
    if len(bad):
        raise damaged(path, f"face chip of frame {int(positions[bad[0]])} fails its crc32", clip_id)


def group_names(f: h5py.File, complete_only: bool = True) -> Iterable[str]:
    try:
        keys = list(f.keys())
        return [k for k in keys if not complete_only or f[k].attrs.get("complete", False)]
    except (OSError, RuntimeError, KeyError) as exc:
        raise damaged(Path(f.filename), f"its clip index cannot be read: {exc}") from None


def read_rows(ds: h5py.Dataset, frames: np.ndarray, lead: tuple = ()) -> np.ndarray:
    """``ds[lead + (frames,)]`` for frame indices in any order, repeats allowed; reads are checked.

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
        return read_checked(ds, lead + (slice(lo, hi),))[frames - lo]
    block = np.stack([read_checked(ds, lead + (int(i),)) for i in unique])
    return block[np.searchsorted(unique, frames)]


# -- salvage -----------------------------------------------------------------------------------------

@dataclass
class SalvageReport:
    """What ``salvage`` did: the fresh store, the kept damaged file, and every clip kept or dropped."""
    path: Path                      # the salvaged store (same path as before)
    damaged_copy: Path              # the original, damaged file, renamed beside it
    kind: str                       # "faces store", "features store", ...
    stage: str                      # the command that rebuilds dropped clips
    kept: list[str] = field(default_factory=list)                    # clip ids copied
    dropped: list[tuple[str, str]] = field(default_factory=list)     # (clip id, why)


class _ZeroPadded:
    """A read-only file object that reads zeros past the real end, up to ``size``.

    A truncated HDF5 file is refused by the library ("truncated file: eof = ..., stored_eof = ...");
    seen through this it opens, and every clip whose data lies wholly before the cut can be copied.
    """

    def __init__(self, path: Path, size: int):
        self._fh = open(path, "rb")
        self.real_size = os.fstat(self._fh.fileno()).st_size
        self._size = max(size, self.real_size)
        self._pos = 0

    def seek(self, offset: int, whence: int = 0) -> int:
        self._pos = {0: offset, 1: self._pos + offset, 2: self._size + offset}[whence]
        return self._pos

    def tell(self) -> int:
        return self._pos

    def readinto(self, buf) -> int:
        view = memoryview(buf).cast("B")
        n = max(0, min(len(view), self._size - self._pos))
        real = max(0, min(n, self.real_size - self._pos))
        if real:
            self._fh.seek(self._pos)
            got = self._fh.readinto(view[:real])
            real = got or 0
        view[real:n] = bytes(n - real)
        self._pos += n
        return n

    def read(self, n: int = -1) -> bytes:
        n = self._size - self._pos if n < 0 else n
        buf = bytearray(n)
        return bytes(buf[:self.readinto(buf)])

    def readable(self) -> bool:
        return True

    def writable(self) -> bool:
        return False

    def seekable(self) -> bool:
        return True

    def flush(self) -> None:
        pass

    def close(self) -> None:
        self._fh.close()


def _open_damaged(path: Path) -> tuple[h5py.File, int, Optional[_ZeroPadded]]:
    """(readable h5py file, real byte size, padding file object or None) of a possibly damaged store."""
    size = path.stat().st_size
    try:
        return h5py.File(path, "r"), size, None
    except OSError as exc:
        text = str(exc)
        if is_lock_error(exc):
            raise _open_error(path, exc, "r") from None
        if "stored_eof = " not in text:
            raise StoreDamaged(f"{path}: nothing in it can be read ({text}); it was left as it is. Move it aside"
                               " and rerun the stage that builds it.") from None
        stored_eof = int(text.split("stored_eof = ")[1].split(")")[0].split(",")[0])
    padded = _ZeroPadded(path, stored_eof)
    try:
        return h5py.File(padded, "r"), size, padded
    except OSError as exc:
        padded.close()
        raise StoreDamaged(f"{path}: truncated at {size} bytes and nothing in it can be read ({exc}); it was"
                           " left as it is. Move it aside and rerun the stage that builds it.") from None


def _clip_problem(grp: h5py.Group, real_size: int) -> Optional[str]:
    """Why a clip group cannot be kept (not complete, beyond a truncation, unreadable, non-finite), or None."""
    if not grp.attrs.get("complete", False):
        return "not complete (in flight when the run stopped)"
    for name, ds in grp.items():
        if not isinstance(ds, h5py.Dataset):
            continue
        if ds.chunks is not None:
            for i in range(ds.id.get_num_chunks()):
                info = ds.id.get_chunk_info(i)
                if info.byte_offset + info.size > real_size:
                    return f"{name} lies past the end of the truncated file"
            blocks = ds.iter_chunks() if ds.size else []
        else:
            offset = ds.id.get_offset()
            if offset is not None and offset + ds.id.get_storage_size() > real_size:
                return f"{name} lies past the end of the truncated file"
            blocks = [()]
        for sel in blocks:
            data = ds[sel]
            if name in FINITE_DATASETS and np.issubdtype(data.dtype, np.floating) and not np.isfinite(data).all():
                return f"non-finite values (NaN or inf) in {name}"
    if CRC_DATASET in grp and "faces" in grp:
        if (crc32_rows(grp["faces"][()]) != grp[CRC_DATASET][()]).any():
            return "an encoded face chip fails its crc32"
    return None


def check_store(path: Path) -> list[tuple[str, str]]:
    """(clip id, problem) for every clip of ``path`` that would not survive a salvage; changes nothing.

    Reads every data set of every clip in full (checksums, truncation, non-finite maps, crc32 of encoded
    chips), so it costs one read of the store.
    """
    path = Path(path)
    if not path.exists():
        raise StoreError(f"{path}: no such store")
    src, real_size, padded = _open_damaged(path)
    problems = [("(the file)", f"truncated at {real_size} bytes")] if padded is not None else []
    try:
        try:
            keys = list(src.keys())
        except (OSError, RuntimeError) as exc:
            return problems + [("(the file)", f"its clip index cannot be read ({exc})")]
        for key in keys:
            try:
                problem = _clip_problem(src[key], real_size)
            except (OSError, RuntimeError, KeyError, ValueError) as exc:
                problem = f"unreadable ({exc})"
            if problem is not None:
                problems.append((key_to_id(key), problem))
    finally:
        src.close()
        if padded is not None:
            padded.close()
    return problems


def salvage(path: Path, log=print) -> SalvageReport:
    """Copy every readable, complete clip of ``path`` into a fresh file that takes its place.

    The original is renamed, never changed: ``<name>.damaged-<time>`` beside it. Every dataset of a kept clip
    is read in full first (checksums, a truncation, non-finite maps), so a kept clip is a good clip. The copy
    is built under ``<name>.salvage-tmp`` and renamed only when complete, so a kill or a full disk during the
    salvage leaves the original where it was. Refused while a writer holds the store.
    """
    path = Path(path)
    if not path.exists():
        raise StoreError(f"{path}: no such store")
    lock = acquire_writer_lock(path)
    try:
        src, real_size, padded = _open_damaged(path)
        tmp = path.with_name(path.name + ".salvage-tmp")
        try:
            fmt = src.attrs.get("format")
            kind, stage = STORE_KINDS.get(fmt, ("store", "the stage that built it"))
            report = SalvageReport(path, _unused_name(path, f".damaged-{time.strftime('%Y%m%d-%H%M%S')}"), kind, stage)
            _copy_good_clips(src, tmp, real_size, report)
        except OSError as exc:
            tmp.unlink(missing_ok=True)
            if is_disk_full(exc):
                raise StoreFull(f"{path}: the disk filled while salvaging into {tmp}; the store was left as it"
                                f" is. Free about {real_size / 2**30:.2f} GiB and run `{salvage_command(path)}`"
                                " again.") from None
            raise
        finally:
            src.close()
            if padded is not None:
                padded.close()
        os.replace(path, report.damaged_copy)
        os.replace(tmp, path)
        return report
    finally:
        lock.release()


def _unused_name(path: Path, suffix: str) -> Path:
    """``path`` + ``suffix``, with -2, -3, ... added when that name is taken: a kept file is never replaced."""
    candidate, n = path.with_name(path.name + suffix), 1
    while candidate.exists():
        n += 1
        candidate = path.with_name(f"{path.name}{suffix}-{n}")
    return candidate


def _copy_good_clips(src: h5py.File, tmp: Path, real_size: int, report: SalvageReport) -> None:
    try:
        keys = list(src.keys())
    except (OSError, RuntimeError) as exc:
        raise StoreDamaged(f"{report.path}: its clip index cannot be read ({exc}); it was left as it is. Move it"
                           " aside and rerun the stage that builds it.") from None
    with h5py.File(tmp, "w") as dst:
        for name, value in src.attrs.items():
            dst.attrs[name] = value
        for key in keys:
            try:
                problem = _clip_problem(src[key], real_size)
                if problem is None:
                    src.copy(src[key], dst, name=key)
                    dst.flush()
            except (OSError, RuntimeError, KeyError, ValueError) as exc:
                if is_disk_full(exc):
                    raise
                problem = f"unreadable ({exc})"
                if key in dst:
                    del dst[key]
            if problem is None:
                report.kept.append(key_to_id(key))
            else:
                report.dropped.append((key_to_id(key), problem))


# -- the shared store class ---------------------------------------------------------------------------

class ClipStore:
    """What both stores share: one group per clip, committed whole with a ``complete`` mark written last.

    Subclasses open ``self._f`` and set ``self.path`` and ``STAGE`` (the command that fills the store).
    """
    STAGE = ""
    path: Path
    _f: h5py.File
    _space_budget: Optional[int] = None  # bytes a batch's one free-space check still covers (space_for)

    def is_complete(self, clip_id: str) -> bool:
        return self._complete_or_none(clip_id) is not None

    def _complete_or_none(self, clip_id: str) -> Optional[h5py.Group]:
        """The clip's group when it is complete, else None: opened once (a damaged group is StoreDamaged, never
        taken for an absent one)."""
        key = clip_key(clip_id)
        try:
            if key not in self._f:
                return None
            grp = self._f[key]
            return grp if bool(grp.attrs.get("complete", False)) else None
        except (OSError, RuntimeError, KeyError) as exc:
            raise damaged(self.path, f"its group cannot be read: {exc}", clip_id) from None

    def attrs(self, clip_id: str) -> dict:
        """A complete clip's attributes (its data sets are not opened: a reader of many clips pays little)."""
        return self._attrs_of(self._complete_group(clip_id), clip_id)

    def _attrs_of(self, grp: h5py.Group, clip_id: str) -> dict:
        try:
            return {k: (v.item() if hasattr(v, "item") else v) for k, v in grp.attrs.items()}
        except (OSError, RuntimeError, KeyError) as exc:
            raise damaged(self.path, f"its attributes cannot be read: {exc}", clip_id) from None

    def read_present(self, clip_id: str) -> np.ndarray:
        """bool (F,) face mask of a clip, without reading its pixels or maps."""
        return read_checked(self._datasets(clip_id, "present")[0])

    def present_and_attrs(self, clip_id: str) -> tuple[np.ndarray, dict]:
        """``read_present`` and ``attrs`` of a clip with one lookup of its group, for a planner of many clips
        (`emo-cache extract` read both for each clip, and the group's lookup and ``complete`` check each time)."""
        grp = self._complete_group(clip_id)
        return read_checked(self._open_datasets(grp, clip_id, ("present",))[0]), self._attrs_of(grp, clip_id)

    def _datasets(self, clip_id: str, *names: str) -> list[h5py.Dataset]:
        """The named data sets of a complete clip, opened (and only those: a reader that needs one pays for
        one); damaged metadata is StoreDamaged naming the clip, as in ``_group``."""
        return self._open_datasets(self._complete_group(clip_id), clip_id, names)

    def _open_datasets(self, grp: h5py.Group, clip_id: str, names: Sequence[str]) -> list[h5py.Dataset]:
        try:
            return [grp[name] for name in names]
        except (OSError, RuntimeError, KeyError) as exc:
            raise damaged(self.path, f"its data sets cannot be opened: {exc}", clip_id) from None

    def _complete_group(self, clip_id: str) -> h5py.Group:
        """The clip's group, unopened data sets; StoreError when the clip is absent or not complete."""
        grp = self._complete_or_none(clip_id)
        if grp is None:
            raise StoreError(f"{self.path}: clip {clip_id!r} is not in the store (or was not completed);"
                             f" rerun `{self.STAGE}` to finish it")
        return grp

    def _group(self, clip_id: str) -> h5py.Group:
        grp = self._complete_group(clip_id)
        try:  # opening each data set reads its header: damaged metadata is caught here, named, not a KeyError
            for name in grp:
                grp[name]
        except (OSError, RuntimeError, KeyError) as exc:
            raise damaged(self.path, f"its data sets cannot be opened: {exc}", clip_id) from None
        return grp

    def ensure_space(self, clip_id: str, nbytes: int = 0) -> None:
        """StoreFull, before anything is written, when the disk lacks ``nbytes`` plus FREE_RESERVE.

        HDF5 must never meet a full disk: after a failed write its caches are inconsistent and a later
        flush or close can crash the process (seen as a segmentation fault). So writers check first, and the
        reserve keeps room for the metadata that the commit and the close still write.
        """
        budget = self._space_budget
        if budget is not None and nbytes <= budget:  # inside space_for: this clip's bytes were checked already
            self._space_budget = budget - nbytes
            return
        need = int(nbytes * 1.05) + FREE_RESERVE
        free = free_bytes(self.path)
        if free < need:
            raise StoreFull(f"{self.path}: not enough free disk to write clip {clip_id!r}: {free / 2**20:.1f} MiB free,"
                            f" about {need / 2**20:.1f} MiB needed. The {self._count_complete()} clip(s) committed so"
                            " far are kept: free space (or move the store to a larger disk) and rerun the same"
                            " command to finish.")

    @contextmanager
    def space_for(self, clip_id: str, nbytes: int):
        """One free-space check (``ensure_space``) for the ``nbytes`` that a batch of clips, the first named
        ``clip_id``, will write; the checks of each clip inside draw on it without asking the OS again (it was
        a few statvfs calls per short clip). A check for more than is left asks the OS as before."""
        self.ensure_space(clip_id, nbytes)
        self._space_budget = nbytes
        try:
            yield
        finally:
            self._space_budget = None

    def _count_complete(self) -> int:
        try:
            return len(group_names(self._f))
        except StoreDamaged:
            return 0

    def _new_group(self, clip_id: str, nbytes: int = 0) -> h5py.Group:
        """An empty group for the clip, replacing an earlier (incomplete or outdated) one.

        ``nbytes``: about what the clip will write, checked against the free disk first (``ensure_space``).
        """
        self.ensure_space(clip_id, nbytes)
        key = clip_key(clip_id)
        if key in self._f:
            del self._f[key]
        return self._f.create_group(key)

    def _commit(self, grp: h5py.Group, clip_id: str, attrs: dict) -> None:
        """Attributes and data flushed first, then the ``complete`` mark, flushed again."""
        self._commit_many([(grp, clip_id, attrs)])

    def _commit_many(self, clips: list[tuple[h5py.Group, str, dict]]) -> None:
        """``_commit`` for several written clips with two flushes in all: every clip's attributes and data
        flushed first, then every ``complete`` mark, flushed again. A kill before the second flush leaves
        none of them complete (a rerun redoes them), never one with its mark and without its data."""
        if clips:  # one check for all: between clips only attributes are written
            self.ensure_space(clips[0][1])
        for grp, clip_id, attrs in clips:  # every group is new (_new_group): no attribute to look up and replace
            write_attrs(grp, {k: to_attr(v) for k, v in {**attrs, "clip_id": clip_id}.items()}, fresh=True)
        self._f.flush()
        for grp, _clip_id, _attrs in clips:
            write_attrs(grp, COMPLETE, fresh=True)
        self._f.flush()

    _held_lock: Optional[SoftFileLock] = None  # the writer lock kept by ``detach`` while another process writes

    def detach(self) -> None:
        """Let go of the file, keeping the writer lock: a writer process (``cache.writer_process``) opens it next
        and no other writer can. ``close`` releases the lock."""
        f, self._f = self._f, None
        self._held_lock, f._writer_lock = f._writer_lock, None
        f.close()

    def close(self) -> None:
        try:
            if getattr(self, "_f", None):
                self._f.close()
            self._f = None
        finally:
            lock, self._held_lock = self._held_lock, None
            if lock is not None:
                lock.release()

    def abandon(self) -> None:
        """Close without writing another byte into the file: after a full disk, HDF5's closing flush would
        write part of its metadata and leave the file inconsistent (a rerun then fails on the clip in flight),
        or fail and crash the process at exit. Every later write of the library goes to /dev/null instead, so
        the file stays exactly as the last commit's flush (and the data written since) left it: the state a
        kill leaves, which a rerun resumes."""
        f = getattr(self, "_f", None)
        if not f:
            self.close()  # detached: only the writer lock to release
            return
        try:
            fd = f.id.get_vfd_handle() if f.driver == "sec2" else None
        except (OSError, RuntimeError, ValueError):
            fd = None
        if fd is not None:
            null = os.open(os.devnull, os.O_RDWR)
            try:
                os.dup2(null, fd)  # HDF5 keeps writing to its descriptor, which no longer reaches the file
            finally:
                os.close(null)
        try:
            self.close()
        except (OSError, RuntimeError):
            self._f = None  # the descriptor could not be swapped: the close failed as it must, nothing more to do

    def disk_full(self, exc: BaseException, what: str, needed_bytes: int | None = None) -> StoreFull:
        """The one StoreFull error for a disk that filled while this store wrote ``what`` (a clip, a close).

        One line: HDF5's own text (several lines: time, descriptor, buffer address) is left out; the OS's
        reason stays."""
        quota = getattr(exc, "errno", None) == errno.EDQUOT or "errno = 122" in str(exc) or "quota" in str(exc)
        reason = os.strerror(errno.EDQUOT if quota else errno.ENOSPC)
        need = f"; about {needed_bytes / 2**20:,.1f} MiB more are needed" if needed_bytes and needed_bytes > 0 else ""
        return StoreFull(f"{self.path}: the disk filled while writing {what} ({reason}){need}. The clips committed"
                         " so far are kept: free space (or move the store to a larger disk) and rerun the same"
                         " command to finish.")

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        """Close; when the body already failed, a failing close does not hide its error, and after a full disk
        the file is abandoned as the last commit left it (``abandon``)."""
        writing = getattr(self, "_f", None) and self._f.mode != "r"
        if writing and exc_type is not None and (issubclass(exc_type, StoreFull) or is_disk_full(exc)):
            self.abandon()
            return
        try:
            self.close()
        except (OSError, RuntimeError) as close_error:  # HDF5 reports a failed metadata flush as either
            if exc_type is not None:
                return
            if is_disk_full(close_error):
                raise self.disk_full(close_error, "the store's metadata on close") from None
            raise
