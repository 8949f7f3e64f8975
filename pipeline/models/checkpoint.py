"""The one place a torch file is written or read: atomic writes, weights-only reads with one-line errors."""
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
