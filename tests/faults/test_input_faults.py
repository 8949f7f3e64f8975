"""Bad inputs, bad settings and bad checkpoints: each gives one line naming the file, or is recorded on purpose.

Real sample media (data/samples) mutated into small datasets; the commands run as a user runs them.
"""
from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from urllib.parse import unquote

import cv2
import numpy as np
import pytest

from emotion_attention.cache import FacesStore
from faultkit import REPO, extract_cmd, faces_cmd, one_line_error, run

SAMPLES = REPO / "data" / "samples"


def dataset(root: Path, extra: dict) -> Path:
    """``root/ds``: one good clip (Train/Happy/good.mp4) plus ``extra`` {relative path: bytes or callable}."""
    ds = root / "ds"
    (ds / "Train" / "Happy").mkdir(parents=True, exist_ok=True)
    shutil.copyfile(SAMPLES / "single_face.mp4", ds / "Train" / "Happy" / "good.mp4")
    for rel, content in extra.items():
        path = ds / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        content(path) if callable(content) else path.write_bytes(content)
    return ds


def clip_attrs(store: Path) -> dict:
    with FacesStore(store) as s:
        return {cid: {**s.attrs(cid), "present": s.read_present(cid)} for cid in s.complete_ids()}


def failures(store: Path) -> list[dict]:
    log = store.with_name(store.name + ".failures.jsonl")
    return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []


def assert_good_clip_kept_and_rerun_completes(ds: Path, out: Path, *extra) -> None:
    assert "Train/Happy/good.mp4" in clip_attrs(out)
    again = run(faces_cmd(ds, out, *extra))
    assert "Traceback" not in again.stderr and "0 clip(s) written" in again.stdout, again.stdout[-1500:]


# -- damaged media: recorded on purpose, never stored as whole -----------------------------------------

def cut(fraction):
    return lambda path: path.write_bytes((SAMPLES / "carphone_pristine.mp4").read_bytes()[:int(
        (SAMPLES / "carphone_pristine.mp4").stat().st_size * fraction)])


def corrupt_middle(path):
    data = bytearray((SAMPLES / "carphone_pristine.mp4").read_bytes())
    mid = len(data) // 2
    data[mid:mid + 4096] = np.random.default_rng(0).bytes(4096)
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("name,make", [
    ("truncated", cut(0.6)),
    pytest.param("corrupt-middle", corrupt_middle, marks=pytest.mark.xfail(
        strict=True, reason="FFmpeg conceals the damaged macroblocks and OpenCV reports no decode error: all 120"
                            " frames decode (61 of them wrong) and nothing records it; see the fault table")),
])
def test_damaged_video_is_recorded_not_stored_as_whole(tmp_path, name, make):
    ds = dataset(tmp_path, {f"Train/Sad/{name}.mp4": make})
    out = tmp_path / "faces.h5"
    res = run(faces_cmd(ds, out, "--max-frames", "400"), timeout=300)
    text = res.stdout + res.stderr
    assert "Traceback" not in text, text[-2000:]
    cid = f"Train/Sad/{name}.mp4"
    attrs = clip_attrs(out).get(cid)
    logged = [f for f in failures(out) if f["clip_id"] == cid]
    if attrs is not None:   # stored: then it must say how much is missing, and the run must warn
        assert attrs.get("truncated") or attrs.get("decoded_frames", 0) < attrs.get("total_frames", 0), attrs
        assert cid in text and ("truncated" in text or "damaged" in text), text[-2000:]
    else:                   # or failed, named, in the failure log
        assert logged and logged[0]["file"].endswith(f"{name}.mp4")
    assert_good_clip_kept_and_rerun_completes(ds, out, "--max-frames", "400")


