"""The HDF5 stores: round trips, commit marks, settings checks (the damage and lock cases are in tests/faults/)."""
import numpy as np
import pytest

from emotion_attention.cache import FacesStore, FeaturesStore, StoreError, StoreMismatch
from emotion_attention.cache.common import diff_settings, flatten_settings
from faults.faultkit import face_arrays as noise_clip


def face_arrays(n: int) -> dict:
    """A clip of noise chips with about 30 % of its frames without a face."""
    return noise_clip(n, missing=0.3)


def test_faces_store_round_trip(tmp_path):
    arrays = face_arrays(5)
    with FacesStore(tmp_path / "f.h5", "a", config={"size": 8}, code_version="t") as store:
        store.write_clip("Train/Happy/a.mp4", arrays, {"label": "Happy", "split": "Train", "fps": 25.0})
    with FacesStore(tmp_path / "f.h5") as store:
        assert store.complete_ids() == ["Train/Happy/a.mp4"]
        meta = store.read_meta("Train/Happy/a.mp4")
        for name, value in arrays.items():
            got = store.read_faces("Train/Happy/a.mp4") if name == "faces" else meta[name]
            np.testing.assert_array_equal(got, value.astype(got.dtype))
        np.testing.assert_array_equal(store.read_faces("Train/Happy/a.mp4", [4, 1, 4]), arrays["faces"][[4, 1, 4]])
        assert store.read_faces("Train/Happy/a.mp4", []).shape == (0, 8, 8, 3)
        assert store.attrs("Train/Happy/a.mp4")["label"] == "Happy"
        assert store.config == {"size": 8}


def test_present_and_attrs_read_what_the_two_readers_read(tmp_path):
    with FacesStore(tmp_path / "f.h5", "a", config={"size": 8}, code_version="t") as store:
        store.write_clip("Train/Happy/a.mp4", face_arrays(5), {"label": "Happy", "fps": 25.0, "total_frames": 5})
        store.write_clip("Train/Sad/b.mp4", face_arrays(3), {"label": "Sad"})
        store._f["Train|Sad|b.mp4"].attrs["complete"] = False  # as if killed before the mark
    with FacesStore(tmp_path / "f.h5") as store:
        present, attrs = store.present_and_attrs("Train/Happy/a.mp4")
        np.testing.assert_array_equal(present, store.read_present("Train/Happy/a.mp4"))
        assert present.dtype == bool and len(present) == 5
        assert attrs == store.attrs("Train/Happy/a.mp4")
        assert (attrs["label"], attrs["fps"], attrs["total_frames"], attrs["complete"]) == ("Happy", 25.0, 5, True)
        with pytest.raises(StoreError, match="Train/Sad/b.mp4"):  # not complete: not there for a reader
            store.present_and_attrs("Train/Sad/b.mp4")


def test_faces_store_refuses_other_settings(tmp_path):
    FacesStore(tmp_path / "f.h5", "a", config={"size": 8, "padding": 0.2}).close()
    with pytest.raises(StoreMismatch, match=r"padding: store has 0.2, this run asks for 0.3"):
        FacesStore(tmp_path / "f.h5", "a", config={"size": 8, "padding": 0.3})


def test_incomplete_clip_does_not_exist_for_the_next_stage(tmp_path):
    with FacesStore(tmp_path / "f.h5", "a", config={}) as store:
        store.write_clip("Train/Sad/b.mp4", face_arrays(3), {"label": "Sad"})
        store._f["Train|Sad|b.mp4"].attrs["complete"] = False  # as if killed before the mark
        assert store.complete_ids() == []
        with pytest.raises(StoreError, match="Train/Sad/b.mp4"):
            store.read_faces("Train/Sad/b.mp4")


