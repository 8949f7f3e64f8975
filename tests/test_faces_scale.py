"""The faces stage at scale (issue 9): codecs, the chunked clip writer, part files of several workers,
--shard, space checks and a full disk, and a torch-free start-up."""
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from emotion_attention.cache import ConfigError, FacesStore, StoreFull, StoreMismatch
from emotion_attention.cache.codecs import Codec
from emotion_attention.pipeline.configs import DecodeConfig
from emotion_attention.pipeline.data.decode import iter_frames
from emotion_attention.pipeline.faces.align import CHUNK_FRAMES, align_clip_chunks, align_clip_frames, load_aligner
from emotion_attention.pipeline.configs import FaceConfig
from emotion_attention.pipeline.stages.faces import PARTS_SUFFIX, preprocess_dataset
from emotion_attention.pipeline.configs import PreprocessConfig
from emotion_attention.pipeline.core.runtime import concurrent_speedup, select_shard
from fixtures_preprocess import copy_sample
from processes import alive, child_pids

REPO = Path(__file__).resolve().parents[1]
CFG = PreprocessConfig(decode=DecodeConfig(max_frames=12))


def smooth_chips(n: int, size: int = 64, seed: int = 0) -> np.ndarray:
    """uint8 (n, size, size, 3) smooth images (JPEG-friendly, like faces), distinct per frame."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / size
    out = []
    for _ in range(n):
        a, b, c = rng.uniform(0.5, 3, 3)
        img = np.stack([np.sin(a * xx + b * yy), np.cos(b * xx - c * yy), np.sin(c * xx * yy + a)], -1)
        out.append(((img + 1) * 127.5).astype(np.uint8))
    return np.stack(out)


def clip_arrays(faces: np.ndarray) -> dict:
    n = len(faces)
    return {"faces": faces, "frame_index": np.arange(n, dtype=np.int32), "timestamp_ms": np.arange(n) * 40.0,
            "present": np.ones(n, bool), "box": np.zeros((n, 4)), "landmarks": np.zeros((n, 68, 2)),
            "score": np.ones(n), "how": np.ones(n, np.uint8)}


def store_config(codec: str, **extra) -> dict:
    return {"face": {"size": 64}, "class_names": ["A"], **({"codec": codec} if codec != "raw" else {}), **extra}


@pytest.mark.parametrize("codec", ["raw", "png", "jpeg"])
def test_codec_round_trip_and_frame_selection(tmp_path, codec):
    faces = smooth_chips(20)
    path = tmp_path / "f.h5"
    with FacesStore(path, "a", config=store_config(codec)) as store:
        store.write_clip("Train/A/a.avi", clip_arrays(faces), {"label": "A"})
    with FacesStore(path) as store:
        assert store.codec.name == codec
        back = store.read_faces("Train/A/a.avi")
        pick = np.array([7, 2, 2, 19, 0])
        assert np.array_equal(store.read_faces("Train/A/a.avi", pick), back[pick])  # any order, repeats
        assert np.array_equal(store.read_faces("Train/A/a.avi", np.array([0, 19])), back[[0, 19]])  # sparse
    assert back.shape == faces.shape and back.dtype == np.uint8
    err = np.abs(back.astype(int) - faces)
    if codec == "jpeg":
        assert 0 < err.max() <= 12 and err.mean() < 1.5  # lossy, but close at luma quality 100
    else:
        assert err.max() == 0  # raw and png are lossless


def test_encoded_store_is_smaller(tmp_path):
    faces = smooth_chips(16, size=128)
    sizes = {}
    for codec in ("raw", "jpeg"):
        with FacesStore(tmp_path / f"{codec}.h5", "a", config=store_config(codec, face={"size": 128})) as store:
            store.write_clip("Train/A/a.avi", clip_arrays(faces), {"label": "A"})
        sizes[codec] = (tmp_path / f"{codec}.h5").stat().st_size
    assert sizes["jpeg"] * 3 < sizes["raw"]


def test_a_store_is_never_extended_with_another_codec(tmp_path):
    path = tmp_path / "f.h5"
    FacesStore(path, "a", config=store_config("jpeg")).close()
    with pytest.raises(StoreMismatch, match="codec: store has 'jpeg', this run asks for 'png'"):
        FacesStore(path, "a", config=store_config("png"))


def test_chunked_writer_commits_whole(tmp_path):
    faces = smooth_chips(10)
    path = tmp_path / "f.h5"
    with FacesStore(path, "a", config=store_config("png")) as store:
        writer = store.begin_clip("Train/A/long.avi", 64)
        for lo in range(0, 10, 4):  # 4 + 4 + 2 rows
            writer.append({k: v[lo:lo + 4] for k, v in clip_arrays(faces).items()})
        assert not store.is_complete("Train/A/long.avi")  # written but not committed: invisible
        writer.commit({"label": "A"})
        unfinished = store.begin_clip("Train/A/killed.avi", 64)
        unfinished.append(clip_arrays(faces[:3]))          # never committed, as after a kill
    with FacesStore(path) as store:
        assert store.complete_ids() == ["Train/A/long.avi"]
        assert np.array_equal(store.read_faces("Train/A/long.avi"), faces)
        assert np.array_equal(store.read_meta("Train/A/long.avi")["frame_index"], np.arange(10))


def test_align_chunks_concatenate_to_whole_clip(samples_dir):
    aligner, cfg = load_aligner(), FaceConfig()
    frames = list(iter_frames(samples_dir / "single_face.mp4", max_frames=CHUNK_FRAMES + 5))
    chunks = list(align_clip_chunks(frames, aligner, cfg))
    assert [len(c["present"]) for c in chunks] == [CHUNK_FRAMES, 5]
    whole = align_clip_frames(frames, aligner, cfg)
    for name in whole:
        assert np.array_equal(np.concatenate([c[name] for c in chunks]), whole[name], equal_nan=True), name


@pytest.fixture(scope="module")
def four_clips(samples_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("four") / "ds"
    for i, label in enumerate(("Angry", "Happy", "Sad", "Fear")):
        copy_sample(samples_dir, "single_face.mp4", root / "Train" / label / f"c{i}.mp4")
    return root


def read_all(path):
    with FacesStore(path) as store:
        return store.config, {cid: ({**store.read_meta(cid), "faces": store.read_faces(cid)}, store.attrs(cid))
                              for cid in store.complete_ids()}


def assert_same(a, b):
    (ca, clips_a), (cb, clips_b) = read_all(a), read_all(b)
    assert ca == cb and sorted(clips_a) == sorted(clips_b)
    for cid in clips_a:
        for name, arr in clips_a[cid][0].items():
            assert np.array_equal(arr, clips_b[cid][0][name], equal_nan=arr.dtype.kind == "f"), (cid, name)
        assert clips_a[cid][1] == clips_b[cid][1]


@pytest.fixture(scope="module")
def one_worker(four_clips, tmp_path_factory):
    out = tmp_path_factory.mktemp("w1") / "faces.h5"
    preprocess_dataset(four_clips, out, CFG, workers=1, progress=False)
    return out


def test_two_workers_write_part_files_and_match_one(four_clips, one_worker, tmp_path):
    out = tmp_path / "faces.h5"
    summary = preprocess_dataset(four_clips, out, CFG, workers=2, progress=False)
    assert summary.written == 4 and not summary.failures
    assert not out.with_name(out.name + PARTS_SUFFIX).exists()  # part files are folded in and removed
    assert_same(out, one_worker)


def test_shards_partition_the_clips_and_merge_to_one_run(four_clips, one_worker, tmp_path):
    from emotion_attention.cache.merge import merge_stores

    shards = [tmp_path / f"faces.{k}.h5" for k in range(2)]
    ids = []
    for k, path in enumerate(shards):
        summary = preprocess_dataset(four_clips, path, CFG, workers=1, progress=False, shard=f"{k}/2")
        with FacesStore(path) as store:
            ids.append(store.complete_ids())
        assert summary.written == len(ids[-1])
    all_ids = [f"Train/{label}/c{i}.mp4" for i, label in enumerate(("Angry", "Happy", "Sad", "Fear"))]
    assert sorted(ids[0] + ids[1]) == sorted(all_ids) and not set(ids[0]) & set(ids[1])
    assert ids[0] == sorted(select_shard(all_ids, 0, 2))
    result = merge_stores(tmp_path / "merged.h5", shards, log=lambda *_: None)
    assert result["copied"] == 4
    assert_same(tmp_path / "merged.h5", one_worker)
    again = merge_stores(tmp_path / "merged.h5", shards, log=lambda *_: None)  # resumable: nothing to copy
    assert again["copied"] == 0 and again["skipped"] == 4


def test_space_is_checked_before_any_work(four_clips, tmp_path, monkeypatch):
    import emotion_attention.pipeline.stages.faces as pre

    monkeypatch.setattr(pre.shutil, "disk_usage", lambda _: shutil._ntuple_diskusage(10**9, 10**9 - 10**5, 10**5))
    out = tmp_path / "faces.h5"
    with pytest.raises(StoreFull, match=r"faces\.h5: the 4 clips still to do hold about 48 frames.*GiB"):
        preprocess_dataset(four_clips, out, CFG, workers=1, progress=False)
    with FacesStore(out) as store:
        assert store.complete_ids() == []


@pytest.fixture
def small_disk(tmp_path):
    """A 24 MiB tmpfs (needs root and mount rights; skipped with the reason otherwise)."""
    mnt = tmp_path / "disk"
    mnt.mkdir()
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=24m", "tmpfs", str(mnt)], capture_output=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here: {proc.stderr.decode().strip() or proc.returncode}")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], check=False)


@pytest.mark.filterwarnings("ignore:.*tasks which were still being processed")  # cancelled on purpose
@pytest.mark.parametrize("workers", [1, 2])
def test_full_disk_stops_cleanly_and_a_rerun_finishes(four_clips, one_worker, small_disk, workers, monkeypatch):
    import emotion_attention.pipeline.stages.faces as pre

    monkeypatch.setattr(pre, "check_space", lambda *a: 0)  # let it start, so the disk fills midway
    cfg = replace(CFG, codec="raw")                       # 12 frames x 192 KiB = 2.3 MB per clip
    filler = small_disk / "filler"
    filler.write_bytes(b"\0" * (24 * 2**20 - 5 * 2**20))  # leaves room for about two clips
    out = small_disk / "faces.h5"
    with pytest.raises(StoreFull, match=str(out)):
        preprocess_dataset(four_clips, out, cfg, workers=workers, progress=False)
    with FacesStore(out) as store:
        kept = store.complete_ids()
        for cid in kept:  # committed clips are whole
            assert store.read_faces(cid).shape == (12, 256, 256, 3)
    assert len(kept) < 4
    assert not out.with_name(out.name + PARTS_SUFFIX).exists()
    filler.unlink()
    summary = preprocess_dataset(four_clips, out, cfg, workers=workers, progress=False)
    assert summary.skipped == len(kept) and summary.written == 4 - len(kept)
    ref_clips = read_all(one_worker)[1]
    clips = read_all(out)[1]
    assert sorted(clips) == sorted(ref_clips)
    for cid in clips:  # same frames and faces found as the jpeg reference (chips differ only by the codec)
        assert np.array_equal(clips[cid][0]["present"], ref_clips[cid][0]["present"])


def committed(path: Path) -> int:
    """Clips with the complete mark, read while the run writes (0 when the file is mid-update)."""
    import h5py

    try:
        with h5py.File(path, "r", locking=False) as f:
            return sum(bool(f[k].attrs.get("complete", False)) for k in f)
    except Exception:  # noqa: BLE001 - a half-written file reads as anything; look again later
        return 0


def loky_workers(parent: int) -> list[int]:
    """Pids of the loky worker processes that ``parent`` started (Linux /proc)."""
    return child_pids(parent, b"loky")


@pytest.mark.parametrize("how", ["part files", "in memory"])
def test_multi_worker_sigkill_then_rerun_matches_uninterrupted(four_clips, one_worker, tmp_path, how):
    """Killed while a clip streams into its part file, or after a clip handed over in memory was committed and
    others are in flight: the rerun finishes and the store equals an uninterrupted run's."""
    mode = ["--stream-frames", "0"] if how == "part files" else ["--task-frames", "1"]
    cmd = [sys.executable, "-c", "from emotion_attention.cli.emo_cache import faces; faces()", str(four_clips),
           "--out", str(tmp_path / "killed.h5"), "--workers", "2", "--quiet", "--max-frames", "12", *mode]
    env = {**os.environ, "HDF5_USE_FILE_LOCKING": "FALSE"}  # so this test can peek while the run writes
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)
    parts = tmp_path / ("killed.h5" + PARTS_SUFFIX)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if (how == "part files" and parts.exists() and any(parts.glob("*.h5"))) or \
                (how == "in memory" and committed(tmp_path / "killed.h5") >= 1):
            break
        time.sleep(0.01)
    workers = loky_workers(proc.pid)
    os.kill(proc.pid, signal.SIGKILL)
    assert proc.wait(timeout=30) == -signal.SIGKILL, "the run ended before it could be killed"
    assert workers, "the run had started no worker process"
    gone = time.time() + 20                        # its workers end on their own: none is left running for good
    while time.time() < gone and any(alive(pid) for pid in workers):
        time.sleep(0.1)
    assert not [pid for pid in workers if alive(pid)]
    if how == "in memory":
        assert 1 <= committed(tmp_path / "killed.h5") < 4
    resumed = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert not parts.exists()
    assert_same(tmp_path / "killed.h5", one_worker)



