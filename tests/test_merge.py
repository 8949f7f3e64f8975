"""`emo-cache merge`: shards of features stores join into the store one unsharded run writes; shards that
differ (settings, kind, a shared clip) are refused naming what differs. (Faces shards: test_faces_scale.py.)"""
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from emotion_attention.cache import FacesStore, FeaturesStore, StoreError, StoreMismatch
from emotion_attention.cache.merge import merge_stores
from emotion_attention.cli.emo_cache import main

from test_extract import cfg, make_faces_store

pytestmark = pytest.mark.filterwarnings("ignore:backbone weights are random")


def read_features(path: Path) -> dict:
    with FeaturesStore(path) as store:
        return {"provenance": store.provenance, "class_names": store.class_names,
                "clips": {cid: (*store.read_clip(cid), store.attrs(cid)) for cid in store.complete_ids()}}


@pytest.fixture(scope="module")
def features_runs(samples_dir, tmp_path_factory):
    """One unsharded extract and its two --shard runs, from the same faces store."""
    from emotion_attention.pipeline.stages.extract import extract_features

    tmp = tmp_path_factory.mktemp("merge")
    make_faces_store(tmp / "faces.h5", samples_dir, n_clips=7, frames=5)  # shard 0 of 2: clip 6
    extract_features(tmp / "faces.h5", tmp / "whole.h5", cfg(), log=lambda *_: None)
    shards = [tmp / f"feats.{k}.h5" for k in range(2)]
    for k, path in enumerate(shards):
        extract_features(tmp / "faces.h5", path, cfg(shard=f"{k}/2"), log=lambda *_: None)
    return tmp, shards


def test_features_shards_merge_to_the_unsharded_store(features_runs):
    tmp, shards = features_runs
    with FeaturesStore(shards[0]) as a, FeaturesStore(shards[1]) as b:
        assert a.complete_ids() and b.complete_ids() and not set(a.complete_ids()) & set(b.complete_ids())
    result = CliRunner().invoke(main, ["merge", str(tmp / "merged.h5"), *map(str, shards)])
    assert result.exit_code == 0, result.output
    assert "7 clip(s) copied" in result.output
    merged, whole = read_features(tmp / "merged.h5"), read_features(tmp / "whole.h5")
    assert merged["provenance"] == whole["provenance"] and merged["class_names"] == whole["class_names"]
    assert sorted(merged["clips"]) == sorted(whole["clips"])
    for cid, (maps, present, attrs) in whole["clips"].items():
        m_maps, m_present, m_attrs = merged["clips"][cid]
        assert np.array_equal(m_maps, maps) and np.array_equal(m_present, present), cid
        assert m_attrs == attrs
    with FeaturesStore(tmp / "merged.h5") as store:
        assert "shard" not in store._f.attrs  # the merged store is whole


def test_shards_with_other_settings_are_refused_naming_the_setting(features_runs, tmp_path):
    from emotion_attention.pipeline.stages.extract import extract_features

    tmp, shards = features_runs
    odd = tmp_path / "odd.h5"
    extract_features(tmp / "faces.h5", odd, cfg(shard="1/2", seed=1), log=lambda *_: None)
    with pytest.raises(StoreMismatch, match=r"weights.*random:0.*random:1"):
        merge_stores(tmp_path / "out.h5", [shards[0], odd], log=lambda *_: None)
    assert not (tmp_path / "out.h5").exists()


def test_a_clip_in_two_shards_is_refused(features_runs, tmp_path):
    _, shards = features_runs
    with pytest.raises(StoreMismatch, match="is in both"):
        merge_stores(tmp_path / "out.h5", [shards[0], shards[0]], log=lambda *_: None)


def test_faces_and_features_stores_do_not_merge(features_runs, tmp_path):
    tmp, shards = features_runs
    with pytest.raises(StoreMismatch, match="only stores of one kind merge"):
        merge_stores(tmp_path / "out.h5", [tmp / "faces.h5", shards[0]], log=lambda *_: None)
    with pytest.raises(StoreError, match="also given as a shard"):
        merge_stores(shards[0], [shards[0], shards[1]], log=lambda *_: None)


def test_faces_shards_with_other_config_are_refused(tmp_path):
    for name, size in (("a.h5", 32), ("b.h5", 64)):
        FacesStore(tmp_path / name, "a", config={"face": {"size": size}}, shard="0/2").close()
    result = CliRunner().invoke(main, ["merge", str(tmp_path / "out.h5"), str(tmp_path / "a.h5"),
                                       str(tmp_path / "b.h5")])
    assert result.exit_code == 1 and "config.face.size: a.h5 has 32, b.h5 has 64" in result.output
    assert "Traceback" not in result.output
