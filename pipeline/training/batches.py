"""Clips of a features store as training batches: frame sampling, padding, memory or streaming, prefetch.

Sampling rule (Sec. 4.2): each epoch takes ``count`` random frames among a clip's *present* frames
(all of them, in time order, when it has fewer), so absent frames never use a slot; shorter clips are
padded and the padding is masked out of every softmax and mean in the heads.
"""
from __future__ import annotations

import queue
import threading
from typing import Callable, Iterable, Iterator, Sequence

import numpy as np
import torch

from emotion_attention.cache.features_store import FeaturesStore


def sample_frames(present: np.ndarray, count: int, rng: np.random.Generator) -> np.ndarray:
    """Indices of ``count`` random present frames in time order (all present ones if fewer).

    Arguments:
        present: bool (F,) face mask of the clip.
        count: frames wanted; 0 or less means every present frame.
        rng: the epoch's generator (so a resumed run draws the same frames).
    Returns: int64 (n,) sorted frame indices, n = min(count, present.sum()).

    >>> sample_frames(np.array([True, False, True, True]), 2, np.random.default_rng(0))
    array([2, 3])
    """
    candidates = np.flatnonzero(present)
    if count <= 0 or len(candidates) <= count:
        return candidates.astype(np.int64)
    return np.sort(rng.choice(candidates, size=count, replace=False)).astype(np.int64)


