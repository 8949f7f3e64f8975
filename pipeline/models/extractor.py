"""The in-memory feature extractor: uint8 faces in, float16 (V, N, L, D) maps out, with the speed settings
applied (channels_last, bf16 where the hardware has it). ``emo-cache extract`` wraps it in a store-to-store
stage; ``emo-predict`` uses it without any store.

Batches go in through ``launch`` and come back through ``Pending.wait``: on CPU the two are one call in a row;
on CUDA ``launch`` only queues the work (upload or GPU JPEG decoding, the network, the download on a second
stream into a pinned ``MapsBuffer``), so the caller launches batch k+1 before it waits for batch k, and the
download of k overlaps the compute of k+1 (``overlapped``). A ``MapsBuffer`` row is one face's maps laid out as
its features-store chunk, with room for the chunk's checksum, so the store writes it without another copy.
"""
from __future__ import annotations

import copy
import os
import warnings
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator, Optional, TypeVar

import numpy as np
import torch

from emotion_attention.pipeline.configs import ExtractConfig
from emotion_attention.pipeline.core.runtime import cpu_has_bf16, resolve_device
from emotion_attention.pipeline.models.backbones import Backbone, build_backbone, get_backbone

TORCH_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


FP16_MAX = 65504.0  # maps are stored as float16; larger values would become inf
CHECKSUM_BYTES = 4  # a features-store chunk is its maps then a fletcher32 sum (cache.common.write_chunks)


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
    cuda_bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
    return get_backbone(backbone).precision(device.type, device.type == "cpu" and cpu_has_bf16(), cuda_bf16)


@dataclass
class MapsBuffer:
    """Host memory for one batch's maps, one row per face: its float16 (V, L, D) maps, which are exactly the
    bytes of its features-store chunk, then ``CHECKSUM_BYTES`` spare bytes for the chunk's fletcher32 sum.

    Pinned on CUDA, so the download is an asynchronous DMA straight into the rows the store writes from.
    """
    raw: torch.Tensor   # uint8 (B, V*L*D*2 + CHECKSUM_BYTES)
    maps: torch.Tensor  # float16 (B, V, L, D), a view of raw's rows without their spare bytes
    index: Optional[int] = None  # its place in a writer process's shared ring (cache.writer_process)

    @classmethod
    def allocate(cls, batch: int, views: int, L: int, D: int, pin: bool = False,
                 device: Optional[torch.device] = None) -> "MapsBuffer":
        row = views * L * D * 2
        raw = torch.empty((batch, row + CHECKSUM_BYTES), dtype=torch.uint8, device=device, pin_memory=pin)
        return cls.over(raw, views, L, D)

    @classmethod
    def over(cls, raw: torch.Tensor, views: int, L: int, D: int, index: Optional[int] = None) -> "MapsBuffer":
        """A MapsBuffer in the uint8 (B, V*L*D*2 + CHECKSUM_BYTES) memory ``raw`` (no copy)."""
        batch, row = raw.shape[0], views * L * D * 2
        maps = raw[:, :row].view(torch.float16).view(batch, views, L, D)  # (B, V, L, D), row stride kept
        return cls(raw, maps, index)

    def rows(self, n: int) -> np.ndarray:
        """uint8 (n, V*L*D*2 + 4): the first n rows, as the store writes them (no copy)."""
        return self.raw[:n].numpy()

    def views_first(self, n: int) -> np.ndarray:
        """float16 (V, n, L, D) copy of the first n faces' maps (the layout readers get)."""
        return np.ascontiguousarray(self.maps[:n].numpy().transpose(1, 0, 2, 3))


class Pending:
    """A launched batch: ``wait()`` returns its MapsBuffer once the maps are in it (at once on CPU)."""

    def __init__(self, out: MapsBuffer, ready: Optional["torch.cuda.Event"] = None):
        self.out, self._ready = out, ready

    def wait(self) -> MapsBuffer:
        if self._ready is not None:
            self._ready.synchronize()  # releases the GIL while the download finishes
            self._ready = None
        return self.out


T = TypeVar("T")


