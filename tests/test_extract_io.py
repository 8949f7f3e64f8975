"""The extract host path: the store it writes is the old path's, byte for byte; its pieces (RGB decoding,
fletcher32 chunks, the CUDA path's overlap and double buffers, GPU decoding) on CPU."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
import zlib
from pathlib import Path

import cv2
import h5py
import numpy as np
import pytest
import torch

from emotion_attention.cache import FacesStore, FeaturesStore
from emotion_attention.cache.codecs import Codec
from emotion_attention.cache.common import fletcher32, fletcher32_numpy, write_chunks, writes_direct
from emotion_attention.pipeline.models.extractor import (
    FeatureExtractor,
    MapsBuffer,
    Pending,
    decode_jpegs_on,
    overlapped,
    to_rows,
)
from emotion_attention.pipeline.stages.extract import extract_features
from processes import alive
from test_extract import cfg, make_faces_store

REPO = Path(__file__).resolve().parents[1]
BASELINE = "7a0db73"  # the commit before the host path was rebuilt (bench/bench_extract_io.py's old path)
pytestmark = [pytest.mark.filterwarnings("ignore:backbone weights are random"),
              pytest.mark.filterwarnings("ignore:The image decoding and encoding capabilities:DeprecationWarning")]
QUIET = {"log": lambda m: None}


def video_chips(samples_dir: Path, n: int, size: int = 64) -> np.ndarray:
    cap, chips = cv2.VideoCapture(str(samples_dir / "WolfgangLanger_Pexels.mp4")), []
    while len(chips) < n:
        ok, bgr = cap.read()
        assert ok
        h, w = bgr.shape[:2]
        s = min(h, w)
        chips.append(cv2.cvtColor(cv2.resize(bgr[:s, (w - s) // 2:(w + s) // 2], (size, size)), cv2.COLOR_BGR2RGB))
    return np.stack(chips)


# -- the pieces ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("codec", [Codec("jpeg", 100, 75), Codec("jpeg", 90, 75), Codec("png")])
def test_decoding_straight_to_rgb_gives_the_pixels_of_bgr_then_swap(samples_dir, codec):
    for chip in video_chips(samples_dir, 12, 96):
        data = codec.encode(chip)
        old = cv2.cvtColor(cv2.imdecode(data, cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
        out = np.zeros_like(old)
        codec.decode_into(data, out)
        np.testing.assert_array_equal(out, old)
        np.testing.assert_array_equal(codec.decode(data), old)
    with pytest.raises(ValueError, match="do not decode"):
        codec.decode_into(np.frombuffer(b"not an image", np.uint8), out)


def test_fletcher32_is_hdf5s_and_direct_chunks_are_the_filters_bytes(tmp_path):
    rng = np.random.default_rng(0)
    for n in (2, 4, 8190, 8192, 262144, 100002):
        row = rng.integers(0, 256, n + 4, dtype=np.uint8)
        assert fletcher32(row, n) == fletcher32_numpy(row[:n])
    assert fletcher32_numpy(np.zeros(8, np.uint8)) == 0
    assert fletcher32_numpy(np.array([255, 255] * 4, np.uint8)) == 0xFFFFFFFF  # sums of 65535: 65535, not 0
    maps = rng.standard_normal((2, 5, 4, 8)).astype(np.float16)                 # (V, F, L, D)
    rows = np.zeros((5, 2 * 4 * 8 * 2 + 4), np.uint8)
    rows[:, :-4] = maps.transpose(1, 0, 2, 3).reshape(5, -1).view(np.uint8)
    with h5py.File(tmp_path / "x.h5", "w") as f:
        kw = {"shape": maps.shape, "dtype": np.float16, "chunks": (2, 1, 4, 8), "fletcher32": True, "fillvalue": 0}
        a, b = f.create_dataset("filter", **kw), f.create_dataset("direct", **kw)
        a[:, [0, 2, 3]] = maps[:, [0, 2, 3]]
        assert writes_direct(b) and not writes_direct(f.create_dataset("lzf", **{**kw, "compression": "lzf"}))
        write_chunks(b, np.array([0, 2, 3]), rows[[0, 2, 3]])
        for pos in (0, 2, 3):
            assert a.id.read_direct_chunk((0, pos, 0, 0)) == b.id.read_direct_chunk((0, pos, 0, 0))
        assert b.id.get_num_chunks() == 3  # the absent frame has no chunk, as with the filter
        np.testing.assert_array_equal(b[()], a[()])  # read back through the filter: the sums check


def test_maps_buffer_rows_are_the_chunks_of_the_store():
    buf = MapsBuffer.allocate(3, 2, 4, 8)
    maps = torch.randn(3, 2, 4, 8).half()
    buf.maps.copy_(maps)
    rows = buf.rows(3)
    assert rows.shape == (3, 2 * 4 * 8 * 2 + 4) and np.shares_memory(rows, buf.raw.numpy())
    for i in range(3):
        assert rows[i, :-4].tobytes() == maps[i].numpy().tobytes()
    np.testing.assert_array_equal(buf.views_first(2), maps[:2].numpy().transpose(1, 0, 2, 3))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_float16_rows_are_the_old_clamp_then_round_bit_for_bit(dtype):
    values = torch.tensor([0.0, 1.5, 3.1e-8, 65503.0, 65504.0, 65505.0, 65519.9, 65520.0, 7e4, 1e30, float("inf"),
                           float("nan"), -7e4, -1e9])
    maps = torch.cat([values, torch.randn(2 * 3 * 4 * 2 - len(values)) * 3e4]).to(dtype).view(2, 3, 4, 2)
    out = MapsBuffer.allocate(2, 3, 4, 2)
    to_rows(maps, out)
    old = maps.float().clamp_(max=65504.0).half()  # what forward_batch did before
    assert torch.equal(out.maps.view(torch.int16), old.view(torch.int16))


def test_overlapped_launches_batch_k_plus_1_before_waiting_for_batch_k():
    events = []

    class Late(Pending):
        def __init__(self, k):
            super().__init__(k)

        def wait(self):
            events.append(("wait", self.out))
            return self.out

    def launch(k):
        events.append(("launch", k))
        return Late(k)
    got = [(item, out) for item, out in overlapped(range(4), launch) if not events.append(("use", item))]
    assert got == [(k, k) for k in range(4)]
    assert events == [("launch", 0), ("launch", 1), ("wait", 0), ("use", 0), ("launch", 2), ("wait", 1), ("use", 1),
                      ("launch", 3), ("wait", 2), ("use", 2), ("wait", 3), ("use", 3)]
    assert list(overlapped([], launch)) == []


def test_jpeg_chips_decoded_in_one_batched_call_equal_the_hosts(samples_dir):
    codec = Codec("jpeg", 100, 75)
    chips = video_chips(samples_dir, 5)
    x = decode_jpegs_on([codec.encode(c) for c in chips], 8, torch.device("cpu"))  # the CUDA call, on CPU
    assert x.shape == (8, 64, 64, 3) and x.dtype == torch.uint8
    for i, chip in enumerate(chips):
        np.testing.assert_array_equal(x[i].numpy(), codec.decode(codec.encode(chip)))
    assert not x[5:].any()  # padding rows are zero


class DeferredStreams:
    """The CUDA path's streams on CPU: a download happens only when its event is waited for, after a random
    delay, so a buffer reused or written before its download finished shows up as wrong maps in the store."""

    def __init__(self):
        self.rng, self.lock, self.in_flight, self.most = np.random.default_rng(0), threading.Lock(), set(), 0

    def computed(self):
        return None

    def download(self, src, dst, after):
        streams = self
        with self.lock:
            assert id(dst) not in self.in_flight, "a MapsBuffer was handed out again before its download ended"
            self.in_flight.add(id(dst))
            self.most = max(self.most, len(self.in_flight))

        class Event:
            def synchronize(self):
                time.sleep(float(streams.rng.uniform(0, 0.01)))
                dst.copy_(src)
                with streams.lock:
                    streams.in_flight.discard(id(dst))
        return Event()


def test_the_cuda_schedule_on_cpu_writes_the_store_of_the_plain_loop(tmp_path, samples_dir, monkeypatch):
    """Overlap on, GPU-style JPEG decoding and deferred downloads into a ring of buffers: the same store."""
    make_faces_store(tmp_path / "faces.h5", samples_dir, n_clips=9, frames=7, config_extra={"codec": "jpeg"})
    extract_features(tmp_path / "faces.h5", tmp_path / "plain.h5", cfg(views=2, overlap="off"), **QUIET)
    streams = DeferredStreams()
    original_init = FeatureExtractor.__init__

    def with_deferred_streams(self, *args, **kwargs):
        original_init(self, *args, **kwargs)
        self.streams = streams
    monkeypatch.setattr(FeatureExtractor, "__init__", with_deferred_streams)
    monkeypatch.setattr(FeatureExtractor, "decodes_jpeg", property(lambda self: True))
    extract_features(tmp_path / "faces.h5", tmp_path / "cuda_schedule.h5", cfg(views=2, overlap="on", queue_clips=2),
                     **QUIET)
    assert streams.most >= 2  # downloads really overlapped
    assert same_stores(tmp_path / "plain.h5", tmp_path / "cuda_schedule.h5")


# -- the whole store, old path against new -------------------------------------------------------------

def dataset_signature(ds: h5py.Dataset) -> tuple:
    """What a reader can see or rely on: dtype, shape, chunking, filters, fill value, attributes, and the
    stored bytes of every chunk (checksums included) or of the whole contiguous data set."""
    dcpl = ds.id.get_create_plist()
    filters = tuple(dcpl.get_filter(i)[:3] for i in range(dcpl.get_nfilters()))
    if any(f[0] != h5py.h5z.FILTER_FLETCHER32 for f in filters):  # lzf: its output depends on uninitialised
        stored = zlib.crc32(ds[()].tobytes())                         # memory (liblzf's INIT_HTAB 0): the data
    elif ds.chunks is not None:
        stored = tuple(sorted((ds.id.get_chunk_info(i).chunk_offset,
                               zlib.crc32(ds.id.read_direct_chunk(ds.id.get_chunk_info(i).chunk_offset)[1]))
                              for i in range(ds.id.get_num_chunks())))
    else:
        stored = zlib.crc32(ds[()].tobytes()) if ds.size else 0
    return ds.dtype.str, ds.shape, ds.chunks, filters, repr(ds.fillvalue), stored, repr(dict(ds.attrs))


def store_signature(path: Path) -> dict:
    with h5py.File(path, "r") as f:
        sig = {"/": repr(dict(f.attrs))}
        for key in f:
            sig[key] = (repr(dict(f[key].attrs)), {name: dataset_signature(f[key][name]) for name in f[key]})
    return sig


def same_stores(a: Path, b: Path) -> bool:
    sa, sb = store_signature(a), store_signature(b)
    assert sa.keys() == sb.keys()
    for key in sa:
        assert sa[key] == sb[key], key
    return True


OLD_RUN = """
import json, sys
from emotion_attention.pipeline.configs import ExtractConfig
from emotion_attention.pipeline.stages.extract import extract_features
import emotion_attention.pipeline.stages.extract as module
assert module.__file__.startswith(sys.argv[1]), module.__file__  # the old code, not this tree
for out, kwargs in json.loads(sys.argv[2]):
    extract_features(sys.argv[3], out, ExtractConfig(**kwargs), log=lambda m: None)
