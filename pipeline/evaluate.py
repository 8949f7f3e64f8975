"""Batch evaluation of trained heads over one split of a features store (the paper's tables).

``predict_video`` is the pure, in-memory step (arrays in, dict out); ``evaluate`` is the stage:
features store + checkpoint in, metrics JSON, confusion matrix CSV/PNG and per-video predictions out.
"""
from __future__ import annotations

import csv
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
from tqdm import tqdm

from cache.errors import ConfigError, StoreDamaged, StoreMismatch, UserError
from cache.features_store import FeaturesStore
from pipeline.clip_batches import sample_frames
from pipeline.folds import select_ids
from pipeline.heads import EmotionHeads, load_heads
from pipeline.runtime import Failure, FailureLog, resolve_device


class NoFrames(UserError):
    """A clip has no frame with a face, so the heads have nothing to classify."""


@dataclass(frozen=True)
class EvalConfig:
    frames: int = 0        # 0: every present frame (the test protocol); 16: sample like training
    seed: int = 0          # frame sampling seed when frames > 0, so a report can be reproduced
    view: int = 0          # cached view to score; 0 is the original (1 is usually the mirror)
    device: str = "auto"   # "auto": CUDA when available, else CPU; or "cpu", "cuda", "cuda:1"

    def __post_init__(self) -> None:
        if self.frames < 0 or self.view < 0:
            raise ConfigError(f"EvalConfig: frames ({self.frames}) and view ({self.view}) must be >= 0")


@torch.no_grad()
def predict_video(model: EmotionHeads, maps: np.ndarray, present: np.ndarray,
                  frames: Optional[np.ndarray] = None, view: int = 0) -> dict:
    """Classify one clip from its cached maps.

    Arguments:
        model: trained EmotionHeads (put in eval mode here; its device is used).
        maps: (V, F, L, D) or (F, L, D) float16/float32 maps of one clip; ``view`` picks V.
        present: bool (F,) face mask.
        frames: frame indices to use (default: every present frame).
        view: which cached view of a 4-D ``maps`` to score.
    Returns: dict with ``probs`` (E,) p(c|S), ``pred`` int, ``frame_weights`` (F,) p(f|S) over all F
        frames (0 for absent or unused ones), ``frame_probs`` (F, E) per-frame softmax of the scores
        (0 rows for unused frames), ``attention`` (F, heads, L) or None, ``frames`` (n,) indices used.
    Raises: NoFrames when no present frame is left to score.

    >>> out = predict_video(model, maps, present)
    >>> out["probs"].sum(), out["frame_weights"].sum()
    (1.0, 1.0)
    """
    maps = maps[view] if maps.ndim == 4 else maps                      # (F, L, D)
    present = np.asarray(present, dtype=bool)
    if maps.shape[0] != len(present):
        raise ValueError(f"maps have {maps.shape[0]} frames but present has {len(present)}")
    used = np.flatnonzero(present) if frames is None else np.asarray(frames, dtype=np.int64)
    used = used[present[used]]
    if len(used) == 0:
        raise NoFrames("the clip has no present (face) frame to classify")
    device = next(model.parameters()).device
    x = torch.from_numpy(np.ascontiguousarray(maps[used])).to(device).float()[None]  # (1, n, L, D)
    out = model.eval()(x, torch.ones(1, len(used), dtype=torch.bool, device=device))
    num_frames, num_classes = len(present), out.log_probs.shape[1]
    weights = np.zeros(num_frames, np.float32)
    weights[used] = out.frame_weights[0].cpu().numpy()
    frame_probs = np.zeros((num_frames, num_classes), np.float32)
    frame_probs[used] = out.frame_scores[0].softmax(dim=1).cpu().numpy()
    attention = None
    if out.attention is not None:
        attention = np.zeros((num_frames,) + tuple(out.attention.shape[2:]), np.float32)
        attention[used] = out.attention[0].cpu().numpy()
    probs = out.log_probs[0].exp().cpu().numpy()
    return {"probs": probs, "pred": int(probs.argmax()), "frame_weights": weights,
            "frame_probs": frame_probs, "attention": attention, "frames": used}


def classification_metrics(y_true: Sequence[int], y_pred: Sequence[int], class_names: Sequence[str]) -> dict:
    """Accuracy (WAR), UAR and per-class recall from labels and predictions.

    UAR is the mean recall over the classes that occur in ``y_true``; a class with no clip gets
    recall None and is left out of UAR.

    >>> m = classification_metrics([0, 0, 1, 2], [0, 1, 1, 2], ["a", "b", "c"])
    >>> m["accuracy"], m["uar"], m["per_class_recall"]["a"]
    (0.75, 0.8333333333333334, 0.5)
    """
    e = len(class_names)
    confusion = np.zeros((e, e), np.int64)
    for t, p in zip(y_true, y_pred):
        confusion[t, p] += 1
    support = confusion.sum(axis=1)
    recall = [float(confusion[i, i] / support[i]) if support[i] else None for i in range(e)]
    seen = [r for r in recall if r is not None]
    total = int(support.sum())
    return {"accuracy": float(np.trace(confusion) / total) if total else 0.0,
            "uar": float(np.mean(seen)) if seen else 0.0,
            "per_class_recall": dict(zip(class_names, recall)),
            "support": dict(zip(class_names, support.tolist())),
            "num_clips": total, "confusion": confusion.tolist()}


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


