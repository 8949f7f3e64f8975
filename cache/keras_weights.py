"""Read the weights of a Keras HDF5 model file (``model.save`` or ``save_weights``) as plain numpy arrays.

This is the only place that opens a Keras ``.hdf5``; the pipeline gets dicts of arrays and never imports h5py.
Both layouts Keras 2 writes are understood:

- a full model file: root attributes ``model_config`` (JSON) and ``keras_version``, weights under the group
  ``model_weights``;
- a weights-only file: the weights at the root.

In both, the weights group has an attribute ``layer_names``; each layer's group has ``weight_names`` such as
``conv2d_1_1/kernel:0``, a path relative to the layer group. Weight names are returned short (``kernel``,
``gamma``, ``moving_variance``...): the ``<layer>_<n>/`` prefix and ``:0`` suffix are Keras/TF scoping
noise that changes between saves of the same model.
"""
from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np

from emotion_attention.cache.errors import StoreError


class KerasWeightsError(StoreError):
    """A file cannot be read as Keras weights; the message names the file and what is wrong."""


def _text(value) -> str:
    return value.decode("utf8") if isinstance(value, bytes) else str(value)


def _open_keras_file(path: Path) -> h5py.File:
    if not path.is_file():
        raise KerasWeightsError(f"{path}: no such Keras weights file (for fer's model, run `make sample-data`)")
    try:
        return h5py.File(path, "r")
    except OSError as exc:
        raise KerasWeightsError(f"{path}: not a Keras weights file (cannot be read as HDF5: {exc})") from exc


def _weights_group(f: h5py.File, path: Path) -> h5py.Group:
    group = f["model_weights"] if "model_weights" in f else f
    if "layer_names" not in group.attrs:
        raise KerasWeightsError(f"{path}: an HDF5 file but not a Keras weights file (no 'layer_names' attribute"
                                " at the root or under 'model_weights'); pass the .hdf5 that Keras saved")
    return group


def short_weight_name(name: str) -> str:
    """``'conv2d_1_1/kernel:0'`` -> ``'kernel'``.

    >>> short_weight_name("batch_normalization_3_1/moving_mean:0")
    'moving_mean'
    """
    return name.rsplit("/", 1)[-1].split(":", 1)[0]


def read_keras_weights(path: str | Path) -> dict[str, dict[str, np.ndarray]]:
    """All weights of a Keras HDF5 file, by layer and short weight name, in the file's layer order.

    Layers without weights (activations, pooling, add) are left out.

    Arguments:
        path: a Keras 2 ``.hdf5``/``.h5`` file, full model or weights only.
    Returns:
        ``{layer_name: {weight_name: float array in Keras layout}}``; conv kernels are channels-last
        ``(H, W, in, out)``, depthwise kernels ``(H, W, in, multiplier)``.
    Raises:
        KerasWeightsError: missing file, not HDF5, or HDF5 without Keras's layer index.

    >>> w = read_keras_weights("data/samples/emotion_model.hdf5")  # doctest: +SKIP
    >>> w["conv2d_1"]["kernel"].shape  # doctest: +SKIP
    (3, 3, 1, 8)
    """
    path = Path(path)
    with _open_keras_file(path) as f:
        group = _weights_group(f, path)
        layers: dict[str, dict[str, np.ndarray]] = {}
        for layer in (_text(n) for n in group.attrs["layer_names"]):
            if layer not in group:
                raise KerasWeightsError(f"{path}: layer {layer!r} is listed in 'layer_names' but has no group;"
                                        " the file is damaged, get a fresh copy")
            names = [_text(n) for n in group[layer].attrs.get("weight_names", [])]
            if names:
                layers[layer] = {short_weight_name(n): np.asarray(group[layer][n]) for n in names}
    return layers


def read_keras_config(path: str | Path) -> dict | None:
    """The model description saved beside the weights, or None for a weights-only file.

    Arguments:
        path: a Keras 2 HDF5 file.
    Returns:
        ``{"model_config": dict, "keras_version": str, "backend": str}`` (missing keys are absent), or None
        when the file has no ``model_config`` attribute.

    >>> read_keras_config("data/samples/emotion_model.hdf5")["keras_version"]  # doctest: +SKIP
    '2.0.5'
    """
    path = Path(path)
    with _open_keras_file(path) as f:
        _weights_group(f, path)  # same error as read_keras_weights for a non-Keras file
        if "model_config" not in f.attrs:
            return None
        out = {"model_config": json.loads(_text(f.attrs["model_config"]))}
        for key in ("keras_version", "backend"):
            if key in f.attrs:
                out[key] = _text(f.attrs[key])
    return out
