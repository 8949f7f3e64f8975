"""The releases as the public loaders read them (docs/datasets.md cites each loader): DFEW, MAFW, FERV39k and
RAF-DB on trees generated here, pointed at from the dataset folder, from inside it and from above it; still
images as one-frame clips in every layout; and no dataset, split or fold that is silently empty."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from dataset_trees import (DFEW_NAMES, MAFW_MAE, RAF_NAMES, SAMPLES, ckplus_tree, dfew_code, dfew_release_tree, dfew_tree,
                           ferv39k_tree, image_folders_tree, mafw_mae_tree, mafw_tree, rafdb_code_folders_tree,
                           rafdb_tree, real_frames, write_frames)
from emotion_attention.cli.emo_cache import main as emo_cache
from emotion_attention.pipeline.data.clips import DatasetError
from emotion_attention.pipeline.data.layouts import CKPLUS_CLASSES, MAFW_CLASSES, RAFDB_CLASSES, scan_dataset
from emotion_attention.pipeline.stages.check import check_dataset

MAFW_ORDER = {name.lower(): name for name in MAFW_CLASSES}


def dfew_readme_tree(root: Path) -> tuple[Path, dict]:
    """DFEW as its README names it: ``EmoLabel_DataSplit/{train,test}(single_labeled)/set_K.csv`` (an underscore)
    and only the original videos ``Clip/original/<00001>.mp4``, for the faces stage to detect faces in."""
    root, facts = dfew_release_tree(root, "Clip/original")
    for i in range(1, facts["clips"] + 1):
        shutil.rmtree(root / "Clip" / "original" / f"{i:05d}")
        shutil.copyfile(SAMPLES / "single_face.mp4", root / "Clip" / "original" / f"{i:05d}.mp4")
    for part in ("train", "test"):
        split = root / "EmoLabel_DataSplit"
        (split / f"{part}(single-labeled)").rename(split / f"{part}(single_labeled)")
    return root, facts


def dfew_odd_lists_tree(root: Path) -> tuple[Path, dict]:
    """DFEW lists with no header line and video names with their extension (``00001.mp4,1``), beside frame
    folders named without it."""
    root, facts = dfew_release_tree(root, "Clip/clip_224x224")
    for table in (root / "EmoLabel_DataSplit").rglob("*.csv"):
        rows = table.read_text().splitlines()[1:]
        table.write_text("".join(row.replace(",", ".mp4,", 1) + "\n" for row in rows))
    return root, facts


def dfew_dfer_clip_tree(root: Path) -> tuple[Path, dict]:
    """DFEW with DFER-CLIP's lists only: ``annotation/DFEW_set_K_{train,test}.txt`` of lines
    ``/data/EECS-IoannisLab/datasets/DFEW/DFEW_Frame_Face/02522 66 5`` (another machine's paths, codes 0..6,
    zengqunzhao/DFER-CLIP:annotation/DFEW_set_1_train.txt) beside its ``DFEW_Frame_Face/<id>/`` frame folders."""
    root, facts = dfew_release_tree(root, "DFEW_Frame_Face")
    for table in (root / "EmoLabel_DataSplit").rglob("set_*.csv"):
        part, fold = ("test" if "test" in table.parent.name else "train"), table.stem.split("_")[1]
        out = root / "annotation" / f"DFEW_set_{fold}_{part}.txt"
        out.parent.mkdir(exist_ok=True)
        out.write_text("".join(f"/data/EECS-IoannisLab/datasets/DFEW/DFEW_Frame_Face/{name} 2 {int(code) - 1}\n"
                               for name, code in (row.split(",") for row in table.read_text().split()[1:])))
    shutil.rmtree(root / "EmoLabel_DataSplit")
    return root, facts


def ferv39k_dfer_clip_tree(root: Path) -> tuple[Path, dict]:
    """FERV39k with DFER-CLIP's ``annotation/FERV39K_{train,test}.txt`` only, lines
    ``/data/.../FERV39K/2_ClipsforFaceCrop/Action/Happy/0015 25 0`` (codes 0..6 in DFEW's order,
    zengqunzhao/DFER-CLIP:annotation/FERV39K_test.txt); the planted bad rows come along."""
    root, facts = ferv39k_tree(root)
    lists = root / "FERV39k" / "4_setups" / "All_scenes"
    codes = {name.lower(): i for i, name in enumerate(DFEW_NAMES)}
    (root / "FERV39k" / "annotation").mkdir()
    for part in ("train", "test"):
        rows = [line.split() for line in (lists / f"{part}_All.csv").read_text().splitlines()]
        (root / "FERV39k" / "annotation" / f"FERV39K_{part}.txt").write_text("".join(
            f"/data/EECS-IoannisLab/datasets/FERV39K/2_ClipsforFaceCrop/{rel} 2 {codes.get(label.lower(), 9)}\n"
            for rel, label in rows))
    shutil.rmtree(root / "FERV39k" / "4_setups")
    return root, facts


def ckplus_unzipped_tree(root: Path) -> tuple[Path, dict]:
    """CK+ with Emotion_labels.zip unpacked into its own folder: ``CK+/cohn-kanade-images/`` beside
    ``CK+/Emotion_labels/Emotion/Sxxx/nnn/*_emotion.txt`` (the distribution's zip names)."""
    root, facts = ckplus_tree(root / "CK+")
    (root / "Emotion_labels").mkdir()
    (root / "Emotion").rename(root / "Emotion_labels" / "Emotion")
    return root.parent, facts


# variant -> (builder, folder to point at (relative to the tree), layout, folder the clips must come from)
VARIANTS = {
    "dfew-mae-jpg_256": (lambda r: dfew_release_tree(r, "Clip/jpg_256"), ".", "dfew", "Clip/jpg_256"),
    "dfew-clip-224-unpadded": (lambda r: dfew_release_tree(r, "Clip/clip_224x224", padded=False), ".", "dfew",
                               "Clip/clip_224x224"),
    "dfew-s2d-16f": (lambda r: dfew_release_tree(r, "Clip/clip_224x224_16f", "s2d"), ".", "dfew",
                     "Clip/clip_224x224_16f"),
    "dfew-affine-from-root": (lambda r: dfew_release_tree(r, "data_affine/single_label/data", "affine",
                                                          frame_names="{id}_{:05d}.jpg"), ".", "dfew",
                              "data_affine/single_label/data"),
    "dfew-affine-from-single_label": (lambda r: dfew_release_tree(r, "data_affine/single_label/data", "affine"),
                                      "data_affine/single_label", "dfew", "data_affine/single_label/data"),
    "dfew-from-parent": (lambda r: dfew_release_tree(r / "DFEW", "Clip/jpg_256"), ".", "dfew", "DFEW/Clip/jpg_256"),
    "mafw-mae-frames": (mafw_mae_tree, ".", "mafw", "data/frames"),
    "mafw-release-videos": (lambda r: mafw_mae_tree(r, videos=True, split_root="Train & Test Set"), ".", "mafw",
                            "data/clips"),
    "mafw-s2d-crops": (lambda r: mafw_mae_tree(r, split_root="anno", frames="data/frames/frames_crop_align_224"),
                       ".", "mafw", "data/frames/frames_crop_align_224"),
    "mafw-clip-lists": (mafw_tree, ".", "mafw", "data/faces"),
    "ferv39k-mae": (ferv39k_tree, ".", "ferv39k", "FERV39k/2_ClipsforFaceCrop"),
    "ferv39k-from-inside": (ferv39k_tree, "FERV39k", "ferv39k", "FERV39k/2_ClipsforFaceCrop"),
    "rafdb-aligned": (rafdb_tree, ".", "rafdb", "basic/Image/aligned"),
    "rafdb-from-basic": (rafdb_tree, "basic", "rafdb", "basic/Image/aligned"),
    "rafdb-original-only": (lambda r: rafdb_tree(r, aligned=False), ".", "rafdb", "basic/Image/original"),
    "rafdb-kaggle-code-folders": (rafdb_code_folders_tree, ".", "rafdb-folders", "DATASET"),
    "rafdb-code-folders-from-inside": (rafdb_code_folders_tree, "DATASET", "rafdb-folders", "DATASET"),
    "rafdb-train_set-code-folders": (lambda r: rafdb_code_folders_tree(r, "rafdb", ("train_set", "val_set")), ".",
                                     "rafdb-folders", "rafdb"),
    "dfew-readme-spelling-original-videos": (dfew_readme_tree, ".", "dfew", "Clip/original"),
    "dfew-headerless-lists-with-mp4-names": (lambda r: dfew_odd_lists_tree(r), ".", "dfew", "Clip/clip_224x224"),
    "dfew-dfer-clip-lists": (dfew_dfer_clip_tree, ".", "dfew", "DFEW_Frame_Face"),
    "ferv39k-dfer-clip-lists": (ferv39k_dfer_clip_tree, ".", "ferv39k", "FERV39k/2_ClipsforFaceCrop"),
    "ckplus-emotion-labels-unzipped": (ckplus_unzipped_tree, ".", "ckplus", "CK+/cohn-kanade-images"),
}



def expected_label(variant: str, clip) -> str:
    """The label each builder gave the clip (see dataset_trees.py)."""
    name = clip.clip_id.rsplit("/", 1)[-1]
    if variant.startswith("dfew"):
        return DFEW_NAMES[dfew_code(int(name)) - 1]
    if variant == "mafw-clip-lists":
        return MAFW_CLASSES[(int(name) - 1) % 11]
    if variant.startswith("mafw"):
        return MAFW_ORDER[MAFW_MAE[(int(name) - 1) % 11]]
    if variant.startswith("ckplus"):                    # subject S{5 + 5s}: code s % 7 + 1 (ckplus_tree)
        return CKPLUS_CLASSES[(int(clip.clip_id.split("/")[-2][1:]) - 5) // 5 % 7 + 1]
    if variant.startswith("rafdb"):
        return RAF_NAMES[(int(Path(name).stem.split("_")[1]) - 1) % 7]
    return clip.clip_id.split("/")[3]          # FERV39k: Train/<label>/<Scene>/<Emotion>/<nnnn>


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_release_variant_is_found_by_content(variant, tmp_path):
    build, point, layout, frames = VARIANTS[variant]
    root, facts = build(tmp_path / "tree")
    scan = scan_dataset(tmp_path / "tree" / point)
    assert scan.layout == layout
    assert all((tmp_path / "tree" / frames).resolve() in c.path.resolve().parents for c in scan.clips)
    assert [c.label for c in scan.clips] == [expected_label(variant, c) for c in scan.clips]
    if layout in ("dfew", "mafw"):
        clips = facts["clips"]
        assert len(scan.clips) == clips and scan.folds == [1, 2, 3, 4, 5]
        assert sum(c["test"] for c in scan.fold_counts().values()) == clips      # every clip tests once
        assert all(dict(c.folds)[(int(c.clip_id.rsplit("/", 1)[1]) - 1) % 5 + 1] == "test" for c in scan.clips)
        assert not [p for p in scan.problems if p.severity != "info"] or variant == "mafw-clip-lists"
    if layout.startswith("rafdb"):
        second = "Val" if "train_set" in variant else "Test"
        assert scan.counts()["Train"].total() == facts["train"] and scan.counts()[second].total() == facts["test"]
        assert {c.kind for c in scan.clips} == {"image"} and all(c.frames == 1 for c in scan.clips)
        assert scan.class_names == RAFDB_CLASSES and not scan.problems
    chosen = tmp_path / "tree" / frames                                       # the report names the folder read
    assert any(f"clips: {chosen} (" in n or f"images: {chosen} (" in n for n in scan.notes), scan.notes


def test_check_output_for_each_variant(tmp_path):
    """What `emo-cache check` prints on each variant (the report of issue 15 shows these)."""
    for variant, (build, point, layout, frames) in VARIANTS.items():
        build(tmp_path / variant)
        result = CliRunner().invoke(emo_cache, ["check", str(tmp_path / variant / point), "--workers", "1"])
        assert f"({layout} layout)" in result.output, result.output
        assert "note: labels: " in result.output
        assert result.exit_code == (1 if variant == "mafw-clip-lists" or variant.startswith(("ferv39k", "ckplus"))
                                    else 0), result.output  # those trees plant bad rows on purpose


def test_mafw_decoy_lists_are_not_read(tmp_path):
    """with_caption/ (every clip 'anger') and compound/ (every clip 'fear') lie beside no_caption/: only
    no_caption/ is read, and the report names the lists left out."""
    root, _ = mafw_mae_tree(tmp_path / "MAFW")
    scan = scan_dataset(root)
    assert {c.label for c in scan.clips} == set(MAFW_CLASSES)
    assert any("with_caption" in n and "not read" in n for n in scan.notes)
    assert not any("compound" in n for n in scan.notes)        # multi-label lists are never candidates


def test_two_frame_roots_prefer_the_release_faces_and_frame_root_chooses(tmp_path):
    root, _ = dfew_release_tree(tmp_path / "DFEW", "Clip/clip_224x224")
    for i in range(1, 11):
        write_frames(root / "Clip" / "jpg_256" / f"{i:05d}", real_frames(1))
    scan = scan_dataset(root)
    assert {c.path.parent.name for c in scan.clips} == {"clip_224x224"}
    assert any("also holding clips" in n and "jpg_256" in n and "--frame-root" in n for n in scan.notes)
    chosen = scan_dataset(root, frame_root=str(root / "Clip" / "jpg_256"))
    assert {c.path.parent.name for c in chosen.clips} == {"jpg_256"} and len(chosen.clips) == 10
    result = CliRunner().invoke(emo_cache, ["check", str(root), "--frame-root", str(root / "Clip" / "jpg_256")])
    assert result.exit_code == 0 and "jpg_256 (frames, 10 of 10" in result.output, result.output


def test_lists_without_their_clips_say_what_was_found_and_looked_for(tmp_path):
    root, _ = dfew_release_tree(tmp_path / "DFEW", "Clip/clip_224x224")
    shutil.rmtree(root / "Clip")
    (root / "videos_elsewhere").mkdir()
    with pytest.raises(DatasetError) as err:
        scan_dataset(root)
    text = str(err.value)
    assert text.startswith(f"{root}: DFEW lists found (EmoLabel_DataSplit/{{train,test}}(single-labeled)/set_K.csv")
    assert "set_1.csv" in text and "00001" in text and "looked for a folder whose sub-folders" in text
    assert "--frame-root DIR" in text and "videos_elsewhere" not in text.split("looked for")[0]
    result = CliRunner().invoke(emo_cache, ["check", str(root)])
    assert result.exit_code == 1 and "Traceback" not in result.output and len(result.output.splitlines()) == 1


def test_a_tree_with_no_release_lists_says_what_it_looked_for(tmp_path):
    """Frames laid out as DFEW's, but no label list anywhere: read as <split>/<label>/<clip>, nothing found,
    and the error names the lists it looked for and the folders of clips it saw."""
    for i in range(1, 40):
        write_frames(tmp_path / "DFEW" / "Clip" / "jpg_256" / f"{i:05d}", real_frames(1))
    report = check_dataset(tmp_path / "DFEW", progress=False)
    text = report.format()
    assert not report.ok and "no clip found (folders layout)" in text
    assert "looked for: EmoLabel_DataSplit" in text and "Clip/jpg_256/" in text


# -- still images: a one-frame clip in every layout ---------------------------------------------------------
def test_images_in_split_label_folders(tmp_path):
    root, _ = image_folders_tree(tmp_path / "imgs")
    scan = scan_dataset(root)
    assert [(c.clip_id, c.kind, c.frames) for c in scan.clips] == [
        ("Train/Happy/a.jpg", "image", 1), ("Train/Happy/b.png", "image", 1), ("Train/Sad/c.jpg", "image", 1),
        ("Val/Happy/d.jpg", "image", 1), ("Val/Sad/e.jpeg", "image", 1)]


def test_images_in_a_csv_and_in_annotation_lists(tmp_path):
    root, _ = image_folders_tree(tmp_path / "imgs")
    (root / "list.csv").write_text("path,label,split\ntrain/Happy/a.jpg,Happy,Train\nval/Sad/e.jpeg,Sad,Val\n")
    assert [(c.clip_id, c.kind) for c in scan_dataset(root / "list.csv").clips] == [
        ("Train/Happy/a.jpg", "image"), ("Val/Sad/e.jpeg", "image")]
    (root / "lists").mkdir()
    (root / "lists" / "train.txt").write_text(f"{root}/train/Happy/a.jpg 3\n../train/Sad/c.jpg 5\n")  # SCN-style
    scan = scan_dataset(root / "lists" / "train.txt", ["Angry", "Disgust", "Fear", "Happy", "Neutral", "Sad"])
    assert [(c.clip_id, c.kind, c.label) for c in scan.clips] == [
        ("Train/Happy/train/Happy/a.jpg", "image", "Happy"), ("Train/Sad/train/Sad/c.jpg", "image", "Sad")]


def test_videos_mixed_with_images_are_worth_a_warning(tmp_path, samples_dir):
    root, _ = image_folders_tree(tmp_path / "imgs")
    shutil.copyfile(samples_dir / "single_face.mp4", root / "train" / "Happy" / "v.mp4")
    scan = scan_dataset(root)
    warn = [p for p in scan.problems if p.severity == "warning"]
    assert len(warn) == 1 and "mixes 1 video(s) and 2 still image(s)" in warn[0].message
    assert {c.clip_id: c.kind for c in scan.clips}["Train/Happy/v.mp4"] == "video"


# -- nothing silently empty ------------------------------------------------------------------------------
def test_a_dataset_of_nothing_usable_is_an_error_naming_what_was_ignored(tmp_path):
    (tmp_path / "docs").mkdir()
    rows = []
    for i in range(5):
        (tmp_path / "docs" / f"{i}.gif").write_bytes(b"GIF89a")
        rows.append(f"docs/{i}.gif,Happy,Train")
    (tmp_path / "list.csv").write_text("path,label,split\n" + "\n".join(rows) + "\n")
    report = check_dataset(tmp_path / "list.csv", progress=False)
    errors = [p for p in report.problems if p.reason == "empty"]
    assert not report.ok and len(errors) == 1                    # the dataset (its split says nothing more)
    assert "no clip found (csv layout): 5 ignored: .gif is not a video or an image;" in errors[0].message
    assert "clips are videos" in errors[0].message and ".jpg" in errors[0].message
    result = CliRunner().invoke(emo_cache, ["faces", str(tmp_path / "list.csv"), "--out", str(tmp_path / "f.h5")])
    assert result.exit_code == 1 and "Traceback" not in result.output, result.output
    assert "no clip found (csv layout): 5 ignored: .gif is not a video" in result.output
    assert not (tmp_path / "f.h5").exists()


def test_an_empty_split_and_an_empty_fold_are_errors(tmp_path):
    root, _ = image_folders_tree(tmp_path / "imgs")
    for image in (root / "val").rglob("*.*"):
        image.rename(image.with_suffix(".txt"))
    report = check_dataset(root, progress=False)
    empty = [p for p in report.problems if p.reason == "empty"]
    assert [p.path for p in empty] == [str(root / "val")] and not report.ok
    assert "split Val yields no clip (afew layout): 2 ignored: .txt is not a video or an image" in empty[0].message
    dfew, _ = dfew_tree(tmp_path / "dfew", clips=10)
    test3 = dfew / "label" / "single_testset_3.csv"
    test3.write_text("video_name,label\n77777,1\n")
    empty = [p for p in scan_dataset(dfew).problems if p.reason == "empty"]
    assert [p.path for p in empty] == [str(test3)]
    assert empty[0].message.startswith("fold 3 test yields no clip (dfew layout): 1 ignored: a listed clip")


def test_faces_refuses_an_empty_split_before_any_work(tmp_path):
    root, _ = image_folders_tree(tmp_path / "imgs")
    for image in (root / "val").rglob("*.*"):
        image.unlink()
    (root / "val" / "Sad" / "notes.txt").write_text("x")
    result = CliRunner().invoke(emo_cache, ["faces", str(root), "--out", str(tmp_path / "f.h5"), "--quiet"])
    assert result.exit_code == 1 and "Traceback" not in result.output, result.output
    assert f"Error: {root / 'val'}: split Val yields no clip" in result.output
    assert not (tmp_path / "f.h5").exists()


# -- the faces stage on still images -------------------------------------------------------------------
def test_faces_on_raf_db_images_prealigned_and_detected(tmp_path):
    """RAF-DB's aligned 100x100 faces are resized as prealigned (square, auto); its original photos go through
    detection. Each image is a one-frame clip of kind "image" in the store."""
    from emotion_attention.cache import HOW, FacesStore
    from emotion_attention.pipeline.configs import PreprocessConfig
    from emotion_attention.pipeline.stages.faces import preprocess_dataset

    root, facts = rafdb_tree(tmp_path / "raf", train=3, test=1)
    aligned = preprocess_dataset(root, tmp_path / "aligned.h5", PreprocessConfig(), workers=1, progress=False)
    original = preprocess_dataset(root, tmp_path / "original.h5", PreprocessConfig(), workers=2, progress=False,
                                  frame_root=str(root / "basic" / "Image" / "original"))
    assert aligned.written == original.written == 4 and not aligned.failures and not original.failures
    with FacesStore(tmp_path / "aligned.h5") as a, FacesStore(tmp_path / "original.h5") as o:
        assert a.complete_ids() == o.complete_ids() == ["Test/Surprise/test_0001.jpg", "Train/Disgust/train_00003.jpg",
                                                        "Train/Fear/train_00002.jpg", "Train/Surprise/train_00001.jpg"]
        for cid in a.complete_ids():
            assert a.attrs(cid)["kind"] == o.attrs(cid)["kind"] == "image"
            assert a.attrs(cid)["source"].endswith("_aligned.jpg")
            assert not o.attrs(cid)["source"].endswith("_aligned.jpg")
            assert a.read_meta(cid)["how"].tolist() == [HOW["prealigned"]]                  # resized, not detected
            assert o.read_meta(cid)["present"].tolist() == [True]                           # the face was found
            assert o.read_meta(cid)["how"].tolist()[0] in (HOW["detector"], HOW["upsampled"])
            assert a.read_faces(cid).shape == o.read_faces(cid).shape == (1, 256, 256, 3)


def test_faces_with_workers_then_check_with_workers_in_one_process(tmp_path):
    """faces' loky workers and check's joblib pool share one reusable executor per process: a notebook (or a
    script) that runs faces with 2 workers and then check with 2 must get a report, not an AttributeError from a
    pool of the wrong kind; and the other way round."""
    from joblib.externals.loky import reusable_executor

    from emotion_attention.pipeline.configs import PreprocessConfig
    from emotion_attention.pipeline.stages.faces import preprocess_dataset

    images, _ = rafdb_code_folders_tree(tmp_path / "raf", train=4, test=2)
    videos = tmp_path / "videos"                       # check runs each video as a job of its own: a pool of 2
    for name in ("Train/Happy/a.mp4", "Train/Sad/b.mp4", "Val/Happy/c.mp4"):
        (videos / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(SAMPLES / "single_face.mp4", videos / name)
    for n, first in enumerate(("faces", "check", "faces")):
        if first == "faces":
            done = preprocess_dataset(images, tmp_path / f"f{n}.h5", PreprocessConfig(), workers=2, progress=False)
            assert done.written == 6 and not done.failures
        report = check_dataset(videos, progress=False, workers=2)
        assert report.ok and len(report.scan.clips) == 3, report.format()
        assert reusable_executor._executor is not None                  # the pools did run in processes


def test_afew_release_folder_names(tmp_path):
    """AFEW as its zips unpack, ``Train_AFEW/<Emotion>/*.avi`` and ``Val_AFEW/...`` (Emotion-FAN's
    ``train_afew``/``val_afew`` alike): the afew layout, splits Train and Val."""
    for split, label in (("Train_AFEW", "Angry"), ("Train_AFEW", "Happy"), ("Val_AFEW", "Sad")):
        (tmp_path / split / label).mkdir(parents=True)
        shutil.copyfile(SAMPLES / "single_face.mp4", tmp_path / split / label / "000123.avi")
    scan = scan_dataset(tmp_path)
    assert scan.layout == "afew" and not scan.problems
    assert [c.clip_id for c in scan.clips] == ["Train/Angry/000123.avi", "Train/Happy/000123.avi",
                                               "Val/Sad/000123.avi"]
