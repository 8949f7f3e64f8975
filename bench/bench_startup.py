"""Start-up of every command: `--help` wall time, whole process, against the floor of an interpreter that only
imports click (what any click CLI pays), measured in the same run.

Prints, per command, the median of REPEATS runs, the ratio to the floor, whether torch/h5py were imported
(they must not be), and the limit the issue sets (1 s). The CPU flags head the output.

    .venv/bin/python bench/bench_startup.py
"""
from __future__ import annotations

import statistics
import subprocess
import sys
import time
from pathlib import Path

from emotion_attention.pipeline.core.runtime import cpu_flags

REPEATS = 5
LIMIT_S = 1.0
COMMANDS = [["emo-cache"], ["emo-cache", "check"], ["emo-cache", "faces"], ["emo-cache", "extract"],
            ["emo-cache", "salvage"], ["emo-cache", "merge"], ["emo-train"], ["emo-train", "heads"],
            ["emo-train", "cv"], ["emo-train", "ablate"], ["emo-train", "finetune"], ["emo-eval"], ["emo-predict"]]
MODULES = {"emo-cache": "emo_cache", "emo-train": "emo_train", "emo-eval": "emo_eval", "emo-predict": "emo_predict"}


def wall(argv: list[str]) -> float:
    t0 = time.perf_counter()
    subprocess.run(argv, check=True, capture_output=True)
    return time.perf_counter() - t0


def heavy(command: list[str]) -> str:
    code = (f"import sys\nfrom emotion_attention.cli.{MODULES[command[0]]} import main\n"
            f"try:\n    main({command[1:] + ['--help']!r})\nexcept SystemExit:\n    pass\n"
            "sys.stderr.write(' '.join(m for m in ('torch', 'h5py') if m in sys.modules))")
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stderr.strip() or "-"


def main() -> None:
    print(f"cpu flags: {cpu_flags()}")
    bin_dir = Path(sys.executable).parent
    floor = statistics.median(wall([sys.executable, "-c", "import click"]) for _ in range(REPEATS))
    print(f"floor (python -c 'import click'): {floor:.3f} s; limit {LIMIT_S:.1f} s; median of {REPEATS} runs")
    print(f"{'command':<28} {'--help s':>9} {'x floor':>8}  imports torch/h5py")
    worst = 0.0
    for command in COMMANDS:
        seconds = statistics.median(wall([str(bin_dir / command[0]), *command[1:], "--help"]) for _ in range(REPEATS))
        worst = max(worst, seconds)
        print(f"{' '.join(command) + ' --help':<28} {seconds:>9.3f} {seconds / floor:>8.2f}  {heavy(command)}")
    print(f"slowest --help: {worst:.3f} s ({'within' if worst < LIMIT_S else 'OVER'} the {LIMIT_S:.1f} s limit)")


if __name__ == "__main__":
    main()
