"""Train the heads on cached features (Sec. 4.2): the ``emo-train heads`` stage.

Model selection uses a stratified held-out part of the train split, never the validation split;
the run reports both the last epoch and the selected (best held-out) epoch. The epoch loop, checkpoints,
log, resume rule and SGDR stepping are ``pipeline.loop``'s, shared with ``emo-train finetune``.
"""
from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Iterator, Optional, Sequence

import numpy as np
import torch
from tqdm import tqdm

from emotion_attention.cache.errors import ConfigError
from emotion_attention.cache.features_store import FeaturesStore
from emotion_attention.pipeline.configs import HeadsConfig, HeadsRunConfig, TrainConfig
from emotion_attention.pipeline.core.runtime import Failure, FailureLog, available_memory, check_writable, resolve_device
from emotion_attention.pipeline.core.stage import Output, StageSummary, write_resolved_config
from emotion_attention.pipeline.data.folds import select_ids
from emotion_attention.pipeline.models.backbones import crop_map_grid
from emotion_attention.pipeline.models.checkpoint import (
    build_checkpoint,
    read_checkpoint,
    save_checkpoint,
)
from emotion_attention.pipeline.models.heads import EmotionHeads, map_statistics
from emotion_attention.pipeline.training.batches import ClipSource, estimate_bytes, holdout_split, pad_clips, prefetch
from emotion_attention.pipeline.training.loop import (
    check_finite,
    check_resume,
    run_epochs,
    select_row,
    sgd_step,
    sgdr,
    warn_if_majority,
)
from emotion_attention.pipeline.training.metrics import NoFrames, classification_metrics, predict_video

# Fields that may change when a run is resumed: they do not change what is learnt.
RESUMABLE = ("epochs", "device", "in_memory", "max_memory_gb", "prefetch")
STATS_SEED = 2**31 - 1  # the map-statistics draw has its own stream, apart from every epoch's


def epoch_batches(source: ClipSource, clip_ids: Sequence[str], labels: dict, cfg: TrainConfig, epoch: int
                  ) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]]:
    """(maps (B, F, L, D) float32, mask (B, F), labels (B,), clips skipped) for one epoch.

    The epoch's own generator (seed, epoch) draws the clip order, frames and views, so a resumed
    run sees exactly the batches an uninterrupted one would. Clips with no face frame are skipped.
    """
    rng = np.random.default_rng([cfg.seed, epoch])
    order = [clip_ids[i] for i in rng.permutation(len(clip_ids))]
    skipped = 0  # carried over when a whole batch had no face
    for start in range(0, len(order), cfg.batch_size):
        clips, ys = [], []
        for cid in order[start:start + cfg.batch_size]:
            view = int(rng.integers(source.num_views(cid))) if cfg.random_view else 0
            maps, present, _ = source.read(cid, cfg.frames_per_clip, view, rng)
            if len(present) == 0:
                skipped += 1
                continue
            if cfg.crop_cells:
                maps = random_grid_crop(maps, cfg.crop_cells, rng)
            clips.append((maps, present))
            ys.append(labels[cid])
        if clips:
            maps, mask = pad_clips(clips)
            yield maps, mask, torch.tensor(ys), skipped
            skipped = 0


def random_grid_crop(maps: np.ndarray, size: int, rng: np.random.Generator) -> np.ndarray:
    """(n, L, D) -> (n, size*size, D): one random window of the square map grid for all of a clip's frames.

    >>> random_grid_crop(np.zeros((2, 16, 3)), 2, np.random.default_rng(0)).shape
    (2, 4, 3)
    """
    grid = int(round(np.sqrt(maps.shape[1])))
    if grid * grid != maps.shape[1] or size > grid:
        raise ConfigError(f"crop_cells={size} needs a square grid of at least {size}x{size}; maps have L={maps.shape[1]}")
    top, left = (int(v) for v in rng.integers(0, grid - size + 1, size=2))
    return crop_map_grid(maps, grid, size, top, left)


