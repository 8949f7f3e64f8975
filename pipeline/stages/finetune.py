"""End-to-end fine-tuning of any registered backbone and the attention/TP heads on aligned faces (Sec. 4.2).

Reads the faces store (pixels), not the features store: the backbone changes while it trains. The backbone's
facts (builder, input size, normalisation, trainable blocks, learning rate, crop) come from its registry entry
(``pipeline.models.backbones``); the epoch loop, checkpoints, log, resume rule and SGDR stepping are
``training.loop``'s, shared with ``emo-train heads``. Runs on one CPU, one GPU, or many processes under
``torchrun`` (DDP: gloo on CPU, nccl on CUDA).

Files written into the run folder (rank 0 only):
    config.json           the resolved FinetuneConfig, with the recipe's values, rates and phases
    checkpoint.pt         plain dict like ``emo-train heads``' checkpoint plus ``backbone`` (see
                          ``checkpoint_dict``); also what ``--resume`` continues from
    backbone.pt           the backbone's weights in the layout its builder reads (VGG16: torchvision's
                          ``features.N.*`` or VGG-Face's ``convX_Y.*``, as it started; fer: the MiniXception state
                          dict; ResNet-18: torchvision's keys), so that ``emo-cache extract FACES --backbone NAME
                          --weights RUN_DIR/backbone.pt`` re-caches features for these heads (the exact command
                          is printed) and ``emo-predict --checkpoint RUN_DIR/checkpoint.pt --weights
                          RUN_DIR/backbone.pt`` runs them on raw video
    best.pt, best_backbone.pt   the same for the selected epoch (``--select``: best held-out WAR or UAR), when
                          there is a held-out part; the guard restores this epoch when it stops a run
    log.csv               one row per epoch, ``training.loop.LOG_FIELDS``
"""
from __future__ import annotations

import os
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
from torch import nn

from emotion_attention.cache import FacesStore
from emotion_attention.cache.errors import ConfigError
from emotion_attention.pipeline.configs import ExtractConfig, FinetuneConfig, HeadsConfig
from emotion_attention.pipeline.core.runtime import available_memory, check_writable, cpu_has_bf16, resolve_device
from emotion_attention.pipeline.core.stage import StageSummary, write_resolved_config
from emotion_attention.pipeline.models.backbones import (  # noqa: F401 (re-export)
    NORMALISATION,
    VGG16_BLOCK_STARTS,
    Backbone,
    BackboneSpec,
    get_backbone,
)
from emotion_attention.pipeline.models.checkpoint import (
    build_checkpoint,
    read_checkpoint,
    save_checkpoint,
)
from emotion_attention.pipeline.models.extractor import FeatureExtractor
from emotion_attention.pipeline.models.heads import EmotionHeads, load_heads, map_statistics
from emotion_attention.pipeline.training.batches import holdout_split
from emotion_attention.pipeline.training.faces_clips import FacesClips, augment_faces, list_split  # noqa: F401
from emotion_attention.pipeline.training.loop import (
    PhasedSGDR,
    check_finite,
    check_resume,
    collapse,
    majority_warning,
    run_epochs,
    select_row,
    sgd_step,
)
from emotion_attention.pipeline.training.metrics import classification_metrics

RESUMABLE = ("epochs", "resume", "workers", "device", "in_memory", "max_memory_gb")  # may change on resume
STATS_FACES = 512  # faces whose initial maps give new heads their standardisation statistics


HEADS_LR_PER_CLIP = 0.1 / 32  # emo-train heads' rate (Sec. 4.2's 0.1) at its batch of 32 clips, per clip


def backbone_lr(cfg: FinetuneConfig) -> float:
    """The backbone's learning rate: as given, or the registry entry's."""
    return get_backbone(cfg.backbone).finetune_lr if cfg.lr_backbone is None else cfg.lr_backbone


def clips_per_step(cfg: FinetuneConfig) -> int:
    """Clips per step and process: as given, or the registry entry's."""
    return get_backbone(cfg.backbone).finetune_batch_clips if cfg.batch_clips is None else cfg.batch_clips


def heads_lr(cfg: FinetuneConfig, world_size: int = 1) -> float:
    """The heads' learning rate: as given, or emo-train heads' rate per clip times the clips of one step over
    all processes (the linear scaling rule: DDP averages the processes' gradients).

    >>> heads_lr(FinetuneConfig(weights="random", batch_clips=4)), heads_lr(FinetuneConfig(weights="random", lr_heads=0.1))
    (0.0125, 0.1)
    """
    if cfg.lr_heads is not None:
        return cfg.lr_heads
    return HEADS_LR_PER_CLIP * clips_per_step(cfg) * world_size


def check_settings(cfg: FinetuneConfig) -> None:
    """``cfg.validate()`` plus what the backbone's registry entry decides; ConfigError naming the field."""
    cfg.validate()
    entry = get_backbone(cfg.backbone)
    if not cfg.weights:
        raise ConfigError(f"weights: give {entry.weights_help} (--weights PATH), or 'random' for a plumbing test")
    if cfg.weights == "default" and cfg.backbone != "fer-minixception":
        raise ConfigError(f"weights: 'default' is fer's sample file, only for --backbone fer-minixception"
                          f" ({cfg.backbone} needs {entry.weights_help})")
    if cfg.crop is not None and entry.fixed_input is None:
        entry.check_size(cfg.crop, None)


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


