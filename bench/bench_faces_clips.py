"""Benchmark: what `emo-cache check` and `emo-cache faces` pay per clip, beyond the per-frame work, at the scale
of DFEW (16,372 clips) and FERV39k (38,935 clips), and on real photos.

Two loads, each a whole `emo-cache` process (start-up included), wall seconds and CPU seconds (user + sys of the
process and its workers) both printed:

``--tree``: a generated DFEW-like release of ``--clips`` (default 16,000) short clips
    (``Clip/jpg_256/<00001>/`` frame folders of ``--frames`` real, square face crops, so ``--prealigned auto``
    resizes them: the per-frame work is small and the per-clip machinery shows) and the 5 fold lists of
    EmoLabel_DataSplit. Measured: ``check --quick``, ``check``, ``faces --workers 1`` and ``--workers 2``; on a
    ``--subset`` of the clips, the pre-batching way (``--task-frames 1 --stream-frames 0``: one joblib task and one
    part file per clip, as before issue 15) against the new way, both with 2 workers, in the same run.
``--fexp PATH``: the real photos of fexp-dev (its faces.csv; each photo a one-frame clip, detection on every one,
    ``--prealigned no``): ``check --quick``, ``check``, ``faces`` with 1 and 2 workers, and old-vs-new with 2 workers
    on every ``--every``-th photo (a CSV written to the scratch folder, absolute paths).

The per-frame work (decode, detect + landmarks + warp or the prealigned resize, JPEG encode of the chip) is
timed alone in this process on a sample of the same frames: the limit a clip cannot beat here. The overhead per
clip is the slope of the CPU seconds between a small and a big load of the same kind (start-up cancels out),
less the per-frame work; the share of it spent writing into the faces store (cache/, owned by issue 17) is timed
alone too and printed beside it. Fidelity: the old-way and new-way stores hold the same clips with identical
chips and face records.

    flock /tmp/cpu.lock .venv/bin/python bench/bench_faces_clips.py --tree [--clips 16000] [--frames 3]
    flock /tmp/cpu.lock .venv/bin/python bench/bench_faces_clips.py --fexp /work/shared/data/fexp-dev [--every 4]
"""
from __future__ import annotations

import argparse
import csv
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import cv2
import numpy as np

from emotion_attention.pipeline.core.runtime import concurrent_speedup, cpu_flags

REPO = Path(__file__).resolve().parents[1]
SAMPLES = REPO / "data" / "samples"
BIN = Path(sys.executable).parent


