"""Streaming decode: real sample videos, frame folders, frame selection, and clear errors."""
import inspect

import cv2
import numpy as np
import pytest

from pipeline.decode import (DecodeConfig, DecodeError, iter_clip_frames, iter_folder_frames, iter_frames,
                             keep_frame, probe_video)
from fixtures_preprocess import write_bad_media, write_zero_frame_video


def test_probe_single_face(samples_dir):
    info = probe_video(samples_dir / "single_face.mp4")
    assert (info.fps, info.frame_count, info.width, info.height) == (30.0, 72, 640, 360)


def test_iter_frames_streams_rgb_in_order(samples_dir):
    path = samples_dir / "single_face.mp4"
    frames = iter_frames(path)
    assert inspect.isgenerator(frames)  # lazy: one frame at a time, never the whole video
    frames = list(frames)
    assert [f.index for f in frames] == list(range(72))
    assert frames[0].rgb.shape == (360, 640, 3) and frames[0].rgb.dtype == np.uint8
    ok, bgr = cv2.VideoCapture(str(path)).read()
    assert ok and np.array_equal(frames[0].rgb, bgr[:, :, ::-1])  # RGB, not BGR
    assert frames[30].timestamp_ms == pytest.approx(1000.0)


@pytest.mark.parametrize("kwargs, expected", [
    ({"every_nth": 10}, list(range(0, 72, 10))),
    ({"max_frames": 5}, [0, 1, 2, 3, 4]),
    ({"fps_cap": 10}, list(range(0, 72, 3))),          # 30 fps capped to 10: one frame in three
    ({"fps_cap": 10, "every_nth": 2, "max_frames": 4}, [0, 4, 6, 10]),
    ({"fps_cap": 60}, list(range(72))),                 # a cap above the rate keeps everything
])
def test_frame_selection(samples_dir, kwargs, expected):
    assert [f.index for f in iter_frames(samples_dir / "single_face.mp4", **kwargs)] == expected


def test_keep_frame_skips_off_stride_and_same_slot():
    assert keep_frame(3, 25.0, None, 2, -1) == -1      # not a multiple of every_nth
    assert keep_frame(1, 25.0, 10.0, 1, 0) == -1       # 1 * 10 / 25 = slot 0, already taken
    assert keep_frame(3, 25.0, 10.0, 1, 0) == 1        # slot 1 is new


@pytest.mark.parametrize("kind, reason", [("corrupt", "cannot be opened"), ("empty", "empty file"),
                                          ("text", "cannot be opened")])
def test_bad_files_raise_named_errors(tmp_path, kind, reason):
    path = write_bad_media(tmp_path)[kind]
    for call in (lambda: probe_video(path), lambda: list(iter_frames(path))):
        with pytest.raises(DecodeError, match=reason) as info:
            call()
        assert str(path) in str(info.value)


def test_zero_frame_video(tmp_path):
    path = write_zero_frame_video(tmp_path / "zero.avi")
    with pytest.raises(DecodeError, match="no decodable frame"):
        probe_video(path)
    with pytest.raises(DecodeError, match="no decodable frame"):
        list(iter_frames(path))


def test_folder_frames_natural_order(tmp_path):
    images = {}
    for i in (1, 2, 10, 3):  # frame_10 must come after frame_3
        rgb = np.full((24, 32, 3), i * 20, np.uint8)
        rgb[0, 0] = (i, 0, 255)
        cv2.imwrite(str(tmp_path / f"frame_{i}.png"), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
        images[i] = rgb
    (tmp_path / "notes.txt").write_text("ignored")
    frames = list(iter_folder_frames(tmp_path, fps=20.0))
    assert [f.index for f in frames] == [0, 1, 2, 3]
    for frame, i in zip(frames, (1, 2, 3, 10)):
        assert np.array_equal(frame.rgb, images[i])
    assert [f.timestamp_ms for f in frames] == [0.0, 50.0, 100.0, 150.0]
    same = list(iter_clip_frames(tmp_path, "frames", DecodeConfig(every_nth=2, folder_fps=20.0)))
    assert [f.index for f in same] == [0, 2]


def test_empty_folder_raises(tmp_path):
    with pytest.raises(DecodeError, match="no images"):
        list(iter_folder_frames(tmp_path))


def test_decode_config_validation_names_field():
    with pytest.raises(ValueError, match="every_nth"):
        DecodeConfig(every_nth=0).validate()
    with pytest.raises(ValueError, match="fps_cap"):
        DecodeConfig(fps_cap=-1).validate()
