"""The CLI is generated from the configs: every field has its option, the options and defaults of the previous
hand-written CLI are all still there, and --config FILE replays a saved run."""
from __future__ import annotations

import dataclasses
import json
import subprocess
import sys

import click
import pytest
from click.testing import CliRunner

from emotion_attention.cli import emo_cache, emo_eval, emo_predict, emo_train
from emotion_attention.cli.options import ConfigOptions
from emotion_attention.pipeline.configs import AblationConfig, ExtractConfig, PreprocessConfig

COMMANDS = {
    "check": emo_cache.check, "faces": emo_cache.faces, "extract": emo_cache.extract, "heads": emo_train.heads,
    "cv": emo_train.cv, "ablate": emo_train.ablate, "finetune": emo_train.finetune, "eval": emo_eval.main,
    "predict": emo_predict.main,
}

# The options of the hand-written CLI before the configs drove it (git 485bfaf), with their defaults.
PREVIOUS = {
    "check": {"--classes": None, "--layout": None, "--quick": False, "--workers": None},
    "faces": {"--out": None, "--workers": None, "--backend": "loky", "--scheduler": None, "--classes": None,
              "--fps-cap": None, "--max-frames": None, "--every-nth": 1, "--size": 256, "--padding": 0.25,
              "--mode": "fast", "--detect-width": 320, "--redetect-every": 10, "--prealigned": "auto",
              "--predictor": "", "--compression": "none", "--codec": "jpeg", "--jpeg-quality": 100,
              "--jpeg-chroma-quality": 75, "--shard": None, "--max-fail-fraction": 0.05, "--layout": None,
              "--quiet": False},
    "extract": {"--out": None, "--weights": "", "--seed": None, "--backbone": "vgg16", "--input-size": None,
                "--crop": None, "--views": "1", "--precision": "auto", "--device": "auto", "--batch-size": 16,
                "--compression": "none", "--frames-per-clip": None, "--map-dtype": "float16", "--shard": None},
    "heads": {"--epochs": 30, "--batch-size": 32, "--frames": 16, "--random-view": True, "--crop-cells": 0,
              "--lr": 0.1, "--momentum": 0.9, "--weight-decay": 5e-5, "--restart-epochs": 10, "--restart-mult": 1,
              "--grad-clip": 0.0, "--holdout": 0.1, "--select": "acc", "--train-split": "Train", "--seed": 0,
              "--device": "auto", "--in-memory": "auto", "--max-memory-gb": 16.0, "--prefetch": 2, "--spatial": "sa",
              "--pooling": "tp", "--heads": 2, "--hidden": 128, "--reg": 1.0, "--lstm-hidden": 128,
              "--shift-clusters": 2, "--dropout": 0.0, "--standardise": True, "--out": None, "--fold": None,
              "--resume": True},  # the one resume rule: a matching run resumes (was a flag defaulting to off)
    "ablate": {"--out": "runs/ablate", "--seeds": 3, "--rows": None, "--eval-split": "Val", "--fold": None,
               "--folds": None, "--epochs": 30, "--lr": 0.1, "--seed": 0},
    "cv": {"--out": None, "--folds": "all", "--eval-frames": "all", "--test-split": None, "--spatial": "sa",
           "--epochs": 30, "--holdout": 0.1},
    "finetune": {"--out": None, "--backbone": "vgg16", "--init": None, "--weights": "", "--seed": 0,
                 "--split": "Train", "--epochs": 30, "--frames-per-clip": 16, "--crop": None,
                 "--mirror": True, "--lr-backbone": None, "--weight-decay": 5e-5,
                 # issue 16: unset means the recipe's (--recipe paper: 4 clips, 0.1), see RECIPE_DEFAULTS below
                 "--batch-clips": None, "--lr-heads": None, "--lr": None,
                 "--sgdr-t0": 10, "--sgdr-tmult": 1, "--freeze-blocks": 0, "--precision": "auto",
                 "--grad-checkpoint": False, "--workers": 2, "--device": "auto", "--heads": 2, "--hidden": 128,
                 "--reg": 1.0, "--holdout": 0.1, "--resume": True},
    "eval": {"--checkpoint": None, "--split": "Val", "--fold": None, "--out": None, "--frames": "all", "--seed": 0,
             "--view": 0, "--device": "auto", "--explain": False, "--faces": None},
    "predict": {"--prealigned": "auto", "--checkpoint": "", "--backbone": "auto", "--weights": "",
                "--out": "runs/predict", "--explain": False, "--keep-stores": False, "--fps-cap": None,
                "--max-frames": None, "--every-nth": 1, "--face-mode": "fast", "--batch-size": 16, "--device": "auto",
                "--precision": "auto"},
}
ROWS_DEFAULT = ",".join(AblationConfig().rows)


