"""emo-predict on the real sample videos (training-free fer-minixception + TP mode)."""
import csv
import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from emotion_attention.cache import FacesStore, FeaturesStore
from emotion_attention.cache.errors import ConfigError
from emotion_attention.cli.emo_predict import main as emo_predict
from emotion_attention.pipeline.models.fer import FER_TO_AFEW, fer_preprocess, load_fer_minixception
from emotion_attention.pipeline.stages.predict import (AFEW_CLASSES, class_activation_attention, predict_videos, tp_predict)
from emotion_attention.pipeline.configs import PredictConfig

FRAMES = 10


@pytest.fixture(scope="module")
def run(samples_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("predict")
    broken = out / "broken.mp4"
    broken.write_bytes(b"\x00\x00\x00\x18ftypmp42 this is not a video")
    videos = [samples_dir / "no_face.mp4", broken, samples_dir / "single_face.mp4"]
    lines = []
    result = predict_videos([str(v) for v in videos], out / "api",
                            PredictConfig(max_frames=FRAMES, explain=True, keep_stores=True), log=lines.append)
    return out, videos, result, lines


def test_bad_videos_are_reported_and_the_good_one_is_predicted(run):
    out, videos, result, lines = run
    assert [r.path for r in result["results"]] == [str(videos[2])]
    assert len(result["failures"]) == 2
    no_face, broken = result["failures"]   # pipeline.runtime.Failure records
    assert no_face.stage == "predict" and no_face.file.endswith("no_face.mp4")
    assert "no_face.mp4: no face found in any of its 10 decoded frames" in no_face.reason
    assert broken.file.endswith("broken.mp4") and "cannot be opened" in broken.reason
    assert (out / "api" / "failures.jsonl").read_text().count("\n") == 2
    pred = AFEW_CLASSES[result["results"][0].prediction["pred"]]
    assert any(line.startswith(f"single_face.mp4: {pred} (") for line in lines)


def test_prediction_is_fer_logits_pooled_by_tp(run, samples_dir):
    _, _, result, _ = run
    r = result["results"][0]
    faces, present = r.arrays["faces"], r.arrays["present"]
    assert faces.shape == (FRAMES, 256, 256, 3) and present.all()
    model = load_fer_minixception()
    with torch.no_grad():
        logits = model(fer_preprocess(faces)).numpy()[:, FER_TO_AFEW]      # (F, 7) the model's own forward
    expected = tp_predict(logits, present)
    p = r.prediction
    # the maps pass through float16, as in the features store: agreement to ~1e-4, not bit-exact
    np.testing.assert_allclose(p["probs"], expected["probs"], atol=1e-3)
    np.testing.assert_allclose(p["frame_weights"], expected["frame_weights"], atol=1e-4)
    assert p["probs"].sum() == pytest.approx(1.0, abs=1e-5)
    assert p["frame_weights"].sum() == pytest.approx(1.0, abs=1e-5)
    assert p["attention"].shape == (FRAMES, 1, 16)
    np.testing.assert_allclose(p["attention"].sum(-1), 1.0, atol=1e-5)
    assert p["pred"] == expected["pred"]
    assert set(r.seconds) == {"decode_align", "features", "heads"} and all(v > 0 for v in r.seconds.values())
    assert r.video_seconds == pytest.approx(FRAMES / 30.0)               # single_face.mp4 is 30 fps


def test_outputs_csv_json_figure_and_stores(run):
    out, videos, result, _ = run
    api = out / "api"
    rows = list(csv.DictReader(open(api / "predictions.csv")))
    assert len(rows) == 1 and rows[0]["pred"] == AFEW_CLASSES[result["results"][0].prediction["pred"]]
    assert sum(float(rows[0][f"p_{c}"]) for c in AFEW_CLASSES) == pytest.approx(1.0, abs=1e-4)
    frames = list(csv.DictReader(open(api / rows[0]["frames_csv"])))
    assert [int(f["frame_index"]) for f in frames] == list(range(FRAMES))
    assert sum(float(f["p_frame"]) for f in frames) == pytest.approx(1.0, abs=1e-4)
    summary = json.loads((api / "predictions.json").read_text())
    assert summary["seconds_per_video_second"]["total"] > 0
    assert json.loads((api / "config.json").read_text())["backbone_used"] == "fer-minixception"
    page = (api / "explain" / "index.html").read_text()
    assert str(videos[2]) in page
    from urllib.parse import quote

    from emotion_attention.pipeline.stages.predict import video_keys

    key = video_keys(videos)[str(videos[2])]  # named over every input, failed ones too: stable names
    figure = api / "explain" / "figures" / f"{key}.png"
    assert key.endswith("single_face.mp4") and rows[0]["frames_csv"] == f"frames/{key}.csv"
    assert quote(f"{key}.png") in page and figure.stat().st_size > 20_000
    import matplotlib.image as mpimg
    img = mpimg.imread(figure)
    assert img.std() > 0.1
    with FacesStore(api / "faces.h5", "r") as faces, FeaturesStore(api / "features.h5", "r") as feats:
        (cid,) = faces.complete_ids()
        assert faces.read_faces(cid).shape == (FRAMES, 256, 256, 3)
        assert feats.shape(cid) == (1, FRAMES, 16, 128)
        assert feats.provenance["backbone"] == "fer-minixception"
        assert feats.provenance["faces_fingerprint"] == faces.fingerprint


def test_cli_matches_the_import_api(run, samples_dir):
    out, videos, result, _ = run
    res = CliRunner().invoke(emo_predict, [str(videos[0]), str(videos[2]), "--max-frames", str(FRAMES),
                                           "--out", str(out / "cli")])
    assert res.exit_code == 0, res.output
    assert "skipped" in res.output and "no face found" in res.output
    api_rows = list(csv.DictReader(open(out / "api" / "predictions.csv")))
    cli_rows = list(csv.DictReader(open(out / "cli" / "predictions.csv")))
    for c in AFEW_CLASSES:
        assert float(cli_rows[0][f"p_{c}"]) == pytest.approx(float(api_rows[0][f"p_{c}"]), abs=1e-6)
    assert not (out / "cli" / "explain").exists() and not (out / "cli" / "faces.h5").exists()


def test_cli_exits_1_when_nothing_could_be_predicted(run):
    out, videos, _, _ = run
    res = CliRunner().invoke(emo_predict, [str(videos[1]), "--out", str(out / "none")])
    assert res.exit_code == 1 and "cannot be opened" in res.output


def test_bad_arguments_stop_before_work(tmp_path):
    res = CliRunner().invoke(emo_predict, ["x.mp4", "--checkpoint", str(tmp_path / "missing.pt"),
                                           "--out", str(tmp_path / "o")])
    assert res.exit_code == 1 and "missing.pt is not a file" in res.output and "Traceback" not in res.output
    assert not (tmp_path / "o").exists()
    with pytest.raises(ConfigError, match="needs trained heads"):
        PredictConfig(backbone="vgg16").validate()


def test_tp_and_cam_identities():
    scores = np.tile(np.array([[0.5, 2.0, -1.0]]), (4, 1))
    present = np.array([True, True, False, True])
    out = tp_predict(scores, present)
    e = np.exp(scores[0] - scores[0].max())
    np.testing.assert_allclose(out["probs"], e / e.sum(), atol=1e-6)     # constant scores: TP = softmax
    np.testing.assert_allclose(out["frame_weights"], [1 / 3, 1 / 3, 0, 1 / 3], atol=1e-6)
    assert out["frame_probs"][2].tolist() == [0, 0, 0]
    cam = np.zeros((2, 3, 4))
    cam[:, 1, 2] = 5.0
    att = class_activation_attention(cam, 1)
    assert att.shape == (2, 1, 4) and (att[:, 0].argmax(1) == 2).all()


def _fer_heads_checkpoint(path):
    """Heads (untrained, seeded) on fer-minixception features, saved like `emo-train heads` does."""
    from dataclasses import asdict

    from emotion_attention.pipeline.configs import ExtractConfig
    from emotion_attention.pipeline.models.extractor import FeatureExtractor
    from emotion_attention.pipeline.models.fer import default_fer_weights
    from emotion_attention.pipeline.models.heads import EmotionHeads
    from emotion_attention.pipeline.configs import HeadsConfig

    torch.manual_seed(0)
    cfg = HeadsConfig(in_dim=128, num_classes=7, hidden=16)
    fx = FeatureExtractor(ExtractConfig(backbone="fer-minixception", weights=str(default_fer_weights())))
    torch.save({"model": EmotionHeads(cfg).state_dict(), "heads_config": asdict(cfg), "class_names": AFEW_CLASSES,
                "provenance": fx.provenance("faces-fingerprint")}, path)
    return path, fx


def test_checkpoint_mode_runs_the_heads_on_the_checkpoints_backbone(samples_dir, tmp_path):
    from emotion_attention.pipeline.training.metrics import predict_video
    from emotion_attention.pipeline.models.heads import load_heads

    ckpt, fx = _fer_heads_checkpoint(tmp_path / "heads.pt")
    out = predict_videos([str(samples_dir / "single_face.mp4")], tmp_path / "o",
                         PredictConfig(checkpoint=str(ckpt), max_frames=6), log=lambda *a: None)
    (r,) = out["results"]
    heads, _ = load_heads(ckpt)
    expected = predict_video(heads, fx.maps(r.arrays["faces"]), r.arrays["present"])
    np.testing.assert_allclose(r.prediction["probs"], expected["probs"], atol=1e-6)
    assert r.prediction["attention"].shape == (6, 2, 16)
    with pytest.raises(ConfigError, match="is not the file"):
        predict_videos([str(samples_dir / "single_face.mp4")], tmp_path / "o2",
                       PredictConfig(checkpoint=str(ckpt), weights=str(ckpt), max_frames=2))


def test_kept_stores_are_the_ones_emo_cache_writes(run):
    out, _, result, _ = run
    r = result["results"][0]
    with FacesStore(out / "api" / "faces.h5") as faces:
        assert faces.config == PredictConfig(max_frames=FRAMES).preprocess_config().store_config(AFEW_CLASSES)
        (cid,) = faces.complete_ids()
        assert cid == r.attrs["clip_id"]
        np.testing.assert_array_equal(faces.read_faces(cid), r.arrays["faces"])
        attrs = faces.attrs(cid)
        assert attrs["total_frames"] == 72 and attrs["split"] == "predict"   # the video's own frame count
        fingerprint = faces.fingerprint
    with FeaturesStore(out / "api" / "features.h5") as feats:
        assert feats.provenance["faces_fingerprint"] == fingerprint
        maps, present = feats.read_clip(cid)
        assert maps.shape[:2] == (1, FRAMES) and present.all()
