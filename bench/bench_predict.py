"""Benchmark: emo-predict in one process vs the same stages one by one through the stores.

Both ways take the same real video through decode + align, backbone maps and the heads, in one run:
    in-process    pipeline.predict.predict_videos (no stores)
    via stores    emo-cache faces (preprocess_dataset) -> emo-cache extract (extract_features) ->
                  scoring from the features store (emo-eval's predict_video / the TP of the
                  training-free mode)
Prints seconds of compute per second of video by stage for each way, their ratio, and the fidelity:
the largest difference in p(c|S) and whether the predicted labels agree.

Part 1 is emo-predict's default, the training-free fer-minixception + TP mode, on the whole video.
Part 2 is the paper's VGG16 at 256 px (random weights, untrained heads: timing only) on the first
--vgg16-frames frames, in the backbone precision emo-cache extract picks (bf16 on this CPU).

    .venv/bin/python bench/bench_predict.py [--video data/samples/WolfgangLanger_Pexels.mp4]
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
import warnings
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from emotion_attention.cache import FacesStore, FeaturesStore  # noqa: E402
from emotion_attention.pipeline.configs import DecodeConfig  # noqa: E402
from emotion_attention.pipeline.data.decode import probe_video
from emotion_attention.pipeline.configs import EvalConfig  # noqa: E402
from emotion_attention.pipeline.stages.evaluate import evaluate
from emotion_attention.pipeline.configs import ExtractConfig  # noqa: E402
from emotion_attention.pipeline.models.extractor import FeatureExtractor
from emotion_attention.pipeline.stages.extract import extract_features
from emotion_attention.pipeline.models.fer import default_fer_weights  # noqa: E402
from emotion_attention.pipeline.models.heads import EmotionHeads  # noqa: E402
from emotion_attention.pipeline.configs import HeadsConfig
from emotion_attention.pipeline.stages.predict import AFEW_CLASSES, load_scorer, predict_videos  # noqa: E402
from emotion_attention.pipeline.configs import PredictConfig
from emotion_attention.pipeline.configs import PreprocessConfig  # noqa: E402
from emotion_attention.pipeline.stages.faces import preprocess_dataset
from emotion_attention.pipeline.core.runtime import cpu_flags  # noqa: E402

STAGES = ("decode_align", "features", "heads")


def dataset_with(video: Path, root: Path) -> Path:
    """A one-clip dataset folder <root>/Test/Sad/<video> (a link; the label only satisfies the layout)."""
    clip = root / "Test" / "Sad" / video.name
    clip.parent.mkdir(parents=True, exist_ok=True)
    clip.symlink_to(video.resolve())
    return root


def in_process(video: Path, out: Path, cfg: PredictConfig) -> tuple[dict, dict, float]:
    t0 = time.perf_counter()
    result = predict_videos([str(video)], out, cfg, log=lambda *a: None)
    wall = time.perf_counter() - t0
    (r,) = result["results"]
    return dict(r.seconds), r.prediction, wall


def via_stores_faces_and_maps(video: Path, work: Path, max_frames, extract_cfg: ExtractConfig) -> tuple[dict, Path, Path]:
    """emo-cache faces then emo-cache extract; returns stage seconds and the two stores."""
    data = dataset_with(video, work / "data")
    faces, feats = work / "faces.h5", work / "features.h5"
    pre = PreprocessConfig(decode=DecodeConfig(max_frames=max_frames), class_names=tuple(AFEW_CLASSES))
    t0 = time.perf_counter()
    preprocess_dataset(data, faces, pre, workers=1, progress=False)
    t1 = time.perf_counter()
    extract_features(faces, feats, extract_cfg, log=lambda *a: None)
    t2 = time.perf_counter()
    return {"decode_align": t1 - t0, "features": t2 - t1}, faces, feats


def report(title: str, seconds_video: float, a: dict, b: dict, wall_a: float, wall_b: float,
           probs_a: np.ndarray, probs_b: np.ndarray) -> None:
    print(f"\n{title}: {seconds_video:.2f} s of video")
    print(f"  {'stage':<14}{'in-process':>14}{'via stores':>14}   (seconds per second of video)")
    for stage in STAGES:
        print(f"  {stage:<14}{a[stage] / seconds_video:>14.4f}{b[stage] / seconds_video:>14.4f}")
    ta, tb = sum(a.values()) / seconds_video, sum(b.values()) / seconds_video
    print(f"  {'total':<14}{ta:>14.4f}{tb:>14.4f}   -> in-process is {tb / ta:.2f}x the speed of via-stores"
          f" ({'faster' if ta < 1 else 'slower'} than real time)")
    print(f"  wall clock incl. model loading and file writing: in-process {wall_a:.2f} s, via stores {wall_b:.2f} s"
          f" (ratio {wall_b / wall_a:.2f})")
    agree = int(np.argmax(probs_a)) == int(np.argmax(probs_b))
    print(f"  fidelity: max |p(c|S) in-process - via stores| = {np.abs(probs_a - probs_b).max():.2e};"
          f" labels {'agree' if agree else 'DIFFER'} ({AFEW_CLASSES[int(np.argmax(probs_a))]} /"
          f" {AFEW_CLASSES[int(np.argmax(probs_b))]})")


def warm_up(video: Path, work: Path, cfg: PredictConfig) -> None:
    """One short untimed prediction, so neither way pays first-call costs (oneDNN kernels, dlib files)."""
    predict_videos([str(video)], work, PredictConfig(**{**asdict(cfg), "max_frames": 4}), log=lambda *a: None)


def best_of(runs: list[tuple[dict, np.ndarray, float]]) -> tuple[dict, np.ndarray, float]:
    """The repeat with the least total stage time (the machine is shared: the minimum is the least noisy)."""
    return min(runs, key=lambda r: sum(r[0].values()))


def part_training_free(video: Path, work: Path, max_frames, repeats: int) -> None:
    cfg = PredictConfig(max_frames=max_frames)
    warm_up(video, work / "warm", cfg)
    scorer = load_scorer(cfg)
    ins, via = [], []
    for k in range(repeats):  # alternate the two ways so that load changes hit both
        a, pred_a, wall_a = in_process(video, work / f"predict{k}", cfg)
        ins.append((a, pred_a["probs"], wall_a))
        t0 = time.perf_counter()
        b, _, feats = via_stores_faces_and_maps(video, work / f"stores{k}", max_frames, ExtractConfig(
            backbone="fer-minixception", weights=str(default_fer_weights())))
        t1 = time.perf_counter()
        with FeaturesStore(feats, "r") as store:
            (cid,) = store.complete_ids()
            maps, present = store.read_clip(cid, views=[0])
            pred_b = scorer.score(maps[0].astype(np.float32), present)
        b["heads"] = time.perf_counter() - t1
        via.append((b, pred_b["probs"], time.perf_counter() - t0))
    (a, pa, wa), (b, pb, wb) = best_of(ins), best_of(via)
    n = len(pred_a["frame_weights"])
    report(f"training-free fer-minixception + TP, {n} frames of {video.name} (best of {repeats})",
           _video_seconds(video, n), a, b, wa, wb, pa, pb)


def part_vgg16(video: Path, work: Path, frames: int, repeats: int) -> None:
    warnings.filterwarnings("ignore", message="backbone weights are random")
    extract_cfg = ExtractConfig(weights="random", seed=0)
    fx = FeatureExtractor(extract_cfg)
    fx.maps(np.zeros((16, 256, 256, 3), np.uint8))  # warm oneDNN's bf16 kernels
    ins, via, ckpt = [], [], None
    for k in range(repeats):
        t0 = time.perf_counter()
        b, faces, feats = via_stores_faces_and_maps(video, work / f"stores{k}", frames, extract_cfg)
        if ckpt is None:
            ckpt = random_heads_checkpoint(work / "heads_vgg16_random.pt", faces, extract_cfg)
            warm_up(video, work / "warm", PredictConfig(checkpoint=str(ckpt)))
        t1 = time.perf_counter()
        metrics = evaluate(feats, ckpt, split="Test", cfg=EvalConfig(), progress=False)
        b["heads"] = time.perf_counter() - t1
        via.append((b, metrics["records"][0]["probs"], time.perf_counter() - t0))
        a, pred_a, wall_a = in_process(video, work / f"predict{k}", PredictConfig(checkpoint=str(ckpt),
                                                                                  max_frames=frames))
        ins.append((a, pred_a["probs"], wall_a))
    (a, pa, wa), (b, pb, wb) = best_of(ins), best_of(via)
    print(f"\nVGG16 backbone precision: {fx.precision} on {fx.device}")
    report(f"VGG16 conv5_3 at 256 px + SA/TP heads (random weights, timing only), {frames} frames of"
           f" {video.name} (best of {repeats})", _video_seconds(video, frames), a, b, wa, wb, pa, pb)


def random_heads_checkpoint(path: Path, faces: Path, extract_cfg: ExtractConfig) -> Path:
    """Untrained heads whose provenance matches the VGG16 features of ``faces`` (timing only)."""
    with FacesStore(faces, "r") as store:
        fingerprint = store.fingerprint
    torch.manual_seed(0)
    heads_cfg = HeadsConfig(in_dim=512, num_classes=len(AFEW_CLASSES))
    torch.save({"model": EmotionHeads(heads_cfg).state_dict(), "heads_config": asdict(heads_cfg),
                "class_names": AFEW_CLASSES,
                "provenance": FeatureExtractor(extract_cfg).provenance(fingerprint)}, path)
    return path


def _video_seconds(video: Path, frames: int) -> float:
    return frames / probe_video(video).fps


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--video", type=Path, default=REPO / "data/samples/WolfgangLanger_Pexels.mp4")
    ap.add_argument("--max-frames", type=int, default=None, help="training-free part: frames (default: all)")
    ap.add_argument("--vgg16-frames", type=int, default=48, help="VGG16 part: first N frames (0 skips it)")
    ap.add_argument("--repeats", type=int, default=2, help="runs of each way; the fastest is reported")
    args = ap.parse_args()
    if not args.video.is_file():
        sys.exit(f"{args.video}: no such video; run `make sample-data`")
    print(f"cpu flags: {cpu_flags()}")
    print(f"torch threads {torch.get_num_threads()}; video {args.video} ({probe_video(args.video)})")
    with tempfile.TemporaryDirectory() as tmp:
        part_training_free(args.video, Path(tmp) / "fer", args.max_frames, args.repeats)
        if args.vgg16_frames:
            part_vgg16(args.video, Path(tmp) / "vgg", args.vgg16_frames, args.repeats)


if __name__ == "__main__":
    main()
