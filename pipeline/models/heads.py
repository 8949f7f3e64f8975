"""The paper's heads on cached backbone maps: spatial attention, temporal softmax pooling, baselines.

Aminbeidokhti et al. 2019, Sec. 3.2-3.3 and 4.4 (equations and shapes in the README):
    R   (B, F, L, D)  cached conv maps, F frames, L positions, D channels
    A = softmax_L(W2 tanh(W1 R^T))           (B, F, heads, L)   W1: U x D, W2: heads x U
    v = flatten(A R)                         (B, F, heads * D)
    O = W_sm v                               (B, F, E)          per-frame class scores
    p(c, f | S) = softmax over (f, c) jointly; p(c | S) = sum_f; p(f | S) = sum_c
    loss = -log p(y | S) + reg * ||A A^T - I||_F^2

Baselines from Tables 1-2: no attention (mean over L), SHIFT (attention clusters with the shifting
operation, Long et al. 2018), AVG (Eq. 7), MAX and an LSTM over frame features.
Every softmax, mean and max ignores frames whose mask is False (no face, or padding).

Maps are standardised per channel first, ``(R - map_mean) / map_std``, with statistics of the training part
(``map_statistics``) held as buffers, so they travel in the checkpoint and apply in eval and predict too.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from emotion_attention.cache.common import diff_settings
from emotion_attention.cache.errors import StoreMismatch
from emotion_attention.pipeline.configs import HeadsConfig
from emotion_attention.pipeline.models.checkpoint import CheckpointError, read_checkpoint


@dataclass
class HeadsOutput:
    log_probs: torch.Tensor            # (B, E) video-level log p(c | S)
    frame_weights: torch.Tensor        # (B, F) p(f | S) for TP; the pooling's own frame weighting otherwise
    frame_scores: torch.Tensor         # (B, F, E) per-frame class scores O (meaningless where mask is False)
    attention: Optional[torch.Tensor]  # (B, F, heads, L) for "sa"/"shift", None for "mean"
    penalty: torch.Tensor              # scalar ||AA^T - I||_F^2 averaged over present frames (0 if no "sa")


class SpatialAttention(nn.Module):
    """Multi-head self-attention over the L positions of each frame (Eq. 3-4).

    Arguments:
        in_dim: D, channels of a position.
        hidden: U, rows of W1.
        heads: R, rows of W2 (the paper prints R x L; it must be R x U).
    Returns from forward: (v (B, F, heads * D), A (B, F, heads, L)).

    >>> v, a = SpatialAttention(512, 128, 2)(torch.randn(2, 16, 256, 512))
    >>> v.shape, a.shape
    (torch.Size([2, 16, 1024]), torch.Size([2, 16, 2, 256]))
    """

    def __init__(self, in_dim: int, hidden: int, heads: int):
        super().__init__()
        self.w1 = nn.Linear(in_dim, hidden, bias=False)  # W_s1 (U x D), no bias as in Eq. 3
        self.w2 = nn.Linear(hidden, heads, bias=False)   # W_s2 (heads x U)

    def forward(self, maps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self.w2(torch.tanh(self.w1(maps)))      # (B, F, L, heads)
        attn = logits.softmax(dim=2).transpose(2, 3)     # (B, F, heads, L)
        pooled = attn @ maps                             # (B, F, heads, D)
        return pooled.flatten(2), attn                   # (B, F, heads * D)


class ClusterAttention(nn.Module):
    """SHIFT baseline: attention clusters with the shifting operation (Long et al. 2018).

    Each cluster k has its own two-layer attention (W1_k: U x D, w2_k: U) and learnable scalars
    alpha_k, beta_k; its output is shifted and normalised, v_k = (alpha_k a_k R + beta_k) /
    (sqrt(K) ||alpha_k a_k R + beta_k||_2), and the K outputs are concatenated.

    >>> v, a = ClusterAttention(512, 128, 2)(torch.randn(2, 16, 256, 512))
    >>> v.shape, a.shape
    (torch.Size([2, 16, 1024]), torch.Size([2, 16, 2, 256]))
    """

    def __init__(self, in_dim: int, hidden: int, clusters: int):
        super().__init__()
        self.clusters, self.hidden = clusters, hidden
        self.w1 = nn.Parameter(torch.empty(clusters * hidden, in_dim).uniform_(-1, 1) / math.sqrt(in_dim))
        self.w2 = nn.Parameter(torch.empty(clusters, hidden).uniform_(-1, 1) / math.sqrt(hidden))
        self.alpha = nn.Parameter(torch.ones(clusters))   # shift scale, starts as the identity
        self.beta = nn.Parameter(torch.zeros(clusters))   # shift bias

    def forward(self, maps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        b, f, l, _ = maps.shape
        hidden = torch.tanh(maps @ self.w1.T).view(b, f, l, self.clusters, self.hidden)  # (B, F, L, K, U)
        logits = (hidden * self.w2).sum(-1)                                             # (B, F, L, K)
        attn = logits.softmax(dim=2).transpose(2, 3)                                    # (B, F, K, L)
        pooled = attn @ maps                                                            # (B, F, K, D)
        shifted = self.alpha[:, None] * pooled + self.beta[:, None]
        norm = shifted.norm(dim=-1, keepdim=True).clamp_min(1e-6) * math.sqrt(self.clusters)
        return (shifted / norm).flatten(2), attn                                        # (B, F, K * D)


def attention_penalty(attn: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """||A A^T - I||_F^2 per frame, averaged over frames whose mask is True.

    Arguments:
        attn: (B, F, heads, L) attention rows (each sums to 1 over L).
        mask: (B, F) bool, False for absent or padded frames (excluded).
    Returns: scalar tensor; 0 when no frame is present.

    >>> attention_penalty(torch.eye(2).expand(1, 3, 2, 2), torch.ones(1, 3, dtype=torch.bool))
    tensor(0.)
    """
    eye = torch.eye(attn.shape[2], dtype=attn.dtype, device=attn.device)
    gram = attn @ attn.transpose(2, 3) - eye                  # (B, F, heads, heads)
    per_frame = gram.pow(2).sum(dim=(2, 3))                   # (B, F)
    weight = mask.to(attn.dtype)
    return (per_frame * weight).sum() / weight.sum().clamp_min(1.0)


def softmax_pool(scores: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Temporal softmax pooling (Eq. 5-6): one softmax over frames and classes jointly.

    Arguments:
        scores: (B, F, E) per-frame class scores O.
        mask: (B, F) bool; False frames get exactly zero probability.
    Returns: (log p(c|S) (B, E), p(f|S) (B, F), p(c, f|S) (B, F, E)). A clip with no present
        frame gets uniform p(c|S) and zero p(f|S).

    >>> logp, pf, pj = softmax_pool(torch.zeros(1, 4, 7), torch.ones(1, 4, dtype=torch.bool))
    >>> round(float(pf.sum()), 6), round(float(logp.exp().sum()), 6)
    (1.0, 1.0)
    """
    has_frame = mask.any(dim=1)                                       # (B,)
    usable = mask | ~has_frame[:, None]                               # empty clips: compute on all, then discard
    masked = scores.masked_fill(~usable[..., None], float("-inf"))    # (B, F, E)
    log_joint = masked - torch.logsumexp(masked.flatten(1), dim=1)[:, None, None]
    log_p_class = torch.logsumexp(log_joint, dim=1)                   # (B, E) marginal over frames
    uniform = torch.full_like(log_p_class, -math.log(scores.shape[2]))
    log_p_class = torch.where(has_frame[:, None], log_p_class, uniform)
    p_joint = log_joint.exp() * has_frame[:, None, None]              # (B, F, E), 0 on masked frames
    return log_p_class, p_joint.sum(dim=2), p_joint


