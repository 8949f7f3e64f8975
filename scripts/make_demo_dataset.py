"""Build the small demo dataset, in the generic ``<split>/<label>/<clip>`` layout, from real sample videos.

Usage: python scripts/make_demo_dataset.py --samples data/samples --out data/demo

Each source video is cut into segments of ``--seconds`` (written with the ``mp4v`` codec, which this
OpenCV build can encode); every third segment goes to ``Val``, the rest to ``Train``. Labels are what
the videos show: the crying woman is ``Sad``; the talking heads are ``Neutral``. ``face_noface.mov``
(the face leaves the frame) is kept whole in ``Train/Neutral`` so the demo shows frames with no face.
This is a smoke-test dataset: a few minutes of video, two classes, one or two people per class.
"""
import argparse
from pathlib import Path

import cv2

SOURCES = {  # file -> label
    "WolfgangLanger_Pexels.mp4": "Sad",
    "carphone_pristine.mp4": "Neutral",
    "single_face.mp4": "Neutral",
}
WHOLE = {"face_noface.mov": ("Train", "Neutral")}


def write_segment(frames, fps, path: Path) -> None:
    h, w = frames[0].shape[:2]
    tmp = path.with_name(path.stem + ".part.mp4")
    writer = cv2.VideoWriter(str(tmp), cv2.VideoWriter_fourcc(*"mp4v"), fps, (w, h))
    if not writer.isOpened():
        raise SystemExit(f"cannot open a video writer for {tmp} (mp4v); check the OpenCV build")
    for frame in frames:
        writer.write(frame)
    writer.release()
    tmp.replace(path)


def cut_video(src: Path, label: str, out: Path, seconds: float) -> int:
    cap = cv2.VideoCapture(str(src))
    if not cap.isOpened():
        raise SystemExit(f"{src}: cannot be opened; run `make sample-data` first")
    fps = cap.get(cv2.CAP_PROP_FPS) or 25.0
    seg_len, seg, frames = max(1, round(seconds * fps)), 0, []
    while True:
        ok, frame = cap.read()
        if ok:
            frames.append(frame)
        if frames and (len(frames) == seg_len or not ok):
            split = "Val" if seg % 3 == 2 else "Train"
            target = out / split / label / f"{src.stem}_{seg:02d}.mp4"
            target.parent.mkdir(parents=True, exist_ok=True)
            if not target.exists():
                write_segment(frames, fps, target)
            seg, frames = seg + 1, []
        if not ok:
            break
    cap.release()
    return seg


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=Path, default=Path("data/samples"))
    parser.add_argument("--out", type=Path, default=Path("data/demo"))
    parser.add_argument("--seconds", type=float, default=1.0)
    args = parser.parse_args()
    for name, label in SOURCES.items():
        n = cut_video(args.samples / name, label, args.out, args.seconds)
        print(f"{name}: {n} clips of {args.seconds:g} s -> {args.out}/{{Train,Val}}/{label}/")
    for name, (split, label) in WHOLE.items():
        target = args.out / split / label / name
        target.parent.mkdir(parents=True, exist_ok=True)
        if not target.exists():
            target.write_bytes((args.samples / name).read_bytes())
        print(f"{name}: whole -> {target}")


if __name__ == "__main__":
    main()
