"""dlib face detection, 68-point landmarks, tracking, and frontal alignment into fixed-size chips.

The default ("fast") path detects on a downscaled frame, refines landmarks at full resolution, and
tracks the subject from its last landmarks between detections; "naive" runs full-resolution HOG on
every frame (the benchmark's reference). Both follow one subject per clip and never switch faces.
"""
from __future__ import annotations

import importlib.util
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator, Optional

import cv2
import dlib
import numpy as np

from emotion_attention.cache.schema import HOW
from emotion_attention.pipeline.configs import FaceConfig
from emotion_attention.pipeline.data.decode import UNREADABLE, Frame

# How each frame's face was found: the store's codes (cache.faces_store.HOW). "fallback" is reserved
# by the store format; this aligner never carries a box over without fresh landmarks, so never writes it.
HOW_MISSING, HOW_DETECTOR, HOW_UPSAMPLED = HOW["missing"], HOW["detector"], HOW["upsampled"]
HOW_EQUALIZED, HOW_TRACKED, HOW_PREALIGNED = HOW["equalized"], HOW["tracked"], HOW["prealigned"]

PREDICTOR_FILE = "shape_predictor_68_face_landmarks.dat"

# dlib's mean frontal face (landmarks 17..67, unit square), the template of dlib.get_face_chip.
MEAN_FACE_X = np.array([
    0.000213256, 0.0752622, 0.18113, 0.29077, 0.393397, 0.586856, 0.689483, 0.799124,
    0.904991, 0.98004, 0.490127, 0.490127, 0.490127, 0.490127, 0.36688, 0.426036,
    0.490127, 0.554217, 0.613373, 0.121737, 0.187122, 0.265825, 0.334606, 0.260918,
    0.182743, 0.645647, 0.714428, 0.793132, 0.858516, 0.79751, 0.719335, 0.254149,
    0.340985, 0.428858, 0.490127, 0.551395, 0.639268, 0.726104, 0.642159, 0.556721,
    0.490127, 0.423532, 0.338094, 0.290379, 0.428096, 0.490127, 0.552157, 0.689874,
    0.553364, 0.490127, 0.42689])
MEAN_FACE_Y = np.array([
    0.106454, 0.038915, 0.0187482, 0.0344891, 0.0773906, 0.0773906, 0.0344891,
    0.0187482, 0.038915, 0.106454, 0.203352, 0.307009, 0.409805, 0.515625, 0.587326,
    0.609345, 0.628106, 0.609345, 0.587326, 0.216423, 0.178758, 0.179852, 0.231733,
    0.245099, 0.244077, 0.231733, 0.179852, 0.178758, 0.216423, 0.244077, 0.245099,
    0.780233, 0.745405, 0.727388, 0.742578, 0.727388, 0.745405, 0.780233, 0.864805,
    0.902192, 0.909281, 0.902192, 0.864805, 0.784792, 0.778746, 0.785343, 0.778746,
    0.784792, 0.824182, 0.831803, 0.824182])
TEMPLATE_FIRST = 17          # the template starts after the jaw line (0..16)
# Landmarks fitted to the template, as dlib.get_face_chip_details does: eyes, nose, upper lip, mouth
# corners. Eyebrows (17..26) and the lower lip (55..59, 65..67) move with the expression, so they are
# left out: the alignment then does not change when the subject frowns or opens the mouth.
ALIGN_POINTS = np.array([i for i in range(27, 68) if not (55 <= i <= 59 or 65 <= i <= 67)])
LEFT_EYE, RIGHT_EYE = slice(36, 42), slice(42, 48)   # image-left / image-right eye landmarks
TRACK_CHIP = 32              # side of the grey chip compared between frames to judge tracking


