"""Every registered dataset layout on a small generated tree of real frames, with planted problems."""
import json
from collections import Counter

import pytest
from click.testing import CliRunner

from emotion_attention.cli.emo_cache import main as emo_cache
from dataset_trees import BUILDERS, annotation_list_tree, ckplus_tree, dfew_tree, ferv39k_tree, mafw_tree
from emotion_attention.pipeline.data.clips import DatasetError
from emotion_attention.pipeline.stages.check import check_dataset
from emotion_attention.pipeline.data.layouts import scan_dataset
from emotion_attention.pipeline.data.folds import subject_folds
from emotion_attention.pipeline.data.layouts import (CKPLUS_CLASSES, DFEW_CLASSES, LAYOUTS, MAFW_CLASSES, detect_layout, fold_part, get_layout, register_layout)
from emotion_attention.cache.errors import ConfigError


def test_every_layout_has_a_generated_tree():
    assert set(BUILDERS) == set(LAYOUTS)


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_each_layout_is_detected_and_scans(name, tmp_path):
    source, _ = BUILDERS[name](tmp_path / name)
    assert detect_layout(source).name == name
    scan = scan_dataset(source)
    assert scan.layout == name and scan.clips
    assert len({c.clip_id for c in scan.clips}) == len(scan.clips)            # ids unique
    assert all(c.path.exists() and c.kind == ("image" if name.startswith("rafdb") else "frames") for c in scan.clips)
    assert scan_dataset(source, layout=name).clips == scan.clips             # --layout gives the same


def test_dfew_folds_labels_and_planted_problems(tmp_path):
    root, facts = dfew_tree(tmp_path / "dfew")
    scan = scan_dataset(root)
    assert scan.class_names == DFEW_CLASSES
    assert scan.folds == [1, 2, 3, 4, 5]
    by_id = {c.clip_id: c for c in scan.clips}
    assert sorted(by_id) == sorted(f"All/{DFEW_CLASSES[(i - 1) % 7]}/{i:05d}" for i in range(1, 11))
    clip7 = by_id["All/Fear/00007"]                      # code 7 = Fear; clip 7 tests in fold 2
    assert dict(clip7.folds) == {1: "train", 2: "test", 3: "train", 4: "train", 5: "train"}
    assert json.loads(clip7.folds_attr()) == {"1": "train", "2": "test", "3": "train", "4": "train", "5": "train"}
    assert all(Counter(p for _, p in c.folds) == {"train": 4, "test": 1} for c in scan.clips)
    assert scan.fold_counts()[1] == {"train": 8, "test": 2}
    messages = {p.path.rsplit(":", 1)[1]: p.message for p in scan.problems}
    assert set(messages) == {"10", "11"} and all(p.severity == "error" for p in scan.problems)
    assert "no frame folder for video '99999'" in messages["10"]
    assert "label code '9' is not one of DFEW's 1..7" in messages["11"]
    assert all("single_trainset_1.csv" in p.path for p in scan.problems)


def test_ferv39k_train_test_keeps_scene_in_ids(tmp_path):
    root, facts = ferv39k_tree(tmp_path)
    scan = scan_dataset(root)
    assert {c.clip_id: c.split for c in scan.clips} == {
        "Train/Happy/Action/Happy/0001": "Train", "Train/Happy/Argue/Happy/0001": "Train",
        "Test/Sad/Action/Sad/0002": "Test", "Test/Fear/Argue/Fear/0003": "Test"}
    assert scan.folds == []
    assert [p.message.split(";")[0] for p in scan.problems][0] == "unknown label in 'Action/Bored/0009 Bored'"
    assert "0404 does not exist" in scan.problems[1].message


def test_mafw_eleven_classes_and_lists_from_another_machine(tmp_path):
    root, facts = mafw_tree(tmp_path / "MAFW")
    scan = scan_dataset(root)
    assert scan.class_names == MAFW_CLASSES and len(scan.class_names) == 11
    assert len(scan.clips) == 10 and scan.folds == [1, 2, 3, 4, 5]
    by_id = {c.clip_id: c for c in scan.clips}
    assert by_id["All/Contempt/00008"].path == root / "data" / "faces" / "00008"   # /data/EECS-... re-rooted
    assert dict(by_id["All/Contempt/00008"].folds)[3] == "test"
    assert len(scan.problems) == 1 and "label 11 is not a class" in scan.problems[0].message
    assert "MAFW_set_3_test.txt:3" in scan.problems[0].path


