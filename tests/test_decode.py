"""Streaming decode: real sample videos, frame folders, frame selection, and clear errors."""
import inspect

import cv2
import numpy as np
import pytest

from emotion_attention.cache.errors import ConfigError
from emotion_attention.pipeline.configs import DecodeConfig
from emotion_attention.pipeline.data import decode
from emotion_attention.pipeline.data.decode import (DecodeError, iter_clip_frames, iter_folder_frames, iter_frames, keep_frame, probe_video)
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
    with pytest.raises(ConfigError, match="every_nth"):
        DecodeConfig(every_nth=0).validate()
    with pytest.raises(ConfigError, match="fps_cap"):
        DecodeConfig(fps_cap=-1).validate()


# -- damage: truncated videos, corrupt images, mixed sizes (issue 12) ------------------------------------
from emotion_attention.pipeline.data.clips import Clip  # noqa: E402
from emotion_attention.pipeline.stages.check import check_dataset
from emotion_attention.pipeline.data.decode import DecodeStats, count_video_frames, folder_is_square, is_short  # noqa: E402
from dataset_trees import real_frames  # noqa: E402
from fixtures_preprocess import write_mjpg_video  # noqa: E402


@pytest.fixture(scope="module")
def truncated_video(tmp_path_factory):
    """A 30-frame MJPG AVI of real frames, and a copy cut to its first third (bytes)."""
    folder = tmp_path_factory.mktemp("trunc")
    frames = [bgr[:, :, ::-1] for bgr in real_frames(30, size=None)]
    full = write_mjpg_video(folder / "full.avi", frames, fps=30)
    data = full.read_bytes()
    cut = folder / "Train" / "Happy" / "cut.avi"
    cut.parent.mkdir(parents=True)
    cut.write_bytes(data[: len(data) // 3])
    return full, cut


def test_count_frames_finds_a_video_cut_to_a_third(truncated_video):
    full, cut = truncated_video
    assert count_video_frames(full) == (30, 30)
    decoded, total = count_video_frames(cut)
    assert total == 30 and 5 <= decoded <= 12 and is_short(decoded, total)
    probe_video(cut)  # the first frame still decodes: probing alone would call it fine


def test_check_reports_the_truncated_video_by_name(truncated_video):
    full, cut = truncated_video
    report = check_dataset(cut.parents[2], progress=False)
    assert not report.ok
    [problem] = [p for p in report.problems if p.path == str(cut)]
    assert problem.severity == "error" and "of the 30 frames its container announces decode" in problem.message
    assert check_dataset(cut.parents[2], progress=False, quick=True).ok  # --quick decodes one frame only


def test_corrupt_middle_is_found(tmp_path, truncated_video):
    full, _ = truncated_video
    data = bytearray(full.read_bytes())
    n = len(data)
    data[n // 3: n // 2] = np.random.default_rng(0).integers(0, 256, n // 2 - n // 3, dtype=np.uint8).tobytes()
    bad = tmp_path / "mid.avi"
    bad.write_bytes(bytes(data))
    decoded, total = count_video_frames(bad)
    assert is_short(decoded, total), (decoded, total)


def test_stats_record_decoded_frames(truncated_video):
    full, cut = truncated_video
    stats = DecodeStats()
    kept = list(iter_frames(cut, every_nth=2, stats=stats))
    assert stats.reached_end and stats.decoded == count_video_frames(cut)[0]
    assert [f.index for f in kept] == list(range(0, stats.decoded, 2))
    capped = DecodeStats()
    list(iter_frames(full, max_frames=5, stats=capped))
    assert capped.decoded == 5 and not capped.reached_end  # stopped on purpose: not damage


def test_folder_with_corrupt_image_and_size_change(tmp_path):
    frames = real_frames(4, size=(64, 36))
    for i, bgr in enumerate(frames):
        cv2.imwrite(str(tmp_path / f"f{i}.png"), bgr if i < 3 else cv2.resize(bgr, (32, 18)))
    (tmp_path / "f1.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    stats = DecodeStats()
    out = list(iter_folder_frames(tmp_path, stats=stats))
    assert [f.readable for f in out] == [True, False, True, True]
    assert out[1].rgb.shape == (1, 1, 3) and stats.unreadable == [1] and stats.size_changes == [3]
    assert stats.attrs() == {"decoded_frames": 4, "unreadable_frames": 1}
    for name in ("f0.png", "f2.png", "f3.png"):
        (tmp_path / name).write_bytes(b"nope")
    with pytest.raises(DecodeError, match="none of its 4 images can be read"):
        list(iter_folder_frames(tmp_path))


def test_prealigned_is_decided_on_every_image(tmp_path):
    frame = real_frames(1, size=None)[0]                       # 640x360
    square = frame[:, 140:500]                                 # 360x360 face crop
    cv2.imwrite(str(tmp_path / "0001.jpg"), square)
    cv2.imwrite(str(tmp_path / "0002.jpg"), square)
    assert folder_is_square(tmp_path)
    cv2.imwrite(str(tmp_path / "0003.jpg"), frame)             # one full frame among square ones
    assert not folder_is_square(tmp_path)


@pytest.mark.parametrize("case", ["square", "one full frame", "full frame skipped by the decode", "unreadable image",
                                  "held bytes run out", "full frame after the held bytes"])
def test_the_decoded_frames_decide_prealigned_as_the_headers_do(tmp_path, monkeypatch, case):
    frame = real_frames(1, size=None)[0]                       # 640x360
    square = frame[:, 140:500]
    images = [square] * 6
    if case in ("one full frame", "full frame skipped by the decode", "full frame after the held bytes"):
        images[5 if case != "full frame skipped by the decode" else 3] = frame
    for i, bgr in enumerate(images):
        cv2.imwrite(str(tmp_path / f"{i:04d}.jpg"), bgr)
    if case == "unreadable image":
        (tmp_path / "0002.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    every_nth = 2 if case == "full frame skipped by the decode" else 1   # decodes 0, 2, 4: never the full frame
    hold = 1 if case in ("held bytes run out", "full frame after the held bytes") else decode.HOLD_BYTES
    listed = decode.list_frame_images(tmp_path)
    expected = decode.folder_is_square(tmp_path)
    opened, header_size = [], decode.image_size
    monkeypatch.setattr(decode, "image_size", lambda path: opened.append(path.name) or header_size(path))
    answer, frames = decode.square_frames(iter_folder_frames(tmp_path, every_nth=every_nth), listed, hold)
    assert answer == expected == (case in ("square", "unreadable image", "held bytes run out"))
    again = list(iter_folder_frames(tmp_path, every_nth=every_nth))
    frames = list(frames)
    assert [f.index for f in frames] == [f.index for f in again]   # every frame handed on, in order, once
    assert all(np.array_equal(a.rgb, b.rgb) for a, b in zip(frames, again))
    headers = {"square": [], "one full frame": [], "full frame skipped by the decode": ["0001.jpg", "0003.jpg",
               "0005.jpg"], "unreadable image": ["0002.jpg"], "held bytes run out": [f"{i:04d}.jpg" for i in range(1, 6)],
               "full frame after the held bytes": [f"{i:04d}.jpg" for i in range(1, 6)]}[case]
    assert opened == headers   # headers are read only for the images the decode did not give


# -- the faces side records the damage (pipeline/preprocess.py, pipeline/faces.py) ---------------------
def test_truncated_video_is_recorded_not_stored_as_complete(truncated_video, tmp_path):
    from emotion_attention.pipeline.configs import PreprocessConfig
    from emotion_attention.pipeline.stages.faces import damage_note, preprocess_dataset, process_clip

    full, cut = truncated_video
    arrays, attrs = process_clip(Clip("Train/Happy/cut.avi", cut, "Happy", "Train", "video"), PreprocessConfig())
    decoded = count_video_frames(cut)[0]
    assert len(arrays["present"]) == decoded
    assert attrs["decoded_frames"] == decoded and attrs["total_frames"] == 30 and attrs["truncated"] is True
    assert damage_note(attrs).startswith(f"only {decoded} of 30 frames decode")
    _, whole = process_clip(Clip("Train/Happy/full.avi", full, "Happy", "Train", "video"),
                            PreprocessConfig(decode=DecodeConfig(max_frames=5)))
    assert whole["truncated"] is False and damage_note(whole) == ""
    summary = preprocess_dataset(cut.parents[2], tmp_path / "faces.h5", PreprocessConfig(), workers=1,
                                 progress=False)
    line = next(row for row in summary.format().splitlines() if row.startswith("Train/Happy/cut.avi"))
    assert f"WARNING only {decoded} of 30 frames decode" in line


def test_corrupt_image_is_a_faceless_frame_not_a_dropped_clip(tmp_path):
    from emotion_attention.pipeline.configs import PreprocessConfig
    from emotion_attention.pipeline.stages.faces import process_clip

    folder = tmp_path / "clip"
    folder.mkdir()
    for i, bgr in enumerate(real_frames(4, size=None)):
        cv2.imwrite(str(folder / f"{i:03d}.jpg"), bgr)
    (folder / "002.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    arrays, attrs = process_clip(Clip("Test/Happy/clip", folder, "Happy", "Test", "frames"), PreprocessConfig())
    assert arrays["present"].tolist() == [True, True, False, True]
    assert arrays["how"][2] == 0 and not arrays["faces"][2].any()
    assert attrs["unreadable_frames"] == 1 and attrs["decoded_frames"] == 4


def test_size_change_restarts_tracking(tmp_path):
    from emotion_attention.pipeline.faces.align import HOW_TRACKED
    from emotion_attention.pipeline.configs import PreprocessConfig
    from emotion_attention.pipeline.stages.faces import is_prealigned, process_clip

    folder = tmp_path / "mixed"
    folder.mkdir()
    frames = real_frames(8, size=None)
    for i, bgr in enumerate(frames):   # frames 4..7 at half size: the face moves to half the coordinates
        cv2.imwrite(str(folder / f"{i:03d}.png"), bgr if i < 4 else cv2.resize(bgr, (320, 180)))
    clip = Clip("Test/Happy/mixed", folder, "Happy", "Test", "frames")
    assert not is_prealigned(clip, PreprocessConfig().face)
    arrays, _ = process_clip(clip, PreprocessConfig())
    assert arrays["present"].all()                      # no face lost after the change
    assert arrays["how"][1] == HOW_TRACKED              # tracked within a size...
    assert arrays["how"][4] != HOW_TRACKED              # ...but detected afresh at the change
    assert np.nanmax(arrays["box"][4:, 2]) <= 320 + 1   # boxes in the new frame's coordinates


def test_check_with_workers_finds_the_same(truncated_video, samples_dir):
    full, cut = truncated_video
    for name in ("single_face.mp4", "carphone_pristine.mp4", "no_face.mp4"):
        (cut.parent / name).write_bytes((samples_dir / name).read_bytes())
    one = check_dataset(cut.parents[2], progress=False)
    two = check_dataset(cut.parents[2], progress=False, workers=2)
    assert [str(p) for p in two.problems] == [str(p) for p in one.problems]
    assert [p.path for p in one.problems if p.severity == "error"] == [str(cut)]
    for name in ("single_face.mp4", "carphone_pristine.mp4", "no_face.mp4"):
        (cut.parent / name).unlink()