def resolve_precision(precision: str, device: torch.device, backbone: str = "vgg16") -> Optional[torch.dtype]:
    """Autocast dtype for the trunk, or None for fp32.

    'auto': the backbone's registry policy (VGG16: fp16 on CUDA with a GradScaler, bf16 on CPUs whose oneDNN
    has native bf16, ``pipeline.runtime.cpu_has_bf16``, else fp32; fer's mini-Xception: fp32).

    >>> resolve_precision("fp32", torch.device("cpu")) is None
    True
    """
    if precision == "auto":
        cuda_bf16 = False  # fine-tuning keeps fp16 + GradScaler on CUDA, as it always has
        precision = get_backbone(backbone).precision(device.type, cpu_has_bf16(), cuda_bf16)
    return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


# -- model ------------------------------------------------------------------------------------
class FinetuneModel(nn.Module):
    """A registered backbone's trainable network feeding the heads; faces in, HeadsOutput out.

    Arguments:
        backbone: a ``models.backbones.Backbone`` built for the training crop (its ``net`` becomes ``trunk``
            and trains; its ``prepare`` turns uint8 faces into the network's input: resize, colour, normalisation).
        heads: the attention + TP heads (``models.heads.EmotionHeads``).
        grad_checkpoint: recompute the trunk's activations during backward.
        autocast: dtype the trunk runs in (bf16 / fp16), or None for fp32. The heads always run
            in fp32: they are cheap, and the softmax over all (f, c) is where precision matters.

    Batch-norm layers of the trunk stay in eval mode (their stored statistics): a few clips per step are too
    few to estimate them, and DDP ranks then need no statistics exchange.

    >>> from emotion_attention.pipeline.models.backbones import build_backbone
    >>> from emotion_attention.pipeline.models.heads import EmotionHeads; from emotion_attention.pipeline.configs import HeadsConfig
    >>> model = FinetuneModel(build_backbone("vgg16", "random", seed=0, input_size=32), EmotionHeads(HeadsConfig()))
    >>> model(torch.zeros(1, 4, 3, 32, 32, dtype=torch.uint8), torch.ones(1, 4, dtype=torch.bool)).log_probs.shape
    torch.Size([1, 7])
    """

    def __init__(self, backbone: Backbone, heads: nn.Module, grad_checkpoint=False,
                 autocast: Optional[torch.dtype] = None):
        super().__init__()
        self.trunk, self.heads, self.grad_checkpoint = backbone.net, heads, grad_checkpoint  # trains where requires_grad
        self._prepare = backbone.prepare  # a plain function attribute, not a submodule
        self.autocast = autocast
        self.trunk_frozen = False  # True: the trunk runs without autograd (heads-only warm-up epochs)
        if grad_checkpoint:
            for layer in self.trunk.modules():  # an in-place ReLU would overwrite a boundary backward re-reads
                if isinstance(layer, nn.ReLU):
                    layer.inplace = False

    def train(self, mode: bool = True):
        super().train(mode)
        for module in self.trunk.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.eval()
        return self

    def maps(self, faces: torch.Tensor) -> torch.Tensor:
        """uint8 (N, 3, H, W) -> (N, L, D) maps of the backbone's cached layer."""
        x = self._prepare(faces.permute(0, 2, 3, 1))  # (N, C, h, w) float, normalised as the weights expect
        if self.autocast is not None:
            x = x.contiguous(memory_format=torch.channels_last)  # oneDNN / cuDNN's fast layout for bf16
        with torch.autocast(x.device.type, dtype=self.autocast or torch.float32,
                            enabled=self.autocast is not None):
            if self.trunk_frozen:
                with torch.no_grad():  # no graph through the trunk: a warm-up step costs a forward pass only
                    y = self.trunk(x)
            elif self.grad_checkpoint and self.training and torch.is_grad_enabled():
                y = self._checkpointed(x)
            else:
                y = self.trunk(x)
        return y.float().flatten(2).transpose(1, 2)  # (N, L, D)

    def _checkpointed(self, x: torch.Tensor) -> torch.Tensor:
        from torch.utils.checkpoint import checkpoint, checkpoint_sequential  # lazy: torch is paid only when this runs

        if isinstance(self.trunk, nn.Sequential):
            return checkpoint_sequential(self.trunk, 5, x, use_reentrant=False)
        return checkpoint(self.trunk, x, use_reentrant=False)

    def forward(self, faces: torch.Tensor, mask: torch.Tensor):
        """faces uint8 (B, T, 3, H, W), mask bool (B, T) -> the heads' output.

        Only present frames go through the trunk; padded ones get zero maps and stay masked.
        """
        b, t = mask.shape
        maps = self.maps(faces[mask])  # (N, L, D) for the N present frames
        full = maps.new_zeros((b, t) + tuple(maps.shape[1:]))  # (B, T, L, D)
        full[mask] = maps
        return self.heads(full, mask)


def freeze_lower_blocks(trunk: nn.Module, n_blocks: int, backbone: str = "vgg16") -> int:
    """Stop gradients for the backbone's blocks 1..n (its registry ``blocks``); returns how many parameters.

    >>> from emotion_attention.pipeline.models.backbones import build_vgg16_trunk
    >>> freeze_lower_blocks(build_vgg16_trunk(), 1)
    38720
    """
    blocks = get_backbone(backbone).blocks(trunk)
    if n_blocks > len(blocks):
        raise ConfigError(f"freeze_blocks {n_blocks}: {backbone} has {len(blocks)} blocks")
    frozen = 0
    for block in blocks[:n_blocks]:
        for module in block:
            for p in module.parameters():
                p.requires_grad_(False)
                frozen += p.numel()
    return frozen