def train_epoch(model: EmotionHeads, optimizer, scheduler, batches, epoch: int, num_batches: int,
                device: torch.device, grad_clip: float) -> dict:
    """One pass of SGD; the SGDR schedule advances by fractions of an epoch after every step.

    Raises ``pipeline.loop.Diverged`` on the first non-finite loss, before it reaches the weights.
    """
    model.train()
    sums = {"loss": 0.0, "ce": 0.0, "penalty": 0.0, "train_acc": 0.0}
    clips = skipped = 0
    bar = tqdm(batches, total=num_batches, desc=f"epoch {epoch + 1}", unit="batch", leave=False)
    for step, (maps, mask, labels, n_skipped) in enumerate(bar):
        maps = maps.to(device, non_blocking=True)
        mask, labels = mask.to(device), labels.to(device)
        out = model(maps, mask)
        total, ce, penalty = model.loss(out, labels)
        check_finite(total, epoch, step, optimizer.param_groups[0]["lr"])
        sgd_step(total, optimizer, scheduler, epoch + (step + 1) / num_batches, model.parameters(), grad_clip)
        n = len(labels)
        correct = (out.log_probs.argmax(1) == labels).sum()
        for key, value in (("loss", total * n), ("ce", ce * n), ("penalty", penalty * n), ("train_acc", correct)):
            sums[key] += float(value.detach())
        clips += n
        skipped += n_skipped
        bar.set_postfix(loss=f"{sums['loss'] / clips:.3f}")
    return {k: v / max(clips, 1) for k, v in sums.items()} | {"clips": clips, "skipped": skipped}


def map_stats_for(source: ClipSource, clip_ids: Sequence[str], cfg: TrainConfig, in_dim: int):
    """Per-channel (mean, std) of the training part's maps: ``frames_per_clip`` present frames of view 0 per
    clip (all with 0), drawn from their own seeded stream so every run and resume gets the same."""
    rng = np.random.default_rng([cfg.seed, STATS_SEED])
    chunks = (source.read(cid, cfg.frames_per_clip, 0, rng)[0] for cid in
              tqdm(clip_ids, desc="map statistics", unit="clip", leave=False))
    return map_statistics(chunks, in_dim)


def holdout_metrics(model: EmotionHeads, source: ClipSource, clip_ids: Sequence[str], labels: dict,
                    class_names: Sequence[str]) -> dict:
    """Accuracy, UAR and mean -log p(y|S) on the held-out clips, all present frames of view 0."""
    y_true, y_pred, nll = [], [], []
    for cid in clip_ids:
        maps, present, _ = source.read(cid, 0, 0, np.random.default_rng(0))
        try:
            out = predict_video(model, maps, present)
        except NoFrames:
            continue
        y_true.append(labels[cid])
        y_pred.append(out["pred"])
        nll.append(-np.log(max(float(out["probs"][labels[cid]]), 1e-12)))
    return classification_metrics(y_true, y_pred, class_names) | {"nll": float(np.mean(nll)) if nll else 0.0}


def check_configs(features_path, store: FeaturesStore, heads_cfg: HeadsConfig, clip_ids: Sequence[str]) -> None:
    """Stop before any work when the heads do not fit the store."""
    if not clip_ids:
        raise ConfigError(f"{features_path}: no complete clip in the train split; check the split names"
                         " (`emo-cache check`) or TrainConfig.train_split")
    d = store.shape(clip_ids[0])[3]
    if heads_cfg.in_dim != d or heads_cfg.num_classes != len(store.class_names):
        raise ConfigError(f"HeadsConfig(in_dim={heads_cfg.in_dim}, num_classes={heads_cfg.num_classes}) does not"
                         f" fit {features_path}: D={d}, {len(store.class_names)} classes {store.class_names}")


def choose_in_memory(store: FeaturesStore, clip_ids: Sequence[str], cfg: TrainConfig) -> bool:
    """Hold the store in RAM when asked, or ("auto") when it fits the ceiling and half the free RAM."""
    if cfg.in_memory != "auto":
        return cfg.in_memory == "always"
    need = estimate_bytes(store, clip_ids)
    return need <= cfg.max_memory_gb * 1e9 and need <= available_memory() / 2


