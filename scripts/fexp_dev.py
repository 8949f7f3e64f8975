"""The whole chain on fexp-dev, the project's real development set: check, faces, extract, heads (several seeds),
eval; prints WAR, UAR and the confusion matrix (issue 15, item 5; docs/datasets.md#fexp-dev has the figures).

fexp-dev holds 4,716 real, labelled, noisy face photos (7 classes, very unbalanced; Train/Val split by identity;
read its README). Each photo is a one-frame clip. The photos are not aligned faces, though most are square, so
faces runs with ``--prealigned no`` (detection on every photo). The data path is an argument: the project never
reads ``../shared``; outputs go to ``--out``.

    flock /tmp/cpu.lock .venv/bin/python scripts/fexp_dev.py /work/shared/data/fexp-dev --out runs/fexp-dev

Stages (each the real command, printed as it runs; every one resumes, so a rerun skips what is done):
  1. ``emo-cache check DATA/faces.csv``
  2. ``emo-cache faces DATA/faces.csv --prealigned no`` -> OUT/faces.h5
  3. ``emo-cache extract --backbone fer-minixception --weights default --views 2`` -> OUT/features.h5
  4. per seed: ``emo-train heads --seed S`` (the defaults: SA + TP, 30 epochs, selection on a held-out tenth of
     Train) and ``emo-eval --split Val`` -> OUT/seed_S/
  5. the training-free reference: fer's own classifier on the same Val faces (no training, no seed).
WAR = accuracy over the Val photos in which a face was found; UAR = mean recall over the classes. The photos
without a face are not scored and are counted.
"""
from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def run(*args) -> float:
    """Run one command of the venv (printed first); returns its wall seconds; stops the script if it fails."""
    cmd = [str(BIN / str(args[0])), *(str(a) for a in args[1:])]
    print("$ " + " ".join(shlex.quote(c) for c in [str(args[0]), *cmd[1:]]), flush=True)
    start = time.perf_counter()
    done = subprocess.run(cmd, cwd=REPO)
    if done.returncode != 0:
        sys.exit(f"{args[0]} {args[1]} failed (exit {done.returncode}); see its output above")
    return time.perf_counter() - start


def training_free(faces: Path, classes: list[str]) -> dict:
    """fer's own 7-way classifier on the Val faces (FER2013 order mapped onto the store's classes)."""
    from emotion_attention.cache import FacesStore
    from emotion_attention.pipeline.models.fer import FER_CLASSES, fer_probabilities, load_fer_minixception

    model = load_fer_minixception()
    order = [FER_CLASSES.index(name.lower()) for name in classes]
    truth, pred, no_face = [], [], 0
    with FacesStore(faces, "r") as store:
        for cid in store.complete_ids():
            attrs = store.attrs(cid)
            if attrs["split"] != "Val":
                continue
            rows = np.flatnonzero(store.read_present(cid))
            if not len(rows):
                no_face += 1
                continue
            probs = fer_probabilities(model, store.read_faces(cid, rows))[:, order]   # (F, E) store order
            pred.append(int(np.log(np.clip(probs, 1e-12, 1)).mean(0).argmax()))
            truth.append(classes.index(attrs["label"]))
    return scores(np.array(truth), np.array(pred), len(classes)) | {"no_face": no_face}


def scores(truth: np.ndarray, pred: np.ndarray, n: int) -> dict:
    confusion = np.zeros((n, n), int)
    np.add.at(confusion, (truth, pred), 1)
    recalls = [confusion[c, c] / confusion[c].sum() for c in range(n) if confusion[c].sum()]
    return {"accuracy": float(np.trace(confusion) / confusion.sum()), "uar": float(np.mean(recalls)),
            "confusion": confusion.tolist(), "num_clips": int(confusion.sum())}