def timed(args: list[str]) -> tuple[float, float, str]:
    """(wall s, CPU s of the process and everything it waited for, output) of one `emo-cache` subprocess."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    proc = subprocess.run([str(BIN / args[0]), *args[1:]], cwd=REPO, capture_output=True, text=True)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    if proc.returncode not in (0, 1):
        raise SystemExit(f"{' '.join(args)} failed ({proc.returncode}):\n{proc.stdout[-2000:]}{proc.stderr[-2000:]}")
    return wall, cpu, proc.stdout + proc.stderr


# -- the generated DFEW-like tree ---------------------------------------------------------------------------
def face_crops(n: int, side: int = 112) -> list[np.ndarray]:
    """n square BGR face crops from the real sample video (prealigned-looking faces)."""
    cap = cv2.VideoCapture(str(SAMPLES / "single_face.mp4"))
    crops = []
    while len(crops) < n:
        ok, bgr = cap.read()
        if not ok:
            cap.set(cv2.CAP_PROP_POS_FRAMES, 0)
            continue
        crops.append(cv2.resize(bgr[40:320, 180:460], (side, side), interpolation=cv2.INTER_AREA))
    cap.release()
    return crops


def build_tree(root: Path, clips: int, frames: int) -> Path:
    """Clip/jpg_256/<00001>/<nnnnn>.jpg + EmoLabel_DataSplit/{train,test}(single-labeled)/set_K.csv (kept
    between runs: the stamp file names its size)."""
    stamp = root / f".built-{clips}x{frames}"
    if stamp.exists():
        return root
    shutil.rmtree(root, ignore_errors=True)
    encoded = [cv2.imencode(".jpg", c)[1].tobytes() for c in face_crops(24)]
    for i in range(1, clips + 1):
        folder = root / "Clip" / "jpg_256" / f"{i:05d}"
        folder.mkdir(parents=True)
        for f in range(1, frames + 1):
            (folder / f"{f:05d}.jpg").write_bytes(encoded[(i + f) % len(encoded)])
    for k in range(1, 6):
        for part in ("train", "test"):
            rows = [i for i in range(1, clips + 1) if ((i - 1) % 5 + 1 == k) == (part == "test")]
            path = root / "EmoLabel_DataSplit" / f"{part}(single-labeled)" / f"set_{k}.csv"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text("video_name,label\n" + "".join(f"{i:05d},{(i - 1) % 7 + 1}\n" for i in rows))
    stamp.write_text("")
    return root


def per_frame_prealigned(paths: list[Path]) -> tuple[float, float]:
    """(wall s, CPU s) per frame of the work a prealigned frame needs: decode, resize to 256, JPEG encode."""
    from emotion_attention.pipeline.configs import PreprocessConfig
    from emotion_attention.pipeline.data.decode import read_image_rgb

    codec = PreprocessConfig().store_codec
    start, cpu = time.perf_counter(), time.process_time()
    for path in paths:
        chip = cv2.resize(read_image_rgb(path), (256, 256), interpolation=cv2.INTER_LINEAR)
        codec.encode_many(chip[None])
    return (time.perf_counter() - start) / len(paths), (time.process_time() - cpu) / len(paths)


def per_frame_detected(paths: list[Path]) -> tuple[float, float]:
    """(wall s, CPU s) per photo of the face work: decode, detect + landmarks + warp, JPEG encode."""
    from emotion_attention.pipeline.configs import FaceConfig, PreprocessConfig
    from emotion_attention.pipeline.data.decode import Frame, read_image_rgb
    from emotion_attention.pipeline.faces.align import align_clip_chunks, load_aligner

    cfg, codec, aligner = FaceConfig(), PreprocessConfig().store_codec, load_aligner()
    start, cpu = time.perf_counter(), time.process_time()
    for path in paths:
        for chunk in align_clip_chunks([Frame(0, 0.0, read_image_rgb(path))], aligner, cfg):
            codec.encode_many(chunk["faces"])
    return (time.perf_counter() - start) / len(paths), (time.process_time() - cpu) / len(paths)


def store_write_ms(source: Path, n: int, extra: dict) -> float:
    """ms per clip that writing finished clips into a faces store costs (cache/: begin, append, commit), as the
    stage's writer does it: the short clips of one task (up to ``task_frames`` frames) committed together."""
    import tempfile

    from emotion_attention.cache import FacesStore
    from emotion_attention.pipeline.configs import FaceConfig, PreprocessConfig
    from emotion_attention.pipeline.data.layouts import scan_dataset
    from emotion_attention.pipeline.stages.faces import encoded_clip

    cfg = PreprocessConfig(face=FaceConfig(**extra))
    scan = scan_dataset(source)
    done = [(c, *encoded_clip(c, cfg)) for c in scan.clips[:n]]
    with tempfile.TemporaryDirectory(dir=source.parent) as tmp:
        with FacesStore(Path(tmp) / "w.h5", "a", config=cfg.store_config(scan.class_names)) as store:
            tasks, task, frames = [], [], 0
            for clip, arrays, attrs in done:  # stages.faces.plan_tasks' rule for short clips
                task.append((clip.clip_id, arrays, attrs))
                frames += len(arrays["present"])
                if frames >= cfg.task_frames:
                    tasks.append(task)
                    task, frames = [], 0
            tasks += [task] if task else []
            start = time.perf_counter()
            for task in tasks:
                store.write_clips(task)
            return (time.perf_counter() - start) / len(done) * 1000


def same_stores(a: Path, b: Path) -> str:
    """Fidelity: the two stores hold the same clips with identical chips and face records."""
    from emotion_attention.cache import FacesStore

    with FacesStore(a) as sa, FacesStore(b) as sb:
        ids = sa.complete_ids()
        if ids != sb.complete_ids():
            return f"NO: {len(ids)} vs {len(sb.complete_ids())} clips"
        for cid in ids:
            ma, mb = sa.read_meta(cid), sb.read_meta(cid)
            if not all(np.array_equal(ma[k], mb[k], equal_nan=ma[k].dtype.kind == "f") for k in ma) or \
                    not np.array_equal(sa.read_faces(cid), sb.read_faces(cid)):
                return f"NO: clip {cid} differs"
    return f"yes ({len(ids)} clips identical: chips, boxes, landmarks, presence)"