def heads_config_for_store(features_path, **fields) -> HeadsConfig:
    """HeadsConfig with ``in_dim`` and ``num_classes`` read from the store and ``fields`` as given.

    >>> heads_config_for_store("feats.h5", heads=4, reg=0.1).in_dim  # doctest: +SKIP
    512
    """
    with FeaturesStore(features_path, "r") as store:
        ids = store.complete_ids()
        if not ids:
            raise ConfigError(f"{features_path}: the features store has no complete clip; run `emo-cache extract`")
        return store_heads_config(store, ids[0], **fields)


def store_heads_config(store: FeaturesStore, clip_id: str, **fields) -> HeadsConfig:
    """HeadsConfig sized for an open store: ``in_dim`` is ``clip_id``'s D, ``num_classes`` its class count.

    Arguments:
        store: an open FeaturesStore.
        clip_id: a complete clip whose maps give D.
        fields: any other HeadsConfig fields.
    Returns: HeadsConfig.

    >>> store_heads_config(store, store.complete_ids()[0], heads=4).num_classes  # doctest: +SKIP
    7
    """
    return HeadsConfig(in_dim=store.shape(clip_id)[3], num_classes=len(store.class_names), **fields)


def train_heads(features_path, out_dir, cfg: TrainConfig = TrainConfig(),
                heads_cfg: Optional[HeadsConfig] = None, resume: bool = True) -> dict:
    """Train EmotionHeads on the train split of a features store.

    Arguments:
        features_path: features store from ``emo-cache extract``.
        out_dir: run folder; gets last.pt, best.pt, log.csv, config.json, result.json.
        cfg: TrainConfig (paper defaults).
        heads_cfg: HeadsConfig; None builds the default one with the store's D and classes.
        resume: continue from out_dir/last.pt when it exists (the one resume rule: finished epochs are
            skipped, and other settings are refused naming each key; ``epochs`` may grow); False starts over.
    Returns: dict with ``last`` and ``selected`` epoch results, paths, and the split sizes.

    >>> result = train_heads("feats.h5", "runs/heads", TrainConfig(epochs=30))  # doctest: +SKIP
    >>> result["selected"]["epoch"], result["selected"]["holdout_acc"]  # doctest: +SKIP
    (27, 0.5)
    """
    out_dir = check_writable(out_dir)  # a read-only --out is one line before any work
    with FeaturesStore(features_path, "r") as store:
        class_names, provenance, faces_config = store.class_names, store.provenance, store.faces_config
        clip_ids = select_ids(store, split=cfg.train_split, fold=cfg.fold, part="train")
        if heads_cfg is None and clip_ids:
            heads_cfg = store_heads_config(store, clip_ids[0])
        check_configs(features_path, store, heads_cfg, clip_ids)
        labels = clip_labels(store, clip_ids, class_names, features_path)
        fit_ids, held_ids = holdout_split(clip_ids, [labels[c] for c in clip_ids], cfg.holdout_fraction, cfg.seed)
        device = resolve_device(cfg.device)
        in_memory = choose_in_memory(store, clip_ids, cfg)
        source = ClipSource(store, clip_ids, in_memory,
                            progress=lambda ids: tqdm(ids, desc="load store", unit="clip", leave=False))
        run = {"features": str(features_path), "heads_config": asdict(heads_cfg), "train_config": asdict(cfg),
               "class_names": class_names, "provenance": provenance, "faces_config": faces_config,
               "device": str(device),
               "in_memory": in_memory, "fit_clips": len(fit_ids), "holdout_clips": len(held_ids),
               "holdout_ids": held_ids}
        Output(out_dir).prepare()
        write_resolved_config(out_dir, "heads", [features_path], run | {"resume": resume})
        log_faceless(store, clip_ids, features_path, out_dir, "heads")
        history = fit(source, fit_ids, held_ids, labels, cfg, heads_cfg, run, out_dir, device, resume)
    result = summarise(history, cfg, out_dir, run | {"labels": labels})
    (out_dir / "result.json").write_text(json.dumps(result, indent=2))
    return result