# -- optimisation -----------------------------------------------------------------------------
def _make_optimizer(model: FinetuneModel, cfg: FinetuneConfig) -> torch.optim.Optimizer:
    """SGD + momentum with one parameter group for the backbone and one for the heads (rates: ``phases``)."""
    groups = [
        {"params": [p for p in model.trunk.parameters() if p.requires_grad], "lr": backbone_lr(cfg),
         "name": "backbone"},
        {"params": [p for p in model.heads.parameters() if p.requires_grad], "lr": heads_lr(cfg),
         "name": "heads"},
    ]
    groups = [g for g in groups if g["params"]]
    return torch.optim.SGD(groups, momentum=cfg.momentum, weight_decay=cfg.weight_decay)


def phases(cfg: FinetuneConfig, world_size: int = 1) -> list[tuple[int, dict]]:
    """The learning-rate phases: heads alone for ``warmup_epochs`` (backbone rate 0), then both together.

    >>> phases(FinetuneConfig(weights="random", warmup_epochs=2, lr_heads=0.1, lr_heads_joint=0.01, lr_backbone=1e-4))
    [(0, {'backbone': 0.0, 'heads': 0.1}), (2, {'backbone': 0.0001, 'heads': 0.01})]
    """
    heads = heads_lr(cfg, world_size)
    joint = {"backbone": backbone_lr(cfg), "heads": heads if cfg.lr_heads_joint is None else cfg.lr_heads_joint}
    if cfg.warmup_epochs == 0:
        return [(0, joint)]
    return [(0, {"backbone": 0.0, "heads": heads}), (cfg.warmup_epochs, joint)]


def class_weights(labels: list[int], num_classes: int, how: str) -> Optional[torch.Tensor]:
    """Per-class loss weights: "loss" weighs a class by n / (classes present * its count), so each present class
    carries the same total weight; "none" gives None (the plain mean).

    >>> class_weights([0, 0, 0, 1], 3, "loss").tolist()
    [0.6666666865348816, 2.0, 1.0]
    """
    if how == "none":
        return None
    counts = np.bincount(np.asarray(labels), minlength=num_classes).astype(np.float64)
    present = counts > 0
    weights = np.ones(num_classes)
    weights[present] = counts.sum() / (present.sum() * counts[present])
    return torch.tensor(weights, dtype=torch.float32)


# -- the stage --------------------------------------------------------------------------------
@dataclass
class FinetuneResult:
    run_dir: Path
    history: list[dict]          # one dict per epoch (the rows of log.csv)
    model: FinetuneModel         # the trained model (unwrapped from DDP), on its device; the best epoch's
                                 # weights when the guard stopped the run
    env: DistEnv
    selected: Optional[dict] = None  # the log row of the epoch best.pt holds (None without a held-out part)
    stopped: Optional[str] = None    # why the guard stopped the run early, or None
    warning: Optional[str] = None    # the majority-class warning, as emo-train heads gives it


def list_training_clips(faces_path, split: str, log=print) -> tuple[list[str], list[int], list[str]]:
    """(clip ids, label indices, class names) of the split's clips that have at least one face.

    Raises ConfigError naming a clip whose label is not among the store's class names.
    """
    listing = list_split(faces_path, split)
    skipped = listing.faceless
    if skipped:
        log(f"note: {len(skipped)} clip(s) of {split} have no face in any frame and are not trained on:"
            f" {', '.join(skipped[:5])}{' ...' if len(skipped) > 5 else ''}")
    return list(listing.ids), list(listing.labels), list(listing.class_names)


def load_backbone(cfg: FinetuneConfig, side: int) -> tuple[Backbone, dict]:
    """The registered backbone built for ``side`` px training crops, plus what the run records of it.

    Returns:
        (Backbone, info) with info = {"layout", "weights", "weights_id"}; "random" weights save in the
        entry's own layout (``save_state``).
    """
    entry = get_backbone(cfg.backbone)
    input_size, crop = entry.train_input(side)
    weights = cfg.weights
    backbone = entry.builder(weights, seed=cfg.seed if weights == "random" else None,
                             input_size=input_size, crop=crop)
    backbone.net.train().requires_grad_(True)
    return backbone, {"layout": backbone.spec.layout, "weights_id": backbone.spec.weights_id,
                      "weights": f"random:{cfg.seed}" if weights == "random" else str(weights)}


def _build_model(cfg: FinetuneConfig, class_names: list[str], side: int, init_heads=None):
    """(FinetuneModel on CPU, HeadsConfig, backbone info dict) from the weights and optional heads."""

    torch.manual_seed(cfg.seed)
    backbone, info = load_backbone(cfg, side)
    if init_heads is not None:  # classes and D were checked by check_finetune
        heads, _ = load_heads(init_heads)
        heads_cfg = heads.cfg
        heads.train()
    else:
        heads_cfg = HeadsConfig(in_dim=get_backbone(cfg.backbone).D, num_classes=len(class_names), heads=cfg.heads_count,
                                hidden=cfg.heads_hidden, reg=cfg.heads_reg)
        heads = EmotionHeads(heads_cfg)
    if cfg.freeze_blocks:
        freeze_lower_blocks(backbone.net, cfg.freeze_blocks, cfg.backbone)
    return FinetuneModel(backbone, heads, cfg.grad_checkpoint), heads_cfg, info


def trunk_state(trunk: nn.Module, layout: str, backbone: str = "vgg16") -> dict[str, torch.Tensor]:
    """The trunk's weights in the layout its registry builder reads back, CPU fp32.

    >>> from emotion_attention.pipeline.models.backbones import build_vgg16_trunk
    >>> sorted(trunk_state(build_vgg16_trunk(), "vggface"))[:2]
    ['conv1_1.bias', 'conv1_1.weight']
    """
    return get_backbone(backbone).save_state(trunk, layout)