def overlapped(items: Iterable[T], launch: Callable[[T], Pending]) -> Iterator[tuple[T, MapsBuffer]]:
    """(item, maps) in order, launching item k+1 before waiting for item k.

    On CUDA this keeps the GPU busy while the caller handles item k's maps (the download of k runs on the copy
    stream while k+1 computes); on CPU ``launch`` computes at once and this is a plain loop. A caller that
    hands each item its own MapsBuffer from a ring needs two of them: item k's buffer is free again when the
    caller asks for the next pair.
    """
    previous: Optional[tuple[T, Pending]] = None
    for item in items:
        pending = launch(item)
        if previous is not None:
            yield previous[0], previous[1].wait()
        previous = (item, pending)
    if previous is not None:
        yield previous[0], previous[1].wait()


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
        self.cuda = self.device.type == "cuda"
        self._staging: Optional[torch.Tensor] = None    # forward_batch's input buffer (pinned on CUDA)
        self._scratch: Optional[MapsBuffer] = None      # forward_batch's output buffer
        self._registered: list = []                     # host memory page-locked by maps_buffer (release_buffers)
        self.streams = CudaStreams(self.device) if self.cuda else None  # downloads beside compute (None: in line)
        if self.cuda:
            torch.backends.cudnn.benchmark = True  # one fixed batch shape: the autotuned kernel is reused

    @property
    def decodes_jpeg(self) -> bool:
        """True when ``launch`` takes encoded JPEG chips and decodes them on the device (CUDA, gpu_decode)."""
        return self.cuda and self.cfg.gpu_decode

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

    # -- buffers ---------------------------------------------------------------------------------------
    def maps_buffer(self, over: Optional[np.ndarray] = None, index: Optional[int] = None) -> MapsBuffer:
        """A MapsBuffer of one batch (pinned on CUDA); in the uint8 (B, row) memory ``over`` when given (a writer
        process's shared ring, page-locked here on CUDA so that downloads into it stay asynchronous)."""
        cfg, L, D = self.cfg, self.spec.L, self.spec.D
        if over is None:
            return MapsBuffer.allocate(cfg.batch_size, cfg.views, L, D, pin=self.cuda)
        raw = torch.from_numpy(over)
        if self.cuda and pin_host_memory(raw):
            self._registered.append(raw)
        return MapsBuffer.over(raw, cfg.views, L, D, index)

    def release_buffers(self) -> None:
        """Undo ``maps_buffer``'s page-locking of memory it did not allocate, before that memory is unmapped."""
        while self._registered:
            torch.cuda.cudart().cudaHostUnregister(self._registered.pop().data_ptr())

    def faces_buffer(self, chip_shape: tuple) -> torch.Tensor:
        """uint8 (B, S, S, 3) input buffer of one batch (pinned on CUDA, so its upload is asynchronous)."""
        return torch.zeros((self.cfg.batch_size,) + tuple(chip_shape), dtype=torch.uint8, pin_memory=self.cuda)

    # -- compute ---------------------------------------------------------------------------------------
    @torch.inference_mode()
    def launch(self, faces, out: MapsBuffer) -> Pending:
        """Start the maps of one batch into ``out``.

        Arguments:
            faces: uint8 (B, S, S, 3) RGB chips, B = batch_size, rows past the real faces zeroed (a fixed
                shape keeps a face's maps independent of its batch); or, on CUDA, a list of at most B encoded
                JPEG chips (uint8 1-D arrays), decoded on the GPU.
            out: where the maps go (``maps_buffer``); row i holds face i's.
        Returns:
            Pending; its ``wait()`` returns ``out`` filled.
        """
        x = self._device_input(faces)                      # (B, S, S, 3) uint8 on the device
        if self.cfg.views == 2:
            x = torch.cat([x, x.flip(2)])                  # (V*B, S, S, 3); flip(2) mirrors left-right
        inp = self.backbone.prepare(x).to(TORCH_DTYPES[self.precision]).contiguous(memory_format=torch.channels_last)
        out_maps = self.backbone.forward_maps(inp)         # (V*B, L, D)
        if out_maps.dtype == torch.float16:
            out_maps = out_maps.float()                    # as before: NaN payloads then match bit for bit
        b = self.cfg.batch_size
        by_face = out_maps.view(self.cfg.views, b, *out_maps.shape[1:]).transpose(0, 1)  # (B, V, L, D)
        if self.streams is None:
            to_rows(by_face, out)                          # into the rows the store writes
            return Pending(out)
        return self._download(by_face, out)

    def _device_input(self, faces) -> torch.Tensor:
        b = self.cfg.batch_size
        if isinstance(faces, list):  # encoded chips: decoded on the GPU, the host only read their bytes
            return decode_jpegs_on(faces, b, self.device)
        x = faces if isinstance(faces, torch.Tensor) else torch.from_numpy(faces)
        if x.shape[0] != b:
            raise ValueError(f"launch needs a full batch of {b} chips (zero-padded), got {x.shape[0]}")
        return x.to(self.device, non_blocking=True) if self.cuda else x  # pinned: an asynchronous upload

    def _download(self, by_face: torch.Tensor, out: MapsBuffer) -> Pending:
        """float16 rows on the device, then their download on the copy stream, after the compute that made them."""
        dev = MapsBuffer.allocate(by_face.shape[0], *by_face.shape[1:], device=self.device)
        to_rows(by_face, dev)                              # (B, V, L, D) float16, in the chunk-row layout
        return Pending(out, self.streams.download(dev.raw, out.raw, self.streams.computed()))

    def forward_batch(self, faces: np.ndarray) -> np.ndarray:
        """uint8 (n, S, S, 3), n <= batch_size -> float16 (V, n, L, D); zero-pads to batch_size first."""
        n, b = len(faces), self.cfg.batch_size
        if n > b:
            raise ValueError(f"forward_batch got {n} faces, batch_size is {b}")
        if self._staging is None or tuple(self._staging.shape[1:]) != tuple(faces.shape[1:]):
            self._staging = self.faces_buffer(faces.shape[1:])
            self._scratch = self.maps_buffer()
        x = self._staging
        x[:n] = torch.from_numpy(np.ascontiguousarray(faces))
        x[n:] = 0
        return self.launch(x, self._scratch).wait().views_first(n)

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


