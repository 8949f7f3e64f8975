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
@click.option("--batch-clips", type=int, default=None,
              help="Clips per step per process; default: the backbone's (fer 32, VGG16 and ResNet-18 4).")
@click.option("--crop", type=int, default=None,
              help="Random crop side in stored pixels (centre at eval); default: the backbone's (VGG16 224 of 256,"
                   " fer the whole face).")
@click.option("--mirror/--no-mirror", default=True, show_default=True)
@click.option("--lr-backbone", type=float, default=None,
              help="Backbone learning rate; default: the backbone's (VGG16 1e-5, fer 1e-4, ResNet-18 1e-4).")
@click.option("--lr-heads", "--lr", "lr_heads", type=float, default=None,
              help="Heads' learning rate; default: 0.1 x clips per step (all processes) / 32, emo-train heads' rate"
                   " per clip (the paper's 0.1 at 32 clips).")
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
@click.option("--in-memory", type=click.Choice(["auto", "always", "never"]), default="auto", show_default=True,
              help="Decode the faces once into RAM (auto: when they fit; fer keeps 12 KB a face).")
@click.option("--max-memory-gb", type=float, default=16.0, show_default=True, help="Ceiling for --in-memory auto.")
@click.option("--warmup-epochs", type=int, default=0, show_default=True,
              help="First epochs train the heads only, the backbone frozen.")
@click.option("--lr-heads-joint", type=float, default=None,
              help="Heads' rate once the backbone trains too (default: --lr-heads).")
@click.option("--grad-clip", type=float, default=0.0, show_default=True, help="Max gradient norm; 0 = off.")
@click.option("--guard-drop", type=float, default=0.0, show_default=True,
              help="Stop, keeping the best epoch, when held-out accuracy falls this far below the best; 0 = off.")
@click.option("--class-balance", type=click.Choice(["none", "loss"]), default="none", show_default=True,
              help="loss: weigh each clip by 1 / its class's share.")
@click.option("--select", "selection_metric", type=click.Choice(["acc", "uar"]), default="acc", show_default=True,
              help="Held-out metric that picks best.pt (and that the guard watches).")
@click.option("--recipe", type=click.Choice(["stable", "paper"]), default="stable", show_default=True,
              help="paper: Sec. 4.2 as written (4 clips a step, heads at 0.1 from the start, no warm-up, clipping,"
                   " guard or balancing); options given explicitly still win. stable: the defaults shown.")
@click.pass_context
def finetune(ctx: click.Context, faces: Path, out: Path, init_heads, recipe: str, **options) -> None:
    """Fine-tune a backbone and the heads end to end on the aligned faces in FACES (paper Sec. 4.2).

    Example (CPU, minutes): emo-train finetune faces.h5 --out runs/ft --backbone fer-minixception --weights default
    """
    from tqdm import tqdm

    from emotion_attention.pipeline.configs import PAPER_RECIPE, FinetuneConfig
    from emotion_attention.pipeline.stages.finetune import check_finetune
    from emotion_attention.pipeline.stages.finetune import finetune as finetune_stage

    if recipe == "paper":
        given = {name for name in options if ctx.get_parameter_source(name) == click.core.ParameterSource.COMMANDLINE}
        options.update({k: v for k, v in PAPER_RECIPE.items() if k not in given})
    cfg = FinetuneConfig(**options)
    check_finetune(faces, out, cfg, init_heads)  # stop before any work, with a message, not a traceback
    result = finetune_stage(faces, out, cfg, init_heads=init_heads, log=tqdm.write)  # above the progress bar
    if result.env.is_main and result.history:
        report(result, out)


def report(result, out: Path) -> None:
    """The run's end, as emo-train heads says it: last and selected epochs, the files, any warning."""
    rows = [("last", result.history[-1])] + ([("selected", result.selected)] if result.selected else [])
    for name, row in rows:
        held = (f"  held-out acc {row['holdout_acc']}  UAR {row['holdout_uar']}  loss {row['holdout_nll']}"
                if row["holdout_acc"] != "" else "")
        click.echo(f"{name:>8}: epoch {row['epoch']}{held}  train loss {row['loss']}")
    if result.stopped:
        click.echo(f"stopped early: {result.stopped}")
    if result.selected:
        click.echo(f"checkpoints: {out}/best.pt with {out}/best_backbone.pt (selected), {out}/checkpoint.pt with"
                   f" {out}/backbone.pt (last); log {out}/log.csv")
        ckpt, backbone = out / "best.pt", out / "best_backbone.pt"
    else:
        click.echo(f"done: {out}/checkpoint.pt, {out}/backbone.pt; log {out}/log.csv")
        ckpt, backbone = out / "checkpoint.pt", out / "backbone.pt"
    click.echo(f"predict from raw video: emo-predict VIDEO --checkpoint {ckpt} --weights {backbone}")
    if result.warning:
        click.echo(f"warning: {result.warning}", err=True)


if __name__ == "__main__":  # torchrun -m cli.train_finetune ...
    finetune()
