"""The one stage contract: every stage is run(cfg, inputs, out, *, log, progress) -> StageSummary, with one
resume rule, one failure log per output appended per run, one resolved-config file that --config replays, and
one versioned checkpoint format."""
from __future__ import annotations

import importlib
import inspect
import json
import pkgutil
import shutil
from dataclasses import replace

import pytest
import torch
from click.testing import CliRunner

import emotion_attention.pipeline.stages as stages
from emotion_attention.cache.errors import ConfigError
from emotion_attention.cli import emo_cache, emo_train
from emotion_attention.pipeline.configs import HeadsRunConfig, PreprocessConfig, TrainConfig
from emotion_attention.pipeline.core.stage import Output, StageSummary
from emotion_attention.pipeline.data.synthetic import SyntheticConfig, write_synthetic_store
from emotion_attention.pipeline.models.checkpoint import CHECKPOINT_FORMAT, CHECKPOINT_VERSION, CheckpointError
from emotion_attention.pipeline.models.heads import load_heads
from fixtures_preprocess import copy_sample, write_bad_media

COMMAND_STAGES = ("check", "faces", "extract", "heads", "finetune", "evaluate", "cv", "ablate", "predict")
TINY = SyntheticConfig(train_clips=24, val_clips=6, frames=5, evidence_frames=2, grid=3, dim=8, num_classes=3)
QUICK = HeadsRunConfig(train_config=TrainConfig(epochs=2, batch_size=8, prefetch=0, holdout_fraction=0.2))


@pytest.mark.parametrize("name", COMMAND_STAGES)
def test_every_command_stage_has_the_one_run_signature(name):
    run = importlib.import_module(f"emotion_attention.pipeline.stages.{name}").run
    params = inspect.signature(run).parameters
    assert list(params)[:3] == ["cfg", "inputs", "out"]
    assert params["log"].kind is inspect.Parameter.KEYWORD_ONLY and params["progress"].default is True


def test_the_stage_modules_are_named_after_their_commands():
    found = {m.name for m in pkgutil.iter_modules(stages.__path__)}
    assert set(COMMAND_STAGES) | {"explain"} == found


def test_outputs_name_their_config_and_failure_log(tmp_path):
    store, folder = Output(tmp_path / "faces.h5"), Output(tmp_path / "runs" / "heads")
    assert (store.config_path.name, store.failures_path.name) == ("faces.h5.config.json", "faces.h5.failures.jsonl")
    assert (folder.config_path, folder.failures_path) == (folder.path / "config.json", folder.path / "failures.jsonl")
    assert folder.prepare() == folder.path and folder.path.is_dir()


