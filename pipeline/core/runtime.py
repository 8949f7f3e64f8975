"""Small helpers every stage shares: which device, whether bf16 is fast, a file's hash, the failure log.

torch is imported inside the functions that need it, so the faces stage, ``check`` and ``--help`` never
pay for it.
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional, TextIO

from emotion_attention.cache.errors import ConfigError


def check_writable(out: str | Path) -> Path:
    """Refuse, before any work, an output folder nothing can be written into; returns it as a Path.

    The test writes (and at once removes) an unnamed temporary file in the folder, or in its nearest existing
    parent when the folder is still to be made, so read-only mounts, ACLs and root on a read-only file system
    are all caught; nothing is created when it passes.

    >>> check_writable("runs/heads")  # doctest: +SKIP
    PosixPath('runs/heads')
    """
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"{out}: exists and is not a folder; choose another --out")
    probe = out
    while not probe.exists() and probe != probe.parent:  # the folder is made later, by the stage
        probe = probe.parent
    try:
        if not probe.is_dir():
            raise NotADirectoryError(20, f"{probe} is a file")
        with tempfile.TemporaryFile(dir=probe):
            pass
    except OSError as exc:
        raise ConfigError(f"{out}: folder not writable ({exc.strerror or exc}); choose another --out or fix the"
                          " folder's permissions") from None
    return out


def failure_log_path(out_path: str | Path) -> Path:
    """The JSONL failure log beside a store: ``faces.h5`` -> ``faces.h5.failures.jsonl``."""
    return Path(out_path).with_name(Path(out_path).name + ".failures.jsonl")


@dataclass(frozen=True)
class Failure:
    """One line of every stage's failure log (JSON lines): what failed, where, and why."""
    stage: str                 # "check", "faces", "extract", "eval", "predict", ...
    file: Optional[str]        # the input file or folder it is about
    clip_id: Optional[str]     # the clip id, when the failure is about one clip
    reason: str                # one line saying what is wrong and, where known, what to do

    def json(self) -> str:
        return json.dumps(asdict(self))