def load_trunk(weights: str, seed: int) -> tuple[nn.Sequential, dict]:
    """Trainable VGG16 trunk from ``weights`` (torchvision or VGG-Face layout) or "random" with ``seed``.

    Loading goes through the registry's VGG16 builder, the same code ``emo-cache extract`` uses.

    Returns:
        (trunk, info) with info = {"layout", "mean", "std", "weights", "weights_id"}: mean/std normalise
        0-255 RGB input the way the weights were trained ("random" uses torchvision's convention).

    >>> trunk, info = load_trunk("random", 0)
    >>> info["layout"]
    'torchvision'
    """

    backbone, info = load_backbone(FinetuneConfig(weights=weights, seed=seed), 256)
    layout = "torchvision" if info["layout"] == "random" else info["layout"]
    mean, std = NORMALISATION[layout]
    return backbone.net, {**info, "layout": layout, "mean": mean, "std": std}


# -- checkpoints and re-caching -----------------------------------------------------------------
def checkpoint_dict(core: FinetuneModel, heads_cfg, cfg: FinetuneConfig, class_names, info: dict,
                    epoch: int, opt, sched, scaler, history, provenance: dict, best: tuple) -> dict:
    """The checkpoint (``models.checkpoint.build_checkpoint``, as ``emo-train heads``') plus the backbone.

    ``provenance`` is that of the features ``emo-cache extract FACES --backbone NAME --weights
    RUN_DIR/backbone.pt`` makes with ``recache_config``'s sizes, so ``emo-eval`` and ``emo-predict`` accept
    this checkpoint on them; ``backbone`` holds the trunk in the layout its builder reads.
    """
    return build_checkpoint(
        "finetune", model=core.heads.state_dict(), heads_config=asdict(heads_cfg), train_config=asdict(cfg),
        class_names=class_names, provenance=provenance, epoch=epoch, history=history, best_score=best,
        optimizer=opt.state_dict(), scheduler=sched.state_dict(), scaler=scaler.state_dict(),
        finetuned_from=info["weights"], backbone=trunk_state(core.trunk, info["layout"], cfg.backbone),
        faces_config=info.get("faces_config"),  # as emo-train heads records it (issue 19, case 9)
        backbone_name=cfg.backbone, backbone_layout=info["layout"])


def recache_config(backbone_path: Path, face_size: int, side: int, backbone: str = "vgg16"):
    """The ExtractConfig that re-caches features for fine-tuned heads: this backbone file, and the sizes of
    its registry entry's ``recache`` rule (VGG16: the stored size with a centre crop of the training side)."""

    input_size, crop = get_backbone(backbone).recache(face_size, side)
    return ExtractConfig(backbone=backbone, weights=str(backbone_path), input_size=input_size, crop=crop)


def recache_provenance(backbone_path: Path, faces_fingerprint: str, face_size: int, side: int,
                       backbone: str = "vgg16") -> dict:
    """Provenance of the features ``emo-cache extract`` makes with ``recache_config``."""

    return FeatureExtractor(recache_config(backbone_path, face_size, side, backbone)).provenance(faces_fingerprint)


def recache_command(faces_path, cfg: FinetuneConfig, backbone_path: Path, face_size: int, side: int) -> str:
    """The `emo-cache extract` command that re-caches features for these heads."""
    rc = recache_config(backbone_path, face_size, side, cfg.backbone)
    return (f"emo-cache extract {faces_path} --backbone {cfg.backbone} --weights {rc.weights}"
            f" --input-size {rc.input_size}" + (f" --crop {rc.crop}" if rc.crop else "") + " --out FEATURES.h5")


def _resume_state(out_dir: Path, cfg: FinetuneConfig) -> Optional[dict]:
    """The previous checkpoint when resuming is asked for and its settings match (ConfigError if not), else None."""
    path = out_dir / "checkpoint.pt"
    if not (cfg.resume and path.exists()):
        return None
    ckpt = read_checkpoint(path)
    saved = {"train_config": {"backbone": "vgg16", **ckpt["train_config"]}}  # runs from before the registry
    check_resume(path, saved, {"train_config": asdict(cfg)}, RESUMABLE,
                 "Use a new --out, or --no-resume to start over in this folder.")
    return ckpt


def _make_loader(dataset, env: DistEnv, cfg: FinetuneConfig, device: torch.device):
    sampler = torch.utils.data.distributed.DistributedSampler(
        dataset, num_replicas=env.world_size, rank=env.rank, shuffle=True, seed=cfg.seed)
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=clips_per_step(cfg), sampler=sampler,
        num_workers=0 if dataset.memory is not None else cfg.workers,  # items from RAM need no reader processes
        pin_memory=device.type == "cuda")
    return loader, sampler


def face_size_of(faces_path) -> int:
    """Side of the stored face chips."""

    with FacesStore(faces_path, "r") as store:
        for cid in store.complete_ids():
            present = np.flatnonzero(store.read_present(cid))
            if len(present):
                return int(store.read_faces(cid, present[:1]).shape[1])
    raise ConfigError(f"{faces_path}: no stored face to fine-tune on")