def average_pool(scores: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """AVG (Eq. 7 at test time): softmax of the scores averaged over present frames.

    Returns: (log p(c|S) (B, E), frame weights (B, F) uniform over present frames).
    """
    weight = mask.to(scores.dtype)
    weight = weight / weight.sum(dim=1, keepdim=True).clamp_min(1.0)  # (B, F)
    mean = (scores * weight[..., None]).sum(dim=1)                     # (B, E)
    return F.log_softmax(mean, dim=1), weight


def max_pool(scores: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """MAX: softmax of each class's highest score over present frames.

    Returns: (log p(c|S) (B, E), frame weights (B, F): 1 on the frame that gives the predicted
        class its maximum, 0 elsewhere).
    """
    has_frame = mask.any(dim=1, keepdim=True)                          # (B, 1)
    masked = scores.masked_fill(~(mask | ~has_frame)[..., None], float("-inf"))
    best, where = masked.max(dim=1)                                    # (B, E) value and frame
    log_probs = F.log_softmax(best, dim=1)
    chosen = where.gather(1, log_probs.argmax(dim=1, keepdim=True))    # (B, 1)
    weight = F.one_hot(chosen[:, 0], scores.shape[1]).to(scores.dtype) * has_frame
    return log_probs, weight


class EmotionHeads(nn.Module):
    """Spatial step + per-frame classifier + temporal pooling, driven by one HeadsConfig.

    Arguments of forward:
        maps: (B, F, L, D) float backbone maps (float16 is cast to the weights' dtype).
        mask: (B, F) bool, True where a face is present and the frame is not padding.
    Returns: HeadsOutput.

    >>> model = EmotionHeads(HeadsConfig(in_dim=64, num_classes=7))
    >>> out = model(torch.randn(2, 16, 49, 64), torch.ones(2, 16, dtype=torch.bool))
    >>> out.log_probs.shape, out.frame_weights.shape, out.attention.shape
    (torch.Size([2, 7]), torch.Size([2, 16]), torch.Size([2, 16, 2, 49]))
    """

    def __init__(self, cfg: HeadsConfig):
        super().__init__()
        self.cfg = cfg
        self.spatial: Optional[nn.Module] = {
            "sa": lambda: SpatialAttention(cfg.in_dim, cfg.hidden, cfg.heads),
            "shift": lambda: ClusterAttention(cfg.in_dim, cfg.hidden, cfg.shift_clusters),
            "mean": lambda: None,
        }[cfg.spatial]()
        self.dropout = nn.Dropout(cfg.dropout)
        # identity until set_map_statistics; old checkpoints without them load as the identity too
        self.register_buffer("map_mean", torch.zeros(cfg.in_dim))
        self.register_buffer("map_std", torch.ones(cfg.in_dim))
        if cfg.pooling == "lstm":
            self.lstm = nn.LSTM(cfg.frame_dim, cfg.lstm_hidden, batch_first=True)
            self.classifier = nn.Linear(cfg.lstm_hidden, cfg.num_classes)   # W_sm on the LSTM state
        else:
            # W_sm (Sec. 3.3): O = W_sm V has no bias. A bias would let every evidence-free frame vote
            # for one "default" class, which TP cannot tell from evidence and p(f|S) would then spread.
            self.classifier = nn.Linear(cfg.frame_dim, cfg.num_classes, bias=False)

    def describe_frames(self, maps: torch.Tensor) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """(v (B, F, frame_dim), attention (B, F, heads, L) or None) for maps (B, F, L, D)."""
        if maps.shape[-1] != self.cfg.in_dim:
            raise ValueError(f"maps have D={maps.shape[-1]} channels but the heads expect in_dim="
                             f"{self.cfg.in_dim}; use heads trained on this features store")
        if self.spatial is None:
            return maps.mean(dim=2), None                                    # (B, F, D)
        return self.spatial(maps)

    def set_map_statistics(self, mean: torch.Tensor, std: torch.Tensor) -> bool:
        """Per-channel (D,) statistics of the training maps; forward standardises with them when the maps are
        off scale. Returns whether it does.

        Maps whose RMS lies in ``SANE_RMS`` are left exactly as they are (identity buffers): there the paper's
        setting trains well, and standardising would change its optimisation (on bench_mechanism's clips,
        per-channel standardisation dropped TP+SA from 0.975 to 0.71 accuracy in 12 epochs).
        """
        mean = torch.as_tensor(mean, dtype=self.map_mean.dtype)
        std = torch.as_tensor(std, dtype=self.map_std.dtype)
        rms = float(torch.sqrt((std.double() ** 2 + mean.double() ** 2).mean()))
        if SANE_RMS[0] <= rms <= SANE_RMS[1]:
            self.map_mean.zero_()
            self.map_std.fill_(1.0)
            return False
        self.map_mean.copy_(mean)
        self.map_std.copy_(std)
        return True

    def forward(self, maps: torch.Tensor, mask: torch.Tensor) -> HeadsOutput:
        maps = maps.to(self.classifier.weight.dtype)
        mask = mask.to(torch.bool)
        if maps.shape[-1] == self.cfg.in_dim:  # a wrong D is reported by describe_frames
            maps = (maps - self.map_mean.to(maps.dtype)) / self.map_std.to(maps.dtype)  # (B, F, L, D)
        frames, attn = self.describe_frames(maps)
        penalty = (attention_penalty(attn, mask) if self.cfg.spatial == "sa"
                   else maps.new_zeros(()))
        frames = self.dropout(frames)
        if self.cfg.pooling == "lstm":
            log_probs, weights, scores = self._lstm_pool(frames, mask)
        else:
            scores = self.classifier(frames)                                 # (B, F, E)
            if self.cfg.pooling == "tp":
                log_probs, weights, _ = softmax_pool(scores, mask)
            elif self.cfg.pooling == "avg":
                log_probs, weights = average_pool(scores, mask)
            else:
                log_probs, weights = max_pool(scores, mask)
        return HeadsOutput(log_probs, weights, scores, attn, penalty)

    def _lstm_pool(self, frames: torch.Tensor, mask: torch.Tensor):
        """LSTM over the present frames in time order; the last state gives p(c|S)."""
        b, f, _ = frames.shape
        order = torch.argsort((~mask).to(torch.int8), dim=1, stable=True)  # present frames first, in order
        packed_in = frames.gather(1, order[..., None].expand_as(frames))    # (B, F, frame_dim)
        lengths = mask.sum(dim=1).clamp_min(1).cpu()
        packed = pack_padded_sequence(packed_in, lengths, batch_first=True, enforce_sorted=False)
        steps, (h_n, _) = self.lstm(packed)
        steps, _ = pad_packed_sequence(steps, batch_first=True, total_length=f)  # (B, F, H)
        log_probs = F.log_softmax(self.classifier(h_n[-1]), dim=1)           # (B, E)
        step_scores = self.classifier(steps)                                 # (B, F, E) in packed order
        scores = torch.empty_like(step_scores).scatter_(1, order[..., None].expand_as(step_scores),
                                                        step_scores)         # back to time order
        scores = scores * mask[..., None]
        weights = mask.to(frames.dtype) / mask.sum(dim=1, keepdim=True).clamp_min(1)
        has_frame = mask.any(dim=1, keepdim=True)
        uniform = torch.full_like(log_probs, -math.log(log_probs.shape[1]))
        return torch.where(has_frame, log_probs, uniform), weights, scores

    def loss(self, out: HeadsOutput, labels: torch.Tensor, class_weight: Optional[torch.Tensor] = None
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(total, cross-entropy, penalty): -log p(y|S) + reg * penalty, each a scalar tensor.

        AVG trains with Eq. 7's frame-wise loss: the mean over present frames of -log p(y | frame);
        its frame weights are exactly those averaging weights (uniform over present frames).
        ``class_weight`` (E,): each clip's cross-entropy weighted by its class's weight, over the weights' sum.
        """
        if self.cfg.pooling == "avg":
            frame_logp = F.log_softmax(out.frame_scores, dim=2)             # (B, F, E)
            index = labels[:, None, None].expand(-1, frame_logp.shape[1], 1)
            picked = frame_logp.gather(2, index)[..., 0]                    # (B, F) log p(y | frame)
            per_clip = -(picked * out.frame_weights).sum(dim=1)             # (B,)
            w = torch.ones_like(per_clip) if class_weight is None else class_weight[labels]
            ce = (per_clip * w).sum() / w.sum()
        else:
            ce = F.nll_loss(out.log_probs, labels, weight=class_weight)
        reg = self.cfg.reg if self.cfg.spatial == "sa" else 0.0
        return ce + reg * out.penalty, ce, out.penalty


def load_heads(checkpoint_path, map_location="cpu") -> tuple[EmotionHeads, dict]:
    """Rebuild EmotionHeads from a checkpoint written by ``train_heads``.

    Arguments:
        checkpoint_path: ``best.pt`` or ``last.pt`` of a heads run.
        map_location: passed to torch.load.
    Returns: (model in eval mode, the checkpoint dict).

    >>> model, ckpt = load_heads("runs/heads/best.pt")  # doctest: +SKIP
    >>> ckpt["class_names"][:2]  # doctest: +SKIP
    ['Angry', 'Disgust']
    """
    path = Path(checkpoint_path)
    ckpt = read_checkpoint(path)
    try:
        model = EmotionHeads(HeadsConfig(**ckpt["heads_config"]))
        absent, unexpected = model.load_state_dict(ckpt["model"], strict=False)
    except (TypeError, ValueError, RuntimeError) as exc:
        raise CheckpointError(f"{path}: its heads do not fit its own config ({str(exc).splitlines()[0]});"
                              " the file is damaged or from another version") from exc
    absent = [k for k in absent if k not in ("map_mean", "map_std")]  # older checkpoints: no standardisation
    if absent or unexpected:
        raise CheckpointError(f"{path}: its weights do not fit its heads config (missing {absent},"
                              f" unexpected {unexpected}); the file is damaged or from another version")
    return model.eval(), ckpt


VIEW_KEYS = ("views",)  # how many views a features store caches: view 0 is the original face in every store, so
                       # the count never changes what heads read; any other provenance key does


def check_checkpoint_fits(store, ckpt: dict, checkpoint, view: int = 0) -> str:
    """Refuse features made otherwise than the ones a heads checkpoint was trained on, naming each setting.

    Arguments:
        store: an open ``cache.FeaturesStore``.
        ckpt: the checkpoint dict from ``load_heads``.
        checkpoint: its path, for the messages.
        view: the cached view that will be read (0: the original face).
    Returns:
        "" when the provenances agree; a note naming the view read when they differ only in the number of
        cached views. Raises StoreMismatch listing every differing key with both values: a faces store made
        otherwise is named by its settings (``faces store decode.max_frames: ...``) when both sides record them.

    >>> check_checkpoint_fits(store, ckpt, "runs/heads/best.pt")  # doctest: +SKIP
    ''
    """

    stored, trained = dict(store.provenance), dict(ckpt["provenance"])
    views = [(stored.pop(k, None), trained.pop(k, None)) for k in VIEW_KEYS][0]
    diffs = diff_settings(stored, trained, have="store has", want="the checkpoint has")
    if stored.get("faces_fingerprint") != trained.get("faces_fingerprint"):
        diffs = [d for d in diffs if not d.startswith("faces_fingerprint:")] + _faces_diffs(
            store.faces_config, ckpt.get("faces_config"), stored.get("faces_fingerprint"),
            trained.get("faces_fingerprint"))
    if diffs:
        raise StoreMismatch(f"{store.path}: its features were made otherwise than those {checkpoint} was trained on:"
                            "\n  " + "\n  ".join(diffs) + f"\n{checkpoint}: evaluate it on the features store it was"
                            " trained on (or one extracted with its settings), or train heads on this one")
    if views[0] != views[1]:
        return (f"note: {store.path} caches {views[0]} view(s) and {checkpoint} was trained on a store of"
                f" {views[1]}; only the count differs, so it reads view {view} of each clip"
                f" ({'the original face' if view == 0 else 'the mirrored face'}; --view picks another)")
    return ""


def _faces_diffs(store_faces: Optional[dict], ckpt_faces: Optional[dict], store_fp, ckpt_fp) -> list[str]:
    """The faces settings in which two faces stores differ, or their fingerprints where a side records none."""

    if store_faces is not None and ckpt_faces is not None:
        lines = diff_settings(store_faces, ckpt_faces, have="the store's faces have", want="the checkpoint's have")
        if lines:
            return [f"faces store {line}" for line in lines]
    which = "the checkpoint" if ckpt_faces is None else "the store"
    return [f"faces_fingerprint: the store has {str(store_fp)[:12]}..., the checkpoint has {str(ckpt_fp)[:12]}...:"
            f" their faces stores were made with other settings ({which} records no faces settings to name them;"
            " train heads with this version to record them)"]


SANE_RMS = (0.1, 10.0)  # RMS of maps the heads learn from as they are: fer ~0.5, real conv5 maps ~1; random VGG16
                        # maps (~0.06) or rescaled ones fall outside and are standardised


def map_statistics(chunks, in_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and std of maps given in chunks of (..., D) arrays (float64 sums, any count).

    A channel whose spread is below 1 % of the channels' mean spread (e.g. a ReLU channel that is always 0)
    gets that floor as its std, so it cannot blow up at test time.

    >>> m, s = map_statistics([np.array([[1.0, 10.0], [3.0, 10.0]])], 2)
    >>> m.tolist(), [round(v, 3) for v in s.tolist()]
    ([2.0, 10.0], [1.0, 0.005])
    """
    total = np.zeros(in_dim)
    squares = np.zeros(in_dim)
    count = 0
    for chunk in chunks:
        x = np.asarray(chunk, dtype=np.float64).reshape(-1, in_dim)
        total += x.sum(0)
        squares += np.square(x).sum(0)
        count += len(x)
    if count == 0:
        return torch.zeros(in_dim), torch.ones(in_dim)
    mean = total / count
    std = np.sqrt(np.maximum(squares / count - mean ** 2, 0.0))
    floor = max(1e-2 * float(std.mean()), 1e-12)
    return torch.from_numpy(mean).float(), torch.from_numpy(np.maximum(std, floor)).float()


__all__ = ["HeadsConfig", "HeadsOutput", "SpatialAttention", "ClusterAttention", "EmotionHeads",
           "attention_penalty", "softmax_pool", "average_pool", "max_pool", "load_heads", "map_statistics",
           "SANE_RMS", "check_checkpoint_fits"]