class FailureLog:
    """The failure log of one output: JSON lines of ``Failure``, appended run after run.

    Each record is flushed as it is added, so a kill loses none. A record already in the file is not written
    again, and a clip that this run completes (``succeeded``) is dropped from the file when the log closes, so
    the log lists what is still failed, with the reasons of every run that tried it.

    >>> import tempfile; path = Path(tempfile.mkdtemp()) / "out.h5.failures.jsonl"
    >>> with FailureLog(path) as log:
    ...     _ = log.add(Failure("faces", "a.avi", "Train/Happy/a.avi", "DecodeError: no frame"))
    ...     _ = log.add(Failure("faces", "b.avi", "Train/Happy/b.avi", "DecodeError: no frame"))
    >>> with FailureLog(path) as log:  # the next run: a.avi now works, b.avi fails the same way again
    ...     log.succeeded("Train/Happy/a.avi")
    ...     _ = log.add(Failure("faces", "b.avi", "Train/Happy/b.avi", "DecodeError: no frame"))
    >>> [json.loads(line)["clip_id"] for line in path.read_text().splitlines()]
    ['Train/Happy/b.avi']
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._seen = set(self._lines())
        self._done: set[str] = set()
        self._fh: Optional[TextIO] = open(self.path, "a")

    def _lines(self) -> list[str]:
        try:
            return [line for line in self.path.read_text().splitlines() if line.strip()]
        except FileNotFoundError:
            return []

    def add(self, failure: Failure) -> Failure:
        line = failure.json()
        if self._fh is not None and line not in self._seen:
            self._fh.write(line + "\n")
            self._fh.flush()
            self._seen.add(line)
        self._done.discard(failure.clip_id)
        return failure

    def succeeded(self, clip_id: str) -> None:
        """``clip_id`` is done now: its records of earlier runs leave the log when it closes."""
        self._done.add(clip_id)

    def close(self) -> None:
        if self._fh is None:
            return
        self._fh.close()
        self._fh = None
        if self._done:
            kept = [line for line in self._lines() if _clip_of(line) not in self._done]
            tmp = self.path.with_name(self.path.name + ".tmp")
            tmp.write_text("".join(line + "\n" for line in kept))
            os.replace(tmp, self.path)

    def __enter__(self) -> "FailureLog":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _clip_of(line: str) -> Optional[str]:
    try:
        return json.loads(line).get("clip_id")
    except ValueError:  # a line cut by a kill: kept as it is
        return None


def parse_shard(text: Optional[str]) -> Optional[tuple[int, int]]:
    """"K/N" -> (K, N) with 0 <= K < N; None stays None. A bad value is a ConfigError.

    >>> parse_shard("1/4")
    (1, 4)
    """
    if text is None:
        return None
    try:
        k, n = (int(part) for part in str(text).split("/"))
    except ValueError:
        raise ConfigError(f"--shard {text!r}: give K/N with 0 <= K < N, e.g. 0/4") from None
    if not 0 <= k < n:
        raise ConfigError(f"--shard {text!r}: K must be in 0..N-1 (shards are numbered from 0), e.g. 0/{max(n, 1)}")
    return k, n


def shard_of(clip_id: str, n: int) -> int:
    """Which of ``n`` shards a clip belongs to: a stable hash of its id (same on every machine, run and
    clip list), so a shard's rerun never moves a clip to another shard.

    >>> shard_of("Train/Happy/a.avi", 1)
    0
    """
    return int.from_bytes(hashlib.sha256(clip_id.encode()).digest()[:8], "big") % n


def select_shard(clip_ids, k: int, n: int) -> list:
    """The clip ids of shard ``k`` of ``n``, in their given order (about 1/n of them)."""
    return [cid for cid in clip_ids if shard_of(cid, n) == k]


def usable_cores() -> int:
    """Cores this process may run on (its CPU affinity), not the machine's count."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


# -- worker processes --------------------------------------------------------------------------------------
def worker_executor(workers: int):
    """joblib's reusable loky executor with ``workers`` processes, for the stages' clip work (faces, check):
    thread limits per worker (``worker_env``) and a watch that ends each worker when this process is gone
    (``watch_parent``). One executor per process, the one joblib's Parallel takes over too; loky's plain one
    would break it when both run in one process (a notebook, the tests)."""
    from joblib.executor import get_memmapping_executor  # lazy: joblib, only for several workers

    return get_memmapping_executor(workers, env=worker_env(workers), initializer=watch_parent,
                                   initargs=(os.getpid(),))


def watch_parent(parent: int, every: float = 0.5) -> None:
    """Worker initializer: end this worker soon after the process that started it is gone. A ``kill -9`` of
    ``emo-cache faces`` or ``check`` gives its workers no word, and loky's idle timeout never ends them then:
    they stayed, idle, holding a few hundred MB each, until the machine rebooted."""
    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(every)
        os._exit(0)  # nothing of a store is here: the writer that died owned every file

    threading.Thread(target=watch, name="watch-parent", daemon=True).start()


THREAD_VARS = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "BLIS_NUM_THREADS",
               "VECLIB_MAXIMUM_THREADS", "NUMBA_NUM_THREADS", "NUMEXPR_NUM_THREADS")