def check_finetune(faces_path, out_dir, cfg: FinetuneConfig, init_heads=None) -> None:
    """Everything that can be wrong before training starts, as one ConfigError / StoreError naming it:
    the settings, the faces store and its labels, the --init heads, a checkpoint to resume.

    >>> check_finetune("runs/faces.h5", "runs/ft", FinetuneConfig(weights="random"))  # doctest: +SKIP
    """
    check_settings(cfg)
    check_writable(out_dir)  # a read-only --out is one line before any work
    _, _, class_names = list_training_clips(faces_path, cfg.split, log=_quiet)
    face_size = face_size_of(faces_path)
    side = get_backbone(cfg.backbone).finetune_side(face_size, cfg.crop)
    if side > face_size:
        raise ConfigError(f"crop {side} is larger than the stored faces ({face_size} px); use --crop <= {face_size}")
    get_backbone(cfg.backbone).check_size(*get_backbone(cfg.backbone).train_input(side))
    if init_heads is not None:
        heads, ckpt = load_heads(init_heads)
        if list(ckpt["class_names"]) != list(class_names):
            raise ConfigError(f"--init {init_heads}: its classes {ckpt['class_names']} differ from the"
                              f" faces store's {class_names}")
        if heads.cfg.in_dim != get_backbone(cfg.backbone).D:
            raise ConfigError(f"--init {init_heads}: heads expect D={heads.cfg.in_dim}, {cfg.backbone}'s"
                              f" {get_backbone(cfg.backbone).layer} gives {get_backbone(cfg.backbone).D}")
    _resume_state(Path(out_dir), cfg)


def finetune(faces_path, out_dir, cfg: FinetuneConfig, init_heads=None, log=print) -> FinetuneResult:
    """Fine-tune a registered backbone + heads end to end on the faces store's ``cfg.split`` clips.

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

    >>> finetune("runs/faces.h5", "runs/ft", FinetuneConfig(weights="default", backbone="fer-minixception"))  # doctest: +SKIP
    """
    cfg = cfg.with_recipe()  # settings left unset take the recipe's values (configs.RECIPES)
    check_finetune(faces_path, out_dir, cfg, init_heads)
    env = dist_env_from(os.environ)
    device = resolve_device(cfg.device, env.local_rank)
    out_dir = Path(out_dir)
    started_dist = _init_distributed(env, device)
    try:
        return _run(faces_path, out_dir, cfg, init_heads, env, device, log if env.is_main else _quiet)
    finally:
        if started_dist:
            import torch.distributed as dist  # lazy: torch is paid only when this runs
            dist.destroy_process_group()


def _quiet(*_args, **_kwargs) -> None:
    return None


def _init_distributed(env: DistEnv, device: torch.device) -> bool:
    """Join torchrun's process group (gloo on CPU, nccl on CUDA); False when single-process."""
    import torch.distributed as dist  # lazy: torch is paid only when this runs

    if env.world_size == 1 or dist.is_initialized():
        return False
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return True


@dataclass
class FinetuneTask:
    """``pipeline.loop.TrainTask`` of fine-tuning: everything one process holds while it trains."""
    cfg: FinetuneConfig
    env: DistEnv
    device: torch.device
    out_dir: Path
    core: FinetuneModel           # the model itself
    model: nn.Module              # the same, wrapped in DDP when several processes train
    heads_cfg: object
    info: dict                    # trunk layout, weights id
    class_names: list
    dataset: FacesClips
    held: FacesClips              # held-out clips (centre crop, no mirror); scored on rank 0
    loader: object
    sampler: object
    opt: torch.optim.Optimizer
    sched: object
    scaler: object
    faces: tuple                  # (fingerprint, face size) of the faces store
    side: int                     # training crop side in stored pixels
    weights: Optional[torch.Tensor] = None  # per-class loss weights (class_balance), on the device

    def learning_rates(self) -> dict:
        lrs = {g.get("name", i): g["lr"] for i, g in enumerate(self.opt.param_groups)}
        return {"lr": lrs.get("heads", ""), "lr_backbone": lrs.get("backbone", "")}

    def train_epoch(self, epoch: int) -> dict:
        """One epoch on every process; the figures are summed over processes (all-reduce).

        During the warm-up epochs the trunk runs without autograd: only the heads learn."""
        self.sampler.set_epoch(epoch)
        self.dataset.set_epoch(epoch)
        self.model.train()
        self.core.trunk_frozen = epoch < self.cfg.warmup_epochs
        steps = len(self.loader)
        params = [p for g in self.opt.param_groups for p in g["params"]]
        sums = torch.zeros(5, dtype=torch.float64)  # loss * n, cross-entropy * n, penalty * n, correct, n
        for step, (faces, mask, labels) in enumerate(self.loader):
            faces, mask = faces.to(self.device, non_blocking=True), mask.to(self.device, non_blocking=True)
            labels = torch.as_tensor(labels, device=self.device)
            out = self.model(faces, mask)
            total, ce, penalty = self.core.heads.loss(out, labels, class_weight=self.weights)
            check_finite(total, epoch, step, self.opt.param_groups[0]["lr"], self.env.world_size,
                         option="--lr-backbone (or --lr-heads)" if len(self.opt.param_groups) > 1 else "--lr-heads")
            sgd_step(total, self.opt, self.sched, epoch + (step + 1) / steps, params, self.cfg.grad_clip,
                     scaler=self.scaler)
            n = len(labels)
            correct = (out.log_probs.argmax(1) == labels).sum()
            sums += torch.stack([total.detach() * n, ce.detach() * n, penalty.detach() * n, correct,
                                 torch.tensor(n)]).double().cpu()
        self.core.trunk_frozen = False
        sums = _reduce_sums(sums, self.env, self.device)
        n = max(sums[4].item(), 1.0)
        return {"loss": sums[0].item() / n, "ce": sums[1].item() / n, "penalty": sums[2].item() / n,
                "train_acc": sums[3].item() / n, "clips": int(sums[4].item()), "skipped": 0}

    def holdout(self, epoch: int) -> Optional[dict]:
        if not len(self.held) or not self.env.is_main:
            return None
        return score_clips(self.core, self.held, self.class_names, self.device)

    def save(self, epoch: int, history: list, best: tuple, is_best: bool) -> None:
        """backbone.pt, then checkpoint.pt (whose provenance names backbone.pt's hash); best.pt / best_backbone.pt."""
        out = self.out_dir
        save_checkpoint(out / "backbone.pt", trunk_state(self.core.trunk, self.info["layout"], self.cfg.backbone))
        provenance = recache_provenance(out / "backbone.pt", self.faces[0], self.faces[1], self.side, self.cfg.backbone)
        payload = checkpoint_dict(self.core, self.heads_cfg, self.cfg, self.class_names, self.info, epoch, self.opt,
                                  self.sched, self.scaler, history, provenance, best)
        save_checkpoint(out / "checkpoint.pt", payload)
        if is_best and len(self.held):
            tmp = out / "best_backbone.pt.tmp"
            shutil.copyfile(out / "backbone.pt", tmp)  # the same bytes: the provenance's hash holds for it too
            os.replace(tmp, out / "best_backbone.pt")
            save_checkpoint(out / "best.pt", payload)


