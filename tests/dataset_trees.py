"""Small generated dataset trees in every published layout, made of real sample frames, with planted problems.

Each builder returns (root to scan, facts the tests check). Frames are real frames of single_face.mp4 resized
to 160x90 (scans never decode them; the faces tests that do decode use their own full-size frames).
"""
from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

SAMPLES = Path(__file__).resolve().parents[1] / "data" / "samples"


def real_frames(n: int, size: tuple = (160, 90), name: str = "single_face.mp4") -> list[np.ndarray]:
    """The first n frames of a sample video, BGR, resized to ``size`` (None keeps them whole)."""
    cap = cv2.VideoCapture(str(SAMPLES / name))
    frames = []
    while len(frames) < n:
        ok, bgr = cap.read()
        if not ok:
            break
        frames.append(cv2.resize(bgr, size, interpolation=cv2.INTER_AREA) if size else bgr)
    cap.release()
    return frames


def write_frames(folder: Path, frames, pattern: str = "{:05d}.jpg") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i, bgr in enumerate(frames, start=1):
        cv2.imwrite(str(folder / pattern.format(i)), bgr)
    return folder


def dfew_tree(root: Path, clips: int = 10, folds: int = 5) -> tuple[Path, dict]:
    """data_affine/single_label/data/<id>/<id>_<nnnnn>.jpg + label/single_{train,test}set_K.csv.

    Clip i (1-based, id 0000i) has label code (i-1) % 7 + 1 and tests in fold (i-1) % folds + 1.
    Planted: a row whose frame folder is missing (99999), a label code 9, a BOM + capitalised header in fold 2.
    """
    frames = real_frames(3)
    for i in range(1, clips + 1):
        cid = f"{i:05d}"
        write_frames(root / "data_affine" / "single_label" / "data" / cid, frames, cid + "_{:05d}.jpg")
    (root / "label").mkdir(parents=True)
    for k in range(1, folds + 1):
        for part in ("train", "test"):
            rows = [(i, (i - 1) % 7 + 1) for i in range(1, clips + 1) if ((i - 1) % folds + 1 == k) == (part == "test")]
            header = "\ufeffVideo_Name,Label" if k == 2 else "video_name,label"
            lines = [header] + [f"{i},{code}" for i, code in rows]
            if k == 1 and part == "train":
                lines += ["99999,3", "00002,9"]
            (root / "label" / f"single_{part}set_{k}.csv").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return root, {"clips": clips, "folds": folds}


def ferv39k_tree(root: Path) -> tuple[Path, dict]:
    """2_ClipsforFaceCrop/<Scene>/<Emotion>/<nnnn>/ + 4_setups/All_scenes/{train,test}_All.csv.

    Two scenes share clip number 0001, so ids must keep the scene. Planted: an unknown label, a missing folder.
    """
    frames = real_frames(2)
    base = root / "FERV39k"
    rels = {"Action/Happy/0001": "Train", "Argue/Happy/0001": "Train", "Action/Sad/0002": "Test",
            "Argue/Fear/0003": "Test"}
    for rel in rels:
        write_frames(base / "2_ClipsforFaceCrop" / rel, frames, "{:04d}.jpg")
    lists = base / "4_setups" / "All_scenes"
    lists.mkdir(parents=True)
    train = [f"{rel} {rel.split('/')[1]}" for rel, s in rels.items() if s == "Train"] + ["Action/Bored/0009 Bored"]
    test = [f"{rel} {rel.split('/')[1]}" for rel, s in rels.items() if s == "Test"] + ["Action/Sad/0404 Sad"]
    (lists / "train_All.csv").write_text("\n".join(train) + "\n")
    (lists / "test_All.csv").write_text("\n".join(test) + "\n")
    return root, {"rels": rels}


def mafw_tree(root: Path, clips: int = 10, folds: int = 5) -> tuple[Path, dict]:
    """data/faces/<id>/ frame folders + annotation/MAFW_set_K_{train,test}.txt written on another machine
    (absolute /data/EECS-IoannisLab/... paths), labels 0..10. Clip i has label (i-1) % 11.
    Planted: a label 11 (out of MAFW's 0..10)."""
    frames = real_frames(2)
    for i in range(1, clips + 1):
        write_frames(root / "data" / "faces" / f"{i:05d}", frames)
    (root / "annotation").mkdir(parents=True)
    for k in range(1, folds + 1):
        for part in ("train", "test"):
            lines = [f"/data/EECS-IoannisLab/datasets/MAFW/data/faces/{i:05d} 2 {(i - 1) % 11}"
                     for i in range(1, clips + 1) if ((i - 1) % folds + 1 == k) == (part == "test")]
            if k == 3 and part == "test":
                lines.append("/data/EECS-IoannisLab/datasets/MAFW/data/faces/00001 2 11")
            (root / "annotation" / f"MAFW_set_{k}_{part}.txt").write_text("\n".join(lines) + "\n")
    return root, {"clips": clips}


