"""`emo-predict VIDEO... [--checkpoint CKPT]`: raw video -> faces -> features -> prediction, one process."""
from __future__ import annotations

from pathlib import Path

import click

from emotion_attention.cli.common import finish
from emotion_attention.cli.options import ConfigOptions, stage_command
from emotion_attention.pipeline.configs import PredictConfig

PREDICT = ConfigOptions(PredictConfig, key=())


@stage_command("emo-predict", "predict", PREDICT, context_settings={"help_option_names": ["-h", "--help"]},
               sources={"videos": ("inputs",), "out": ("out",)})
@click.argument("videos", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--out", "out", default="runs/predict", show_default=True, type=click.Path(path_type=Path),
              help="Folder for predictions.csv/json, frames/*.csv (p(f|S)) and, if asked, explain/ and stores.")
def main(videos, out, quiet, **params) -> None:
    """Predict the emotion of each VIDEO: a video file, a folder of frames (aligned faces or full frames), a
    single image, or a .txt file listing any of those. A video that cannot be read or shows no face is
    reported and skipped. Exit status 1 only when no video could be predicted."""
    from tqdm import tqdm  # lazy, with the stage: lines go above its progress bar

    from emotion_attention.pipeline.stages import predict as stage  # lazy: torch, dlib

    finish(stage.run(PREDICT.build(params), list(videos), out, log=tqdm.write, progress=not quiet))