def pad_clips(clips: Sequence[tuple[np.ndarray, np.ndarray]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack clips of different lengths into one padded batch.

    Arguments:
        clips: (maps float16/float32 (F_i, L, D), present bool (F_i,)) per clip.
    Returns: (maps float32 (B, F_max, L, D), mask bool (B, F_max)); padding has mask False.

    >>> maps, mask = pad_clips([(np.ones((2, 4, 8), np.float16), np.ones(2, bool)),
    ...                         (np.ones((3, 4, 8), np.float16), np.ones(3, bool))])
    >>> maps.shape, mask.sum(1).tolist()
    (torch.Size([2, 3, 4, 8]), [2, 3])
    """
    f_max = max(1, max(len(p) for _, p in clips))
    l, d = clips[0][0].shape[1:]
    maps = np.zeros((len(clips), f_max, l, d), dtype=clips[0][0].dtype)
    mask = np.zeros((len(clips), f_max), dtype=bool)
    for i, (clip_maps, present) in enumerate(clips):
        maps[i, :len(present)] = clip_maps
        mask[i, :len(present)] = present
    # one float16 -> float32 cast of the whole batch (torch, threaded): half the time of casting per clip
    return torch.from_numpy(maps).float(), torch.from_numpy(mask)


class ClipSource:
    """One set of clips of a features store, held in memory or read per batch.

    Arguments:
        store: an open FeaturesStore.
        clip_ids: the clips to serve.
        in_memory: True loads every clip's maps now (with a progress bar); False reads the sampled
            frames of each batch from the store (the store picks slice or per-frame reads).

    >>> import tempfile
    >>> tmp = tempfile.TemporaryDirectory()
    >>> store = FeaturesStore(f"{tmp.name}/feats.h5", "a", provenance={"backbone": "vgg16"}, class_names=["Happy"])
    >>> store.write_clip("Train/Happy/a.avi", np.arange(48).reshape(2, 4, 3, 2),  # (V, F, L, D) maps
    ...                  np.array([True, False, True, True]), {"label": "Happy", "split": "Train"})
    >>> source = ClipSource(store, store.complete_ids("Train"), in_memory=False)
    >>> maps, present, frames = source.read("Train/Happy/a.avi", count=2, view=0, rng=np.random.default_rng(0))
    >>> maps.shape, present.tolist(), frames.tolist()
    ((2, 3, 2), [True, True], [2, 3])
    >>> held = ClipSource(store, ["Train/Happy/a.avi"], in_memory=True)
    >>> np.array_equal(held.read("Train/Happy/a.avi", count=2, view=0, rng=np.random.default_rng(0))[0], maps)
    True
    >>> store.close(); tmp.cleanup()
    """

    def __init__(self, store: FeaturesStore, clip_ids: Sequence[str], in_memory: bool,
                 progress: Callable[[Iterable], Iterable] = iter):
        self.store = store
        self.in_memory = in_memory
        self._maps: dict[str, np.ndarray] = {}
        self._present: dict[str, np.ndarray] = {}
        if in_memory:
            for cid in progress(list(clip_ids)):
                self._maps[cid], self._present[cid] = store.read_clip(cid)

    def num_views(self, clip_id: str) -> int:
        return self.store.shape(clip_id)[0]

    def present(self, clip_id: str) -> np.ndarray:
        """bool (F,) face mask (read once, without the maps, when streaming)."""
        if clip_id not in self._present:
            self._present[clip_id] = self.store.read_present(clip_id)
        return self._present[clip_id]

    def read(self, clip_id: str, count: int, view: int, rng: np.random.Generator
             ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(maps (n, L, D), present (n,), frame indices (n,)) of ``count`` sampled present frames of one view."""
        present = self.present(clip_id)
        frames = sample_frames(present, count, rng)
        if clip_id in self._maps:
            return self._maps[clip_id][view, frames], present[frames], frames
        maps, _ = self.store.read_clip(clip_id, frames=frames, views=[view])
        return maps[0], present[frames], frames


def prefetch(batches: Iterable, depth: int) -> Iterator:
    """Yield from ``batches`` while a background thread prepares the next ``depth`` items.

    HDF5 reads and float16->float32 casts then overlap the model's compute (torch releases the GIL).
    ``depth`` 0 iterates in the caller's thread. An exception in the producer is re-raised here.

    >>> list(prefetch(range(3), depth=2))
    [0, 1, 2]
    """
    if depth <= 0:
        yield from batches
        return
    items: queue.Queue = queue.Queue(maxsize=depth)
    done = object()
    stop = threading.Event()

    def produce() -> None:
        try:
            for item in batches:
                if stop.is_set():
                    return
                items.put(item)
        except BaseException as exc:  # handed to the consumer, which re-raises it
            items.put(_Failure(exc))
            return
        items.put(done)

    worker = threading.Thread(target=produce, name="prefetch", daemon=True)
    worker.start()
    try:
        while (item := items.get()) is not done:
            if isinstance(item, _Failure):
                raise item.exc
            yield item
    finally:
        stop.set()
        while worker.is_alive():  # unblock a producer waiting on a full queue
            try:
                items.get(timeout=0.1)
            except queue.Empty:
                pass


class _Failure:
    def __init__(self, exc: BaseException):
        self.exc = exc


def estimate_bytes(store: FeaturesStore, clip_ids: Sequence[str]) -> int:
    """Bytes the clips' float16 maps take in memory (from metadata only)."""
    return int(sum(2 * np.prod(store.shape(cid)) for cid in clip_ids))


def holdout_split(clip_ids: Sequence[str], labels: Sequence[int], fraction: float, seed: int
                  ) -> tuple[list[str], list[str]]:
    """Stratified split of the train clips into (fit, held-out) for model selection.

    Each class keeps round(fraction * n) clips out, but always leaves at least one to fit on.

    >>> holdout_split(["a", "b", "c", "d"], [0, 0, 1, 1], 0.5, seed=0)[1].__len__()
    2
    """
    rng = np.random.default_rng(seed)
    labels = np.asarray(labels)
    fit, held = [], []
    for c in np.unique(labels):
        members = [clip_ids[i] for i in rng.permutation(np.flatnonzero(labels == c))]
        n_held = min(int(round(fraction * len(members))), len(members) - 1)
        held += members[:n_held]
        fit += members[n_held:]
    return sorted(fit), sorted(held)
