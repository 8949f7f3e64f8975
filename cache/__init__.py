"""The only package that reads or writes HDF5: the faces store and the features store.

It imports neither ``pipeline`` nor ``cli``; arrays and plain dicts go in and out.
"""
from cache.common import StoreDamaged, StoreError, StoreMismatch, clip_key, diff_settings
from cache.faces_store import HOW, FacesStore
from cache.features_store import FeaturesStore

__all__ = ["FacesStore", "FeaturesStore", "HOW", "StoreError", "StoreMismatch", "StoreDamaged",
           "clip_key", "diff_settings"]