def ckplus_tree(root: Path, subjects: int = 12) -> tuple[Path, dict]:
    """cohn-kanade-images/Sxxx/nnn/Sxxx_nnn_0000000k.png + Emotion/Sxxx/nnn/..._emotion.txt (codes 0-7).

    Subject s has sequences 001 (labelled (s % 7) + 1) and 002 (no emotion file: skipped and counted).
    Planted: one emotion file with code 9.
    """
    frames = real_frames(3)
    labelled = 0
    for s in range(subjects):
        subject = f"S{5 + s * 5:03d}"
        for seq in ("001", "002"):
            write_frames(root / "cohn-kanade-images" / subject / seq, frames, f"{subject}_{seq}_" + "{:08d}.png")
        emotion = root / "Emotion" / subject / "001"
        emotion.mkdir(parents=True)
        code = 9 if s == 3 else s % 7 + 1
        (emotion / f"{subject}_001_00000003_emotion.txt").write_text(f"   {code:.7e}\n")
        labelled += code != 9
    return root, {"subjects": subjects, "labelled": labelled, "unlabelled": subjects}


def annotation_list_tree(root: Path) -> tuple[Path, dict]:
    """One peer-style list ``frames/<name> num_frames label`` named train.txt, numeric labels, classes.txt."""
    frames = real_frames(2)
    for name in ("a", "b", "c"):
        write_frames(root / "frames" / name, frames)
    (root / "lists").mkdir(parents=True)
    (root / "lists" / "classes.txt").write_text("calm\nexcited\n")
    (root / "lists" / "train.txt").write_text("frames/a 2 0\nframes/b 2 1\nframes/c 2 1\nframes/zzz 2 0\n")
    return root / "lists" / "train.txt", {}


def csv_tree(root: Path) -> tuple[Path, dict]:
    """A path,label,split CSV with a BOM and a capitalised header, over frame folders."""
    frames = real_frames(2)
    write_frames(root / "clips" / "x", frames)
    write_frames(root / "clips" / "y", frames)
    table = root / "list.csv"
    table.write_text("\ufeffPath,Label,Split\nclips/x,happy,train\nclips/y,Sad,val\n", encoding="utf-8")
    return table, {}


def folders_tree(root: Path) -> tuple[Path, dict]:
    frames = real_frames(2)
    write_frames(root / "train" / "Calm" / "clip1", frames)
    (root / "classes.txt").write_text("Calm\nExcited\n")
    return root, {}


def afew_tree(root: Path) -> tuple[Path, dict]:
    frames = real_frames(2)
    write_frames(root / "Train" / "Happy" / "001", frames)
    write_frames(root / "Val" / "Sad" / "002", frames)
    return root, {}


BUILDERS = {"dfew": dfew_tree, "ferv39k": ferv39k_tree, "mafw": mafw_tree, "ckplus": ckplus_tree,
            "annotation-list": annotation_list_tree, "csv": csv_tree, "folders": folders_tree, "afew": afew_tree}


def mafw_release_tree(root: Path, clips: int = 5) -> tuple[Path, dict]:
    """MAFW as released: clips/<id>.mp4 (copies of a real sample video), caption-label/single_label.txt, and fold
    lists set_K/{train,test}.txt naming clips. Planted: a clip listed but missing, an unknown label."""
    import shutil

    names = ["anger", "happiness", "contempt", "disappointment", "neutral"]
    (root / "clips").mkdir(parents=True)
    for i in range(1, clips + 1):
        shutil.copyfile(SAMPLES / "single_face.mp4", root / "clips" / f"{i:05d}.mp4")
    (root / "caption-label").mkdir()
    lines = [f"{i:05d}.mp4  {names[(i - 1) % len(names)]}  <br>caption <br>caption" for i in range(1, clips + 1)]
    lines.append("00099.mp4  bored  <br>x")
    (root / "caption-label" / "single_label.txt").write_text("\n".join(lines) + "\n")
    for k in range(1, 6):
        folder = root / "Train & Test Set" / "single" / f"set_{k}"
        folder.mkdir(parents=True)
        (folder / "train.txt").write_text("".join(f"{i:05d}.mp4\n" for i in range(1, clips + 1) if i != k))
        (folder / "test.txt").write_text(f"{k:05d}.mp4\n" + ("00077.mp4\n" if k == 1 else ""))
    return root, {"names": names}


