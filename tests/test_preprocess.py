"""The faces stage end to end: store contents, failures, resume, SIGKILL, CLI, loky and dask."""
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from emotion_attention.cache import FacesStore, StoreMismatch
from emotion_attention.cache.errors import ConfigError
from emotion_attention.cache.faces_store import FRAME_DATASETS
from emotion_attention.cli.emo_cache import faces
from emotion_attention.pipeline.data.clips import Clip
from emotion_attention.pipeline.configs import DecodeConfig
from emotion_attention.pipeline.configs import PreprocessConfig
from emotion_attention.pipeline.stages.faces import preprocess_dataset, process_clip
from emotion_attention.pipeline.core.runtime import failure_log_path
from fixtures_preprocess import build_face_dataset, copy_sample

REPO = Path(__file__).resolve().parents[1]
CFG = PreprocessConfig(decode=DecodeConfig(max_frames=24))
GOOD = ["Train/Happy/single_face.mp4", "Train/Neutral/carphone.mp4", "Val/Sad/noface_face.mov"]


def read_store(path):
    """{clip_id: (arrays, attrs)} of every complete clip, plus the root config."""
    with FacesStore(path, "r") as store:
        clips = {cid: ({**store.read_meta(cid), "faces": store.read_faces(cid)}, store.attrs(cid))
                 for cid in store.complete_ids()}
        return clips, store.config


def assert_same_stores(a, b):
    clips_a, config_a = read_store(a)
    clips_b, config_b = read_store(b)
    assert config_a == config_b and sorted(clips_a) == sorted(clips_b)
    for cid in clips_a:
        for name in FRAME_DATASETS:
            assert np.array_equal(clips_a[cid][0][name], clips_b[cid][0][name], equal_nan=name != "faces"
                                  and clips_a[cid][0][name].dtype.kind == "f"), (cid, name)
        assert clips_a[cid][1] == clips_b[cid][1]


@pytest.fixture(scope="module")
def dataset(samples_dir, tmp_path_factory):
    return build_face_dataset(tmp_path_factory.mktemp("data") / "ds", samples_dir)


@pytest.fixture(scope="module")
def reference(dataset, tmp_path_factory):
    out = tmp_path_factory.mktemp("ref") / "faces.h5"
    summary = preprocess_dataset(dataset, out, CFG, workers=1, progress=False)
    return out, summary


def test_store_contents_and_failures(reference, dataset):
    out, summary = reference
    clips, config = read_store(out)
    assert sorted(clips) == GOOD
    assert config["class_names"] == ["Angry", "Disgust", "Fear", "Happy", "Neutral", "Sad", "Surprise"]
    assert config["decode"]["max_frames"] == 24 and config["face"]["size"] == 256
    arrays, attrs = clips["Train/Happy/single_face.mp4"]
    assert arrays["faces"].shape == (24, 256, 256, 3) and arrays["present"].all()
    assert np.array_equal(arrays["frame_index"], np.arange(24))
    assert attrs["label"] == "Happy" and attrs["split"] == "Train" and attrs["fps"] == 30.0
    assert attrs["total_frames"] == 72 and attrs["complete"]
    assert not clips["Val/Sad/noface_face.mov"][0]["present"].any()  # the face enters after frame 95
    reasons = {Path(f.file).name: f.reason for f in summary.failures}
    assert set(reasons) == {"corrupt.mp4", "empty.avi", "notes.avi"}
    assert "empty file" in reasons["empty.avi"] and "cannot be opened" in reasons["notes.avi"]
    assert "cannot be opened" in reasons["corrupt.mp4"]
    logged = [json.loads(line) for line in failure_log_path(out).read_text().splitlines()]
    assert sorted(Path(f["file"]).name for f in logged) == sorted(reasons)
    assert summary.written == 3 and summary.skipped == 0 and summary.total == 6
    assert not summary.ok  # 3 of 6 failed, more than the default 5 %
    by_class = {row["label"]: row for row in summary.class_coverage}
    assert by_class["Happy"] == {"label": "Happy", "clips": 1, "frames": 24, "present": 24, "coverage": 1.0}
    assert by_class["Sad"]["present"] == 0


def test_rerun_skips_complete_clips(reference, tmp_path, dataset):
    out = tmp_path / "faces.h5"
    out.write_bytes(reference[0].read_bytes())
    summary = preprocess_dataset(dataset, out, CFG, workers=1, progress=False)
    assert summary.skipped == 3 and summary.written == 0 and len(summary.failures) == 3
    assert_same_stores(out, reference[0])


def test_other_settings_are_refused(reference, tmp_path, dataset):
    out = tmp_path / "faces.h5"
    out.write_bytes(reference[0].read_bytes())
    with pytest.raises(StoreMismatch, match="face"):
        preprocess_dataset(dataset, out, replace(CFG, face=replace(CFG.face, size=128)), workers=1,
                           progress=False)
    result = CliRunner().invoke(faces, [str(dataset), "--out", str(out), "--max-frames", "24", "--size", "128"])
    assert result.exit_code == 1 and "built with other settings" in result.output
    assert "Traceback" not in result.output


