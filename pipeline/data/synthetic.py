"""Synthetic features stores in which the class evidence sits in a few positions of a few frames.

Used by the mechanism benchmark (bench/bench_mechanism.py), its lighter test and the heads benchmark.
Every position holds Gaussian noise; most also hold the prototype of a *random* class (distractors),
so the mean over positions and frames carries little class information. In a few frames of each
clip (the evidence frames), a few positions (the evidence positions) hold the prototype of the
clip's class plus a "salient" marker direction that no distractor has. Frames and positions are
drawn per clip. A model must find the evidence in space (attention) and in time (p(f|S)).
Optionally (``decoy_frames`` > 0, off by default) other present frames hold a decoy: another class
with a weaker marker, like a fleeting, less intense expression; a harder variant.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from emotion_attention.cache.features_store import FeaturesStore
from emotion_attention.pipeline.configs import AFEW_CLASSES


@dataclass(frozen=True)
class SyntheticConfig:
    num_classes: int = 4          # fewer than AFEW's 7 keeps the light test quick; names follow AFEW's order
    train_clips: int = 160        # clips in split "Train"
    val_clips: int = 80           # clips in split "Val"
    frames: int = 12              # F per clip
    evidence_frames: int = 3      # frames per clip that hold the class evidence
    grid: int = 6                 # L = grid * grid positions (VGG16 at 256 px gives 16 x 16)
    evidence_positions: int = 2   # positions per evidence frame that hold it (2 heads can take one each)
    dim: int = 32                 # D channels (VGG16 conv5 has 512)
    views: int = 2                # view 1 is the left-right mirror of view 0, as the extractor caches
    noise: float = 0.15           # per-channel noise std, relative to unit-norm prototypes and marker
    scale: float = 8.0            # overall gain: conv5 positions have norms of tens; unit-scale maps learn slowly at lr 0.1
    distractor_prob: float = 1.0  # share of non-evidence positions holding a random class's prototype
    absent_frames: int = 1        # frames per clip with no face (zero maps, present=False)
    decoy_frames: int = 0         # present frames holding a weaker decoy of another class (a harder variant; off)
    decoy_strength: float = 0.5   # marker gain of a decoy (evidence has 1): p(f|S) must prefer the stronger frames
    seed: int = 0

    def __post_init__(self) -> None:
        if self.evidence_frames + self.absent_frames + self.decoy_frames > self.frames:
            raise ValueError("SyntheticConfig: evidence_frames + absent_frames + decoy_frames must fit in"
                             f" frames={self.frames}")
        if self.evidence_positions > self.grid * self.grid or not 2 <= self.num_classes <= 7:
            raise ValueError("SyntheticConfig: evidence_positions must fit in grid^2 and 2 <= num_classes <= 7")


def make_patterns(cfg: SyntheticConfig, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(class prototypes (E, D), marker (D,)): orthonormal."""
    if cfg.dim < cfg.num_classes + 1:
        raise ValueError(f"SyntheticConfig: dim={cfg.dim} must exceed num_classes={cfg.num_classes}")
    vectors = rng.standard_normal((cfg.num_classes + 1, cfg.dim))
    q, _ = np.linalg.qr(vectors.T)                       # (D, E + 1) orthonormal columns
    protos = q[:, :cfg.num_classes].T
    return protos.astype(np.float32), q[:, cfg.num_classes].astype(np.float32)


def make_clip(label: int, protos: np.ndarray, marker: np.ndarray, cfg: SyntheticConfig,
              rng: np.random.Generator) -> dict:
    """One clip: maps float16 (V, F, L, D), present (F,), evidence frames and positions (view 0)."""
    l = cfg.grid * cfg.grid
    maps = cfg.noise * rng.standard_normal((cfg.frames, l, cfg.dim)).astype(np.float32)   # (F, L, D)
    holds = rng.random((cfg.frames, l)) < cfg.distractor_prob
    maps += holds[..., None] * protos[rng.integers(cfg.num_classes, size=(cfg.frames, l))]
    order = rng.permutation(cfg.frames)
    absent = np.sort(order[:cfg.absent_frames])
    evidence = np.sort(order[cfg.absent_frames:cfg.absent_frames + cfg.evidence_frames])
    positions = np.sort(rng.choice(l, size=cfg.evidence_positions, replace=False))
    decoys = order[cfg.absent_frames + cfg.evidence_frames:][:cfg.decoy_frames]
    for f in np.concatenate([evidence, decoys]):
        is_evidence = f in set(evidence.tolist())
        planted = label if is_evidence else (label + rng.integers(1, cfg.num_classes)) % cfg.num_classes
        gain = 1.0 if is_evidence else cfg.decoy_strength
        where = positions if is_evidence else rng.choice(l, size=cfg.evidence_positions, replace=False)
        maps[f, where] = (protos[planted] + gain * marker
                          + cfg.noise * rng.standard_normal((len(where), cfg.dim)))
    maps[absent] = 0.0
    present = np.ones(cfg.frames, bool)
    present[absent] = False
    grid = maps.reshape(cfg.frames, cfg.grid, cfg.grid, cfg.dim)                         # (F, H, W, D)
    mirror = grid[:, :, ::-1].reshape(cfg.frames, l, cfg.dim)
    views = (cfg.scale * np.stack([maps, mirror][:cfg.views])).astype(np.float16)                     # (V, F, L, D)
    return {"maps": views, "present": present, "evidence_frames": evidence, "evidence_positions": positions}