# -- the releases as the public loaders read them (docs/datasets.md cites each) ----------------------------
DFEW_NAMES = ("Happy", "Sad", "Neutral", "Angry", "Surprise", "Disgust", "Fear")  # codes 1..7


def dfew_code(i: int) -> int:
    """Raw DFEW code of clip i (1-based) in these trees."""
    return (i - 1) % 7 + 1


def write_dfew_lists(folder_of, clips: int, folds: int, base: int = 1, padded: bool = True) -> None:
    """Per fold a train and a test ``video_name,label`` CSV; clip i tests in fold (i-1) % folds + 1.
    ``folder_of(part, fold)`` gives each CSV's path; ``base`` 0 writes S2D's shifted codes."""
    for k in range(1, folds + 1):
        for part in ("train", "test"):
            rows = [i for i in range(1, clips + 1) if ((i - 1) % folds + 1 == k) == (part == "test")]
            lines = ["video_name,label"] + [f"{i:05d}" if padded else str(i) for i in rows]
            lines = [lines[0]] + [f"{name},{dfew_code(i) - 1 + base}" for name, i in zip(lines[1:], rows)]
            path = folder_of(part, k)
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text("\n".join(lines) + "\n")


def dfew_release_tree(root: Path, frames: str = "Clip/clip_224x224", lists: str = "release", clips: int = 10,
                      folds: int = 5, padded: bool = True, frame_names: str = "{:05d}.jpg") -> tuple[Path, dict]:
    """DFEW as a public loader reads it: frame folders ``<frames>/<00001>/`` and 5 folds of CSV lists.

    lists: "release" -> EmoLabel_DataSplit/{train,test}(single-labeled)/set_K.csv (MAE-DFER preprocess/dfew.py,
    DFER-CLIP annotation/preprocess_annotation.py); "s2d" -> the same folders with S2D's renamed, 0-based copies
    {train,test}_set_K.csv; "affine" -> label/single_{train,test}set_K.csv beside data/ (the authors' baseline).
    """
    pics = real_frames(2)
    for i in range(1, clips + 1):
        write_frames(root / frames / f"{i:05d}", pics, frame_names.replace("{id}", f"{i:05d}"))
    split = root / "EmoLabel_DataSplit"
    folder_of = {
        "release": lambda part, k: split / f"{part}(single-labeled)" / f"set_{k}.csv",
        "s2d": lambda part, k: split / f"{part}(single-labeled)" / f"{part}_set_{k}.csv",
        "affine": lambda part, k: root / frames / ".." / "label" / f"single_{part}set_{k}.csv",
    }[lists]
    write_dfew_lists(folder_of, clips, folds, base=0 if lists == "s2d" else 1, padded=padded)
    return root, {"clips": clips, "folds": folds, "frames": (root / frames).resolve()}


def mafw_mae_tree(root: Path, clips: int = 11, folds: int = 5, split_root: str = "split",
                  frames: str = "data/frames", videos: bool = False) -> tuple[Path, dict]:
    """MAFW as MAE-DFER's preprocess/mafw.py reads it: ``data/frames/<00001>/*.png`` and
    ``split/single/no_caption/set_K/{train,test}.txt`` with lines ``00001.mp4 anger`` (lower-case labels).
    Clip i has the ((i-1) % 11)-th label of MAE's order. With ``videos`` the clips are ``data/clips/<id>.mp4``
    (the release) instead of frame folders. Decoys as in the release: compound/ (multi-label) and with_caption/
    lists naming other labels, which must not be read."""
    import shutil

    pics = real_frames(2)
    for i in range(1, clips + 1):
        if videos:
            (root / "data" / "clips").mkdir(parents=True, exist_ok=True)
            shutil.copyfile(SAMPLES / "single_face.mp4", root / "data" / "clips" / f"{i:05d}.mp4")
        else:
            write_frames(root / frames / f"{i:05d}", pics, "{:03d}.png")
    for k in range(1, folds + 1):
        for variant, label_of in (("single/no_caption", lambda i: MAFW_MAE[(i - 1) % 11]),
                                  ("single/with_caption", lambda i: "anger"),
                                  ("compound/no_caption", lambda i: "fear")):
            folder = root / split_root / variant / f"set_{k}"
            folder.mkdir(parents=True, exist_ok=True)
            for part in ("train", "test"):
                ids = [i for i in range(1, clips + 1) if ((i - 1) % folds + 1 == k) == (part == "test")]
                sep = "\t" if "with_caption" in variant else " "
                tail = "\t中文\tcaption" if "with_caption" in variant else ""
                (folder / f"{part}.txt").write_text("".join(f"{i:05d}.mp4{sep}{label_of(i)}{tail}\n" for i in ids))
    return root, {"clips": clips, "folds": folds}