def test_bad_argument_stops_before_any_work(tmp_path, dataset):
    with pytest.raises(ConfigError, match="workers"):
        preprocess_dataset(dataset, tmp_path / "x.h5", CFG, workers=0)
    with pytest.raises(ConfigError, match="scheduler"):
        preprocess_dataset(dataset, tmp_path / "x.h5", CFG, backend="dask")
    result = CliRunner().invoke(faces, [str(dataset), "--out", str(tmp_path / "x.h5"), "--size", "8"])
    assert result.exit_code == 1 and "size=8" in result.output and "Traceback" not in result.output
    assert not (tmp_path / "x.h5").exists()


def test_cli_matches_import_api(reference, tmp_path, dataset):
    out = tmp_path / "cli.h5"
    args = [str(dataset), "--out", str(out), "--workers", "1", "--max-frames", "24", "--quiet"]
    result = CliRunner().invoke(faces, args)
    assert result.exit_code == 1, result.output          # 3 of 6 clips fail: above 5 %
    assert "Train/Happy/single_face.mp4" in result.output and "corrupt.mp4" in out.with_name(
        "cli.h5.failures.jsonl").read_text()
    assert_same_stores(out, reference[0])
    again = CliRunner().invoke(faces, args + ["--max-fail-fraction", "0.6"])
    assert again.exit_code == 0, again.output
    assert "0 clip(s) written, 3 already complete" in again.output


def test_two_loky_workers_match_one(reference, tmp_path, dataset):
    out = tmp_path / "loky.h5"
    summary = preprocess_dataset(dataset, out, CFG, workers=2, backend="loky", progress=False)
    assert summary.written == 3
    assert_same_stores(out, reference[0])


def test_dask_backend_on_local_cluster(reference, tmp_path, dataset):
    distributed = pytest.importorskip("distributed", reason="dask[distributed] is a dev dependency")
    with distributed.LocalCluster(n_workers=1, threads_per_worker=2, processes=False, protocol="tcp://",
                                  host="127.0.0.1", dashboard_address=None) as cluster:  # loopback only
        out = tmp_path / "dask.h5"
        summary = preprocess_dataset(dataset, out, CFG, workers=2, backend="dask",
                                     scheduler=cluster.scheduler_address, progress=False)
    assert summary.written == 3 and len(summary.failures) == 3
    assert_same_stores(out, reference[0])


def test_process_clip_without_store(samples_dir):
    clip = Clip("Train/Happy/single_face.mp4", samples_dir / "single_face.mp4", "Happy", "Train", "video")
    arrays, attrs = process_clip(clip, replace(CFG, decode=DecodeConfig(max_frames=3, every_nth=2)))
    assert arrays["faces"].shape == (3, 256, 256, 3)
    assert arrays["frame_index"].tolist() == [0, 2, 4]
    assert attrs == {"label": "Happy", "split": "Train", "source": str(samples_dir / "single_face.mp4"),
                     "kind": "video", "fps": 30.0, "total_frames": 72, "decoded_frames": 5,
                     "unreadable_frames": 0, "truncated": False}


KILL_SCRIPT = "from emotion_attention.cli.emo_cache import faces; faces()"


def run_faces_cli(data, out, *extra):
    cmd = [sys.executable, "-c", KILL_SCRIPT, str(data), "--out", str(out), "--workers", "1", "--quiet",
           "--max-frames", "40", "--max-fail-fraction", "1", *extra]
    return subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


@pytest.fixture(scope="module")
def kill_dataset(samples_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("kill") / "ds"
    for label in ("Angry", "Happy", "Sad", "Fear", "Surprise", "Neutral"):
        copy_sample(samples_dir, "single_face.mp4", root / "Train" / label / f"{label.lower()}.mp4")
    copy_sample(samples_dir, "carphone_pristine.mp4", root / "Val" / "Happy" / "carphone.mp4")
    return root


@pytest.mark.parametrize("delay", [0.4, 1.0])  # seconds after the store appears; 0.05-1.5 all pass
def test_sigkill_then_rerun_matches_uninterrupted(kill_dataset, tmp_path, delay):
    clean = tmp_path / "clean.h5"
    assert run_faces_cli(kill_dataset, clean).wait(timeout=300) == 0
    killed = tmp_path / "killed.h5"
    proc = run_faces_cli(kill_dataset, killed)
    deadline = time.time() + 120
    while not killed.exists() and time.time() < deadline:  # the store appears once imports are done
        time.sleep(0.02)
    time.sleep(delay)
    os.kill(proc.pid, signal.SIGKILL)
    assert proc.wait(timeout=30) == -signal.SIGKILL, "the run ended before it could be killed"
    resumed = run_faces_cli(kill_dataset, killed)
    output = resumed.communicate(timeout=300)[0].decode()
    assert resumed.returncode == 0, output
    assert_same_stores(killed, clean)
