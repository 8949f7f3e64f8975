"""Streaming decode of videos and frame folders into uint8 RGB frames (never a whole video in memory)."""
from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from itertools import chain
from pathlib import Path
from typing import Iterator, Optional

import cv2
import numpy as np

from emotion_attention.cache.errors import UserError
from emotion_attention.pipeline.configs import FOLDER_FPS, DecodeConfig

VIDEO_EXTENSIONS = (".avi", ".mp4", ".mov", ".mkv", ".webm", ".m4v", ".mpg", ".mpeg", ".wmv", ".flv")
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")


class DecodeError(UserError):
    """A video or frame folder cannot be decoded; the message names the file and the reason."""


@dataclass(frozen=True)
class Frame:
    """One decoded frame: its index in the source, its time and its pixels."""
    index: int              # position in the source video / sorted frame folder
    timestamp_ms: float     # index / fps * 1000
    rgb: np.ndarray         # uint8 (H, W, 3) RGB; (1, 1, 3) zeros when not readable
    readable: bool = True   # False: a frame-folder image that cannot be read; kept as a faceless row


@dataclass
class DecodeStats:
    """What decoding one clip found, filled in by the frame iterators as they go (the decode side of the
    faces store's ``decoded_frames`` / ``unreadable_frames`` attributes).

    >>> stats = DecodeStats()
    >>> frames = list(iter_frames(Path("data/samples/single_face.mp4"), stats=stats))
    >>> stats.decoded, stats.reached_end
    (72, True)
    """
    decoded: int = 0               # frames read from the source (kept or skipped), up to where decoding stopped
    reached_end: bool = False      # True: decoding ran to the end of the stream, not stopped by max_frames
    unreadable: list = field(default_factory=list)   # frame-folder indices whose image could not be read
    size_changes: list = field(default_factory=list)  # indices where the frame size differs from the previous
    fps_claimed: Optional[float] = None  # a header rate that was not plausible and was replaced (video_rate)
    fps_note: str = ""                   # what replaced it, for the warning

    def attrs(self) -> dict:
        """Clip attributes for the faces store (``fps_claimed``/``fps_note`` only when the header's rate was
        replaced)."""
        out = {"decoded_frames": int(self.decoded), "unreadable_frames": len(self.unreadable)}
        if self.fps_claimed is not None:
            out.update(fps_claimed=float(self.fps_claimed), fps_note=self.fps_note)
        return out


def is_short(decoded: int, total: int) -> bool:
    """True when fewer frames decode than the container announces (a truncated or damaged video).

    Container counts can be estimates (from the duration in mkv/webm; an mp4 edit list can hide a few
    frames: the sample no_face.mp4 decodes 95 of the 98 it announces), so a shortfall of up to 3 frames or
    5 % is tolerated. A truncated or corrupt video loses far more.

    >>> is_short(25, 72), is_short(69, 72), is_short(95, 98)
    (True, False, False)
    """
    return total - decoded > max(3, 0.05 * total)


@dataclass(frozen=True)
class VideoInfo:
    """What the container says about a video, checked by reading its first frame."""
    fps: float
    frame_count: int
    width: int
    height: int


def natural_key(path: Path) -> list:
    """Sort key so that frame_2.png comes before frame_10.png."""
    return [int(tok) if tok.isdigit() else tok.lower() for tok in re.split(r"(\d+)", path.name)]


def is_image_file(path: Path) -> bool:
    return Path(path).suffix.lower() in IMAGE_EXTENSIONS and Path(path).is_file()  # the suffix first: no stat


def list_frame_images(folder: Path) -> list[Path]:
    """Image files of a frame folder in natural order; a single image file is a one-frame folder.

    One ``scandir``: the entries' types come with the listing, so no file is stat'ed (a DFEW clip was listed
    three times per clip, each listing a stat per frame: issue 15's per-clip cost)."""
    folder = Path(folder)
    if is_image_file(folder):
        return [folder]
    with os.scandir(folder) as entries:
        images = [Path(entry.path) for entry in entries
                  if os.path.splitext(entry.name)[1].lower() in IMAGE_EXTENSIONS and entry.is_file()]
    return sorted(images, key=natural_key)


def image_size(path: Path) -> Optional[tuple[int, int]]:
    """(width, height) of an image from its header only (no pixels decoded); None when unreadable."""
    from PIL import Image, UnidentifiedImageError  # lazy: Pillow, only the header-only size checks need it

    try:
        with Image.open(path) as image:
            return image.size
    except (OSError, UnidentifiedImageError, ValueError):
        return None