def option_named(command: click.Command, flag: str) -> click.Option:
    found = [p for p in command.params if isinstance(p, click.Option) and (flag in p.opts or flag in p.secondary_opts)]
    assert found, f"{command.name}: no option {flag}"
    return found[0]


@pytest.mark.parametrize("name", sorted(PREVIOUS))
def test_every_previous_option_keeps_its_name_and_default(name):
    command = COMMANDS[name]
    for flag, default in PREVIOUS[name].items():
        option = option_named(command, flag)
        expected = ROWS_DEFAULT if flag == "--rows" else default
        if flag in option.secondary_opts:   # --first-view / --no-standardise: the pair's "on" default
            continue
        actual = None if option.default is getattr(click.core, "UNSET", None) else option.default  # click 8.3+
        assert actual == expected, f"{name} {flag}: default {actual!r}, was {expected!r}"


@pytest.mark.parametrize("opts, command", [
    (emo_cache.CHECK, "check"), (emo_cache.FACES, "faces"), (emo_cache.EXTRACT, "extract"), (emo_train.HEADS, "heads"),
    (emo_train.CV, "cv"), (emo_train.ABLATE, "ablate"), (emo_train.FINETUNE, "finetune"), (emo_eval.EVAL, "eval"),
    (emo_predict.PREDICT, "predict")])
def test_every_cli_field_has_one_option_with_help(opts, command):
    fields = {f.name for f in dataclasses.fields(opts.cls) if f.metadata.get("cli", True)}
    assert {b.path[0] for b in opts.bounds} | {"class_names", "folds", "train_config", "heads_config"} >= fields
    names = {p.name for p in COMMANDS[command].params}
    for bound in opts.bounds:
        assert bound.param in names, f"{command}: field {'.'.join(bound.path)} has no option"
        option = next(p for p in COMMANDS[command].params if p.name == bound.param)
        assert option.help, f"{command} --{bound.param}: no help text in the field's metadata"


def test_build_round_trips_a_config():
    """Parsing the defaults rebuilds the default config; nested fields land in their nested config."""
    opts = ConfigOptions(PreprocessConfig)

    @click.command()
    @opts
    def cmd(**params):
        cmd.built = opts.build(params)

    CliRunner().invoke(cmd, ["--size", "128", "--fps-cap", "5", "--classes", "Happy,Sad"], catch_exceptions=False)
    built = cmd.built
    assert built.face.size == 128 and built.decode.fps_cap == 5.0 and built.class_names == ("Happy", "Sad")
    assert dataclasses.replace(built, face=PreprocessConfig().face, decode=PreprocessConfig().decode,
                               class_names=None) == PreprocessConfig()


def test_a_bad_value_names_the_field_without_a_traceback(tmp_path, samples_dir):
    data = tmp_path / "data" / "Train" / "Happy"
    data.mkdir(parents=True)
    (data / "a.mp4").write_bytes((samples_dir / "single_face.mp4").read_bytes())
    faces = CliRunner().invoke(emo_cache.faces, [str(tmp_path / "data"), "--out", str(tmp_path / "f.h5"), "--size", "8"])
    assert faces.exit_code == 1 and faces.output.strip() == "Error: size=8: chips must be at least 16 px"

    result = CliRunner().invoke(emo_cache.extract, [str(__file__), "--out", str(tmp_path / "x.h5"),
                                                    "--weights", "random"])
    assert result.exit_code == 2 and result.output.strip().splitlines()[-1] == (
        "Error: seed: give --seed exactly when --weights random (weights='random', seed=None)")
    assert "Traceback" not in result.output


