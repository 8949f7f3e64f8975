"""A tiny faces store for the fine-tuning and DDP tests: each class tints its faces with its own colour."""
from pathlib import Path

import numpy as np

from emotion_attention.cache import FacesStore

CLASSES = ["Angry", "Happy", "Sad"]
SIZE = 40        # stored face side; the tests crop 32 (VGG16 at 32 px: L = 2 x 2)


def face_records(faces: np.ndarray, present: np.ndarray) -> dict:
    """A clip's rows for ``FacesStore.write_clip``: the faces, a whole-chip box where a face is, 25 fps."""
    frames, size = len(faces), faces.shape[1]
    return {"faces": faces, "frame_index": np.arange(frames, dtype=np.int32),
            "timestamp_ms": np.arange(frames, dtype=np.float32) * 40, "present": present,
            "box": np.where(present[:, None], [0, 0, size, size], np.nan).astype(np.float32),
            "landmarks": np.zeros((frames, 68, 2), np.float32),
            "score": np.ones(frames, np.float32), "how": present.astype(np.uint8)}


def make_tiny_faces_store(path: Path, clips_per_class: int = 1, frames: int = 6, seed: int = 0) -> Path:
    """Write a faces store of ``len(CLASSES) * clips_per_class`` Train clips; frame 1 has no face."""
    rng = np.random.default_rng(seed)
    with FacesStore(path, "a", config={"class_names": CLASSES, "size": SIZE, "frames": frames, "test": "finetune"},
                    code_version="test") as store:
        for k, label in enumerate(CLASSES):
            for j in range(clips_per_class):
                faces = rng.integers(0, 60, (frames, SIZE, SIZE, 3), dtype=np.uint8)
                faces[..., k % 3] += 150  # the class evidence: one colour channel lit
                present = np.ones(frames, bool)
                present[1] = False
                faces[1] = 0
                arrays = face_records(faces, present)
                store.write_clip(f"Train/{label}/{j:03d}.avi", arrays,
                                 {"label": label, "split": "Train", "source": "generated", "fps": 25.0,
                                  "total_frames": frames})
    return path


def write_standin_vgg16(path: Path, seed: int = 0, layout: str = "torchvision") -> Path:
    """A stand-in for pretrained VGG16 weights, in a real layout: He (fan-in) init keeps conv5
    maps at unit scale, unlike torchvision's fan-out init whose maps shrink to ~0.03."""
    import torch

    from emotion_attention.pipeline.models.backbones import build_vgg16_trunk
    from emotion_attention.pipeline.stages.finetune import trunk_state

    torch.manual_seed(seed)
    state = trunk_state(build_vgg16_trunk(), layout)
    for key, value in state.items():
        if key.endswith("weight"):
            state[key] = torch.randn(value.shape) * (2.0 / value[0].numel()) ** 0.5
        else:
            state[key] = torch.zeros_like(value)
    torch.save(state, path)
    return path


CARTOON_CLASSES = ["Angry", "Happy", "Sad", "Surprise"]


def cartoon_face(label: str, rng: np.random.Generator, size: int = 64) -> np.ndarray:
    """A drawn grey face whose brows and mouth carry ``label`` (uint8 (size, size, 3)), jittered in place, scale,
    brightness and noise: something a real expression network (fer's mini-Xception) reads partly, not perfectly."""
    import cv2

    img = np.full((size, size), int(rng.integers(20, 70)), np.uint8)
    c = size / 2 + rng.normal(0, size * 0.03, 2)
    s = size * rng.uniform(0.36, 0.44)
    tone = int(rng.integers(150, 220))
    cv2.ellipse(img, (int(c[0]), int(c[1])), (int(s * 0.8), int(s)), 0, 0, 360, tone, -1)
    dark = max(tone - 120, 0)
    eye_y, eye_dx = int(c[1] - s * 0.25), int(s * 0.35)
    for sx in (-1, 1):
        cv2.circle(img, (int(c[0] + sx * eye_dx), eye_y), max(int(s * 0.08), 1), dark, -1)
        inner, outer = (int(c[0] + sx * eye_dx * 0.4), eye_y), (int(c[0] + sx * eye_dx * 1.5), eye_y)
        lift = {"Angry": (-0.05, -0.3), "Surprise": (-0.5, -0.5), "Sad": (-0.4, -0.15)}.get(label, (-0.25, -0.25))
        cv2.line(img, (inner[0], int(eye_y + lift[0] * s)), (outer[0], int(eye_y + lift[1] * s)), dark, 2)
    mouth = (int(c[0]), int(c[1] + s * 0.45))
    w = int(s * rng.uniform(0.3, 0.45))
    if label == "Happy":
        cv2.ellipse(img, (mouth[0], mouth[1] - w // 3), (w, w // 2), 0, 20, 160, dark, 2)
    elif label == "Sad":
        cv2.ellipse(img, (mouth[0], mouth[1] + w // 3), (w, w // 2), 0, 200, 340, dark, 2)
    elif label == "Surprise":
        cv2.ellipse(img, mouth, (max(w // 2, 2), max(w // 1.5, 2).__int__()), 0, 0, 360, dark, -1)
    else:
        cv2.line(img, (mouth[0] - w, mouth[1]), (mouth[0] + w, mouth[1]), dark, 3)
    img = np.clip(img.astype(np.float32) + rng.normal(0, 12, img.shape), 0, 255).astype(np.uint8)
    return np.repeat(img[..., None], 3, axis=-1)


def make_cartoon_faces_store(path: Path, counts: dict, frames: int = 4, size: int = 64, seed: int = 0,
                             label_noise: float = 0.0) -> Path:
    """A faces store of drawn faces, ``counts[label]`` Train clips per class of ``frames`` faces each; a share
    ``label_noise`` of the clips carry a random other label, as crowd-sourced labels do."""
    rng = np.random.default_rng(seed)
    with FacesStore(path, "a", config={"class_names": CARTOON_CLASSES, "size": size, "frames": frames,
                                       "test": "cartoon"}, code_version="test") as store:
        for label in CARTOON_CLASSES:
            for j in range(counts.get(label, 0)):
                faces = np.stack([cartoon_face(label, rng, size) for _ in range(frames)])
                arrays = face_records(faces, np.ones(frames, bool))
                given = label
                if rng.random() < label_noise:
                    given = str(rng.choice([c for c in CARTOON_CLASSES if c != label]))
                store.write_clip(f"Train/{label}/{j:03d}.avi", arrays,
                                 {"label": given, "split": "Train", "source": "generated", "fps": 25.0,
                                  "total_frames": frames})
    return path
