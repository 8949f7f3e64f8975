"""Stage `extract` at scale: chunked reads and writes, --frames-per-clip, 8-bit maps, shards, torchrun,
a disk that fills mid-run, and --out checks."""
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from emotion_attention.cache import ConfigError, FacesStore, FeaturesStore, StoreError, StoreFull, StoreMismatch
from emotion_attention.cache.faces_store import ChipReader
from emotion_attention.cache.features_store import ClipWriter, dequantise, quantise
from emotion_attention.pipeline.stages.extract import bytes_per_row, extract_features, select_frames, shard_path
from emotion_attention.pipeline.core.runtime import parse_shard, select_shard, shard_of
from test_extract import cfg, make_faces_store, read_all

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.filterwarnings("ignore:backbone weights are random")
QUIET = {"log": lambda m: None}


def test_a_clip_is_read_and_written_in_chunks_of_batch_size(tmp_path, samples_dir, monkeypatch):
    clips = make_faces_store(tmp_path / "faces.h5", samples_dir, n_clips=3, frames=21)
    whole = extract_features(tmp_path / "faces.h5", tmp_path / "whole.h5", cfg(batch_size=64), **QUIET)
    reads, writes = [], []
    read, write_faces = ChipReader.read, ClipWriter.write_faces
    monkeypatch.setattr(ChipReader, "read", lambda self, frames, timed=None: (
        reads.append(len(frames)), read(self, frames, timed))[1])
    monkeypatch.setattr(ClipWriter, "write_faces", lambda self, positions, rows, timed=None: (
        writes.append(len(rows)), write_faces(self, positions, rows, timed))[1])
    chunked = extract_features(tmp_path / "faces.h5", tmp_path / "chunked.h5", cfg(batch_size=4), **QUIET)
    assert max(reads) == 4 and sum(reads) == chunked["faces"] == whole["faces"]
    assert max(writes) <= 4 and sum(writes) == chunked["faces"]
    a, b = read_all(tmp_path / "whole.h5"), read_all(tmp_path / "chunked.h5")
    assert sorted(a) == sorted(clips)
    for cid in a:  # batch size never changes a face's maps (each batch is padded to its fixed size)
        np.testing.assert_array_equal(a[cid][0], b[cid][0])
        np.testing.assert_array_equal(a[cid][1], b[cid][1])


def test_select_frames_spreads_n_over_the_present_frames():
    present = np.zeros(100, bool)
    present[10:90] = True
    rows = select_frames(present, 16)
    assert len(rows) == 16 and present[rows].all() and (np.diff(rows) > 0).all()
    assert (rows[0], rows[-1]) == (10, 89) and set(np.diff(rows)) <= {5, 6}  # uniform: 79 / 15 = 5.27
    np.testing.assert_array_equal(select_frames(present, 200), np.arange(10, 90))  # fewer present: all of them
    np.testing.assert_array_equal(select_frames(present, None), np.arange(100))
    assert select_frames(np.zeros(5, bool), 3).tolist() == []


def test_frames_per_clip_keeps_the_rows_of_the_full_store(tmp_path, samples_dir):
    clips = make_faces_store(tmp_path / "faces.h5", samples_dir, n_clips=4, frames=9)
    extract_features(tmp_path / "faces.h5", tmp_path / "all.h5", cfg(), **QUIET)
    summary = extract_features(tmp_path / "faces.h5", tmp_path / "four.h5", cfg(frames_per_clip=4), **QUIET)
    assert summary["provenance"]["frames_per_clip"] == 4
    full = read_all(tmp_path / "all.h5")
    with FeaturesStore(tmp_path / "four.h5") as store, FeaturesStore(tmp_path / "all.h5") as all_store:
        assert store.provenance["frames_per_clip"] == 4 and all_store.provenance["frames_per_clip"] is None
        for cid, arrays in clips.items():
            rows = store.source_rows(cid)
            np.testing.assert_array_equal(rows, select_frames(arrays["present"], 4))
            maps, present = store.read_clip(cid)
            assert maps.shape[1] == len(rows) == min(4, int(arrays["present"].sum()))
            assert present.all()
            np.testing.assert_array_equal(maps, full[cid][0][:, rows])
            np.testing.assert_array_equal(all_store.source_rows(cid), np.arange(len(arrays["present"])))
    with pytest.raises(StoreMismatch, match="frames_per_clip: store has 4, this run asks for 3"):
        extract_features(tmp_path / "faces.h5", tmp_path / "four.h5", cfg(frames_per_clip=3), **QUIET)