def report(name: str, small: tuple, big: tuple, clips: tuple, frames_per_clip: float, frame_cpu: float,
           write_ms: float) -> float:
    """Print a run's figures; returns the CPU overhead per clip: the slope between two sizes of the same load
    (start-up cancels out) less the per-frame work, in ms."""
    (w1, c1, _), (w2, c2, _) = small, big
    n = clips[1] - clips[0]
    over = ((c2 - c1) / n - frames_per_clip * frame_cpu) * 1000
    print(f"  {name:<30} {clips[1]:>6} clips: wall {w2:7.1f} s, CPU {c2:7.1f} s; per clip beyond start-up: wall"
          f" {(w2 - w1) / n * 1000:6.2f} ms, CPU {(c2 - c1) / n * 1000:6.2f} ms, of which beyond the per-frame work"
          f" {over:6.2f} ms (store writes alone {write_ms:.2f}, the rest {over - write_ms:.2f})")
    return over


def run_faces(source: Path, out: Path, workers: int, *extra: str) -> tuple[float, float, str]:
    for path in out.parent.glob(out.name + "*"):
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    return timed(["emo-cache", "faces", str(source), "--out", str(out), "--workers", str(workers), "--quiet", *extra])


def scaling(sources: tuple, clips: tuple, frames_per_clip: float, frame_cpu: float, write: float, stem: Path,
            extra: tuple, kernel: list[str]) -> dict:
    """faces with 1 and 2 workers on the small and the big load; returns {workers: (small run, big run)}."""
    runs = {}
    for workers in (1, 2):
        runs[workers] = tuple(run_faces(src, stem.with_name(f"{stem.name}_{tag}_w{workers}.h5"), workers, *extra)
                              for src, tag in zip(sources, ("small", "big")))
        report(f"faces, {workers} worker(s)", *runs[workers], clips, frames_per_clip, frame_cpu, write)
    speed = runs[1][1][0] / runs[2][1][0]
    print(f"  2 workers / 1 worker on {clips[1]} clips: {speed:.2f}x wall (target >= 1.7x)")
    one, two, ceiling = concurrent_speedup([sys.executable, __file__, "--ceiling-kernel", *kernel])
    print(f"  this machine's ceiling, measured now: two processes of the per-frame work alone (whole processes) finish"
          f" twice the work {ceiling:.2f}x as fast as one ({one:.1f} s alone, {two:.1f} s together); 2 workers reach"
          f" {speed / ceiling:.0%} of it")
    return runs


