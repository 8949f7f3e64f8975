"""fer's mini-Xception port: parity with the real Keras model on real faces, layouts, mapping, errors."""
import hashlib
import json
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from torch import nn

from emotion_attention.cache.keras_weights import (KerasWeightsError, read_keras_config, read_keras_weights, short_weight_name)
from emotion_attention.pipeline.models.fer import (FER_CLASSES, FER_TO_AFEW, FER_WEIGHTS_ENV, KerasMaxPool2dSame, MiniXception, default_fer_weights, fer_preprocess, fer_probabilities, keras_same_padding, load_fer_minixception)
from emotion_attention.pipeline.core.runtime import file_sha256

REPO = Path(__file__).resolve().parents[1]
GOLDEN = REPO / "tests" / "golden" / "fer_minixception.npz"


@pytest.fixture(scope="module")
def weights_path(samples_dir) -> Path:
    return samples_dir / "emotion_model.hdf5"


@pytest.fixture(scope="module")
def model(weights_path) -> MiniXception:
    return load_fer_minixception(weights_path)


@pytest.fixture(scope="module")
def golden() -> dict:
    data = np.load(GOLDEN)
    return {key: data[key] for key in data.files}


def port_logits(model: MiniXception, inputs: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.from_numpy(inputs)).numpy()


# ---- parity with Keras (goldens made by `make goldens` with tf_keras on real faces) -------------------------

def test_goldens_come_from_these_weights(golden, weights_path):
    meta = json.loads(str(golden["meta"]))
    assert meta["weights_sha256"] == file_sha256(weights_path), "weights changed: rerun `make goldens`"
    assert meta["last_layer"] == "predictions:softmax"  # so the port's logits are Keras's softmax input
    assert golden["inputs"].shape == (len(golden["names"]), 1, 64, 64) and len(golden["names"]) >= 12


def test_logits_match_keras_on_real_faces(model, golden):
    err = np.abs(port_logits(model, golden["inputs"]) - golden["logits"]).max()
    assert err <= 1e-4, f"max |logit error| {err:.2e} > 1e-4"


def test_softmax_of_logits_is_keras_output(model, golden):
    probs = torch.from_numpy(port_logits(model, golden["inputs"])).softmax(1).numpy()
    assert np.abs(probs - golden["probs"]).max() <= 1e-5


def _symmetric_pool(m):
    for block in m.blocks:
        block.pool = nn.MaxPool2d(3, 2, padding=1)


def _torch_bn_epsilon(m):
    for module in m.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.eps = 1e-5


def _swap_kernel_hw(m):
    m.conv1.weight.data = m.conv1.weight.data.transpose(2, 3).contiguous()


@pytest.mark.parametrize("mistake", [_symmetric_pool, _torch_bn_epsilon, _swap_kernel_hw])
def test_goldens_catch_each_keras_semantics_mistake(weights_path, golden, mistake):
    wrong = load_fer_minixception(weights_path)
    mistake(wrong)
    assert np.abs(port_logits(wrong, golden["inputs"]) - golden["logits"]).max() > 1e-2


# ---- layers and shapes --------------------------------------------------------------------------------------

@pytest.mark.parametrize("size,kernel,stride,pads", [(60, 3, 2, (0, 1)), (30, 3, 2, (0, 1)), (15, 3, 2, (1, 1)),
                                                     (8, 3, 2, (0, 1)), (64, 3, 1, (1, 1)), (60, 1, 2, (0, 0)),
                                                     (15, 1, 2, (0, 0))])
def test_keras_same_padding(size, kernel, stride, pads):
    assert keras_same_padding(size, kernel, stride) == pads


