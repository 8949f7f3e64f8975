"""End-to-end fine-tuning of VGG16 and the attention/TP heads on aligned faces (paper Sec. 4.2).

Reads the faces store (pixels), not the features store: the backbone changes while it trains.
Runs on one CPU, one GPU, or many processes under ``torchrun`` (DDP: gloo on CPU, nccl on CUDA).

Files written into the run folder (rank 0 only):
    finetune_config.json  the resolved FinetuneConfig
    checkpoint.pt         plain dict like ``emo-train heads``' checkpoint plus ``backbone`` (see
                          ``checkpoint_dict``); also what ``--resume`` continues from
    backbone.pt           the trunk's weights in the layout of the weights it started from (torchvision's
                          ``features.N.*`` or VGG-Face's ``convX_Y.*``), so that ``emo-cache extract FACES
                          --weights RUN_DIR/backbone.pt --crop 224`` re-caches features for these heads
    log.csv               one row per epoch: loss, cross-entropy, penalty, train accuracy, learning rates, seconds
"""
from __future__ import annotations

import csv
import json
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from torch import nn

from pipeline.backbones import VGG16_CONV_INDICES, VGG16_CONV_NAMES, VGG16_TRUNK_LEN
from pipeline.clip_batches import sample_frames
from pipeline.runtime import cpu_has_bf16, resolve_device
from pipeline.train import save_checkpoint

# VGG16 ``features`` indices where each conv block starts; conv5_3 + ReLU ends at index 29 (no pool5).
VGG16_BLOCK_STARTS = (0, 5, 10, 17, 24)


