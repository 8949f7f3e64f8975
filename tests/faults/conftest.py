"""The fault corpus's shared fixtures; the builders live in faultkit.py."""
from faultkit import chain, work  # noqa: F401  (fixtures: the real faces -> extract -> heads chain)