"""


@pytest.fixture(scope="module")
def old_code(tmp_path_factory) -> Path:
    """The package at BASELINE, unpacked from git (skipped where the checkout has no git history)."""
    root = tmp_path_factory.mktemp("old")
    pkg = root / "emotion_attention"
    pkg.mkdir()
    archive = subprocess.run(["git", "-C", str(REPO), "archive", BASELINE, "pipeline", "cli", "cache"],
                             capture_output=True)
    if archive.returncode != 0:
        pytest.skip(f"the old code ({BASELINE}) is not in this checkout's git history: {archive.stderr[-200:]!r}")
    subprocess.run(["tar", "-x", "-C", str(pkg)], input=archive.stdout, check=True)
    return root


RUNS = {  # name: (settings, host I/O modes of the new path); the old path's run takes the same settings
    "v1": ({"views": 1}, ("off", "on")),
    "v2_b5_f3": ({"views": 2, "batch_size": 5, "frames_per_clip": 3}, ("off", "on")),
    "u8_lzf": ({"views": 2, "map_dtype": "uint8", "compression": "lzf"}, ("off",)),
}


@pytest.mark.parametrize("codec", ["jpeg", pytest.param("raw", marks=pytest.mark.slow)])
def test_the_new_path_writes_the_old_paths_store_byte_for_byte(tmp_path, samples_dir, old_code, codec):
    """Clips with absent frames, an empty clip and a faceless one, every store option: the same data sets,
    chunks (checksums included), filters and attributes, whether the host I/O runs in line or beside."""
    extra = {"codec": "jpeg"} if codec == "jpeg" else None
    make_faces_store(tmp_path / "faces.h5", samples_dir, n_clips=7, frames=9, config_extra=extra)
    base = {"weights": "random", "seed": 0, "input_size": 32, "batch_size": 4, "precision": "fp32"}
    runs = [(str(tmp_path / f"old_{name}.h5"), {**base, **kw}) for name, (kw, _) in RUNS.items()]
    done = subprocess.run([sys.executable, "-c", OLD_RUN, str(old_code), json.dumps(runs), str(tmp_path / "faces.h5")],
                          capture_output=True, text=True, env={"PYTHONPATH": str(old_code), "PATH": "/usr/bin:/bin"},
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    for name, (kw, overlaps) in RUNS.items():
        for overlap in overlaps:
            new = tmp_path / f"new_{name}_{overlap}.h5"
            extract_features(tmp_path / "faces.h5", new, cfg(**{**kw, "precision": "fp32", "overlap": overlap}),
                             **QUIET)
            assert same_stores(tmp_path / f"old_{name}.h5", new)
    with FacesStore(tmp_path / "faces.h5") as faces:  # the clips the test means to cover are there
        present = {cid: faces.read_present(cid) for cid in faces.complete_ids()}
    assert any(len(p) == 0 for p in present.values()) and any(len(p) and not p.any() for p in present.values())
    assert any(p.any() and not p.all() for p in present.values())


def test_overlap_writes_in_a_process_of_its_own_that_holds_no_lock_of_its_own(tmp_path, samples_dir, monkeypatch):
    """Overlap on: the features store is written by a child process (h5py holds the GIL through every call, so
    in one process reads and writes take turns); the parent keeps the writer lock, so a second writer is refused
    while the child writes; the child is gone when the run returns, and the store is the plain loop's."""
    from emotion_attention.cache import StoreLocked, writer_process

    make_faces_store(tmp_path / "faces.h5", samples_dir, n_clips=9, frames=7, config_extra={"codec": "jpeg"})
    extract_features(tmp_path / "faces.h5", tmp_path / "plain.h5", cfg(views=2, overlap="off"), **QUIET)
    seen, receive = {}, writer_process.WriterProcess._receive

    def receive_and_look(self):
        freed = receive(self)
        if self.committed and "refused" not in seen:
            seen["pid"] = self.proc.pid
            try:
                FeaturesStore(self.path, "a", provenance={"backbone": "x"})
            except StoreLocked as exc:
                seen["refused"] = str(exc)
        return freed
    monkeypatch.setattr(writer_process.WriterProcess, "_receive", receive_and_look)
    extract_features(tmp_path / "faces.h5", tmp_path / "child.h5", cfg(views=2, overlap="on", queue_clips=2), **QUIET)
    assert seen["pid"] != os.getpid() and f"pid {os.getpid()}" in seen["refused"]
    assert not alive(seen["pid"])
    assert same_stores(tmp_path / "plain.h5", tmp_path / "child.h5")
