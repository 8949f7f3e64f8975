"""Folds end to end on a generated 5-fold features store: heads --fold, eval --fold, cv, ablate over folds."""
import csv
import json

import numpy as np
import pytest
from click.testing import CliRunner

from emotion_attention.cache.errors import ConfigError
from emotion_attention.cache.features_store import FeaturesStore
from emotion_attention.cli.emo_eval import main as emo_eval
from emotion_attention.cli.emo_train import main as emo_train
from emotion_attention.pipeline.stages.cv import run_cv
from emotion_attention.pipeline.data.folds import parse_folds, select_ids, store_folds
from emotion_attention.pipeline.data.synthetic import SyntheticConfig, make_clip, make_patterns

FOLDS, CLIPS = 5, 50
SYN = SyntheticConfig(num_classes=3, frames=6, evidence_frames=2, grid=2, evidence_positions=1, dim=16,
                      absent_frames=1)
FAST = ["--epochs", "2", "--batch-size", "8", "--frames", "4", "--in-memory", "always", "--prefetch", "0",
        "--device", "cpu"]


def write_fold_store(path, folds=FOLDS, clips=CLIPS):
    """A DFEW-like store: every clip split "All" with a folds attribute; clip i tests in fold i % folds + 1."""
    rng = np.random.default_rng(0)
    protos, marker = make_patterns(SYN, rng)
    names = ["Happy", "Sad", "Neutral"]
    with FeaturesStore(path, "a", provenance={"backbone": "synthetic", "folds": folds}, class_names=names) as store:
        for i in range(clips):
            label = i % SYN.num_classes
            clip = make_clip(label, protos, marker, SYN, rng)
            test = i % folds + 1
            attrs = {"label": names[label], "split": "All",
                     "folds": json.dumps({str(k): "test" if k == test else "train" for k in range(1, folds + 1)})}
            store.write_clip(f"All/{names[label]}/{i:05d}", clip["maps"], clip["present"], attrs)
    return path


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return write_fold_store(tmp_path_factory.mktemp("folds") / "features.h5")


def test_select_ids_by_fold(store):
    with FeaturesStore(store, "r") as s:
        assert store_folds(s) == [1, 2, 3, 4, 5]
        test2 = select_ids(s, fold=2, part="test")
        train2 = select_ids(s, fold=2, part="train")
        assert len(test2) == CLIPS // FOLDS and len(train2) == CLIPS - CLIPS // FOLDS
        assert not set(test2) & set(train2) and all(int(c[-5:]) % FOLDS == 1 for c in test2)
        assert select_ids(s, split="all") == s.complete_ids()
        with pytest.raises(ConfigError, match="fold 6 is not in this store; its folds are 1, 2, 3, 4, 5"):
            select_ids(s, fold=6)
    assert parse_folds(None) == {} and parse_folds('{"3": "test"}') == {3: "test"}


def test_heads_fold_trains_on_the_train_part_and_eval_fold_tests_the_test_part(store, tmp_path):
    run = tmp_path / "heads"
    result = CliRunner().invoke(emo_train, ["heads", str(store), "--out", str(run), "--fold", "2", *FAST])
    assert result.exit_code == 0, result.output
    config = json.loads((run / "config.json").read_text())
    with FeaturesStore(store, "r") as s:
        train2, test2 = set(select_ids(s, fold=2, part="train")), set(select_ids(s, fold=2, part="test"))
    assert config["fit_clips"] + config["holdout_clips"] == len(train2)
    assert set(config["holdout_ids"]) <= train2 and not set(config["holdout_ids"]) & test2  # selection never sees test
    report = tmp_path / "eval"
    out = CliRunner().invoke(emo_eval, [str(store), "--checkpoint", str(run / "best.pt"), "--fold", "2",
                                        "--out", str(report), "--device", "cpu"])
    assert out.exit_code == 0, out.output
    metrics = json.loads((report / "metrics.json").read_text())
    assert metrics["num_clips"] == len(test2) and metrics["split"] == "fold 2 test" and metrics["fold"] == 2
    predicted = {r["clip_id"] for r in json.loads((report / "predictions.json").read_text())}
    assert predicted == test2
    missing = CliRunner().invoke(emo_eval, [str(store), "--checkpoint", str(run / "best.pt"), "--fold", "9",
                                            "--out", str(report)])
    assert missing.exit_code == 1 and "fold 9 is not in this store" in missing.output