def test_features_store_provenance_and_frames(tmp_path):
    maps = np.random.default_rng(1).random((2, 6, 4, 3)).astype(np.float16)
    present = np.array([1, 1, 0, 1, 0, 1], bool)
    prov = {"backbone": "vgg16", "weights": "random:0", "input_size": 256}
    with FeaturesStore(tmp_path / "x.h5", "a", provenance=prov, class_names=["A", "B"]) as store:
        store.write_clip("Val/A/c.avi", maps, present, {"label": "A", "split": "Val"})
    with FeaturesStore(tmp_path / "x.h5", provenance=prov) as store:
        assert store.complete_ids("val") == ["Val/A/c.avi"] and store.complete_ids("Train") == []
        got, got_present = store.read_clip("Val/A/c.avi", frames=[5, 0, 5], views=[1])
        np.testing.assert_array_equal(got, maps[[1]][:, [5, 0, 5]])
        np.testing.assert_array_equal(got_present, present[[5, 0, 5]])
        assert store.class_names == ["A", "B"] and store.shape("Val/A/c.avi") == (2, 6, 4, 3)
    with pytest.raises(StoreMismatch, match=r"weights: store has 'random:0'.*'sha256:ab'"):
        FeaturesStore(tmp_path / "x.h5", "a", provenance={**prov, "weights": "sha256:ab"})


def test_reading_a_missing_store_says_what_to_do(tmp_path):
    with pytest.raises(StoreError, match="no such store"):
        FacesStore(tmp_path / "nope.h5")


@pytest.mark.parametrize("frames", [[3, 1, 3, 2], [0, 39], [39, 0, 20, 20]])  # dense span: one slice; sparse: per frame
def test_features_store_reads_any_frame_selection(tmp_path, frames):
    maps = np.random.default_rng(2).random((2, 40, 3, 2)).astype(np.float16)
    present = np.arange(40) % 3 > 0
    with FeaturesStore(tmp_path / "x.h5", "a", provenance={"b": 1}) as store:
        store.write_clip("Train/A/a.avi", maps, present, {"label": "A", "split": "Train"})
        got, got_present = store.read_clip("Train/A/a.avi", frames=frames, views=[1])
        np.testing.assert_array_equal(got, maps[1:2, frames])
        np.testing.assert_array_equal(got_present, present[frames])
        np.testing.assert_array_equal(store.read_present("Train/A/a.avi"), present)


def test_faces_store_reads_sparse_frame_selections(tmp_path):
    arrays = face_arrays(60)
    with FacesStore(tmp_path / "f.h5", "a", config={}) as store:
        store.write_clip("Val/Sad/c.mp4", arrays, {"label": "Sad"})
        for frames in ([59, 0, 30, 0], [10, 12, 11]):   # sparse: per frame; dense: one slice
            np.testing.assert_array_equal(store.read_faces("Val/Sad/c.mp4", frames), arrays["faces"][frames])


def test_settings_diff_names_nested_settings_by_dotted_key():
    stored = {"max_frames": 60, "detect": {"width": 320, "mode": "fast"}}
    wanted = {"max_frames": None, "detect": {"width": 480, "mode": "fast"}, "new": 1}
    assert diff_settings(stored, wanted) == ["detect.width: store has 320, this run asks for 480",
                                             "max_frames: store has 60, this run asks for None",
                                             "new: store has '<absent>', this run asks for 1"]
    assert flatten_settings({"a": {"b": {"c": 1}}, "d": {}}) == {"a.b.c": 1, "d": {}}
    assert diff_settings(wanted, wanted) == []


_KINDS = {  # the data sets the stores make, with the arguments they pass (faces meta, vlen chips, crc, maps)
    "meta rows": dict(shape=(7, 68, 2), maxshape=(None, 68, 2), chunks=(64, 68, 2), dtype=np.float32,
                      fletcher32=True),
    "chips, lzf": dict(shape=(3, 8, 8, 3), maxshape=(None, 8, 8, 3), chunks=(1, 8, 8, 3), dtype=np.uint8,
                       fletcher32=True, compression="lzf"),
    "encoded chips": dict(shape=(4,), maxshape=(None,), chunks=(16,), dtype="vlen-uint8"),
    "crc": dict(shape=(4,), maxshape=(None,), chunks=(64,), dtype=np.uint32, fletcher32=True),
    "maps, filled": dict(shape=(2, 5, 9, 16), chunks=(2, 1, 9, 16), dtype=np.float16, fillvalue=0, fletcher32=True),
    "auto chunks, data": dict(data=np.arange(11, dtype=np.int32), chunks=True, fletcher32=True),
    "auto chunks, mask": dict(data=np.array([True, False, True]), chunks=True, fletcher32=True),
}


