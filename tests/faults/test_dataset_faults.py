"""Issue 19, cases 7 and 8: what `emo-cache check` must say about a dataset's files before `faces` stores them.

7. One file listed in two splits or under two labels: each row was stored as a clip of its own, without a word
   (a clip in both train and test leaks; under two labels one of them is wrong). `check` now flags every entry
   and leaves them all out; `faces` logs them as failures and stores none of them.
8. A dangling symlink among the clips was reported as "stray file: not a video"; it is a broken link, and an
   error (the clip the user meant is missing).
"""
from __future__ import annotations

import os
import shutil

from faultkit import REPO, faces_cmd, run
from test_input_faults import clip_attrs, failures

SAMPLES = REPO / "data" / "samples"


def csv_dataset(root, rows):
    (root / "videos").mkdir(parents=True)
    for name in ("a.mp4", "b.mp4", "c.mp4"):
        shutil.copyfile(SAMPLES / "single_face.mp4", root / "videos" / name)
    (root / "list.csv").write_text("path,label,split\n" + "".join(f"{r}\n" for r in rows))
    return root / "list.csv"


def test_one_file_in_two_splits_is_flagged_and_stored_for_neither(tmp_path):
    table = csv_dataset(tmp_path, ["videos/a.mp4,Happy,Train", "videos/a.mp4,Happy,Val", "videos/b.mp4,Sad,Train"])
    res = run(["emo-cache", "check", str(table), "--workers", "1"])
    text = res.stdout + res.stderr
    assert res.returncode == 1 and "Traceback" not in text, text
    flagged = [line for line in text.splitlines() if "one file listed in two splits" in line]
    assert len(flagged) == 2 and str(tmp_path / "videos" / "a.mp4") in flagged[0]
    assert "'Train/Happy/a.mp4', 'Val/Happy/a.mp4'" in flagged[0]
    assert flagged[1].strip() == f"error: {table}: split Val yields no clip (csv layout): 1 ignored: one file listed" \
                                 " in two splits"
    table.write_text(table.read_text() + "videos/c.mp4,Happy,Val\n")     # Val is no longer empty
    out = tmp_path / "faces.h5"
    res = run(faces_cmd(table, out, "--max-frames", "2", "--max-fail-fraction", "1"))
    assert res.returncode == 0, res.stdout + res.stderr
    assert sorted(clip_attrs(out)) == ["Train/Sad/b.mp4", "Val/Happy/c.mp4"]
    assert sum("one file listed in two splits: 'Train/Happy/a.mp4'" in f["reason"] for f in failures(out)) == 1


def test_one_file_under_two_labels_is_flagged(tmp_path):
    table = csv_dataset(tmp_path, ["videos/a.mp4,Happy,Train", "videos/a.mp4,Sad,Train", "videos/b.mp4,Sad,Train"])
    res = run(["emo-cache", "check", str(table), "--workers", "1"])
    text = res.stdout + res.stderr
    assert res.returncode == 1 and text.count("one file listed under two labels") == 1, text
    train_row = next(line for line in res.stdout.splitlines() if line.startswith("Train "))
    assert train_row.split()[1:] == ["0", "0", "0", "0", "0", "1", "0", "1"]   # only b.mp4 (Sad) is counted


def test_a_symlink_to_the_same_video_in_another_split_is_flagged(tmp_path):
    root = tmp_path / "ds"
    (root / "Train" / "Happy").mkdir(parents=True)
    (root / "Val" / "Happy").mkdir(parents=True)
    shutil.copyfile(SAMPLES / "single_face.mp4", root / "Train" / "Happy" / "a.mp4")
    shutil.copyfile(SAMPLES / "single_face.mp4", root / "Train" / "Happy" / "b.mp4")
    os.symlink(root / "Train" / "Happy" / "a.mp4", root / "Val" / "Happy" / "a_again.mp4")
    res = run(["emo-cache", "check", str(root), "--workers", "1"])
    text = res.stdout + res.stderr
    assert res.returncode == 1 and "one file listed in two splits: 'Train/Happy/a.mp4', 'Val/Happy/a_again.mp4'" \
        in text and "split Val yields no clip (afew layout): 1 ignored: one file listed in two splits" in text, text


def test_a_dangling_symlink_is_a_broken_link(tmp_path):
    root = tmp_path / "ds"
    (root / "Train" / "Happy").mkdir(parents=True)
    shutil.copyfile(SAMPLES / "single_face.mp4", root / "Train" / "Happy" / "good.mp4")
    gone = tmp_path / "moved_away" / "clip.mp4"
    os.symlink(gone, root / "Train" / "Happy" / "clip.mp4")
    res = run(["emo-cache", "check", str(root), "--workers", "1"])
    text = res.stdout + res.stderr
    assert res.returncode == 1 and "stray file" not in text, text
    line = next(line for line in text.splitlines() if "broken link" in line)
    assert line.strip() == (f"error: {root / 'Train' / 'Happy' / 'clip.mp4'}: broken link: it points to {gone},"
                            " which does not exist; fix the link or remove it")