def test_quantise_round_trip_is_within_half_a_step():
    rng = np.random.default_rng(0)
    x = (rng.gamma(1.0, 3.0, (2, 5, 16, 8)) * (rng.random((1, 1, 1, 8)) > 0.3)).astype(np.float16)
    codes, lo, scale = quantise(x)
    assert codes.dtype == np.uint8 and lo.shape == scale.shape == (2, 5, 8)
    back = dequantise(codes, lo, scale).astype(np.float32)
    step = scale.astype(np.float32)[:, :, None, :]
    err = np.abs(back - x.astype(np.float32))
    assert (err <= step / 2 + 1e-3 * np.abs(x.astype(np.float32)) + 1e-6).all()
    assert not back[x == 0].any() or (x.max(axis=2) == 0).any()  # all-zero channels come back exactly zero
    zero = np.zeros((1, 2, 4, 3), np.float16)
    np.testing.assert_array_equal(dequantise(*quantise(zero)), zero)


def test_uint8_maps_halve_the_bytes_and_read_back_as_float16(tmp_path, samples_dir):
    clips = make_faces_store(tmp_path / "faces.h5", samples_dir, n_clips=4, frames=8)
    extract_features(tmp_path / "faces.h5", tmp_path / "f16.h5", cfg(views=2), **QUIET)
    summary = extract_features(tmp_path / "faces.h5", tmp_path / "u8.h5", cfg(views=2, map_dtype="uint8"), **QUIET)
    assert summary["provenance"]["map_dtype"] == "uint8"
    f16, u8 = read_all(tmp_path / "f16.h5"), read_all(tmp_path / "u8.h5")
    for cid, arrays in clips.items():
        a, b = f16[cid][0].astype(np.float32), u8[cid][0]
        assert b.dtype == np.float16 and b.shape == a.shape
        np.testing.assert_array_equal(u8[cid][1], arrays["present"])
        assert not b[:, ~arrays["present"]].any()  # absent frames stay exactly zero
        if a.size and np.abs(a).max() > 0:
            assert np.abs(b.astype(np.float32) - a).max() / np.abs(a).max() < 1e-2
    with FeaturesStore(tmp_path / "u8.h5") as store:  # row and view selection dequantise the same way
        cid = "Train/Angry/000.avi"
        maps, present = store.read_clip(cid, frames=np.array([5, 0, 5]), views=[1])
        np.testing.assert_array_equal(maps, u8[cid][0][[1]][:, [5, 0, 5]])
    import h5py
    with h5py.File(tmp_path / "u8.h5", "r") as u, h5py.File(tmp_path / "f16.h5", "r") as f:
        for key in f:  # on disk: maps at 1 byte a value, plus 2 x float16 per (view, frame, channel)
            if f[key]["maps"].size:
                v, n, _, d = f[key]["maps"].shape
                u_bytes, f_bytes = u[key]["maps"].id.get_storage_size(), f[key]["maps"].id.get_storage_size()
                assert 0 <= 2 * u_bytes - f_bytes <= 4 * n  # up to fletcher32's 4 bytes per chunk (= frame)
                assert u[key]["map_scale"].shape == u[key]["map_lo"].shape == (v, n, d)
    # at the paper's L = 256, D = 512 that is (256 + 4) / 512 = 0.51 of float16's bytes per frame
    assert bytes_per_row(2, 256, 512, "uint8") / bytes_per_row(2, 256, 512, "float16") == (256 + 4) / 512