def ceiling_kernel(kind: str, source: str, frames: int = 6000) -> None:
    """One process of the per-frame work alone, for concurrent_speedup: ``tree`` the frames of a generated tree,
    ``photos`` the photos of a CSV (path,label,split)."""
    if kind == "tree":
        per_frame_prealigned(sorted((Path(source) / "Clip" / "jpg_256").glob("*/*.jpg"))[:frames])
    else:
        per_frame_detected([Path(r["path"]) for r in csv.DictReader(open(source))][:frames // 10])


def compare_ways(source: Path, stem: Path, clips: int, new: tuple, extra: tuple) -> None:
    """Old way (a joblib task and a part file per clip, as before issue 15) against the new one (``new``: the
    same clips, same run), 2 workers."""
    old_out = stem.with_name(stem.name + "_old.h5")
    old = run_faces(source, old_out, 2, "--task-frames", "1", "--stream-frames", "0", *extra)
    print(f"  old way (--task-frames 1 --stream-frames 0) vs new, {clips} clips, 2 workers, whole process: old wall"
          f" {old[0]:.1f} s CPU {old[1]:.1f} s; new wall {new[0]:.1f} s CPU {new[1]:.1f} s; new is"
          f" {old[0] / new[0]:.2f}x faster (wall), {old[1] / new[1]:.2f}x less CPU")
    same = same_stores(old_out, stem.with_name(stem.name + "_small_w2.h5"))
    print(f"  fidelity: old and new stores identical? {same}")


def check_runs(source: Path, clips: int) -> None:
    for quick in (["--quick"], []):
        wall, cpu, out = timed(["emo-cache", "check", str(source), *quick])
        last = next((line for line in out.splitlines() if "problem(s)" in line), "?")
        print(f"  check {' '.join(quick) or '(full)':<8} {clips} clips: wall {wall:6.1f} s, CPU {cpu:6.1f} s,"
              f" {wall / clips * 1000:.2f} ms/clip; {last.strip()}  (limit: --quick under 60 s on 16,000 clips)")


def bench_tree(scratch: Path, clips: int, frames: int, subset: int) -> None:
    tree = build_tree(scratch / f"dfew_like_{clips}x{frames}", clips, frames)
    part = build_tree(scratch / f"dfew_like_{subset}x{frames}", subset, frames)
    print(f"tree: {tree} ({clips} clips x {frames} frames of 112x112 face crops, DFEW release layout;"
          f" {subset} clips for the small load)")
    check_runs(tree, clips)
    paths = sorted((part / "Clip" / "jpg_256").glob("*/*.jpg"))[:1500]
    _, frame_cpu = per_frame_prealigned(paths)
    write = store_write_ms(part, min(subset, 500), {})
    print(f"  per-frame work alone (decode + resize + JPEG encode): {frame_cpu * 1000:.2f} ms CPU;"
          f" store write alone (cache/, issue 17): {write:.2f} ms per clip")
    stem = scratch / "tree"
    runs = scaling((part, tree), (subset, clips), frames, frame_cpu, write, stem, (), ["tree", str(part)])
    compare_ways(part, stem, subset, runs[2][0], ())


def bench_fexp(data: Path, scratch: Path, every: int) -> None:
    """Photos differ in detection cost (a photo without a face runs the whole retry ladder), so the small load is
    every ``every``-th photo (the same mix as the whole set) and the per-photo work is timed on all of it."""
    table = data / "faces.csv"
    rows = list(csv.DictReader(open(table)))
    picked = rows[::every]
    sub = scratch / f"fexp_every{every}.csv"
    with open(sub, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["path", "label", "split"])
        writer.writerows([[str(data / r["path"]), r["label"], r["split"]] for r in picked])
    print(f"fexp-dev: {table} ({len(rows)} photos, one-frame clips; faces with --prealigned no; every {every}th"
          f" photo ({len(picked)}) for the small load)")
    check_runs(table, len(rows))
    _, frame_cpu = per_frame_detected([data / r["path"] for r in picked])
    write = store_write_ms(sub, 300, {"prealigned": "no"})
    print(f"  per-photo face work alone, on the {len(picked)} photos of the small load (decode + detect + landmarks +"
          f" warp + JPEG encode): {frame_cpu * 1000:.1f} ms CPU; store write alone (cache/, issue 17): {write:.2f} ms"
          " per clip")
    stem = scratch / "fexp"
    runs = scaling((sub, table), (len(picked), len(rows)), 1, frame_cpu, write, stem, ("--prealigned", "no"),
                   ["photos", str(sub)])
    compare_ways(sub, stem, len(picked), runs[2][0], ("--prealigned", "no"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tree", action="store_true", help="the generated DFEW-like tree")
    parser.add_argument("--fexp", type=Path, default=None, help="fexp-dev's folder (its README, faces.csv)")
    parser.add_argument("--clips", type=int, default=16_000)
    parser.add_argument("--frames", type=int, default=3)
    parser.add_argument("--subset", type=int, default=2000, help="clips of the small tree load (and old-vs-new)")
    parser.add_argument("--every", type=int, default=4, help="fexp-dev: every Nth photo for the small load")
    parser.add_argument("--scratch", type=Path, default=Path("/tmp/bench_faces_clips"))
    parser.add_argument("--ceiling-kernel", nargs=2, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.ceiling_kernel is not None:
        return ceiling_kernel(*args.ceiling_kernel)
    print(f"cpu: {cpu_flags()}")
    args.scratch.mkdir(parents=True, exist_ok=True)
    if not args.tree and args.fexp is None:  # `make bench`: a small tree, so the whole bench stays short
        args.tree, args.clips, args.subset = True, 2000, 500
    if args.tree:
        bench_tree(args.scratch, args.clips, args.frames, args.subset)
    if args.fexp is not None:
        bench_fexp(args.fexp, args.scratch, args.every)


if __name__ == "__main__":
    main()
