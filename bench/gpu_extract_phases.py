"""Where a CUDA extraction batch spends its time: host copy, upload, prepare, network, download.

    python3 bench/gpu_extract_phases.py [--batch 256] [--precision bf16]

Each phase is timed with CUDA synchronisation around it over the same batches, after a warm-up, and the
network alone is also timed on input already on the GPU: if the network alone is much faster than the whole
batch, the pipeline around it is the limit, not cuDNN. Run on a GPU machine (bench/gpu_check.sh runs the
whole chain).
"""
from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from emotion_attention.pipeline.models.extractor import TORCH_DTYPES, FeatureExtractor
from emotion_attention.pipeline.configs import ExtractConfig


def pinned_download(fx: FeatureExtractor, out: torch.Tensor) -> np.ndarray:
    """What forward_batch does on CUDA: into the reused pinned buffer, wait for it, one host copy."""
    if out.device.type != "cuda":
        return out.numpy()
    host = fx._buffer("_download", tuple(out.shape), out.dtype)
    host.copy_(out, non_blocking=True)
    torch.cuda.current_stream().synchronize()
    return host.numpy().copy()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--batches", type=int, default=6)
    ap.add_argument("--precision", default="bf16")
    ap.add_argument("--size", type=int, default=256)
    args = ap.parse_args()
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    fx = FeatureExtractor(ExtractConfig(weights="random", seed=0, input_size=args.size, batch_size=args.batch,
                                        precision=args.precision, device=dev))
    faces = np.random.default_rng(0).integers(0, 255, (args.batch, args.size, args.size, 3), dtype=np.uint8)
    sync = torch.cuda.synchronize if dev == "cuda" else (lambda: None)
    phases: dict[str, list[float]] = {}

    def timed(name, fn):
        sync()
        t = time.perf_counter()
        out = fn()
        sync()
        phases.setdefault(name, []).append(time.perf_counter() - t)
        return out

    dtype = TORCH_DTYPES[fx.precision]
    for i in range(args.batches + 2):
        x = timed("host copy into staging", lambda: fx.staging(faces.shape).copy_(torch.from_numpy(faces)))
        x = timed("upload (pinned, non-blocking)", lambda: x.to(fx.device, non_blocking=True))
        with torch.inference_mode():
            inp = timed("prepare (resize, normalise)", lambda: fx.backbone.prepare(x).to(dtype).contiguous(
                memory_format=torch.channels_last))
            out = timed("network", lambda: fx.backbone.forward_maps(inp))
            out = timed("to float16", lambda: out.float().clamp_(max=65504).half())
            timed("download (.cpu, pageable)", lambda: out.cpu().numpy())
            timed("download (pinned + copy)", lambda: pinned_download(fx, out))
        if i == 1:
            phases.clear()  # two warm-up batches: cudnn autotuning, allocator
    whole = fx.maps(np.concatenate([faces] * 2))  # the extractor's own path, for its total per face
    sync()
    t = time.perf_counter()
    for _ in range(args.batches // 2):
        fx.maps(np.concatenate([faces] * 2))
    sync()
    per_face_whole = (time.perf_counter() - t) / (args.batches // 2 * 2 * args.batch)
    total = sum(np.median(v) for k, v in phases.items() if "pageable" not in k)  # the path forward_batch takes
    print(f"{torch.cuda.get_device_name() if dev == 'cuda' else 'cpu'}, {args.precision}, batch {args.batch},"
          f" {args.size} px; median ms per batch (share of the sum, which leaves out the pageable download):")
    for name, v in phases.items():
        print(f"  {name:<32} {1e3 * np.median(v):8.2f} ms  {np.median(v) / total:6.1%}")
    print(f"  {'sum of phases':<32} {1e3 * total:8.2f} ms = {args.batch / total:.0f} faces/s")
    print(f"  network alone: {args.batch / np.median(phases['network']):.0f} faces/s;"
          f" FeatureExtractor.maps: {1 / per_face_whole:.0f} faces/s ({whole.shape})")


if __name__ == "__main__":
    main()