def test_an_output_folder_that_cannot_be_written_is_one_line(tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        if (locked / "probe").exists() or _writable(locked):
            pytest.skip("running as a user who can write anywhere (root without a read-only mount)")
        with pytest.raises(ConfigError, match="folder not writable"):
            Output(locked / "run").prepare()
    finally:
        locked.chmod(0o700)


def _writable(folder) -> bool:
    try:
        (folder / "probe").write_text("x")
        (folder / "probe").unlink()
        return True
    except OSError:
        return False


def test_faces_failure_log_is_appended_per_run_and_forgets_clips_that_later_succeed(tmp_path, samples_dir):
    """Run 1: a truncated video fails. Run 2, after the file is repaired: it succeeds and leaves the log, while
    a clip that still fails keeps one line, not one per run."""
    data = tmp_path / "data"
    copy_sample(samples_dir, "single_face.mp4", data / "Train" / "Happy" / "good.mp4")
    bad = write_bad_media(data / "Train" / "Sad")
    for name in ("empty", "text"):
        bad[name].unlink()
    still_bad = data / "Train" / "Sad" / "also_bad.mp4"
    shutil.copyfile(bad["corrupt"], still_bad)
    cfg = PreprocessConfig(workers=1, max_fail_fraction=1.0)
    cfg = replace(cfg, decode=replace(cfg.decode, max_frames=4))
    faces = importlib.import_module("emotion_attention.pipeline.stages.faces")
    out = tmp_path / "faces.h5"
    first = faces.run(cfg, [data], out, progress=False)
    assert isinstance(first, StageSummary) and len(first.failures) == 2
    log = Output(out).failures_path
    assert sorted(json.loads(line)["clip_id"] for line in log.read_text().splitlines()) == [
        "Train/Sad/also_bad.mp4", "Train/Sad/corrupt.mp4"]
    shutil.copyfile(samples_dir / "single_face.mp4", bad["corrupt"])  # repaired
    second = faces.run(cfg, [data], out, progress=False)
    assert second.result.written == 1 and second.result.skipped == 1
    assert [json.loads(line)["clip_id"] for line in log.read_text().splitlines()] == ["Train/Sad/also_bad.mp4"]


def test_faces_config_replays_the_run(tmp_path, samples_dir):
    """`emo-cache faces --config OUT.config.json` alone reruns the same data into the same store (a resume)."""
    data = tmp_path / "data"
    copy_sample(samples_dir, "single_face.mp4", data / "Train" / "Happy" / "a.mp4")
    out = tmp_path / "faces.h5"
    first = CliRunner().invoke(emo_cache.main, ["faces", str(data), "--out", str(out), "--max-frames", "3",
                                                "--workers", "1", "--quiet"])
    assert first.exit_code == 0, first.output
    saved = json.loads(Output(out).config_path.read_text())
    assert saved["stage"] == "faces" and saved["config"]["decode"]["max_frames"] == 3
    again = CliRunner().invoke(emo_cache.main, ["faces", "--config", str(Output(out).config_path), "--quiet"])
    assert again.exit_code == 0, again.output
    assert "0 clip(s) written, 1 already complete" in again.output  # same store, same settings: resumed
    other = CliRunner().invoke(emo_cache.main, ["faces", "--config", str(Output(out).config_path), "--quiet",
                                                "--max-frames", "2"])
    assert other.exit_code == 1 and "max_frames" in other.output  # a changed setting is refused, naming its key


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return write_synthetic_store(tmp_path_factory.mktemp("feats") / "tiny.h5", TINY)["path"]


def test_heads_resumes_by_default_and_refuses_a_changed_setting_naming_it(store, tmp_path):
    heads = importlib.import_module("emotion_attention.pipeline.stages.heads")
    out = tmp_path / "run"
    heads.run(QUICK, [store], out, progress=False)
    stamp = (out / "last.pt").stat().st_mtime_ns
    again = heads.run(QUICK, [store], out, progress=False)  # finished: nothing is redone
    assert (out / "last.pt").stat().st_mtime_ns == stamp and again.result["last"]["epoch"] == 2
    changed = replace(QUICK, train_config=replace(QUICK.train_config, lr=0.05))
    with pytest.raises(ConfigError, match=r"train_config\.lr: checkpoint has 0\.1, this run asks for 0\.05"):
        heads.run(changed, [store], out, progress=False)


def test_heads_config_replays_through_the_cli(store, tmp_path):
    out = tmp_path / "run"
    first = CliRunner().invoke(emo_train.main, ["heads", str(store), "--out", str(out), "--epochs", "2",
                                                "--batch-size", "8", "--hidden", "8", "--quiet"])
    assert first.exit_code == 0, first.output
    saved = json.loads(Output(out).config_path.read_text())
    assert saved["stage"] == "heads" and saved["train_config"]["epochs"] == 2 and saved["heads_config"]["hidden"] == 8
    stamp = (out / "last.pt").stat().st_mtime_ns
    replay = CliRunner().invoke(emo_train.main, ["heads", "--config", str(out / "config.json"), "--quiet"])
    assert replay.exit_code == 0, replay.output  # same settings: accepted, and finished work is skipped
    assert (out / "last.pt").stat().st_mtime_ns == stamp
    more = CliRunner().invoke(emo_train.main, ["heads", "--config", str(out / "config.json"), "--epochs", "3",
                                               "--quiet"])
    assert more.exit_code == 0, more.output
    assert torch.load(out / "last.pt", weights_only=True)["epoch"] == 2  # 0-based: the third epoch ran


def test_checkpoints_carry_one_versioned_format_and_old_ones_still_read(store, tmp_path):
    heads = importlib.import_module("emotion_attention.pipeline.stages.heads")
    heads.run(QUICK, [store], tmp_path / "run", progress=False)
    ckpt = torch.load(tmp_path / "run" / "best.pt", weights_only=True)
    assert (ckpt["format"], ckpt["version"], ckpt["kind"]) == (CHECKPOINT_FORMAT, CHECKPOINT_VERSION, "heads")
    old = {k: v for k, v in ckpt.items() if k not in ("format", "version", "kind")}  # the previous release's
    torch.save(old, tmp_path / "old.pt")
    model, loaded = load_heads(tmp_path / "old.pt")
    assert loaded["version"] == 0 and torch.equal(model.state_dict()["classifier.weight"],
                                                  ckpt["model"]["classifier.weight"])
    torch.save({**ckpt, "version": CHECKPOINT_VERSION + 1}, tmp_path / "new.pt")
    with pytest.raises(CheckpointError, match="newer than this code reads"):
        load_heads(tmp_path / "new.pt")