def evaluate(features_path, checkpoint, split: str = "Val", out_dir=None, cfg: EvalConfig = EvalConfig(),
             progress: bool = True, fold: Optional[int] = None) -> dict:
    """Evaluate a heads checkpoint on one split of a features store, or on one fold's test part.

    Arguments:
        features_path: the features store (``emo-cache extract``).
        checkpoint: ``best.pt``/``last.pt`` from ``emo-train heads``; its provenance must match the store.
        split: split name, matched case-insensitively ("Val" for the paper's tables).
        out_dir: report folder (metrics.json, confusion.csv/.png, predictions.csv/.json,
            eval_config.json, failures.jsonl); None writes nothing and only returns.
        cfg: EvalConfig (frames, seed, view, device).
        fold: a dataset with folds: evaluate fold K's test part (``split`` is then ignored).
    Returns: the metrics dict (accuracy, uar, per_class_recall, confusion, ...) plus ``records``
        (per-clip predictions) and ``failures``.

    >>> m = evaluate("feats.h5", "runs/heads/best.pt", "Val", "runs/heads/eval_val")
    >>> round(m["accuracy"], 3), round(m["uar"], 3)
    """
    model, ckpt = load_heads(checkpoint)
    model.to(resolve_device(cfg.device))
    with FeaturesStore(features_path, "r") as store:
        store.check_provenance(ckpt["provenance"], want="the checkpoint has",  # names every differing key
                               action=f"{checkpoint} was trained on features made otherwise: evaluate it on the"
                                      " features store it was trained on, or train heads on this one")
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
                      "features": str(features_path)})
    return {**metrics, "records": records, "failures": failures}


def write_report(out_dir: Path, metrics: dict, records: list[dict], failures: list[Failure],
                 class_names: Sequence[str], config: dict) -> None:
    """Write metrics.json, confusion CSVs + PNG, predictions CSV + JSON, eval_config.json, failures.jsonl."""
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))
    (out_dir / "eval_config.json").write_text(json.dumps(config, indent=2))
    with FailureLog(out_dir / "failures.jsonl") as flog:
        for failure in failures:
            flog.add(failure)
    confusion = np.asarray(metrics["confusion"])
    write_confusion_csv(out_dir / "confusion.csv", confusion, class_names)
    write_confusion_csv(out_dir / "confusion_normalised.csv", row_normalise(confusion), class_names)
    fig = plot_confusion(confusion, class_names)
    fig.savefig(out_dir / "confusion.png", dpi=100, bbox_inches="tight")
    import matplotlib.pyplot as plt
    plt.close(fig)
    write_predictions(out_dir, records, class_names)


def row_normalise(confusion: np.ndarray) -> np.ndarray:
    """Each row divided by its total (rows of classes without clips stay 0)."""
    totals = confusion.sum(axis=1, keepdims=True)
    return np.divide(confusion, totals, out=np.zeros(confusion.shape), where=totals > 0)


def write_confusion_csv(path: Path, matrix: np.ndarray, class_names: Sequence[str]) -> None:
    with open(path, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["true\\pred", *class_names])
        for name, row in zip(class_names, matrix):
            writer.writerow([name, *[f"{v:.6f}" if isinstance(v, float) else int(v) for v in row.tolist()]])


def plot_confusion(confusion: np.ndarray, class_names: Sequence[str], title: Optional[str] = None):
    """Figure with the counts (left) and the row-normalised recalls (right).

    The figure grows with the class count (11 for MAFW stay legible): about 0.75 inch per class and panel,
    tick labels rotated, cell text smaller for many classes.
    """
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(class_names)
    side = max(5.2, 0.75 * n + 1.5)
    fontsize = 8 if n <= 8 else 7
    fig, axes = plt.subplots(1, 2, figsize=(2 * side + 1.5, side), constrained_layout=True)
    if title:
        fig.suptitle(title)
    for ax, matrix, title, fmt in ((axes[0], confusion, "counts", "{:d}"),
                                   (axes[1], row_normalise(confusion), "row-normalised (recall)", "{:.2f}")):
        image = ax.imshow(matrix, cmap="Blues", vmin=0)
        ax.set(xticks=range(len(class_names)), yticks=range(len(class_names)), xlabel="predicted",
               ylabel="true", title=title)
        ax.set_xticklabels(class_names, rotation=45, ha="right")
        ax.set_yticklabels(class_names)
        limit = matrix.max() / 2 if matrix.size else 0
        for (i, j), value in np.ndenumerate(matrix):
            ax.text(j, i, fmt.format(value.item()), ha="center", va="center",
                    color="white" if value > limit else "black", fontsize=fontsize)
        fig.colorbar(image, ax=ax, shrink=0.8)
    return fig


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
