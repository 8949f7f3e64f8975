"""Stage `extract`: backbone maps of every aligned face, from a faces store into a features store.

``FeatureExtractor`` is the in-memory part (uint8 faces in, float16 (V, N, L, D) maps out); it is used
without any store by ``emo-predict``. ``extract_features`` is the stage: faces store -> features store.

Speed (bench/bench_extract.py for the network, bench/bench_extract_io.py for everything around it):
- faces from many clips are packed into batches of exactly ``batch_size`` (the last one zero-padded), so a
  face's maps never depend on which faces shared its batch: a resumed run equals an uninterrupted one;
- channels_last memory format and bf16 weights/activations where the hardware supports bf16;
- the host path: a clip's mask and attributes are read once; a batch's encoded chips are read as bytes
  (crc32-checked) and decoded by a pool of one thread per core straight into the batch buffer (OpenCV
  releases the GIL); each face's maps land in a row laid out as its features-store chunk, which the store
  writes whole with its fletcher32 sum (no filter-pipeline copies); a clip is committed with its last piece;
- on CPU the host's work runs between batches (decoding batch k+1 while batch k is written), never beside
  the network, so the network keeps every core; on CUDA a feeder and a writer thread run beside it (the writer hands
  the store's writes to a process of its own, cache.writer_process: h5py holds the GIL through every call, so
  in one process the writes and the faces store's reads take turns), JPEG chips
  are decoded on the GPU, and the download of batch k (second stream, pinned double buffers) overlaps the
  compute of batch k+1; the store writes from the pinned memory.

Memory is bounded whatever the clip length: faces are read in pieces of at most ``batch_size`` and maps written
batch by batch into the clip's group (``FeaturesStore.begin_clip``), whose ``complete`` mark comes last.
Scale: ``--frames-per-clip`` and ``--map-dtype uint8`` shrink the store; ``--shard K/N`` and torchrun
(one rank per GPU, rank 0 merges) spread the work.
"""
from __future__ import annotations

import datetime
import json
import os
import queue
import shutil
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable, Iterable, Iterator, Optional, Sequence

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

from emotion_attention.cache import ConfigError, FacesStore, FeaturesStore, StoreDamaged, StoreFull, StoreMismatch
from emotion_attention.cache import writer_process
from emotion_attention.cache.common import same_clip_diffs
from emotion_attention.cache.features_store import apply_writes
from emotion_attention.cache.merge import merge_stores
from emotion_attention.pipeline.configs import ExtractConfig
from emotion_attention.pipeline.core.runtime import (
    Failure,
    FailureLog,
    failure_log_path,
    parse_shard,
    reuse_freed_memory,
    select_shard,
)
from emotion_attention.pipeline.core.stage import Output, StageSummary, write_resolved_config
from emotion_attention.pipeline.models.extractor import CHECKSUM_BYTES, FeatureExtractor, Pending, overlapped

DISK_MARGIN = 1.02  # refuse unless the free disk holds the planned bytes plus 2 % (HDF5 metadata, chunk index)


# What "auto" precision means per backbone is its registry entry's policy (pipeline.backbones.REGISTRY).


# -- the stage ---------------------------------------------------------------------------------
READ_ERRORS = (OSError, KeyError, ValueError, RuntimeError, StoreDamaged)  # a clip the faces store cannot give


def select_frames(present: np.ndarray, frames_per_clip: Optional[int]) -> np.ndarray:
    """Faces-store rows a clip keeps: every frame (None), or N present frames spread uniformly over them.

    Deterministic (np.linspace over the present frames, rounded), so a rerun keeps the same rows.

    >>> select_frames(np.array([1, 0, 1, 1, 1, 0, 1], bool), 3).tolist()
    [0, 3, 6]
    """
    if frames_per_clip is None:
        return np.arange(len(present))
    idx = np.flatnonzero(present)
    if len(idx) <= frames_per_clip:
        return idx
    return idx[np.rint(np.linspace(0, len(idx) - 1, frames_per_clip)).astype(np.int64)]


