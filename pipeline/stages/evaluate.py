"""Batch evaluation of trained heads over one split of a features store (the paper's tables).

``predict_video`` is the pure, in-memory step (arrays in, dict out); ``evaluate`` is the stage:
features store + checkpoint in, metrics JSON, confusion matrix CSV/PNG and per-video predictions out.
"""
from __future__ import annotations

import csv
import json
from dataclasses import asdict, replace
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
from tqdm import tqdm

from emotion_attention.cache.errors import ConfigError, StoreDamaged, StoreMismatch
from emotion_attention.cache.features_store import FeaturesStore
from emotion_attention.pipeline.configs import EvalConfig
from emotion_attention.pipeline.core.runtime import Failure, FailureLog, check_writable, resolve_device
from emotion_attention.pipeline.core.stage import Output, StageSummary, failure_lines, write_resolved_config
from emotion_attention.pipeline.data.folds import select_ids
from emotion_attention.pipeline.models.heads import EmotionHeads, check_checkpoint_fits, load_heads
from emotion_attention.pipeline.stages.explain import check_explain_faces, explain_evaluation
from emotion_attention.pipeline.training.batches import sample_frames
from emotion_attention.pipeline.training.metrics import (
    NoFrames,
    classification_metrics,
    plot_confusion,
    predict_video,
    row_normalise,
    write_confusion_csv,
)


def predict_split(model: EmotionHeads, store: FeaturesStore, clip_ids: Sequence[str], cfg: EvalConfig,
                  class_names: Sequence[str], progress: bool = True) -> tuple[list[dict], list[Failure]]:
    """predict_video over clips; returns (one record per clip, a Failure per clip left out of the metrics).

    A damaged clip (failed checksum, non-finite maps: StoreDamaged) is left out and named, never scored.
    """
    records, failures = [], []
    index = {name.lower(): i for i, name in enumerate(class_names)}
    for k, cid in enumerate(tqdm(clip_ids, desc="evaluate", unit="clip", disable=not progress)):
        label = str(store.attrs(cid).get("label", ""))
        if label.lower() not in index:
            failures.append(Failure("eval", str(store.path), cid, f"label {label!r} is not one of the checkpoint's"
                                    f" classes {list(class_names)}"))
            continue
        try:
            maps, present = store.read_clip(cid, views=[cfg.view])
            frames = (sample_frames(present, cfg.frames, np.random.default_rng([cfg.seed, k]))
                      if cfg.frames else None)
            out = predict_video(model, maps, present, frames=frames)
        except (NoFrames, StoreDamaged) as exc:
            failures.append(Failure("eval", str(store.path), cid, f"{exc}; left out of the metrics"))
            continue
        records.append({"clip_id": cid, "label": index[label.lower()], **out})
    return records, failures


def evaluate(features_path, checkpoint, split: Optional[str] = None, out_dir=None, cfg: EvalConfig = EvalConfig(),
             progress: bool = True, fold: Optional[int] = None, log=print) -> dict:
    """Evaluate a heads checkpoint on one split of a features store, or on one fold's test part.

    Arguments:
        features_path: the features store (``emo-cache extract``).
        checkpoint: ``best.pt``/``last.pt`` from ``emo-train heads``; its provenance must match the store.
        split: split name, matched case-insensitively; None: ``cfg.split`` ("Val" for the paper's tables).
        out_dir: report folder (metrics.json, confusion.csv/.png, predictions.csv/.json,
            config.json, failures.jsonl); None writes nothing and only returns.
        cfg: EvalConfig (frames, seed, view, device, split, fold).
        fold: a dataset with folds: evaluate fold K's test part (``split`` is then ignored); None: ``cfg.fold``.
        log: where a note goes (a store that differs from the checkpoint's only in its number of views).
    Returns: the metrics dict (accuracy, uar, per_class_recall, confusion, ...) plus ``records``
        (per-clip predictions) and ``failures``.

    >>> m = evaluate("feats.h5", "runs/heads/best.pt", "Val", "runs/heads/eval_val")  # doctest: +SKIP
    >>> round(m["accuracy"], 3), round(m["uar"], 3)  # doctest: +SKIP
    (0.412, 0.358)
    """
    split = cfg.split if split is None else split
    fold = cfg.fold if fold is None else fold
    cfg = replace(cfg, split=split, fold=fold)
    if out_dir is not None:
        check_writable(out_dir)  # a read-only --out is one line before any work
    model, ckpt = load_heads(checkpoint)
    model.to(resolve_device(cfg.device))
    with FeaturesStore(features_path, "r") as store:
        note = check_checkpoint_fits(store, ckpt, checkpoint, cfg.view)  # names every differing key, both values
        if note:  # only the number of cached views differs
            log(note)
        if [c.lower() for c in store.class_names] != [c.lower() for c in ckpt["class_names"]]:
            raise StoreMismatch(f"{features_path}: classes {store.class_names} differ from the checkpoint's"
                                f" {ckpt['class_names']} ({checkpoint})")
        clip_ids = select_ids(store, split=split, fold=fold, part="test")
        if fold is not None:
            split = f"fold {fold} test"
        if not clip_ids:
            raise ConfigError(f"{features_path}: no complete clip in {'the' if fold else 'split'} {split!r}; splits"
                              " are matched case-insensitively against each clip's 'split' attribute")
        num_views = store.shape(clip_ids[0])[0]
        if cfg.view >= num_views:
            raise ConfigError(f"{features_path} caches {num_views} view(s); --view {cfg.view}"
                              " does not exist (0 is the original)")
        records, failures = predict_split(model, store, clip_ids, cfg, ckpt["class_names"], progress)
    metrics = classification_metrics([r["label"] for r in records], [r["pred"] for r in records],
                                     ckpt["class_names"])
    metrics.update(split=split, checkpoint=str(checkpoint), features=str(features_path),
                   skipped=len(failures), frames="all" if cfg.frames == 0 else cfg.frames, fold=fold)
    if out_dir is not None:
        write_report(Path(out_dir), metrics, records, failures, ckpt["class_names"],
                     {"eval": asdict(cfg), "split": split, "fold": fold, "checkpoint": str(checkpoint),
                      "features": str(features_path)}, inputs=[features_path, checkpoint])
    return {**metrics, "records": records, "failures": failures}