def test_config_of_another_stage_is_refused(tmp_path):
    saved = tmp_path / "config.json"
    saved.write_text(json.dumps({"stage": "heads", "inputs": ["x.h5"], "out": "runs/x"}))
    result = CliRunner().invoke(emo_cache.extract, ["--config", str(saved)])
    assert result.exit_code == 1 and "made by stage 'heads', not extract" in result.output


def test_config_replays_settings_and_the_command_line_wins(tmp_path):
    """A saved extract config fills every option and the arguments; an option given on the line wins."""
    saved = tmp_path / "feats.h5.config.json"
    faces = tmp_path / "faces.h5"
    faces.write_bytes(b"")
    record = {"stage": "extract", "inputs": [str(faces)], "out": str(tmp_path / "feats.h5"),
              "config": dataclasses.asdict(ExtractConfig(weights="random", seed=3, views=2, batch_size=8,
                                                         frames_per_clip=4))}
    saved.write_text(json.dumps(record))
    seen = {}
    ctx = emo_cache.extract.make_context("extract", ["--config", str(saved), "--batch-size", "4"])
    seen.update(ctx.params)
    assert seen["faces_path"] == faces and str(seen["out"]) == record["out"]
    assert seen["weights"] == "random" and seen["seed"] == 3 and seen["views"] == 2 and seen["frames_per_clip"] == 4
    assert seen["batch_size"] == 4  # the command line wins over the file


@pytest.mark.parametrize("command", [["emo-cache", "--help"], ["emo-cache", "check", "--help"],
                                     ["emo-cache", "faces", "--help"], ["emo-cache", "extract", "--help"],
                                     ["emo-train", "--help"], ["emo-train", "heads", "--help"],
                                     ["emo-train", "cv", "--help"], ["emo-train", "ablate", "--help"],
                                     ["emo-train", "finetune", "--help"], ["emo-eval", "--help"],
                                     ["emo-predict", "--help"]])
def test_help_imports_neither_torch_nor_h5py(command):
    module = {"emo-cache": "emo_cache", "emo-train": "emo_train", "emo-eval": "emo_eval", "emo-predict": "emo_predict"}
    code = (f"import sys\nfrom emotion_attention.cli.{module[command[0]]} import main\n"
            f"try:\n    main({command[1:]!r}, prog_name={command[0]!r})\nexcept SystemExit:\n    pass\n"
            "print('HEAVY', ' '.join(m for m in ('torch', 'h5py', 'cv2', 'dlib') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert "Usage:" in done.stdout
    assert done.stdout.strip().splitlines()[-1] == "HEAVY", done.stdout.splitlines()[-1]


def test_finetune_paper_recipe_restores_the_previous_defaults_and_given_options_win():
    from emotion_attention.pipeline.configs import FinetuneConfig

    paper = FinetuneConfig(recipe="paper").with_recipe()
    assert (paper.batch_clips, paper.lr_heads, paper.warmup_epochs, paper.grad_clip, paper.guard_drop,
            paper.class_balance) == (4, 0.1, 0, 0.0, 0.0, "none")  # the defaults before issue 16, Sec. 4.2 as written
    stable = FinetuneConfig().with_recipe()
    assert (stable.warmup_epochs, stable.grad_clip, stable.guard_drop, stable.class_balance) == (1, 1.0, 0.2, "loss")
    assert FinetuneConfig(class_balance="none").with_recipe().class_balance == "none"  # given wins over the recipe
    assert stable.batch_clips is None and stable.lr_heads is None   # the backbone's batch, heads' rate per clip
    assert FinetuneConfig(recipe="paper", grad_clip=0.5).with_recipe().grad_clip == 0.5


def test_a_choice_left_unset_takes_the_recipes_value():
    """--class-balance unset on the command line stays unset until the recipe fills it (stable: loss); given,
    it wins over either recipe."""
    from emotion_attention.pipeline.configs import FinetuneConfig

    opts = ConfigOptions(FinetuneConfig)

    @click.command()
    @opts
    def cmd(**params):
        cmd.built = opts.build(params)

    for args, want in (([], "loss"), (["--recipe", "paper"], "none"), (["--class-balance", "none"], "none"),
                       (["--recipe", "paper", "--class-balance", "loss"], "loss")):
        CliRunner().invoke(cmd, ["--weights", "random", *args], catch_exceptions=False)
        assert cmd.built.with_recipe().class_balance == want, args