def bytes_per_row(views: int, L: int, D: int, map_dtype: str) -> int:
    """Bytes one kept frame takes in the features store (all views), before compression."""
    if map_dtype == "uint8":
        return views * (L * D + 2 * 2 * D)  # uint8 codes, float16 lo and scale per channel
    return views * L * D * 2                # float16


@dataclass
class ClipJob:
    """One clip to extract: which rows it keeps and which of them the network sees. Its faces travel in pieces
    of at most ``batch_size``; its maps are written as each batch is computed, so neither the clip's pixels
    nor its maps are ever in memory whole."""
    clip_id: str
    rows: np.ndarray         # int (F,): the faces-store rows the features store keeps, in time order
    present: np.ndarray      # bool (F,): the faces store's mask of those rows
    attrs: dict
    compute: np.ndarray      # int (P,): positions (in rows) of the present faces, the ones the network sees
    done: int = 0            # present faces written so far
    aborted: bool = False    # a piece could not be read or decoded: the clip is a failure, never committed
    begun: bool = False      # its group is begun in the features store (its first piece was planned)
    chips: object = None     # cache.faces_store.ChipReader while the clip is being read

    @property
    def finished(self) -> bool:
        return self.done == len(self.compute)


@dataclass
class Piece:
    """Faces ``start .. start + n - 1`` of a job's present faces, at consecutive rows of a batch."""
    job: ClipJob
    start: int
    n: int


@dataclass
class Batch:
    """Up to ``batch_size`` faces from one or more clips, in piece order; ``n`` rows of ``faces`` are real.

    ``faces`` is a uint8 (B, S, S, 3) buffer (rows past ``n`` zero), or on CUDA with GPU decoding the list of
    the encoded chips. ``decoding`` holds the thread-pool decodes still filling the buffer."""
    faces: object
    pieces: list = field(default_factory=list)
    n: int = 0
    decoding: list = field(default_factory=list)  # (job, future)

    def ready(self, failed: Callable[[ClipJob, str], None]) -> None:
        """Wait for the decodes; a chip that does not decode fails its clip (logged), the rest go on."""
        for job, future in self.decoding:
            try:
                future.result()
            except READ_ERRORS as exc:
                if not job.aborted:
                    failed(job, f"cannot read faces: {exc}")
        self.decoding = []


def plan_jobs(faces: FacesStore, todo: list[str], cfg: ExtractConfig) -> tuple[list, list[tuple[str, str]]]:
    """(jobs, unreadable) for the clips in ``todo``: each clip's mask and attributes read once, up front
    (the disk check needs the frame counts); a clip whose mask cannot be read is (clip id, why)."""
    jobs, unreadable = [], []
    for cid in todo:
        try:
            mask, attrs = faces.present_and_attrs(cid)
            mask = mask.astype(bool)
        except READ_ERRORS as exc:
            unreadable.append((cid, f"cannot read faces: {exc}"))
            continue
        rows = select_frames(mask, cfg.frames_per_clip)
        jobs.append(ClipJob(cid, rows, mask[rows], attrs, np.flatnonzero(mask[rows])))
    return jobs, unreadable


def plan_size(jobs: list[ClipJob], cfg: ExtractConfig, L: int, D: int) -> tuple[int, int, int]:
    """(frames, present faces, bytes) the jobs will take in the features store."""
    frames = sum(len(j.rows) for j in jobs)
    present = sum(len(j.compute) for j in jobs)
    return frames, present, frames * bytes_per_row(cfg.views, L, D, cfg.map_dtype)


def check_disk(out_path: Path, planned: int, log: Callable) -> None:
    """Print the planned size and the free disk; raise StoreFull when the output cannot fit."""
    free = shutil.disk_usage(out_path.parent).free
    log(f"extract: planned {planned / 2**30:.2f} GiB in {out_path} (uncompressed upper bound);"
        f" free disk {free / 2**30:.2f} GiB")
    if planned * DISK_MARGIN > free:
        raise StoreFull(f"{out_path}: needs about {planned * DISK_MARGIN / 2**30:.2f} GiB but only"
                        f" {free / 2**30:.2f} GiB are free; free space, choose another --out, or make it smaller"
                        " (--crop 224, --map-dtype uint8, --frames-per-clip N)")