@torch.no_grad()
def score_clips(core: FinetuneModel, clips: FacesClips, class_names, device, batch_clips: int = 32) -> dict:
    """Accuracy, UAR and mean -log p(y|S) of clips (their sampled present frames, centre crop), in batches.

    The trunk sees only present frames and batch-norm uses its stored statistics, so a clip scores the same
    in any batch."""

    was_training = core.training
    core.eval()
    y_true, y_pred, nll = [], [], []
    for faces, mask, labels in torch.utils.data.DataLoader(clips, batch_size=batch_clips, shuffle=False):
        out = core(faces.to(device), mask.to(device))
        labels = torch.as_tensor(labels, device=device)
        y_true += labels.tolist()
        y_pred += out.log_probs.argmax(1).tolist()
        nll += (-out.log_probs.gather(1, labels[:, None])[:, 0]).tolist()
    core.train(was_training)
    return classification_metrics(y_true, y_pred, class_names) | {"nll": float(np.mean(nll))}


def _reduce_sums(sums: torch.Tensor, env: DistEnv, device: torch.device) -> torch.Tensor:
    """Add the epoch sums of every process (all-reduce), so rank 0 logs global figures."""
    if env.world_size > 1:
        import torch.distributed as dist  # lazy: torch is paid only when this runs
        sums = sums.to(device)  # nccl reduces CUDA tensors only; gloo takes CPU ones
        dist.all_reduce(sums)
    return sums.cpu()


