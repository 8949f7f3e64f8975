"""Speed of the heads: one training step, and an AFEW-sized epoch with and without HDF5 reads.

One run, same model and batches throughout:
  1. step time for 32 clips x 16 frames x 256 positions x 512 channels (TP+SA, 2 heads, U=128), CPU;
  2. an epoch over 773 clips (AFEW's train split) from a generated features store on disk, timed as
     compute only (a batch already in memory), reads only, reads + compute in series, reads +
     compute with the training loop's prefetch thread, and the store held in memory.
The epoch is compute-bound when reads take less time than compute and the prefetching loop costs
about the same as compute alone. Fidelity: the streamed and in-memory epochs must give the same
weights (same seed, same batches).

    .venv/bin/python bench/bench_heads.py                 # 773 clips x 20 frames, D=512 (~4 GB in /tmp)
    .venv/bin/python bench/bench_heads.py --dim 256 --clips 400 --keep runs/bench_heads
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from emotion_attention.cache.features_store import FeaturesStore  # noqa: E402
from emotion_attention.pipeline.training.batches import ClipSource, prefetch  # noqa: E402
from emotion_attention.pipeline.configs import AFEW_CLASSES  # noqa: E402
from emotion_attention.pipeline.configs import HeadsConfig  # noqa: E402
from emotion_attention.pipeline.configs import TrainConfig  # noqa: E402
from emotion_attention.pipeline.stages.heads import build_training, epoch_batches, train_epoch
from emotion_attention.pipeline.core.runtime import cpu_flags  # noqa: E402
from tqdm import tqdm  # noqa: E402


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--clips", type=int, default=773, help="AFEW's train split has 773")
    p.add_argument("--frames", type=int, default=20, help="frames stored per clip (16 are sampled)")
    p.add_argument("--grid", type=int, default=16, help="L = grid^2; VGG16 conv5_3 at 256 px: 16")
    p.add_argument("--dim", type=int, default=512, help="D; VGG16 conv5_3: 512")
    p.add_argument("--steps", type=int, default=5, help="timed steps for the step-time figure")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--no-memory", action="store_true", help="skip the in-memory epoch")
    p.add_argument("--keep", default=None, help="write (and keep) the store in this folder instead of /tmp")
    return p.parse_args()


def write_store(path: Path, args) -> list[str]:
    """AFEW-sized store: content from a small pool of random blocks (only the shape matters here)."""
    rng = np.random.default_rng(0)
    l = args.grid ** 2
    pool = [(0.05 * np.abs(rng.standard_normal((1, args.frames, l, args.dim)))).astype(np.float16)
            for _ in range(4)]  # small values keep lr 0.1 stable on random features
    provenance = {"backbone": "bench", "frames": args.frames, "L": l, "D": args.dim, "clips": args.clips}
    names = list(AFEW_CLASSES)
    with FeaturesStore(path, "a", provenance=provenance, class_names=names) as store:
        have = set(store.complete_ids())
        for i in tqdm(range(args.clips), desc="write store", unit="clip"):
            cid = f"Train/{names[i % 7]}/{i:04d}.avi"
            if cid not in have:
                store.write_clip(cid, pool[i % 4], np.ones(args.frames, bool),
                                 {"label": names[i % 7], "split": "Train"})
        return store.complete_ids("Train")


def timed_epoch(source: ClipSource, ids, labels, cfg, heads_cfg, depth: int, compute: bool):
    """Seconds for one epoch (and the model, if trained) under one way of feeding the batches."""
    model, optimizer, scheduler = build_training(heads_cfg, cfg, torch.device("cpu"))
    batches = prefetch(epoch_batches(source, ids, labels, cfg, epoch=0), depth)
    t0 = time.perf_counter()
    if compute:
        train_epoch(model, optimizer, scheduler, batches, 0, -(-len(ids) // cfg.batch_size),
                    torch.device("cpu"), 0.0)
    else:
        for _ in batches:
            pass
    return time.perf_counter() - t0, model


def multi_index_reads(store, ids, count: int) -> float:
    """Seconds to read ``count`` random frames of each clip with one multi-index ``read_clip`` call."""
    rng = np.random.default_rng(0)
    t0 = time.perf_counter()
    for cid in ids:
        frames = np.sort(rng.choice(store.shape(cid)[1], size=count, replace=False))
        store.read_clip(cid, frames=frames, views=[0])
    return time.perf_counter() - t0


def reads_only(source: ClipSource, ids, cfg: TrainConfig) -> float:
    """Seconds for the epoch's HDF5 reads alone (same frames and views as epoch_batches draws)."""
    rng = np.random.default_rng([cfg.seed, 0])
    order = [ids[i] for i in rng.permutation(len(ids))]
    t0 = time.perf_counter()
    for cid in order:
        view = int(rng.integers(source.num_views(cid))) if cfg.random_view else 0
        source.read(cid, cfg.frames_per_clip, view, rng)
    return time.perf_counter() - t0


