"""End-to-end fine-tuning on a tiny generated faces store (VGG16 at 32 px: L = 2 x 2)."""
import csv
import json
from dataclasses import replace

import numpy as np
import pytest
import torch

from finetune_data import CLASSES, make_tiny_faces_store, write_standin_vgg16
from emotion_attention.cache.errors import ConfigError
from emotion_attention.pipeline.models.backbones import WeightsError, build_vgg16_trunk
from emotion_attention.pipeline.training.loop import LOG_FIELDS
from emotion_attention.pipeline.training.batches import sample_frames
from emotion_attention.pipeline.models.backbones import VGG16_BLOCK_STARTS
from emotion_attention.pipeline.configs import FinetuneConfig
from emotion_attention.pipeline.stages.finetune import (FinetuneModel, augment_faces, dist_env_from, finetune, freeze_lower_blocks, load_trunk, resolve_precision, trunk_state)
from emotion_attention.pipeline.models.heads import EmotionHeads, load_heads
from emotion_attention.pipeline.configs import HeadsConfig


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    d = tmp_path_factory.mktemp("ft")
    return make_tiny_faces_store(d / "faces.h5"), write_standin_vgg16(d / "vgg16.pth")


def tiny_cfg(weights, **kw):
    base = dict(weights=str(weights), recipe="paper", epochs=6, frames_per_clip=4, batch_clips=3, crop=32, sgdr_t0=100,
                lr_heads=0.05, precision="fp32", workers=0, heads_hidden=16)  # 0.1 oscillates on 3 clips
    return FinetuneConfig(**{**base, **kw})


def test_loss_falls_frozen_blocks_stay_and_outputs_reload(tiny, tmp_path):
    faces, weights = tiny
    cfg = tiny_cfg(weights, freeze_blocks=2)
    result = finetune(faces, tmp_path / "run", cfg, log=lambda *a: None)
    ce = [row["ce"] for row in result.history]
    assert len(ce) == 6
    assert ce[-1] < 0.8 * ce[0], ce
    assert result.history[-1]["train_acc"] >= result.history[0]["train_acc"]
    start, _ = load_trunk(str(weights), 0)
    trained = result.model.trunk
    for i in (0, 2, 5, 7):                    # blocks 1-2: frozen, bit-identical
        assert torch.equal(trained[i].weight.cpu(), start[i].weight)
    assert not torch.equal(trained[28].weight.cpu(), start[28].weight)   # conv5_3 moved
    # the run folder: config, log, checkpoint readable by load_heads, backbone.pt re-loadable
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    assert saved["freeze_blocks"] == 2 and saved["autocast"] == "fp32"
    rows = list(csv.DictReader(open(tmp_path / "run" / "log.csv")))
    assert [int(r["epoch"]) for r in rows] == list(range(1, 7))        # one epoch numbering: from 1
    assert list(rows[0]) == LOG_FIELDS                                  # one set of log columns
    heads, ckpt = load_heads(tmp_path / "run" / "checkpoint.pt")
    assert ckpt["class_names"] == CLASSES and ckpt["epoch"] == 5
    for k, v in heads.state_dict().items():
        assert torch.equal(v, result.model.heads.state_dict()[k])
    reloaded, info = load_trunk(str(tmp_path / "run" / "backbone.pt"), 0)
    assert info["layout"] == "torchvision"
    assert sorted(torch.load(tmp_path / "run" / "backbone.pt"))[0] == "features.0.bias"
    for a, b in zip(reloaded.parameters(), trained.parameters()):
        assert torch.equal(a, b)