def folder_is_square(folder: Path) -> bool:
    """True when every readable image of a frame folder is square (pre-aligned faces), read from the
    headers; one non-square image makes the whole folder full frames. Unreadable images do not count.

    >>> folder_is_square(Path("Faces/clip/"))  # doctest: +SKIP
    True
    """
    sizes = [image_size(p) for p in list_frame_images(folder)]
    return all_square(sizes)


def all_square(sizes: list[Optional[tuple[int, int]]]) -> bool:
    """folder_is_square's rule on (width, height) sizes, None for an unreadable image."""
    sizes = [s for s in sizes if s is not None]
    return bool(sizes) and all(w == h for w, h in sizes)


HOLD_BYTES = 64 << 20  # decoded frames square_frames holds at most while it decides (then: the headers)


def square_frames(frames: Iterator[Frame], images: list[Path], hold_bytes: int = HOLD_BYTES
                  ) -> tuple[bool, Iterator[Frame]]:
    """folder_is_square(images), decided on the frames the decode yields anyway instead of a second opening of
    every image for its header (about 0.1 ms an image here, more than the resize of a small face: issue 15).

    Decoded frames are held until the answer is known: a readable frame that is not square answers False at
    once; else, once the frames end (or ``hold_bytes`` of them are held), the images not decoded (skipped by
    the decode options, unreadable, or beyond the held ones) are read from their headers, as before. Returns
    (the answer, the same frames, from the first).
    """
    held, nbytes = [], 0
    for frame in frames:
        held.append(frame)
        if frame.readable and frame.rgb.shape[0] != frame.rgb.shape[1]:
            return False, chain(held, frames)
        nbytes += frame.rgb.nbytes
        if nbytes >= hold_bytes:
            break
    seen = {frame.index: frame.rgb.shape[1::-1] for frame in held if frame.readable}
    sizes = [seen[i] if i in seen else image_size(path) for i, path in enumerate(images)]
    return all_square(sizes), chain(held, frames)


def _open_capture(path: Path) -> cv2.VideoCapture:
    path = Path(path)
    if not path.is_file():
        raise DecodeError(f"{path}: no such file")
    if path.stat().st_size == 0:
        raise DecodeError(f"{path}: empty file (0 bytes); re-copy or remove it")
    cap = cv2.VideoCapture(str(path))
    if not cap.isOpened():
        cap.release()
        raise DecodeError(f"{path}: cannot be opened as a video (corrupt, truncated, or not a video);"
                          " re-encode or remove it")
    return cap


PLAUSIBLE_FPS = (0.1, 1000.0)  # a time-lapse at one frame in 10 s to a high-speed camera; a header outside claims
                               # nonsense (1e-9, 1e9 fps), which would wreck durations, timestamps and --fps-cap
RATE_PROBE_FRAMES = 25         # frames whose timestamps are read when the header's rate is not plausible


def plausible_fps(fps: float) -> bool:
    """True for a frame rate a real video can have (PLAUSIBLE_FPS); False for 0, NaN, 1e-9 or 1e9.

    >>> plausible_fps(29.97), plausible_fps(1e9), plausible_fps(1e-9), plausible_fps(float("nan"))
    (True, False, False, False)
    """
    return PLAUSIBLE_FPS[0] <= fps <= PLAUSIBLE_FPS[1]


def rate_from_timestamps(timestamps_ms) -> Optional[float]:
    """Frames per second from the median step of consecutive frame timestamps (ms); None when the steps give
    no plausible rate (too few frames, or timestamps made from the same broken header).

    >>> rate_from_timestamps([0, 40, 80, 120.5, 160]), rate_from_timestamps([0, 0, 0, 0])
    (25.0, None)
    """
    steps = np.diff(np.asarray(timestamps_ms, np.float64))
    steps = steps[np.isfinite(steps) & (steps > 0)]
    if len(steps) < 2:
        return None
    fps = 1000.0 / float(np.median(steps))
    return fps if plausible_fps(fps) else None


def video_rate(path: Path, header_fps: float) -> tuple[float, str]:
    """(frame rate to use, note) for a video whose container claims ``header_fps``.

    A plausible header is used as it is (note ""). Otherwise the rate comes from the frames' own timestamps
    (RATE_PROBE_FRAMES of them, read with a capture of its own), and when those are no better (they usually
    come from the same header) FOLDER_FPS is assumed; the note says which, for a warning.

    >>> video_rate(Path("data/samples/single_face.mp4"), 30.0)
    (30.0, '')
    """
    if plausible_fps(header_fps):
        return header_fps, ""
    cap = cv2.VideoCapture(str(path))
    stamps = []
    try:
        while len(stamps) < RATE_PROBE_FRAMES and cap.grab():
            stamps.append(float(cap.get(cv2.CAP_PROP_POS_MSEC)))
    finally:
        cap.release()
    claim = f"its header claims {header_fps:g} fps, not a real frame rate"
    fps = rate_from_timestamps(stamps)
    if fps is not None:
        return fps, f"{claim}: using {fps:g} fps from its frame timestamps"
    return FOLDER_FPS, (f"{claim}, and its frame timestamps give none: assuming {FOLDER_FPS:g} fps for times,"
                        " durations and --fps-cap")