@pytest.mark.parametrize("kind", sorted(_KINDS))
def test_cached_creation_matches_h5py(tmp_path, kind):
    """create_dataset (creation properties made once per kind) gives what h5py's create_dataset gives: the same
    creation property list (H5Pequal), type, layout and bytes, on first use and from its cache."""
    import h5py

    from emotion_attention.cache.common import create_dataset

    args = dict(_KINDS[kind])
    if args.get("dtype") == "vlen-uint8":
        args["dtype"] = h5py.vlen_dtype(np.uint8)
    with h5py.File(tmp_path / "s.h5", "w") as f:
        old = f.create_dataset("old", **args)
        for name in ("new", "again"):  # the second one comes from the cache
            new = create_dataset(f, name, **args)
            assert new.id.get_create_plist().equal(old.id.get_create_plist())
            assert new.id.get_type().equal(old.id.get_type())
            assert (new.shape, new.maxshape, new.chunks, new.fletcher32, new.compression, new.fillvalue) == \
                   (old.shape, old.maxshape, old.chunks, old.fletcher32, old.compression, old.fillvalue)
            if "data" in args:
                np.testing.assert_array_equal(new[()], old[()])
    with h5py.File(tmp_path / "s.h5") as f:  # what reopening sees, too
        assert f["new"].id.get_create_plist().equal(f["old"].id.get_create_plist())
        assert f["again"].id.get_create_plist().equal(f["old"].id.get_create_plist())


_ATTR_VALUES = {"bool": True, "numpy bool": np.bool_(False), "int": 7, "int32": np.int32(-3), "float": 25.0,
                "float32": np.float32(0.5), "str": "Happy", "unicode": "Überraschung ünd 驚き", "empty str": "",
                "json": '{"folds":[1,2]}', "int64 max": np.iinfo(np.int64).max}


@pytest.mark.parametrize("kind", sorted(_ATTR_VALUES))
def test_cached_attributes_match_h5py(tmp_path, kind):
    """write_attrs (types made once per kind of value) stores what ``attrs[name] = value`` stores: the same file
    type (H5Tequal), shape and value, on first use, from its cache, after reopening; and it replaces an attribute
    of the same name."""
    import h5py

    from emotion_attention.cache.common import write_attrs

    value = _ATTR_VALUES[kind]
    with h5py.File(tmp_path / "a.h5", "w") as f:
        old, new = f.create_group("old"), f.create_group("new")
        old.attrs["v"] = value
        write_attrs(new, {"v": 0.0})  # a float first: the second write replaces it, whatever its type
        write_attrs(new, {"v": value, "w": value})  # "w" comes from the cache
    with h5py.File(tmp_path / "a.h5") as f:
        want = h5py.h5a.open(f["old"].id, b"v")
        for name in (b"v", b"w"):
            got = h5py.h5a.open(f["new"].id, name)
            assert got.get_type().equal(want.get_type()) and got.shape == want.shape
            assert type(f["new"].attrs[name.decode()]) is type(f["old"].attrs["v"])
            assert f["new"].attrs[name.decode()] == f["old"].attrs["v"]
        assert sorted(f["new"].attrs) == ["v", "w"]


def test_fresh_attributes_are_written_without_lookup_and_never_twice(tmp_path):
    """write_attrs(fresh=True), as a commit uses it on a group it just made: the same attributes as a plain
    write; on a group that already has one of them it fails loudly and leaves the first value, not two."""
    import h5py

    from emotion_attention.cache.common import COMPLETE, write_attrs

    with h5py.File(tmp_path / "a.h5", "w") as f:
        plain, fresh = f.create_group("plain"), f.create_group("fresh")
        for grp, is_fresh in ((plain, False), (fresh, True)):
            write_attrs(grp, {"label": "Happy", "fps": 25.0}, fresh=is_fresh)
            write_attrs(grp, COMPLETE, fresh=is_fresh)
        assert dict(plain.attrs) == dict(fresh.attrs) == {"label": "Happy", "fps": 25.0, "complete": True}
        with pytest.raises(OSError, match="already exists"):
            write_attrs(fresh, {"label": "Sad"}, fresh=True)
        assert dict(fresh.attrs) == {"label": "Happy", "fps": 25.0, "complete": True}


