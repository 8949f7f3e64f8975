"""Every ``>>>`` example in the package runs and shows what it says (examples that need a trained run or a
dataset on disk are marked ``# doctest: +SKIP`` where they stand)."""
from __future__ import annotations

import doctest
import importlib
import pkgutil
from pathlib import Path

import pytest

import emotion_attention.cache
import emotion_attention.cli
import emotion_attention.pipeline

MODULES = sorted(m.name for pkg in (emotion_attention.pipeline, emotion_attention.cli, emotion_attention.cache)
                 for m in pkgutil.walk_packages(pkg.__path__, pkg.__name__ + "."))


REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("name", MODULES)
def test_doctests(name, monkeypatch, samples_dir):
    monkeypatch.chdir(REPO)  # examples read the sample media from data/samples (`make sample-data`)
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE, verbose=False,
                             report=True)
    assert result.failed == 0, f"{name}: {result.failed} of {result.attempted} doctest examples failed (see above)"
