"""Store faults: damaged, truncated, NaN, foreign, locked, read-only, full. Nothing committed is ever lost."""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import textwrap

import h5py
import numpy as np
import pytest
from click.testing import CliRunner

from emotion_attention.cache import (FacesStore, FeaturesStore, StoreDamaged, StoreError, StoreLocked, StoreMismatch, clip_key)
from emotion_attention.cache.common import salvage
from emotion_attention.cli.emo_cache import main as emo_cache
from faultkit import (CLIPS, REPO, build_faces_store, build_features_store, chunk_byte_offset, face_arrays,
                      file_bytes, maps_of, mounted_tmpfs, overwrite, truncate)

FACES_CONFIG = {"size": 32, "max_frames": None}


def assert_clips_equal(path, clip_ids, frames=12, size=32):
    """Every listed clip reads back exactly as written (pixels and maps)."""
    with h5py.File(path, "r") as f:
        fmt = f.attrs["format"]
    if fmt == "emotion-faces/1":
        with FacesStore(path) as store:
            for cid in clip_ids:
                expected = face_arrays(frames, size, CLIPS.index(cid))["faces"]
                np.testing.assert_array_equal(store.read_faces(cid), expected)
    else:
        with FeaturesStore(path) as store:
            for cid in clip_ids:
                np.testing.assert_array_equal(store.read_clip(cid)[0], maps_of(CLIPS.index(cid), frames))


def salvage_cli(path):
    return CliRunner().invoke(emo_cache, ["salvage", str(path)])


def assert_points_to_salvage(exc_info, path):
    msg = str(exc_info.value)
    assert str(path) in msg and f"emo-cache salvage {path}" in msg
    assert "another process" not in msg and "rerun the same command" not in msg


# -- damaged stores ----------------------------------------------------------------------------------

def test_truncated_store_is_damage_not_a_lock_and_salvage_keeps_every_committed_clip_it_can(tmp_path):
    path = build_faces_store(tmp_path / "faces.h5")
    original = file_bytes(path)
    truncate(path, int(len(original) * 0.9))
    cut = file_bytes(path)
    with pytest.raises(StoreDamaged) as writer:           # a rerun of `faces` must not touch it
        FacesStore(path, "a", config=FACES_CONFIG)
    assert_points_to_salvage(writer, path)
    with pytest.raises(StoreDamaged) as reader:           # nor may extract/train/eval read it
        FacesStore(path)
    assert_points_to_salvage(reader, path)
    assert file_bytes(path) == cut and not list(tmp_path.glob("faces.h5.damaged-*"))

    res = salvage_cli(path)
    assert res.exit_code == 0, res.output
    kept_copy = list(tmp_path.glob("faces.h5.damaged-*"))
    assert len(kept_copy) == 1 and file_bytes(kept_copy[0]) == cut   # the damaged original, unchanged
    assert str(kept_copy[0]) in res.output and "5 clip(s) kept, 1 dropped" in res.output
    assert_clips_equal(path, CLIPS[:5])
    with FacesStore(path, "a", config=FACES_CONFIG) as store:       # the rerun finishes the dropped clip
        assert store.complete_ids() == sorted(CLIPS[:5])
        store.write_clip(CLIPS[5], face_arrays(12, 32, 5), {"label": "Happy"})
    assert_clips_equal(path, CLIPS)


def test_overwritten_chunk_fails_its_checksum_and_names_the_clip(tmp_path):
    path = build_faces_store(tmp_path / "faces.h5")
    overwrite(path, chunk_byte_offset(path, CLIPS[2], "faces", 3) + 100, b"\xa5" * 64)
    with FacesStore(path) as store:
        np.testing.assert_array_equal(store.read_faces(CLIPS[1]), face_arrays(12, 32, 1)["faces"])
        with pytest.raises(StoreDamaged) as exc:
            store.read_faces(CLIPS[2])
        with pytest.raises(StoreDamaged):
            store.read_faces(CLIPS[2], [3])
    assert_points_to_salvage(exc, path)
    assert repr(CLIPS[2]) in str(exc.value)
    res = salvage_cli(path)
    assert res.exit_code == 0 and f"dropped {CLIPS[2]}" in res.output, res.output
    assert_clips_equal(path, [c for c in CLIPS if c != CLIPS[2]])


