"""Face-chip codecs of the faces store: raw uint8 arrays, or one PNG/JPEG image per frame.

A store's codec is part of its config (``codec``, ``jpeg_quality``), so a store is never extended with
another codec. Encoded frames are stored as variable-length uint8 (one encoded image per row); readers
get uint8 (F, S, S, 3) RGB whatever the codec (``FacesStore.read_faces``). OpenCV (libjpeg-turbo, libpng)
does the work; it is imported on first use, so opening a raw store needs no cv2.

Figures from ``bench/bench_codecs.py`` (README, "Faces store codecs") chose the default.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Iterable

import numpy as np

from emotion_attention.cache.errors import ConfigError

CODECS = ("raw", "png", "jpeg")


@lru_cache(maxsize=1)
def _rgb_flag():
    """cv2.IMREAD_COLOR_RGB (OpenCV >= 4.10: the decoder writes RGB order itself), or None."""
    import cv2  # lazy: OpenCV, only png/jpeg chips need it (a raw store never loads it)

    return getattr(cv2, "IMREAD_COLOR_RGB", None)


PNG_LEVEL = 1  # zlib level 1: ~3x faster than the default 3 at a few % more bytes (bench_codecs.py)


@dataclass(frozen=True)
class Codec:
    """How chips are stored. ``raw``: uint8 arrays (HDF5 compression optional); ``png``: lossless images;
    ``jpeg``: lossy images (4:2:0 chroma) with separate luma and chroma qualities."""
    name: str = "raw"     # raw | png | jpeg
    quality: int = 100    # JPEG luma quality 1..100 (jpeg only): 100 keeps the backbones' maps within 2e-2
    chroma: int = 75      # JPEG chroma quality: colour matters less to the maps and costs fewer bytes

    @property
    def encoded(self) -> bool:
        return self.name != "raw"

    def encode(self, chip: np.ndarray) -> np.ndarray:
        """uint8 (S, S, 3) RGB -> uint8 (n,) encoded bytes."""
        import cv2  # lazy: OpenCV, only png/jpeg chips need it (a raw store never loads it)

        bgr = cv2.cvtColor(np.ascontiguousarray(chip), cv2.COLOR_RGB2BGR)
        if self.name == "png":
            ok, buf = cv2.imencode(".png", bgr, [cv2.IMWRITE_PNG_COMPRESSION, PNG_LEVEL])
        elif self.name == "jpeg":
            ok, buf = cv2.imencode(".jpg", bgr, [cv2.IMWRITE_JPEG_QUALITY, int(self.quality),
                                                 cv2.IMWRITE_JPEG_LUMA_QUALITY, int(self.quality),
                                                 cv2.IMWRITE_JPEG_CHROMA_QUALITY, int(self.chroma)])
        else:
            raise ValueError(f"codec {self.name!r} does not encode")
        if not ok:
            raise ValueError(f"{self.name} encoding failed for a chip of shape {chip.shape}")
        return buf.reshape(-1)

    def decode(self, data: np.ndarray) -> np.ndarray:
        """uint8 (n,) encoded bytes -> uint8 (S, S, 3) RGB; ValueError when the bytes are not an image.

        Where OpenCV can (>= 4.10), the decoder writes RGB order itself: the same pixels as decoding to BGR and
        swapping (tests/test_extract_io.py checks it), without the swap.
        """
        import cv2  # lazy: OpenCV, only png/jpeg chips need it (a raw store never loads it)

        flag = _rgb_flag()
        img = cv2.imdecode(np.asarray(data, np.uint8), cv2.IMREAD_COLOR if flag is None else flag)
        if img is None:
            raise ValueError(f"{len(data)} bytes do not decode as {self.name}")
        return cv2.cvtColor(img, cv2.COLOR_BGR2RGB) if flag is None else img

    def decode_into(self, data: np.ndarray, out: np.ndarray) -> None:
        """Decode uint8 (n,) encoded bytes into ``out``, a uint8 (S, S, 3) view (a row of a batch buffer);
        ValueError when they are not an image of that shape."""
        rgb = self.decode(data)
        if rgb.shape != out.shape:
            raise ValueError(f"{len(data)} bytes decode to {rgb.shape}, not {out.shape}")
        out[...] = rgb

    def encode_many(self, chips: Iterable[np.ndarray]) -> np.ndarray:
        """object (n,) array of encoded uint8 rows (the form h5py writes into a vlen dataset)."""
        rows = [self.encode(c) for c in chips]
        out = np.empty(len(rows), dtype=object)
        for i, row in enumerate(rows):  # one by one: equal-length rows would otherwise broadcast as 2-D
            out[i] = row
        return out

    def validate(self) -> None:
        if self.name not in CODECS:
            raise ConfigError(f"codec={self.name!r}: use one of {', '.join(CODECS)}")
        if not 1 <= self.quality <= 100 or not 1 <= self.chroma <= 100:
            raise ConfigError(f"jpeg_quality={self.quality}, jpeg_chroma_quality={self.chroma}: use 1..100")

    @property
    def label(self) -> str:
        return f"jpeg{self.quality}/{self.chroma}" if self.name == "jpeg" else self.name


def codec_of_config(config: dict) -> Codec:
    """The codec a faces store's root config records; a store without one (older stores) is raw."""
    return Codec(config.get("codec", "raw"), int(config.get("jpeg_quality", 100)),
                 int(config.get("jpeg_chroma_quality", 75)))


# Rough bytes per 256 px frame of each codec (bench_codecs.py on the sample faces), scaled by chip area,
# used to estimate a run's disk space before it starts. PNG and JPEG vary with content, so they are upper-ish.
BYTES_PER_256PX = {"raw": 256 * 256 * 3, "png": 100_000, "jpeg": 40_000}


def bytes_per_frame(codec: Codec, size: int) -> int:
    """Estimated stored bytes of one ``size`` px chip plus its per-frame metadata (~600 bytes)."""
    base = BYTES_PER_256PX[codec.name]
    if codec.name == "jpeg":  # 40 KB at luma 100; about a third of that at 90 (bench_codecs.py)
        base = int(base * max(0.25, 1 - (100 - codec.quality) * 0.07))
    return int(base * (size / 256) ** 2) + 600
