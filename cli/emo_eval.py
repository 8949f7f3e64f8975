"""`emo-eval`: evaluate a heads checkpoint on one split (or fold) of a features store."""
from __future__ import annotations

import click

from emotion_attention.cli.common import finish
from emotion_attention.cli.options import ConfigOptions, stage_command
from emotion_attention.pipeline.configs import EvalConfig

EVAL = ConfigOptions(EvalConfig, key=("eval",))


@stage_command("emo-eval", "eval", EVAL, context_settings={"help_option_names": ["-h", "--help"]},
               sources={"features": ("inputs", 0), "checkpoint": ("inputs", 1), "faces": ("inputs", 2),
                        "out_dir": ("out",)})
@click.argument("features", type=click.Path(exists=True, dir_okay=False))
@click.option("--checkpoint", required=True, type=click.Path(exists=True, dir_okay=False),
              help="best.pt or last.pt from `emo-train heads`")
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False), help="report folder")
@click.option("--faces", default=None, type=click.Path(exists=True, dir_okay=False),
              help="faces store the features were made from: the pixels for --explain")
def main(features, checkpoint, out_dir, faces, quiet, **params):
    """Accuracy, UAR, per-class recall, confusion matrix and per-video p(c|S), p(f|S) on one split.

    Example: emo-eval runs/features.h5 --checkpoint runs/heads/best.pt --split Val --out runs/heads/eval_val
    """
    from emotion_attention.pipeline.stages import evaluate as stage  # lazy: torch

    cfg = EVAL.build(params)
    if cfg.explain and faces is None:
        raise click.BadParameter("--explain needs --faces FACES.h5, the faces store the features were made from")
    inputs = [features, checkpoint] + ([faces] if faces else [])
    finish(stage.run(cfg, inputs, out_dir, progress=not quiet))