def test_check_workers_end_when_check_is_killed(samples_dir, tmp_path):
    """`emo-cache check --workers 2` killed with SIGKILL mid-run: its loky workers (core.runtime.worker_executor,
    as faces' own) end on their own instead of staying idle for good."""
    for i in range(16):  # full checks decode every frame: long enough to be killed with both workers busy
        dest = tmp_path / "data" / "Train" / ("Happy" if i % 2 else "Sad") / f"clip{i:02d}.mp4"
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(samples_dir / "WolfgangLanger_Pexels.mp4", dest)
    cmd = [sys.executable, "-c", "from emotion_attention.cli.emo_cache import main; main()", "check",
           str(tmp_path / "data"), "--workers", "2"]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline, workers = time.time() + 60, []
    while time.time() < deadline and proc.poll() is None and len(workers) < 2:
        workers = loky_workers(proc.pid)
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    assert proc.wait(timeout=30) == -signal.SIGKILL, "the check ended before it could be killed"
    assert len(workers) == 2, f"the check had started {len(workers)} worker process(es), not 2"
    gone = time.time() + 20
    while time.time() < gone and any(alive(pid) for pid in workers):
        time.sleep(0.1)
    assert not [pid for pid in workers if alive(pid)]

def test_short_clips_are_batched_and_long_ones_stream(tmp_path):
    """plan_tasks: clips over stream_frames alone through a part file, clips of task_frames or more alone in
    memory, shorter ones together up to about task_frames frames."""
    from emotion_attention.pipeline.data.clips import Clip
    from emotion_attention.pipeline.stages.faces import plan_tasks

    frames = {"a": 300, "b": 70, "c": 40, "d": 30, "e": 1, "f": 1}
    clips = [Clip(k, tmp_path / k, "Happy", "Train", "frames", frames=n) for k, n in frames.items()]
    tasks = plan_tasks(clips, replace(CFG, task_frames=64, stream_frames=256), frames)
    assert [([c.clip_id for c in t.clips], t.stream) for t in tasks] == [
        (["a"], True), (["b"], False), (["c", "d"], False), (["e", "f"], False)]
    old_way = plan_tasks(clips, replace(CFG, task_frames=1, stream_frames=0), frames)
    assert [([c.clip_id for c in t.clips], t.stream) for t in old_way] == [([k], True) for k in frames]


