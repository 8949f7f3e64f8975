"""`emo-train`: train the heads on a features store (`heads`) and reproduce Tables 1-2 (`ablate`)."""
import click

from emotion_attention.cli.common import UserErrorGroup
from emotion_attention.cli.train_finetune import finetune
from emotion_attention.pipeline.configs import POOLING, SPATIAL, AblationConfig, HeadsConfig, TrainConfig
from emotion_attention.pipeline.stages.ablate import ablate as run_ablation
from emotion_attention.pipeline.stages.heads import heads_config_for_store, train_heads

T, H = TrainConfig, HeadsConfig  # the one source of defaults


def train_options(fn):
    """Options shared by `heads` and `ablate`, mapped one-to-one onto TrainConfig fields."""
    options = [
        click.option("--epochs", type=int, default=T.epochs, show_default=True),
        click.option("--batch-size", type=int, default=T.batch_size, show_default=True),
        click.option("--frames", "frames_per_clip", type=int, default=T.frames_per_clip, show_default=True,
                     help="random present frames per clip and epoch (0 = all)"),
        click.option("--random-view/--first-view", default=T.random_view, show_default=True,
                     help="sample a cached view (original/mirror) per clip as augmentation"),
        click.option("--crop-cells", type=int, default=T.crop_cells, show_default=True,
                     help="random crop on the cached map grid per clip, e.g. 14 of 16 (~224 of 256 px); 0 = off"),
        click.option("--lr", type=float, default=T.lr, show_default=True),
        click.option("--momentum", type=float, default=T.momentum, show_default=True),
        click.option("--weight-decay", type=float, default=T.weight_decay, show_default=True),
        click.option("--restart-epochs", type=int, default=T.restart_epochs, show_default=True, help="SGDR T_0"),
        click.option("--restart-mult", type=int, default=T.restart_mult, show_default=True, help="SGDR T_mult"),
        click.option("--grad-clip", type=float, default=T.grad_clip, show_default=True, help="0 = off"),
        click.option("--holdout", "holdout_fraction", type=float, default=T.holdout_fraction, show_default=True,
                     help="share of the train split kept out for model selection"),
        click.option("--select", "selection_metric", type=click.Choice(["acc", "uar"]),
                     default=T.selection_metric, show_default=True),
        click.option("--train-split", default=T.train_split, show_default=True),
        click.option("--seed", type=int, default=T.seed, show_default=True),
        click.option("--device", default=T.device, show_default=True, help="auto | cpu | cuda | cuda:N"),
        click.option("--in-memory", type=click.Choice(["auto", "always", "never"]), default=T.in_memory,
                     show_default=True),
        click.option("--max-memory-gb", type=float, default=T.max_memory_gb, show_default=True),
        click.option("--prefetch", type=int, default=T.prefetch, show_default=True,
                     help="batches read ahead in a thread (0 = off)"),
    ]
    for option in reversed(options):
        fn = option(fn)
    return fn




def split_train_options(kwargs: dict) -> TrainConfig:
    fields = set(TrainConfig.__dataclass_fields__)
    return TrainConfig(**{k: kwargs.pop(k) for k in list(kwargs) if k in fields})


@click.group(cls=UserErrorGroup, context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """Train the paper's heads on cached features; run the ablation of Tables 1-2."""


def heads_options(fn):
    """Options shared by `heads` and `cv`, mapped one-to-one onto HeadsConfig fields."""
    options = [
        click.option("--spatial", type=click.Choice(SPATIAL), default=H.spatial, show_default=True),
        click.option("--pooling", type=click.Choice(POOLING), default=H.pooling, show_default=True),
        click.option("--heads", type=int, default=H.heads, show_default=True, help="R attention heads"),
        click.option("--hidden", type=int, default=H.hidden, show_default=True,
                     help="U hidden units of the attention"),
        click.option("--reg", type=float, default=H.reg, show_default=True, help="weight of ||AA^T - I||_F^2"),
        click.option("--lstm-hidden", type=int, default=H.lstm_hidden, show_default=True),
        click.option("--shift-clusters", type=int, default=H.shift_clusters, show_default=True),
        click.option("--dropout", type=float, default=H.dropout, show_default=True),
        click.option("--standardise/--no-standardise", default=H.standardise, show_default=True,
                     help="per-channel standardisation of the maps with training statistics (off: the paper's raw maps)"),
    ]
    for option in reversed(options):
        fn = option(fn)
    return fn


def parse_folds(value: str | None, features) -> tuple:
    """--folds: "all" (every fold of the store), "1,3", or None/"" (no folds)."""
    from emotion_attention.cache.features_store import FeaturesStore
    from emotion_attention.pipeline.data.folds import store_folds

    if not value:
        return ()
    if value.strip().lower() == "all":
        with FeaturesStore(features, "r") as store:
            return tuple(store_folds(store))
    try:
        return tuple(int(v) for v in value.split(",") if v.strip())
    except ValueError as exc:
        raise click.BadParameter(f"{value!r}: use 'all' or fold numbers such as 1,3") from exc


@main.command()
@click.argument("features", type=click.Path(exists=True, dir_okay=False))
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False), help="run folder")
@heads_options
@train_options
@click.option("--fold", type=int, default=None,
              help="a dataset with folds: train on fold K's train part (selection on a held-out part of it)")
