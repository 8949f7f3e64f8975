"""A tiny faces store for the fine-tuning and DDP tests: each class tints its faces with its own colour."""
from pathlib import Path

import numpy as np

from emotion_attention.cache import FacesStore

CLASSES = ["Angry", "Happy", "Sad"]
SIZE = 40        # stored face side; the tests crop 32 (VGG16 at 32 px: L = 2 x 2)


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
                arrays = {
                    "faces": faces, "frame_index": np.arange(frames, dtype=np.int32),
                    "timestamp_ms": np.arange(frames, dtype=np.float32) * 40, "present": present,
                    "box": np.where(present[:, None], [0, 0, SIZE, SIZE], np.nan).astype(np.float32),
                    "landmarks": np.zeros((frames, 68, 2), np.float32),
                    "score": np.ones(frames, np.float32), "how": present.astype(np.uint8),
                }
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