def pin_host_memory(raw: torch.Tensor) -> bool:
    """Page-lock host memory that torch did not allocate (cudaHostRegister), so copies into it run as DMA; where
    the driver refuses, the copies still work, synchronously, and a warning says so. True when locked."""
    code = torch.cuda.cudart().cudaHostRegister(raw.data_ptr(), raw.numel() * raw.element_size(), 0)
    if int(code) != 0:
        warnings.warn(f"cudaHostRegister failed ({code}): the maps' downloads into the writer's shared buffers are"
                      " synchronous", stacklevel=2)
    return int(code) == 0


def to_rows(maps: torch.Tensor, out: MapsBuffer) -> None:
    """fp32/bf16 (B, V, L, D) maps -> float16 rows of ``out``, values above FP16_MAX (inf included) clamped to it.

    Rounded first, then clamped in float16: the same bits as clamping in fp32 and rounding (a value above
    FP16_MAX rounds to FP16_MAX or inf, both clamped), with one pass fewer over fp32 data.
    """
    out.maps.copy_(maps)
    out.maps.clamp_(max=FP16_MAX)


class CudaStreams:
    """The compute stream (the current one) and a copy stream beside it: a batch's download waits for its own
    compute only, so it runs while the next batch computes."""

    def __init__(self, device: torch.device):
        self.device = device
        self.copy = torch.cuda.Stream(device)

    def computed(self) -> "torch.cuda.Event":
        """An event at the current end of the compute stream."""
        event = torch.cuda.Event()
        event.record(torch.cuda.current_stream(self.device))
        return event

    def download(self, src: torch.Tensor, dst: torch.Tensor, after: "torch.cuda.Event") -> "torch.cuda.Event":
        """Copy ``src`` (device) into ``dst`` (pinned host) on the copy stream once ``after`` has happened; the
        returned event marks the end of the copy."""
        self.copy.wait_event(after)
        with torch.cuda.stream(self.copy):
            dst.copy_(src, non_blocking=True)  # one contiguous DMA into pinned memory
        src.record_stream(self.copy)           # the allocator keeps src until the copy is done
        ready = torch.cuda.Event()
        ready.record(self.copy)
        return ready


def decode_jpegs_on(encoded: list, batch: int, device: torch.device) -> torch.Tensor:
    """Encoded JPEG chips -> uint8 (batch, S, S, 3) RGB on ``device``, decoded there in one batched call
    (torchvision's nvJPEG path on CUDA), rows past the chips zero.

    nvJPEG's pixels may differ from OpenCV's (libjpeg-turbo) by a level here and there; ``--no-gpu-decode``
    decodes on the host instead. On CPU (tests) the same call runs libjpeg-turbo.
    """
    from torchvision.io import ImageReadMode, decode_jpeg  # lazy: importing torchvision costs ~2 s (torch._dynamo)

    data = [torch.frombuffer(np.ascontiguousarray(e, np.uint8), dtype=torch.uint8) for e in encoded]
    images = decode_jpeg(data, mode=ImageReadMode.RGB, device=device) if data else []  # each (3, S, S)
    if not images:
        raise ValueError("decode_jpegs_on got no chips")
    side = images[0].shape[1:]
    x = torch.zeros((batch, 3, *side), dtype=torch.uint8, device=device)  # (B, 3, S, S)
    torch.stack(images, out=x[:len(images)])
    return x.permute(0, 2, 3, 1)                                         # (B, S, S, 3), as prepare expects