def _tf_same_maxpool_reference(x: np.ndarray, k: int, s: int) -> np.ndarray:
    """TF's SAME max-pool written out: windows start at i*s - pad_before, out-of-range pixels ignored."""
    n, c, h, w = x.shape
    (top, _), (left, _) = keras_same_padding(h, k, s), keras_same_padding(w, k, s)
    oh, ow = -(-h // s), -(-w // s)
    out = np.empty((n, c, oh, ow), x.dtype)
    for i in range(oh):
        for j in range(ow):
            r0, c0 = i * s - top, j * s - left
            out[:, :, i, j] = x[:, :, max(r0, 0):r0 + k, max(c0, 0):c0 + k].max(axis=(2, 3))
    return out


@pytest.mark.parametrize("size", [60, 30, 15, 8, 7])
def test_same_maxpool_matches_tf_definition(size):
    x = torch.randn(2, 3, size, size) - 5.0  # all negative: a zero-padded pool would be wrong at the border
    expected = _tf_same_maxpool_reference(x.numpy(), 3, 2)
    assert torch.equal(KerasMaxPool2dSame(3, 2)(x), torch.from_numpy(expected))


def test_features_shape_and_logits_identity(model):
    x = torch.randn(3, 1, 64, 64)
    with torch.no_grad():
        maps, logits = model.features(x), model(x)
    assert maps.shape == (3, 128, 4, 4)  # L = 16 positions, D = 128 channels
    assert logits.shape == (3, 7)
    assert torch.allclose(logits, model.classifier(maps).mean(dim=(2, 3)), atol=1e-6)


def test_loaded_model_is_in_eval_mode_and_deterministic(model):
    x = torch.randn(2, 1, 64, 64)
    with torch.no_grad():
        assert not model.training
        assert torch.equal(model(x), model(x))
        assert torch.allclose(model(x[:1]), model(x)[:1], atol=1e-5)  # BN uses stored statistics, not the batch


def test_kernels_are_transposed_from_channels_last(model, weights_path):
    keras = read_keras_weights(weights_path)
    assert np.array_equal(model.conv2.weight.detach().numpy(), keras["conv2d_2"]["kernel"].transpose(3, 2, 0, 1))
    depth = keras["separable_conv2d_8"]["depthwise_kernel"]  # (3, 3, 128, 1)
    torch_depth = model.blocks[3].sep2.depthwise.weight.detach().numpy()  # (128, 1, 3, 3)
    assert np.array_equal(torch_depth[:, 0], depth[..., 0].transpose(2, 0, 1))
    assert np.array_equal(model.blocks[0].shortcut_bn.running_var.numpy(),
                          keras["batch_normalization_3"]["moving_variance"])
    assert np.array_equal(model.classifier.bias.detach().numpy(), keras["conv2d_7"]["bias"])


# ---- class mapping ------------------------------------------------------------------------------------------

def test_fer_to_afew_mapping():
    from emotion_attention.pipeline.configs import AFEW_CLASSES

    assert [FER_CLASSES[i] for i in FER_TO_AFEW] == [c.lower() for c in AFEW_CLASSES]
    assert list(FER_TO_AFEW) == [0, 1, 2, 3, 6, 4, 5]
    logits_fer = torch.arange(7.0)[None]  # value = FER index
    assert logits_fer[:, FER_TO_AFEW].tolist() == [[0, 1, 2, 3, 6, 4, 5]]


# ---- preprocessing ------------------------------------------------------------------------------------------

def test_preprocess_grey_and_scaling():
    faces = np.zeros((2, 100, 100, 3), np.uint8)
    faces[0] = (200, 100, 50)  # RGB; ITU-R 601 grey = 0.299*200 + 0.587*100 + 0.114*50 = 124.2 -> 124
    faces[1, :50] = 255  # top half white: rows, not columns, must be bright
    x = fer_preprocess(faces)
    assert x.shape == (2, 1, 64, 64) and x.dtype == torch.float32
    assert torch.allclose(x[0], torch.full((1, 64, 64), (124 / 255 - 0.5) * 2))
    assert (x[1, 0, :31] == 1).all() and (x[1, 0, 33:] == -1).all()


def test_preprocess_rejects_wrong_input_and_accepts_empty():
    with pytest.raises(ValueError, match="uint8"):
        fer_preprocess(np.zeros((1, 64, 64, 3), np.float32))
    with pytest.raises(ValueError, match=r"\(N, S, S, 3\)"):
        fer_preprocess(np.zeros((64, 64, 3), np.uint8))
    assert fer_preprocess(np.zeros((0, 256, 256, 3), np.uint8)).shape == (0, 1, 64, 64)


def test_probabilities_follow_logits(model):
    faces = np.random.default_rng(0).integers(0, 256, (3, 80, 80, 3), dtype=np.uint8)
    probs = fer_probabilities(model, faces, batch_size=2)
    assert probs.shape == (3, 7)
    assert np.allclose(probs.sum(1), 1, atol=1e-6)
    assert np.allclose(probs, torch.softmax(torch.from_numpy(port_logits(model, fer_preprocess(faces).numpy())), 1))


# ---- weights file: reader, location, errors -----------------------------------------------------------------

def test_reader_on_real_file(weights_path):
    weights = read_keras_weights(weights_path)
    assert len(weights) == 29  # 7 conv + 8 separable conv + 14 batch norm; layers without weights left out
    assert weights["conv2d_1"]["kernel"].shape == (3, 3, 1, 8)
    assert set(weights["separable_conv2d_1"]) == {"depthwise_kernel", "pointwise_kernel"}
    assert weights["separable_conv2d_1"]["depthwise_kernel"].shape == (3, 3, 8, 1)
    assert set(weights["batch_normalization_5"]) == {"gamma", "beta", "moving_mean", "moving_variance"}
    config = read_keras_config(weights_path)
    assert config["keras_version"] == "2.0.5"
    assert config["model_config"]["config"]["layers"][-1]["config"]["activation"] == "softmax"
    assert short_weight_name("separable_conv2d_3_1/pointwise_kernel:0") == "pointwise_kernel"


def test_reader_weights_only_layout(tmp_path):
    path = tmp_path / "weights_only.h5"
    kernel = np.arange(6, dtype=np.float32).reshape(1, 1, 2, 3)
    with h5py.File(path, "w") as f:
        f.attrs["layer_names"] = [b"conv2d_9", b"relu_1"]
        f.create_group("relu_1").attrs["weight_names"] = np.array([], dtype="S1")
        layer = f.create_group("conv2d_9")
        layer.attrs["weight_names"] = [b"conv2d_9_2/kernel:0"]
        layer.create_dataset("conv2d_9_2/kernel:0", data=kernel)
    weights = read_keras_weights(path)
    assert list(weights) == ["conv2d_9"] and np.array_equal(weights["conv2d_9"]["kernel"], kernel)
    assert read_keras_config(path) is None


def test_not_hdf5_is_a_clear_error(tmp_path):
    path = tmp_path / "emotion_model.hdf5"
    path.write_text("not a model")
    with pytest.raises(KerasWeightsError, match=r"emotion_model\.hdf5.*not a Keras weights file"):
        load_fer_minixception(path)


def test_hdf5_without_keras_index_is_a_clear_error(tmp_path):
    path = tmp_path / "store.h5"
    with h5py.File(path, "w") as f:
        f.create_dataset("faces", data=np.zeros(3))
    with pytest.raises(KerasWeightsError, match=r"store\.h5.*layer_names"):
        read_keras_weights(path)


def test_other_keras_model_names_the_layers(tmp_path):
    path = tmp_path / "other.h5"
    with h5py.File(path, "w") as f:
        group = f.create_group("model_weights")
        group.attrs["layer_names"] = [b"dense_1"]
        group.create_group("dense_1").attrs["weight_names"] = [b"dense_1/kernel:0"]
        group["dense_1"].create_dataset("dense_1/kernel:0", data=np.zeros((4, 7), np.float32))
    with pytest.raises(KerasWeightsError, match=r"other\.h5.*not expected: \['dense_1'\].*conv2d_1"):
        load_fer_minixception(path)


def test_wrong_shape_names_the_weight(tmp_path, weights_path):
    path = tmp_path / "bad_shape.h5"
    with h5py.File(weights_path, "r") as src, h5py.File(path, "w") as dst:
        src.copy("model_weights", dst)
        layer = dst["model_weights/conv2d_7"]
        del layer["conv2d_7_1/bias:0"]
        layer.create_dataset("conv2d_7_1/bias:0", data=np.zeros(8, np.float32))
    with pytest.raises(KerasWeightsError, match=r"bad_shape\.h5.*classifier\.bias: expected \(7,\)"):
        load_fer_minixception(path)


def test_missing_file_says_make_sample_data(tmp_path):
    with pytest.raises(KerasWeightsError, match="make sample-data"):
        load_fer_minixception(tmp_path / "absent.hdf5")


def test_default_weights_location(monkeypatch, tmp_path, weights_path):
    monkeypatch.delenv(FER_WEIGHTS_ENV, raising=False)
    monkeypatch.chdir(tmp_path)  # found from the package, not the working directory
    assert default_fer_weights().resolve() == weights_path.resolve()
    monkeypatch.setenv(FER_WEIGHTS_ENV, str(tmp_path / "nowhere.hdf5"))
    with pytest.raises(FileNotFoundError, match=f"{FER_WEIGHTS_ENV}.*make sample-data"):
        default_fer_weights()
    monkeypatch.setenv(FER_WEIGHTS_ENV, str(weights_path))
    assert default_fer_weights() == weights_path


def test_weights_sha256(weights_path):
    assert file_sha256(weights_path) == hashlib.sha256(weights_path.read_bytes()).hexdigest()


# ---- the posed stills, end to end (dlib alignment -> preprocess -> port) ------------------------------------

def test_stills_script_agrees_with_keras(golden, samples_dir):
    out = subprocess.run([sys.executable, str(REPO / "scripts" / "fer_predict_stills.py"), "--samples",
                          str(samples_dir)], capture_output=True, text=True, check=True, cwd=REPO).stdout
    lines = out.strip().splitlines()
    assert len(lines) == 4
    keras_top = {str(n).split("#")[0]: FER_CLASSES[p.argmax()] for n, p in zip(golden["names"], golden["probs"])}
    for line in lines:
        still, predicted = line.split()[0], line.split("predicted=")[1].split()[0]
        assert predicted == keras_top[still], line
