"""The only package that reads or writes HDF5: the faces store and the features store.

It imports neither ``pipeline`` nor ``cli``; arrays and plain dicts go in and out.
"""
from cache.common import diff_settings
from cache.errors import (ConfigError, StoreDamaged, StoreError, StoreFull, StoreLocked, StoreMismatch, UserError,
                          clip_filename, clip_key, filename_to_id, key_to_id)
from cache.faces_store import HOW, FacesStore
from cache.features_store import FeaturesStore

__all__ = ["FacesStore", "FeaturesStore", "HOW", "UserError", "ConfigError", "StoreError", "StoreMismatch",
           "StoreDamaged", "StoreLocked", "StoreFull", "clip_key", "key_to_id", "clip_filename", "filename_to_id",
           "diff_settings"]