class PhaseClock:
    """CPU seconds of the host's work by phase (read, checksum, decode, write), summed over threads; what
    bench/bench_extract_io.py prints as shares."""

    def __init__(self):
        self.seconds: dict[str, float] = {"read": 0.0, "checksum": 0.0, "decode": 0.0, "write": 0.0}
        self._lock = threading.Lock()

    def add(self, phase: str, seconds: float) -> None:
        with self._lock:
            self.seconds[phase] += seconds


class Feeder:
    """Turns jobs into batches: reads each piece's chips (the bytes, crc32-checked) and starts their decoding
    on the thread pool straight into the batch's buffer; on CUDA with GPU decoding it only collects the bytes.

    Arguments:
        faces: the faces store. cfg: the run's settings.
        buffers: a function giving an empty uint8 (B, S, S, 3) batch buffer (blocks while all are in use).
        pool: decoding threads (None: raw chips, or GPU decoding).
        failed: logs a clip that cannot be read (clip id, why).
    """

    def __init__(self, faces: FacesStore, cfg: ExtractConfig, buffers: Callable[[], object],
                 pool: Optional[ThreadPoolExecutor], failed: Callable[[ClipJob, str], None], clock: PhaseClock,
                 gpu_decode: bool):
        self.faces, self.cfg, self.buffers, self.pool = faces, cfg, buffers, pool
        self.failed, self.clock, self.gpu_decode = failed, clock, gpu_decode
        self.codec = faces.codec

    def batches(self, jobs: list[ClipJob], stop: Optional[threading.Event] = None) -> Iterator[Batch]:
        """Batches of exactly ``batch_size`` faces (the last one fewer), clips packed across batches;
        clips without a face ride along as empty pieces, so they are committed in order too."""
        b = self.cfg.batch_size
        batch = self._new_batch()
        for job in jobs:
            if stop is not None and stop.is_set():
                return
            if not len(job.compute):
                batch.pieces.append(Piece(job, 0, 0))
            start = 0
            while start < len(job.compute) and not job.aborted:
                take = min(b - batch.n, len(job.compute) - start)
                self._add(batch, job, start, take)
                start += take
                if batch.n == b:
                    yield batch
                    batch = self._new_batch()
        if batch.pieces:
            if not self.gpu_decode:
                batch.faces[batch.n:] = 0  # a reused buffer: the padding rows must be zero
            yield batch

    def _new_batch(self) -> Batch:
        return Batch([] if self.gpu_decode else self.buffers())

    def _add(self, batch: Batch, job: ClipJob, start: int, take: int) -> None:
        """Read faces start..start+take-1 of ``job`` into ``batch`` (decoding started); a read error fails the job."""
        frames = job.rows[job.compute[start:start + take]]
        try:
            if job.chips is None:
                job.chips = self.faces.open_chips(job.clip_id)
            chips = job.chips.read(frames, timed=self.clock.add)
        except READ_ERRORS as exc:
            job.chips = None
            self.failed(job, f"cannot read faces: {exc}")
            return
        if start + take == len(job.compute):
            job.chips = None  # read whole: its h5py objects go now
        at = batch.n
        batch.pieces.append(Piece(job, start, take))
        batch.n += take
        if self.gpu_decode:
            batch.faces.extend(chips)
        elif isinstance(chips, np.ndarray):  # raw chips
            batch.faces[at:at + take] = torch_from(chips)
        else:
            out = batch.faces.numpy()
            for i in range(0, take, DECODE_TASK):
                part = chips[i:i + DECODE_TASK]
                future = self.pool.submit(self._decode, part, out[at + i:at + i + len(part)], job.clip_id)
                batch.decoding.append((job, future))

    def _decode(self, rows: list, out: np.ndarray, clip_id: str) -> None:
        t = time.thread_time()
        try:
            for row, dst in zip(rows, out):
                self.codec.decode_into(row, dst)
        except ValueError as exc:
            raise self.faces.undecodable(clip_id, exc) from None
        finally:
            self.clock.add("decode", time.thread_time() - t)


