"""The fault corpus through the commands a user runs: real sample media, mutated, and real stores, damaged.

Each case asserts the exit code, that the message names the file, that no committed clip was lost, and that
a rerun (after the fix the message names) completes. The chain (faces -> extract -> heads -> eval) is built
once per session from data/samples with --max-frames 8, then copied into each case.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest

from emotion_attention.cache import FacesStore, clip_key
from faultkit import (CHAIN_CLIPS as CLIPS, REPO, chunk_byte_offset, complete_ids, extract_cmd, faces_cmd,
                      file_bytes, frame_byte_offset, mounted_tmpfs, one_line_error, overwrite, run, truncate)

# -- 1. damaged stores, through every command ---------------------------------------------------------

def test_truncated_faces_store_rerun_refuses_salvage_then_rerun_finishes(work):
    faces = work / "faces.h5"
    truncate(faces, int(faces.stat().st_size * 0.9))
    cut = file_bytes(faces)
    text = one_line_error(run(faces_cmd(work / "ds", faces)), faces, f"emo-cache salvage {faces}")
    assert "another process" not in text and file_bytes(faces) == cut
    one_line_error(run(extract_cmd(faces, work / "new.h5")), faces, "emo-cache salvage")
    res = run(["emo-cache", "salvage", str(faces)])
    assert res.returncode == 0 and "kept" in res.stdout and ".damaged-" in res.stdout, res.stdout + res.stderr
    kept = complete_ids(faces)
    assert run(faces_cmd(work / "ds", faces)).returncode == 0        # the rerun redoes what was dropped
    assert complete_ids(faces) == sorted(CLIPS) and set(kept) <= set(CLIPS)


@pytest.mark.slow
def test_damaged_faces_chunk_fails_that_clip_in_extract_and_salvage_plus_reruns_finish(work):
    faces = work / "faces.h5"
    overwrite(faces, frame_byte_offset(faces, "Val/Happy/c.mp4", 2), b"\x5a" * 64)
    res = run(extract_cmd(faces, work / "new.h5"))
    assert res.returncode == 1 and "Traceback" not in res.stderr, res.stderr[-2000:]
    logged = [json.loads(line) for line in (work / "new.h5.failures.jsonl").read_text().splitlines()]
    assert [(f["stage"], f["clip_id"]) for f in logged] == [("extract", "Val/Happy/c.mp4")]
    assert f"emo-cache salvage {faces}" in logged[0]["reason"] and logged[0]["file"] == str(faces)
    assert complete_ids(work / "new.h5") == sorted(set(CLIPS) - {"Val/Happy/c.mp4"})
    assert run(["emo-cache", "salvage", str(faces)]).returncode == 0
    assert run(faces_cmd(work / "ds", faces)).returncode == 0
    assert run(extract_cmd(faces, work / "new.h5")).returncode == 0
    assert complete_ids(work / "new.h5") == sorted(CLIPS)


@pytest.mark.slow
def test_damaged_features_stop_training_with_one_line(work):
    feats = work / "feats.h5"
    overwrite(feats, chunk_byte_offset(feats, "Train/Happy/a.mp4", "maps", 3) + 20, b"\xff" * 40)
    res = run(["emo-train", "heads", str(feats), "--out", str(work / "run2"), "--epochs", "1", "--holdout", "0",
               "--batch-size", "2"])
    one_line_error(res, feats, "Train/Happy/a.mp4", "emo-cache salvage")


def test_nan_maps_are_left_out_of_eval_and_named(work):
    feats = work / "feats.h5"
    with h5py.File(feats, "r+") as f:          # NaN with a valid checksum: what a diverged backbone writes
        f[clip_key("Val/Sad/d.mp4")]["maps"][0, 2] = np.nan
    res = run(["emo-eval", str(feats), "--checkpoint", str(work / "run" / "best.pt"), "--split", "Val",
               "--out", str(work / "rep")])
    assert res.returncode == 0, res.stderr[-2000:]
    metrics = json.loads((work / "rep" / "metrics.json").read_text())
    assert metrics["num_clips"] == 1 and metrics["skipped"] == 1
    (failure,) = [json.loads(line) for line in (work / "rep" / "failures.jsonl").read_text().splitlines()]
    assert failure["clip_id"] == "Val/Sad/d.mp4" and "non-finite" in failure["reason"]
    assert "Val/Sad/d.mp4" in res.stderr and "non-finite" in res.stderr


def test_truncated_features_store_is_damage_for_eval(work):
    feats = work / "feats.h5"
    truncate(feats, feats.stat().st_size // 2)
    one_line_error(run(["emo-eval", str(feats), "--checkpoint", str(work / "run" / "best.pt"), "--split", "Val",
                        "--out", str(work / "rep")]), feats, "emo-cache salvage")


def test_features_from_another_faces_store_name_the_faces_settings_not_only_hashes(work):
    assert run(faces_cmd(work / "ds", work / "faces6.h5", "--max-frames", "6")).returncode == 0
    before = file_bytes(work / "feats.h5")
    text = one_line_error(run(extract_cmd(work / "faces6.h5", work / "feats.h5")), work / "feats.h5")
    assert "faces store decode.max_frames: store has 8, this run asks for 6" in text
    assert "use a new --out path" in text and file_bytes(work / "feats.h5") == before


# -- 2. wrong --out, refused before anything is written ----------------------------------------------

@pytest.mark.parametrize("case", ["faces-into-features", "extract-into-faces", "extract-into-own-input",
                                  "text-file", "folder"])
def test_wrong_out_is_refused_and_left_untouched(work, case):
    other = work / "other_faces.h5"
    shutil.copyfile(work / "faces.h5", other)
    (work / "notes.h5").write_text("my notes\n")
    (work / "dir.h5").mkdir()
    cmd, target = {
        "faces-into-features": (faces_cmd(work / "ds", work / "feats.h5"), work / "feats.h5"),
        "extract-into-faces": (extract_cmd(work / "faces.h5", other), other),
        "extract-into-own-input": (extract_cmd(work / "faces.h5", work / "faces.h5"), work / "faces.h5"),
        "text-file": (faces_cmd(work / "ds", work / "notes.h5"), work / "notes.h5"),
        "folder": (faces_cmd(work / "ds", work / "dir.h5"), work / "dir.h5"),
    }[case]
    before = sorted(os.listdir(work)), None if target.is_dir() else file_bytes(target)
    res = run(cmd)
    assert res.returncode in (1, 2) and "Traceback" not in res.stderr and str(target) in res.stdout + res.stderr
    assert (sorted(os.listdir(work)), None if target.is_dir() else file_bytes(target)) == before


def test_read_only_output_folder_is_not_called_damage(work):
    with mounted_tmpfs(work / "ro", options="ro") as ro:
        text = one_line_error(run(faces_cmd(work / "ds", ro / "faces.h5")), ro)
        assert "not writable" in text and "damaged" not in text


# -- 3. one writer on any file system -----------------------------------------------------------------

HOLD = ("import sys, time\nfrom emotion_attention.cache.common import open_for_append\nf = open_for_append(sys.argv[1])\n"
        "print('held', flush=True)\ntime.sleep(60)\n")


def test_second_faces_writer_is_refused_without_hdf5_locks(work):
    env = {"HDF5_USE_FILE_LOCKING": "FALSE"}
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(work / "faces.h5")], cwd=REPO, text=True,
                              stdout=subprocess.PIPE, env={**os.environ, **env})
    try:
        assert holder.stdout.readline().strip() == "held"
        text = one_line_error(run(faces_cmd(work / "ds", work / "faces.h5"), env=env), work / "faces.h5")
        assert f"pid {holder.pid} on host {socket.gethostname()}" in text
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert run(faces_cmd(work / "ds", work / "faces.h5"), env=env).returncode == 0   # stale lock broken
    assert complete_ids(work / "faces.h5") == sorted(CLIPS)


# -- 4. full disk -------------------------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("stage", ["faces", "extract"])
def test_full_disk_stops_cleanly_and_a_rerun_with_space_finishes(work, stage):
    with mounted_tmpfs(work / "small", size="320k") as small:
        out = small / "out.h5"
        cmd = faces_cmd(work / "ds", out, "--workers", "2") if stage == "faces" else extract_cmd(work / "faces.h5", out)
        res = run(cmd, timeout=300)
        text = one_line_error(res, out)
        assert "GiB" in text or "MiB" in text                        # it says how much space is needed
        committed = complete_ids(out) if out.exists() and out.stat().st_size else []
        shutil.copyfile(out, work / "moved.h5") if out.exists() else None
    moved = work / "moved.h5"
    cmd = faces_cmd(work / "ds", moved) if stage == "faces" else extract_cmd(work / "faces.h5", moved)
    assert run(cmd).returncode == 0
    assert set(committed) <= set(complete_ids(moved)) and complete_ids(moved) == sorted(CLIPS)


def committed_count(path) -> int:
    """Clips with the complete mark, read while another process writes (0 when the file is mid-update)."""
    try:
        with h5py.File(path, "r", locking=False) as f:
            return sum(bool(f[k].attrs.get("complete", False)) for k in f)
    except Exception:  # noqa: BLE001 - a half-written file reads as anything; try again later
        return 0


@pytest.mark.slow
def test_disk_filled_mid_run_by_another_process_stops_cleanly_and_keeps_committed_clips(work):
    """The estimate passes, then another process fills the disk while faces runs: StoreFull, no crash."""
    import time

    with mounted_tmpfs(work / "mid", size="48m") as mid:
        out = mid / "faces.h5"
        env = {**os.environ, "HDF5_USE_FILE_LOCKING": "FALSE"}   # so this test can peek while faces writes
        proc = subprocess.Popen([str(Path(sys.executable).with_name("emo-cache")), *faces_cmd(work / "ds", out,
                                "--max-frames", "200")[1:]], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                env=env)
        deadline = time.time() + 240
        while proc.poll() is None and time.time() < deadline and not committed_count(out):
            time.sleep(0.1)
        free = shutil.disk_usage(mid).free
        with open(mid / "filler", "wb") as fh:         # leave 1 MiB: less than the store's reserve
            fh.write(b"\0" * max(0, free - (1 << 20)))
        stdout, stderr = proc.communicate(timeout=300)
        assert proc.returncode == 1, f"rc {proc.returncode}: {stderr[-3000:]}"
        assert "Traceback" not in stderr and str(out) in stdout + stderr and "free" in stdout + stderr
        (mid / "filler").unlink()
        shutil.copyfile(out, work / "moved.h5")
    with FacesStore(work / "moved.h5") as store:
        committed = {cid: store.read_faces(cid) for cid in store.complete_ids()}
    assert committed, "the disk filled before one clip was committed: the case did not happen"
    assert run(faces_cmd(work / "ds", work / "moved.h5", "--max-frames", "200"), timeout=300).returncode == 0
    with FacesStore(work / "moved.h5") as store:
        assert store.complete_ids() == sorted(CLIPS)
        for cid, chips in committed.items():
            np.testing.assert_array_equal(store.read_faces(cid), chips)


# -- 5. bad settings: one line, before any work -------------------------------------------------------

@pytest.mark.parametrize("args,named", [
    (["--classes", "Happy,happy"], "--classes"),
    (["--classes", " , "], "--classes"),
    (["--size", "100000"], "--size 100000"),
    (["--predictor", "NOT_A_MODEL"], "NOT_A_MODEL"),
])
def test_bad_faces_settings_stop_before_any_work(work, args, named):
    if "NOT_A_MODEL" in args:
        (work / "fake.dat").write_text("not a dlib model\n")
        args = ["--predictor", str(work / "fake.dat")]
        named = str(work / "fake.dat")
    res = run(faces_cmd(work / "ds", work / "new.h5", *args))
    text = res.stdout + res.stderr
    assert res.returncode in (1, 2) and "Traceback" not in text and named in text, text[-2000:]
    assert not (work / "new.h5").exists()


def test_more_workers_than_cores_warns_with_memory(work):
    res = run(faces_cmd(work / "ds", work / "faces.h5", "--workers", str(os.cpu_count() * 8)))
    assert res.returncode == 0, res.stderr[-2000:]
    assert "more than the" in res.stdout + res.stderr and "GiB" in res.stdout + res.stderr


def test_device_tpu_is_one_line(work):
    for cmd in (extract_cmd(work / "faces.h5", work / "new.h5", "--device", "tpu"),
                ["emo-eval", str(work / "feats.h5"), "--checkpoint", str(work / "run" / "best.pt"), "--out",
                 str(work / "rep"), "--device", "tpu"]):
        res = run(cmd)
        text = res.stdout + res.stderr
        assert res.returncode in (1, 2) and "Traceback" not in text and "tpu" in text, text[-2000:]
        assert "cpu" in text   # it says what to use instead
    assert not (work / "new.h5").exists() and not (work / "rep" / "metrics.json").exists()