MAFW_MAE = ("anger", "disgust", "fear", "happiness", "neutral", "sadness", "surprise", "contempt", "anxiety",
            "helplessness", "disappointment")  # MAE-DFER preprocess/mafw.py, 0-based


def rafdb_tree(root: Path, train: int = 6, test: int = 3, aligned: bool = True, original: bool = True,
               size: int = 100) -> tuple[Path, dict]:
    """RAF-DB basic: ``basic/Image/aligned/<stem>_aligned.jpg`` (100x100 faces), ``basic/Image/original/<name>``
    and ``basic/EmoLabel/list_patition_label.txt`` lines ``train_00001.jpg 5`` (codes 1..7; SCN src/train.py,
    DAN rafdb.py). Image k of a split has code (k-1) % 7 + 1; test ids are 4 digits, train ids 5."""
    face = real_frames(1, size=None)[0]
    lines = []
    for split, n, width in (("train", train, 5), ("test", test, 4)):
        for k in range(1, n + 1):
            name = f"{split}_{k:0{width}d}.jpg"
            lines.append(f"{name} {(k - 1) % 7 + 1}")
            if original:
                (root / "basic" / "Image" / "original").mkdir(parents=True, exist_ok=True)
                cv2.imwrite(str(root / "basic" / "Image" / "original" / name), face)
            if aligned:
                (root / "basic" / "Image" / "aligned").mkdir(parents=True, exist_ok=True)
                crop = cv2.resize(face[40:320, 180:460], (size, size), interpolation=cv2.INTER_AREA)
                cv2.imwrite(str(root / "basic" / "Image" / "aligned" / f"{Path(name).stem}_aligned.jpg"), crop)
    (root / "basic" / "EmoLabel").mkdir(parents=True)
    (root / "basic" / "EmoLabel" / "list_patition_label.txt").write_text("\n".join(lines) + "\n")
    return root, {"train": train, "test": test}


RAF_NAMES = ("Surprise", "Fear", "Disgust", "Happiness", "Sadness", "Anger", "Neutral")


def rafdb_code_folders_tree(root: Path, parent: str = "DATASET", splits: tuple = ("train", "test"),
                            train: int = 8, test: int = 4) -> tuple[Path, dict]:
    """RAF-DB's aligned faces in folders named by its codes: ``<parent>/<split>/<1..7>/<split>_00001_aligned.jpg``
    (the Kaggle copy, with ``{train,test}_labels.csv`` of ``image,label`` beside ``DATASET/``; others'
    ``train_set/1..7/``). Image k of a split has code (k-1) % 7 + 1."""
    face = cv2.resize(real_frames(1, size=None)[0][40:320, 180:460], (100, 100), interpolation=cv2.INTER_AREA)
    for split, n in zip(splits, (train, test)):
        rows = ["image,label"]
        for k in range(1, n + 1):
            code, name = (k - 1) % 7 + 1, f"{split.split('_')[0]}_{k:05d}_aligned.jpg"
            folder = root / parent / split / str(code)
            folder.mkdir(parents=True, exist_ok=True)
            cv2.imwrite(str(folder / name), face)
            rows.append(f"{name},{code}")
        (root / f"{split.split('_')[0]}_labels.csv").write_text("\n".join(rows) + "\n")
    return root, {"train": train, "test": test}


def image_folders_tree(root: Path) -> tuple[Path, dict]:
    """Still images as clips in <split>/<label>/<image>: 3 train, 2 val."""
    face = real_frames(1)[0]
    for rel in ("train/Happy/a.jpg", "train/Happy/b.png", "train/Sad/c.jpg", "val/Happy/d.jpg", "val/Sad/e.jpeg"):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(root / rel), face)
    return root, {}


BUILDERS["rafdb"] = rafdb_tree
BUILDERS["rafdb-folders"] = rafdb_code_folders_tree