def write_synthetic_store(path, cfg: SyntheticConfig = SyntheticConfig(), progress: bool = False) -> dict:
    """Write a features store of synthetic clips (splits "Train" and "Val"), balanced over classes.

    Arguments:
        path: the ``.h5`` to create (an existing one is replaced).
        cfg: SyntheticConfig.
    Returns: {"path", "class_names", "provenance"}; each clip's attrs also hold its
        ``evidence_frames`` and ``evidence_positions`` (JSON lists, view 0).

    >>> import tempfile
    >>> with tempfile.TemporaryDirectory() as folder:
    ...     info = write_synthetic_store(f"{folder}/synth.h5", SyntheticConfig(train_clips=40, val_clips=20))
    >>> info["class_names"]
    ['Angry', 'Disgust', 'Fear', 'Happy']
    """
    path = Path(path)
    if path.exists():
        path.unlink()
    rng = np.random.default_rng(cfg.seed)
    protos, marker = make_patterns(cfg, rng)
    class_names = list(AFEW_CLASSES[:cfg.num_classes])
    provenance = {"backbone": "synthetic", "layer": "evidence-in-distractors", **asdict(cfg)}
    jobs = [("Train", i) for i in range(cfg.train_clips)] + [("Val", i) for i in range(cfg.val_clips)]
    with FeaturesStore(path, "a", provenance=provenance, class_names=class_names) as store:
        for split, i in tqdm(jobs, desc="synthetic clips", unit="clip", disable=not progress):
            label = i % cfg.num_classes
            clip = make_clip(label, protos, marker, cfg, rng)
            store.write_clip(f"{split}/{class_names[label]}/{i:05d}.syn", clip["maps"], clip["present"],
                             {"label": class_names[label], "split": split,
                              "evidence_frames": clip["evidence_frames"].tolist(),
                              "evidence_positions": clip["evidence_positions"].tolist()})
    return {"path": str(path), "class_names": class_names, "provenance": provenance}


def read_evidence(store: FeaturesStore, clip_ids) -> dict:
    """clip id -> (evidence frames, evidence positions) from a synthetic store's clip attrs."""
    evidence = {}
    for cid in clip_ids:
        attrs = store.attrs(cid)
        evidence[cid] = (np.asarray(json.loads(attrs["evidence_frames"])),
                         np.asarray(json.loads(attrs["evidence_positions"])))
    return evidence


def evidence_scores(records: list[dict], evidence: dict) -> dict:
    """How well a model's p(f|S) and attention find the planted evidence.

    Arguments:
        records: ``predict_video`` outputs with a ``clip_id`` key (from ``evaluate``).
        evidence: clip id -> (evidence frames, evidence positions), e.g. from ``read_evidence``.
    Returns: dict of means over clips:
        ``top_frame_is_evidence`` share of clips whose highest p(f|S) is an evidence frame;
        ``frame_mass_on_evidence`` p(f|S) summed over the evidence frames;
        ``evidence_frames_ranked_first`` share of evidence frames among the top-m of p(f|S) (m = their number);
        ``attention_mass_on_evidence`` per evidence frame, the best head's attention summed over the
        evidence positions (None without attention); ``attention_peak_on_evidence`` share of evidence
        frames where that head's argmax is an evidence position; ``uniform_attention_mass`` the
        same mass for uniform attention (the chance level).

    >>> evidence_scores(result["records"], read_evidence(store, ids))["top_frame_is_evidence"]  # doctest: +SKIP
    """
    top, mass, ranked, att_mass, att_peak, chance = [], [], [], [], [], []
    for rec in records:
        frames, positions = evidence[rec["clip_id"]]
        weights = rec["frame_weights"]
        top.append(int(weights.argmax()) in set(frames.tolist()))
        mass.append(float(weights[frames].sum()))
        ranked.append(len(set(np.argsort(-weights)[:len(frames)].tolist()) & set(frames.tolist())) / len(frames))
        if rec["attention"] is not None:
            attn = rec["attention"][frames]                         # (m, heads, L)
            on_evidence = attn[:, :, positions].sum(axis=2)         # (m, heads)
            best = on_evidence.argmax(axis=1)                       # the head that looks at the evidence
            att_mass += on_evidence.max(axis=1).tolist()
            peaks = attn[np.arange(len(frames)), best].argmax(axis=1)
            att_peak += [p in set(positions.tolist()) for p in peaks]
            chance.append(len(positions) / attn.shape[2])
    mean = (lambda xs: float(np.mean(xs)) if xs else None)
    return {"top_frame_is_evidence": mean(top), "frame_mass_on_evidence": mean(mass),
            "evidence_frames_ranked_first": mean(ranked), "attention_mass_on_evidence": mean(att_mass),
            "attention_peak_on_evidence": mean(att_peak), "uniform_attention_mass": mean(chance)}