def test_resume_with_workers_matches_an_uninterrupted_run(tiny, tmp_path):
    faces, weights = tiny
    whole = finetune(faces, tmp_path / "whole", tiny_cfg(weights, epochs=2), log=lambda *a: None)
    finetune(faces, tmp_path / "split", tiny_cfg(weights, epochs=1), log=lambda *a: None)
    lines = []
    resumed = finetune(faces, tmp_path / "split", tiny_cfg(weights, epochs=2, workers=2), log=lines.append)
    assert any("resuming" in line for line in lines)
    assert [r["epoch"] for r in resumed.history] == [1, 2]
    assert resumed.history[1]["loss"] == pytest.approx(whole.history[1]["loss"], rel=1e-5)
    for a, b in zip(resumed.model.parameters(), whole.model.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    with pytest.raises(ConfigError, match="crop: checkpoint has 32, this run asks for 16"):
        finetune(faces, tmp_path / "split", tiny_cfg(weights, epochs=3, crop=16), log=lambda *a: None)


def test_init_heads_must_match_the_classes(tiny, tmp_path):
    faces, weights = tiny
    heads = EmotionHeads(HeadsConfig(in_dim=512, num_classes=7))
    torch.save({"model": heads.state_dict(), "heads_config": {"in_dim": 512, "num_classes": 7},
                "class_names": ["A", "B", "C", "D", "E", "F", "G"], "provenance": {}}, tmp_path / "h.pt")
    with pytest.raises(ConfigError, match="differ from the faces store's"):
        finetune(faces, tmp_path / "run", tiny_cfg(weights, epochs=1), init_heads=tmp_path / "h.pt",
                 log=lambda *a: None)


@pytest.mark.parametrize("field, value, message", [
    ("weights", "", "weights: give"), ("weights", "/nonexistent.pth", "is not a file"),
    ("freeze_blocks", 6, "freeze_blocks must be 0..5"), ("precision", "int8", "precision must be"),
    ("frames_per_clip", 0, "frames_per_clip must be >= 1"),
])
def test_bad_settings_stop_before_work(tiny, tmp_path, field, value, message):
    faces, weights = tiny
    with pytest.raises(ConfigError, match=message):
        finetune(faces, tmp_path / "run", replace(tiny_cfg(weights), **{field: value}))
    assert not (tmp_path / "run").exists()


def test_gradient_checkpointing_gives_the_same_gradients_and_bf16_is_close(tiny):
    _, weights = tiny
    from emotion_attention.pipeline.models.backbones import build_backbone
    backbone = build_backbone("vgg16", str(weights), input_size=32)
    trunk = backbone.net.requires_grad_(True)
    torch.manual_seed(0)
    heads = EmotionHeads(HeadsConfig(in_dim=512, num_classes=3, hidden=8))
    faces = torch.randint(0, 255, (2, 3, 3, 32, 32), dtype=torch.uint8)
    mask = torch.tensor([[True, True, False], [True, False, True]])
    grads, outs = [], []
    for ckpt, dtype in ((False, None), (True, None), (False, torch.bfloat16)):
        model = FinetuneModel(backbone, heads, grad_checkpoint=ckpt, autocast=dtype)
        model.zero_grad()
        out = model(faces, mask)
        heads.loss(out, torch.tensor([0, 2]))[0].backward()
        grads.append(trunk[0].weight.grad.clone())
        outs.append(out.log_probs.detach())
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(outs[1], outs[0])
    assert (outs[2] - outs[0]).abs().max() < 5e-2


def test_freeze_counts_and_layouts():
    trunk = build_vgg16_trunk()
    assert freeze_lower_blocks(trunk, 1) == 3 * 64 * 9 + 64 + 64 * 64 * 9 + 64
    assert not trunk[2].weight.requires_grad and trunk[VGG16_BLOCK_STARTS[1]].weight.requires_grad
    vf = trunk_state(trunk, "vggface")
    assert set(vf) == {f"conv{b}_{i}.{p}" for b, n in zip(range(1, 6), (2, 2, 3, 3, 3))
                       for i in range(1, n + 1) for p in ("weight", "bias")}


def test_bad_weights_file_names_the_expected_keys(tmp_path):
    torch.save({"fc.weight": torch.zeros(3, 3)}, tmp_path / "w.pth")
    with pytest.raises(WeightsError, match=r"(?s)features\.0\.weight.*conv1_1\.weight.*found 1 keys: fc\.weight"):
        load_trunk(str(tmp_path / "w.pth"), 0)


def test_vggface_layout_uses_mean_subtraction(tmp_path):
    path = write_standin_vgg16(tmp_path / "vf.pth", layout="vggface")
    _, info = load_trunk(str(path), 0)
    assert info["layout"] == "vggface" and info["std"] == (1.0, 1.0, 1.0)
    assert info["mean"] == (129.186, 104.762, 93.594)


def test_frame_picks_crops_and_env():
    rng = np.random.default_rng(0)
    present = np.array([True, False] * 20)
    picks = sample_frames(present, 16, rng)  # FacesClips' frame picks
    assert len(picks) == 16 and present[picks].all() and (np.diff(picks) > 0).all()
    faces = np.arange(2 * 8 * 8 * 3, dtype=np.uint8).reshape(2, 8, 8, 3)
    centre = augment_faces(faces, 4, None)
    assert centre.shape == (2, 3, 4, 4)
    assert np.array_equal(centre[1].transpose(1, 2, 0), faces[1, 2:6, 2:6])
    flips = [augment_faces(faces, 8, np.random.default_rng(k), mirror=True)[0, 0, 0, 0] for k in range(20)]
    assert {int(v) for v in flips} == {int(faces[0, 0, 0, 0]), int(faces[0, 0, 7, 0])}  # both ways happen
    kept = [augment_faces(faces, 8, np.random.default_rng(k), mirror=False)[0, 0, 0, 0] for k in range(20)]
    assert {int(v) for v in kept} == {int(faces[0, 0, 0, 0])}
    with pytest.raises(ValueError, match="crop 9 is larger"):
        augment_faces(faces, 9, None)
    env = dist_env_from({"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1"})
    assert (env.rank, env.world_size, env.local_rank, env.is_main) == (3, 4, 1, False)
    assert dist_env_from({}).world_size == 1
    assert resolve_precision("fp32", torch.device("cpu")) is None
    assert resolve_precision("bf16", torch.device("cpu")) == torch.bfloat16


def test_cli_reports_a_mismatched_resume_without_work(tiny, tmp_path):
    from click.testing import CliRunner

    from emotion_attention.cli.emo_train import finetune as finetune_cli

    faces, weights = tiny
    finetune(faces, tmp_path / "run", tiny_cfg(weights, epochs=1), log=lambda *a: None)
    before = (tmp_path / "run" / "checkpoint.pt").stat().st_mtime_ns
    res = CliRunner().invoke(finetune_cli, [str(faces), "--out", str(tmp_path / "run"), "--weights", str(weights),
                                            "--epochs", "2", "--crop", "16"])
    assert res.exit_code == 1 and "crop: checkpoint has 32, this run asks for 16" in res.output
    assert "Traceback" not in res.output
    assert (tmp_path / "run" / "checkpoint.pt").stat().st_mtime_ns == before


def test_a_diverging_learning_rate_stops_fine_tuning_with_a_message(tiny, tmp_path):
    from emotion_attention.pipeline.training.loop import Diverged

    faces, weights = tiny
    with pytest.raises(Diverged, match=r"epoch \d+, step \d+: the loss is (nan|inf).*lower --lr"):
        finetune(faces, tmp_path / "run", tiny_cfg(weights, epochs=3, lr_heads=1e30, batch_clips=1),
                 log=lambda *a: None)
