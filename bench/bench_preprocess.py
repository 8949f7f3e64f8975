"""Benchmark the faces stage on the real sample videos: naive vs default path, and 1 vs 2 workers.

In one run:
  1. decode only (the floor every path pays);
  2. naive: full-resolution HOG on every frame, no tracking, 1 worker;
  3. default (fast): downscaled detection, full-resolution landmarks, tracking, 1 worker;
  4. the default stage end to end (store writes included) with 1 and with 2 loky workers.
Prints frames/s, the fast/naive ratio (end to end, and for the face work alone once decode time is
subtracted), and agreement with naive: share of frames where both agree on presence and, when both
found a face, box IoU >= 0.5; mean landmark distance (px) in the aligned 256 px chip.

Usage: .venv/bin/python bench/bench_preprocess.py [--samples data/samples] [--copies 2]
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np

from cache import FacesStore

from pipeline.dataset import AFEW_CLASSES
from pipeline.decode import iter_frames
from pipeline.faces import FaceConfig, align_clip_frames, alignment_matrix, box_iou, load_aligner, transform_points
from pipeline.preprocess import PreprocessConfig, preprocess_dataset

VIDEOS = ("single_face.mp4", "WolfgangLanger_Pexels.mp4", "face_noface.mov", "noface_face.mov", "no_face.mp4",
          "carphone_pristine.mp4")


def time_decode(paths: list[Path]) -> tuple[int, float, float]:
    """(frames, wall s, cpu s) to decode every sample once."""
    start, cpu, frames = time.perf_counter(), time.process_time(), 0
    for path in paths:
        frames += sum(1 for _ in iter_frames(path))
    return frames, time.perf_counter() - start, time.process_time() - cpu


def time_align(paths: list[Path], cfg: FaceConfig) -> tuple[dict, float, float]:
    """(arrays per video, wall s, cpu s) to decode and align every sample in this process."""
    aligner = load_aligner(cfg.predictor_path)
    start, cpu, results = time.perf_counter(), time.process_time(), {}
    for path in paths:
        results[path.name] = align_clip_frames(iter_frames(path), aligner, cfg)
    return results, time.perf_counter() - start, time.process_time() - cpu


def agreement(naive: dict, fast: dict) -> tuple[np.ndarray, np.ndarray]:
    """Per frame: does fast agree with naive (presence, and IoU >= 0.5 when both found a face); and,
    for frames where both found one, the mean landmark distance in naive's aligned chip (px)."""
    agree, dists = [], []
    for i, (pa, pb) in enumerate(zip(naive["present"], fast["present"])):
        if pa != pb or not pa:
            agree.append(pa == pb)
            continue
        agree.append(box_iou(naive["box"][i], fast["box"][i]) >= 0.5)
        matrix = alignment_matrix(naive["landmarks"][i])  # both sets in the naive chip's pixels
        la = transform_points(matrix, naive["landmarks"][i])
        lb = transform_points(matrix, fast["landmarks"][i])
        dists.append(np.linalg.norm(la - lb, axis=1).mean())
    return np.array(agree, bool), np.array(dists, float)


def stage_seconds(data: Path, out: Path, workers: int) -> float:
    start = time.perf_counter()
    summary = preprocess_dataset(data, out, PreprocessConfig(), workers=workers, progress=False)
    assert not summary.failures, summary.failures
    return time.perf_counter() - start


def build_dataset(root: Path, paths: list[Path], copies: int) -> None:
    """copies x the samples as a <split>/<label>/<clip> tree (symlinks), so 2 workers get balanced work."""
    for c in range(copies):
        for i, path in enumerate(paths):
            dest = root / f"Split{c}" / AFEW_CLASSES[i % len(AFEW_CLASSES)] / path.name
            dest.parent.mkdir(parents=True, exist_ok=True)
            dest.symlink_to(path.resolve())


def bench_workers(paths: list[Path], copies: int) -> None:
    """The default stage end to end, store writes included: 1 worker vs 2 loky workers."""
    with tempfile.TemporaryDirectory(prefix="bench_preprocess_") as tmp:
        tmp = Path(tmp)
        build_dataset(tmp / "data", paths, copies)
        build_dataset(tmp / "warm", paths[:1] * 4, 1)
        preprocess_dataset(tmp / "warm", tmp / "warm.h5", PreprocessConfig(), workers=2, progress=False)  # start loky
        t1 = stage_seconds(tmp / "data", tmp / "w1.h5", 1)
        t2 = stage_seconds(tmp / "data", tmp / "w2.h5", 2)
        total = sum(1 for p in (tmp / "data").rglob("*") if p.is_symlink())
        with FacesStore(tmp / "w2.h5", "r") as store:
            frames = sum(store.num_frames(cid) for cid in store.complete_ids())
        print(f"stage end to end ({total} clips, {frames} frames, store writes included): 1 worker"
              f" {frames / t1:.1f} frames/s, 2 workers {frames / t2:.1f} frames/s, speed-up {t1 / t2:.2f}x"
              " (linear: 2.00x)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=Path, default=Path("data/samples"))
    parser.add_argument("--copies", type=int, default=2, help="copies of the samples for the worker run")
    args = parser.parse_args()
    paths = [args.samples / name for name in VIDEOS]
    missing = [p for p in paths if not p.exists()]
    if missing:
        raise SystemExit(f"missing sample videos {missing}: run `make sample-data`")

    frames, t_decode, c_decode = time_decode(paths)
    naive, t_naive, c_naive = time_align(paths, FaceConfig(mode="naive"))
    fast, t_fast, c_fast = time_align(paths, FaceConfig())
    print(f"{frames} frames from {len(paths)} sample videos; decode alone {frames / t_decode:.0f} frames/s")
    print("(cpu: this process's CPU seconds, steadier than wall time on a shared machine)")
    for name, t_all, c_all in (("naive   (full-res HOG every frame, 1 worker)", t_naive, c_naive),
                               ("default (downscaled HOG + tracking, 1 worker)", t_fast, c_fast)):
        print(f"{name}: {frames / t_all:6.1f} frames/s wall, {frames / c_all:6.1f} frames/s cpu;"
              f" face work {1000 * (c_all - c_decode) / frames:.1f} cpu ms/frame")
    print(f"speed-up default/naive: {t_naive / t_fast:.2f}x wall end to end, {c_naive / c_fast:.2f}x cpu end to"
          f" end, {(c_naive - c_decode) / max(c_fast - c_decode, 1e-9):.2f}x cpu for the face work (decode excluded)")
    agree_all, dist_all = [], []
    for name in VIDEOS:
        agree, dists = agreement(naive[name], fast[name])
        agree_all.append(agree)
        dist_all.append(dists)
        dist = f"{dists.mean():5.2f} px" if len(dists) else "   -    "
        print(f"  {name:<28} {len(agree):4d} frames  agreement {agree.mean():7.2%}  landmark distance in chip"
              f" {dist}  faces naive {naive[name]['present'].mean():6.1%} default {fast[name]['present'].mean():6.1%}")
    print(f"agreement with naive (presence and IoU >= 0.5): {np.concatenate(agree_all).mean():.2%} of frames;"
          f" mean landmark distance in the 256 px chip: {np.concatenate(dist_all).mean():.2f} px")

    bench_workers(paths, args.copies)


if __name__ == "__main__":
    main()