def test_ckplus_subject_independent_deterministic_folds(tmp_path):
    root, facts = ckplus_tree(tmp_path / "CK+")
    scan = scan_dataset(root)
    assert scan.class_names == CKPLUS_CLASSES and scan.class_names[2] == "Contempt"
    assert len(scan.clips) == facts["labelled"] and scan.folds == list(range(1, 11))
    subject_of = {c.clip_id: c.clip_id.split("/")[2] for c in scan.clips}
    for k in scan.folds:
        test = {subject_of[c.clip_id] for c in scan.clips if dict(c.folds)[k] == "test"}
        train = {subject_of[c.clip_id] for c in scan.clips if dict(c.folds)[k] == "train"}
        assert not test & train                                           # subjects never cross the split
        assert bool(test) == (k != 4)    # fold 4's only subject (S020) carries the planted bad code
    tests = Counter(k for c in scan.clips for k, p in c.folds if p == "test")
    assert sum(tests.values()) == len(scan.clips)                          # each clip tests exactly once
    expected = subject_folds({subject_of[c.clip_id] for c in scan.clips} | {"S020"}, 10)
    assert all(dict(c.folds)[expected[subject_of[c.clip_id]]] == "test" for c in scan.clips)
    assert [c.clip_id for c in scan_dataset(root).clips] == [c.clip_id for c in scan.clips]  # deterministic
    assert "All/Sadness/S030/001" in subject_of                            # S030 is subject 5: code 6 = sadness
    info = [p for p in scan.problems if p.severity == "info"]
    assert len(info) == 1 and info[0].message.startswith(f"{facts['unlabelled']} sequence(s) have no")
    errors = [p for p in scan.problems if p.severity == "error"]
    assert len(errors) == 1 and "S020_001_00000003_emotion.txt" in errors[0].path
    report = check_dataset(root, progress=False)
    text = report.format()
    assert "note:" in text and "12 sequence(s) have no *_emotion.txt" in text and "fold 10: train" in text


def test_ckplus_fold_count_option(tmp_path):
    root, _ = ckplus_tree(tmp_path / "CK+")
    assert scan_dataset(root, fold_count=5).folds == [1, 2, 3, 4, 5]


def test_annotation_list_needs_a_class_order_for_numeric_labels(tmp_path):
    source, _ = annotation_list_tree(tmp_path)
    scan = scan_dataset(source)                                           # classes.txt beside the list
    assert [(c.clip_id, c.label) for c in scan.clips] == [("Train/calm/frames/a", "calm"),
                                                           ("Train/excited/frames/b", "excited"),
                                                           ("Train/excited/frames/c", "excited")]
    assert "frames/zzz not found" in scan.problems[0].message
    (source.parent / "classes.txt").unlink()
    with pytest.raises(DatasetError, match="labels are numbers, so the class order must be named"):
        scan_dataset(source)
    named = scan_dataset(source, ["excited", "calm"])
    assert {c.path.name: c.label for c in named.clips} == {"a": "excited", "b": "calm", "c": "calm"}


def test_annotation_lists_with_folds(tmp_path):
    root, _ = mafw_tree(tmp_path / "m")
    scan = scan_dataset(root / "annotation", layout="annotation-list")   # the same lists, read generically
    assert scan.class_names == MAFW_CLASSES and scan.folds == [1, 2, 3, 4, 5] and len(scan.clips) == 10


def test_fold_part_from_names():
    assert fold_part("DFEW_set_5_test.txt") == (5, "test")
    assert fold_part("fold-2_train.txt") == (2, "train")
    assert fold_part("val_list.txt") == (None, "val")


