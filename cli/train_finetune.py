"""`emo-train finetune FACES.h5 --out RUN_DIR`: end-to-end VGG16 + heads (registered in emo-train's group).

Multi-GPU / multi-machine: `torchrun --nproc-per-node N -m cli.train_finetune FACES.h5 --out RUN_DIR ...`
(or `torchrun --nproc-per-node N $(which emo-train) finetune ...`).
"""
from __future__ import annotations

from pathlib import Path

import click
from tqdm import tqdm

from cache import StoreError
from pipeline.finetune import FinetuneConfig, check_finetune, finetune as finetune_stage

D = FinetuneConfig()


@click.command("finetune")
@click.argument("faces", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--out", "out", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Run folder: checkpoint.pt, backbone.pt (for `emo-cache extract --weights`), log.csv.")
@click.option("--init", "init_heads", default=None, type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="Heads checkpoint (emo-train heads) to start the heads from.")
@click.option("--weights", required=True, help="VGG16 weights (torchvision or VGG-Face state dict), or 'random'.")
@click.option("--seed", type=int, default=D.seed, show_default=True)
@click.option("--split", default=D.split, show_default=True, help="Split of the faces store to train on.")
@click.option("--epochs", type=int, default=D.epochs, show_default=True)
@click.option("--frames-per-clip", type=int, default=D.frames_per_clip, show_default=True)
@click.option("--batch-clips", type=int, default=D.batch_clips, show_default=True, help="Clips per step per process.")
@click.option("--crop", type=int, default=D.crop, show_default=True, help="Random crop side (centre at eval).")
@click.option("--mirror/--no-mirror", default=D.mirror, show_default=True)
@click.option("--lr-backbone", type=float, default=D.lr_backbone, show_default=True)
@click.option("--lr-heads", type=float, default=D.lr_heads, show_default=True)
@click.option("--weight-decay", type=float, default=D.weight_decay, show_default=True)
@click.option("--sgdr-t0", type=int, default=D.sgdr_t0, show_default=True, help="Epochs in the first SGDR cycle.")
@click.option("--sgdr-tmult", type=int, default=D.sgdr_tmult, show_default=True)
@click.option("--freeze-blocks", type=int, default=D.freeze_blocks, show_default=True,
              help="Keep VGG16 conv blocks 1..N fixed (0-5).")
@click.option("--precision", type=click.Choice(["auto", "fp32", "bf16", "fp16"]), default=D.precision,
              show_default=True)
@click.option("--grad-checkpoint/--no-grad-checkpoint", default=D.grad_checkpoint, show_default=True)
@click.option("--workers", type=int, default=D.workers, show_default=True, help="DataLoader processes.")
@click.option("--device", default=D.device, show_default=True)
@click.option("--heads", "heads_count", type=int, default=D.heads_count, show_default=True,
              help="New heads only: attention heads R.")
@click.option("--hidden", "heads_hidden", type=int, default=D.heads_hidden, show_default=True,
              help="New heads only: attention units U.")
@click.option("--reg", "heads_reg", type=float, default=D.heads_reg, show_default=True,
              help="New heads only: penalty weight.")
@click.option("--resume/--no-resume", default=D.resume, show_default=True)
def finetune(faces: Path, out: Path, init_heads, **options) -> None:
    """Fine-tune VGG16 and the heads end to end on the aligned faces in FACES (paper Sec. 4.2)."""
    cfg = FinetuneConfig(**options)
    try:
        check_finetune(faces, out, cfg, init_heads)  # stop before any work, with a message, not a traceback
    except (ValueError, StoreError) as exc:
        raise click.UsageError(str(exc)) from exc
    result = finetune_stage(faces, out, cfg, init_heads=init_heads, log=tqdm.write)  # above the progress bar
    if result.env.is_main and result.history:
        last = result.history[-1]
        click.echo(f"done: {out}/checkpoint.pt, {out}/backbone.pt; last epoch loss {last['loss']:.4f},"
                   f" train acc {last['train_acc']:.3f}")


if __name__ == "__main__":  # torchrun -m cli.train_finetune ...
    finetune()