@dataclass(frozen=True)
class FinetuneConfig:
    weights: str = ""             # VGG16 init: torchvision or VGG-Face state dict path, or "random" (tests only)
    seed: int = 0                 # one seed drives init of new heads, clip order, frame picks and crops
    split: str = "Train"          # trains on this split of the faces store; Val is never touched here
    epochs: int = 30              # Sec. 4.2: "all models are fine-tuned for 30 epochs"
    frames_per_clip: int = 16     # Sec. 4.2: 16 random frames per clip (all present ones if fewer)
    batch_clips: int = 4          # clips per step per process: 4 x 16 = 64 faces, VGG16's usual ImageNet batch
    crop: int = 224               # Sec. 4.2 random crop, 224 from the 256 px faces (centre crop at eval)
    mirror: bool = True           # Sec. 4.2 mirroring: flip a whole clip left-right with p = 0.5
    lr_backbone: float = 1e-5     # Sec. 4.2: pretrained conv layers move slowly
    lr_heads: float = 0.1         # Sec. 4.2: "0.1 for the rest of the parameters"
    momentum: float = 0.9         # SGD with momentum, as for the heads (issue 4)
    weight_decay: float = 5e-5    # Sec. 4.2
    sgdr_t0: int = 10             # SGDR: first cosine cycle in epochs (30 epochs = 3 restarts)
    sgdr_tmult: int = 1           # SGDR: cycle length multiplier after each restart
    freeze_blocks: int = 0        # keep VGG16 blocks 1..N fixed: generic low-level filters, less memory
    precision: str = "auto"       # auto: bf16 autocast on CPUs with bf16 units, fp16 on CUDA; or fp32|bf16|fp16
    grad_checkpoint: bool = False  # recompute trunk activations in backward: ~1/3 more time, far less memory
    workers: int = 2              # DataLoader processes reading the faces store (h5py opened inside each)
    device: str = "auto"          # auto: cuda:LOCAL_RANK when CUDA is present, else cpu
    heads_hidden: int = 128       # new heads only (no --init): attention hidden units U, as emo-train heads
    heads_count: int = 2          # new heads only: attention heads R (Table 1's best: 2 heads ...)
    heads_reg: float = 1.0        # new heads only: ... with strong penalty (Table 1's best)
    resume: bool = True           # continue from RUN_DIR/checkpoint.pt when it exists and settings match

    def validate(self) -> None:
        """Raise ValueError naming the field that is wrong; never changes a value."""
        if not self.weights:
            raise ValueError("weights: give a VGG16 state dict path (torchvision or VGG-Face layout),"
                             " or 'random' for a plumbing test")
        if self.weights != "random" and not Path(self.weights).is_file():
            raise ValueError(f"weights: {self.weights} is not a file")
        for name in ("epochs", "frames_per_clip", "batch_clips", "crop", "sgdr_t0", "sgdr_tmult"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not 0 <= self.freeze_blocks <= 5:
            raise ValueError(f"freeze_blocks must be 0..5 (VGG16 has 5 conv blocks), got {self.freeze_blocks}")
        if self.precision not in ("auto", "fp32", "bf16", "fp16"):
            raise ValueError(f"precision must be auto|fp32|bf16|fp16, got {self.precision!r}")
        if self.workers < 0:
            raise ValueError(f"workers must be >= 0, got {self.workers}")


# -- distributed environment ------------------------------------------------------------------
@dataclass(frozen=True)
class DistEnv:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def dist_env_from(environ: dict) -> DistEnv:
    """Read torchrun's RANK / WORLD_SIZE / LOCAL_RANK; absent means a single process.

    >>> dist_env_from({"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1"}).is_main
    False
    """
    return DistEnv(int(environ.get("RANK", 0)), int(environ.get("WORLD_SIZE", 1)),
                   int(environ.get("LOCAL_RANK", 0)))


def resolve_precision(precision: str, device: torch.device) -> Optional[torch.dtype]:
    """Autocast dtype for the trunk, or None for fp32.

    'auto': fp16 on CUDA (with a GradScaler), bf16 on CPUs whose oneDNN has native bf16
    (``pipeline.runtime.cpu_has_bf16``), else fp32.

    >>> resolve_precision("fp32", torch.device("cpu")) is None
    True
    """
    if precision == "fp32":
        return None
    if precision == "auto":
        if device.type == "cuda":
            return torch.float16
        return torch.bfloat16 if cpu_has_bf16() else None
    return {"bf16": torch.bfloat16, "fp16": torch.float16}[precision]


# -- data ---------------------------------------------------------------------------------------
def augment_faces(faces: np.ndarray, crop: int, rng: Optional[np.random.Generator],
                  mirror: bool = True) -> np.ndarray:
    """Crop (random with ``rng``, centre without) and maybe mirror a clip's faces the same way.

    Arguments:
        faces: uint8 (T, S, S, 3).
        crop: output side; must be <= S.
        rng: None for evaluation (centre crop, no mirror).
        mirror: with ``rng``, flip the clip left-right with probability 0.5.
    Returns:
        uint8 (T, 3, crop, crop), channels first for the network.

    >>> augment_faces(np.zeros((2, 8, 8, 3), np.uint8), 6, None).shape
    (2, 3, 6, 6)
    """
    s = faces.shape[1]
    if crop > s:
        raise ValueError(f"crop {crop} is larger than the stored faces ({s} px)")
    if rng is None:
        y = x = (s - crop) // 2
        flip = False
    else:
        y, x = rng.integers(0, s - crop + 1, size=2)
        flip = bool(rng.random() < 0.5) and mirror
    out = faces[:, y:y + crop, x:x + crop]
    if flip:
        out = out[:, :, ::-1]
    return np.ascontiguousarray(out.transpose(0, 3, 1, 2))  # (T, 3, crop, crop)


class FacesClips(torch.utils.data.Dataset):
    """Clips of the faces store as (faces uint8 (T, 3, c, c), mask bool (T,), label) items.

    The HDF5 file is opened lazily in whichever process reads (each DataLoader worker opens its
    own handle; h5py handles cannot cross a fork). Frame picks and crops depend only on
    (seed, epoch, clip position), so a run is reproducible whatever the worker count.
    """

    def __init__(self, faces_path, clip_ids: list[str], labels: list[int], cfg: FinetuneConfig,
                 train: bool = True):
        self.faces_path = str(faces_path)
        self.clip_ids, self.labels = list(clip_ids), list(labels)
        self.cfg, self.train, self.epoch = cfg, train, 0
        self._store, self._pid = None, None

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.clip_ids)

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_store": None}  # never ship an open h5py handle to a worker

    def _open(self):
        if self._store is None or self._pid != os.getpid():  # a forked worker opens its own handle
            from cache import FacesStore
            self._store, self._pid = FacesStore(self.faces_path, "r"), os.getpid()
        return self._store

    def __getitem__(self, i: int):
        store, cid, cfg = self._open(), self.clip_ids[i], self.cfg
        rng = np.random.default_rng([cfg.seed, self.epoch, i])
        present = store.read_present(cid)
        frames = sample_frames(present, cfg.frames_per_clip, rng)  # the heads' Sec. 4.2 rule
        faces = store.read_faces(cid, frames) if len(frames) else np.zeros((0, 1, 1, 3), np.uint8)
        t = cfg.frames_per_clip
        out = np.zeros((t, 3, cfg.crop, cfg.crop), np.uint8)
        if len(frames):
            out[:len(frames)] = augment_faces(faces, cfg.crop, rng if self.train else None, cfg.mirror)
        mask = np.arange(t) < len(frames)
        return torch.from_numpy(out), torch.from_numpy(mask), self.labels[i]