@pytest.mark.parametrize("content, words", [
    ("path,label\nx.avi,Happy\n", "lacks split"),
    ("", "empty"),
    ("\n\n", "empty"),
    ("file,emotion,set\nx.avi,Happy,Train\n", "lacks path, label, split"),
])
def test_bad_csv_is_one_line_error_naming_the_file(tmp_path, content, words):
    table = tmp_path / "list.csv"
    table.write_text(content)
    with pytest.raises(DatasetError, match=words):
        scan_dataset(table)
    result = CliRunner().invoke(emo_cache, ["check", str(table)])
    assert result.exit_code == 1 and result.output.startswith(f"Error: {table}") and "Traceback" not in result.output
    assert len(result.output.strip().splitlines()) == 1


def test_video_given_as_a_dataset(tmp_path, samples_dir):
    video = samples_dir / "single_face.mp4"
    for args in (["check", str(video)], ["faces", str(video), "--out", str(tmp_path / "f.h5")]):
        result = CliRunner().invoke(emo_cache, args)
        assert result.exit_code == 1 and "Traceback" not in result.output, result.output
        assert f"Error: {video}: is a single video or image, not a dataset" in result.output
    assert not (tmp_path / "f.h5").exists()


def test_unknown_layout_name():
    with pytest.raises(ConfigError, match="unknown; use one of dfew, ferv39k"):
        get_layout("kinetics")


def test_check_cli_with_layout_option(tmp_path):
    root, _ = dfew_tree(tmp_path / "dfew")
    result = CliRunner().invoke(emo_cache, ["check", str(root), "--layout", "dfew"])
    assert result.exit_code == 1  # the two planted rows are errors
    assert "(dfew layout)" in result.output and "fold  1: train      8  test      2" in result.output
    wrong = CliRunner().invoke(emo_cache, ["check", str(root), "--layout", "ckplus"])
    assert wrong.exit_code == 1 and "Traceback" not in wrong.output
    assert f"Error: {root}: does not have the ckplus layout (cohn-kanade-images/" in wrong.output


def test_a_new_layout_is_one_function_and_one_entry(tmp_path):
    (tmp_path / "one").mkdir()
    (tmp_path / "one" / "clip.mp4").write_bytes(b"x")

    @register_layout("one-video", lambda s: (s / "clip.mp4").exists())
    def scan_one(root, scan):
        from emotion_attention.pipeline.data.clips import add_clip
        add_clip(scan, root / "clip.mp4", scan.class_names[0], "Test")

    try:
        assert [c.clip_id for c in scan_dataset(tmp_path / "one", layout="one-video").clips] == ["Test/Angry/clip.mp4"]
    finally:
        del LAYOUTS["one-video"]


def test_mafw_release_layout(tmp_path):
    from dataset_trees import mafw_release_tree

    root, facts = mafw_release_tree(tmp_path / "MAFW")
    assert detect_layout(root).name == "mafw"
    scan = scan_dataset(root)
    assert {c.clip_id: c.kind for c in scan.clips} == {
        "All/Anger/00001": "video", "All/Happiness/00002": "video", "All/Contempt/00003": "video",
        "All/Disappointment/00004": "video", "All/Neutral/00005": "video"}
    assert all(dict(c.folds)[int(c.clip_id[-1])] == "test" for c in scan.clips)
    problems = sorted(p.message for p in scan.problems)
    assert problems[0].startswith("cannot use '00077.mp4': no label for clip 00077")
    assert problems[1].startswith("unknown label 'bored'")


def test_faces_store_records_folds_once_and_extract_keeps_them(tmp_path):
    from emotion_attention.cache import FacesStore
    from emotion_attention.pipeline.stages.extract import clip_attrs
    from emotion_attention.pipeline.configs import PreprocessConfig
    from emotion_attention.pipeline.stages.faces import preprocess_dataset

    root, _ = dfew_tree(tmp_path / "dfew", clips=5)
    summary = preprocess_dataset(root, tmp_path / "faces.h5", PreprocessConfig(), workers=1, progress=False,
                                 layout="dfew")
    assert summary.written == 5
    scan = scan_dataset(root)
    with FacesStore(tmp_path / "faces.h5") as store:
        for clip in scan.clips:
            attrs = store.attrs(clip.clip_id)
            assert attrs["split"] == "All" and json.loads(attrs["folds"]) == json.loads(clip.folds_attr())
            assert attrs["decoded_frames"] == 3 and attrs["truncated"] is False
            assert clip_attrs(attrs)["folds"] == attrs["folds"]
