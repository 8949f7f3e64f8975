"""The one training loop, shared by ``emo-train heads`` and ``emo-train finetune``.

Both stages hand ``run_epochs`` a ``TrainTask`` (what one epoch of training, the held-out scoring and the
files of an epoch are for that stage); the loop owns what must be the same everywhere:

- one epoch numbering: log rows and messages count epochs from 1; a checkpoint's ``epoch`` is the 0-based
  index of the last finished epoch, so a resume starts at ``epoch + 1``;
- one SGDR stepping: ``CosineAnnealingWarmRestarts`` with T_0 in epochs, stepped after every batch to the
  fractional epoch ``epoch + (step + 1) / steps`` (``sgdr``, ``sgd_step``);
- one step: a non-finite loss stops the run with ``Diverged`` (a UserError naming epoch, step and lr) before
  it can reach the weights; optional gradient clipping; a GradScaler when autocast runs in fp16;
- one atomic checkpoint write (``save_checkpoint``: temp file + ``os.replace``) and one safe read
  (``load_torch_file``: weights only, a one-line UserError for a truncated or foreign file);
- one held-out selection rule (``selection_score``) and one log (``LOG_FIELDS``, rewritten whole each epoch);
- one resume rule: the settings diff the stores use (``cache.common.diff_settings``), in ``resume_diffs``;
- one end-of-run check: held-out accuracy that never beats the majority class gets a warning naming what to try.
"""
from __future__ import annotations

import csv
import math
import os
import time
import warnings
from pathlib import Path
from typing import Callable, Optional, Protocol, Sequence

import numpy as np
import torch
from tqdm import tqdm

from emotion_attention.cache.common import diff_settings
from emotion_attention.cache.errors import ConfigError, UserError

# One set of log columns for every training stage (a stage leaves the ones it has no figure for empty).
LOG_FIELDS = ["epoch", "loss", "ce", "penalty", "train_acc", "holdout_acc", "holdout_uar", "holdout_nll",
              "lr", "lr_backbone", "seconds", "clips", "skipped"]


class Diverged(UserError):
    """The loss became NaN or infinite: the learning rate is too high, or the inputs hold non-finite values."""


# -- files ------------------------------------------------------------------------------------------


