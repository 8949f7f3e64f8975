"""The only package that reads or writes HDF5: the faces store and the features store.

It imports neither ``pipeline`` nor ``cli``; arrays and plain dicts go in and out. Importing the package (or
``cache.errors``) does not import h5py: the names below load their module on first use, so a command's
``--help`` stays cheap.
"""
from importlib import import_module

_HOME = {
    "FacesStore": "faces_store", "FeaturesStore": "features_store", "HOW": "schema", "diff_settings": "common",
    **{name: "errors" for name in ("UserError", "ConfigError", "StoreError", "StoreMismatch", "StoreDamaged",
                                   "StoreLocked", "StoreFull", "clip_key", "key_to_id", "clip_filename",
                                   "filename_to_id")},
}
__all__ = sorted(_HOME)


def __getattr__(name: str):
    """``from emotion_attention.cache import FacesStore`` imports cache.faces_store (and h5py) only then."""
    if name not in _HOME:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(import_module(f"{__name__}.{_HOME[name]}"), name)
    globals()[name] = value  # later lookups skip this function
    return value
