"""Benchmark: what `emo-cache check` pays to find damaged videos.

Two ways of checking the same clips, in one run, each as the whole `emo-cache check` process (start-up
included):
    quick   `emo-cache check --quick`: open each video and decode its first frame (the old check)
    full    `emo-cache check` (default): decode every frame (``grab``, no colour conversion) and compare the
            count with the container's
The dataset is the six sample videos plus three damaged copies: an MJPG AVI of 72 real frames cut to its first
third, the same AVI with random bytes over a sixth of its middle, and WolfgangLanger_Pexels.mp4 cut to a third.
Prints seconds per clip and per frame for each way, their ratio, and the fidelity: how many of the 3 damaged
clips each way reports (the limit: full must report all 3, with no false alarm on the 6 intact videos).

    .venv/bin/python bench/bench_check.py
"""
from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np

from emotion_attention.pipeline.core.runtime import cpu_flags

REPO = Path(__file__).resolve().parents[1]
SAMPLES = REPO / "data" / "samples"
VIDEOS = ["single_face.mp4", "WolfgangLanger_Pexels.mp4", "carphone_pristine.mp4", "face_noface.mov",
          "noface_face.mov", "no_face.mp4"]


def build(root: Path) -> tuple[list[Path], int]:
    """Train/Neutral/<6 intact videos> and Train/Sad/<3 damaged ones>; returns the damaged paths and all frames."""
    (root / "Train" / "Neutral").mkdir(parents=True)
    (root / "Train" / "Sad").mkdir(parents=True)
    frames = 0
    for name in VIDEOS:
        shutil.copyfile(SAMPLES / name, root / "Train" / "Neutral" / name)
        frames += int(cv2.VideoCapture(str(SAMPLES / name)).get(cv2.CAP_PROP_FRAME_COUNT))
    cap, rgb = cv2.VideoCapture(str(SAMPLES / "single_face.mp4")), []
    while (got := cap.read())[0]:
        rgb.append(got[1])
    avi = root / "full.avi"
    writer = cv2.VideoWriter(str(avi), cv2.VideoWriter_fourcc(*"MJPG"), 30, rgb[0].shape[1::-1])
    for bgr in rgb:
        writer.write(bgr)
    writer.release()
    data = avi.read_bytes()
    avi.unlink()
    sad = root / "Train" / "Sad"
    (sad / "cut_third.avi").write_bytes(data[: len(data) // 3])
    middle = bytearray(data)
    n = len(middle)
    middle[n // 3: n // 2] = np.random.default_rng(0).integers(0, 256, n // 2 - n // 3, dtype=np.uint8).tobytes()
    (sad / "corrupt_middle.avi").write_bytes(bytes(middle))
    mp4 = (SAMPLES / "WolfgangLanger_Pexels.mp4").read_bytes()
    (sad / "wolfgang_third.mp4").write_bytes(mp4[: len(mp4) // 3])
    return sorted(sad.iterdir()), frames + 3 * len(rgb)


def run_check(root: Path, quick: bool) -> tuple[float, str]:
    cmd = [str(REPO / ".venv" / "bin" / "emo-cache"), "check", str(root), "--workers", "1"] + (["--quick"] if quick else [])
    start = time.perf_counter()
    out = subprocess.run(cmd, capture_output=True, text=True)
    return time.perf_counter() - start, out.stdout


def main() -> None:
    print(f"CPU flags: {cpu_flags() or 'none of avx2/avx512/amx'}")
    with tempfile.TemporaryDirectory() as tmp:
        damaged, frames = build(Path(tmp))
        clips = len(VIDEOS) + len(damaged)
        results = {}
        for quick in (True, False, True, False):  # each twice, the better of the two (file cache warm)
            seconds, report = run_check(Path(tmp), quick)
            found = sum(str(p) in report for p in damaged)
            false = sum(f"Neutral/{name}" in report.split("problem(s)")[-1] for name in VIDEOS)
            key = "quick" if quick else "full"
            if key not in results or seconds < results[key][0]:
                results[key] = (seconds, found, false)
        for key, (seconds, found, false) in results.items():
            print(f"{key:>5}: {seconds:.2f} s for {clips} clips ({frames} frames), {1000 * seconds / clips:.0f} ms/clip,"
                  f" {1e3 * seconds / frames:.2f} ms/frame; damaged found {found}/3, false alarms {false}/6")
        ratio = results["full"][0] / results["quick"][0]
        print(f"full / quick wall time: {ratio:.2f}x (both include ~the same process start-up)")
        ok = results["full"][1] == 3 and results["full"][2] == 0
        print(f"limit: full finds all 3 damaged clips with no false alarm -> {'PASS' if ok else 'FAIL'}")
        sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