# -- model ------------------------------------------------------------------------------------
class FinetuneModel(nn.Module):
    """VGG16 trunk (to conv5_3 + ReLU) feeding the heads; faces in, HeadsOutput out.

    Arguments:
        trunk: ``nn.Sequential`` of VGG16 ``features[:30]``.
        heads: the attention + TP heads (``pipeline.heads.EmotionHeads``).
        mean, std: per-channel normalisation of 0-255 RGB input (the weights' own convention).
        grad_checkpoint: recompute the trunk's activations during backward.
        autocast: dtype the trunk runs in (bf16 / fp16), or None for fp32. The heads always run
            in fp32: they are cheap, and the softmax over all (f, c) is where precision matters.

    >>> from pipeline.backbones import build_vgg16_trunk
    >>> from pipeline.heads import EmotionHeads, HeadsConfig
    >>> model = FinetuneModel(build_vgg16_trunk(), EmotionHeads(HeadsConfig()), [0] * 3, [255] * 3)
    >>> model(torch.zeros(1, 4, 3, 32, 32, dtype=torch.uint8), torch.ones(1, 4, dtype=torch.bool)).log_probs.shape
    torch.Size([1, 7])
    """

    def __init__(self, trunk: nn.Sequential, heads: nn.Module, mean, std, grad_checkpoint=False,
                 autocast: Optional[torch.dtype] = None):
        super().__init__()
        self.trunk, self.heads, self.grad_checkpoint = trunk, heads, grad_checkpoint
        self.autocast = autocast
        if grad_checkpoint:
            for layer in trunk:  # an in-place ReLU would overwrite a segment boundary that backward re-reads
                if isinstance(layer, nn.ReLU):
                    layer.inplace = False
        self.register_buffer("mean", torch.as_tensor(mean, dtype=torch.float32).view(1, 3, 1, 1))
        self.register_buffer("std", torch.as_tensor(std, dtype=torch.float32).view(1, 3, 1, 1))

    def maps(self, faces: torch.Tensor) -> torch.Tensor:
        """uint8 (N, 3, H, W) -> (N, L, D) conv5_3 maps."""
        x = (faces.float() - self.mean) / self.std
        if self.autocast is not None:
            x = x.contiguous(memory_format=torch.channels_last)  # oneDNN / cuDNN's fast layout for bf16
        with torch.autocast(x.device.type, dtype=self.autocast or torch.float32,
                            enabled=self.autocast is not None):
            if self.grad_checkpoint and self.training and torch.is_grad_enabled():
                from torch.utils.checkpoint import checkpoint_sequential
                y = checkpoint_sequential(self.trunk, 5, x, use_reentrant=False)
            else:
                y = self.trunk(x)
        return y.float().flatten(2).transpose(1, 2)  # (N, L, D)

    def forward(self, faces: torch.Tensor, mask: torch.Tensor):
        """faces uint8 (B, T, 3, H, W), mask bool (B, T) -> the heads' output.

        Only present frames go through the trunk; padded ones get zero maps and stay masked.
        """
        b, t = mask.shape
        maps = self.maps(faces[mask])  # (N, L, D) for the N present frames
        full = maps.new_zeros((b, t) + tuple(maps.shape[1:]))  # (B, T, L, D)
        full[mask] = maps
        return self.heads(full, mask)


def freeze_lower_blocks(trunk: nn.Sequential, n_blocks: int) -> int:
    """Stop gradients for VGG16 blocks 1..n; returns how many parameters were frozen.

    >>> from pipeline.backbones import build_vgg16_trunk
    >>> freeze_lower_blocks(build_vgg16_trunk(), 1)
    38720
    """
    stop = VGG16_BLOCK_STARTS[n_blocks] if n_blocks < 5 else VGG16_TRUNK_LEN
    frozen = 0
    for i, layer in enumerate(trunk):
        if i < stop:
            for p in layer.parameters():
                p.requires_grad_(False)
                frozen += p.numel()
    return frozen


