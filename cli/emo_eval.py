"""`emo-eval`: evaluate a heads checkpoint on one split of a features store."""
import click

from emotion_attention.cli.common import UserErrorCommand
from emotion_attention.pipeline.configs import EvalConfig
from emotion_attention.pipeline.stages.evaluate import evaluate
from emotion_attention.pipeline.stages.explain import check_explain_faces, explain_evaluation


def parse_frames(value: str) -> int:
    """"all" -> 0 (every present frame); a positive integer -> that many sampled frames."""
    if value.lower() == "all":
        return 0
    if not value.isdigit() or int(value) < 1:
        raise click.BadParameter(f"{value!r}: use 'all' or a positive number of frames such as 16")
    return int(value)


def run_eval(features, checkpoint, split, out_dir, cfg: EvalConfig, fold=None) -> dict:
    """The one stage call of `emo-eval` and its summary on the console; --explain runs after it in main."""
    metrics = evaluate(features, checkpoint, split=split, out_dir=out_dir, cfg=cfg, fold=fold)
    split = metrics["split"]
    click.echo(f"{split}: {metrics['num_clips']} clips, accuracy (WAR) {metrics['accuracy']:.4f},"
               f" UAR {metrics['uar']:.4f}, skipped {metrics['skipped']}")
    for failure in metrics["failures"]:  # left out of the metrics, never scored (damaged, no face, unknown label)
        click.echo(f"  skipped {failure.clip_id}: {failure.reason}", err=True)
    width = max([10] + [len(n) for n in metrics["per_class_recall"]])  # MAFW's "Disappointment"
    for name, recall in metrics["per_class_recall"].items():
        shown = "n/a (no clip)" if recall is None else f"{recall:.4f}"
        click.echo(f"  {name:<{width}} recall {shown}  ({metrics['support'][name]} clips)")
    click.echo(f"report: {out_dir}/metrics.json, confusion.csv/.png, predictions.csv/.json, failures.jsonl")
    return metrics


@click.command(cls=UserErrorCommand, context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("features", type=click.Path(exists=True, dir_okay=False))
@click.option("--checkpoint", required=True, type=click.Path(exists=True, dir_okay=False),
              help="best.pt or last.pt from `emo-train heads`")
@click.option("--split", default="Val", show_default=True, help="matched case-insensitively")
@click.option("--fold", type=int, default=None, help="a dataset with folds: evaluate fold K's test part"
              " (instead of --split)")
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False), help="report folder")
@click.option("--frames", default="all", show_default=True, help="'all' present frames, or a number to sample")
@click.option("--seed", type=int, default=EvalConfig.seed, show_default=True, help="frame sampling seed")
@click.option("--view", type=int, default=EvalConfig.view, show_default=True, help="cached view (0 = original)")
@click.option("--device", default=EvalConfig.device, show_default=True)
@click.option("--explain", is_flag=True, help="also a Fig. 2-style PNG per clip and OUT/explain/index.html (needs --faces)")
@click.option("--faces", default=None, type=click.Path(exists=True, dir_okay=False),
              help="faces store the features were made from: the pixels for --explain")
def main(features, checkpoint, split, fold, out_dir, frames, seed, view, device, explain, faces):
    """Accuracy, UAR, per-class recall, confusion matrix and per-video p(c|S), p(f|S) on one split.

    Example: emo-eval runs/features.h5 --checkpoint runs/heads/best.pt --split Val --out runs/heads/eval_val
    """
    if explain and faces is None:
        raise click.BadParameter("--explain needs --faces FACES.h5, the faces store the features were made from")
    cfg = EvalConfig(frames=parse_frames(frames), seed=seed, view=view, device=device)
    if explain:
        check_explain_faces(faces, features)  # another dataset's or settings' faces store: refused before any work
    metrics = run_eval(features, checkpoint, split, out_dir, cfg, fold)  # a UserError becomes one line (cli.common)
    if explain:
        page = explain_evaluation(faces, metrics["records"], list(metrics["per_class_recall"]),
                                  f"{out_dir}/explain", features_path=features, title=f"{metrics['split']} ({checkpoint})")
        click.echo(f"explanations: {page} (one figure per clip, sortable by correctness and confidence)")
