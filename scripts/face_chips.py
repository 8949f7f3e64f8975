"""Aligned face chips from images with dlib, for the fer goldens and the stills check (scripts only).

The project's own aligner is ``pipeline/faces.py``; these scripts keep a tiny, fixed copy of the same idea
(dlib HOG detector, 68-point landmarks, ``dlib.get_face_chip``) so the goldens never change when the
pipeline's alignment defaults do. The landmark model is found with ``importlib.util.find_spec`` because
``import face_recognition_models`` fails on current setuptools (it imports ``pkg_resources``).
The 68-point model was trained on iBUG 300-W (non-commercial use only).
"""
from __future__ import annotations

import importlib.util
from pathlib import Path

import cv2
import dlib
import numpy as np

CHIP_SIZE = 256  # the faces store's chip size (DESIGN.md)
CHIP_PADDING = 0.25  # dlib.get_face_chip's default margin around the landmarks


def landmark_model_path() -> Path:
    spec = importlib.util.find_spec("face_recognition_models")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("face-recognition-models is not installed in this venv; run `make install`")
    path = Path(spec.submodule_search_locations[0]) / "models" / "shape_predictor_68_face_landmarks.dat"
    if not path.is_file():
        raise SystemExit(f"{path}: missing; reinstall face-recognition-models")
    return path


def load_dlib_models() -> tuple:
    """(HOG face detector, 68-point shape predictor), loaded once."""
    return dlib.get_frontal_face_detector(), dlib.shape_predictor(str(landmark_model_path()))


def face_chips(rgb: np.ndarray, models: tuple, upsample: int = 1) -> np.ndarray:
    """All faces in one uint8 (H, W, 3) RGB image, largest first, as uint8 (K, 256, 256, 3) RGB chips."""
    detector, predictor = models
    boxes = sorted(detector(rgb, upsample), key=lambda r: -r.area())
    chips = [dlib.get_face_chip(rgb, predictor(rgb, box), size=CHIP_SIZE, padding=CHIP_PADDING) for box in boxes]
    return np.stack(chips) if chips else np.zeros((0, CHIP_SIZE, CHIP_SIZE, 3), np.uint8)


def read_rgb(path: Path) -> np.ndarray:
    bgr = cv2.imread(str(path))
    if bgr is None:
        raise SystemExit(f"{path}: cannot be read as an image; run `make sample-data`")
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)


def read_video_frames(path: Path, indices: list[int]) -> dict[int, np.ndarray]:
    """The listed frames of a video as RGB, read sequentially (seeking is unreliable across codecs)."""
    cap = cv2.VideoCapture(str(path))
    if not cap.isOpened():
        raise SystemExit(f"{path}: cannot be opened as a video; run `make sample-data`")
    wanted, frames, index = set(indices), {}, 0
    while len(frames) < len(wanted):
        ok, bgr = cap.read()
        if not ok:
            break
        if index in wanted:
            frames[index] = cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
        index += 1
    cap.release()
    return frames