# -- optimisation -----------------------------------------------------------------------------
def _make_optimizer(model: FinetuneModel, cfg: FinetuneConfig) -> torch.optim.Optimizer:
    """SGD + momentum with the paper's two learning rates (backbone 1e-5, heads 0.1)."""
    groups = [
        {"params": [p for p in model.trunk.parameters() if p.requires_grad], "lr": cfg.lr_backbone,
         "name": "backbone"},
        {"params": [p for p in model.heads.parameters() if p.requires_grad], "lr": cfg.lr_heads,
         "name": "heads"},
    ]
    groups = [g for g in groups if g["params"]]
    return torch.optim.SGD(groups, momentum=cfg.momentum, weight_decay=cfg.weight_decay)


def _make_scheduler(opt, cfg: FinetuneConfig, steps_per_epoch: int):
    """SGDR (Loshchilov & Hutter): cosine cycles of ``sgdr_t0`` epochs, stepped every batch."""
    return torch.optim.lr_scheduler.CosineAnnealingWarmRestarts(
        opt, T_0=max(1, cfg.sgdr_t0 * steps_per_epoch), T_mult=cfg.sgdr_tmult)


# -- the stage --------------------------------------------------------------------------------
@dataclass
class FinetuneResult:
    run_dir: Path
    history: list[dict]          # one dict per epoch (the rows of log.csv)
    model: FinetuneModel         # the trained model (unwrapped from DDP), on its device
    env: DistEnv


def list_training_clips(faces_path, split: str, log=print) -> tuple[list[str], list[int], list[str]]:
    """(clip ids, label indices, class names) of the split's clips that have at least one face.

    Raises ValueError naming a clip whose label is not among the store's class names.
    """
    from cache import FacesStore

    with FacesStore(faces_path, "r") as store:
        class_names = list(store.config.get("class_names") or [])
        if not class_names:
            raise ValueError(f"{faces_path}: the store's config has no class_names; rebuild it with"
                             " `emo-cache faces`")
        ids, labels, skipped = [], [], []
        for cid in store.complete_ids():
            attrs = store.attrs(cid)
            if str(attrs.get("split", "")).lower() != split.lower():
                continue
            if attrs.get("label") not in class_names:
                raise ValueError(f"{faces_path}: clip {cid} has label {attrs.get('label')!r}, not one of"
                                 f" {class_names}; fix the dataset or its CSV and rebuild the store")
            if not store.read_present(cid).any():
                skipped.append(cid)
                continue
            ids.append(cid)
            labels.append(class_names.index(attrs["label"]))
    if skipped:
        log(f"note: {len(skipped)} clip(s) of {split} have no face in any frame and are not trained on:"
            f" {', '.join(skipped[:5])}{' ...' if len(skipped) > 5 else ''}")
    if not ids:
        raise ValueError(f"{faces_path}: no complete clip with a face in split {split!r}")
    return ids, labels, class_names


def _build_model(cfg: FinetuneConfig, class_names: list[str], init_heads=None):
    """(FinetuneModel on CPU, HeadsConfig, trunk info dict) from the weights and optional heads."""
    from pipeline.heads import EmotionHeads, HeadsConfig, load_heads

    torch.manual_seed(cfg.seed)
    trunk, info = load_trunk(cfg.weights, cfg.seed)
    if init_heads is not None:  # classes and D were checked by check_finetune
        heads, _ = load_heads(init_heads)
        heads_cfg = heads.cfg
        heads.train()
    else:
        heads_cfg = HeadsConfig(in_dim=512, num_classes=len(class_names), heads=cfg.heads_count,
                                hidden=cfg.heads_hidden, reg=cfg.heads_reg)
        heads = EmotionHeads(heads_cfg)
    if cfg.freeze_blocks:
        freeze_lower_blocks(trunk, cfg.freeze_blocks)
    model = FinetuneModel(trunk, heads, info["mean"], info["std"], cfg.grad_checkpoint)
    return model, heads_cfg, info


