"""`emo-train finetune FACES.h5 --out RUN_DIR --backbone NAME`: end-to-end backbone + heads (in emo-train's group).

Multi-GPU / multi-machine: `torchrun --nproc-per-node N -m cli.train_finetune FACES.h5 --out RUN_DIR ...`
(or `torchrun --nproc-per-node N $(which emo-train) finetune ...`).
"""
from __future__ import annotations

from pathlib import Path

import click

from emotion_attention.cli.common import UserErrorCommand
from emotion_attention.pipeline.configs import BACKBONES as NAMES

DEFAULT_BACKBONE = "vgg16"


@click.command("finetune", cls=UserErrorCommand)
@click.argument("faces", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--out", "out", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Run folder: checkpoint.pt, backbone.pt (for `emo-cache extract --weights`), log.csv.")
@click.option("--backbone", type=click.Choice(NAMES), default=DEFAULT_BACKBONE, show_default=True,
              help="Registered backbone to fine-tune.")
@click.option("--init", "init_heads", default=None, type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="Heads checkpoint (emo-train heads) to start the heads from.")
@click.option("--weights", required=True,
              help="Backbone weights: VGG16 torchvision/VGG-Face state dict, fer's emotion_model.hdf5 (or"
                   " 'default' for fer's sample file), a torchvision resnet18 state dict; 'random' for tests.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--split", default="Train", show_default=True, help="Split of the faces store to train on.")
@click.option("--epochs", type=int, default=30, show_default=True)
@click.option("--frames-per-clip", type=int, default=16, show_default=True)
@click.option("--batch-clips", type=int, default=4, show_default=True, help="Clips per step per process.")
@click.option("--crop", type=int, default=None,
              help="Random crop side in stored pixels (centre at eval); default: the backbone's (VGG16 224 of 256,"
                   " fer the whole face).")
@click.option("--mirror/--no-mirror", default=True, show_default=True)
@click.option("--lr-backbone", type=float, default=None,
              help="Backbone learning rate; default: the backbone's (VGG16 1e-5, fer 1e-4, ResNet-18 1e-4).")
@click.option("--lr-heads", "--lr", "lr_heads", type=float, default=0.1, show_default=True)
@click.option("--weight-decay", type=float, default=5e-5, show_default=True)
@click.option("--sgdr-t0", type=int, default=10, show_default=True, help="Epochs in the first SGDR cycle.")
@click.option("--sgdr-tmult", type=int, default=1, show_default=True)
@click.option("--freeze-blocks", type=int, default=0, show_default=True,
              help="Keep the backbone's first N blocks fixed (0-5).")
@click.option("--precision", type=click.Choice(["auto", "fp32", "bf16", "fp16"]), default="auto", show_default=True)
@click.option("--grad-checkpoint/--no-grad-checkpoint", default=False, show_default=True)
@click.option("--workers", type=int, default=2, show_default=True, help="DataLoader processes.")
@click.option("--device", default="auto", show_default=True)
@click.option("--heads", "heads_count", type=int, default=2, show_default=True,
              help="New heads only: attention heads R.")
@click.option("--hidden", "heads_hidden", type=int, default=128, show_default=True,
              help="New heads only: attention units U.")
@click.option("--reg", "heads_reg", type=float, default=1.0, show_default=True,
              help="New heads only: penalty weight.")
@click.option("--holdout", "holdout_fraction", type=float, default=0.1, show_default=True,
              help="Share of each class kept out to select best.pt.")
@click.option("--resume/--no-resume", default=True, show_default=True)
def finetune(faces: Path, out: Path, init_heads, **options) -> None:
    """Fine-tune a backbone and the heads end to end on the aligned faces in FACES (paper Sec. 4.2).

    Example (CPU, minutes): emo-train finetune faces.h5 --out runs/ft --backbone fer-minixception --weights default
    """
    from tqdm import tqdm

    from emotion_attention.pipeline.configs import FinetuneConfig
    from emotion_attention.pipeline.stages.finetune import check_finetune
    from emotion_attention.pipeline.stages.finetune import finetune as finetune_stage

    cfg = FinetuneConfig(**options)
    check_finetune(faces, out, cfg, init_heads)  # stop before any work, with a message, not a traceback
    result = finetune_stage(faces, out, cfg, init_heads=init_heads, log=tqdm.write)  # above the progress bar
    if result.env.is_main and result.history:
        last = result.history[-1]
        click.echo(f"done: {out}/checkpoint.pt, {out}/backbone.pt; last epoch loss {last['loss']:.4f},"
                   f" train acc {last['train_acc']:.3f}"
                   + (f", held-out acc {last['holdout_acc']:.3f} (best: {out}/best.pt)"
                      if last["holdout_acc"] != "" else ""))
        click.echo(f"predict from raw video: emo-predict VIDEO --checkpoint {out}/checkpoint.pt"
                   f" --weights {out}/backbone.pt")


if __name__ == "__main__":  # torchrun -m cli.train_finetune ...
    finetune()