def test_shards_split_the_clips_and_merge_into_the_unsharded_store(tmp_path, samples_dir):
    clips = make_faces_store(tmp_path / "faces.h5", samples_dir, n_clips=8, frames=5)
    extract_features(tmp_path / "faces.h5", tmp_path / "whole.h5", cfg(), **QUIET)
    parts = []
    for k in range(2):
        out = tmp_path / f"part{k}.h5"
        summary = extract_features(tmp_path / "faces.h5", out, cfg(shard=f"{k}/2"), **QUIET)
        ids = set(read_all(out))
        assert ids == set(select_shard(sorted(clips), k, 2)) and summary["clips_written"] == len(ids)
        parts.append(ids)
    assert parts[0] | parts[1] == set(clips) and not parts[0] & parts[1] and all(parts)
    with pytest.raises(StoreMismatch, match="shard 0/2"):  # a shard's store takes no other shard
        extract_features(tmp_path / "faces.h5", tmp_path / "part0.h5", cfg(shard="1/2"), **QUIET)
    from emotion_attention.cache.merge import merge_stores
    merge_stores(tmp_path / "merged.h5", [tmp_path / "part0.h5", tmp_path / "part1.h5"])
    assert_same_stores(tmp_path / "merged.h5", tmp_path / "whole.h5")


def assert_same_stores(a_path: Path, b_path: Path) -> None:
    a, b = read_all(a_path), read_all(b_path)
    assert sorted(a) == sorted(b)
    for cid in b:
        np.testing.assert_array_equal(a[cid][0], b[cid][0])
        np.testing.assert_array_equal(a[cid][1], b[cid][1])
    with FeaturesStore(a_path) as x, FeaturesStore(b_path) as y:
        assert x.provenance == y.provenance and x.class_names == y.class_names
        for cid in b:
            assert x.attrs(cid) == y.attrs(cid)


def test_shard_rule():
    assert parse_shard("1/3") == (1, 3) and parse_shard(None) is None
    for bad in ("3/3", "1", "a/b", "-1/2"):
        with pytest.raises(ConfigError, match="--shard"):
            parse_shard(bad)
    ids = [f"Train/Happy/{i}.avi" for i in range(300)]
    sizes = [len(select_shard(ids, k, 3)) for k in range(3)]
    assert sum(sizes) == 300 and min(sizes) > 70  # about a third each
    assert all(shard_of(i, 3) == shard_of(i, 3) for i in ids[:5])


