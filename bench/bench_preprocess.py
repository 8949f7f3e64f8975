"""Benchmark the faces stage on the real sample videos: naive vs default path, and 1 vs 2 workers.

In one run:
  1. decode only (the floor every path pays);
  2. naive: full-resolution HOG on every frame, no tracking, 1 worker;
  3. default (fast): downscaled detection, full-resolution landmarks, tracking, 1 worker;
  4. the default stage end to end (store writes included) with 1 and with 2 loky workers.
Prints frames/s, the fast/naive ratio (end to end, and for the face work alone once decode time is
subtracted), and agreement with naive: share of frames where both agree on presence and, when both
found a face, box IoU >= 0.5; mean landmark distance (px) in the aligned 256 px chip.

Whole-process mode (``--whole``), start-up included, each run a subprocess on the same >= 2,000 frames
(four copies each of WolfgangLanger_Pexels.mp4 and single_face.mp4: 2,176 frames):
  * a naive script: full-resolution HOG, 68 landmarks and dlib.get_face_chip on every frame, 1 process;
  * ``emo-cache faces --mode naive --workers 1``, ``emo-cache faces --workers 1`` and ``--workers 2``;
  * with ``--dask``, ``emo-cache faces --backend dask`` on a LocalCluster of 2 single-thread workers;
and the limit each frame cannot beat here: decode + 68 landmarks + warp + JPEG encode of the chip (issue 17's
floor), timed alone in this run. Wall
seconds and CPU seconds (user + sys of the process and its workers) are both printed: on a machine shared
with other work the CPU figures are the steadier ones.

Memory mode (``--memory``): peak RSS (``/usr/bin/time -v``) of ``emo-cache faces`` on one 500-frame and one
3,000-frame MJPG clip looped from the samples.

With no mode flag (``make bench``) both the whole-process and the memory modes run; ``--in-process`` runs
the per-video comparison above.

Usage: .venv/bin/python bench/bench_preprocess.py [--samples data/samples] [--copies N] [--whole [--dask]]
       [--memory] [--in-process]
"""
from __future__ import annotations

import argparse
import os
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from emotion_attention.cache import FacesStore

from emotion_attention.pipeline.configs import AFEW_CLASSES
from emotion_attention.pipeline.data.decode import iter_frames
from emotion_attention.pipeline.configs import FaceConfig
from emotion_attention.pipeline.faces.align import (align_clip_frames, alignment_matrix, box_iou, load_aligner, transform_points)
from emotion_attention.pipeline.configs import PreprocessConfig
from emotion_attention.pipeline.stages.faces import preprocess_dataset
from emotion_attention.pipeline.core.runtime import concurrent_speedup, cpu_flags

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
    """copies x the samples as a <split>/<label>/<clip> tree, so 2 workers get balanced work. Real copies: links
    to one file from several splits are refused as one clip listed twice (`emo-cache check`, issue 19)."""
    for c in range(copies):
        for i, path in enumerate(paths):
            dest = root / f"Split{c}" / AFEW_CLASSES[i % len(AFEW_CLASSES)] / path.name
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(path, dest)


def bench_workers(paths: list[Path], copies: int) -> None:
    """The default stage end to end, store writes included: 1 worker vs 2 loky workers."""
    with tempfile.TemporaryDirectory(prefix="bench_preprocess_") as tmp:
        tmp = Path(tmp)
        build_dataset(tmp / "data", paths, copies)
        build_dataset(tmp / "warm", paths[:1] * 4, 1)
        preprocess_dataset(tmp / "warm", tmp / "warm.h5", PreprocessConfig(), workers=2, progress=False)  # start loky
        t1 = stage_seconds(tmp / "data", tmp / "w1.h5", 1)
        t2 = stage_seconds(tmp / "data", tmp / "w2.h5", 2)
        total = sum(1 for p in (tmp / "data").rglob("*") if p.is_file())
        with FacesStore(tmp / "w2.h5", "r") as store:
            frames = sum(store.num_frames(cid) for cid in store.complete_ids())
        print(f"stage end to end ({total} clips, {frames} frames, store writes included): 1 worker"
              f" {frames / t1:.1f} frames/s, 2 workers {frames / t2:.1f} frames/s, speed-up {t1 / t2:.2f}x"
              " (linear: 2.00x)")


