"""Small helpers every stage shares: which device, whether bf16 is fast, a file's hash, where failures go."""
from __future__ import annotations

import hashlib
from pathlib import Path

import torch


def failure_log_path(out_path: str | Path) -> Path:
    """The JSONL failure log beside a store: ``faces.h5`` -> ``faces.h5.failures.jsonl``."""
    return Path(out_path).with_name(Path(out_path).name + ".failures.jsonl")


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    """"auto" -> CUDA (``cuda:local_rank``) when torch sees a GPU, else CPU; CUDA asked for without one is an error.

    >>> resolve_device("cpu")
    device(type='cpu')
    """
    if name == "auto":
        return torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} asked for, but torch sees no CUDA GPU; use --device cpu or auto")
    return device


def cpu_has_bf16() -> bool:
    """True when oneDNN runs bf16 convolutions natively here (AVX512-BF16 or AMX), so bf16 is fast."""
    mkldnn_check = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", None)
    return bool(mkldnn_check()) if mkldnn_check is not None else False


def file_sha256(path: str | Path) -> str:
    """sha256 hex digest of a file, read in 1 MiB pieces (weights provenance).

    >>> len(file_sha256(Path(__file__)))
    64
    """
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()