def test_overwritten_features_chunk_and_nan_maps_are_damage_on_every_read(tmp_path):
    path = build_features_store(tmp_path / "feats.h5")
    overwrite(path, chunk_byte_offset(path, CLIPS[0], "maps", 5) + 10, b"\xff" * 32)
    with h5py.File(path, "r+") as f:   # NaN written through HDF5: the checksum is right, the values are not
        f[clip_key(CLIPS[4])]["maps"][0, 7, 3] = np.nan
    with FeaturesStore(path) as store:
        for cid in (CLIPS[0], CLIPS[4]):
            for frames in (None, [7, 5], [11, 0]):
                with pytest.raises(StoreDamaged, match=f"clip '{cid}'.*emo-cache salvage"):
                    store.read_clip(cid, frames=frames)
        assert store.read_clip(CLIPS[1])[0].shape == (1, 12, 16, 32)
    res = salvage_cli(path)
    assert res.exit_code == 0, res.output
    assert f"dropped {CLIPS[4]}: non-finite values" in res.output and f"dropped {CLIPS[0]}" in res.output
    assert_clips_equal(path, CLIPS[1:4] + CLIPS[5:])


def test_bytes_overwritten_in_the_middle_never_pass_silently(tmp_path):
    """Random damage at the middle of the file: every clip either reads back exactly or raises StoreDamaged."""
    path = build_features_store(tmp_path / "feats.h5")
    size = path.stat().st_size
    overwrite(path, size // 2, np.random.default_rng(0).bytes(4096))
    good, bad = [], []
    try:
        store = FeaturesStore(path)
    except StoreDamaged as exc:
        assert f"emo-cache salvage {path}" in str(exc)
        return
    with store:
        for i, cid in enumerate(CLIPS):
            try:
                np.testing.assert_array_equal(store.read_clip(cid)[0], maps_of(i))
                good.append(cid)
            except StoreDamaged as exc:
                assert cid in str(exc) or str(path) in str(exc)
                bad.append(cid)
    assert bad, "4 KiB of noise in the middle of the maps went unnoticed"
    assert salvage_cli(path).exit_code == 0
    assert_clips_equal(path, good)


def test_unreadable_from_the_start_is_left_alone(tmp_path):
    path = build_faces_store(tmp_path / "faces.h5")
    overwrite(path, 0, b"\0" * 64)          # superblock gone: not even recognisable as HDF5
    before = file_bytes(path)
    with pytest.raises(StoreError, match="not an HDF5 file"):
        FacesStore(path, "a", config=FACES_CONFIG)
    res = salvage_cli(path)
    assert res.exit_code == 1 and str(path) in res.output and "left as it is" in res.output
    assert file_bytes(path) == before


# -- wrong --out -------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["features-as-faces", "faces-as-features", "foreign-hdf5", "text", "folder"])
def test_wrong_out_is_refused_before_anything_is_written(tmp_path, kind):
    path = tmp_path / "out.h5"
    if kind == "features-as-faces":
        build_features_store(path)
    elif kind == "faces-as-features":
        build_faces_store(path)
    elif kind == "foreign-hdf5":
        shutil.copyfile(REPO / "data" / "samples" / "emotion_model.hdf5", path)
    elif kind == "text":
        path.write_text("my notes\n")
    else:
        path.mkdir()
    before = sorted(os.listdir(tmp_path)), (None if path.is_dir() else file_bytes(path))
    with pytest.raises(StoreError) as exc:
        if kind == "faces-as-features":
            FeaturesStore(path, "a", provenance={"backbone": "x"})
        else:
            FacesStore(path, "a", config=FACES_CONFIG)
    assert str(path) in str(exc.value) and "refus" in str(exc.value) or "folder" in str(exc.value)
    if kind in ("features-as-faces", "faces-as-features"):
        assert isinstance(exc.value, StoreMismatch) and "not a" in str(exc.value)
    assert (sorted(os.listdir(tmp_path)), (None if path.is_dir() else file_bytes(path))) == before


def test_empty_file_is_treated_as_a_new_store(tmp_path):
    path = tmp_path / "faces.h5"
    path.write_bytes(b"")
    with FacesStore(path, "a", config=FACES_CONFIG) as store:
        store.write_clip(CLIPS[0], face_arrays(12, 32, 0), {"label": "Happy"})
    assert_clips_equal(path, CLIPS[:1])


def test_read_only_folder_says_not_writable_not_damaged(tmp_path):
    with mounted_tmpfs(tmp_path / "ro", options="ro") as ro:
        with pytest.raises(StoreError) as exc:
            FacesStore(ro / "faces.h5", "a", config=FACES_CONFIG)
        assert "folder not writable" in str(exc.value) and str(ro) in str(exc.value)
        assert not isinstance(exc.value, StoreDamaged)


# -- one writer, on any file system ------------------------------------------------------------------

WRITER = textwrap.dedent("""
    import sys, time
    from emotion_attention.cache import FacesStore
    sys.path.insert(0, "tests/faults")
    from faultkit import face_arrays
    with FacesStore(sys.argv[1], "a", config={"size": 32, "max_frames": None}) as store:
        store.write_clip(sys.argv[2], face_arrays(12, 32, int(sys.argv[3])), {"label": "Happy"})
        print("written", flush=True)
        time.sleep(float(sys.argv[4]))
""")


def start_writer(path, clip, seed, hold):
    env = {**os.environ, "HDF5_USE_FILE_LOCKING": "FALSE"}
    return subprocess.Popen([sys.executable, "-c", WRITER, str(path), clip, str(seed), str(hold)], cwd=REPO,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_second_writer_is_refused_without_hdf5_locking_and_a_dead_writers_lock_is_broken(tmp_path):
    path = build_faces_store(tmp_path / "faces.h5", CLIPS[:2])
    first = start_writer(path, CLIPS[2], 2, 60)
    try:
        assert first.stdout.readline().strip() == "written"
        second = start_writer(path, CLIPS[3], 3, 0)
        out, err = second.communicate(timeout=60)
        assert second.returncode == 1 and "StoreLocked" in err
        assert f"pid {first.pid} on host {socket.gethostname()}" in err and str(path) in err
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    third = start_writer(path, CLIPS[3], 3, 0)            # the killed writer's lock is stale: broken
    assert third.communicate(timeout=60)[0].strip() == "written", third.stderr
    assert_clips_equal(path, CLIPS[:4])


def test_salvage_is_refused_while_a_writer_holds_the_store(tmp_path):
    path = build_faces_store(tmp_path / "faces.h5", CLIPS[:2])
    with FacesStore(path, "a", config=FACES_CONFIG):
        with pytest.raises(StoreLocked, match=f"pid {os.getpid()}"):
            salvage(path)
        with pytest.raises(StoreLocked, match="another process"):
            FacesStore(path, "a", config=FACES_CONFIG)
    assert salvage(path).kept == sorted(CLIPS[:2])


# -- full disk ---------------------------------------------------------------------------------------

FILLER = textwrap.dedent("""
    import sys
    from emotion_attention.cache import FacesStore
    sys.path.insert(0, "tests/faults")
    from faultkit import CLIPS, face_arrays
    with FacesStore(sys.argv[1], "a", config={"size": 32, "max_frames": None}) as store:
        for i in range(600):
            store.write_clip(f"{CLIPS[i % 6]}.{i}", face_arrays(12, 32, i % 6), {"label": "Happy"})
            print(f"{CLIPS[i % 6]}.{i}", flush=True)
""")


def test_full_disk_stops_cleanly_keeps_committed_clips_and_a_rerun_with_space_finishes(tmp_path):
    """The store's own writes on a disk that fills: a clean error (no crash), every committed clip kept."""
    with mounted_tmpfs(tmp_path / "small", size="16m") as small:
        path = small / "faces.h5"
        proc = subprocess.run([sys.executable, "-c", FILLER, str(path)], cwd=REPO, capture_output=True, text=True, timeout=120)
        written = proc.stdout.split()
        assert proc.returncode == 1, f"rc {proc.returncode} (negative: killed by a signal): {proc.stderr[-2000:]}"
        assert "StoreFull" in proc.stderr and str(path) in proc.stderr
        assert written, "the tmpfs filled before one clip was written"
        moved = tmp_path / "faces.h5"
        shutil.copyfile(path, moved)
    with FacesStore(moved, "a", config=FACES_CONFIG) as store:   # the rerun, on a disk with space
        assert set(written) <= set(store.complete_ids())
        for cid in written:
            seed = CLIPS.index(cid.rsplit(".", 1)[0])
            np.testing.assert_array_equal(store.read_faces(cid), face_arrays(12, 32, seed)["faces"])
        store.write_clip("Train/Happy/after.mp4", face_arrays(12, 32, 0), {"label": "Happy"})


def test_two_salvages_in_one_second_keep_both_originals(tmp_path):
    path = build_faces_store(tmp_path / "faces.h5", CLIPS[:2])
    first, second = salvage(path), salvage(path)
    assert first.damaged_copy != second.damaged_copy
    assert first.damaged_copy.exists() and second.damaged_copy.exists()
    assert second.kept == sorted(CLIPS[:2])


def test_salvage_check_lists_damaged_clips_and_changes_nothing(tmp_path):
    path = build_features_store(tmp_path / "feats.h5")
    healthy = CliRunner().invoke(emo_cache, ["salvage", "--check", str(path)])
    assert healthy.exit_code == 0 and "0 problem(s)" in healthy.output
    overwrite(path, chunk_byte_offset(path, CLIPS[3], "maps", 1) + 8, b"\x00" * 16)
    before = file_bytes(path)
    res = CliRunner().invoke(emo_cache, ["salvage", "--check", str(path)])
    assert res.exit_code == 1 and f"{CLIPS[3]}: " in res.output and "1 problem(s)" in res.output, res.output
    assert file_bytes(path) == before and not list(tmp_path.glob("feats.h5.damaged-*"))