def clip_labels(store: FeaturesStore, clip_ids: Sequence[str], class_names: Sequence[str], path) -> dict:
    """clip id -> class index, from each clip's ``label`` attribute (case-insensitive)."""
    index = {name.lower(): i for i, name in enumerate(class_names)}
    labels = {}
    for cid in clip_ids:
        label = str(store.attrs(cid).get("label", ""))
        if label.lower() not in index:
            raise ConfigError(f"{path}: clip {cid!r} has label {label!r}, not one of {list(class_names)}")
        labels[cid] = index[label.lower()]
    return labels


def build_training(heads_cfg: HeadsConfig, cfg: TrainConfig, device: torch.device):
    torch.manual_seed(cfg.seed)
    model = EmotionHeads(heads_cfg).to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum,
                                weight_decay=cfg.weight_decay)
    return model, optimizer, sgdr(optimizer, cfg.restart_epochs, cfg.restart_mult)


def settings_of(run: dict) -> dict:
    """What a heads checkpoint must match to be resumed: its configs and the store's provenance."""
    return {"heads_config": run["heads_config"], "train_config": run["train_config"],
            "provenance": run["provenance"]}


def resume_state(out_dir: Path, run: dict, model, optimizer, scheduler) -> tuple[int, list[dict], tuple]:
    """Load last.pt into the model/optimizer/scheduler; returns (next epoch, history, best score)."""
    path = out_dir / "last.pt"
    ckpt = read_checkpoint(path)
    check_resume(path, settings_of(ckpt), settings_of(run), RESUMABLE,
                 "Resume with the same settings (only --epochs, --device and the memory options may change),"
                 " or choose a new --out.")
    model.load_state_dict(ckpt["model"])
    optimizer.load_state_dict(ckpt["optimizer"])
    scheduler.load_state_dict(ckpt["scheduler"])
    return ckpt["epoch"] + 1, ckpt["history"], tuple(ckpt["best_score"])


