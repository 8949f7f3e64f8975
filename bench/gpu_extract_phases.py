"""Where a CUDA extraction batch spends its time: host copy, upload (or GPU JPEG decoding), prepare, network,
float16 rows, download; and what the overlapped launches (``launch`` k+1 before ``wait`` k) achieve.

    python3 bench/gpu_extract_phases.py [--batch 256] [--precision bf16]

Each phase is timed with CUDA synchronisation around it over the same batches, after a warm-up. The network
alone runs on input already on the GPU: if it is much faster than the overlapped whole, the pipeline around it
is the limit, not cuDNN. Run on a GPU machine (bench/gpu_check.sh runs the whole chain); on CPU the same
phases run without the CUDA ones (a dry run).
"""
from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from emotion_attention.cache.codecs import Codec
from emotion_attention.pipeline.configs import ExtractConfig
from emotion_attention.pipeline.models.extractor import (
    TORCH_DTYPES,
    FeatureExtractor,
    MapsBuffer,
    decode_jpegs_on,
    overlapped,
)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--batches", type=int, default=6)
    ap.add_argument("--precision", default="bf16")
    ap.add_argument("--size", type=int, default=256)
    args = ap.parse_args()
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    fx = FeatureExtractor(ExtractConfig(weights="random", seed=0, input_size=args.size, batch_size=args.batch,
                                        precision=args.precision, device=dev, views=2))
    rng = np.random.default_rng(0)
    faces = rng.integers(0, 255, (args.batch, args.size, args.size, 3), dtype=np.uint8)
    codec = Codec("jpeg", 100, 75)
    encoded = [codec.encode(f) for f in faces]
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
    staging, out = fx.faces_buffer(faces.shape[1:]), fx.maps_buffer()
    for i in range(args.batches + 2):
        timed("host copy into the pinned batch buffer", lambda: staging.copy_(torch.from_numpy(faces)))
        x = timed("upload (pinned, non-blocking)", lambda: staging.to(fx.device, non_blocking=True))
        timed("JPEG decoding on the device (batched)", lambda: decode_jpegs_on(encoded, args.batch, fx.device))
        with torch.inference_mode():
            inp = timed("prepare (mirror, resize, normalise)", lambda: fx.backbone.prepare(
                torch.cat([x, x.flip(2)])).to(dtype).contiguous(memory_format=torch.channels_last))
            maps = timed("network", lambda: fx.backbone.forward_maps(inp))
            dev_rows = MapsBuffer.allocate(args.batch, 2, fx.spec.L, fx.spec.D, device=fx.device)
            timed("float16 rows (chunk layout)", lambda: dev_rows.maps.copy_(
                maps.float().clamp_(max=65504).view(2, args.batch, fx.spec.L, fx.spec.D).transpose(0, 1)))
            timed("download into pinned rows", lambda: out.raw.copy_(dev_rows.raw, non_blocking=True))
        if i == 1:
            phases.clear()  # two warm-up batches: cudnn autotuning, allocator
    total = sum(np.median(v) for k, v in phases.items() if "JPEG" not in k)  # the host-decoded path
    print(f"{torch.cuda.get_device_name() if dev == 'cuda' else 'cpu'}, {fx.precision}, batch {args.batch} x 2 views,"
          f" {args.size} px; median ms per batch (share of the host-decoded path's sum):")
    for name, v in phases.items():
        share = "" if "JPEG" in name else f"{np.median(v) / total:6.1%}"
        print(f"  {name:<40} {1e3 * np.median(v):8.2f} ms  {share}")
    print(f"  network alone: {args.batch / np.median(phases['network']):.0f} faces/s (2 views each)")
    ring = [fx.maps_buffer() for _ in range(2)]
    inputs = [encoded if fx.decodes_jpeg else staging] * args.batches
    sync()
    t = time.perf_counter()
    for k, (_, done) in enumerate(overlapped(range(len(inputs)), lambda k: fx.launch(inputs[k], ring[k % 2]))):
        done.rows(args.batch)  # what the writer gets: pinned rows, no further copy
    sync()
    print(f"  overlapped launches ({'GPU' if fx.decodes_jpeg else 'host'} decoding, download of k beside compute of"
          f" k+1): {args.batches * args.batch / (time.perf_counter() - t):.0f} faces/s")


if __name__ == "__main__":
    main()