def print_confusion(confusion: list, classes: list[str], title: str) -> None:
    width = max(len(c) for c in classes) + 1
    print(f"\n{title} (rows: true class, columns: predicted)")
    print(" " * width + "".join(c[:7].rjust(8) for c in classes) + "  recall")
    for name, row in zip(classes, confusion):
        i = classes.index(name)
        recall = f"{row[i] / sum(row):.3f}" if sum(row) else "  n/a"
        print(name.ljust(width) + "".join(str(v).rjust(8) for v in row) + f"  {recall}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("data", type=Path, help="the fexp-dev folder (holding faces.csv and images/)")
    parser.add_argument("--out", type=Path, default=REPO / "runs" / "fexp-dev")
    parser.add_argument("--seeds", default="0,1,2", help="comma-separated training seeds")
    parser.add_argument("--workers", type=int, default=2, help="faces workers")
    parser.add_argument("--weights", default="default",
                        help="fer-minixception weights: 'default' (fer's emotion_model.hdf5) or a path")
    parser.add_argument("--epochs", type=int, default=30)
    args = parser.parse_args()
    table, out = args.data / "faces.csv", args.out
    if not table.is_file():
        sys.exit(f"{table}: not found; give the fexp-dev folder (it holds faces.csv and images/)")
    out.mkdir(parents=True, exist_ok=True)
    seconds = {"check": run("emo-cache", "check", table)}
    seconds["faces"] = run("emo-cache", "faces", table, "--out", out / "faces.h5", "--prealigned", "no",
                           "--workers", args.workers, "--quiet")
    seconds["extract"] = run("emo-cache", "extract", out / "faces.h5", "--out", out / "features.h5", "--backbone",
                             "fer-minixception", "--weights", args.weights, "--views", "2")
    runs = []
    for seed in (int(s) for s in args.seeds.split(",")):
        run_dir = out / f"seed_{seed}"
        start = time.perf_counter()
        if not (run_dir / "best.pt").exists():
            run("emo-train", "heads", out / "features.h5", "--out", run_dir, "--seed", seed, "--epochs", args.epochs)
        run("emo-eval", out / "features.h5", "--checkpoint", run_dir / "best.pt", "--split", "Val",
            "--out", run_dir / "eval_val")
        seconds[f"heads+eval seed {seed}"] = time.perf_counter() - start
        runs.append(json.loads((run_dir / "eval_val" / "metrics.json").read_text()) | {"seed": seed})
    classes = list(runs[0]["per_class_recall"])
    free = training_free(out / "faces.h5", classes)
    report(runs, free, classes, seconds, out)


def report(runs: list[dict], free: dict, classes: list[str], seconds: dict, out: Path) -> None:
    war, uar = np.array([r["accuracy"] for r in runs]), np.array([r["uar"] for r in runs])
    war_std, uar_std = (war.std(ddof=1), uar.std(ddof=1)) if len(runs) > 1 else (0.0, 0.0)
    print(f"\nfexp-dev Val: {runs[0]['num_clips']} photos scored (a face was found), {runs[0]['skipped']} skipped")
    for r in runs:
        print(f"  seed {r['seed']}: WAR {r['accuracy']:.4f}  UAR {r['uar']:.4f}")
    print(f"heads (SA + TP on fer-minixception maps), {len(runs)} seeds: WAR {war.mean():.4f} ± {war_std:.4f},"
          f" UAR {uar.mean():.4f} ± {uar_std:.4f} (mean ± sample std)")
    print(f"training-free reference (fer's own classifier, same faces): WAR {free['accuracy']:.4f},"
          f" UAR {free['uar']:.4f} on {free['num_clips']} photos")
    recalls = {c: [r["per_class_recall"][c] for r in runs if r["per_class_recall"][c] is not None] for c in classes}
    print("per-class recall of the heads, mean over seeds: "
          + ", ".join(f"{c} {np.mean(v):.3f}" for c, v in recalls.items() if v))
    print_confusion(np.sum([r["confusion"] for r in runs], axis=0).tolist(), classes,
                    f"heads, confusion summed over the {len(runs)} seeds")
    print_confusion(free["confusion"], classes, "training-free reference, confusion")
    print("\nwall seconds: " + ", ".join(f"{k} {v:.0f}" for k, v in seconds.items()))
    summary = {"seeds": [{k: r[k] for k in ("seed", "accuracy", "uar", "per_class_recall", "confusion", "num_clips",
                                             "skipped")} for r in runs],
               "war_mean": float(war.mean()), "war_std": float(war_std),
               "uar_mean": float(uar.mean()), "uar_std": float(uar_std),
               "training_free": free, "classes": classes, "wall_seconds": seconds}
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    print(f"summary: {out / 'summary.json'}")


if __name__ == "__main__":
    main()
