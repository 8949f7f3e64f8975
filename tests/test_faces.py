"""Face detection, tracking and alignment on the real sample media."""
import itertools
from pathlib import Path

import cv2
import dlib
import numpy as np
import pytest

from emotion_attention.cache.faces_store import FRAME_DATASETS
from emotion_attention.cache.errors import ConfigError
from emotion_attention.pipeline.data.decode import Frame, iter_folder_frames, iter_frames, read_image_rgb
from emotion_attention.pipeline.faces.align import (ALIGN_POINTS, HOW_DETECTOR, HOW_EQUALIZED, HOW_MISSING, HOW_PREALIGNED, HOW_TRACKED, HOW_UPSAMPLED, MEAN_FACE_X, MEAN_FACE_Y, align_clip_frames, align_face, alignment_matrix, box_iou, default_predictor_path, detection_passes, eye_centres, load_aligner, resize_prealigned_frames, select_subject, similarity_transform, template_points, transform_points)
from emotion_attention.pipeline.configs import FaceConfig


@pytest.fixture(scope="module")
def aligner():
    return load_aligner()


@pytest.fixture(scope="module")
def single_face(samples_dir, aligner):
    return align_clip_frames(iter_frames(samples_dir / "single_face.mp4"), aligner, FaceConfig())


def runs(present):
    return [(bool(k), len(list(g))) for k, g in itertools.groupby(present)]


def test_predictor_found_without_importing_package():
    path = default_predictor_path()
    assert path.name == "shape_predictor_68_face_landmarks.dat" and path.stat().st_size > 90_000_000


def test_similarity_transform_recovers_known_motion():
    src = template_points(256, 0.25)
    angle, scale, shift = 0.3, 1.7, np.array([12.0, -5.0])
    rot = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    dst = src @ (scale * rot).T + shift
    matrix = similarity_transform(src, dst)
    assert np.allclose(matrix, np.hstack([scale * rot, shift[:, None]]), atol=1e-9)


def test_align_face_matches_dlib_face_chip(samples_dir, aligner):
    rgb = read_image_rgb(samples_dir / "single_face.jpg")
    boxes, _ = aligner.detect(rgb)
    landmarks = aligner.landmarks(rgb, boxes[0])
    x0, y0, x1, y1 = (int(round(v)) for v in boxes[0])
    shape = aligner.predictor(rgb, dlib.rectangle(x0, y0, x1 - 1, y1 - 1))
    reference = dlib.get_face_chip(rgb, shape, size=256, padding=0.25)
    chip = align_face(rgb, landmarks, 256, 0.25)
    assert chip.shape == (256, 256, 3) and chip.dtype == np.uint8
    assert np.abs(chip.astype(int) - reference.astype(int)).mean() < 8  # same template, interpolation differs
    # the aligned landmarks land on the template (a frontal face fits it closely)
    moved = transform_points(alignment_matrix(landmarks), landmarks[ALIGN_POINTS])
    assert np.abs(moved - template_points(256, 0.25)).mean() < 4


def test_single_face_present_in_95_percent(single_face):
    assert set(single_face) == set(FRAME_DATASETS)
    for name, dtype in FRAME_DATASETS.items():
        assert single_face[name].dtype == dtype and len(single_face[name]) == 72
    assert single_face["faces"].shape == (72, 256, 256, 3)
    assert single_face["present"].mean() >= 0.95
    assert set(np.unique(single_face["how"])) <= {HOW_DETECTOR, HOW_TRACKED}
    assert single_face["how"][0] == HOW_DETECTOR and (single_face["how"] == HOW_TRACKED).mean() > 0.5


def test_eyes_land_in_the_same_place_across_chips(single_face, aligner):
    """Re-detect landmarks on the chips themselves: the eyes stay within a few pixels of one place.

    (The first ~20 frames, where the head is turned, sit ~3.5 px off; naive detection gives the same.)
    """
    eyes = []
    for chip in single_face["faces"][single_face["present"]]:
        boxes, _ = aligner.detect(chip)
        assert len(boxes) == 1
        eyes.append(eye_centres(aligner.landmarks(chip, boxes[0])))
    eyes = np.array(eyes)                                    # (F, 2 eyes, 2 xy)
    median = np.median(eyes, axis=0)
    assert np.abs(eyes - median).max() < 5.0
    template = np.full((68, 2), np.nan)
    template[17:] = (np.stack([MEAN_FACE_X, MEAN_FACE_Y], 1) + 0.25) / 1.5 * 256  # where dlib puts them
    assert np.abs(median - eye_centres(template)).max() < 4.0


@pytest.mark.parametrize("name, first, second", [("face_noface.mov", True, False),
                                                 ("noface_face.mov", False, True)])
def test_face_leaves_and_enters_in_order(samples_dir, aligner, name, first, second):
    arrays = align_clip_frames(iter_frames(samples_dir / name), aligner, FaceConfig())
    found = runs(arrays["present"])
    assert [found[0][0], found[1][0]] == [first, second]
    assert found[0][1] >= 60 and found[1][1] >= 60
    assert sum(n for _, n in found[2:]) <= 2  # at most a stray frame at the very end
    missing = ~arrays["present"]
    assert np.all(arrays["how"][missing] == HOW_MISSING) and np.all(arrays["faces"][missing] == 0)
    assert np.isnan(arrays["box"][missing]).all() and np.isnan(arrays["landmarks"][missing]).all()


