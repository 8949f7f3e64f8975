"""Cross-validation over a dataset's folds: the ``emo-train cv`` stage.

For every fold K of a features store (DFEW 5, MAFW 5, CK+ 10): train the heads on fold K's train part (model
selection on a stratified held-out part of that train part, never on the test part), evaluate the selected
checkpoint on fold K's test part, and keep the fold's result. A fold whose result file exists is skipped and
an interrupted fold resumes, so rerunning the command completes a cross-validation. The summary is
``cv.csv`` (one row per fold, then mean and std), ``cv.md`` and ``confusion_sum.png`` (the folds' confusion
matrices summed).
"""
from __future__ import annotations

import csv
import json
from dataclasses import asdict, replace
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
from tqdm import tqdm

from emotion_attention.cache.errors import ConfigError
from emotion_attention.cache.features_store import FeaturesStore
from emotion_attention.pipeline.configs import CVConfig, EvalConfig, TrainConfig
from emotion_attention.pipeline.core.runtime import check_writable
from emotion_attention.pipeline.core.stage import Output, StageSummary, write_resolved_config
from emotion_attention.pipeline.data.folds import store_folds
from emotion_attention.pipeline.stages.evaluate import evaluate
from emotion_attention.pipeline.stages.heads import heads_config_for_store, train_heads
from emotion_attention.pipeline.training.metrics import plot_confusion, write_confusion_csv

FOLD_RESULT = "fold_result.json"  # written last in a fold's folder: its presence means the fold is done


def run_fold(features_path, out_dir: Path, fold: Optional[int], train_cfg: TrainConfig, heads_fields: dict,
             eval_cfg: EvalConfig, test_split: Optional[str] = None) -> dict:
    """Train on fold K's train part, evaluate on its test part; reuse the fold's result when it exists.
    ``fold`` None: a train/test dataset (FERV39k): train on ``train_cfg.train_split``, test on ``test_split``."""
    fold_dir = out_dir / (f"fold_{fold}" if fold is not None else f"split_{test_split}")
    done = fold_dir / FOLD_RESULT
    if done.exists():
        return json.loads(done.read_text())
    run_dir = fold_dir / "heads"
    heads_cfg = heads_config_for_store(features_path, **heads_fields)
    trained = train_heads(features_path, run_dir, replace(train_cfg, fold=fold), heads_cfg,
                          resume=(run_dir / "last.pt").exists())
    metrics = evaluate(features_path, trained["checkpoint_best"], split=test_split or "Test", out_dir=fold_dir / "eval",
                       cfg=eval_cfg, progress=False, fold=fold)
    name = fold if fold is not None else f"{train_cfg.train_split} -> {test_split}"
    result = {"fold": name, "war": metrics["accuracy"], "uar": metrics["uar"], "test_clips": metrics["num_clips"],
              "skipped": metrics["skipped"], "train_clips": trained["fit_clips"],
              "holdout_clips": trained["holdout_clips"], "selected_epoch": trained["selected"]["epoch"],
              "per_class_recall": metrics["per_class_recall"], "confusion": metrics["confusion"],
              "class_names": list(metrics["per_class_recall"]), "report": str(fold_dir / "eval")}
    tmp = done.with_name(done.name + ".tmp")
    tmp.write_text(json.dumps(result, indent=2))
    tmp.replace(done)
    return result


def summarise_folds(results: Sequence[dict]) -> dict:
    """Mean and std (population, ddof=0) of WAR, UAR and each class's recall over folds; summed confusion."""
    names = results[0]["class_names"]
    war = np.array([r["war"] for r in results])
    uar = np.array([r["uar"] for r in results])
    recall = {}
    for name in names:
        values = np.array([r["per_class_recall"][name] for r in results if r["per_class_recall"][name] is not None])
        recall[name] = (float(values.mean()), float(values.std())) if len(values) else (None, None)
    return {"folds": [r["fold"] for r in results], "class_names": names,
            "war": (float(war.mean()), float(war.std())), "uar": (float(uar.mean()), float(uar.std())),
            "recall": recall, "confusion": np.sum([r["confusion"] for r in results], axis=0).tolist(),
            "test_clips": int(sum(r["test_clips"] for r in results))}