def test_cv_end_to_end_and_resumable(store, tmp_path):
    out = tmp_path / "cv"
    result = CliRunner().invoke(emo_train, ["cv", str(store), "--out", str(out), *FAST])
    assert result.exit_code == 0, result.output
    rows = list(csv.DictReader(open(out / "cv.csv")))
    assert [r["fold"] for r in rows] == ["1", "2", "3", "4", "5", "mean", "std"]
    war = np.array([float(r["war"]) for r in rows[:5]])
    assert float(rows[5]["war"]) == pytest.approx(war.mean(), abs=1e-6)
    assert float(rows[6]["war"]) == pytest.approx(war.std(), abs=1e-6)
    assert sum(int(r["test_clips"]) for r in rows[:5]) == CLIPS == int(rows[5]["test_clips"])
    for k in range(1, 6):
        metrics = json.loads((out / f"fold_{k}" / "eval" / "metrics.json").read_text())
        assert float(rows[k - 1]["uar"]) == pytest.approx(metrics["uar"], abs=1e-6)
        assert metrics["fold"] == k
    summed = np.sum([json.loads((out / f"fold_{k}" / "fold_result.json").read_text())["confusion"]
                     for k in range(1, 6)], axis=0)
    assert summed.sum() == CLIPS
    md = (out / "cv.md").read_text()
    assert "| **mean ± std** |" in md and f"{100 * war.mean():.1f} ± {100 * war.std():.1f}" in md
    assert "| Happy | " + " | ".join(str(v) for v in summed[0]) + " |" in md
    assert (out / "confusion_sum.png").stat().st_size > 10_000
    # rerun: every fold's result exists, so nothing is trained again and the summary is the same
    stamps = {k: (out / f"fold_{k}" / "fold_result.json").stat().st_mtime_ns for k in range(1, 6)}
    (out / "fold_3" / "fold_result.json").unlink()   # as if the run had been killed during fold 3
    again = run_cv(store, out, folds=None, progress=False,
                   train_cfg=__import__("emotion_attention.pipeline.configs", fromlist=["TrainConfig"]).TrainConfig(
                       epochs=2, batch_size=8, frames_per_clip=4, in_memory="always", prefetch=0, device="cpu"))
    assert all((out / f"fold_{k}" / "fold_result.json").stat().st_mtime_ns == stamps[k] for k in (1, 2, 4, 5))
    assert again["summary"]["war"][0] == pytest.approx(war.mean(), abs=1e-6)


def test_cv_on_a_train_test_dataset(tmp_path):
    from emotion_attention.pipeline.data.synthetic import write_synthetic_store

    path = write_synthetic_store(tmp_path / "s.h5", SyntheticConfig(train_clips=12, val_clips=6, num_classes=3,
                                                                   grid=2, dim=16, frames=6))["path"]
    result = CliRunner().invoke(emo_train, ["cv", path, "--out", str(tmp_path / "cv")])
    assert result.exit_code == 1 and "carry no folds, so there is nothing to cross-validate" in result.output
    assert "--test-split Test" in result.output
    ok = CliRunner().invoke(emo_train, ["cv", path, "--out", str(tmp_path / "cv"), "--test-split", "Val", *FAST])
    assert ok.exit_code == 0, ok.output
    rows = list(csv.DictReader(open(tmp_path / "cv" / "cv.csv")))
    assert [r["fold"] for r in rows] == ["Train -> Val", "mean", "std"] and rows[0]["test_clips"] == "6"
    assert (tmp_path / "cv" / "split_Val" / "fold_result.json").exists()


def test_a_fold_store_without_fold_says_to_pass_one(store, tmp_path):
    result = CliRunner().invoke(emo_train, ["heads", str(store), "--out", str(tmp_path / "h"), *FAST])
    assert result.exit_code == 1 and "this dataset has folds (1, 2, 3, 4, 5); pass --fold K" in result.output


def test_ablate_over_folds(store, tmp_path):
    out = tmp_path / "ablate"
    result = CliRunner().invoke(emo_train, ["ablate", str(store), "--out", str(out), "--rows", "avg", "--seeds", "1",
                                            "--folds", "1,2", *FAST])
    assert result.exit_code == 0, result.output
    runs = list(csv.DictReader(open(out / "runs.csv")))
    assert [(r["row"], r["fold"]) for r in runs] == [("avg", "1"), ("avg", "2")]
    assert all(int(r["num_clips"]) == CLIPS // FOLDS for r in runs)
    assert "folds 1, 2 (each fold's test part)" in (out / "table.md").read_text()


def test_confusion_figure_scales_with_eleven_classes():
    from emotion_attention.pipeline.training.metrics import plot_confusion
    from emotion_attention.pipeline.data.layouts import MAFW_CLASSES

    seven = plot_confusion(np.eye(7, dtype=int), [f"c{i}" for i in range(7)])
    eleven = plot_confusion(np.eye(11, dtype=int), list(MAFW_CLASSES), title="summed")
    w7, h7 = seven.get_size_inches()
    w11, h11 = eleven.get_size_inches()
    assert h11 > h7 and w11 > w7 and h11 >= 0.75 * 11
    ax = eleven.axes[0]
    assert [t.get_text() for t in ax.get_xticklabels()] == list(MAFW_CLASSES)
    assert all(t.get_rotation() == 45 for t in ax.get_xticklabels())