def default_predictor_path() -> Path:
    """dlib's 68-point model inside face-recognition-models, found without importing that package
    (its __init__ imports pkg_resources, which current setuptools no longer ships)."""
    spec = importlib.util.find_spec("face_recognition_models")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("face-recognition-models is not installed; `make install` (or pip install"
                                " face-recognition-models), or pass predictor_path")
    path = Path(list(spec.submodule_search_locations)[0]) / "models" / PREDICTOR_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing from face-recognition-models; reinstall it")
    return path


class FaceAligner:
    """dlib's HOG frontal detector and 68-point shape predictor, loaded once from an explicit path.

    >>> from emotion_attention.pipeline.data.decode import read_image_rgb
    >>> rgb = read_image_rgb(Path("data/samples/single_face.jpg"))  # `make sample-data`
    >>> aligner = FaceAligner(default_predictor_path())
    >>> boxes, scores = aligner.detect(rgb, scale=0.5)
    >>> boxes.shape
    (1, 4)
    """

    def __init__(self, predictor_path: Path):
        self.predictor_path = Path(predictor_path)
        self.detector = dlib.get_frontal_face_detector()
        self.predictor = dlib.shape_predictor(str(self.predictor_path))

    def detect(self, image: np.ndarray, scale: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
        """HOG faces in ``image`` (uint8 (H, W, 3) RGB or (H, W) grey) resized by ``scale``.

        Returns boxes float32 (N, 4) x0, y0, x1, y1 in the input's pixels and scores float32 (N,).
        """
        small = image if scale == 1.0 else cv2.resize(
            image, None, fx=scale, fy=scale, interpolation=cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR)
        rects, scores, _ = self.detector.run(np.ascontiguousarray(small), 0, 0.0)
        boxes = np.array([[r.left(), r.top(), r.right() + 1, r.bottom() + 1] for r in rects],
                         dtype=np.float32).reshape(-1, 4) / scale
        return boxes, np.asarray(scores, dtype=np.float32)

    def landmarks(self, rgb: np.ndarray, box: np.ndarray) -> np.ndarray:
        """float32 (68, 2) landmarks at full resolution inside ``box`` (x0, y0, x1, y1)."""
        x0, y0, x1, y1 = (int(round(v)) for v in box)
        shape = self.predictor(rgb, dlib.rectangle(x0, y0, x1 - 1, y1 - 1))
        return np.array([(p.x, p.y) for p in shape.parts()], dtype=np.float32)


_THREAD_ALIGNERS = threading.local()


def load_aligner(predictor_path: str = "") -> FaceAligner:
    """One FaceAligner per thread and model file, loaded on first use (workers call this per clip).

    Per thread because dlib's detector keeps scratch buffers: two threads sharing one find wrong faces
    (dask runs several threads per worker).
    """
    cache = _THREAD_ALIGNERS.__dict__.setdefault("by_path", {})
    if predictor_path not in cache:
        cache[predictor_path] = FaceAligner(Path(predictor_path) if predictor_path else default_predictor_path())
    return cache[predictor_path]


# -- alignment --------------------------------------------------------------------------------------
def template_points(size: int, padding: float) -> np.ndarray:
    """float64 (len(ALIGN_POINTS), 2): where those landmarks land in a ``size`` chip with ``padding``."""
    unit = np.stack([MEAN_FACE_X, MEAN_FACE_Y], axis=1)[ALIGN_POINTS - TEMPLATE_FIRST]  # (33, 2)
    return (unit + padding) / (1 + 2 * padding) * size


def similarity_transform(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """Least-squares rotation + uniform scale + shift taking src (N, 2) onto dst; (2, 3).

    In 2-D this is Umeyama's (1991) solution in closed form: with points as complex numbers z (src) and
    w (dst), centred, the best a = r e^{i theta} is sum(conj(z) w) / sum(|z|^2). No SVD: ~10x cheaper, and
    it runs twice per frame.
    """
    src_mean, dst_mean = src.mean(0), dst.mean(0)
    z = (src[:, 0] - src_mean[0]) + 1j * (src[:, 1] - src_mean[1])   # (N,)
    w = (dst[:, 0] - dst_mean[0]) + 1j * (dst[:, 1] - dst_mean[1])   # (N,)
    a = np.vdot(z, w) / max(np.vdot(z, z).real, 1e-12)               # vdot conjugates z
    lin = np.array([[a.real, -a.imag], [a.imag, a.real]])            # scale * rotation
    return np.hstack([lin, (dst_mean - lin @ src_mean)[:, None]])    # (2, 3)


def alignment_matrix(landmarks: np.ndarray, size: int = 256, padding: float = 0.25) -> np.ndarray:
    """(2, 3) similarity that maps source pixels into the aligned chip (apply it to landmarks too)."""
    src = np.asarray(landmarks, dtype=np.float64)[ALIGN_POINTS]
    return similarity_transform(src, template_points(size, padding))


def align_face(frame: np.ndarray, landmarks: np.ndarray, size: int = 256, padding: float = 0.25) -> np.ndarray:
    """Warp a face to dlib's frontal mean-face template: a ``size`` x ``size`` uint8 RGB chip.

    The default (256 px, padding 0.25) follows the paper's 256x256 frontal faces and reproduces
    dlib.get_face_chip: the eyes, nose and mouth are fitted by a similarity transform to dlib's mean
    frontal face, whose unit square spans the outer brow ends and brows-to-lower-lip; padding adds that
    share of the square on each side (0.25: the chip shows the whole face, chin and some hair).

    Arguments:
        frame: uint8 (H, W, 3) RGB.
        landmarks: float (68, 2) dlib landmarks in frame pixels.
        size: chip side in pixels.
        padding: margin around the template on each side.
    Returns:
        uint8 (size, size, 3) RGB chip; parts outside the frame are black.

    >>> from emotion_attention.pipeline.data.decode import read_image_rgb
    >>> rgb = read_image_rgb(Path("data/samples/single_face.jpg"))  # `make sample-data`
    >>> aligner = load_aligner()
    >>> boxes, _ = aligner.detect(rgb)
    >>> chip = align_face(rgb, aligner.landmarks(rgb, boxes[0]))
    >>> chip.shape, chip.dtype
    ((256, 256, 3), dtype('uint8'))
    """
    matrix = alignment_matrix(landmarks, size, padding)
    return cv2.warpAffine(frame, matrix, (size, size), flags=cv2.INTER_LINEAR,
                          borderMode=cv2.BORDER_CONSTANT, borderValue=0)


def transform_points(matrix: np.ndarray, points: np.ndarray) -> np.ndarray:
    """Apply a (2, 3) affine to (N, 2) points."""
    return np.asarray(points, np.float64) @ matrix[:, :2].T + matrix[:, 2]


def eye_centres(landmarks: np.ndarray) -> np.ndarray:
    """float (2, 2): the image-left and image-right eye centres of 68-point landmarks."""
    return np.stack([landmarks[LEFT_EYE].mean(0), landmarks[RIGHT_EYE].mean(0)])


# -- subject selection and tracking ------------------------------------------------------------------
def box_iou(a: np.ndarray, b: np.ndarray) -> float:
    """Intersection over union of two x0, y0, x1, y1 boxes."""
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return float(inter / union) if union > 0 else 0.0


def select_subject(boxes: np.ndarray, last_box: Optional[np.ndarray], tracking: bool, match_iou: float) -> int:
    """Index of the subject among detected boxes, or -1.

    While the subject is tracked (``tracking``) only a box overlapping its last box qualifies, so the
    clip never switches to another face. Otherwise the box overlapping the subject's last known place
    wins, and failing that (first sighting, or the subject moved during a faceless run) the largest.
    """
    if len(boxes) == 0:
        return -1
    if last_box is not None:
        ious = np.array([box_iou(b, last_box) for b in boxes])
        if ious.max() >= match_iou:
            return int(ious.argmax())
        if tracking:
            return -1
    areas = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    return int(areas.argmax())


def landmark_bbox(landmarks: np.ndarray) -> np.ndarray:
    return np.concatenate([landmarks.min(0), landmarks.max(0)]).astype(np.float64)


def box_relation(box: np.ndarray, landmarks: np.ndarray) -> np.ndarray:
    """The detector box expressed in units of the landmarks' bounding box (to predict it when tracking)."""
    lb = landmark_bbox(landmarks)
    wh = np.maximum(lb[2:] - lb[:2], 1.0)
    return np.concatenate([(box[:2] - lb[:2]) / wh, (box[2:] - lb[:2]) / wh])


def predict_box(landmarks: np.ndarray, relation: np.ndarray) -> np.ndarray:
    """Detector-like box around landmarks, using the relation measured at the last detection."""
    lb = landmark_bbox(landmarks)
    wh = np.maximum(lb[2:] - lb[:2], 1.0)
    return np.concatenate([lb[:2] + relation[:2] * wh, lb[:2] + relation[2:] * wh]).astype(np.float32)


def rescale_alignment(matrix: np.ndarray, size: int, padding: float, new_size: int, new_padding: float) -> np.ndarray:
    """The alignment of the same landmarks into a (new_size, new_padding) chip, from a (size, padding) one.

    Both templates are the same points up to scale and shift, and a least-squares similarity commutes with
    a similarity of its targets, so this equals alignment_matrix(landmarks, new_size, new_padding).
    """
    k = (1 + 2 * padding) / size * new_size / (1 + 2 * new_padding)
    shift = (new_padding - padding) * new_size / (1 + 2 * new_padding)
    return np.hstack([k * matrix[:, :2], k * matrix[:, 2:] + shift])


def track_chip(rgb: np.ndarray, landmarks: np.ndarray, matrix: Optional[np.ndarray] = None) -> np.ndarray:
    """Zero-mean, unit-norm grey (32, 32) inner-face chip; its dot product with another is their NCC.
    ``matrix``: the landmarks' alignment into the (256, 0.25) chip, when already known (saves a fit)."""
    if matrix is None:
        matrix = alignment_matrix(landmarks)
    matrix = rescale_alignment(matrix, 256, 0.25, TRACK_CHIP, 0.0)
    chip = cv2.warpAffine(rgb, matrix, (TRACK_CHIP, TRACK_CHIP), flags=cv2.INTER_LINEAR,
                          borderMode=cv2.BORDER_CONSTANT, borderValue=0)
    grey = cv2.cvtColor(chip, cv2.COLOR_RGB2GRAY).astype(np.float32)
    grey -= grey.mean()
    return grey / (np.linalg.norm(grey) + 1e-6)


def inside_share(landmarks: np.ndarray, shape: tuple) -> float:
    """Share of landmarks that lie inside the frame."""
    h, w = shape[:2]
    inside = (landmarks[:, 0] >= 0) & (landmarks[:, 0] < w) & (landmarks[:, 1] >= 0) & (landmarks[:, 1] < h)
    return float(inside.mean())


# -- per-frame face finding --------------------------------------------------------------------------
@dataclass
class FaceRow:
    """One frame's result. A missing face is present=False, NaN box/landmarks/score, how=HOW_MISSING."""
    present: bool
    box: np.ndarray        # float32 (4,)
    landmarks: np.ndarray  # float32 (68, 2)
    score: float
    how: int
    matrix: Optional[np.ndarray] = None  # (2, 3) alignment of the landmarks into the 256 px, 0.25 chip

    @staticmethod
    def missing() -> "FaceRow":
        return FaceRow(False, np.full(4, np.nan, np.float32), np.full((68, 2), np.nan, np.float32),
                       float("nan"), HOW_MISSING)


def detection_passes(width: int, cfg: FaceConfig, full: bool,
                     face_width: Optional[float] = None) -> list[tuple[int, float, bool]]:
    """The retry ladder for a frame of this width: (how code, scale, equalise) per pass, in order.

    fast: first pass at detect_width, or larger so that the subject's last face (``face_width`` px)
    stays at least min_face_px wide; naive: at full resolution. A full ladder adds a 2x upsampled pass
    and a histogram-equalised pass, as long as they stay within max_retry_width.
    """
    base = 1.0 if cfg.mode == "naive" else min(1.0, cfg.detect_width / width)
    if cfg.mode == "fast" and face_width:
        base = min(1.0, max(base, cfg.min_face_px / face_width))
    passes = [(HOW_DETECTOR, base, False)]
    if not full:
        return passes
    retry = base
    if 2 * base * width <= cfg.max_retry_width:
        retry = 2 * base
        passes.append((HOW_UPSAMPLED, retry, False))
    passes.append((HOW_EQUALIZED, retry, True))
    return passes


@dataclass
class SubjectTracker:
    """Follows one subject through a clip: detection ladder, landmark tracking, degradation checks.

    >>> from emotion_attention.pipeline.data.decode import iter_frames
    >>> tracker = SubjectTracker(load_aligner(), FaceConfig())
    >>> rows = [tracker.step(f.rgb) for f in iter_frames(Path("data/samples/single_face.mp4"), max_frames=5)]
    >>> len(rows), all(row.present for row in rows)
    (5, True)
    """
    aligner: FaceAligner
    cfg: FaceConfig
    last_box: Optional[np.ndarray] = None       # subject's last known box (kept through faceless runs)
    landmarks: Optional[np.ndarray] = None      # previous frame's landmarks; None when it had no face
    relation: Optional[np.ndarray] = None       # detector box relative to the landmark bbox
    template: Optional[np.ndarray] = None       # grey chip of the last detection
    since_detect: int = 0
    missing_run: int = 0

    def step(self, rgb: np.ndarray) -> FaceRow:
        """Find the subject in the next frame (uint8 (H, W, 3) RGB) of the clip."""
        if self.cfg.mode == "fast" and self.landmarks is not None and self.since_detect < self.cfg.redetect_every:
            row = self._track(rgb)
            if row is not None:
                return row
        return self._detect(rgb)

    def _track(self, rgb: np.ndarray) -> Optional[FaceRow]:
        box = predict_box(self.landmarks, self.relation)
        landmarks = self.aligner.landmarks(rgb, box)
        old_size = np.ptp(self.landmarks, axis=0).mean()
        new_size = np.ptp(landmarks, axis=0).mean()
        if not 0.8 <= new_size / max(old_size, 1.0) <= 1.25 or inside_share(landmarks, rgb.shape) < 0.9:
            return None  # degraded: re-detect this frame
        matrix = alignment_matrix(landmarks)
        if float((track_chip(rgb, landmarks, matrix) * self.template).sum()) < self.cfg.min_track_similarity:
            return None
        self.since_detect += 1
        self.landmarks = landmarks
        self.last_box = predict_box(landmarks, self.relation)
        return FaceRow(True, self.last_box, landmarks, float("nan"), HOW_TRACKED, matrix)

    def _detect(self, rgb: np.ndarray) -> FaceRow:
        tracking = self.landmarks is not None
        full = self.cfg.mode == "naive" or self.missing_run % self.cfg.retry_every == 0
        face_width = None if self.last_box is None else float(self.last_box[2] - self.last_box[0])
        for how, scale, equalise in detection_passes(rgb.shape[1], self.cfg, full, face_width):
            image = self._equalised(rgb) if equalise else rgb
            boxes, scores = self.aligner.detect(image, scale)
            pick = select_subject(boxes, self.last_box, tracking, self.cfg.match_iou)
            if pick >= 0:
                return self._accept(rgb, boxes[pick], float(scores[pick]), how)
        self.landmarks, self.missing_run = None, self.missing_run + 1
        return FaceRow.missing()

    def _equalised(self, rgb: np.ndarray) -> np.ndarray:
        """Histogram-equalised grey frame: finds faces in dark or washed-out frames."""
        return cv2.equalizeHist(cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY))

    def _accept(self, rgb: np.ndarray, box: np.ndarray, score: float, how: int) -> FaceRow:
        landmarks = self.aligner.landmarks(rgb, box)  # refine at full resolution
        self.last_box, self.landmarks = box.astype(np.float32), landmarks
        self.relation = box_relation(box, landmarks)
        matrix = alignment_matrix(landmarks)
        if self.cfg.mode == "fast":
            self.template = track_chip(rgb, landmarks, matrix)
        self.since_detect, self.missing_run = 0, 0
        return FaceRow(True, self.last_box, landmarks, score, how, matrix)


CHUNK_FRAMES = 64  # frames aligned and written per piece: memory per clip stays at one chunk of chips


def empty_clip_arrays(size: int) -> dict[str, np.ndarray]:
    """The faces-store arrays of a clip with no frames (every key, zero rows)."""
    return {"faces": np.zeros((0, size, size, 3), np.uint8), "frame_index": np.zeros(0, np.int32),
            "timestamp_ms": np.zeros(0, np.float32), "present": np.zeros(0, bool),
            "box": np.zeros((0, 4), np.float32), "landmarks": np.zeros((0, 68, 2), np.float32),
            "score": np.zeros(0, np.float32), "how": np.zeros(0, np.uint8)}


def rows_to_arrays(frames: list[Frame], rows: list[FaceRow], chips: list[np.ndarray]) -> dict[str, np.ndarray]:
    """One chunk of frames' results -> the faces-store arrays of those rows."""
    return {
        "faces": np.stack(chips).astype(np.uint8, copy=False),             # (n, S, S, 3)
        "frame_index": np.array([f.index for f in frames], np.int32),
        "timestamp_ms": np.array([f.timestamp_ms for f in frames], np.float32),
        "present": np.array([r.present for r in rows], bool),
        "box": np.stack([r.box for r in rows]).astype(np.float32),         # (n, 4)
        "landmarks": np.stack([r.landmarks for r in rows]).astype(np.float32),  # (n, 68, 2)
        "score": np.array([r.score for r in rows], np.float32),
        "how": np.array([r.how for r in rows], np.uint8),
    }


def iter_chunks(frames: Iterable[Frame], face_of: Callable[[Frame], tuple[FaceRow, np.ndarray]],
                chunk: int = CHUNK_FRAMES) -> Iterator[dict[str, np.ndarray]]:
    """Run ``face_of`` (frame -> (FaceRow, uint8 chip)) over a clip's frames and yield the faces-store
    arrays (see cache/faces_store.py) of every ``chunk`` frames: memory stays at one chunk of frames and
    chips, whatever the clip's length."""
    done, rows, chips = [], [], []
    for frame in frames:
        row, chip = face_of(frame)
        done.append(Frame(frame.index, frame.timestamp_ms, UNREADABLE))  # keep index and time, not pixels
        rows.append(row)
        chips.append(chip)
        if len(rows) == chunk:
            yield rows_to_arrays(done, rows, chips)
            done, rows, chips = [], [], []
    if rows:
        yield rows_to_arrays(done, rows, chips)


def concat_chunks(chunks: Iterable[dict[str, np.ndarray]], size: int) -> dict[str, np.ndarray]:
    """A whole clip's arrays from its chunks (in-memory callers: tests, predict, benches)."""
    parts = list(chunks)
    if not parts:
        return empty_clip_arrays(size)
    return {name: np.concatenate([p[name] for p in parts]) for name in parts[0]}


def align_clip_chunks(frames: Iterable[Frame], aligner: FaceAligner, cfg: FaceConfig,
                      chunk: int = CHUNK_FRAMES) -> Iterator[dict[str, np.ndarray]]:
    """Find, track and align one subject through a clip's frames, ``chunk`` frames at a time.

    Arguments:
        frames: the clip's frames in order (uint8 RGB), e.g. from pipeline.decode.iter_frames.
        aligner: a loaded FaceAligner (load_aligner()).
        cfg: FaceConfig (mode "fast" or "naive").
        chunk: frames per yielded piece.
    Returns:
        an iterator of dicts of arrays exactly as the faces store holds them: faces uint8 (n, S, S, 3),
        frame_index, timestamp_ms, present, box (n, 4), landmarks (n, 68, 2), score, how. Frames without
        a face (or unreadable ones) are kept: present=False, black chip, NaN box/landmarks/score, how=0.
        When the frame size changes inside a clip, tracking restarts: old coordinates mean nothing there.
    """
    tracker = SubjectTracker(aligner, cfg)
    blank = np.zeros((cfg.size, cfg.size, 3), np.uint8)
    shape: list = [None]

    def face_of(frame: Frame) -> tuple[FaceRow, np.ndarray]:
        nonlocal tracker
        if not frame.readable:
            return FaceRow.missing(), blank
        if shape[0] is not None and frame.rgb.shape != shape[0]:
            tracker = SubjectTracker(aligner, cfg)
        shape[0] = frame.rgb.shape
        row = tracker.step(frame.rgb)
        if not row.present:
            return row, blank
        matrix = rescale_alignment(row.matrix, 256, 0.25, cfg.size, cfg.padding)  # the fit the tracker made
        return row, cv2.warpAffine(frame.rgb, matrix, (cfg.size, cfg.size), flags=cv2.INTER_LINEAR,
                                   borderMode=cv2.BORDER_CONSTANT, borderValue=0)

    return iter_chunks(frames, face_of, chunk)


def align_clip_frames(frames: Iterable[Frame], aligner: FaceAligner, cfg: FaceConfig) -> dict[str, np.ndarray]:
    """align_clip_chunks, concatenated: the whole clip's arrays in memory.

    >>> from emotion_attention.pipeline.data.decode import iter_frames
    >>> frames = iter_frames(Path("data/samples/single_face.mp4"), max_frames=8)
    >>> arrays = align_clip_frames(frames, load_aligner(), FaceConfig())
    >>> arrays["faces"].shape, bool(arrays["present"].all())
    ((8, 256, 256, 3), True)
    """
    return concat_chunks(align_clip_chunks(frames, aligner, cfg), cfg.size)


def resize_prealigned_chunks(frames: Iterable[Frame], cfg: FaceConfig,
                             chunk: int = CHUNK_FRAMES) -> Iterator[dict[str, np.ndarray]]:
    """Frames that already are aligned faces: resize to the chip size, no detection (how=prealigned).

    The box is the whole image; landmarks and score are NaN because nothing was detected. An unreadable
    image is a faceless row.
    """
    blank = np.zeros((cfg.size, cfg.size, 3), np.uint8)

    def face_of(frame: Frame) -> tuple[FaceRow, np.ndarray]:
        if not frame.readable:
            return FaceRow.missing(), blank
        h, w = frame.rgb.shape[:2]
        interp = cv2.INTER_AREA if max(h, w) > cfg.size else cv2.INTER_LINEAR
        row = FaceRow(True, np.array([0, 0, w, h], np.float32), np.full((68, 2), np.nan, np.float32),
                      float("nan"), HOW_PREALIGNED)
        return row, cv2.resize(frame.rgb, (cfg.size, cfg.size), interpolation=interp)

    return iter_chunks(frames, face_of, chunk)


def resize_prealigned_frames(frames: Iterable[Frame], cfg: FaceConfig) -> dict[str, np.ndarray]:
    """resize_prealigned_chunks, concatenated.

    >>> from emotion_attention.pipeline.data.decode import Frame
    >>> chips = [Frame(i, 40.0 * i, np.zeros((112, 112, 3), np.uint8)) for i in range(3)]
    >>> resize_prealigned_frames(chips, FaceConfig(size=64))["faces"].shape
    (3, 64, 64, 3)
    """
    return concat_chunks(resize_prealigned_chunks(frames, cfg), cfg.size)