def worker_env(workers: int) -> dict:
    """Thread limits for the libraries inside each worker, as joblib's loky backend sets them (cores // workers,
    unless set here already): workers x threads never oversubscribe the cores. TBB coordinates over IPC."""
    threads = str(max(usable_cores() // workers, 1))
    env = {var: os.environ.get(var, threads) for var in THREAD_VARS}
    return {**env, "ENABLE_IPC": os.environ.get("ENABLE_IPC", "1")}


def resolve_device(name: str, local_rank: int = 0):
    """"auto" -> CUDA (``cuda:local_rank``) when torch sees a GPU, else CPU; CUDA asked for without one is an error.

    >>> resolve_device("cpu")
    device(type='cpu')
    """
    import torch  # lazy: torch is paid only when this runs

    if name == "auto":
        return torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise ConfigError(f"--device {name!r}: not a device; use auto, cpu, cuda or cuda:N") from exc
    if device.type not in ("cpu", "cuda"):
        raise ConfigError(f"--device {name!r}: only cpu and cuda are supported; use auto, cpu, cuda or cuda:N")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--device {name!r} asked for, but torch sees no CUDA GPU; use --device cpu or auto")
    return device


BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16")  # bf16 dot-product instructions; without them oneDNN emulates bf16


def cpu_has_bf16() -> bool:
    """True when oneDNN runs bf16 convolutions natively here (AVX512-BF16 or AMX), so bf16 is fast.

    oneDNN also "supports" bf16 on plain AVX-512 by emulation, which runs VGG16 about 4x slower than fp32
    (bench/bench_extract_io.py on an AVX-512 Xeon without AVX512-BF16): the CPU's own flags decide.
    """
    import torch  # lazy: torch is paid only when this runs

    mkldnn_check = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", None)
    if mkldnn_check is None or not mkldnn_check():
        return False
    flags = cpu_flags()
    return any(f in flags.split() for f in BF16_CPU_FLAGS) or flags.startswith("unknown")


def file_sha256(path: str | Path) -> str:
    """sha256 hex digest of a file, read in 1 MiB pieces (weights provenance).

    >>> len(file_sha256(Path(__file__)))
    64
    """
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def cpu_flags() -> str:
    """The CPU features that decide this project's speed (avx2, avx512*, amx*), for benchmark headers."""
    try:
        text = open("/proc/cpuinfo").read()
    except OSError:
        return "unknown (no /proc/cpuinfo)"
    line = next((ln for ln in text.splitlines() if ln.startswith("flags")), "flags:")
    wanted = sorted(f for f in line.split(":", 1)[1].split()
                    if f == "avx2" or f.startswith("avx512") or f.startswith("amx"))
    return " ".join(wanted) or "none of avx2/avx512/amx"


def concurrent_speedup(argv: list[str], copies: int = 2, rounds: int = 3) -> tuple[float, float, float]:
    """(seconds of one ``argv`` process alone, of ``copies`` of them at once, the speed-up ``copies`` x one /
    together): how much faster several processes finish a CPU-bound job on this machine now, whole processes with
    start-up included, after one untimed run (so the first timed one reads no file from disk); the best of
    ``rounds`` alternated timings each, as a VM's pace moves from minute to minute. Benchmarks of N workers
    measure against it: the ceiling those workers could reach here (a VM's cores may share a physical
    core or be paced by the host)."""
    import subprocess  # lazy: benchmarks only

    def together(n: int) -> float:
        start = time.perf_counter()
        procs = [subprocess.Popen(argv, stdout=subprocess.DEVNULL) for _ in range(n)]
        codes = [proc.wait() for proc in procs]
        if any(codes):
            raise RuntimeError(f"{' '.join(argv)} exited {codes}")
        return time.perf_counter() - start

    together(1)  # a warm-up, untimed: the job's files and modules in the page cache for both timed runs
    one = many = float("inf")
    for _ in range(rounds):
        one = min(one, together(1))
        many = min(many, together(copies))
    return one, many, copies * one / many


# -- memory the network's batches reuse ----------------------------------------------------------------
KEEP_FREED = 2 * 2**30  # bytes of freed memory at the top of malloc's heap kept for the next batch (M_TRIM_THRESHOLD)
_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4  # mallopt(3) parameter numbers, from glibc's <malloc.h>
# Set by the user, any of these means they chose their allocator's settings (or another allocator): left alone.
MALLOC_SETTINGS = ("MALLOC_MMAP_MAX_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_THRESHOLD_", "MALLOC_TOP_PAD_",
                   "GLIBC_TUNABLES", "LD_PRELOAD")


def reuse_freed_memory(environ=None, libc=None) -> bool:
    """Make glibc's malloc keep the blocks a batch frees for the next batch, instead of handing them back to the
    kernel and faulting them in again. True when applied.

    torch's CPU ops allocate and free their activations on every batch. glibc serves a block above its mmap
    threshold (at most 32 MB) with a fresh ``mmap`` that ``free`` unmaps, and gives the top of its heap back once
    it exceeds the trim threshold, so every batch pays a page fault per 4 KiB of its activations again. Measured
    on a 2-core EPYC VM (docs/benchmarks.md#malloc, bench/bench_malloc.py): fer-minixception's forward pass took
    1.6x as long inside ``emo-cache extract`` as alone (2.3 M minor faults), and the whole stage ran 2.1x faster
    with this. ``extract`` and ``predict`` call it; ``finetune`` does not (its peak memory grows with it: the
    docs offer the same settings as variables).

    ``mallopt(M_MMAP_MAX, 0)``: every block comes from the heap; ``mallopt(M_TRIM_THRESHOLD, KEEP_FREED)``: up
    to 2 GiB of freed heap stays for reuse. The process keeps about its peak memory instead of returning it
    between batches. Threads' own arenas still map blocks larger than their heaps (glibc falls back to ``mmap``
    there), so nothing can fail for want of an ``mmap``.

    Not applied where the C library is not glibc, or when the user set any of ``MALLOC_SETTINGS`` (their own
    malloc settings, or a preloaded allocator such as jemalloc): setting one, e.g. ``MALLOC_MMAP_MAX_=65536``
    (glibc's default), keeps glibc's default behaviour.
    """
    import ctypes  # lazy: only the stages that run a network tune their allocator

    environ = os.environ if environ is None else environ
    if any(environ.get(name) for name in MALLOC_SETTINGS):
        return False
    if libc is None:
        try:
            glibc = (os.confstr("CS_GNU_LIBC_VERSION") or "").startswith("glibc")
            libc = ctypes.CDLL("libc.so.6") if glibc else None
        except (ValueError, OSError):  # no such name (not glibc), or no libc.so.6
            libc = None
        if libc is None:
            return False
    return bool(libc.mallopt(_M_MMAP_MAX, 0)) and bool(libc.mallopt(_M_TRIM_THRESHOLD, KEEP_FREED))


# -- settings that must fit the machine ------------------------------------------------------------
def available_memory() -> int:
    """Bytes of memory available to new work (MemAvailable on Linux; physical free pages elsewhere)."""
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")


def check_memory_fits(what: str, per_worker: int, workers: int, fix: str) -> None:
    """ConfigError, before any work, when ``workers`` x ``per_worker`` bytes exceed the available memory.

    >>> check_memory_fits("--size 256", 1 << 20, 2, "use a smaller --size")
    """
    need, have = per_worker * workers, available_memory()
    if need > have:
        raise ConfigError(f"{what}: {workers} worker(s) would need about {need / 2**30:.1f} GiB of memory"
                          f" ({per_worker / 2**30:.2f} GiB each) but {have / 2**30:.1f} GiB is available; {fix}")


def warn_oversubscribed(workers: int, per_worker: int, log=print) -> bool:
    """Warn (and return True) when ``--workers`` exceeds the usable cores: it adds memory, not speed."""
    cores = usable_cores()
    if workers <= cores:
        return False
    log(f"warning: --workers {workers} is more than the {cores} usable core(s) of this process; each worker"
        f" holds about {per_worker / 2**20:.0f} MiB, so {workers} take about {workers * per_worker / 2**30:.2f} GiB"
        f" (of {available_memory() / 2**30:.1f} GiB available) and run no faster than {cores}")
    return True