DECODE_TASK = 4  # chips per thread-pool task: few hand-offs, and the pool's threads still share a batch


def torch_from(chips: np.ndarray):
    return torch.from_numpy(np.ascontiguousarray(chips))


class WriteTally:
    """Bytes still to write, for the StoreFull message; updated by the writer only."""

    def __init__(self, planned: int, row_bytes: int):
        self.remaining, self.row_bytes = planned, row_bytes

    def committed(self, job: ClipJob) -> None:
        self.remaining -= len(job.rows) * self.row_bytes


class Writer:
    """Writes batches of maps into the features store in piece order: a clip's group is begun at its first
    piece, its rows written straight from the MapsBuffer, and it is committed (mark last) with its last piece.
    A full disk becomes StoreFull naming the store and the bytes still needed.

    ``plan`` turns a batch into store operations (``cache.features_store.apply_writes``); they are applied here,
    or, with a ``WriterProcess``, sent to it (the overlapped path: h5py holds the GIL through every call, so the
    writes in a process of their own run beside this process's reads instead of taking turns with them).
    """

    def __init__(self, store: FeaturesStore, cfg: ExtractConfig, L: int, D: int, tally: WriteTally,
                 clock: PhaseClock, process=None):
        self.store, self.cfg, self.L, self.D, self.tally, self.clock = store, cfg, L, D, tally, clock
        self.compression = None if cfg.compression == "none" else cfg.compression
        self.process = process  # cache.writer_process.WriterProcess, or None: the writes happen here
        self.open: dict = {}    # clip id -> ClipWriter of the clips begun here and not yet committed
        self.ring: dict = {}    # buffer index -> MapsBuffer over the process's shared ring

    def plan(self, batch: Batch) -> tuple[list, list[ClipJob]]:
        """(the batch's store operations in order, the jobs they commit); marks the jobs' progress."""
        ops, finished, offset = [], [], 0
        for piece in batch.pieces:
            job = piece.job
            if not job.aborted:
                if not job.begun:
                    ops.append(("begin", job.clip_id, self.cfg.views, job.rows, self.L, self.D, self.compression,
                                self.cfg.map_dtype))
                    job.begun = True
                if piece.n:
                    ops.append(("faces", job.clip_id, job.compute[piece.start:piece.start + piece.n], offset,
                                piece.n))
                job.done += piece.n
                if job.finished:  # on its last piece (a clip without a face has one, empty)
                    finished.append(job)
            offset += piece.n
        if finished:  # committed together, two flushes for all (a short clip's flushes were most of its cost)
            ops.append(("commit", [(j.clip_id, j.present, clip_attrs(j.attrs)) for j in finished]))
        return ops, finished

    def write(self, batch: Batch, out) -> list:
        """Write ``batch``'s maps, row i of ``out`` (a MapsBuffer, None for a batch without faces) for its face i;
        returns the MapsBuffers free again (``out`` here; with a process, those it has written since)."""
        ops, finished = self.plan(batch)
        remaining = self.tally.remaining
        for j in finished:
            self.tally.committed(j)
        if self.process is not None:
            freed = self.process.send(None if out is None else out.index, batch.n, ops, remaining)
            return [self.ring[i] for i in freed]
        apply_writes(self.store, self.open, ops, None if out is None else out.rows(batch.n), remaining,
                     self.clock.add)
        return [] if out is None else [out]

    def buffers(self, count: int, fx: FeatureExtractor) -> list:
        """``count`` MapsBuffers for the overlapped path: over the process's shared ring, or the extractor's."""
        if self.process is None:
            return [fx.maps_buffer() for _ in range(count)]
        self.ring = {i: fx.maps_buffer(self.process.buffers[i], i) for i in range(len(self.process.buffers))}
        return list(self.ring.values())

    def finish(self) -> list:
        """The buffers still with the process, once written; the process closes the store and ends."""
        if self.process is None:
            return []
        freed = self.process.finish()
        for phase, seconds in self.process.seconds.items():
            self.clock.add(phase, seconds)
        self.process = None
        return [self.ring[i] for i in freed]

    def close(self) -> None:
        """The clips in flight when a run stops: their h5py objects go before the stores close (not at
        interpreter exit); a writer process still running is ended, its uncommitted clips lost as with a kill."""
        self.open.clear()
        if self.process is not None:
            self.process.stop()
            self.process = None