def trunk_state(trunk: nn.Sequential, layout: str) -> dict[str, torch.Tensor]:
    """The trunk's weights under ``layout``'s keys, CPU fp32, so loaders auto-detect them.

    >>> from pipeline.backbones import build_vgg16_trunk
    >>> sorted(trunk_state(build_vgg16_trunk(), "vggface"))[:2]
    ['conv1_1.bias', 'conv1_1.weight']
    """
    names = {i: (f"features.{i}" if layout == "torchvision" else n)
             for i, n in zip(VGG16_CONV_INDICES, VGG16_CONV_NAMES)}
    return {f"{names[i]}.{p}": getattr(trunk[i], p).detach().float().cpu().clone()
            for i in VGG16_CONV_INDICES for p in ("weight", "bias")}


def load_trunk_state(trunk: nn.Sequential, state: dict, source: str = "state dict") -> str:
    """Copy a torchvision- or VGG-Face-layout state dict into the trunk; returns the layout.

    Raises ``pipeline.backbones.WeightsError`` (a ValueError) listing expected and found keys/shapes.
    """
    from pipeline.backbones import vgg16_trunk_state

    own, layout = vgg16_trunk_state(state, source)
    trunk.load_state_dict(own)
    return layout


def load_trunk(weights: str, seed: int) -> tuple[nn.Sequential, dict]:
    """Trainable VGG16 trunk from ``weights`` (torchvision or VGG-Face layout) or "random" with ``seed``.

    Loading goes through ``pipeline.backbones.build_vgg16``, the same code ``emo-cache extract`` uses.

    Returns:
        (trunk, info) with info = {"layout", "mean", "std", "weights", "weights_id"}: mean/std normalise
        0-255 RGB input the way the weights were trained ("random" uses torchvision's convention,
        and is saved in torchvision's layout).

    >>> trunk, info = load_trunk("random", 0)
    >>> info["layout"]
    'torchvision'
    """
    from pipeline.backbones import NORMALISATION, build_vgg16

    backbone = build_vgg16(weights, seed=seed if weights == "random" else None)
    trunk = backbone.net.train().requires_grad_(True)
    layout = "torchvision" if backbone.spec.layout == "random" else backbone.spec.layout
    mean, std = NORMALISATION[layout]
    return trunk, {"layout": layout, "mean": mean, "std": std, "weights_id": backbone.spec.weights_id,
                   "weights": f"random:{seed}" if weights == "random" else str(weights)}


# -- the loop ---------------------------------------------------------------------------------
def _train_one_epoch(model, core: FinetuneModel, loader, opt, sched, scaler, device) -> dict:
    """One pass over this process's clips; returns summed loss/penalty/correct/count (local)."""
    model.train()
    sums = torch.zeros(5, dtype=torch.float64)  # loss * n, cross-entropy * n, penalty * n, correct, n
    for faces, mask, labels in loader:
        faces, mask = faces.to(device, non_blocking=True), mask.to(device, non_blocking=True)
        labels = torch.as_tensor(labels, device=device)
        out = model(faces, mask)
        total, ce, penalty = core.heads.loss(out, labels)
        opt.zero_grad(set_to_none=True)
        scaler.scale(total).backward()
        scaler.step(opt)
        scaler.update()
        sched.step()
        n = len(labels)
        correct = (out.log_probs.argmax(1) == labels).sum().item()
        sums += torch.tensor([total.item() * n, ce.item() * n, penalty.item() * n, correct, n],
                             dtype=torch.float64)
    return sums


def _reduce_sums(sums: torch.Tensor, env: DistEnv, device: torch.device) -> torch.Tensor:
    """Add the epoch sums of every process (all-reduce), so rank 0 logs global figures."""
    if env.world_size > 1:
        import torch.distributed as dist
        sums = sums.to(device)  # nccl reduces CUDA tensors only; gloo takes CPU ones
        dist.all_reduce(sums)
    return sums.cpu()