def test_a_batch_of_clips_asks_the_disk_once_and_is_refused_whole(tmp_path, monkeypatch):
    """write_clips checks the free disk once for all its clips' bytes (it asked several times per clip); a batch
    that does not fit is refused before its first byte: none of its clips is written, the earlier ones stay."""
    import shutil

    from emotion_attention.cache import StoreFull
    from emotion_attention.cache.common import FREE_RESERVE, clip_key
    from emotion_attention.cache.faces_store import arrays_nbytes

    clips = [(f"Train/Happy/{i}.mp4", noise_clip(20, seed=i), {"label": "Happy"}) for i in range(4)]
    need = sum(arrays_nbytes(a) for _c, a, _t in clips[1:])
    free = {"bytes": 10**12}
    asked = []

    def disk_usage(path):
        asked.append(path)
        return shutil._ntuple_diskusage(10**13, 10**13 - free["bytes"], free["bytes"])

    with FacesStore(tmp_path / "f.h5", "a", config={"size": 8}, code_version="t") as store:
        monkeypatch.setattr(shutil, "disk_usage", disk_usage)
        store.write_clips(clips[:1])
        store.write_clips(clips[1:])
        assert len(asked) == 2
        free["bytes"] = FREE_RESERVE + need  # room for one clip of three, not for the 5 % margin of all three
        with pytest.raises(StoreFull, match="not enough free disk"):
            store.write_clips([(f"Test/Sad/{i}.mp4", a, t) for i, (_c, a, t) in enumerate(clips[1:])])
        free["bytes"] = 10**12
        store.write_clips([("Test/Sad/after.mp4", *clips[0][1:])])  # the budget ended with the refused batch
        assert len(asked) == 4
    with FacesStore(tmp_path / "f.h5") as store:
        assert sorted(store.complete_ids()) == sorted([c for c, _a, _t in clips] + ["Test/Sad/after.mp4"])
        assert not any(clip_key(f"Test/Sad/{i}.mp4") in store._f for i in range(3))  # not even a group


def test_a_short_clip_written_whole_takes_chunks_no_longer_than_itself(tmp_path):
    """A 3-frame clip's meta data sets are chunked at 3 rows (a 256-row chunk of landmarks took 139 KB, most
    of the clip's bytes); a clip written in pieces keeps the long chunks it grows into."""
    from emotion_attention.cache.common import clip_key
    from emotion_attention.cache.faces_store import META_CHUNK

    arrays = face_arrays(3)
    with FacesStore(tmp_path / "f.h5", "a", config={"size": 8}, code_version="t") as store:
        store.write_clip("Train/Happy/short.mp4", arrays, {"label": "Happy"})
        writer = store.begin_clip("Train/Happy/streamed.mp4", 8)
        writer.append(arrays)
        writer.commit({"label": "Happy"})
    with FacesStore(tmp_path / "f.h5") as store:
        short, streamed = (store._f[clip_key(c)] for c in ("Train/Happy/short.mp4", "Train/Happy/streamed.mp4"))
        assert short["landmarks"].chunks == (3, 68, 2) and streamed["landmarks"].chunks == (META_CHUNK, 68, 2)
        assert short["landmarks"].id.get_storage_size() < 2000 < streamed["landmarks"].id.get_storage_size()
        for cid in ("Train/Happy/short.mp4", "Train/Happy/streamed.mp4"):
            np.testing.assert_array_equal(store.read_faces(cid), arrays["faces"])
            np.testing.assert_array_equal(store.read_meta(cid)["landmarks"], arrays["landmarks"])


@pytest.mark.parametrize("data", [np.array([True, False, True]), np.arange(12, dtype=np.float32).reshape(3, 4),
                                  np.zeros((0, 4), np.int32), np.array(7.5)])
def test_whole_reads_match_h5py(tmp_path, data):
    import h5py

    from emotion_attention.cache.common import read_checked, read_whole

    with h5py.File(tmp_path / "r.h5", "w") as f:
        ds = f.create_dataset("x", data=data)
        for got in (read_whole(ds), read_checked(ds)):
            assert got.dtype == ds[()].dtype and got.shape == ds[()].shape
            np.testing.assert_array_equal(got, ds[()])
