"""``emo-cache merge``: join stores written as shards (``--shard K/N``, or part files) into one store.

Merging **copies** each clip's datasets into the output with HDF5's object copy (``H5Ocopy``: chunk by
chunk, compressed and encoded bytes as they are, no decoding), then commits the clip with its ``complete``
mark last, exactly as a writer does. It copies rather than building external links or a virtual dataset
because the merged store must stand alone: training opens it on other machines, a shard file deleted or
moved later must not break it, and the one-writer lock, the salvage and the damage checks all work on one
file. The price is a second copy of the bytes on disk while the shards are kept.

Shards are refused, naming what differs, when their kind (root ``format``), config (faces) or provenance
and class names (features), or code version differ, or when two shards hold the same clip. A merge is
resumable: clips already complete in the output are skipped.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, Sequence

from emotion_attention.cache.common import ClipStore, diff_settings, is_disk_full, open_h5
from emotion_attention.cache.errors import StoreError, StoreMismatch
from emotion_attention.cache.faces_store import FORMAT as FACES_FORMAT
from emotion_attention.cache.faces_store import FacesStore
from emotion_attention.cache.features_store import FORMAT as FEATURES_FORMAT
from emotion_attention.cache.features_store import FeaturesStore


def copy_clip(src: ClipStore, dst: ClipStore, clip_id: str) -> None:
    """Copy one complete clip from ``src`` into ``dst`` and commit it there (``complete`` written last).

    Each dataset keeps its dtype, chunks, filters and checksums; attributes follow, then the mark.
    """
    grp = src._group(clip_id)
    try:
        out = dst._new_group(clip_id)
        for name in grp:
            grp.copy(grp[name], out, name=name)
        attrs = {k: v for k, v in grp.attrs.items() if k not in ("complete", "clip_id")}
        dst._commit(out, clip_id, attrs)
    except OSError as exc:
        if is_disk_full(exc):
            raise dst.disk_full(exc, f"clip {clip_id!r} (copying it in)") from None
        raise


def _root(path: Path) -> dict:
    """format and the settings that must agree between shards, read from a store's root."""
    with open_h5(path, "r") as f:
        fmt = f.attrs.get("format")
        if fmt == FACES_FORMAT:
            settings = {"config": json.loads(f.attrs["config"])}
        elif fmt == FEATURES_FORMAT:
            settings = {"provenance": json.loads(f.attrs["provenance"]),
                        "class_names": json.loads(f.attrs.get("class_names", "[]"))}
        else:
            raise StoreError(f"{path}: not a faces or features store (format={fmt!r}); nothing to merge")
        settings["code_version"] = str(f.attrs.get("code_version", ""))
        return {"format": fmt, "settings": settings, "shard": str(f.attrs.get("shard", ""))}


def check_shards(shards: Sequence[Path]) -> dict:
    """The root of the first shard, after refusing any shard whose kind or settings differ from it."""
    roots = [_root(p) for p in shards]
    first = roots[0]
    for path, root in zip(shards[1:], roots[1:]):
        if root["format"] != first["format"]:
            raise StoreMismatch(f"{path} is a {root['format']} store, {shards[0]} a {first['format']} store;"
                                " only stores of one kind merge")
        diffs = diff_settings(first["settings"], root["settings"], have=f"{shards[0].name} has",
                              want=f"{path.name} has")
        if diffs:
            raise StoreMismatch(f"{path} was made with other settings than {shards[0]}:\n  " + "\n  ".join(diffs)
                                + "\nOnly shards of one run merge: rebuild the odd shard with the same settings.")
    return first


def merge_stores(out_path: Path, shards: Sequence[Path], log: Callable = print) -> dict:
    """Copy every complete clip of ``shards`` (faces stores, or features stores) into ``out_path``.

    Arguments:
        out_path: the merged store; created, or resumed when it holds the same settings.
        shards: stores of one kind written with the same settings (``--shard K/N`` runs).
        log: where progress lines go.
    Returns:
        {"out", "format", "copied", "skipped", "clips"}. Raises StoreMismatch naming what differs.

    >>> merge_stores(Path("faces.h5"), [Path("faces.0.h5"), Path("faces.1.h5")])  # doctest: +SKIP
    """
    out_path, shards = Path(out_path), [Path(p) for p in shards]
    if not shards:
        raise StoreError("merge needs at least one shard store")
    if any(p.resolve() == out_path.resolve() for p in shards):
        raise StoreError(f"{out_path}: the output is also given as a shard; choose another output path")
    root = check_shards(shards)
    owner: dict[str, Path] = {}
    readers = [open_store(p, root["format"]) for p in shards]
    try:
        for path, store in zip(shards, readers):
            for cid in store.complete_ids():
                if cid in owner:
                    raise StoreMismatch(f"clip {cid!r} is in both {owner[cid]} and {path}; shards of one run never"
                                        " share a clip. Merge only the shards of one --shard K/N run.")
                owner[cid] = path
        copied = skipped = 0
        with create_output(out_path, root, readers[0]) as out:
            for store in readers:
                for cid in store.complete_ids():
                    if out.is_complete(cid):
                        skipped += 1
                        continue
                    copy_clip(store, out, cid)
                    copied += 1
    finally:
        for store in readers:
            store.close()
    log(f"merge: {copied} clip(s) copied, {skipped} already in {out_path}, from {len(shards)} shard(s)")
    return {"out": str(out_path), "format": root["format"], "copied": copied, "skipped": skipped,
            "clips": len(owner)}


def open_store(path: Path, fmt: str) -> ClipStore:
    return FacesStore(path, "r") if fmt == FACES_FORMAT else FeaturesStore(path, "r")


def create_output(out_path: Path, root: dict, first: ClipStore) -> ClipStore:
    """The merged store, opened for writing with the shards' settings (and no shard mark)."""
    settings = root["settings"]
    if root["format"] == FACES_FORMAT:
        return FacesStore(out_path, "a", config=settings["config"], code_version=settings["code_version"])
    return FeaturesStore(out_path, "a", provenance=settings["provenance"], class_names=settings["class_names"])