def checkpoint_dict(core: FinetuneModel, heads_cfg, cfg: FinetuneConfig, class_names, info: dict,
                    epoch: int, opt, sched, scaler, history, provenance: dict) -> dict:
    """A plain dict like ``emo-train heads``' checkpoint (``load_heads`` reads it) plus the backbone.

    ``provenance`` is that of the features ``emo-cache extract FACES --weights RUN_DIR/backbone.pt
    --crop <crop>`` makes (the centre crop at the training crop size, so the heads see the scale they
    were trained on), so ``emo-eval`` accepts this checkpoint on them; ``backbone`` holds the trunk
    in the layout of the weights it started from.
    """
    return {
        "model": core.heads.state_dict(),
        "heads_config": asdict(heads_cfg),
        "train_config": asdict(cfg),
        "class_names": list(class_names),
        "provenance": provenance,
        "finetuned_from": info["weights"],
        "epoch": epoch,
        "optimizer": opt.state_dict(),
        "scheduler": sched.state_dict(),
        "scaler": scaler.state_dict(),
        "history": list(history),
        "backbone": trunk_state(core.trunk, info["layout"]),
        "backbone_layout": info["layout"],
    }


def recache_config(backbone_path: Path, face_size: int, crop: int):
    """The ExtractConfig that re-caches features for fine-tuned heads: this backbone, the stored faces'
    size, and a centre crop of the training crop size (none when the crop is the whole face)."""
    from pipeline.extract import ExtractConfig

    return ExtractConfig(weights=str(backbone_path), input_size=face_size, crop=crop if crop < face_size else None)


def recache_provenance(backbone_path: Path, faces_fingerprint: str, face_size: int, crop: int) -> dict:
    """Provenance of the features ``emo-cache extract`` makes with ``recache_config``."""
    from pipeline.extract import FeatureExtractor

    cfg = recache_config(backbone_path, face_size, crop)
    return FeatureExtractor(cfg).provenance(faces_fingerprint)


LOG_FIELDS = ("epoch", "loss", "cross_entropy", "penalty", "train_acc", "lr_backbone", "lr_heads", "seconds")


def _write_epoch(out_dir: Path, make_checkpoint, backbone: dict, faces: tuple[str, int], crop: int,
                row: dict) -> None:
    """Rank 0: backbone.pt, then checkpoint.pt (whose provenance names backbone.pt's hash), then log.csv.

    ``faces`` is the faces store's (fingerprint, face size).
    """
    save_checkpoint(out_dir / "backbone.pt", backbone)  # atomic: a kill mid-save leaves the last one whole
    provenance = recache_provenance(out_dir / "backbone.pt", faces[0], faces[1], crop)
    save_checkpoint(out_dir / "checkpoint.pt", make_checkpoint(provenance))
    log_path = out_dir / "log.csv"
    new = not log_path.exists() or row["epoch"] == 0
    with open(log_path, "w" if new else "a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=LOG_FIELDS)
        if new:
            writer.writeheader()
        writer.writerow(row)


def _resume_state(out_dir: Path, cfg: FinetuneConfig) -> Optional[dict]:
    """The previous checkpoint when resuming is asked for and its settings match, else None."""
    path = out_dir / "checkpoint.pt"
    if not (cfg.resume and path.exists()):
        return None
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    free = {"epochs", "resume", "workers", "device"}  # may change between a run and its resume
    old = {k: v for k, v in ckpt["train_config"].items() if k not in free}
    new = {k: v for k, v in asdict(cfg).items() if k not in free}
    diffs = [f"{k}: checkpoint has {old.get(k)!r}, this run asks for {new.get(k)!r}"
             for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]
    if diffs:
        raise ValueError(f"{path} was made with other settings:\n  " + "\n  ".join(diffs)
                         + "\nUse a new --out, or --no-resume to start over in this folder.")
    return ckpt


def _make_loader(dataset, env: DistEnv, cfg: FinetuneConfig, device: torch.device):
    sampler = torch.utils.data.distributed.DistributedSampler(
        dataset, num_replicas=env.world_size, rank=env.rank, shuffle=True, seed=cfg.seed)
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=cfg.batch_clips, sampler=sampler, num_workers=cfg.workers,
        pin_memory=device.type == "cuda")
    return loader, sampler


