"""A DFEW-layout demo dataset with 5 folds, cut from the sample videos (a smoke test of the fold protocol).

Writes ``OUT/data_affine/single_label/data/<id>/<id>_<nnnnn>.jpg`` (1 s of frames per clip, full frames: the
faces stage detects and aligns them) and ``OUT/label/single_{train,test}set_{1..5}.csv`` (``video_name,label``
with DFEW's codes: 1 Happy, 2 Sad, 3 Neutral). The crying first half of WolfgangLanger_Pexels.mp4 is Sad, its
smiling second half Happy; the talking heads of single_face.mp4 and carphone_pristine.mp4 are Neutral. Clips
are dealt to the folds round-robin within each class, so every fold tests every class.

It is a smoke run, not a benchmark: clips cut from one video land in train and test parts alike.

    .venv/bin/python scripts/make_fold_demo.py --out data/fold_demo
"""
from __future__ import annotations

import argparse
from pathlib import Path

import cv2

SAMPLES = Path(__file__).resolve().parents[1] / "data" / "samples"
CODES = {"Happy": 1, "Sad": 2, "Neutral": 3}


def segments(name: str, seconds: float = 1.0):
    """(start frame, frames) of consecutive 1 s segments of a sample video, and the video's frame count."""
    cap = cv2.VideoCapture(str(SAMPLES / name))
    fps, total = cap.get(cv2.CAP_PROP_FPS), int(cap.get(cv2.CAP_PROP_FRAME_COUNT))
    step = int(round(fps * seconds))
    frames = []
    while (got := cap.read())[0]:
        frames.append(got[1])
    cap.release()
    return [(s, frames[s:s + step]) for s in range(0, len(frames) - step + 1, step)], len(frames)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="data/fold_demo", type=Path)
    parser.add_argument("--folds", type=int, default=5)
    args = parser.parse_args()
    clips = []  # (label, frames)
    crying, total = segments("WolfgangLanger_Pexels.mp4")
    for start, frames in crying:  # the change from crying to smiling (45-55 % of the video) is left out
        if start + len(frames) <= 0.45 * total:
            clips.append(("Sad", frames))
        elif start >= 0.55 * total:
            clips.append(("Happy", frames))
    for name in ("single_face.mp4", "carphone_pristine.mp4"):
        clips += [("Neutral", f) for _, f in segments(name)[0]]
    data = args.out / "data_affine" / "single_label" / "data"
    rows = {k: {"train": [], "test": []} for k in range(1, args.folds + 1)}
    seen = {label: 0 for label in CODES}
    for i, (label, frames) in enumerate(clips, start=1):
        cid = f"{i:05d}"
        (data / cid).mkdir(parents=True, exist_ok=True)
        for j, bgr in enumerate(frames, start=1):
            cv2.imwrite(str(data / cid / f"{cid}_{j:05d}.jpg"), bgr, [cv2.IMWRITE_JPEG_QUALITY, 92])
        test_fold = seen[label] % args.folds + 1
        seen[label] += 1
        for k in rows:
            rows[k]["test" if k == test_fold else "train"].append(f"{cid},{CODES[label]}")
    (args.out / "label").mkdir(parents=True, exist_ok=True)
    for k, parts in rows.items():
        for part, lines in parts.items():
            (args.out / "label" / f"single_{part}set_{k}.csv").write_text("video_name,label\n" + "\n".join(lines) + "\n")
    print(f"{args.out}: {len(clips)} clips ({', '.join(f'{n} {c}' for c, n in seen.items())}), {args.folds} folds")


if __name__ == "__main__":
    main()
