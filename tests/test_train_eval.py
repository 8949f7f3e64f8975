"""Training on a features store, resume, checkpoints, evaluation reports, provenance, CLI vs import API."""
import csv
import json
import math
from dataclasses import asdict, replace

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from emotion_attention.cache.errors import StoreMismatch
from emotion_attention.cache.errors import ConfigError
from emotion_attention.cache.features_store import FeaturesStore
from emotion_attention.cli import emo_eval, emo_train
from emotion_attention.pipeline.configs import EvalConfig
from emotion_attention.pipeline.stages.evaluate import evaluate
from emotion_attention.pipeline.training.metrics import predict_video
from emotion_attention.pipeline.models.heads import EmotionHeads, load_heads
from emotion_attention.pipeline.configs import HeadsConfig
from emotion_attention.pipeline.data.synthetic import SyntheticConfig, write_synthetic_store
from emotion_attention.pipeline.configs import TrainConfig
from emotion_attention.pipeline.stages.heads import heads_config_for_store, train_heads
from emotion_attention.pipeline.training.batches import holdout_split

TINY = SyntheticConfig(train_clips=40, val_clips=12, frames=6, evidence_frames=2, grid=3, dim=8,
                       num_classes=3, seed=0)
FAST = TrainConfig(epochs=2, batch_size=8, prefetch=1, holdout_fraction=0.2)


@pytest.fixture(scope="module")
def store_path(tmp_path_factory):
    return write_synthetic_store(tmp_path_factory.mktemp("feats") / "tiny.h5", TINY)["path"]