# -- whole process --------------------------------------------------------------------------------
REPO = Path(__file__).resolve().parents[1]
WHOLE_VIDEOS = ("WolfgangLanger_Pexels.mp4", "single_face.mp4")
NAIVE_SCRIPT = """
import sys, cv2, dlib, numpy as np
from pathlib import Path
from emotion_attention.pipeline.faces.align import default_predictor_path
detector, predictor = dlib.get_frontal_face_detector(), dlib.shape_predictor(str(default_predictor_path()))
rows = []
for path in sorted(Path(sys.argv[1]).rglob("*.mp4")):
    cap = cv2.VideoCapture(str(path))
    while True:
        ok, bgr = cap.read()
        if not ok:
            break
        rgb = cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
        rects = detector(rgb, 0)
        if len(rects):
            r = max(rects, key=lambda r: r.area())
            chip = dlib.get_face_chip(rgb, predictor(rgb, r), size=256, padding=0.25)
            rows.append([1, r.left(), r.top(), r.right() + 1, r.bottom() + 1])
        else:
            rows.append([0, 0, 0, 0, 0])
np.save(sys.argv[2], np.array(rows, np.float32))
"""


def timed(cmd: list[str]) -> tuple[float, float]:
    """(wall s, cpu s of the process and everything it waited for) of one subprocess."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode not in (0,):
        raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-2000:]}{proc.stderr[-2000:]}")
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def store_rows(path: Path) -> dict:
    """{clip file name: (present (F,), box (F, 4))} of a faces store."""
    with FacesStore(path, "r") as store:
        return {cid: (m["present"], m["box"]) for cid in store.complete_ids() for m in [store.read_meta(cid)]}


def frame_agreement(a: dict, b: dict) -> float:
    """Share of frames where two stores agree on presence and, when both found a face, IoU >= 0.5."""
    agree = []
    for cid, (pa, ba) in a.items():
        pb, bb = b[cid]
        for i in range(len(pa)):
            agree.append(pa[i] == pb[i] if not (pa[i] and pb[i]) else box_iou(ba[i], bb[i]) >= 0.5)
    return float(np.mean(agree))


def physical_limit(samples: Path) -> tuple[float, float, float, float]:
    """CPU ms per frame of decode alone, of 68 landmarks alone (on known boxes), of the 256 px warp alone and of
    encoding that chip in the store's default codec alone (JPEG): issue 17's per-frame floor."""
    import cv2

    from emotion_attention.pipeline.configs import PreprocessConfig

    frames = [f.rgb for f in iter_frames(samples / "WolfgangLanger_Pexels.mp4", max_frames=200)]
    t0 = time.process_time()
    n = sum(1 for _ in iter_frames(samples / "WolfgangLanger_Pexels.mp4", max_frames=200))
    decode = (time.process_time() - t0) / n
    aligner = load_aligner()
    boxes = [aligner.detect(f, 0.5)[0] for f in frames[:: 20]]
    box = next(b[0] for b in boxes if len(b))
    t0 = time.process_time()
    marks = [aligner.landmarks(f, box) for f in frames]
    landmarks = (time.process_time() - t0) / len(frames)
    t0 = time.process_time()
    chips = [cv2.warpAffine(f, alignment_matrix(m), (256, 256), flags=cv2.INTER_LINEAR) for f, m in zip(frames, marks)]
    warp = (time.process_time() - t0) / len(frames)
    codec = PreprocessConfig().store_codec
    t0 = time.process_time()
    for chip in chips:
        codec.encode(chip)
    encode = (time.process_time() - t0) / len(chips)
    return 1000 * decode, 1000 * landmarks, 1000 * warp, 1000 * encode


def bench_whole(samples: Path, copies: int, dask: bool, naive: bool = True) -> None:
    """Whole processes, start-up included, on copies x (WolfgangLanger + single_face) = 2,176 frames at 4.

    The one-worker runs and the naive script are pinned to one core (taskset), the two-worker run to two:
    OpenCV's decoder would otherwise borrow a second core and flatter the one-worker figures.
    """
    paths = [samples / name for name in WHOLE_VIDEOS]
    cores = sorted(os.sched_getaffinity(0))
    one, two = ["taskset", "-c", str(cores[0])], ["taskset", "-c", ",".join(map(str, cores[:2]))]
    cli = [sys.executable, "-c", "from emotion_attention.cli.emo_cache import main; main()", "faces"]
    with tempfile.TemporaryDirectory(prefix="bench_whole_") as tmp:
        tmp = Path(tmp)
        build_dataset(tmp / "data", paths, copies)
        runs = {}
        if naive:
            runs["naive script"] = timed(one + [sys.executable, "-c", NAIVE_SCRIPT, str(tmp / "data"),
                                                str(tmp / "naive.npy")])
        for i, (name, pin, extra) in enumerate((
                ("faces --mode naive, 1 worker", one, ["--mode", "naive", "--workers", "1"]),
                ("faces (fast), 1 worker", one, ["--workers", "1"]),
                ("faces (fast), 2 workers", two, ["--workers", "2"])), start=1):
            if naive or i > 1:
                runs[name] = timed(pin + cli + [str(tmp / "data"), "--out", str(tmp / f"{i}.h5"), "--quiet"] + extra)
        if dask:
            from dask.distributed import LocalCluster

            with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cluster:
                runs["faces (fast), dask 2 workers*"] = timed(
                    cli + [str(tmp / "data"), "--out", str(tmp / "dask.h5"), "--quiet", "--backend", "dask",
                           "--scheduler", cluster.scheduler_address, "--workers", "2"])
        with FacesStore(tmp / "2.h5", "r") as store:  # 1.h5 naive mode, 2.h5 fast 1 worker, 3.h5 2 workers
            frames = sum(store.num_frames(cid) for cid in store.complete_ids())
        fast_rows = store_rows(tmp / "2.h5")
        agree = frame_agreement(store_rows(tmp / "1.h5"), fast_rows) if naive else float("nan")
        same_workers = store_rows(tmp / "3.h5")
        same = all(np.array_equal(same_workers[c][0], fast_rows[c][0]) for c in fast_rows)
    decode, marks, warp, encode = physical_limit(samples)
    limit = decode + marks + warp + encode
    print(f"cpu flags: {cpu_flags()}; usable cores {len(os.sched_getaffinity(0))}")
    print(f"whole process, start-up included, {frames} frames ({copies} copies of {', '.join(WHOLE_VIDEOS)}):")
    base = "naive script" if naive else "faces (fast), 1 worker"
    base_wall, base_cpu = runs[base]
    one_wall = runs["faces (fast), 1 worker"][0]
    for name, (wall, cpu) in runs.items():
        print(f"  {name:<32} {wall:7.1f} s wall {1000 * wall / frames:6.2f} ms/frame | {cpu:7.1f} s cpu"
              f" {1000 * cpu / frames:6.2f} ms/frame | vs {base} {base_wall / wall:5.2f}x wall,"
              f" {base_cpu / cpu:5.2f}x cpu")
    if naive:
        print(f"per core (cpu ms/frame, whole process): fast {1000 * runs['faces (fast), 1 worker'][1] / frames:.2f}"
              f" vs naive script {1000 * base_cpu / frames:.2f}: {base_cpu / runs['faces (fast), 1 worker'][1]:.2f}x"
              " (target >= 5x)")
    speed = one_wall / runs['faces (fast), 2 workers'][0]
    print(f"2 workers vs 1: {speed:.2f}x wall (target >= 1.8x on 2 idle cores); stores of 1 and 2 workers identical"
          f" presence: {same}")
    alone, together, ceiling = concurrent_speedup([sys.executable, __file__, "--ceiling-kernel", str(samples)])
    print(f"this machine's ceiling, measured now: two processes of the per-frame floor's work (whole processes) finish"
          f" twice the work {ceiling:.2f}x as fast as one ({alone:.1f} s alone, {together:.1f} s together);"
          f" 2 workers reach {speed / ceiling:.0%} of it")
    print(f"agreement fast vs naive (presence, IoU >= 0.5): {agree:.2%} of frames (target >= 99%)")
    if dask:
        print("* dask: the cpu column counts the client process only; the cluster's workers run outside it")
    print(f"load average during the run: {os.getloadavg()[0]:.1f} (wall figures mean little when it exceeds"
          f" the {len(cores)} usable cores)")
    print(f"limit here: decode {decode:.2f} + 68 landmarks {marks:.2f} + warp {warp:.2f} + JPEG encode {encode:.2f}"
          f" = {limit:.2f} cpu ms/frame; fast 1 worker runs at"
          f" {runs['faces (fast), 1 worker'][1] * 1000 / frames / limit:.2f}x that limit (target <= 1.3x)")


def bench_memory(samples: Path) -> None:
    """Peak RSS of emo-cache faces (1 worker) on a 500- and a 3,000-frame clip looped from the samples."""
    import cv2

    frames = [cv2.cvtColor(f.rgb, cv2.COLOR_RGB2BGR) for f in iter_frames(samples / "WolfgangLanger_Pexels.mp4")]
    cli = [sys.executable, "-c", "from emotion_attention.cli.emo_cache import main; main()", "faces"]
    peaks = {}
    with tempfile.TemporaryDirectory(prefix="bench_memory_") as tmp:
        tmp = Path(tmp)
        for n in (500, 3000):
            video = tmp / f"d{n}" / "Train" / "Happy" / f"long{n}.avi"
            video.parent.mkdir(parents=True)
            writer = cv2.VideoWriter(str(video), cv2.VideoWriter_fourcc(*"MJPG"), 25, frames[0].shape[1::-1])
            for i in range(n):
                writer.write(frames[i % len(frames)])
            writer.release()
            for workers in (1, 2):
                proc = subprocess.run(["/usr/bin/time", "-v"] + cli + [str(tmp / f"d{n}"), "--out",
                                      str(tmp / f"{n}-{workers}.h5"), "--quiet", "--workers", str(workers)],
                                      cwd=REPO, capture_output=True, text=True)
                peak = re.search(r"Maximum resident set size \(kbytes\): (\d+)", proc.stderr)
                if proc.returncode != 0 or peak is None:
                    raise SystemExit(f"faces on {video} failed:\n{proc.stderr[-2000:]}")
                peaks[n, workers] = int(peak.group(1)) / 1024
    for workers in (1, 2):
        print(f"peak RSS, {workers} worker(s): 500 frames {peaks[500, workers]:.0f} MiB, 3000 frames"
              f" {peaks[3000, workers]:.0f} MiB: {peaks[3000, workers] / peaks[500, workers]:.2f}x (target <= 1.3x)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=Path, default=Path("data/samples"))
    parser.add_argument("--copies", type=int, default=None,
                        help="copies of the samples (default 2; 4 with --whole: 2,176 frames)")
    parser.add_argument("--whole", action="store_true", help="whole-process mode (subprocesses, start-up included)")
    parser.add_argument("--dask", action="store_true", help="with --whole: also a dask LocalCluster of 2 workers")
    parser.add_argument("--memory", action="store_true", help="peak RSS of a 500- vs a 3,000-frame clip")
    parser.add_argument("--in-process", action="store_true", help="per-video naive vs fast, in this process")
    parser.add_argument("--no-naive", action="store_true", help="with --whole: only the fast runs (1 vs 2 workers)")
    parser.add_argument("--ceiling-kernel", type=Path, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.ceiling_kernel is not None:  # one process of the floor's work, for concurrent_speedup
        for _ in range(3):
            physical_limit(args.ceiling_kernel)
        return
    if not args.in_process:
        if args.whole or not args.memory:
            bench_whole(args.samples, args.copies or 4, args.dask, naive=not args.no_naive)
        if args.memory or not args.whole:
            bench_memory(args.samples)
        return
    args.copies = args.copies or 2
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