def _capture_fps(cap: cv2.VideoCapture, path: Path, stats: Optional["DecodeStats"] = None) -> float:
    """The container's frame rate, checked by ``video_rate``; FOLDER_FPS when it gives none (0, negative or
    NaN). ``stats`` records a header rate that was replaced, and why."""
    header = float(cap.get(cv2.CAP_PROP_FPS) or 0.0)
    if not header > 0:  # no rate given: the frame folders' rate, as before (not a broken header)
        return FOLDER_FPS
    fps, note = video_rate(path, header)
    if note and stats is not None:
        stats.fps_claimed, stats.fps_note = header, note
    return fps


def probe_video(path: Path) -> VideoInfo:
    """Open a video, read its first frame, and return its rate, length and size.

    Arguments:
        path: a video file.
    Returns:
        VideoInfo(fps, frame_count, width, height); raises DecodeError naming the file when it is
        empty, not a video, corrupt, or has no decodable frame.

    >>> probe_video(Path("data/samples/single_face.mp4"))
    VideoInfo(fps=30.0, frame_count=72, width=640, height=360)
    """
    cap = _open_capture(path)
    try:
        ok, bgr = cap.read()
        if not ok or bgr is None:
            raise DecodeError(f"{path}: opens but has no decodable frame (zero-frame or corrupt video);"
                              " re-encode or remove it")
        count = int(cap.get(cv2.CAP_PROP_FRAME_COUNT) or 0)
        return VideoInfo(fps=_capture_fps(cap, path), frame_count=max(count, 1),
                         width=int(bgr.shape[1]), height=int(bgr.shape[0]))
    finally:
        cap.release()


def keep_frame(index: int, fps: float, fps_cap: Optional[float], every_nth: int, last_slot: int) -> int:
    """Slot of a kept frame (>= 0), or -1 when the frame is skipped.

    A frame is kept when its index is a multiple of ``every_nth`` and, under an fps cap, when it is the
    first frame of a new 1/fps_cap time slot.
    """
    if index % every_nth:
        return -1
    if fps_cap is None or fps <= fps_cap:
        return index
    slot = int(index * fps_cap / fps)
    return slot if slot > last_slot else -1


def count_video_frames(path: Path) -> tuple[int, int]:
    """(frames that decode, frames the container announces) of a video: every packet is decoded
    (``grab``, no colour conversion), so a truncated file or a corrupt middle shows as a shortfall.

    >>> count_video_frames(Path("data/samples/single_face.mp4"))
    (72, 72)
    """
    cap = _open_capture(path)
    try:
        total = int(cap.get(cv2.CAP_PROP_FRAME_COUNT) or 0)
        decoded = 0
        while cap.grab():
            decoded += 1
    finally:
        cap.release()
    return decoded, total


def iter_frames(path: Path, fps_cap: Optional[float] = None, max_frames: Optional[int] = None,
                every_nth: int = 1, stats: Optional[DecodeStats] = None) -> Iterator[Frame]:
    """Yield a video's frames one at a time as uint8 RGB; skipped frames are grabbed, not decoded.

    Arguments:
        path: a video file.
        fps_cap: keep at most this many frames per second of video (None: all).
        max_frames: stop after this many kept frames (None: to the end).
        every_nth: keep every Nth frame (1: all).
        stats: filled in while decoding (frames read, whether the end was reached).
    Returns:
        an iterator of Frame; raises DecodeError naming the file if it cannot be opened or yields
        no frame at all.

    >>> [f.index for f in iter_frames(Path("data/samples/single_face.mp4"), every_nth=10)][:3]
    [0, 10, 20]
    """
    stats = stats if stats is not None else DecodeStats()
    cap = _open_capture(path)
    fps = _capture_fps(cap, path, stats)  # the same rate probe_video reports, so timestamps match the fps attr
    index, kept, last_slot = 0, 0, -1
    try:
        while max_frames is None or kept < max_frames:
            if not cap.grab():
                stats.reached_end = True
                break
            slot = keep_frame(index, fps, fps_cap, every_nth, last_slot)
            if slot >= 0:
                ok, bgr = cap.retrieve()
                if not ok or bgr is None:
                    stats.reached_end = True
                    break
                last_slot, kept = slot, kept + 1
                stats.decoded = index + 1
                yield Frame(index, index * 1000.0 / fps, cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB))
            index += 1
            stats.decoded = index
    finally:
        cap.release()
    if index == 0:
        raise DecodeError(f"{path}: no decodable frame (zero-frame or corrupt video); re-encode or remove it")