@click.option("--resume", is_flag=True, help="continue RUN_DIR/last.pt")
def heads(features, out_dir, resume, **kwargs):
    """Train spatial attention + temporal softmax pooling heads on FEATURES.h5.

    Example: emo-train heads runs/features.h5 --out runs/heads   (DFEW fold 1: add --fold 1)
    """
    train_cfg = split_train_options(kwargs)
    heads_cfg = heads_config_for_store(features, **kwargs)
    result = train_heads(features, out_dir, train_cfg, heads_cfg, resume=resume)
    for name in ("last", "selected"):
        row = result[name]
        click.echo(f"{name:>8}: epoch {row['epoch']}  held-out acc {row['holdout_acc']}  UAR {row['holdout_uar']}"
                   f"  loss {row['loss']}")
    click.echo(f"selection: {result['selection']}; device {result['device']}; store in memory: {result['in_memory']}")
    click.echo(f"checkpoints: {result['checkpoint_best']} (selected), {result['checkpoint_last']} (last);"
               f" log {result['log_csv']}")
    if result.get("warning"):
        click.echo(f"warning: {result['warning']}", err=True)


@main.command()
@click.argument("features", type=click.Path(exists=True, dir_okay=False))
@click.option("--out", "out_dir", default="runs/ablate", show_default=True, type=click.Path(file_okay=False))
@click.option("--seeds", type=int, default=AblationConfig.seeds, show_default=True)
@click.option("--rows", default=",".join(AblationConfig.rows), show_default=True,
              help="comma-separated row keys of Tables 1-2")
@click.option("--eval-split", default=AblationConfig.eval_split, show_default=True)
@click.option("--fold", type=int, default=None, help="a dataset with folds: run on fold K (train -> test part)")
@click.option("--folds", "folds_text", default=None, help="'all' or e.g. 1,3: run every row on each fold")
@train_options
def ablate(features, out_dir, seeds, rows, eval_split, fold, folds_text, **kwargs):
    """Run the rows of Tables 1-2 over N seeds (and folds); write a Markdown table beside the paper's numbers.

    Example: emo-train ablate runs/features.h5 --out runs/ablate --seeds 3   (DFEW: --folds all)
    """
    train_cfg = split_train_options(kwargs)
    folds = parse_folds(folds_text, features) or ((fold,) if fold is not None else ())
    cfg = AblationConfig(seeds=seeds, rows=tuple(r.strip() for r in rows.split(",") if r.strip()),
                         eval_split=eval_split, folds=folds)
    result = run_ablation(features, out_dir, cfg, train_cfg)
    click.echo(result["markdown"])
    click.echo(f"table: {result['table_md']}; every run: {result['runs_csv']}")


@main.command()
@click.argument("features", type=click.Path(exists=True, dir_okay=False))
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False), help="cross-validation folder")
@click.option("--folds", "folds_text", default="all", show_default=True, help="'all' or e.g. 1,3")
@click.option("--eval-frames", default="all", show_default=True, help="test frames: 'all' present, or a number")
@click.option("--test-split", default=None, help="a dataset without folds (FERV39k): one run, --train-split ->"
              " this split, e.g. Test")
@heads_options
@train_options
def cv(features, out_dir, folds_text, eval_frames, test_split, **kwargs):
    """Cross-validate over the folds of FEATURES.h5: per fold, train on its train part and test on its test
    part; write cv.csv, cv.md and confusion_sum.png. Rerunning skips finished folds.

    Example: emo-train cv runs/dfew/features.h5 --out runs/dfew/cv
    """
    from emotion_attention.pipeline.configs import EvalConfig
    from emotion_attention.pipeline.stages.cv import run_cv

    train_cfg = split_train_options(kwargs)
    frames = 0 if eval_frames.lower() == "all" else int(eval_frames)
    result = run_cv(features, out_dir, train_cfg, kwargs, EvalConfig(frames=frames, device=train_cfg.device),
                    parse_folds(folds_text, features), test_split=test_split)
    click.echo(result["markdown"])
    click.echo(f"wrote {result['cv_csv']}, {result['cv_md']}, {result['confusion_png']}")


main.add_command(finetune)  # end-to-end fine-tuning lives in its own module (also a torchrun entry point)