class HeadsTask:
    """``pipeline.loop.TrainTask`` of the heads: batches of cached maps, held-out clips, last.pt / best.pt."""

    def __init__(self, model, optimizer, scheduler, source, fit_ids, held_ids, labels, cfg, run, out_dir, device):
        self.model, self.optimizer, self.scheduler = model, optimizer, scheduler
        self.source, self.fit_ids, self.held_ids, self.labels = source, fit_ids, held_ids, labels
        self.cfg, self.run, self.out_dir, self.device = cfg, run, out_dir, device

    def learning_rates(self) -> dict:
        return {"lr": self.optimizer.param_groups[0]["lr"]}

    def train_epoch(self, epoch: int) -> dict:
        torch.manual_seed(self.cfg.seed * 100_003 + epoch)  # dropout draws; resume-exact
        num_batches = -(-len(self.fit_ids) // self.cfg.batch_size)
        batches = prefetch(epoch_batches(self.source, self.fit_ids, self.labels, self.cfg, epoch), self.cfg.prefetch)
        return train_epoch(self.model, self.optimizer, self.scheduler, batches, epoch, num_batches, self.device,
                           self.cfg.grad_clip)

    def holdout(self, epoch: int):
        if not self.held_ids:
            return None
        return holdout_metrics(self.model, self.source, self.held_ids, self.labels, self.run["class_names"])

    def save(self, epoch: int, history: list, best: tuple, is_best: bool) -> None:
        run = self.run
        payload = build_checkpoint("heads", model=self.model.state_dict(), heads_config=run["heads_config"],
                                   train_config=run["train_config"], class_names=run["class_names"],
                                   provenance=run["provenance"], epoch=epoch, history=history, best_score=best,
                                   optimizer=self.optimizer.state_dict(), scheduler=self.scheduler.state_dict(),
                                   faces_config=run.get("faces_config"))
        if is_best:
            save_checkpoint(self.out_dir / "best.pt", payload)
        save_checkpoint(self.out_dir / "last.pt", payload)


def fit(source, fit_ids, held_ids, labels, cfg, heads_cfg, run, out_dir, device, resume) -> list[dict]:
    """The epoch loop (``pipeline.loop.run_epochs``): train, score the held-out clips, write last.pt/best.pt, log.csv."""
    model, optimizer, scheduler = build_training(heads_cfg, cfg, device)
    start, history, best = 0, [], (-1.0, 0.0)
    if resume and (out_dir / "last.pt").exists():
        start, history, best = resume_state(out_dir, run, model, optimizer, scheduler)
    elif heads_cfg.standardise:
        model.set_map_statistics(*map_stats_for(source, fit_ids, cfg, heads_cfg.in_dim))
    task = HeadsTask(model, optimizer, scheduler, source, fit_ids, held_ids, labels, cfg, run, out_dir, device)
    history, _ = run_epochs(task, start, cfg.epochs, history, best, cfg.selection_metric, out_dir / "log.csv",
                            desc="train heads")
    return history


def summarise(history: list[dict], cfg: TrainConfig, out_dir: Path, run: dict) -> dict:
    """Last-epoch and selected-epoch results (best held-out metric, then lower NLL, then earliest)."""
    has_holdout = history and history[-1]["holdout_acc"] != ""
    held_labels = [run["labels"][c] for c in run["holdout_ids"]] if "labels" in run else []
    warning = warn_if_majority(history, held_labels, run["class_names"], cfg.lr)
    return {"last": history[-1], "selected": select_row(history, cfg.selection_metric),
            "selection_metric": cfg.selection_metric,
            "selection": "held-out part of the train split" if has_holdout else "none (no holdout): last epoch",
            "checkpoint_last": str(out_dir / "last.pt"), "checkpoint_best": str(out_dir / "best.pt"),
            "log_csv": str(out_dir / "log.csv"), "config_json": str(out_dir / "config.json"),
            "device": run["device"], "in_memory": run["in_memory"],
            "fit_clips": run["fit_clips"], "holdout_clips": run["holdout_clips"], "warning": warning}


def log_faceless(store: FeaturesStore, clip_ids: Sequence[str], features_path, out_dir: Path, stage: str) -> None:
    """Name the clips with no face frame in the run's failure log: training leaves them out."""
    with FailureLog(Output(out_dir).failures_path) as flog:
        for cid in clip_ids:
            if store.read_present(cid).any():
                flog.succeeded(cid)
            else:
                flog.add(Failure(stage, str(features_path), cid, "no frame with a face; left out of training"))


def run(cfg: HeadsRunConfig, inputs: Sequence[Path], out: Path, *, log=print, progress: bool = True
        ) -> StageSummary:
    """Stage `heads`: train the heads on the features store ``inputs[0]`` into the run folder ``out``
    (last.pt, best.pt, log.csv, config.json, result.json, failures.jsonl); D and the classes come from the
    store. Resumes ``out/last.pt`` when its settings match."""
    cfg.validate()
    (features,) = inputs
    fields = {k: v for k, v in asdict(cfg.heads_config).items() if k not in ("in_dim", "num_classes")}
    result = train_heads(features, out, cfg.train_config, heads_config_for_store(features, **fields),
                         resume=cfg.resume)
    lines = [f"{name:>8}: epoch {result[name]['epoch']}  held-out acc {result[name]['holdout_acc']}"
             f"  UAR {result[name]['holdout_uar']}  loss {result[name]['loss']}" for name in ("last", "selected")]
    lines.append(f"selection: {result['selection']}; device {result['device']}; store in memory:"
                 f" {result['in_memory']}")
    lines.append(f"checkpoints: {result['checkpoint_best']} (selected), {result['checkpoint_last']} (last);"
                 f" log {result['log_csv']}")
    outputs = {"best": Path(result["checkpoint_best"]), "last": Path(result["checkpoint_last"]),
               "log": Path(result["log_csv"])}
    return StageSummary("heads", True, outputs, [], lines,
                        warnings=[f"warning: {result['warning']}"] if result.get("warning") else [], result=result)