def clip_attrs(attrs: dict) -> dict:
    """The faces-store clip attributes the features store keeps."""
    return {k: attrs[k] for k in ("label", "split", "source", "fps", "total_frames", "folds", "decoded_frames",
                                   "truncated") if k in attrs}  # folds: one features store serves every fold


def refuse_same_path(faces_path: Path, out_path: Path) -> None:
    """--out must not be the faces store being read (checked before anything is written)."""
    same = out_path.resolve() == faces_path.resolve() or (
        out_path.exists() and faces_path.exists() and os.path.samefile(out_path, faces_path))
    if same:
        raise ConfigError(f"--out {out_path} is the faces store this run reads ({faces_path}); give the features"
                          " store its own path, e.g. features.h5")


def torchrun_rank() -> Optional[tuple[int, int]]:
    """(RANK, WORLD_SIZE) when started by torchrun with more than one process, else None."""
    if "RANK" in os.environ and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        return int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    return None


def shard_path(out_path: Path, rank: int, world: int) -> Path:
    """``features.h5`` -> ``features.shard-1-of-4.h5``: where rank 1 of 4 writes under torchrun."""
    return out_path.with_name(f"{out_path.stem}.shard-{rank}-of-{world}{out_path.suffix}")


def extract_features(faces_path, out_path, cfg: ExtractConfig, log: Callable = print) -> dict:
    """Stage `extract`: maps of every complete clip of a faces store, into a features store.

    Complete clips already in the output are skipped (resume); a different backbone setting or faces
    store is refused with the differing provenance keys named. Absent frames get zero maps. With
    ``cfg.shard = "K/N"`` only shard K's clips are done. Started by torchrun (WORLD_SIZE > 1), each rank
    extracts its shard into ``shard_path(out)`` on its own GPU, and rank 0 merges the shards into ``out``.

    Arguments:
        faces_path: faces store (``emo-cache faces``).
        out_path: features store to create or extend; ``<out>.config.json`` gets the resolved config.
        cfg: ExtractConfig.
        log: where one-line messages go.
    Returns:
        summary dict: clips_total, clips_skipped, clips_written, failures, frames, faces, seconds,
        faces_per_s, planned_bytes, out, provenance (and shards, under torchrun).

    >>> extract_features("runs/faces.h5", "runs/features.h5",
    ...                  ExtractConfig(weights="vgg_face_dag.pth", views=2))  # doctest: +SKIP
    """
    cfg.validate()
    faces_path, out_path = Path(faces_path), Path(out_path)
    refuse_same_path(faces_path, out_path)
    ranked = torchrun_rank()
    if ranked is not None and cfg.shard is None:
        return extract_ranked(faces_path, out_path, cfg, log, *ranked)
    return extract_store(faces_path, out_path, cfg, log)