def compute_only(heads_cfg, cfg, steps: int, shape) -> list[float]:
    """Seconds per step on one batch already in memory (no reads at all)."""
    model, optimizer, _ = build_training(heads_cfg, cfg, torch.device("cpu"))
    maps = 0.05 * torch.randn(*shape).abs()  # the store's value range: lr 0.1 stays stable (no NaN slow paths)
    mask = torch.ones(shape[:2], dtype=torch.bool)
    labels = torch.arange(shape[0]) % heads_cfg.num_classes
    times = []
    for _ in range(steps + 1):
        t0 = time.perf_counter()
        total, _, _ = model.loss(model(maps, mask), labels)
        optimizer.zero_grad()
        total.backward()
        optimizer.step()
        times.append(time.perf_counter() - t0)
    return times[1:]  # the first step warms up allocators and kernels


def main() -> int:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = TrainConfig(prefetch=2)
    heads_cfg = HeadsConfig(in_dim=args.dim, num_classes=7)
    l = args.grid ** 2
    step_shape = (cfg.batch_size, cfg.frames_per_clip, l, args.dim)
    print(f"cpu flags: {cpu_flags()}")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU; heads: TP+SA, "
          f"{heads_cfg.heads} heads, U={heads_cfg.hidden}")
    step = compute_only(heads_cfg, cfg, args.steps, step_shape)
    print(f"step ({' x '.join(map(str, step_shape))}): median {statistics.median(step):.3f} s,"
          f" min {min(step):.3f} s over {len(step)} steps")
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(args.keep or tmp)
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"afew_sized_{args.clips}x{args.frames}x{l}x{args.dim}.h5"
        t0 = time.perf_counter()
        ids = write_store(path, args)
        size_gb = path.stat().st_size / 1e9
        print(f"store: {len(ids)} clips x {args.frames} frames x {l} x {args.dim} float16 = {size_gb:.2f} GB"
              f" at {path} (written in {time.perf_counter() - t0:.0f} s; reads below may come from the page cache)")
        return epochs(path, ids, cfg, heads_cfg, args)


def epochs(path, ids, cfg, heads_cfg, args) -> int:
    labels = {cid: i % 7 for i, cid in enumerate(ids)}
    steps = -(-len(ids) // cfg.batch_size)
    with FeaturesStore(path, "r") as store:
        shape = (cfg.batch_size, cfg.frames_per_clip, args.grid ** 2, args.dim)
        t_compute = sum(compute_only(heads_cfg, cfg, steps, shape))
        streaming = ClipSource(store, ids, in_memory=False)
        t0 = time.perf_counter()
        for cid in ids:
            streaming.present(cid)  # a real run learns the masks this way during its first epoch
        t_masks = time.perf_counter() - t0
        t_read = reads_only(streaming, ids, cfg)
        t_batches, _ = timed_epoch(streaming, ids, labels, cfg, heads_cfg, 0, compute=False)
        t_multi = multi_index_reads(store, ids[:cfg.batch_size], cfg.frames_per_clip) * steps
        t_serial, _ = timed_epoch(streaming, ids, labels, cfg, heads_cfg, 0, compute=True)
        t_prefetch, streamed = timed_epoch(streaming, ids, labels, cfg, heads_cfg, cfg.prefetch, compute=True)
        t_compute_after = sum(compute_only(heads_cfg, cfg, steps, shape))  # the shared CPU drifts: measure twice
        print(f"epoch of {len(ids)} clips ({steps} steps of {cfg.batch_size} clips x {cfg.frames_per_clip} frames):")
        print(f"  compute only (one batch in memory)   {t_compute:7.1f} s   (again after the streamed epochs:"
              f" {t_compute_after:.1f} s)")
        print(f"  HDF5 reads only                      {t_read:7.1f} s   (first pass, whole clips: {t_masks:.1f} s)")
        print(f"  reads + batch assembly (float32, pad) {t_batches:6.1f} s")
        print(f"  (same reads as one multi-index read_clip per clip: {t_multi:.1f} s, from one batch x {steps})")
        print(f"  reads + compute, in series           {t_serial:7.1f} s")
        print(f"  reads + compute, prefetch thread     {t_prefetch:7.1f} s   (what `emo-train heads` does)")
        if not args.no_memory:
            t0 = time.perf_counter()
            held_source = ClipSource(store, ids, in_memory=True)
            t_load = time.perf_counter() - t0
            t_memory, held = timed_epoch(held_source, ids, labels, cfg, heads_cfg, cfg.prefetch, compute=True)
            del held_source
            print(f"  store in memory                      {t_memory:7.1f} s   (+{t_load:.1f} s to load it)")
            diff = max(float((a - b).abs().max()) for a, b in zip(streamed.state_dict().values(),
                                                                   held.state_dict().values()))
            print(f"fidelity: max |weight difference| streamed vs in-memory epoch = {diff:.2e}")
    t_compute = (t_compute + t_compute_after) / 2
    print(f"ratio reads / compute = {t_read / t_compute:.2f}; (reads + assembly) / compute ="
          f" {t_batches / t_compute:.2f}  (< 1: compute-bound)")
    print(f"ratio (reads + compute with prefetch) / compute = {t_prefetch / t_compute:.2f}"
          f"  (~1: reads hidden behind compute; compute = mean of the two compute-only epochs)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
