"""Dataset scanning and `emo-cache check` on generated trees with planted problems."""
import csv

import cv2
import numpy as np
import pytest
from click.testing import CliRunner

from emotion_attention.cli.emo_cache import check
from emotion_attention.pipeline.configs import AFEW_CLASSES
from emotion_attention.pipeline.data.clips import DatasetError
from emotion_attention.pipeline.stages.check import check_dataset
from emotion_attention.pipeline.data.layouts import scan_dataset
from fixtures_preprocess import write_bad_media, write_mjpg_video, write_zero_frame_video


def tiny_video(path):
    return write_mjpg_video(path, [np.full((48, 64, 3), 40 * i, np.uint8) for i in range(3)])


@pytest.fixture()
def afew_tree(tmp_path):
    """AFEW layout in mixed case, with one of each planted problem."""
    root = tmp_path / "afew"
    for rel in ("Train/Happy/001.avi", "Train/Happy/002.avi", "train/ANGRY/003.avi", "Val/sad/004.avi",
                "VAL/Surprise/005.avi", "Train/happy/001.avi"):   # the last duplicates Train/Happy/001.avi
        tiny_video(root / rel)
    tiny_video(root / "Train" / "Bored" / "006.avi")                 # unknown label folder
    bad = write_bad_media(root / "Val" / "Fear")                    # corrupt, empty, text-as-avi
    write_zero_frame_video(root / "Val" / "Fear" / "zero.avi")
    (root / "Train" / "Happy" / "readme.txt").write_text("stray")   # stray file among clips
    (root / "notes.md").write_text("stray at the root")
    return root, bad


def problems_by_file(report):
    return {p.path: p for p in report.problems}


def test_scan_afew_case_insensitive(afew_tree):
    root, _ = afew_tree
    scan = scan_dataset(root)
    assert scan.class_names == AFEW_CLASSES
    ids = [c.clip_id for c in scan.clips]
    assert "Train/Angry/003.avi" in ids and "Val/Sad/004.avi" in ids and "Val/Surprise/005.avi" in ids
    assert ids.count("Train/Happy/001.avi") == 1
    assert scan.counts()["Train"] == {"Happy": 2, "Angry": 1}
    assert scan.counts()["Val"] == {"Sad": 1, "Surprise": 1, "Fear": 4}


def test_check_reports_every_planted_problem(afew_tree):
    root, bad = afew_tree
    report = check_dataset(root, progress=False)
    found = problems_by_file(report)
    expected = {
        str(bad["corrupt"]): ("error", "cannot be opened"),
        str(bad["empty"]): ("error", "empty file"),
        str(bad["text"]): ("error", "cannot be opened"),
        str(root / "Val" / "Fear" / "zero.avi"): ("error", "no decodable frame"),
        str(root / "Train" / "Bored"): ("error", "unknown label folder"),
        str(root / "Train" / "Happy" / "readme.txt"): ("warning", "stray file"),
        str(root / "notes.md"): ("warning", "stray file"),
    }
    for path, (severity, words) in expected.items():
        assert path in found, f"no problem reported for {path}"
        assert found[path].severity == severity and words in found[path].message
    duplicates = [p for p in report.problems if "duplicate clip id" in p.message]
    assert len(duplicates) == 1 and "Train/Happy/001.avi" in duplicates[0].message
    assert len(report.problems) == len(expected) + 1
    assert not report.ok


def test_check_cli_exit_status_and_table(afew_tree, tmp_path):
    root, bad = afew_tree
    result = CliRunner().invoke(check, [str(root)])
    assert result.exit_code == 1
    assert str(bad["empty"]) in result.output and "unknown label folder" in result.output
    train_row = next(line for line in result.output.splitlines() if line.startswith("Train "))
    assert train_row.split()[1:] == ["1", "0", "0", "2", "0", "0", "0", "3"]  # AFEW order, then total
    clean = tmp_path / "clean"
    tiny_video(clean / "Train" / "Happy" / "a.avi")
    ok = CliRunner().invoke(check, [str(clean)])
    assert ok.exit_code == 0, ok.output
    assert "0 problem(s)" in ok.output


def test_generic_layout_with_frame_folders_and_classes_file(tmp_path):
    root = tmp_path / "generic"
    root.mkdir()
    (root / "classes.txt").write_text("calm\nexcited\n")
    folder = root / "test" / "Excited" / "clip_a"
    folder.mkdir(parents=True)
    cv2.imwrite(str(folder / "0001.png"), np.zeros((8, 8, 3), np.uint8))
    (root / "test" / "calm" / "empty_clip").mkdir(parents=True)
    tiny_video(root / "test" / "calm" / "b.mp4")
    scan = scan_dataset(root)
    assert scan.class_names == ("calm", "excited")
    assert [(c.clip_id, c.kind) for c in scan.clips] == [("Test/calm/b.mp4", "video"),
                                                          ("Test/excited/clip_a", "frames")]
    assert [(p.severity, p.path) for p in scan.problems] == [("error", str(root / "test" / "calm" / "empty_clip"))]
    assert scan_dataset(root, class_names=["excited", "calm"]).class_names == ("excited", "calm")


def test_csv_layout(tmp_path):
    videos = tmp_path / "videos"
    tiny_video(videos / "x" / "a.avi")
    tiny_video(videos / "y" / "a.avi")
    tiny_video(videos / "b.avi")
    table = tmp_path / "list.csv"
    with open(table, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["path", "label", "split"])
        writer.writerows([["videos/x/a.avi", "happy", "train"], ["videos/y/a.avi", "Happy", "Train"],
                          ["videos/b.avi", "Sad", "val"], ["videos/missing.avi", "Sad", "val"],
                          ["videos/b.avi", "Bored", "val"]])
    scan = scan_dataset(table)
    assert scan.layout == "csv"
    assert [c.clip_id for c in scan.clips] == ["Train/Happy/a.avi", "Val/Sad/b.avi"]
    messages = [p.message for p in scan.problems]
    assert any("duplicate clip id 'Train/Happy/a.avi'" in m for m in messages)
    assert any("missing.avi does not exist" in m for m in messages)
    assert any("unknown label 'Bored'" in m for m in messages)
    assert all(p.severity == "error" for p in scan.problems) and len(scan.problems) == 3


def test_not_a_dataset(tmp_path):
    with pytest.raises(DatasetError, match="no such dataset folder"):
        scan_dataset(tmp_path / "nowhere")
