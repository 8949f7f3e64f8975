"""Fixtures shared by every test module: where the real sample media live."""
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SAMPLES = REPO / "data" / "samples"


@pytest.fixture(scope="session")
def samples_dir() -> Path:
    """The real face media unpacked by `make sample-data` (make test runs it first)."""
    if not (SAMPLES / "single_face.mp4").exists():
        pytest.fail(f"{SAMPLES} has no sample media: run `make sample-data` (make test does it)")
    return SAMPLES