def write_cv_csv(path: Path, results: Sequence[dict], summary: dict) -> None:
    names = summary["class_names"]
    with open(path, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["fold", "test_clips", "war", "uar", *[f"recall_{n}" for n in names]])
        for r in results:
            writer.writerow([r["fold"], r["test_clips"], f"{r['war']:.6f}", f"{r['uar']:.6f}",
                             *["" if r["per_class_recall"][n] is None else f"{r['per_class_recall'][n]:.6f}"
                               for n in names]])
        for i, stat in enumerate(("mean", "std")):
            writer.writerow([stat, summary["test_clips"] if stat == "mean" else "", f"{summary['war'][i]:.6f}",
                             f"{summary['uar'][i]:.6f}",
                             *["" if summary["recall"][n][i] is None else f"{summary['recall'][n][i]:.6f}"
                               for n in names]])


def cv_markdown(results: Sequence[dict], summary: dict, header: dict) -> str:
    """cv.md: the protocol, one row per fold, mean ± std, per-class recall and the summed confusion matrix."""
    pct = (lambda v: "n/a" if v is None else f"{100 * v:.1f}")
    pm = (lambda m, s: "n/a" if m is None else f"{100 * m:.1f} ± {100 * s:.1f}")
    names = summary["class_names"]
    lines = [f"# Cross-validation: {header['features']}", "",
             f"Folds {', '.join(map(str, summary['folds']))}; each trains on the fold's train part (model selection"
             f" on a stratified {header['holdout']:.0%} held-out part of it) and tests on the fold's test part.",
             f"Heads: {header['heads']}; epochs {header['epochs']}; seed {header['seed']}; eval frames"
             f" {header['frames']}. WAR = accuracy, UAR = mean recall over classes; ± is the std over folds.", "",
             "| fold | train clips | held-out clips | test clips | WAR % | UAR % |", "|---|---|---|---|---|---|"]
    for r in results:
        lines.append(f"| {r['fold']} | {r['train_clips']} | {r['holdout_clips']} | {r['test_clips']} |"
                     f" {pct(r['war'])} | {pct(r['uar'])} |")
    lines.append(f"| **mean ± std** | | | {summary['test_clips']} | **{pm(*summary['war'])}** |"
                 f" **{pm(*summary['uar'])}** |")
    lines += ["", "**Recall per class (mean ± std over folds)**", "", "| class | recall % |", "|---|---|"]
    lines += [f"| {n} | {pm(*summary['recall'][n])} |" for n in names]
    lines += ["", "**Confusion matrix summed over folds** (rows = true class, columns = predicted)", "",
              "| true \\ pred | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    lines += [f"| {n} | " + " | ".join(str(v) for v in row) + " |" for n, row in zip(names, summary["confusion"])]
    return "\n".join(lines) + "\n"


def run_cv(features_path, out_dir, train_cfg: TrainConfig = TrainConfig(), heads_fields: Optional[dict] = None,
           eval_cfg: EvalConfig = EvalConfig(), folds: Optional[Sequence[int]] = None,
           progress: bool = True, test_split: Optional[str] = None) -> dict:
    """Run every fold of a features store (train part -> test part) and summarise; resumable.

    Arguments:
        features_path: a features store whose clips carry ``folds`` (DFEW, MAFW, CK+, fold lists).
        out_dir: the cross-validation folder: ``fold_K/heads`` (run), ``fold_K/eval`` (report),
            ``fold_K/fold_result.json``, and ``cv.csv``, ``cv.md``, ``confusion_sum.png``/``.csv``.
        train_cfg: TrainConfig of every fold (its ``fold`` is set per fold).
        heads_fields: HeadsConfig fields (in_dim and num_classes come from the store).
        eval_cfg: EvalConfig of the test parts.
        folds: the folds to run (None: every fold the store carries).
        test_split: a dataset without folds (FERV39k): one run, train_cfg.train_split -> this split, reported
            in the same files.
    Returns: {"results": [per fold], "summary": {...}, "markdown": str, paths}.

    >>> run_cv("runs/dfew/features.h5", "runs/dfew/cv")["summary"]["uar"]  # doctest: +SKIP
    (0.52, 0.013)
    """
    out_dir = check_writable(out_dir)  # a read-only --out is one line before any work
    with FeaturesStore(features_path, "r") as store:
        available = store_folds(store)
    if not available and not test_split:
        raise ConfigError(f"{features_path}: its clips carry no folds, so there is nothing to cross-validate;"
                          " for a train/test dataset (FERV39k) pass --test-split Test")
    missing = sorted(set(folds or ()) - set(available))
    if missing:
        raise ConfigError(f"{features_path}: fold(s) {missing} not in the store; its folds are {available}")
    folds = list(folds or available) or [None]
    Output(out_dir).prepare()
    heads_fields = dict(heads_fields or {})
    write_resolved_config(out_dir, "cv", [features_path], {
        "train_config": asdict(train_cfg), "heads_config": heads_fields, "folds": [k for k in folds if k is not None],
        "eval_frames": eval_cfg.frames, "test_split": test_split, "eval": asdict(eval_cfg)})
    results = [run_fold(features_path, out_dir, k, train_cfg, heads_fields, eval_cfg, test_split)
               for k in tqdm(folds, desc="cross-validation", unit="fold", disable=not progress)]
    summary = summarise_folds(results)
    write_cv_csv(out_dir / "cv.csv", results, summary)
    header = {"features": str(features_path), "holdout": train_cfg.holdout_fraction, "epochs": train_cfg.epochs,
              "seed": train_cfg.seed, "frames": "all" if eval_cfg.frames == 0 else eval_cfg.frames,
              "heads": ", ".join(f"{k}={v}" for k, v in heads_fields.items()) or "defaults (TP + SA, 2 heads, reg 1)"}
    markdown = cv_markdown(results, summary, header)
    (out_dir / "cv.md").write_text(markdown)
    confusion = np.asarray(summary["confusion"])
    write_confusion_csv(out_dir / "confusion_sum.csv", confusion, summary["class_names"])
    fig = plot_confusion(confusion, summary["class_names"], title=f"summed over {', '.join(map(str, summary['folds']))}")
    fig.savefig(out_dir / "confusion_sum.png", dpi=100, bbox_inches="tight")
    import matplotlib.pyplot as plt  # lazy: matplotlib is paid only when this runs
    plt.close(fig)
    return {"results": results, "summary": summary, "markdown": markdown, "cv_md": str(out_dir / "cv.md"),
            "cv_csv": str(out_dir / "cv.csv"), "confusion_png": str(out_dir / "confusion_sum.png")}


def run(cfg: CVConfig, inputs: Sequence[Path], out: Path, *, log=print, progress: bool = True) -> StageSummary:
    """Stage `cv`: per fold of the features store ``inputs[0]``, train heads on its train part and score its
    test part, into the folder ``out`` (fold_K/, cv.csv, cv.md, confusion_sum.png); finished folds are skipped."""
    cfg.validate()
    (features,) = inputs
    heads_fields = {k: v for k, v in asdict(cfg.heads_config).items() if k not in ("in_dim", "num_classes")}
    eval_cfg = EvalConfig(frames=cfg.eval_frames, device=cfg.train_config.device)
    result = run_cv(features, out, cfg.train_config, heads_fields, eval_cfg, cfg.folds or None,
                    progress=progress, test_split=cfg.test_split)
    lines = [result["markdown"], f"wrote {result['cv_csv']}, {result['cv_md']}, {result['confusion_png']}"]
    return StageSummary("cv", True, {"cv_csv": Path(result["cv_csv"]), "cv_md": Path(result["cv_md"])}, [],
                        lines, result=result)
