"""The stage contract: what every stage shares, whatever its work.

Every stage module under ``pipeline/stages/`` exposes ``run(cfg, inputs, out, *, log, progress) ->
StageSummary``:

- ``cfg`` is the stage's frozen config (``pipeline/configs.py``), whose values were checked when it was built;
  ``run`` checks what needs the file system or the hardware once, before any work;
- ``inputs`` are the paths it reads, ``out`` the one output it writes (a store file or a run folder);
- ``log`` takes one line of text (``print``, or ``tqdm.write`` under a progress bar); ``progress`` shows bars;
- the summary holds ``ok``, the failures, the outputs and ``format()`` for the terminal.

One resume rule: finished work in ``out`` is skipped, and a changed setting is refused naming the key. One
failure log per output (``failures_path``), appended per run. One resolved-config file beside every output
(``config_path``), which ``--config FILE`` replays.

>>> Output("runs/faces.h5").config_path.name, Output("runs/heads").config_path.as_posix()
('faces.h5.config.json', 'runs/heads/config.json')
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

from emotion_attention.cache.errors import ConfigError
from emotion_attention.pipeline import __version__
from emotion_attention.pipeline.core.runtime import Failure, check_writable

STORE_SUFFIXES = (".h5", ".hdf5")  # an output with one of these suffixes is a store file, anything else a folder


@dataclass(frozen=True)
class Output:
    """Where a stage writes: a store file (``faces.h5``) or a run folder (``runs/heads``), and its two
    companions: the resolved config and the failure log."""
    path: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "path", Path(self.path))

    @property
    def is_store(self) -> bool:
        return self.path.suffix.lower() in STORE_SUFFIXES

    @property
    def config_path(self) -> Path:
        """``<store>.config.json`` beside a store; ``<folder>/config.json`` inside a run folder."""
        return self._companion("config.json")

    @property
    def failures_path(self) -> Path:
        """``<store>.failures.jsonl`` beside a store; ``<folder>/failures.jsonl`` inside a run folder."""
        return self._companion("failures.jsonl")

    def _companion(self, name: str) -> Path:
        return self.path.with_name(f"{self.path.name}.{name}") if self.is_store else self.path / name

    def check_writable(self) -> None:
        """ConfigError naming the folder when the output cannot be written there ("folder not writable"),
        checked before any work and without creating anything (``core.runtime.check_writable``)."""
        check_writable(self.path.parent if self.is_store else self.path)

    def prepare(self) -> Path:
        """``check_writable``, then create the folder the output goes in."""
        self.check_writable()
        (self.path.parent if self.is_store else self.path).mkdir(parents=True, exist_ok=True)
        return self.path


def write_resolved_config(out: Output | Path, stage: str, inputs: Sequence, record: dict) -> Path:
    """Write the resolved config of a run beside its output (atomically), so ``--config FILE`` replays it.

    Arguments:
        out: the stage's output.
        stage: the command that made it, e.g. "faces" or "heads".
        inputs: the paths the stage read.
        record: the stage's settings (each config under its key, e.g. ``{"config": asdict(cfg)}``) and
            whatever else it resolved (provenance, the device, class names).
    Returns: the file's path.
    """
    out = out if isinstance(out, Output) else Output(out)
    body = {"stage": stage, "version": __version__, "inputs": [str(p) for p in inputs], "out": str(out.path),
            **record}
    path = out.config_path
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(body, indent=2, default=str) + "\n")
    os.replace(tmp, path)
    return path


def read_resolved_config(path: Path, stage: str | Sequence[str]) -> dict:
    """The resolved config of an earlier run of ``stage`` (or of one of several stages whose settings it
    takes); ConfigError for a file of another stage or kind."""
    stages = (stage,) if isinstance(stage, str) else tuple(stage)
    path = Path(path)
    try:
        body = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ConfigError(f"--config {path}: cannot be read as a resolved config ({exc})") from exc
    if not isinstance(body, dict) or "stage" not in body:
        raise ConfigError(f"--config {path}: not a resolved config (no 'stage' key); pass the config.json a run"
                          " wrote beside its output")
    if body["stage"] not in stages:
        raise ConfigError(f"--config {path}: made by stage {body['stage']!r}, not {' or '.join(stages)}; pass it"
                          " to that stage's command")
    return body


@dataclass
class StageSummary:
    """What every stage returns: did it succeed, what failed, what it wrote, and its lines for the terminal."""
    stage: str
    ok: bool
    outputs: dict[str, Path] = field(default_factory=dict)   # name -> path of each file written
    failures: list[Failure] = field(default_factory=list)
    lines: list[str] = field(default_factory=list)            # format() joins them (stdout)
    warnings: list[str] = field(default_factory=list)         # one line each, for stderr
    result: Any = None                                        # the stage's own detailed result (dict, report)

    def format(self) -> str:
        """The stage's report for the terminal."""
        return "\n".join(self.lines)


def failure_lines(failures: Sequence[Failure], verb: str = "failed", limit: Optional[int] = None) -> list[str]:
    """One line per failure: ``  <verb> <clip or file>: <reason>`` (the first ``limit``, then a count)."""
    shown = list(failures)[:limit] if limit else list(failures)
    lines = [f"  {verb} {f.clip_id or f.file}: {f.reason}" for f in shown]
    if limit and len(failures) > limit:
        lines.append(f"  ... and {len(failures) - limit} more")
    return lines
