"""The one place a torch file is written or read, and the one checkpoint format.

A checkpoint of ``emo-train heads`` (last.pt, best.pt) or ``emo-train finetune`` (checkpoint.pt, best.pt) is a
plain dict built by ``build_checkpoint`` (nanoGPT's shape: what rebuilds the model, plus what resumes the run):

    format        "emotion-attention/checkpoint"    what this file is
    version       CHECKPOINT_VERSION                 bumped when a key changes meaning
    kind          "heads" | "finetune"               the stage that wrote it
    model         heads state dict                   models.heads.EmotionHeads
    heads_config  HeadsConfig fields                 rebuilds the heads
    train_config  the stage's config fields          TrainConfig (heads) or FinetuneConfig (finetune)
    class_names   the class order of the outputs
    provenance    the features store's provenance    eval and predict refuse other features
    epoch, history, best_score                       where the run stands (0-based epoch)
    optimizer, scheduler (, scaler)                  resume state
    (finetune only) backbone, backbone_name, backbone_layout, finetuned_from

``read_checkpoint`` reads every version written so far: files from before the format key (the previous
release) are read as version 0, with the same keys.
"""
from __future__ import annotations

import os
import pickle
import zipfile
from pathlib import Path

import torch

from emotion_attention.cache.errors import UserError


class CheckpointError(UserError):
    """A checkpoint or weights file that cannot be read (truncated, not a torch file, or not plain tensors)."""


def save_checkpoint(path: Path, payload: dict) -> None:
    """Write atomically (temp file + rename) so a kill never leaves a half-written checkpoint."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(payload, tmp)
    os.replace(tmp, path)


def load_torch_file(path, what: str = "checkpoint", error: type = CheckpointError):
    """``torch.load(path, weights_only=True)`` with a one-line ``error`` for a file that is not a plain one.

    Nothing in the file is executed (weights only); torch's advice to retry with weights-only loading switched off is
    never passed on, because that would run whatever code the file holds.

    Arguments:
        path: the file.
        what: what the caller expected, for the message ("checkpoint", "weights file").
        error: the UserError subclass to raise.
    Returns: the loaded object (dicts, lists, tensors, numbers, strings).

    >>> load_torch_file("runs/heads/best.pt")["epoch"]  # doctest: +SKIP
    29
    """
    path = Path(path)
    if not path.is_file():
        raise error(f"{path}: no such {what}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        if not zipfile.is_zipfile(path) or "invalid load key" in str(exc):  # not torch's format: damaged or foreign
            raise error(f"{path}: cannot be read as a {what}: it is truncated, damaged or not a torch file;"
                        " re-create it (rerun the command that wrote it) or pass the right file") from exc
        raise error(f"{path}: not a plain {what}: it holds objects other than tensors, numbers and strings,"
                    " which are never loaded (they could run code); re-save it as a state dict") from exc
    except (RuntimeError, EOFError, OSError, ValueError, zipfile.BadZipFile, KeyError) as exc:
        size = path.stat().st_size
        raise error(f"{path}: cannot be read as a {what} ({size} bytes): it is truncated, damaged or not a"
                    " torch file; re-create it (rerun the command that wrote it) or pass the right file") from exc


CHECKPOINT_FORMAT = "emotion-attention/checkpoint"
CHECKPOINT_VERSION = 1
CHECKPOINT_KEYS = ("model", "heads_config", "class_names", "provenance")  # what every version holds


def build_checkpoint(kind: str, *, model: dict, heads_config: dict, train_config: dict, class_names, provenance: dict,
                     epoch: int, history, best_score, optimizer: dict, scheduler: dict, **extra) -> dict:
    """The checkpoint dict of a heads or finetune run (see the module docstring for the keys).

    >>> ckpt = build_checkpoint("heads", model={}, heads_config={}, train_config={}, class_names=["a", "b"],
    ...                         provenance={}, epoch=0, history=[], best_score=(0.5, 1.0), optimizer={}, scheduler={})
    >>> ckpt["format"], ckpt["version"], ckpt["kind"], ckpt["best_score"]
    ('emotion-attention/checkpoint', 1, 'heads', [0.5, 1.0])
    """
    if kind not in ("heads", "finetune"):
        raise ValueError(f"checkpoint kind must be heads or finetune, got {kind!r}")
    return {"format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, "kind": kind, "model": model,
            "heads_config": heads_config, "train_config": train_config, "class_names": list(class_names),
            "provenance": provenance, "epoch": epoch, "history": list(history), "best_score": list(best_score),
            "optimizer": optimizer, "scheduler": scheduler, **extra}


def read_checkpoint(path) -> dict:
    """A checkpoint of any version this code has written, as a dict with ``version`` set (0: before the format
    key); CheckpointError naming the file for anything else.

    >>> read_checkpoint("runs/heads/best.pt")["version"]  # doctest: +SKIP
    1
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint; train one with `emo-train heads`")
    ckpt = load_torch_file(path, "checkpoint")
    missing = [k for k in CHECKPOINT_KEYS if k not in ckpt] if isinstance(ckpt, dict) else ["everything: not a dict"]
    if missing or (isinstance(ckpt, dict) and ckpt.get("format", CHECKPOINT_FORMAT) != CHECKPOINT_FORMAT):
        raise CheckpointError(f"{path}: not a heads checkpoint (missing {missing or ckpt.get('format')}); it must"
                              " come from `emo-train heads` or `emo-train finetune`")
    version = ckpt.setdefault("version", 0)
    if version > CHECKPOINT_VERSION:
        raise CheckpointError(f"{path}: checkpoint format version {version} is newer than this code reads"
                              f" ({CHECKPOINT_VERSION}); update emotion-attention")
    return ckpt
