"""Scoring shared by training, evaluation and cross-validation: one clip's prediction from its maps,
WAR/UAR/per-class recall, the confusion matrix as CSV and figure."""
from __future__ import annotations

import csv
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch

from emotion_attention.cache.errors import UserError
from emotion_attention.pipeline.models.heads import EmotionHeads


class NoFrames(UserError):
    """A clip has no frame with a face, so the heads have nothing to classify."""


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

    >>> from emotion_attention.pipeline.configs import HeadsConfig
    >>> _ = torch.manual_seed(0)
    >>> model = EmotionHeads(HeadsConfig(in_dim=8, num_classes=3))  # untrained: the sums and shapes hold anyway
    >>> maps = np.random.default_rng(0).normal(size=(2, 5, 4, 8)).astype(np.float16)  # (V, F, L, D)
    >>> out = predict_video(model, maps, np.array([True, True, False, True, True]))
    >>> round(float(out["probs"].sum()), 5), round(float(out["frame_weights"].sum()), 5)
    (1.0, 1.0)
    >>> out["frames"].tolist(), float(out["frame_weights"][2]), out["attention"].shape
    ([0, 1, 3, 4], 0.0, (5, 2, 4))
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
    import matplotlib  # lazy: matplotlib is paid only when a figure is drawn
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # lazy: after use("Agg"), so no display is ever needed

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