def test_torchrun_two_ranks_shard_and_merge_into_out(tmp_path, samples_dir):
    """`torchrun --nproc-per-node 2 emo-cache extract` on CPU (gloo): two shard stores, merged by rank 0."""
    pytest.importorskip("emotion_attention.cache.merge", reason="emo-cache merge (cache/merge.py) is not in this tree yet")
    make_faces_store(tmp_path / "faces.h5", samples_dir, n_clips=6, frames=5)
    extract_features(tmp_path / "faces.h5", tmp_path / "whole.h5", cfg(), **QUIET)
    emo_cache = Path(sys.executable).with_name("emo-cache")
    args = [str(emo_cache), "extract", str(tmp_path / "faces.h5"), "--out", str(tmp_path / "feats.h5"),
            "--weights", "random", "--seed", "0", "--input-size", "32", "--batch-size", "4", "--device", "cpu"]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           "--no-python", *args], cwd=tmp_path, capture_output=True, text=True, timeout=240,
                          env={**env, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "merged 2 shards" in done.stdout + done.stderr
    for r in range(2):
        assert shard_path(tmp_path / "feats.h5", r, 2).exists()
    assert_same_stores(tmp_path / "feats.h5", tmp_path / "whole.h5")


def test_out_equal_to_the_faces_store_is_refused_before_writing(tmp_path, samples_dir):
    make_faces_store(tmp_path / "faces.h5", samples_dir, n_clips=2)
    before = (tmp_path / "faces.h5").read_bytes()
    for out in (tmp_path / "faces.h5", tmp_path / "sub" / ".." / "faces.h5"):
        with pytest.raises(ConfigError, match="is the faces store this run reads"):
            extract_features(tmp_path / "faces.h5", out, cfg(), **QUIET)
    os.link(tmp_path / "faces.h5", tmp_path / "hard.h5")
    with pytest.raises(ConfigError, match="is the faces store"):
        extract_features(tmp_path / "faces.h5", tmp_path / "hard.h5", cfg(), **QUIET)
    make_faces_store(tmp_path / "other.h5", samples_dir, n_clips=1)  # another faces store as --out
    other = (tmp_path / "other.h5").read_bytes()
    with pytest.raises(StoreError, match="faces store"):
        extract_features(tmp_path / "faces.h5", tmp_path / "other.h5", cfg(), **QUIET)
    assert (tmp_path / "faces.h5").read_bytes() == before and (tmp_path / "other.h5").read_bytes() == other
    assert sorted(p.name for p in tmp_path.iterdir() if "config" in p.name) == []


FULL_DISK_SCRIPT = textwrap.dedent("""
    import json, shutil, subprocess, sys
    from pathlib import Path
    import emotion_attention.pipeline.stages.extract as ex
    from emotion_attention.cache import FeaturesStore, StoreFull
    faces, disk, keep = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3])
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4180k", "tmpfs", str(disk)], check=True)
    ex.check_disk = lambda *a: None  # as if another process filled the disk after the up-front check
    cfg = ex.ExtractConfig(weights="random", seed=0, input_size=32, batch_size=4, overlap=sys.argv[4])
    out, report = disk / "feats.h5", {}
    try:
        ex.extract_features(faces, out, cfg, log=lambda m: None)
        report["first"] = "finished"
    except StoreFull as exc:
        report["first"] = str(exc)
    with FeaturesStore(out) as store:
        report["committed"] = store.complete_ids()
    shutil.copy(out, keep / "after_full.h5")
    subprocess.run(["mount", "-o", "remount,size=20m", str(disk)], check=True)
    summary = ex.extract_features(faces, out, cfg, log=lambda m: None)
    report["rerun"] = {k: summary[k] for k in ("clips_skipped", "clips_written")}
    shutil.copy(out, keep / "resumed.h5")
    print("REPORT", json.dumps(report))
""")


@pytest.mark.parametrize("overlap", ["off", "on"])
def test_a_disk_that_fills_stops_cleanly_and_a_rerun_finishes(tmp_path, samples_dir, overlap):
    """A small tmpfs in a private mount namespace (`unshare -rm`), so no root is needed and nothing leaks; the
    writes in line, or in the store's writer process (overlap on), whose StoreFull comes back the same."""
    if shutil.which("unshare") is None or subprocess.run(["unshare", "-rm", "true"]).returncode != 0:
        pytest.skip("cannot mount a small tmpfs here: `unshare -rm` (user + mount namespaces) is not allowed")
    clips = make_faces_store(tmp_path / "faces.h5", samples_dir, n_clips=10, frames=6)
    extract_features(tmp_path / "faces.h5", tmp_path / "whole.h5", cfg(), **QUIET)
    disk = tmp_path / "disk"
    disk.mkdir()
    done = subprocess.run(["unshare", "-rm", sys.executable, "-c", FULL_DISK_SCRIPT, str(tmp_path / "faces.h5"),
                           str(disk), str(tmp_path), overlap], cwd=REPO, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads(done.stdout.split("REPORT ", 1)[1])
    assert report["first"].startswith(f"{disk / 'feats.h5'}: ") and "clip 'T" in report["first"]
    assert "needed" in report["first"] and "rerun the same command" in report["first"]
    committed = report["committed"]
    assert 0 < len(committed) < len(clips)
    whole = read_all(tmp_path / "whole.h5")
    at_full = read_all(tmp_path / "after_full.h5")
    assert sorted(at_full) == committed
    for cid in committed:  # what was committed before the disk filled is intact
        np.testing.assert_array_equal(at_full[cid][0], whole[cid][0])
    assert report["rerun"] == {"clips_skipped": len(committed), "clips_written": len(clips) - len(committed)}
    assert_same_stores(tmp_path / "resumed.h5", tmp_path / "whole.h5")


def test_cli_scale_options_match_the_import_api(tmp_path, samples_dir):
    from click.testing import CliRunner
    from emotion_attention.cli.emo_cache import extract
    make_faces_store(tmp_path / "faces.h5", samples_dir, n_clips=4, frames=7)
    result = CliRunner().invoke(extract, [str(tmp_path / "faces.h5"), "--out", str(tmp_path / "cli.h5"),
                                          "--weights", "random", "--seed", "0", "--input-size", "32",
                                          "--batch-size", "4", "--frames-per-clip", "3", "--map-dtype", "uint8",
                                          "--shard", "1/2"])
    assert result.exit_code == 0, result.output
    assert "(shard 1/2)" in result.output and "maps uint8" in result.output
    extract_features(tmp_path / "faces.h5", tmp_path / "api.h5",
                     cfg(frames_per_clip=3, map_dtype="uint8", shard="1/2"), **QUIET)
    assert_same_stores(tmp_path / "cli.h5", tmp_path / "api.h5")
    bad = CliRunner().invoke(extract, [str(tmp_path / "faces.h5"), "--out", str(tmp_path / "x.h5"), "--weights",
                                       "random", "--seed", "0", "--shard", "2/2"])
    assert bad.exit_code == 2 and "--shard '2/2'" in bad.output and not (tmp_path / "x.h5").exists()
    same = CliRunner().invoke(extract, [str(tmp_path / "faces.h5"), "--out", str(tmp_path / "faces.h5"),
                                        "--weights", "random", "--seed", "0"])
    assert same.exit_code == 1 and "is the faces store this run reads" in same.output


def test_explain_shows_the_faces_of_the_kept_rows(tmp_path, samples_dir, monkeypatch):
    """With --frames-per-clip the feature rows are a subset of the faces-store frames; the figure must show
    those frames, not the clip's first ones."""
    import emotion_attention.pipeline.stages.explain as explain
    clips = make_faces_store(tmp_path / "faces.h5", samples_dir, n_clips=1, frames=9)
    extract_features(tmp_path / "faces.h5", tmp_path / "feats.h5", cfg(frames_per_clip=3), **QUIET)
    cid = next(iter(clips))
    with FeaturesStore(tmp_path / "feats.h5") as store:
        rows = store.source_rows(cid)
    assert rows.tolist() == [0, 5, 8]  # present frames 0, 2, 3, 5, 6, 7, 8 -> linspace picks 0, 5, 8
    shown = {}

    def capture(faces, used, *args, **kwargs):
        shown["faces"], shown["frames"] = faces, kwargs["frame_numbers"]
        raise RuntimeError("captured")
    monkeypatch.setattr(explain, "explanation_figure", capture)
    record = {"clip_id": cid, "label": 0, "pred": 0, "probs": np.full(7, 1 / 7), "frames": np.arange(3),
              "frame_probs": np.full((3, 7), 1 / 21), "frame_weights": np.full(3, 1 / 3), "attention": None}
    with pytest.raises(RuntimeError, match="captured"):
        explain.explain_evaluation(tmp_path / "faces.h5", [record], list("ABCDEFG"), tmp_path / "ex",
                                   features_path=tmp_path / "feats.h5")
    np.testing.assert_array_equal(shown["faces"], clips[cid]["faces"][rows])
    np.testing.assert_array_equal(shown["frames"], rows)


def test_chunked_reads_decode_an_encoded_faces_store(tmp_path, samples_dir):
    """A png faces store (lossless) gives the maps of the raw store, read chunk by chunk."""
    make_faces_store(tmp_path / "raw.h5", samples_dir, n_clips=3, frames=9)
    make_faces_store(tmp_path / "png.h5", samples_dir, n_clips=3, frames=9, config_extra={"codec": "png"})
    extract_features(tmp_path / "raw.h5", tmp_path / "raw_f.h5", cfg(batch_size=4), **QUIET)
    extract_features(tmp_path / "png.h5", tmp_path / "png_f.h5", cfg(batch_size=4), **QUIET)
    raw, png = read_all(tmp_path / "raw_f.h5"), read_all(tmp_path / "png_f.h5")
    assert sorted(raw) == sorted(png) and len(raw) == 3
    for cid in raw:
        np.testing.assert_array_equal(raw[cid][0], png[cid][0])


FAULTS_AFTER_FREE = r"""
import ctypes, json, resource
from emotion_attention.pipeline.core.runtime import reuse_freed_memory

applied = reuse_freed_memory()
libc = ctypes.CDLL("libc.so.6")  # malloc itself: numpy would ask the kernel for huge pages, torch does not
libc.malloc.restype, libc.malloc.argtypes, libc.free.argtypes = ctypes.c_void_p, [ctypes.c_size_t], [ctypes.c_void_p]
size, rounds = 64 * 2**20, 6  # above glibc's largest mmap threshold (32 MB): mapped and unmapped by default


def batch():  # what a batch's activation does: allocated, written, freed
    block = libc.malloc(size)
    ctypes.memset(block, 1, size)
    libc.free(block)


batch()  # the first round faults its pages in either way
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(rounds):
    batch()
faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
print(json.dumps({"applied": applied, "faults": faults, "pages": rounds * size // resource.getpagesize()}))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux") or os.confstr("CS_GNU_LIBC_VERSION") is None,
                    reason="glibc's malloc only")
def test_freed_batches_are_reused_not_faulted_in_again():
    """A block freed by one batch serves the next without page faults; glibc's default (kept when the user sets
    a malloc variable, here its own default value) maps and faults every 64 MB block in again."""
    def run(env: dict) -> dict:
        env = {k: v for k, v in os.environ.items() if k not in ("MALLOC_MMAP_MAX_", "LD_PRELOAD")} | env
        done = subprocess.run([sys.executable, "-c", FAULTS_AFTER_FREE], capture_output=True, text=True, env=env)
        assert done.returncode == 0, done.stderr
        return json.loads(done.stdout)

    tuned, default = run({}), run({"MALLOC_MMAP_MAX_": "65536"})
    assert tuned["applied"] and not default["applied"]
    assert default["faults"] > 0.9 * default["pages"]
    assert tuned["faults"] < 0.02 * tuned["pages"]


def test_malloc_settings_are_the_users_when_they_set_any():
    from emotion_attention.pipeline.core import runtime

    class Libc:
        def __init__(self):
            self.calls = []

        def mallopt(self, param: int, value: int) -> int:
            self.calls.append((param, value))
            return 1

    libc = Libc()
    assert runtime.reuse_freed_memory(environ={}, libc=libc)
    assert libc.calls == [(-4, 0), (-1, runtime.KEEP_FREED)]  # M_MMAP_MAX 0, then M_TRIM_THRESHOLD
    for name in runtime.MALLOC_SETTINGS:
        libc = Libc()
        assert not runtime.reuse_freed_memory(environ={name: "1"}, libc=libc)
        assert libc.calls == []


def test_extract_tunes_malloc_before_its_batches(tmp_path, samples_dir, monkeypatch):
    import emotion_attention.pipeline.stages.extract as extract

    calls = []
    real = extract.extract_features
    monkeypatch.setattr(extract, "reuse_freed_memory", lambda: calls.append("malloc"))
    monkeypatch.setattr(extract, "extract_features", lambda *a, **k: calls.append("extract") or real(*a, **k))
    make_faces_store(tmp_path / "faces.h5", samples_dir)
    summary = extract.run(cfg(), [tmp_path / "faces.h5"], tmp_path / "feats.h5", progress=False)
    assert summary.ok and calls == ["malloc", "extract"]
