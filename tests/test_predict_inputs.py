"""emo-predict's inputs: videos, frame folders (aligned or not), single images, and .txt lists of those."""
import csv
import re

import cv2
import pytest
from click.testing import CliRunner

from emotion_attention.cli.emo_predict import main as emo_predict
from dataset_trees import real_frames, write_frames
from emotion_attention.pipeline.stages.predict import InputError, resolve_inputs


@pytest.fixture()
def inputs(tmp_path, samples_dir):
    """A frame folder of real frames, a single image, a folder of square face crops, an empty folder, a list."""
    frames = write_frames(tmp_path / "clip_frames", real_frames(6, size=None))
    aligned = write_frames(tmp_path / "aligned", [f[:, 140:500] for f in real_frames(4, size=None)])
    image = samples_dir / "single_face.jpg"
    (tmp_path / "not_frames" / "sub").mkdir(parents=True)
    (tmp_path / "not_frames" / "notes.txt").write_text("# nothing listed yet\n")
    listing = tmp_path / "inputs.txt"
    listing.write_text(f"# my clips\nclip_frames\n{image}\n\naligned  # faces\n")
    return tmp_path, frames, aligned, image, listing


def test_resolve_inputs(inputs, samples_dir):
    tmp, frames, aligned, image, listing = inputs
    video = samples_dir / "single_face.mp4"
    assert resolve_inputs([video, frames, image]) == [(video, "video"), (frames, "frames"), (image, "frames")]
    assert resolve_inputs([listing]) == [(tmp / "clip_frames", "frames"), (image, "frames"), (tmp / "aligned", "frames")]


@pytest.mark.parametrize("make, words", [
    (lambda t: t / "not_frames", "is a folder but not a frame folder (it holds no jpg/jpeg/png"),
    (lambda t: t / "missing.mp4", "no such file or folder"),
    (lambda t: t / "not_frames" / "notes.txt", "the list holds no input"),
])
def test_bad_inputs_say_what_they_are(inputs, make, words):
    tmp = inputs[0]
    path = make(tmp)
    with pytest.raises(InputError, match=re.escape(words)):
        resolve_inputs([path])
    result = CliRunner().invoke(emo_predict, [str(path), "--out", str(tmp / "out")])
    assert result.exit_code == 1 and result.output.startswith(f"Error: {path}") and "Traceback" not in result.output


def test_listed_bad_entry_names_the_list(inputs):
    tmp, *_ , listing = inputs
    listing.write_text("clip_frames\nnowhere/\n")
    with pytest.raises(InputError, match=f"nowhere \\(listed in {listing}\\): no such file"):
        resolve_inputs([listing])


def test_predict_folder_image_and_aligned_folder(inputs):
    tmp, frames, aligned, image, listing = inputs
    out = tmp / "out"
    result = CliRunner().invoke(emo_predict, [str(listing), "--out", str(out), "--device", "cpu"])
    assert result.exit_code == 0, result.output
    rows = {r["video"]: r for r in csv.DictReader(open(out / "predictions.csv"))}
    assert set(rows) == {str(tmp / "clip_frames"), str(image), str(tmp / "aligned")}
    assert rows[str(tmp / "clip_frames")]["frames"] == "6" and rows[str(tmp / "clip_frames")]["frames_with_face"] == "6"
    assert rows[str(image)]["frames"] == "1" and rows[str(image)]["frames_with_face"] == "1"
    assert rows[str(tmp / "aligned")]["frames"] == "4"
    h, w = cv2.imread(str(image)).shape[:2]
    assert h != w   # the still is a full photo: detected, not taken as an aligned face


def test_output_names_do_not_depend_on_which_inputs_fail(tmp_path, samples_dir):
    from emotion_attention.pipeline.stages.predict import video_keys

    good, bad = tmp_path / "x" / "face.jpg", tmp_path / "y" / "broken.jpg"
    good.parent.mkdir()
    bad.parent.mkdir()
    good.write_bytes((samples_dir / "single_face.jpg").read_bytes())
    bad.write_bytes(b"not an image")
    out = tmp_path / "out"
    result = CliRunner().invoke(emo_predict, [str(good), str(bad), "--out", str(out), "--device", "cpu"])
    assert result.exit_code == 0, result.output
    key = video_keys([good, bad])[str(good)]
    assert key == "x%2Fface.jpg"                 # named over all inputs, not only those that succeeded
    assert sorted(p.name for p in (out / "frames").iterdir()) == [key + ".csv"]
    assert str(bad) in (out / "failures.jsonl").read_text()
