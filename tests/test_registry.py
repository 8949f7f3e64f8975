"""Every registered backbone, one test each: build, maps shape, provenance, backbone.pt round trip, one
fine-tuning step, and prediction from its re-cached features. A new registry entry is tested the day it is added."""
import warnings

import numpy as np
import pytest
import torch

from emotion_attention.cache import FacesStore
from emotion_attention.cache.errors import ConfigError
from finetune_data import CLASSES, SIZE, make_tiny_faces_store
from emotion_attention.pipeline.configs import BACKBONES as NAMES
from emotion_attention.pipeline.models.backbones import REGISTRY, build_backbone, get_backbone
from emotion_attention.pipeline.training.metrics import predict_video
from emotion_attention.pipeline.models.extractor import FeatureExtractor
from emotion_attention.pipeline.models.extractor import resolve_precision
from emotion_attention.pipeline.configs import FinetuneConfig
from emotion_attention.pipeline.stages.finetune import finetune, recache_config
from emotion_attention.pipeline.models.heads import load_heads


def test_the_torch_free_names_are_the_registry():
    assert tuple(REGISTRY) == NAMES
    with pytest.raises(ConfigError, match="choose one of"):
        get_backbone("resnet50")


@pytest.fixture(scope="module")
def faces(tmp_path_factory):
    return make_tiny_faces_store(tmp_path_factory.mktemp("registry") / "faces.h5", frames=4)


def _random(name: str, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # random weights warn that their maps mean nothing
        return build_backbone(name, "random", seed=0, **kw)


@pytest.mark.parametrize("name", NAMES)
def test_build_maps_and_provenance(name):
    entry = REGISTRY[name]
    bb = _random(name)
    grid = entry.grid()
    chips = torch.randint(0, 255, (2, 48, 48, 3), dtype=torch.uint8)
    with torch.no_grad():
        maps = bb.maps(chips) if entry.fixed_input else _random(name, input_size=64).maps(chips)
    side = entry.fixed_input or 64
    assert tuple(maps.shape) == (2, (side // entry.stride) ** 2, entry.D)
    assert bb.spec.L == grid ** 2 and bb.spec.D == entry.D and bb.spec.layer == entry.layer
    prov = bb.spec.provenance()
    assert prov["backbone"] == name and prov["weights"] == "random:0" and prov["L"] == grid ** 2
    assert entry.colour in ("rgb", "grey") and len(entry.blocks(bb.net)) == 5
    assert resolve_precision("auto", torch.device("cpu"), name) in ("bf16", "fp32")


@pytest.mark.parametrize("name", NAMES)
def test_saved_state_reloads_to_the_same_maps(name, tmp_path):
    entry = REGISTRY[name]
    bb = _random(name, input_size=entry.fixed_input or 64)
    state = entry.save_state(bb.net, bb.spec.layout)
    torch.save(state, tmp_path / "backbone.pt")
    assert entry.detect_layout(state, "backbone.pt") in ("torchvision", "torch")
    again = build_backbone(name, str(tmp_path / "backbone.pt"), input_size=entry.fixed_input or 64)
    chips = torch.randint(0, 255, (2, 64, 64, 3), dtype=torch.uint8)
    with torch.no_grad():
        torch.testing.assert_close(again.maps(chips), bb.maps(chips))


@pytest.mark.parametrize("name", NAMES)
def test_one_finetuning_step_then_predict_on_recached_features(name, faces, tmp_path):
    cfg = FinetuneConfig(weights="random", backbone=name, epochs=1, frames_per_clip=3, batch_clips=3,
                         precision="fp32", workers=0, heads_hidden=8, holdout_fraction=0.0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = finetune(faces, tmp_path / "ft", cfg, log=lambda *a: None)
    assert result.history[0]["epoch"] == 1 and np.isfinite(result.history[0]["loss"])
    heads, ckpt = load_heads(tmp_path / "ft" / "checkpoint.pt")
    assert ckpt["backbone_name"] == name and heads.cfg.in_dim == REGISTRY[name].D
    # the checkpoint's provenance is that of the features emo-cache extract makes with backbone.pt
    side = REGISTRY[name].finetune_side(SIZE, None)
    fx = FeatureExtractor(recache_config(tmp_path / "ft" / "backbone.pt", SIZE, side, name))
    with FacesStore(faces, "r") as store:
        fingerprint = store.fingerprint
        cid = store.complete_ids()[0]
        present = store.read_present(cid)
        chips = store.read_faces(cid, np.flatnonzero(present))
    assert ckpt["provenance"] == fx.provenance(fingerprint)
    maps = np.zeros((len(present),) + fx.maps(chips).shape[2:], np.float16)
    maps[present] = fx.maps(chips)[0]
    out = predict_video(heads, maps, present)
    assert out["probs"].shape == (len(CLASSES),) and abs(float(out["probs"].sum()) - 1) < 1e-5


@pytest.mark.parametrize("name, input_size, crop, message", [
    ("fer-minixception", 96, None, "takes 64 px whole faces"),
    ("fer-minixception", 64, 56, "no --crop"),
    ("vgg16", 250, None, "multiple of 16"),
    ("resnet18", 224, 200, "multiple of 32"),
])
def test_sizes_the_weights_cannot_take_are_config_errors(name, input_size, crop, message):
    with pytest.raises(ConfigError, match=message):
        _random(name, input_size=input_size, crop=crop)


def test_bad_input_size_is_refused_by_the_cli_before_any_work(faces, tmp_path):
    from click.testing import CliRunner

    from emotion_attention.cli.emo_cache import main

    res = CliRunner().invoke(main, ["extract", str(faces), "--out", str(tmp_path / "f.h5"), "--backbone",
                                    "fer-minixception", "--weights", "random", "--seed", "0", "--input-size", "96"])
    assert res.exit_code != 0 and "takes 64 px whole faces" in res.output and "Traceback" not in res.output
    assert not (tmp_path / "f.h5").exists()