def write_log(path: Path, history: Sequence[dict]) -> None:
    """log.csv with ``LOG_FIELDS``, one row per finished epoch, written whole (the history is in the checkpoint)."""
    tmp = Path(path).with_name(Path(path).name + ".tmp")
    with open(tmp, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=LOG_FIELDS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(history)
    os.replace(tmp, path)


# -- resume -------------------------------------------------------------------------------------------
def without_free(settings: dict, free: Sequence[str]) -> dict:
    """``settings`` without the ``free`` (resumable) fields, at the top and inside each nested config dict.

    >>> without_free({"a": {"x": 1, "epochs": 3}, "b": 2}, free=("epochs",))
    {'a': {'x': 1}, 'b': 2}
    """
    return {k: ({kk: vv for kk, vv in v.items() if kk not in free} if isinstance(v, dict) else v)
            for k, v in settings.items() if k not in free}


def resume_diffs(saved: dict, asked: dict, free: Sequence[str] = ()) -> list[str]:
    """Lines naming every setting a checkpoint was made with that this run asks differently (the stores' diff).

    >>> resume_diffs({"train_config": {"lr": 0.1}}, {"train_config": {"lr": 0.01}})
    ['train_config.lr: checkpoint has 0.1, this run asks for 0.01']
    """
    return diff_settings(without_free(saved, free), without_free(asked, free), have="checkpoint has")


def check_resume(path: Path, saved: dict, asked: dict, free: Sequence[str], what_to_do: str) -> None:
    """ConfigError naming what differs when ``asked`` cannot continue ``saved`` (``path``'s settings)."""
    diffs = resume_diffs(saved, asked, free)
    if diffs:
        raise ConfigError(f"cannot resume {path}: it was made with other settings:\n  " + "\n  ".join(diffs)
                          + f"\n{what_to_do}")


# -- optimisation ----------------------------------------------------------------------------------------
def sgdr(optimizer: torch.optim.Optimizer, restart_epochs: int, restart_mult: int):
    """SGDR (Loshchilov & Hutter): cosine cycles of ``restart_epochs`` epochs, stepped with fractional epochs."""
    return torch.optim.lr_scheduler.CosineAnnealingWarmRestarts(optimizer, T_0=restart_epochs, T_mult=restart_mult)


def sgdr_factor(position: float, restart_epochs: int, restart_mult: int) -> float:
    """SGDR's share of the base rate at epoch ``position`` (``CosineAnnealingWarmRestarts`` with eta_min 0).

    >>> sgdr_factor(0.0, 10, 1), sgdr_factor(5.0, 10, 1), round(sgdr_factor(10.0, 10, 1), 6)
    (1.0, 0.5, 1.0)
    """
    t_i = float(restart_epochs)
    t_cur = float(position)
    if restart_mult == 1:
        t_cur = t_cur % t_i
    else:
        while t_cur >= t_i:
            t_cur -= t_i
            t_i *= restart_mult
    return 0.5 * (1.0 + math.cos(math.pi * t_cur / t_i))


class PhasedSGDR:
    """SGDR whose base rates change between phases (fine-tuning: heads alone, then heads and backbone).

    ``phases`` are (first epoch, {param group name: base rate}); within a phase the rate is the phase's base rate
    times ``sgdr_factor`` of the epochs since the phase began, so each phase starts a fresh cosine cycle. A rate
    depends on the position alone, so a resumed run continues exactly; ``step(position)`` is stepped like ``sgdr``.
    One phase from epoch 0 is ``sgdr`` exactly.

    >>> opt = torch.optim.SGD([{"params": [torch.zeros(1, requires_grad=True)], "name": "heads"}], lr=0.1)
    >>> sched = PhasedSGDR(opt, [(0, {"heads": 0.1}), (2, {"heads": 0.01})], 10, 1)
    >>> sched.step(2.0); opt.param_groups[0]["lr"]
    0.01
    """

    def __init__(self, optimizer: torch.optim.Optimizer, phases: Sequence[tuple[int, dict]], restart_epochs: int,
                 restart_mult: int):
        self.optimizer, self.phases = optimizer, sorted(phases, key=lambda p: p[0])
        self.restart_epochs, self.restart_mult = restart_epochs, restart_mult
        self.position = 0.0
        self.step(0.0)

    def phase(self, position: float) -> tuple[int, dict]:
        return [p for p in self.phases if p[0] <= position + 1e-9][-1]

    def step(self, position: float) -> None:
        self.position = float(position)
        start, rates = self.phase(self.position)
        factor = sgdr_factor(self.position - start, self.restart_epochs, self.restart_mult)
        for group in self.optimizer.param_groups:
            group["lr"] = rates[group["name"]] * factor

    def state_dict(self) -> dict:
        return {"position": self.position}

    def load_state_dict(self, state: dict) -> None:
        self.step(state["position"])


def check_finite(loss: torch.Tensor, epoch: int, step: int, lr: float, world_size: int = 1,
                 option: str = "--lr") -> None:
    """Raise ``Diverged`` when ``loss`` (on any process, under DDP) is NaN or infinite."""
    bad = torch.tensor(0.0 if bool(torch.isfinite(loss.detach()).all()) else 1.0, device=loss.device)
    if world_size > 1:
        import torch.distributed as dist  # lazy: torch is paid only when this runs
        dist.all_reduce(bad)  # every rank stops together, none waits forever on the others
    if float(bad) > 0:
        raise Diverged(f"epoch {epoch + 1}, step {step + 1}: the loss is {float(loss.detach()):g} (not finite);"
                       f" training stopped before it reached the weights. The learning rate ({lr:g}) is too high"
                       f" for these features: pass a lower {option} (e.g. ten times lower), or check the store"
                       " for non-finite values. Checkpoints of finished epochs are kept.")


def sgd_step(loss: torch.Tensor, optimizer, scheduler, position: float, params=None, grad_clip: float = 0.0,
             scaler=None) -> None:
    """Backward, optional clipping, optimizer and scheduler step (SGDR to the fractional epoch ``position``)."""
    optimizer.zero_grad(set_to_none=True)
    if scaler is not None and scaler.is_enabled():
        scaler.scale(loss).backward()
        if grad_clip > 0:
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(params, grad_clip)
        scaler.step(optimizer)
        scaler.update()
    else:
        loss.backward()
        if grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(params, grad_clip)
        optimizer.step()
    scheduler.step(position)


# -- selection and the run's end --------------------------------------------------------------------------
def selection_score(row: dict, metric: str) -> tuple[float, float]:
    """(held-out accuracy or UAR, -held-out NLL): higher is better; the NLL breaks ties."""
    return float(row["holdout_acc" if metric == "acc" else "holdout_uar"]), -float(row["holdout_nll"])


def select_row(history: Sequence[dict], metric: str) -> dict:
    """The selected epoch: best held-out metric, then lower NLL, then earliest; the last without a held-out part."""
    if history and history[-1].get("holdout_acc", "") != "":
        return max(history, key=lambda r: (selection_score(r, metric), -r["epoch"]))
    return history[-1]


def majority_warning(history: Sequence[dict], held_labels: Sequence[int], class_names: Sequence[str],
                     lr: float) -> Optional[str]:
    """A warning when held-out accuracy never beat always answering the majority class, else None.

    >>> majority_warning([{"holdout_acc": 0.5}], [0, 0, 1, 1], ["a", "b"], 0.1)[:40]
    'held-out accuracy never beat the majorit'
    """
    if not held_labels or not history or history[-1].get("holdout_acc", "") == "":
        return None
    counts = np.bincount(np.asarray(held_labels), minlength=len(class_names))
    share = counts.max() / counts.sum()
    best = max(float(r["holdout_acc"]) for r in history)
    if best > share + 1e-9:
        return None
    return (f"held-out accuracy never beat the majority class (best {best:.1%}; always answering"
            f" {class_names[int(counts.argmax())]!r} scores {share:.1%}): these heads have learnt nothing usable."
            f" Try: a lower --lr (now {lr:g}) or more --epochs; --reg 0.1 if the penalty dominates the loss;"
            " checking the features (were the backbone weights random or of another layout?); or more"
            " training clips per class.")


# -- the loop -------------------------------------------------------------------------------------------
class TrainTask(Protocol):
    """What one stage does inside the shared loop."""

    def train_epoch(self, epoch: int) -> dict:
        """One pass over the training clips: {"loss", "ce", "penalty", "train_acc", "clips", "skipped"}."""

    def holdout(self, epoch: int) -> Optional[dict]:
        """{"accuracy", "uar", "nll"} on the held-out clips, or None without any."""

    def learning_rates(self) -> dict:
        """{"lr": heads' lr, "lr_backbone": backbone's lr or ""} at the epoch's start."""

    def save(self, epoch: int, history: list, best: tuple, is_best: bool) -> None:
        """Write the epoch's checkpoint(s) atomically (main process only)."""


def log_row(epoch: int, stats: dict, held: Optional[dict], lrs: dict, seconds: float) -> dict:
    """One log row with ``LOG_FIELDS`` (epoch counted from 1)."""
    rnd = lambda v: round(float(v), 6)  # noqa: E731
    return {"epoch": epoch + 1, **{k: rnd(stats[k]) for k in ("loss", "ce", "penalty", "train_acc")},
            "holdout_acc": rnd(held["accuracy"]) if held else "", "holdout_uar": rnd(held["uar"]) if held else "",
            "holdout_nll": rnd(held["nll"]) if held else "", "lr": lrs.get("lr", ""),
            "lr_backbone": lrs.get("lr_backbone", ""), "seconds": round(seconds, 3),
            "clips": int(stats["clips"]), "skipped": int(stats.get("skipped", 0))}


def collapse(history: Sequence[dict], metric: str, drop: float) -> Optional[str]:
    """Why training should stop: the last epoch's held-out score fell more than ``drop`` below the best so far.

    >>> collapse([{"epoch": 1, "holdout_acc": 0.8}, {"epoch": 2, "holdout_acc": 0.5}], "acc", 0.2)[:33]
    'held-out acc fell from 0.800 (epo'
    """
    if drop <= 0 or not history or history[-1].get("holdout_acc", "") == "":
        return None
    key = "holdout_acc" if metric == "acc" else "holdout_uar"
    top = max(history, key=lambda r: float(r[key]))
    last = float(history[-1][key])
    if float(top[key]) - last <= drop:
        return None
    return (f"held-out {metric} fell from {float(top[key]):.3f} (epoch {top['epoch']}) to {last:.3f} (epoch"
            f" {history[-1]['epoch']}), more than the guard's {drop:g}")


def epoch_line(row: dict, epochs: int) -> str:
    """The per-epoch progress line of every training stage: loss, train accuracy and the held-out columns."""
    held = (f", held-out acc {row['holdout_acc']:.3f} UAR {row['holdout_uar']:.3f} loss {row['holdout_nll']:.3f}"
            if row.get("holdout_acc", "") != "" else "")
    return f"epoch {row['epoch']}/{epochs}: loss {row['loss']:.4f}, train acc {row['train_acc']:.3f}{held} ({row['seconds']:.1f} s)"


def run_epochs(task: TrainTask, start: int, epochs: int, history: list, best: tuple, metric: str,
               log_path: Optional[Path], desc: str = "train", is_main: bool = True,
               sync: Callable[[], None] = lambda: None, log: Callable[[str], None] = lambda _m: None,
               stop: Callable[[list], Optional[str]] = lambda _h: None) -> tuple:
    """Epochs ``start .. epochs - 1``: train, score the held-out clips, save, log. Returns (history, best).

    ``best`` is the selection score of the best epoch so far ((-1, 0) before any); without held-out clips
    every epoch counts as better than the one before, so "best" is the last. ``stop(history)`` returning a
    reason ends the run after that epoch is saved (the same answer on every process: it reads the history).
    """
    for epoch in tqdm(range(start, epochs), desc=desc, unit="epoch", initial=start, total=epochs,
                      disable=not is_main):
        t0, lrs = time.perf_counter(), task.learning_rates()
        stats = task.train_epoch(epoch)
        held = task.holdout(epoch)
        row = log_row(epoch, stats, held, lrs, time.perf_counter() - t0)
        history.append(row)
        score = selection_score(row, metric) if held else (float(epoch), 0.0)
        is_best = score > best  # strictly: a tie goes to the lower held-out NLL, then the earlier epoch
        best = max(best, score)
        if is_main:
            task.save(epoch, history, best, is_best)
            if log_path is not None:
                write_log(log_path, history)
            log(epoch_line(row, epochs))
        sync()
        reason = stop(history)
        if reason:
            log(f"stopped after epoch {epoch + 1}: {reason}")
            break
    return history, best


def warn_if_majority(history: Sequence[dict], held_labels: Sequence[int], class_names: Sequence[str],
                     lr: float) -> Optional[str]:
    """Issue ``majority_warning`` as a UserWarning (and return it) when it applies."""
    message = majority_warning(history, held_labels, class_names, lr)
    if message:
        warnings.warn(message, UserWarning, stacklevel=2)
    return message
