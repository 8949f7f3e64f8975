"""The in-memory feature extractor: uint8 faces in, float16 (V, N, L, D) maps out, with the speed settings
applied (channels_last, bf16 where the hardware has it, pinned buffers on CUDA). ``emo-cache extract`` wraps it
in a store-to-store stage; ``emo-predict`` uses it without any store."""
from __future__ import annotations

import copy
import os
import warnings
from typing import Optional

import numpy as np
import torch

from emotion_attention.pipeline.configs import ExtractConfig
from emotion_attention.pipeline.core.runtime import cpu_has_bf16, resolve_device
from emotion_attention.pipeline.models.backbones import Backbone, build_backbone

TORCH_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


FP16_MAX = 65504.0  # maps are stored as float16; larger values would become inf


def extract_device(name: str) -> torch.device:
    """``resolve_device``, with CUDA on this process's own GPU (``cuda:LOCAL_RANK``) under torchrun."""
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    device = resolve_device(name, local_rank)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", local_rank)
    return device


def resolve_precision(name: str, device: torch.device, backbone: str = "vgg16") -> str:
    """"auto" -> "bf16" on bf16 hardware, else "fp32" on CPU / "fp16" on CUDA; others unchanged.

    >>> resolve_precision("fp32", torch.device("cpu"))
    'fp32'
    """
    if name != "auto":
        if name == "fp16" and device.type == "cpu":
            warnings.warn("fp16 on CPU has no fast kernels (about 100x slower than bf16/fp32); prefer --precision"
                          " bf16 or fp32", stacklevel=2)
        return name
    from emotion_attention.pipeline.models.backbones import get_backbone

    cuda_bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
    return get_backbone(backbone).precision(device.type, device.type == "cpu" and cpu_has_bf16(), cuda_bf16)


class FeatureExtractor:
    """A loaded backbone with the speed settings applied: uint8 faces in, float16 maps out.

    Arguments:
        cfg: an ExtractConfig (validated here).
        backbone: an already built Backbone to use instead of building one from ``cfg`` (copied, not moved).

    >>> fx = FeatureExtractor(ExtractConfig(weights="random", seed=0, input_size=32))  # doctest: +SKIP
    >>> fx.maps(np.zeros((3, 32, 32, 3), np.uint8)).shape  # doctest: +SKIP
    (1, 3, 4, 512)
    """

    def __init__(self, cfg: ExtractConfig, backbone: Optional[Backbone] = None):
        self.cfg = cfg
        self.device = extract_device(cfg.device)
        self.precision = resolve_precision(cfg.precision, self.device, cfg.backbone)
        if backbone is not None:
            bb = copy.deepcopy(backbone)
        else:
            bb = build_backbone(cfg.backbone, cfg.weights, cfg.seed, cfg.input_size, cfg.crop)
        self.spec = bb.spec
        self.backbone = bb.to(self.device, dtype=TORCH_DTYPES[self.precision], memory_format=torch.channels_last)
        self._staging: Optional[torch.Tensor] = None   # pinned host buffers, reused by every CUDA batch
        self._download: Optional[torch.Tensor] = None
        if self.device.type == "cuda":
            torch.backends.cudnn.benchmark = True  # one fixed batch shape: the autotuned kernel is reused

    @property
    def backbone_name(self) -> str:
        return self.spec.name

    def provenance(self, faces_fingerprint: str) -> dict:
        """What made these maps: backbone spec, views, precision and the faces store's fingerprint.

        >>> fx.provenance("abc")["faces_fingerprint"]  # doctest: +SKIP
        'abc'
        """
        return {**self.spec.provenance(), "views": self.cfg.views, "precision": self.precision,
                "frames_per_clip": self.cfg.frames_per_clip, "map_dtype": self.cfg.map_dtype,
                "faces_fingerprint": faces_fingerprint}

    @torch.inference_mode()
    def forward_batch(self, faces: np.ndarray) -> np.ndarray:
        """uint8 (n, S, S, 3), n <= batch_size -> float16 (V, n, L, D); zero-pads to batch_size first."""
        n, b = len(faces), self.cfg.batch_size
        if n > b:
            raise ValueError(f"forward_batch got {n} faces, batch_size is {b}")
        x = self.staging((b,) + faces.shape[1:])  # fixed shape: results independent of batching
        x[:n] = torch.from_numpy(np.ascontiguousarray(faces))
        x[n:] = 0
        if self.device.type == "cuda":
            x = x.to(self.device, non_blocking=True)  # from pinned memory: an async copy
        if self.cfg.views == 2:
            x = torch.cat([x, x.flip(2)])  # (V*b, S, S, 3); flip(2) mirrors left-right
        inp = self.backbone.prepare(x).to(TORCH_DTYPES[self.precision]).contiguous(memory_format=torch.channels_last)
        out = self.backbone.forward_maps(inp)  # (V*b, L, D)
        out = out.float().clamp_(max=FP16_MAX).half().view(self.cfg.views, b, *out.shape[1:])  # (V, b, L, D)
        if self.device.type != "cuda":
            return out[:, :n].numpy()
        # Into a reused pinned buffer, then one host copy: on an H200 a 67 MB download into fresh pageable
        # memory took 40 ms per batch of 256, more than the network (bench/gpu_extract_phases.py).
        host = self._buffer("_download", tuple(out.shape), torch.float16)
        host.copy_(out, non_blocking=True)
        torch.cuda.current_stream(self.device).synchronize()
        return host[:, :n].numpy().copy()

    def staging(self, shape: tuple) -> torch.Tensor:
        """The uint8 input buffer of one batch: allocated (and pinned, on CUDA) once, not per batch.

        Pinning a fresh tensor per batch costs a cudaHostAlloc each time; the copy of batch k+1 into the
        buffer waits for batch k's upload, which the synchronised download at the end of forward_batch
        has finished.
        """
        return self._buffer("_staging", shape, torch.uint8)

    def _buffer(self, name: str, shape: tuple, dtype: torch.dtype) -> torch.Tensor:
        """A host buffer kept on the extractor (pinned on CUDA), reallocated only when the shape changes."""
        buf = getattr(self, name, None)
        if buf is None or tuple(buf.shape) != shape:
            buf = torch.empty(shape, dtype=dtype, pin_memory=self.device.type == "cuda")
            setattr(self, name, buf)
        return buf

    def maps(self, faces: np.ndarray) -> np.ndarray:
        """Maps of uint8 (N, S, S, 3) RGB chips, in batches of ``batch_size``.

        Arguments:
            faces: uint8 (N, S, S, 3) RGB aligned chips (any N, including 0).
        Returns:
            float16 (V, N, L, D); view 1 (if any) is the mirrored chip.

        >>> FeatureExtractor(ExtractConfig(weights="random", seed=0, input_size=32)).maps(
        ...     np.zeros((5, 32, 32, 3), np.uint8)).shape  # doctest: +SKIP
        (1, 5, 4, 512)
        """
        if faces.dtype != np.uint8 or faces.ndim != 4 or faces.shape[-1] != 3:
            raise ValueError(f"faces must be uint8 (N, S, S, 3) RGB, got {faces.dtype} {faces.shape}")
        b = self.cfg.batch_size
        parts = [self.forward_batch(faces[i:i + b]) for i in range(0, len(faces), b)]
        if not parts:
            return np.zeros((self.cfg.views, 0, self.spec.L, self.spec.D), np.float16)
        return np.concatenate(parts, axis=1)