UNREADABLE = np.zeros((1, 1, 3), np.uint8)  # pixels of a Frame whose image cannot be read


def read_image_rgb(path: Path) -> np.ndarray:
    """uint8 (H, W, 3) RGB pixels of one image file; DecodeError naming it when unreadable."""
    bgr = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if bgr is None:
        raise DecodeError(f"{path}: not a readable image; re-export or remove it")
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)


def iter_folder_frames(folder: Path, fps_cap: Optional[float] = None, max_frames: Optional[int] = None,
                       every_nth: int = 1, fps: float = FOLDER_FPS, stats: Optional[DecodeStats] = None,
                       images: Optional[list[Path]] = None) -> Iterator[Frame]:
    """Yield the images of a frame folder, in natural order, as Frames (same options as iter_frames).

    An image that cannot be read does not drop the clip: it is yielded with ``readable=False`` (a
    faceless row downstream) and counted in ``stats.unreadable``. A folder in which no image reads
    raises DecodeError. Size changes between images are listed in ``stats.size_changes``. ``images``: the
    folder's list_frame_images, when the caller has it.

    >>> import shutil, tempfile
    >>> tmp = tempfile.TemporaryDirectory()
    >>> for image, name in (("single_face.jpg", "frame_2.jpg"), ("0-f1-su-ph.jpg", "frame_10.jpg")):
    ...     _ = shutil.copy(Path("data/samples") / image, Path(tmp.name) / name)
    >>> stats = DecodeStats()
    >>> [(f.index, f.rgb.dtype, f.rgb.shape) for f in iter_folder_frames(Path(tmp.name), stats=stats)]  # 2 before 10
    [(0, dtype('uint8'), (562, 572, 3)), (1, dtype('uint8'), (512, 512, 3))]
    >>> stats.decoded, len(stats.size_changes)
    (2, 1)
    >>> tmp.cleanup()
    """
    stats = stats if stats is not None else DecodeStats()
    images = list_frame_images(folder) if images is None else images
    if not images:
        raise DecodeError(f"{folder}: frame folder holds no images ({', '.join(IMAGE_EXTENSIONS)})")
    kept, last_slot, shape = 0, -1, None
    for index, image in enumerate(images):
        if max_frames is not None and kept >= max_frames:
            break
        stats.decoded = index + 1
        slot = keep_frame(index, fps, fps_cap, every_nth, last_slot)
        if slot < 0:
            continue
        last_slot, kept = slot, kept + 1
        try:
            rgb = read_image_rgb(image)
        except DecodeError:
            stats.unreadable.append(index)
            yield Frame(index, index * 1000.0 / fps, UNREADABLE, readable=False)
            continue
        if shape is not None and rgb.shape != shape:
            stats.size_changes.append(index)
        shape = rgb.shape
        yield Frame(index, index * 1000.0 / fps, rgb)
    else:
        stats.reached_end = True
    if kept and len(stats.unreadable) == kept:
        raise DecodeError(f"{folder}: none of its {kept} images can be read; re-export or remove them")


def iter_clip_frames(path: Path, kind: str, cfg: DecodeConfig, stats: Optional[DecodeStats] = None,
                     images: Optional[list[Path]] = None) -> Iterator[Frame]:
    """Frames of a clip that is a video file (kind="video"), a folder of images (kind="frames") or one still
    image (kind="image", a one-frame clip). ``stats`` is filled in while the frames are consumed; ``images``:
    the folder's list_frame_images, when the caller has it.

    >>> frames = iter_clip_frames(Path("data/samples/single_face.mp4"), "video", DecodeConfig(max_frames=8))
    >>> [f.rgb.shape for f in iter_clip_frames(Path("data/samples/single_face.jpg"), "image", DecodeConfig())]
    [(562, 572, 3)]
    """
    if kind == "video":
        return iter_frames(path, cfg.fps_cap, cfg.max_frames, cfg.every_nth, stats)
    if kind in ("frames", "image"):  # list_frame_images takes an image file as a one-image folder
        return iter_folder_frames(path, cfg.fps_cap, cfg.max_frames, cfg.every_nth, cfg.folder_fps, stats, images)
    raise ValueError(f"{path}: unknown clip kind {kind!r}; expected 'video', 'frames' or 'image'")