def check_same_faces_store(faces, store, faces_path: Path, out_path: Path, sample: int = 64) -> None:
    """StoreMismatch when the features store ``out_path`` already holds clips of another faces store made with the
    same settings (the provenance's fingerprint hashes settings, so it cannot tell two datasets apart): up to
    ``sample`` of its clips, spread over it, must be in ``faces`` with the same source file, length and rate."""
    done = store.complete_ids()
    for cid in done[::max(1, len(done) // sample)]:
        want = store.attrs(cid)
        diffs = (same_clip_diffs(want, faces.attrs(cid), "this faces store's") if faces.is_complete(cid)
                 else [f"{faces_path} has no clip {cid!r}"])
        if diffs:
            raise StoreMismatch(f"{out_path}: holds features of another faces store made with the same settings"
                                f" (clip {cid!r}: {'; '.join(diffs)}); extract {faces_path} into another --out,"
                                " or give the faces store these features came from")


def extract_store(faces_path: Path, out_path: Path, cfg: ExtractConfig, log: Callable) -> dict:
    """One process, one device, one output store (the whole store or ``cfg.shard``)."""
    shard = parse_shard(cfg.shard)
    with FacesStore(faces_path, "r") as faces:
        fx = FeatureExtractor(cfg)
        prov = fx.provenance(faces.fingerprint)
        class_names = list(faces.config.get("class_names", []))
        with FeaturesStore(out_path, "a", provenance=prov, class_names=class_names, log=log,
                           shard=cfg.shard, faces_config=faces.config) as store:
            check_same_faces_store(faces, store, faces_path, out_path)
            write_resolved_config(out_path, "extract", [faces_path], {"config": asdict(cfg), "provenance": prov})
            all_ids = faces.complete_ids()
            if shard is not None:
                all_ids = select_shard(all_ids, *shard)
            todo = [cid for cid in all_ids if not store.is_complete(cid)]
            L, D = fx.spec.L, fx.spec.D
            jobs, unreadable = plan_jobs(faces, todo, cfg)
            frames, present, planned = plan_size(jobs, cfg, L, D)
            log(f"extract: {len(all_ids)} clips in {faces_path}{f' (shard {cfg.shard})' if shard else ''},"
                f" {len(all_ids) - len(todo)} already done, {len(todo)} to do: {frames} frames x"
                f" {bytes_per_row(cfg.views, L, D, cfg.map_dtype)} bytes/frame ({present} faces to compute;"
                f" {fx.spec.name}, {fx.precision}, {fx.device}, maps {cfg.map_dtype})")
            check_disk(out_path, planned, log)
            t0, clock = time.perf_counter(), PhaseClock()
            failures = run_pipeline(fx, faces, store, jobs, present, out_path, planned, unreadable, clock)
            seconds = time.perf_counter() - t0
    failed_ids = {f["clip_id"] for f in failures}
    with FailureLog(failure_log_path(out_path)) as flog:  # clips done now leave the log of earlier runs
        for cid in todo:
            if cid not in failed_ids:
                flog.succeeded(cid)
    if failures:
        log(f"extract: {len(failures)} clips failed; see {failure_log_path(out_path)}")
    return {"clips_total": len(all_ids), "clips_skipped": len(all_ids) - len(todo),
            "clips_written": len(todo) - len(failures), "failures": failures, "frames": frames,
            "faces": present, "seconds": seconds, "faces_per_s": present / seconds if seconds > 0 else 0.0,
            "planned_bytes": planned, "out": str(out_path), "provenance": prov,
            "host_seconds": {k: round(v, 3) for k, v in clock.seconds.items()}}


def extract_ranked(faces_path: Path, out_path: Path, cfg: ExtractConfig, log: Callable, rank: int,
                   world: int) -> dict:
    """Under torchrun: this rank's shard into its own store, a barrier, then rank 0 merges every shard."""
    own = shard_path(out_path, rank, world)
    summary = extract_store(faces_path, own, replace(cfg, shard=f"{rank}/{world}"), log)
    created = not dist.is_initialized()
    if created:  # gloo: a CPU barrier works whatever the device; the wait covers the slowest rank's extract
        dist.init_process_group("gloo", timeout=datetime.timedelta(days=7))
    try:
        dist.barrier()
        shards = [shard_path(out_path, r, world) for r in range(world)]
        if rank == 0:
            merge_stores(out_path, shards, log=log)
            log(f"extract: rank 0 merged {world} shards into {out_path} (the shard stores are kept beside it)")
        dist.barrier()  # no rank returns before the merged store exists
    finally:
        if created:
            dist.destroy_process_group()
    return {**summary, "out": str(out_path), "shard_out": str(own), "rank": rank, "world_size": world}


def run_pipeline(fx: FeatureExtractor, faces: FacesStore, store: FeaturesStore, jobs: list[ClipJob],
                 n_faces: int, out_path: Path, planned: int = 0, unreadable: Iterable[tuple[str, str]] = (),
                 clock: Optional[PhaseClock] = None) -> list[dict]:
    """Read, decode, compute and write every job; returns the failed clips (also in the failure log).

    On CPU (``overlap`` auto/off) one thread runs the loop and the decoding pool fills batch k+1 while batch k
    is written: the host's work never runs beside the network, whose threads keep every core. On CUDA (or
    ``overlap on``) a feeder thread reads and decodes ahead, this thread keeps the device busy, and a writer
    thread writes finished batches (``run_overlapped``).
    """
    cfg = fx.cfg
    clock = clock or PhaseClock()
    failures: list[dict] = []
    lock = threading.Lock()  # failures come from the feeder thread too

    def fail_clip(clip_id: str, message: str) -> None:
        with lock, FailureLog(failure_log_path(out_path)) as flog:  # the one schema (core.runtime.Failure)
            failures.append(asdict(flog.add(Failure("extract", str(faces.path), clip_id, message))))

    def fail_job(job: ClipJob, message: str) -> None:
        job.aborted = True
        fail_clip(job.clip_id, message)

    for clip_id, message in unreadable:
        fail_clip(clip_id, message)
    L, D = fx.spec.L, fx.spec.D
    gpu_decode = fx.decodes_jpeg and faces.codec.name == "jpeg"
    threads = cfg.decode_threads or len(os.sched_getaffinity(0))
    overlap = cfg.overlap == "on" or (cfg.overlap == "auto" and fx.cuda)
    chip_shape = faces.chip_shape()
    process = None
    if overlap and writer_process.available() and jobs:  # the writes in a process of their own, beside the reads
        row = cfg.views * L * D * 2 + CHECKSUM_BYTES  # a MapsBuffer row
        process = writer_process.WriterProcess(store, ring_size(cfg), cfg.batch_size, row)
    writer = Writer(store, cfg, L, D, WriteTally(planned, bytes_per_row(cfg.views, L, D, cfg.map_dtype)), clock,
                    process)
    try:
        with ThreadPoolExecutor(threads, thread_name_prefix="extract-decode") as pool, \
                tqdm(total=n_faces, unit="face", desc="extract", smoothing=0.1) as bar:
            run = run_overlapped if overlap else run_inline
            run(fx, jobs, lambda buffers: Feeder(faces, cfg, buffers, None if gpu_decode else pool, fail_job, clock,
                                                 gpu_decode), writer, chip_shape, bar, fail_job)
    finally:
        writer.close()
        for job in jobs:  # the clips in flight when a run stops: their h5py objects go before the stores close,
            job.chips = None  # not at interpreter exit
        fx.release_buffers()
    return failures


def ring_size(cfg: ExtractConfig) -> int:
    """MapsBuffers of the overlapped path: queued, being filled or written, launched twice over."""
    return cfg.queue_clips + 3


def run_inline(fx: FeatureExtractor, jobs: list[ClipJob], feeder: Callable, writer: Writer, chip_shape: tuple,
               bar, failed: Callable) -> None:
    """One thread: read batch k+1 and start its decoding, write batch k while the pool decodes, then compute
    k+1 with every core. One input buffer and one MapsBuffer serve the whole run; the writes happen here (a
    writer process would run beside the network and take its cores)."""
    buffer, out = fx.faces_buffer(chip_shape), fx.maps_buffer()
    previous: Optional[Batch] = None
    for batch in feeder(lambda: buffer).batches(jobs):
        if previous is not None:
            writer.write(previous, out if previous.n else None)
        batch.ready(failed)
        if batch.n:
            fx.launch(batch.faces, out).wait()
            bar.update(batch.n)
        previous = batch
    if previous is not None:
        writer.write(previous, out if previous.n else None)


def run_overlapped(fx: FeatureExtractor, jobs: list[ClipJob], feeder: Callable, writer: Writer,
                   chip_shape: tuple, bar, failed: Callable) -> None:
    """Three threads: a feeder reads and decodes up to ``queue_clips`` batches ahead, this thread launches
    each batch (``overlapped``: batch k+1 is launched before batch k is waited for) and a writer thread writes
    them. Buffers circulate through queues of free ones, which bounds memory and paces the feeder. The first
    error of any thread stops all three and is raised here."""
    depth = fx.cfg.queue_clips
    stop, errors = threading.Event(), []
    free_faces: queue.Queue = queue.Queue()
    free_maps: queue.Queue = queue.Queue()
    for _ in range(ring_size(fx.cfg)):
        free_faces.put(fx.faces_buffer(chip_shape))
    for buffer in writer.buffers(ring_size(fx.cfg), fx):
        free_maps.put(buffer)
    to_compute: queue.Queue = queue.Queue(maxsize=depth)
    to_write: queue.Queue = queue.Queue(maxsize=depth)

    def guarded(work: Callable[[], None]) -> Callable[[], None]:
        def run() -> None:
            try:
                work()
            except Stopped:
                pass
            except Exception as exc:  # noqa: BLE001 - handed to the main thread, which re-raises it
                errors.append(exc)
                stop.set()
        return run

    def feed() -> None:
        for batch in feeder(lambda: take(free_faces, stop)).batches(jobs, stop):
            batch.ready(failed)
            give(to_compute, batch, stop)
        give(to_compute, None, stop)

    def write() -> None:
        for batch, out in iter(lambda: take(to_write, stop), None):
            for buffer in writer.write(batch, out):
                free_maps.put(buffer)
        for buffer in writer.finish():
            free_maps.put(buffer)

    def launch(batch: Batch) -> Pending:
        return fx.launch(batch.faces, take(free_maps, stop)) if batch.n else Pending(None)

    threads = [threading.Thread(target=guarded(feed), name="extract-feeder", daemon=True),
               threading.Thread(target=guarded(write), name="extract-writer", daemon=True)]
    for t in threads:
        t.start()
    try:
        for batch, out in overlapped(iter(lambda: take(to_compute, stop), None), launch):
            if not isinstance(batch.faces, list):
                free_faces.put(batch.faces)  # computed, so uploaded: the buffer can be refilled
            bar.update(batch.n)
            give(to_write, (batch, out), stop)
        give(to_write, None, stop)
    except Stopped:
        pass  # another thread failed: its error is raised below
    except BaseException:
        stop.set()
        raise
    finally:
        for t in threads:
            t.join()
    if errors:
        raise errors[0]


class Stopped(Exception):
    """A queue operation gave up because the run is stopping (another thread failed)."""


def take(q: queue.Queue, stop: threading.Event):
    """q.get(); Stopped once ``stop`` is set."""
    while True:
        try:
            return q.get(timeout=0.05)
        except queue.Empty:
            if stop.is_set():
                raise Stopped from None


def give(q: queue.Queue, item, stop: threading.Event) -> None:
    """q.put(item); Stopped once ``stop`` is set."""
    while True:
        try:
            q.put(item, timeout=0.05)
            return
        except queue.Full:
            if stop.is_set():
                raise Stopped from None


def run(cfg: ExtractConfig, inputs: Sequence[Path], out: Path, *, log=print, progress: bool = True
        ) -> StageSummary:
    """Stage `extract`: backbone maps of every face of the faces store ``inputs[0]`` into the features store
    ``out`` (resumable; failures in ``<out>.failures.jsonl``, the resolved config in ``<out>.config.json``)."""
    (faces_path,) = inputs
    Output(out).check_writable()
    reuse_freed_memory()  # each batch's activations reused, not faulted in again (core.runtime)
    summary = extract_features(faces_path, out, cfg, log=log)
    failures = [Failure(**f) for f in summary["failures"]]
    lines = [json.dumps({k: v for k, v in summary.items() if k != "provenance"}, indent=1)]
    return StageSummary("extract", not failures, {"store": Path(out)}, failures, lines, result=summary)