@torch.no_grad()
def initial_map_statistics(core: FinetuneModel, clips: FacesClips, device, batch_clips: int = 32
                           ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel statistics of the initial backbone's maps on the first ``STATS_FACES`` (or more) training faces."""

    core.eval()
    chunks, seen = [], 0
    for faces, mask, _ in torch.utils.data.DataLoader(clips, batch_size=batch_clips, shuffle=False):
        chunks.append(core.maps(faces[mask].to(device)).cpu().numpy())  # (n, L, D)
        seen += int(mask.sum())
        if seen >= STATS_FACES:
            break
    core.train()
    return map_statistics(chunks, core.heads.cfg.in_dim)


def _run(faces_path, out_dir: Path, cfg, init_heads, env: DistEnv, device, log) -> FinetuneResult:
    task, start, history, best = _setup(faces_path, out_dir, cfg, init_heads, env, device, log)
    sync = lambda: None  # noqa: E731
    if env.world_size > 1:
        import torch.distributed as dist  # lazy: torch is paid only when this runs
        sync = dist.barrier  # nobody starts the next epoch (or exits) before rank 0 has saved
    stopped = []

    def guard(rows: list) -> Optional[str]:
        reason = collapse(rows, cfg.selection_metric, cfg.guard_drop) if env.is_main else None
        reason = _broadcast(reason, env)  # rank 0 alone scores the held-out clips; every rank stops with it
        stopped.extend([reason] if reason else [])
        return reason

    history, _ = run_epochs(task, start, cfg.epochs, history, best, cfg.selection_metric, out_dir / "log.csv",
                            desc="fine-tune epochs", is_main=env.is_main, sync=sync, log=log, stop=guard)
    has_held = bool(len(task.held)) and history and history[-1].get("holdout_acc", "") != ""
    selected = select_row(history, cfg.selection_metric) if has_held else None
    if stopped:
        _keep_best(task, stopped[0], log)
    warning = None
    if env.is_main and len(task.held):
        warning = majority_warning(history, task.held.labels, task.class_names, heads_lr(cfg, env.world_size))
    return FinetuneResult(out_dir, history, task.core, env, selected, stopped[0] if stopped else None, warning)


def _broadcast(reason: Optional[str], env: DistEnv) -> Optional[str]:
    """Rank 0's stop decision on every process."""
    if env.world_size == 1:
        return reason
    import torch.distributed as dist  # lazy: torch is paid only when this runs
    box = [reason]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _keep_best(task: "FinetuneTask", reason: str, log) -> None:
    """After the guard stopped the run: the best epoch's weights back into the model, and checkpoint.pt marked
    as stopped (a resume then has nothing left to do)."""
    out = task.out_dir
    if (out / "best.pt").exists():
        best = read_checkpoint(out / "best.pt")
        task.core.heads.load_state_dict(best["model"])
        load_trunk_state(task.core.trunk, best["backbone"], task.cfg.backbone)
        log(f"restored the best epoch ({best['epoch'] + 1}): use {out}/best.pt with {out}/best_backbone.pt")
    if task.env.is_main:
        ckpt = read_checkpoint(out / "checkpoint.pt")
        save_checkpoint(out / "checkpoint.pt", {**ckpt, "stopped": reason})


def _hold_in_memory(cfg: FinetuneConfig, face_size: int, side: int, clips: list[FacesClips], log) -> bool:
    """Decode the faces of ``clips`` into memory when ``cfg.in_memory`` says so (auto: when they fit)."""

    entry = get_backbone(cfg.backbone)
    pixels = entry.finetune_pixels if side == face_size else None  # a reduction keeps whole faces only
    kept = entry.fixed_input if pixels is not None else face_size
    need = sum(c.memory_bytes(kept) for c in clips)
    fits = need <= cfg.max_memory_gb * 1e9 and need <= available_memory() / 2
    if cfg.in_memory == "never" or (cfg.in_memory == "auto" and not fits):
        return False
    for clips_part, desc in zip(clips, ("training faces into memory", "held-out faces into memory")):
        clips_part.hold_in_memory(pixels, kept, cfg.workers, desc)
    log(f"faces held in memory: {need / 2**20:.0f} MiB ({kept} px{' grey' if pixels is not None else ''})")
    return True


def _setup(faces_path, out_dir: Path, cfg, init_heads, env: DistEnv, device, log):
    """Model, data, optimiser and (on resume) their saved state; rank 0 writes the config."""

    ids, labels, class_names = list_training_clips(faces_path, cfg.split, log)
    present_of = dict(zip(ids, list_split(faces_path, cfg.split).presents))
    fit_ids, held_ids = holdout_split(ids, labels, cfg.holdout_fraction, cfg.seed)
    label_of = dict(zip(ids, labels))
    with FacesStore(faces_path, "r") as store:
        fingerprint, faces_config = store.fingerprint, store.config
    faces = (fingerprint, face_size_of(faces_path))
    side = get_backbone(cfg.backbone).finetune_side(faces[1], cfg.crop)
    core, heads_cfg, info = _build_model(cfg, class_names, side, init_heads)
    info = {**info, "faces_config": faces_config}  # recorded in checkpoints: a refusal then names face settings
    core.autocast = resolve_precision(cfg.precision, device, cfg.backbone)
    core.to(device)
    dataset, held = (FacesClips(faces_path, part, [label_of[c] for c in part], cfg, train=train, side=side,
                                presents=[present_of[c] for c in part])
                     for part, train in ((fit_ids, True), (held_ids, False)))
    ckpt = _resume_state(out_dir, cfg)
    if not (ckpt is not None and ckpt.get("stopped")):
        _hold_in_memory(cfg, faces[1], side, [dataset, held], log)
    if ckpt is None and init_heads is None and heads_cfg.standardise:
        core.heads.set_map_statistics(*initial_map_statistics(core, dataset, device))
    model = core
    if env.world_size > 1:
        from torch.nn.parallel import DistributedDataParallel  # lazy: torch is paid only when this runs
        model = DistributedDataParallel(core, device_ids=[device.index] if device.type == "cuda" else None,
                                        find_unused_parameters=cfg.warmup_epochs > 0)  # warm-up: trunk unused
    loader, sampler = _make_loader(dataset, env, cfg, device)
    opt = _make_optimizer(core, cfg)
    weights = class_weights([label_of[c] for c in fit_ids], len(class_names), cfg.class_balance)
    task = FinetuneTask(cfg, env, device, out_dir, core, model, heads_cfg, info, class_names, dataset, held, loader,
                        sampler, opt, PhasedSGDR(opt, phases(cfg, env.world_size), cfg.sgdr_t0, cfg.sgdr_tmult),
                        torch.amp.GradScaler(device.type, enabled=core.autocast == torch.float16), faces, side,
                        None if weights is None else weights.to(device))
    start, history, best = 0, [], (-1.0, 0.0)
    if ckpt is not None:
        _restore(core, task.opt, task.sched, task.scaler, ckpt, cfg.backbone)
        history, start = list(ckpt["history"]), ckpt["epoch"] + 1
        best = tuple(ckpt.get("best_score", (float(ckpt["epoch"]), 0.0)))
        if ckpt.get("stopped"):
            start = cfg.epochs  # the guard ended this run: nothing is left to train
            log(f"{out_dir} was stopped after epoch {ckpt['epoch'] + 1} ({ckpt['stopped']}); nothing to resume."
                " Use a new --out (or --no-resume) to train again.")
        else:
            log(f"resuming {out_dir} after epoch {ckpt['epoch'] + 1}")
    if env.is_main:
        _announce(task, faces_path, init_heads, len(fit_ids), len(held_ids), start, log)
    return task, start, history, best


def _announce(task: FinetuneTask, faces_path, init_heads, n_fit: int, n_held: int, start: int, log) -> None:
    """Rank 0: config.json, and what is about to happen (incl. how to re-cache features)."""
    cfg = task.cfg
    precision = str(task.core.autocast).replace("torch.", "") if task.core.autocast else "fp32"
    write_resolved_config(task.out_dir, "finetune", [faces_path] + ([init_heads] if init_heads else []),
                          {**asdict(cfg), "faces": str(faces_path), "init_heads": str(init_heads) if init_heads else None,
                           "world_size": task.env.world_size, "device_used": str(task.device), "autocast": precision,
                           "crop_side": task.side, "lr_backbone_resolved": backbone_lr(cfg),
                           "lr_heads_resolved": heads_lr(cfg, task.env.world_size),
                           "batch_clips_resolved": clips_per_step(cfg), "phases": phases(cfg, task.env.world_size),
                           "fit_clips": n_fit, "holdout_clips": n_held})
    log(f"fine-tuning {cfg.backbone} on {n_fit} clips of {cfg.split} ({n_held} held out;"
        f" {task.env.world_size} process(es), {task.device}, {precision}), epochs {start + 1}..{cfg.epochs}")
    log("schedule: " + describe_schedule(cfg, task.env.world_size))
    backbone = task.out_dir / ("best_backbone.pt" if n_held else "backbone.pt")
    log(f"re-cache features for {'the selected epoch (best.pt)' if n_held else 'these heads'} with: "
        + recache_command(faces_path, cfg, backbone, task.faces[1], task.side))


def describe_schedule(cfg: FinetuneConfig, world_size: int = 1) -> str:
    """One line saying what each phase trains, at which rates, and the safety settings.

    >>> describe_schedule(FinetuneConfig(weights="random", backbone="fer-minixception", warmup_epochs=0, lr_heads=0.1,
    ...                                  batch_clips=4))
    '30 epochs heads (lr 0.1) + backbone (lr 0.0001), 4 clips a step, SGDR every 10 epochs; no clipping, no guard'
    """
    parts = []
    for k, (start, rates) in enumerate(phases(cfg, world_size)):
        end = phases(cfg, world_size)[k + 1][0] if k + 1 < len(phases(cfg, world_size)) else cfg.epochs
        what = f"heads (lr {rates['heads']:g})" + (f" + backbone (lr {rates['backbone']:g})" if rates["backbone"]
                                                   else ", backbone frozen")
        parts.append(f"{end - start} epochs {what}")
    safety = [f"gradient norm clipped at {cfg.grad_clip:g}" if cfg.grad_clip else "no clipping",
              f"guard stops at a held-out {cfg.selection_metric} drop of {cfg.guard_drop:g}" if cfg.guard_drop
              else "no guard"]
    if cfg.class_balance not in (None, "none"):  # None: not resolved yet (with_recipe)
        safety.append(f"class-balanced {cfg.class_balance}")
    return (", then ".join(parts) + f", {clips_per_step(cfg)} clips a step, SGDR every {cfg.sgdr_t0} epochs; "
            + ", ".join(safety))


def _restore(core: FinetuneModel, opt, sched, scaler, ckpt: dict, backbone: str = "vgg16") -> None:
    core.heads.load_state_dict(ckpt["model"])
    load_trunk_state(core.trunk, ckpt["backbone"], backbone)
    opt.load_state_dict(ckpt["optimizer"])
    sched.step(ckpt["epoch"] + 1)  # the rates depend on the position alone (also for runs saved by older versions)
    scaler.load_state_dict(ckpt["scaler"])


def load_trunk_state(trunk: nn.Module, state: dict, backbone: str = "vgg16", source: str = "state dict") -> str:
    """Copy a saved backbone state (``trunk_state``'s layout) into the trunk; returns the layout."""
    entry = get_backbone(backbone)
    layout = entry.detect_layout(state, source)
    fresh = entry.save_state(trunk, layout)  # the trunk's own keys under that layout, in the same order
    own = trunk.state_dict()
    mapping = dict(zip(fresh, [k for k in own if not k.endswith("num_batches_tracked")]))
    trunk.load_state_dict({mapping[k]: v for k, v in state.items() if k in mapping}, strict=False)
    return layout


def run(cfg: FinetuneConfig, inputs: Sequence[Path], out: Path, *, log=print, progress: bool = True
        ) -> StageSummary:
    """Stage `finetune`: a backbone and the heads end to end on the faces store ``inputs[0]`` (``inputs[1]``,
    if given, is a heads checkpoint to start the heads from), into the run folder ``out`` (checkpoint.pt,
    backbone.pt, best.pt, best_backbone.pt, log.csv, config.json). Resumes ``out/checkpoint.pt`` when its
    settings match (``cfg.resume``)."""
    faces_path, *init = inputs
    init_heads = init[0] if init else None
    result = finetune(faces_path, out, cfg, init_heads=init_heads, log=log)
    lines, warnings = (report_lines(result, Path(out)), [f"warning: {result.warning}"] if result.warning else []) \
        if result.env.is_main and result.history else ([], [])
    outputs = {"checkpoint": Path(out) / "checkpoint.pt", "backbone": Path(out) / "backbone.pt"}
    if result.selected:
        outputs.update(best=Path(out) / "best.pt", best_backbone=Path(out) / "best_backbone.pt")
    return StageSummary("finetune", True, outputs, [], lines, warnings=warnings, result=result)


def report_lines(result: FinetuneResult, out: Path) -> list[str]:
    """The run's end, as `emo-train heads` says it: last and selected epochs with the held-out WAR, UAR and
    loss, why the guard stopped it, and which files to use."""
    lines = []
    rows = [("last", result.history[-1])] + ([("selected", result.selected)] if result.selected else [])
    for name, row in rows:
        held = (f"  held-out WAR {float(row['holdout_acc']):.3f}  UAR {float(row['holdout_uar']):.3f}"
                f"  loss {float(row['holdout_nll']):.3f}" if row["holdout_acc"] != "" else "")
        lines.append(f"{name:>8}: epoch {row['epoch']}{held}  train loss {float(row['loss']):.4f}")
    if result.stopped:
        lines.append(f"stopped early: {result.stopped}")
    if result.selected:
        lines.append(f"checkpoints: {out}/best.pt with {out}/best_backbone.pt (selected), {out}/checkpoint.pt"
                     f" with {out}/backbone.pt (last); log {out}/log.csv")
        ckpt, backbone = out / "best.pt", out / "best_backbone.pt"
    else:
        lines.append(f"done: {out}/checkpoint.pt, {out}/backbone.pt; log {out}/log.csv")
        ckpt, backbone = out / "checkpoint.pt", out / "backbone.pt"
    lines.append(f"predict from raw video: emo-predict VIDEO --checkpoint {ckpt} --weights {backbone}")
    return lines