def test_no_face_video(samples_dir, aligner):
    arrays = align_clip_frames(iter_frames(samples_dir / "no_face.mp4", max_frames=30), aligner, FaceConfig())
    assert arrays["faces"].shape == (30, 256, 256, 3)
    assert not arrays["present"].any() and not arrays["faces"].any()
    assert np.all(arrays["how"] == HOW_MISSING) and np.isnan(arrays["score"]).all()


def test_small_face_found_by_upsampled_retry(samples_dir, aligner):
    arrays = align_clip_frames(iter_frames(samples_dir / "carphone_pristine.mp4", max_frames=20), aligner,
                               FaceConfig())
    assert arrays["present"].mean() >= 0.9
    assert arrays["how"][0] == HOW_UPSAMPLED          # 43 px face: the plain pass cannot see it


def test_fast_agrees_with_naive(samples_dir, aligner, single_face):
    naive = align_clip_frames(iter_frames(samples_dir / "single_face.mp4"), aligner, FaceConfig(mode="naive"))
    assert np.all(naive["how"] == HOW_DETECTOR)
    assert np.array_equal(naive["present"], single_face["present"])
    ious = [box_iou(a, b) for a, b in zip(naive["box"], single_face["box"])]
    assert min(ious) >= 0.5
    left = transform_points(alignment_matrix(naive["landmarks"][10]), naive["landmarks"][10])
    right = transform_points(alignment_matrix(naive["landmarks"][10]), single_face["landmarks"][10])
    assert np.linalg.norm(left - right, axis=1).mean() < 3.0


def test_select_subject_never_switches():
    boxes = np.array([[0, 0, 100, 100], [300, 0, 340, 40]], np.float32)
    assert select_subject(boxes, None, False, 0.3) == 0                             # largest first
    small = np.array([300, 0, 340, 40], np.float32)
    assert select_subject(boxes, small, True, 0.3) == 1                              # keep the tracked one
    assert select_subject(boxes[:1], small, True, 0.3) == -1                         # never switch
    assert select_subject(boxes[:1], small, False, 0.3) == 0                         # re-acquire after loss
    assert select_subject(np.zeros((0, 4), np.float32), None, False, 0.3) == -1


def test_multi_face_follows_one_subject(samples_dir, aligner):
    rgb = read_image_rgb(samples_dir / "multi_face.jpg")
    boxes, _ = aligner.detect(rgb)
    assert len(boxes) >= 3
    frames = [Frame(i, 0.0, rgb) for i in range(4)]
    arrays = align_clip_frames(frames, aligner, FaceConfig(detect_width=1000, max_retry_width=1000))
    areas = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    largest = boxes[areas.argmax()]
    assert all(box_iou(b, largest) > 0.5 for b in arrays["box"])


def test_detection_passes_ladder():
    fast = FaceConfig()
    assert detection_passes(640, fast, full=False) == [(HOW_DETECTOR, 0.5, False)]
    assert detection_passes(640, fast, full=True) == [(HOW_DETECTOR, 0.5, False), (HOW_UPSAMPLED, 1.0, False),
                                                      (HOW_EQUALIZED, 1.0, True)]
    assert detection_passes(640, fast, full=False, face_width=100.0) == [(HOW_DETECTOR, 1.0, False)]
    assert detection_passes(640, fast, full=False, face_width=400.0) == [(HOW_DETECTOR, 0.5, False)]
    naive = FaceConfig(mode="naive")
    assert detection_passes(960, naive, full=True) == [(HOW_DETECTOR, 1.0, False), (HOW_EQUALIZED, 1.0, True)]
    assert detection_passes(176, naive, full=True)[1] == (HOW_UPSAMPLED, 2.0, False)


def test_prealigned_folder_only_resized(tmp_path, samples_dir):
    chip = cv2.resize(cv2.imread(str(samples_dir / "single_face.jpg")), (128, 128))
    for i in range(3):
        cv2.imwrite(str(tmp_path / f"{i:03d}.png"), chip)
    arrays = resize_prealigned_frames(iter_folder_frames(tmp_path), FaceConfig())
    assert arrays["faces"].shape == (3, 256, 256, 3) and arrays["present"].all()
    assert np.all(arrays["how"] == HOW_PREALIGNED)
    assert np.array_equal(arrays["box"][0], [0, 0, 128, 128])
    expected = cv2.resize(chip[:, :, ::-1], (256, 256), interpolation=cv2.INTER_LINEAR)
    assert np.array_equal(arrays["faces"][1], expected)


def test_empty_clip_has_every_array(aligner):
    arrays = align_clip_frames([], aligner, FaceConfig(size=64))
    assert {k: v.shape for k, v in arrays.items()}["faces"] == (0, 64, 64, 3)
    assert set(arrays) == set(FRAME_DATASETS)


def test_face_config_validation_names_field():
    with pytest.raises(ConfigError, match="mode"):
        FaceConfig(mode="quick").validate()
    with pytest.raises(ConfigError, match="predictor_path"):
        FaceConfig(predictor_path=str(Path("/nonexistent.dat"))).validate()