@pytest.mark.parametrize("name,content", [("notes.avi", b"this is not a video\n"), ("empty.avi", b"")])
def test_unreadable_file_fails_its_clip_only(tmp_path, name, content):
    ds = dataset(tmp_path, {f"Train/Sad/{name}": content})
    out = tmp_path / "faces.h5"
    res = run(faces_cmd(ds, out))
    text = res.stdout + res.stderr
    assert res.returncode == 1 and "Traceback" not in text     # 1 of 2 clips failed: over --max-fail-fraction
    assert any(f["file"].endswith(name) for f in failures(out)), failures(out)
    assert all(set(f) == {"stage", "file", "clip_id", "reason"} for f in failures(out))
    assert name in text
    assert "Train/Happy/good.mp4" in clip_attrs(out)


def test_renamed_container_still_decodes(tmp_path):
    ds = dataset(tmp_path, {"Train/Sad/renamed.avi": (SAMPLES / "carphone_pristine.mp4").read_bytes()})
    out = tmp_path / "faces.h5"
    assert run(faces_cmd(ds, out)).returncode == 0
    assert clip_attrs(out)["Train/Sad/renamed.avi"]["present"].sum() >= 6


def video_frames(name: str, n: int) -> list[np.ndarray]:
    cap = cv2.VideoCapture(str(SAMPLES / name))
    frames = [cap.read()[1] for _ in range(n)]
    cap.release()
    return frames


