"""Reproduce the rows of the paper's Tables 1-2 over several seeds: the ``emo-train ablate`` stage.

Every (row, seed) is one ``train_heads`` run (model selection on a held-out part of Train) whose
selected checkpoint is then evaluated on the validation split. Runs that finished are reused, and
an interrupted run resumes, so rerunning the command completes a partial ablation.
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
from emotion_attention.pipeline.configs import ROWS, TABLE1, TABLE2, AblationConfig, EvalConfig, TrainConfig
from emotion_attention.pipeline.core.runtime import check_writable
from emotion_attention.pipeline.core.stage import Output, StageSummary, write_resolved_config
from emotion_attention.pipeline.data.folds import select_ids
from emotion_attention.pipeline.stages.evaluate import evaluate
from emotion_attention.pipeline.stages.heads import heads_config_for_store, train_heads


def run_row(features_path, out_dir: Path, key: str, seed: int, train_cfg: TrainConfig, split: str,
            fold: Optional[int] = None) -> dict:
    """Train (or resume, or reuse) one (row, seed[, fold]) and evaluate its selected checkpoint on the split,
    or on the fold's test part."""
    run_dir = out_dir / key / f"seed{seed}" / (f"fold{fold}" if fold is not None else "")
    report = run_dir / (f"eval_fold{fold}_test" if fold is not None else f"eval_{split.lower()}")
    if (report / "metrics.json").exists():
        metrics = json.loads((report / "metrics.json").read_text())
    else:
        cfg = replace(train_cfg, seed=seed, fold=fold)
        heads_cfg = heads_config_for_store(features_path, **ROWS[key].heads)
        result = train_heads(features_path, run_dir, cfg, heads_cfg, resume=(run_dir / "last.pt").exists())
        metrics = evaluate(features_path, result["checkpoint_best"], split, report,
                           EvalConfig(device=train_cfg.device), progress=False, fold=fold)
    return {"row": key, "seed": seed, "fold": "" if fold is None else fold, "accuracy": metrics["accuracy"],
            "uar": metrics["uar"], "num_clips": metrics["num_clips"], "report": str(report)}


def summarise_runs(runs: Sequence[dict]) -> dict:
    """row -> (acc mean, acc std, uar mean, uar std, n) in percent."""
    table = {}
    for key in dict.fromkeys(r["row"] for r in runs):
        acc = 100 * np.array([r["accuracy"] for r in runs if r["row"] == key])
        uar = 100 * np.array([r["uar"] for r in runs if r["row"] == key])
        table[key] = (acc.mean(), acc.std(), uar.mean(), uar.std(), len(acc))
    return table


def markdown_tables(summary: dict, split: str, folds: Sequence[int] = ()) -> str:
    """Tables 1 and 2 as Markdown, ours (mean ± std over seeds, and folds) beside the paper's accuracy."""
    fmt = (lambda m, s: f"{m:.1f} ± {s:.1f}")
    where = (f"over seeds x folds {', '.join(map(str, folds))} (each fold's test part)" if folds
             else f"over seeds, on split {split!r}")
    lines = [f"Ours: mean ± std {where} of the selected checkpoint. "
             "Paper: AFEW validation accuracy (Aminbeidokhti et al. 2019).", "",
             "**Table 1: spatial attention**", "",
             "| Model | # Att. | Reg. | ACC % (ours) | UAR % (ours) | seeds | ACC % (paper) |",
             "|---|---|---|---|---|---|---|"]
    for key in TABLE1:
        if key in summary:
            row, (am, asd, um, usd, n) = ROWS[key], summary[key]
            lines.append(f"| {row.model} | {row.attention} | {row.reg} | {fmt(am, asd)} | {fmt(um, usd)} | {n}"
                         f" | {row.paper_acc:.1f} |")
    lines += ["", "**Table 2: temporal pooling**", "",
              "| Model | ACC % (ours) | UAR % (ours) | seeds | ACC % (paper) |", "|---|---|---|---|---|"]
    for key, name in TABLE2:
        if key in summary:
            row, (am, asd, um, usd, n) = ROWS[key], summary[key]
            lines.append(f"| {name or row.model} | {fmt(am, asd)} | {fmt(um, usd)} | {n} | {row.paper_acc:.1f} |")
    return "\n".join(lines) + "\n"


def ablate(features_path, out_dir, cfg: AblationConfig = AblationConfig(),
           train_cfg: TrainConfig = TrainConfig()) -> dict:
    """Run every (row, seed) of Tables 1-2 and write runs.csv and table.md.

    Arguments:
        features_path: features store with a train split and ``cfg.eval_split``.
        out_dir: ablation folder; one run folder per row and seed under it.
        cfg: AblationConfig (seeds, rows, eval split).
        train_cfg: TrainConfig of every run (its seed is replaced by seed, seed + 1, ...).
    Returns: {"runs": [...], "summary": {...}, "markdown": str, "table_md": path, "runs_csv": path}.

    >>> ablate("feats.h5", "runs/ablate", AblationConfig(seeds=3))["table_md"]  # doctest: +SKIP
    'runs/ablate/table.md'
    """
    out_dir = check_writable(out_dir)  # a read-only --out is one line before any work
    with FeaturesStore(features_path, "r") as store:
        for fold in cfg.folds:
            select_ids(store, fold=fold, part="test")  # a fold the store lacks is refused here, before any run
        if not cfg.folds and not store.complete_ids(cfg.eval_split):
            raise ConfigError(f"{features_path}: no clip in split {cfg.eval_split!r} to evaluate the rows on")
    Output(out_dir).prepare()
    write_resolved_config(out_dir, "ablate", [features_path], asdict(replace(cfg, train_config=train_cfg)))
    jobs = [(key, seed, fold) for key in cfg.rows for seed in range(train_cfg.seed, train_cfg.seed + cfg.seeds)
            for fold in (cfg.folds or (None,))]
    runs = [run_row(features_path, out_dir, key, seed, train_cfg, cfg.eval_split, fold)
            for key, seed, fold in tqdm(jobs, desc="ablation", unit="run")]
    with open(out_dir / "runs.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(runs[0]))
        writer.writeheader()
        writer.writerows(runs)
    summary = summarise_runs(runs)
    markdown = markdown_tables(summary, cfg.eval_split, cfg.folds)
    (out_dir / "table.md").write_text(markdown)
    return {"runs": runs, "summary": summary, "markdown": markdown,
            "table_md": str(out_dir / "table.md"), "runs_csv": str(out_dir / "runs.csv")}



def run(cfg: AblationConfig, inputs: Sequence[Path], out: Path, *, log=print, progress: bool = True
        ) -> StageSummary:
    """Stage `ablate`: the rows of Tables 1-2 over ``cfg.seeds`` seeds (and ``cfg.folds``) on the features
    store ``inputs[0]``, into the folder ``out`` (one run folder per row and seed, runs.csv, table.md)."""
    cfg.validate()
    (features,) = inputs
    result = ablate(features, out, cfg, cfg.train_config)
    lines = [result["markdown"], f"table: {result['table_md']}; every run: {result['runs_csv']}"]
    return StageSummary("ablate", True, {"table": Path(result["table_md"]), "runs": Path(result["runs_csv"])}, [],
                        lines, result=result)