def check_finetune(faces_path, out_dir, cfg: FinetuneConfig, init_heads=None) -> None:
    """Everything that can be wrong before training starts, as one ValueError / StoreError naming it:
    the settings, the faces store and its labels, the --init heads, a checkpoint to resume.

    >>> check_finetune("runs/faces.h5", "runs/ft", FinetuneConfig(weights="random"))  # doctest: +SKIP
    """
    cfg.validate()
    _, _, class_names = list_training_clips(faces_path, cfg.split, log=_quiet)
    if init_heads is not None:
        from pipeline.heads import load_heads
        heads, ckpt = load_heads(init_heads)
        if list(ckpt["class_names"]) != list(class_names):
            raise ValueError(f"--init {init_heads}: its classes {ckpt['class_names']} differ from the"
                             f" faces store's {class_names}")
        if heads.cfg.in_dim != 512:
            raise ValueError(f"--init {init_heads}: heads expect D={heads.cfg.in_dim}, VGG16 conv5_3 gives 512")
    _resume_state(Path(out_dir), cfg)


def finetune(faces_path, out_dir, cfg: FinetuneConfig, init_heads=None, log=print) -> FinetuneResult:
    """Fine-tune VGG16 + heads end to end on the faces store's ``cfg.split`` clips.

    Under ``torchrun`` (WORLD_SIZE > 1) each process trains on its share of the clips with DDP
    (gloo on CPU, nccl on CUDA); only rank 0 writes files.

    Arguments:
        faces_path: the faces store (``emo-cache faces``).
        out_dir: run folder; see the module docstring for what it holds.
        cfg: FinetuneConfig.
        init_heads: optional heads checkpoint (``emo-train heads``) to start the heads from.
        log: where progress lines go (rank 0 only).
    Returns:
        FinetuneResult(run_dir, history, model, env).

    >>> finetune("runs/faces.h5", "runs/ft", FinetuneConfig(weights="vgg16.pth"))  # doctest: +SKIP
    """
    check_finetune(faces_path, out_dir, cfg, init_heads)
    env = dist_env_from(os.environ)
    device = resolve_device(cfg.device, env.local_rank)
    out_dir = Path(out_dir)
    started_dist = _init_distributed(env, device)
    try:
        return _run(faces_path, out_dir, cfg, init_heads, env, device, log if env.is_main else _quiet)
    finally:
        if started_dist:
            import torch.distributed as dist
            dist.destroy_process_group()


def _quiet(*_args, **_kwargs) -> None:
    return None


def _init_distributed(env: DistEnv, device: torch.device) -> bool:
    """Join torchrun's process group (gloo on CPU, nccl on CUDA); False when single-process."""
    import torch.distributed as dist

    if env.world_size == 1 or dist.is_initialized():
        return False
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return True


@dataclass
class _Run:
    """Everything one fine-tuning process holds while it trains."""
    cfg: FinetuneConfig
    env: DistEnv
    device: torch.device
    out_dir: Path
    log: object
    core: FinetuneModel           # the model itself
    model: nn.Module              # the same, wrapped in DDP when several processes train
    heads_cfg: object
    info: dict                    # trunk layout, normalisation, weights id
    class_names: list
    dataset: FacesClips
    loader: object
    sampler: object
    opt: torch.optim.Optimizer
    sched: object
    scaler: object
    faces: tuple                  # (fingerprint, face size) of the faces store
    history: list
    start: int = 0


def _run(faces_path, out_dir: Path, cfg, init_heads, env: DistEnv, device, log) -> FinetuneResult:
    run = _setup(faces_path, out_dir, cfg, init_heads, env, device, log)
    from tqdm import tqdm

    for epoch in tqdm(range(run.start, cfg.epochs), desc="fine-tune epochs", disable=not env.is_main,
                      initial=run.start, total=cfg.epochs):
        row = _train_epoch(run, epoch)
        if env.is_main:
            _save_epoch(run, epoch, row)
        if env.world_size > 1:
            import torch.distributed as dist
            dist.barrier()  # nobody starts the next epoch (or exits) before rank 0 has saved
    return FinetuneResult(out_dir, run.history, run.core, env)