def test_faces_cli_and_help_never_import_torch():
    code = "import emotion_attention.cli.emo_cache, sys; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_jpeg_codec_quality_is_validated():
    with pytest.raises(ConfigError, match="jpeg_quality=0"):
        Codec("jpeg", 0).validate()
    with pytest.raises(ConfigError, match="compression='lzf' applies to raw chips only"):
        replace(CFG, compression="lzf").validate()


def test_results_never_pile_up_ahead_of_a_slow_writer():
    """bounded(): at most ``ahead`` tasks are submitted and not yet handed to the writer, however slow it is
    (joblib's Parallel would dispatch on completion and hold every finished clip's chips in memory)."""
    from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait

    from emotion_attention.pipeline.stages.faces import bounded

    submitted, consumed = [], []
    with ThreadPoolExecutor(2) as pool:
        def submit(task):
            submitted.append(task)
            return pool.submit(lambda: task * 10)

        for result in bounded(submit, range(40), 4, lambda fs: wait(fs, return_when=FIRST_COMPLETED)):
            assert len(submitted) - len(consumed) <= 4
            time.sleep(0.002)                                   # the writer is the slow side
            consumed.append(result)
    assert sorted(consumed) == [10 * t for t in range(40)] and len(submitted) == 40


def test_concurrent_speedup_times_one_and_several_processes():
    """The benchmarks' ceiling for N workers: one process alone, then N at once, each timed whole. A job that
    sleeps takes no CPU, so N of them finish together in about the time of one (speed-up near N); a failing job
    is an error, never a figure."""
    sleep = [sys.executable, "-c", "import time; time.sleep(0.6)"]
    one, together, speedup = concurrent_speedup(sleep, copies=3, rounds=2)
    assert 0.6 <= one < 5 and 0.6 <= together < 5
    assert speedup == pytest.approx(3 * one / together)
    assert 1.5 < speedup <= 3.3
    with pytest.raises(RuntimeError, match="exited"):
        concurrent_speedup([sys.executable, "-c", "raise SystemExit(3)"])