@pytest.fixture(scope="module")
def trained(store_path, tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "heads"
    cfg = replace(FAST, epochs=4)
    return out, cfg, train_heads(store_path, out, cfg, heads_config_for_store(store_path, hidden=8))


def read_log(path):
    with open(path) as fh:
        return list(csv.DictReader(fh))


def test_training_lowers_the_loss_and_logs_every_epoch(trained):
    out, cfg, result = trained
    log = read_log(out / "log.csv")
    assert [int(r["epoch"]) for r in log] == [1, 2, 3, 4]
    assert float(log[-1]["loss"]) < 0.8 * float(log[0]["loss"])
    for row in log:
        assert math.isclose(float(row["loss"]), float(row["ce"]) + 1.0 * float(row["penalty"]), rel_tol=1e-4)
    assert float(log[0]["lr"]) == cfg.lr and float(log[1]["lr"]) < cfg.lr      # SGDR anneals within a cycle
    assert result["last"]["epoch"] == 4
    assert result["selected"]["holdout_acc"] == max(r["holdout_acc"] for r in result_history(out))
    assert {"last.pt", "best.pt", "log.csv", "config.json", "result.json"} <= {p.name for p in out.iterdir()}


def result_history(out):
    return torch.load(out / "last.pt", weights_only=True)["history"]


def test_model_selection_never_sees_the_validation_split(trained, store_path):
    out, cfg, result = trained
    config = json.loads((out / "config.json").read_text())
    assert config["holdout_ids"] and all(cid.startswith("Train/") for cid in config["holdout_ids"])
    assert result["fit_clips"] + result["holdout_clips"] == TINY.train_clips
    assert config["train_config"] == asdict(cfg)
    fit, held = holdout_split([f"c{i}" for i in range(10)], [0] * 5 + [1] * 5, 0.2, seed=0)
    assert len(held) == 2 and not set(fit) & set(held)


def test_checkpoint_round_trip(trained, store_path):
    out, cfg, _ = trained
    model, ckpt = load_heads(out / "best.pt")
    assert set(ckpt) >= {"model", "heads_config", "train_config", "class_names", "provenance", "epoch",
                         "optimizer", "scheduler", "history"}
    with FeaturesStore(store_path) as store:
        assert ckpt["provenance"] == store.provenance and ckpt["class_names"] == store.class_names
        cid = store.complete_ids("Val")[0]
        maps, present = store.read_clip(cid)
    assert ckpt["heads_config"]["hidden"] == 8 and isinstance(model, EmotionHeads)
    rebuilt = EmotionHeads(HeadsConfig(**ckpt["heads_config"]))
    rebuilt.load_state_dict(ckpt["model"])
    a, b = predict_video(model, maps, present), predict_video(rebuilt, maps[0], present)  # (V,F,L,D) == (F,L,D)
    assert np.array_equal(a["probs"], b["probs"]) and np.array_equal(a["frame_weights"], b["frame_weights"])
    assert a["frame_weights"][~present].sum() == 0 and a["probs"].sum() == pytest.approx(1, abs=1e-5)


def test_resume_continues_exactly_where_it_stopped(store_path, trained, tmp_path):
    out, cfg, _ = trained
    heads_cfg = heads_config_for_store(store_path, hidden=8)
    train_heads(store_path, tmp_path / "r", replace(cfg, epochs=2), heads_cfg)
    with pytest.raises(ConfigError, match="resume"):  # the one resume rule: a changed setting is refused
        train_heads(store_path, tmp_path / "r", replace(cfg, lr=cfg.lr / 2), heads_cfg)
    train_heads(store_path, tmp_path / "r", cfg, heads_cfg, resume=True)
    straight, resumed = (torch.load(p / "last.pt", weights_only=True) for p in (out, tmp_path / "r"))
    for key, value in straight["model"].items():
        assert torch.equal(value, resumed["model"][key]), key
    drop = (lambda rows: [{k: v for k, v in r.items() if k != "seconds"} for r in rows])
    assert drop(straight["history"]) == drop(resumed["history"])
    with pytest.raises(ConfigError, match="heads_config.reg"):
        train_heads(store_path, tmp_path / "r", replace(cfg, epochs=5), replace(heads_cfg, reg=0.5), resume=True)


def test_streaming_the_store_trains_exactly_like_holding_it_in_memory(store_path, tmp_path):
    heads_cfg = heads_config_for_store(store_path, hidden=8)
    states = []
    for mode in ("always", "never"):
        result = train_heads(store_path, tmp_path / mode, replace(FAST, in_memory=mode), heads_cfg)
        assert result["in_memory"] == (mode == "always")
        states.append(torch.load(tmp_path / mode / "last.pt", weights_only=True)["model"])
    for key in states[0]:
        assert torch.allclose(states[0][key], states[1][key], atol=1e-6), key


def test_config_that_does_not_fit_the_store_stops_before_training(store_path, tmp_path):
    with pytest.raises(ConfigError, match="D=8"):
        train_heads(store_path, tmp_path / "x", FAST, HeadsConfig(in_dim=16, num_classes=3))
    assert not (tmp_path / "x").exists()


# ---- evaluation on a hand-checkable case ------------------------------------------------------------

CLASSES = ["Angry", "Disgust", "Fear"]


def write_hand_store(path, provenance):
    """Frames whose maps equal a class's one-hot vector times a gain: with identity heads the
    frame scores are exactly those vectors, so every probability can be computed by hand."""
    e = np.eye(3, dtype=np.float32)
    clips = {  # clip id -> frames (class index, gain) or None for an absent frame
        "Val/Angry/a0": [(0, 5.0), (0, 3.0)], "Val/Angry/a1": [(0, 2.0)], "Val/Angry/a2": [(1, 4.0), None],
        "Val/Disgust/d0": [(1, 1.0)], "Val/Fear/f0": [(1, 2.0), (2, 1.0)], "Val/Fear/f1": [(2, 6.0)],
        "Val/Fear/f2": [None, None],
    }
    with FeaturesStore(path, "a", provenance=provenance, class_names=CLASSES) as store:
        for cid, frames in clips.items():
            maps = np.stack([np.zeros(3, np.float32) if f is None else f[1] * e[f[0]] for f in frames])
            maps = np.repeat(maps[None, :, None, :], 2, axis=2)              # (V=1, F, L=2, D=3)
            store.write_clip(cid, maps, np.array([f is not None for f in frames]),
                             {"label": cid.split("/")[1], "split": "Val"})
    return path


@pytest.fixture()
def hand_case(tmp_path):
    provenance = {"backbone": "hand", "seed": 1}
    store = write_hand_store(tmp_path / "hand.h5", provenance)
    cfg = HeadsConfig(in_dim=3, num_classes=3, spatial="mean", pooling="tp")
    model = EmotionHeads(cfg)
    with torch.no_grad():
        model.classifier.weight.copy_(torch.eye(3))
    ckpt = tmp_path / "hand.pt"
    torch.save({"model": model.state_dict(), "heads_config": asdict(cfg), "train_config": {},
                "class_names": CLASSES, "provenance": provenance, "epoch": 0, "optimizer": {},
                "scheduler": {}, "history": []}, ckpt)
    return store, ckpt


def test_evaluation_metrics_and_report_on_a_hand_checkable_case(hand_case, tmp_path):
    store, ckpt = hand_case
    m = evaluate(store, ckpt, "val", tmp_path / "report", EvalConfig(), progress=False)
    # predictions: a0 A, a1 A, a2 D, d0 D, f0 D (2 > 1), f1 F; f2 has no face and is skipped
    assert m["confusion"] == [[2, 1, 0], [0, 1, 0], [0, 1, 1]]
    assert m["accuracy"] == pytest.approx(4 / 6) and m["uar"] == pytest.approx((2 / 3 + 1 + 1 / 2) / 3)
    assert m["per_class_recall"] == pytest.approx({"Angry": 2 / 3, "Disgust": 1.0, "Fear": 0.5})
    assert m["skipped"] == 1 and "Val/Fear/f2" in (tmp_path / "report" / "failures.jsonl").read_text()
    # p(f|S) and p(c|S) of a0 by Eq. 5-6: cells e^5, 1, 1 (frame 0) and e^3, 1, 1 (frame 1)
    z = math.exp(5) + math.exp(3) + 4
    a0 = json.loads((tmp_path / "report" / "predictions.json").read_text())[0]
    assert a0["clip_id"] == "Val/Angry/a0"
    assert a0["frame_weights"] == pytest.approx([(math.exp(5) + 2) / z, (math.exp(3) + 2) / z], abs=1e-6)
    assert a0["probs"]["Angry"] == pytest.approx((math.exp(5) + math.exp(3)) / z, abs=1e-6)
    a2 = json.loads((tmp_path / "report" / "predictions.json").read_text())[2]
    assert a2["frame_weights"] == [1.0, 0.0]                               # the absent frame gets nothing
    rows = list(csv.reader(open(tmp_path / "report" / "confusion.csv")))
    assert rows[0] == ["true\\pred", *CLASSES] and rows[3] == ["Fear", "0", "1", "1"]
    norm = list(csv.reader(open(tmp_path / "report" / "confusion_normalised.csv")))
    assert [float(x) for x in norm[1][1:]] == pytest.approx([2 / 3, 1 / 3, 0], abs=1e-6)
    preds = list(csv.DictReader(open(tmp_path / "report" / "predictions.csv")))
    assert [p["pred"] for p in preds] == ["Angry", "Angry", "Disgust", "Disgust", "Disgust", "Fear"]
    import matplotlib.image
    image = matplotlib.image.imread(tmp_path / "report" / "confusion.png")
    assert image.shape[0] > 300 and image.shape[1] > 800 and image[..., :3].std() > 0.05
    assert json.loads((tmp_path / "report" / "config.json").read_text())["eval"]["frames"] == 0


def test_sampled_frames_at_test_time(hand_case):
    store, ckpt = hand_case
    m = evaluate(store, ckpt, "Val", None, EvalConfig(frames=1, seed=3), progress=False)
    assert all(len(r["frames"]) == 1 for r in m["records"])
    assert m["records"][0]["frame_weights"].sum() == pytest.approx(1.0)


def test_a_checkpoint_from_another_store_is_refused_naming_the_difference(hand_case, tmp_path):
    store, ckpt = hand_case
    other = write_hand_store(tmp_path / "other.h5", {"backbone": "hand", "seed": 2})
    with pytest.raises(StoreMismatch, match="(?s)seed: store has 2, the checkpoint has 1.*evaluate it on the features"):
        evaluate(other, ckpt, "Val", tmp_path / "no", progress=False)
    assert not (tmp_path / "no").exists()


def test_cli_matches_the_import_api(hand_case, store_path, tmp_path):
    store, ckpt = hand_case
    runner = CliRunner()
    res = runner.invoke(emo_eval.main, [str(store), "--checkpoint", str(ckpt), "--out", str(tmp_path / "cli")])
    assert res.exit_code == 0, res.output
    assert "accuracy (WAR) 0.6667, UAR 0.7222" in res.output
    api = evaluate(store, ckpt, "Val", None, progress=False)
    cli = json.loads((tmp_path / "cli" / "metrics.json").read_text())
    assert cli["confusion"] == api["confusion"] and cli["uar"] == api["uar"]
    res = runner.invoke(emo_train.main, ["heads", store_path, "--out", str(tmp_path / "t"), "--epochs", "1",
                                         "--batch-size", "8", "--hidden", "8", "--holdout", "0.2"])
    assert res.exit_code == 0, res.output
    train_heads(store_path, tmp_path / "a", replace(FAST, epochs=1, prefetch=TrainConfig.prefetch),
                heads_config_for_store(store_path, hidden=8))
    a, b = (torch.load(tmp_path / d / "last.pt", weights_only=True) for d in ("t", "a"))
    assert a["train_config"] == b["train_config"] and a["heads_config"] == b["heads_config"]
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    res = runner.invoke(emo_eval.main, [str(store), "--checkpoint", str(ckpt), "--out", str(tmp_path / "x"),
                                        "--frames", "zero"])
    assert res.exit_code != 0 and "use 'all' or a positive number" in res.output


def test_ablation_runs_rows_over_seeds_and_writes_the_table(store_path, tmp_path):
    from emotion_attention.pipeline.configs import AblationConfig
    from emotion_attention.pipeline.stages.ablate import ablate
    cfg = AblationConfig(seeds=2, rows=("tp", "tp_sa2_reg1", "avg"))
    result = ablate(store_path, tmp_path / "abl", cfg, replace(FAST, epochs=1))
    assert [(r["row"], r["seed"]) for r in result["runs"]] == [
        ("tp", 0), ("tp", 1), ("tp_sa2_reg1", 0), ("tp_sa2_reg1", 1), ("avg", 0), ("avg", 1)]
    table = (tmp_path / "abl" / "table.md").read_text()
    acc = [100 * r["accuracy"] for r in result["runs"] if r["row"] == "tp"]
    assert f"| VGG16+TP | - | - | {np.mean(acc):.1f} ± {np.std(acc):.1f} |" in table
    assert "| VGG16+TP+SA | 2 | 1 |" in table and "| 49.0 |" in table      # Table 1 row beside the paper
    assert "| VGG16+AVG |" in table and "| 46.0 |" in table                  # Table 2
    assert "SHIFT" not in table                                              # rows not run are not invented
    stamp = (tmp_path / "abl" / "tp" / "seed0" / "last.pt").stat().st_mtime_ns
    again = ablate(store_path, tmp_path / "abl", cfg, replace(FAST, epochs=1))  # finished runs are reused
    assert again["runs"] == result["runs"]
    assert (tmp_path / "abl" / "tp" / "seed0" / "last.pt").stat().st_mtime_ns == stamp
    with pytest.raises(ConfigError, match="unknown rows"):
        AblationConfig(rows=("tp", "nope"))


def test_streamed_reads_equal_the_clips_held_in_memory(store_path):
    from emotion_attention.pipeline.training.batches import ClipSource
    with FeaturesStore(store_path) as store:
        ids = store.complete_ids("Train")[:5]
        held = ClipSource(store, ids, in_memory=True)
        streamed = ClipSource(store, ids, in_memory=False)
        for visit in range(2):
            for k, cid in enumerate(ids):
                a = held.read(cid, 3, view=k % 2, rng=np.random.default_rng([visit, k]))
                b = streamed.read(cid, 3, view=k % 2, rng=np.random.default_rng([visit, k]))
                assert len(a[2]) == 3 and all(np.array_equal(x, y) for x, y in zip(a, b))
                assert b[1].all()                                  # only present frames are sampled


def test_grid_crop_augmentation_trains_on_windows_of_the_cached_grid(store_path, tmp_path):
    from emotion_attention.pipeline.training.batches import ClipSource
    from emotion_attention.pipeline.stages.heads import epoch_batches
    cfg = replace(FAST, crop_cells=2, random_view=False)
    with FeaturesStore(store_path) as store:
        ids = store.complete_ids("Train")[:4]
        labels = {cid: 0 for cid in ids}
        source = ClipSource(store, ids, in_memory=True)
        full = {cid: store.read_clip(cid)[0][0].astype(np.float32) for cid in ids}  # (F, 9, D) on a 3x3 grid
        maps, mask, _, _ = next(epoch_batches(source, ids, labels, cfg, epoch=0))
    assert maps.shape[2] == 4                                      # 2x2 windows of the 3x3 grid
    windows = {(t, l): [3 * (t + i) + (l + j) for i in range(2) for j in range(2)] for t in (0, 1) for l in (0, 1)}
    for clip in maps:                                              # every clip's frames are one window of its maps
        frame = clip[0].numpy()
        assert any(np.allclose(frame, full[cid][f][w]) for cid in ids for f in range(len(full[cid]))
                   for w in windows.values())
    result = train_heads(store_path, tmp_path / "crop", cfg, heads_config_for_store(store_path, hidden=8))
    assert result["last"]["holdout_acc"] is not None               # held-out clips use the whole grid
    with pytest.raises(ConfigError, match="crop_cells"):
        TrainConfig(crop_cells=-1)


# -- heads on features of any scale; divergence; unreadable checkpoints ------------------------------------
SCALED = SyntheticConfig(train_clips=60, val_clips=6, frames=6, evidence_frames=2, grid=3, dim=8, num_classes=3,
                         seed=0)
SCALE_CFG = TrainConfig(epochs=8, batch_size=8, prefetch=0, holdout_fraction=0.25)


def _train_at(scale, tmp_path, standardise=True, cfg=SCALE_CFG):
    path = write_synthetic_store(tmp_path / f"s{scale}.h5", replace(SCALED, scale=scale))["path"]
    return train_heads(path, tmp_path / f"run{scale}{standardise}", cfg,
                       heads_config_for_store(path, hidden=8, standardise=standardise))


def test_standardised_heads_learn_alike_on_maps_scaled_by_1e_3_and_1e3(tmp_path):
    base = _train_at(8.0, tmp_path)                    # the synthetic default scale: conv5-like norms
    tiny, huge = (_train_at(scale, tmp_path) for scale in (8e-3, 8e3))  # 1e-3 and 1e3 times that
    for result in (tiny, huge):
        assert result["selected"]["holdout_acc"] == base["selected"]["holdout_acc"] == 1.0
        assert result["warning"] is None
    assert tiny["last"]["loss"] == pytest.approx(huge["last"]["loss"], rel=1e-3)  # standardisation: scale-free
    heads, ckpt = load_heads(tmp_path / "run8000.0True" / "best.pt")
    assert float(heads.map_std.mean()) > 100 and ckpt["heads_config"]["standardise"]  # the statistics travel


def test_maps_at_a_sane_scale_train_exactly_as_the_papers_raw_maps(tmp_path):
    on, off = _train_at(8.0, tmp_path), _train_at(8.0, tmp_path, standardise=False)
    heads_on, _ = load_heads(tmp_path / "run8.0True" / "best.pt")
    heads_off, _ = load_heads(tmp_path / "run8.0False" / "best.pt")
    assert torch.equal(heads_on.map_mean, torch.zeros_like(heads_on.map_mean))   # identity buffers
    assert torch.equal(heads_on.map_std, torch.ones_like(heads_on.map_std))
    for name, value in heads_off.state_dict().items():
        torch.testing.assert_close(heads_on.state_dict()[name], value, rtol=0, atol=0)
    assert on["last"]["loss"] == off["last"]["loss"]


def test_raw_tiny_maps_stall_at_the_majority_class_and_the_run_says_what_to_try(tmp_path):
    with pytest.warns(UserWarning, match="never beat the majority class"):
        result = _train_at(8e-3, tmp_path, standardise=False)   # the paper's raw maps at random-VGG16 scale
    assert result["selected"]["holdout_acc"] == pytest.approx(1 / 3)
    assert "--lr" in result["warning"] and "backbone weights" in result["warning"]
    sane = _train_at(8.0, tmp_path, standardise=False)          # the paper's setting where the scale is sane
    assert sane["selected"]["holdout_acc"] == 1.0 and sane["warning"] is None


def test_a_diverging_learning_rate_stops_at_the_first_non_finite_loss(store_path, tmp_path):
    from emotion_attention.pipeline.training.loop import Diverged

    cfg = replace(FAST, lr=1e30, epochs=3)
    with pytest.raises(Diverged, match=r"epoch 1, step \d+: the loss is nan.*lower --lr"):
        train_heads(store_path, tmp_path / "nan", cfg, heads_config_for_store(store_path, hidden=8, standardise=False))
    assert not (tmp_path / "nan" / "last.pt").exists()          # nothing non-finite was saved
    res = CliRunner().invoke(emo_train.main, ["heads", store_path, "--out", str(tmp_path / "cli"), "--lr", "1e30",
                                              "--no-standardise", "--epochs", "3", "--batch-size", "8", "--holdout", "0.2"])
    assert res.exit_code == 1 and "not finite" in res.output and "Traceback" not in res.output


@pytest.mark.parametrize("content", [b"", b"PK\x03\x04 truncated", b"not a checkpoint at all"])
def test_truncated_or_foreign_checkpoints_are_one_line_user_errors(trained, tmp_path, content):
    from emotion_attention.cache.errors import UserError

    out, _, _ = trained
    whole = (out / "best.pt").read_bytes()
    for name, data in (("cut.pt", whole[:len(whole) // 2]), ("other.pt", content)):
        (tmp_path / name).write_bytes(data)
        with pytest.raises(UserError, match="cannot be read as a checkpoint") as info:
            load_heads(tmp_path / name)
        assert "weights_only" not in str(info.value) and "\n" not in str(info.value)
    torch.save({"model": torch.nn.Linear(2, 2)}, tmp_path / "pickled.pt")   # an object, not plain tensors
    with pytest.raises(UserError, match="not a plain checkpoint") as info:
        load_heads(tmp_path / "pickled.pt")
    assert "weights_only" not in str(info.value)