def write_report(out_dir: Path, metrics: dict, records: list[dict], failures: list[Failure],
                 class_names: Sequence[str], config: dict, inputs: Sequence = ()) -> None:
    """Write metrics.json, confusion CSVs + PNG, predictions CSV + JSON, config.json, failures.jsonl."""
    out = Output(out_dir)
    out.prepare()
    (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))
    write_resolved_config(out, "eval", inputs, config)
    with FailureLog(out.failures_path) as flog:
        for failure in failures:
            flog.add(failure)
        for record in records:
            flog.succeeded(record["clip_id"])
    confusion = np.asarray(metrics["confusion"])
    write_confusion_csv(out_dir / "confusion.csv", confusion, class_names)
    write_confusion_csv(out_dir / "confusion_normalised.csv", row_normalise(confusion), class_names)
    fig = plot_confusion(confusion, class_names)
    fig.savefig(out_dir / "confusion.png", dpi=100, bbox_inches="tight")
    import matplotlib.pyplot as plt  # lazy: matplotlib is paid only when this runs
    plt.close(fig)
    write_predictions(out_dir, records, class_names)


def write_predictions(out_dir: Path, records: list[dict], class_names: Sequence[str]) -> None:
    """predictions.csv (one row per clip, p(f|S) as ';'-joined text) and predictions.json (full arrays)."""
    rows = []
    for r in records:
        rows.append({"clip_id": r["clip_id"], "label": class_names[r["label"]],
                     "pred": class_names[r["pred"]], "correct": r["label"] == r["pred"],
                     "probs": dict(zip(class_names, np.round(r["probs"], 6).tolist())),
                     "frames": r["frames"].tolist(),
                     "frame_weights": np.round(r["frame_weights"], 6).tolist()})
    (out_dir / "predictions.json").write_text(json.dumps(rows, indent=1))
    with open(out_dir / "predictions.csv", "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["clip_id", "label", "pred", "correct", *[f"p_{c}" for c in class_names],
                         "top_frame", "frame_weights"])
        for row, r in zip(rows, records):
            writer.writerow([row["clip_id"], row["label"], row["pred"], int(row["correct"]),
                             *[f"{p:.6f}" for p in r["probs"]], int(r["frame_weights"].argmax()),
                             ";".join(f"{w:.6f}" for w in r["frame_weights"])])


def run(cfg: EvalConfig, inputs: Sequence[Path], out: Path, *, log=print, progress: bool = True) -> StageSummary:
    """Stage `eval`: score the checkpoint ``inputs[1]`` on a split (or fold) of the features store
    ``inputs[0]``; the report goes to the folder ``out``. With ``cfg.explain``, ``inputs[2]`` is the faces
    store the features came from, and a figure per clip goes to ``out/explain``."""
    cfg.validate()
    features, checkpoint, *rest = inputs
    if cfg.explain and not rest:
        raise ConfigError("--explain needs --faces FACES.h5, the faces store the features were made from")
    if cfg.explain:
        check_explain_faces(rest[0], features)  # another dataset's or settings' faces store: refused before any work
    metrics = evaluate(features, checkpoint, out_dir=out, cfg=cfg, progress=progress, log=log)
    lines = [f"{metrics['split']}: {metrics['num_clips']} clips, accuracy (WAR) {metrics['accuracy']:.4f},"
             f" UAR {metrics['uar']:.4f}, skipped {metrics['skipped']}"]
    width = max([10] + [len(n) for n in metrics["per_class_recall"]])  # MAFW's "Disappointment"
    for name, recall in metrics["per_class_recall"].items():
        shown = "n/a (no clip)" if recall is None else f"{recall:.4f}"
        lines.append(f"  {name:<{width}} recall {shown}  ({metrics['support'][name]} clips)")
    lines.append(f"report: {out}/metrics.json, confusion.csv/.png, predictions.csv/.json, failures.jsonl")
    outputs = {"report": Path(out)}
    if cfg.explain:
        page = explain_evaluation(rest[0], metrics["records"], list(metrics["per_class_recall"]),
                                  f"{out}/explain", features_path=features,
                                  title=f"{metrics['split']} ({checkpoint})")
        lines.append(f"explanations: {page} (one figure per clip, sortable by correctness and confidence)")
        outputs["explain"] = Path(page)
    return StageSummary("eval", True, outputs, list(metrics["failures"]), lines,
                        warnings=failure_lines(metrics["failures"], "skipped"), result=metrics)
