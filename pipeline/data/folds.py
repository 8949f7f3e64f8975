"""Folds as clip attributes: which clips of a store form fold K's train or test part.

A dataset with folds (DFEW, MAFW, CK+) is cached once: each clip carries a ``folds`` attribute, JSON
``{"1": "train", "2": "test", ...}``, written by ``emo-cache faces`` from the layout and copied by
``emo-cache extract``. Training, evaluation and cross-validation select clips here, so no stage builds a
store per fold.
"""
from __future__ import annotations

import json
from typing import Optional

from emotion_attention.cache.errors import ConfigError

PARTS = ("train", "test")


def parse_folds(value) -> dict[int, str]:
    """A clip's ``folds`` attribute -> {fold: "train" | "test"}; {} for a clip without folds.

    >>> parse_folds('{"1": "train", "2": "test"}')
    {1: 'train', 2: 'test'}
    """
    if value is None or value == "":
        return {}
    mapping = json.loads(value) if isinstance(value, (str, bytes)) else dict(value)
    return {int(k): str(v) for k, v in mapping.items()}


def clip_folds(store, clip_ids=None) -> dict[str, dict[int, str]]:
    """clip id -> {fold: part} for the complete clips of a faces or features store (attributes only)."""
    ids = store.complete_ids() if clip_ids is None else clip_ids
    return {cid: parse_folds(store.attrs(cid).get("folds")) for cid in ids}


def store_folds(store) -> list[int]:
    """The fold numbers a store's clips carry, sorted; [] for a dataset without folds."""
    return sorted({k for folds in clip_folds(store).values() for k in folds})


def select_ids(store, split: Optional[str] = None, fold: Optional[int] = None, part: str = "train") -> list[str]:
    """Complete clip ids of a split, or of one part of a fold.

    Arguments:
        store: an open FacesStore or FeaturesStore.
        split: without a fold, the split to select (case-insensitive); None: every clip.
        fold: a fold number (1-based); then ``split`` is ignored and ``part`` is used.
        part: "train" or "test".
    Returns:
        sorted clip ids. A fold the store does not have is a ConfigError listing the folds it has.

    >>> select_ids(store, fold=1, part="test")  # doctest: +SKIP
    ['All/Happy/00025', ...]
    """
    if fold is None:
        ids = store.complete_ids()
        if split is None:
            return ids
        chosen = [cid for cid in ids if str(store.attrs(cid).get("split", "")).lower() == split.lower()]
        if not chosen and ids and store_folds(store):
            raise ConfigError(f"{store.path}: no clip in split {split!r}: this dataset has folds"
                              f" ({', '.join(map(str, store_folds(store)))}); pass --fold K, or run `emo-train cv`")
        return chosen
    if part not in PARTS:
        raise ValueError(f"part {part!r}: use 'train' or 'test'")
    folds = clip_folds(store)
    available = sorted({k for f in folds.values() for k in f})
    if fold not in available:
        raise ConfigError(f"{store.path}: fold {fold} is not in this store; "
                          + (f"its folds are {', '.join(map(str, available))}" if available else
                             "its clips carry no folds (a dataset without folds: use --split / --train-split)"))
    return sorted(cid for cid, f in folds.items() if f.get(fold) == part)


def subject_folds(subjects, fold_count: int) -> dict[str, int]:
    """Subject-independent folds: subjects sorted by name, the i-th one tests in fold ``i % fold_count + 1``.

    >>> subject_folds(["S010", "S005", "S011"], 2)
    {'S005': 1, 'S010': 2, 'S011': 1}
    """
    return {s: i % fold_count + 1 for i, s in enumerate(sorted(subjects))}