def _setup(faces_path, out_dir: Path, cfg, init_heads, env: DistEnv, device, log) -> _Run:
    """Model, data, optimiser and (on resume) their saved state; rank 0 writes the config."""
    from cache import FacesStore

    ids, labels, class_names = list_training_clips(faces_path, cfg.split, log)
    core, heads_cfg, info = _build_model(cfg, class_names, init_heads)
    core.autocast = resolve_precision(cfg.precision, device)
    core.to(device)
    model = core
    if env.world_size > 1:
        from torch.nn.parallel import DistributedDataParallel
        model = DistributedDataParallel(core, device_ids=[device.index] if device.type == "cuda" else None)
    dataset = FacesClips(faces_path, ids, labels, cfg, train=True)
    loader, sampler = _make_loader(dataset, env, cfg, device)
    opt = _make_optimizer(core, cfg)
    with FacesStore(faces_path, "r") as store:
        faces = (store.fingerprint, int(store.read_faces(ids[0], [0]).shape[1]))
    run = _Run(cfg, env, device, out_dir, log, core, model, heads_cfg, info, class_names, dataset, loader,
               sampler, opt, _make_scheduler(opt, cfg, len(loader)),
               torch.amp.GradScaler(device.type, enabled=core.autocast == torch.float16), faces, [])
    ckpt = _resume_state(out_dir, cfg)
    if ckpt is not None:
        _restore(core, run.opt, run.sched, run.scaler, ckpt)
        run.history, run.start = list(ckpt["history"]), ckpt["epoch"] + 1
        log(f"resuming {out_dir} after epoch {ckpt['epoch'] + 1}")
    if env.is_main:
        _announce(run, faces_path, init_heads, len(ids))
    return run


def _announce(run: _Run, faces_path, init_heads, n_clips: int) -> None:
    """Rank 0: finetune_config.json, and what is about to happen (incl. how to re-cache features)."""
    cfg, precision = run.cfg, str(run.core.autocast).replace("torch.", "") if run.core.autocast else "fp32"
    run.out_dir.mkdir(parents=True, exist_ok=True)
    (run.out_dir / "finetune_config.json").write_text(json.dumps(
        {**asdict(cfg), "faces": str(faces_path), "init_heads": str(init_heads) if init_heads else None,
         "world_size": run.env.world_size, "device": str(run.device), "autocast": precision}, indent=2))
    run.log(f"fine-tuning on {n_clips} clips of {cfg.split} ({run.env.world_size} process(es), {run.device},"
            f" {precision}), epochs {run.start + 1}..{cfg.epochs}")
    rc = recache_config(run.out_dir / "backbone.pt", run.faces[1], cfg.crop)
    run.log(f"re-cache features for these heads with: emo-cache extract {faces_path} --weights {rc.weights}"
            f" --input-size {rc.input_size}" + (f" --crop {rc.crop}" if rc.crop else "") + " --out FEATURES.h5")


def _train_epoch(run: _Run, epoch: int) -> dict:
    """One epoch on every process; returns the log row with global (all-reduced) figures."""
    t0 = time.perf_counter()
    run.sampler.set_epoch(epoch)
    run.dataset.set_epoch(epoch)
    lrs = {g.get("name", i): g["lr"] for i, g in enumerate(run.opt.param_groups)}  # at the epoch's start
    sums = _train_one_epoch(run.model, run.core, run.loader, run.opt, run.sched, run.scaler, run.device)
    sums = _reduce_sums(sums, run.env, run.device)
    n = max(sums[4].item(), 1.0)
    row = {"epoch": epoch, "loss": sums[0].item() / n, "cross_entropy": sums[1].item() / n,
           "penalty": sums[2].item() / n, "train_acc": sums[3].item() / n,
           "lr_backbone": lrs.get("backbone", 0.0), "lr_heads": lrs.get("heads", 0.0),
           "seconds": round(time.perf_counter() - t0, 3)}
    run.history.append(row)
    return row


def _save_epoch(run: _Run, epoch: int, row: dict) -> None:
    def make_checkpoint(provenance):
        return checkpoint_dict(run.core, run.heads_cfg, run.cfg, run.class_names, run.info, epoch, run.opt,
                               run.sched, run.scaler, run.history, provenance)
    _write_epoch(run.out_dir, make_checkpoint, trunk_state(run.core.trunk, run.info["layout"]), run.faces,
                 run.cfg.crop, row)
    run.log(f"epoch {epoch + 1}/{run.cfg.epochs}: loss {row['loss']:.4f} train acc {row['train_acc']:.3f}"
            f" ({row['seconds']:.1f} s)")


def _restore(core: FinetuneModel, opt, sched, scaler, ckpt: dict) -> None:
    core.heads.load_state_dict(ckpt["model"])
    load_trunk_state(core.trunk, ckpt["backbone"])
    opt.load_state_dict(ckpt["optimizer"])
    sched.load_state_dict(ckpt["scheduler"])
    scaler.load_state_dict(ckpt["scaler"])