def frame_folder(frames, sizes=None, corrupt=None, square_first=False):
    def make(path: Path):
        path.mkdir(parents=True)
        for i, bgr in enumerate(frames):
            if sizes:
                bgr = cv2.resize(bgr, sizes[i % len(sizes)])
            if square_first and i == 0:
                h = bgr.shape[0]
                bgr = bgr[:, (bgr.shape[1] - h) // 2:(bgr.shape[1] + h) // 2]
            cv2.imwrite(str(path / f"{i:04d}.jpg"), bgr)
        if corrupt is not None:
            (path / f"{corrupt:04d}.jpg").write_bytes(b"\xff\xd8 broken")
    return make


def test_mixed_image_sizes_keep_the_face_in_every_frame(tmp_path):
    ds = dataset(tmp_path, {"Train/Sad/mixed": frame_folder(video_frames("single_face.mp4", 8),
                                                            sizes=[(640, 360), (320, 180)])})
    out = tmp_path / "faces.h5"
    assert run(faces_cmd(ds, out)).returncode == 0
    present = clip_attrs(out)["Train/Sad/mixed"]["present"]
    assert present[0::2].all() and present[1::2].all(), present


def test_square_first_image_does_not_make_full_frames_prealigned(tmp_path):
    ds = dataset(tmp_path, {"Train/Sad/sq": frame_folder(video_frames("single_face.mp4", 8), square_first=True)})
    out = tmp_path / "faces.h5"
    assert run(faces_cmd(ds, out)).returncode == 0
    with FacesStore(out) as s:
        how = s.read_meta("Train/Sad/sq")["how"]
    assert (how[1:] != 6).all(), how          # 6 = prealigned: full 640x360 frames must be aligned, not squashed


def test_one_corrupt_image_is_a_frame_without_a_face(tmp_path):
    ds = dataset(tmp_path, {"Train/Sad/folder": frame_folder(video_frames("single_face.mp4", 8), corrupt=3)})
    out = tmp_path / "faces.h5"
    assert run(faces_cmd(ds, out)).returncode == 0
    present = clip_attrs(out)["Train/Sad/folder"]["present"]
    assert len(present) == 8 and not present[3] and present[[0, 1, 2, 4, 5, 6, 7]].all(), present


# -- datasets given wrong -------------------------------------------------------------------------------

@pytest.mark.parametrize("case", ["bom-capitalised", "empty", "missing-header", "video-as-dataset"])
def test_bad_dataset_argument_is_one_line(tmp_path, case):
    shutil.copyfile(SAMPLES / "single_face.mp4", tmp_path / "a.mp4")
    csv = tmp_path / "list.csv"
    data = {"bom-capitalised": "\ufeffPath,Label,Split\na.mp4,Happy,Train\n", "empty": "",
            "missing-header": "a.mp4,Happy,Train\n"}.get(case)
    if data is not None:
        csv.write_text(data, encoding="utf-8")
    target = tmp_path / "a.mp4" if case == "video-as-dataset" else csv
    res = run(faces_cmd(target, tmp_path / "faces.h5"))
    text = res.stdout + res.stderr
    assert "Traceback" not in text, text[-2000:]
    if case == "bom-capitalised":   # a header any spreadsheet writes: read, not refused
        assert res.returncode == 0 and "Train/Happy/a.mp4" in clip_attrs(tmp_path / "faces.h5"), text[-1500:]
    else:
        assert res.returncode in (1, 2) and str(target) in text, text[-1500:]


@pytest.mark.slow
def test_names_that_differ_only_in_punctuation_or_hold_dollars_stay_apart_to_the_figures(tmp_path):
    names = ["a b.mp4", "a_b.mp4", "$x$ $$.mp4"]
    ds = dataset(tmp_path, {f"Val/Happy/{n}": (SAMPLES / "single_face.mp4").read_bytes() for n in names})
    faces, feats = tmp_path / "faces.h5", tmp_path / "feats.h5"
    assert run(faces_cmd(ds, faces)).returncode == 0
    assert run(extract_cmd(faces, feats)).returncode == 0
    res = run(["emo-train", "heads", str(feats), "--out", str(tmp_path / "run"), "--epochs", "1", "--holdout", "0"])
    assert res.returncode == 0, res.stderr[-1500:]
    res = run(["emo-eval", str(feats), "--checkpoint", str(tmp_path / "run" / "best.pt"), "--split", "Val",
               "--out", str(tmp_path / "rep"), "--explain", "--faces", str(faces)])
    assert res.returncode == 0 and "Traceback" not in res.stderr, res.stderr[-2000:]
    figures = sorted(p.name for p in (tmp_path / "rep" / "explain" / "figures").iterdir())
    assert len(figures) == 3, figures
    page = (tmp_path / "rep" / "explain" / "index.html").read_text()
    for href in re.findall(r"href='([^']+)'", page):
        assert (tmp_path / "rep" / "explain" / unquote(href.replace("&amp;", "&"))).is_file(), href


# -- checkpoints and training (H4's items, tested here) --------------------------------------------------

@pytest.mark.parametrize("case", ["truncated", "text"])
def test_bad_checkpoint_is_one_line_without_torch_advice(work, case):
    bad = work / "bad.pt"
    good = (work / "run" / "best.pt").read_bytes()
    bad.write_bytes(good[:len(good) // 2] if case == "truncated" else b"not a checkpoint\n")
    text = one_line_error(run(["emo-eval", str(work / "feats.h5"), "--checkpoint", str(bad), "--split", "Val",
                               "--out", str(work / "rep")]), bad)
    assert "weights_only" not in text


@pytest.mark.slow
def test_diverging_learning_rate_stops_training_with_a_message(work):
    res = run(["emo-train", "heads", str(work / "feats.h5"), "--out", str(work / "div"), "--epochs", "3",
               "--holdout", "0", "--batch-size", "2", "--lr", "1e30"])
    text = res.stdout + res.stderr
    assert res.returncode != 0 and "Traceback" not in text, text[-2000:]
    assert "non-finite" in text or "nan" in text.lower()


@pytest.mark.slow
@pytest.mark.parametrize("args", [["--input-size", "7"], ["--crop", "300"]])
def test_bad_fer_input_settings_are_one_line(work, args):
    res = run(extract_cmd(work / "faces.h5", work / "x.h5", *args))
    text = res.stdout + res.stderr
    assert res.returncode in (1, 2) and "Traceback" not in text and args[0] in text, text[-2000:]
    assert not (work / "x.h5").exists()


def test_predict_output_names_never_collide(tmp_path):
    from emotion_attention.pipeline.stages.predict import video_keys

    paths = [tmp_path / "x" / "v.avi", tmp_path / "y" / "v.avi", tmp_path / "x" / "a b.avi", tmp_path / "x" / "a_b.avi"]
    keys = video_keys(paths)
    assert len(set(keys.values())) == 4 and all("/" not in k for k in keys.values())
    assert video_keys([tmp_path / "x" / "v.avi"]) == {str(tmp_path / "x" / "v.avi"): "v.avi"}
