"""Builders for the preprocessing tests: small datasets from the real samples, with planted problems."""
from __future__ import annotations

import shutil
from pathlib import Path

import cv2
import numpy as np


def write_bad_media(folder: Path) -> dict[str, Path]:
    """A corrupt (truncated) video, an empty file and a text file named .avi, in ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    real = (Path(__file__).resolve().parents[1] / "data" / "samples" / "single_face.mp4").read_bytes()
    paths = {"corrupt": folder / "corrupt.mp4", "empty": folder / "empty.avi", "text": folder / "notes.avi"}
    paths["corrupt"].write_bytes(real[: len(real) // 3])   # cut before the index: unreadable container
    paths["empty"].write_bytes(b"")
    paths["text"].write_text("this is not a video\n")
    return paths


def write_zero_frame_video(path: Path) -> Path:
    """A valid MJPG AVI container holding no frames."""
    path.parent.mkdir(parents=True, exist_ok=True)
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 25, (64, 48))
    writer.release()
    return path


def write_mjpg_video(path: Path, frames: list[np.ndarray], fps: float = 25) -> Path:
    """uint8 RGB frames -> an MJPG AVI (OpenCV here has no H.264 encoder)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    h, w = frames[0].shape[:2]
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), fps, (w, h))
    for rgb in frames:
        writer.write(cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    writer.release()
    return path


def copy_sample(samples: Path, name: str, dest: Path) -> Path:
    dest.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(samples / name, dest)
    return dest


def build_face_dataset(root: Path, samples: Path, bad: bool = True) -> Path:
    """<split>/<label>/<clip> tree: three good real clips and (``bad``) three broken files."""
    copy_sample(samples, "single_face.mp4", root / "Train" / "Happy" / "single_face.mp4")
    copy_sample(samples, "carphone_pristine.mp4", root / "Train" / "Neutral" / "carphone.mp4")
    copy_sample(samples, "noface_face.mov", root / "Val" / "Sad" / "noface_face.mov")
    if bad:
        write_bad_media(root / "Val" / "Angry")
    return root
