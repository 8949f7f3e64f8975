"""Light proof that the mechanism works (the full one is bench/bench_mechanism.py).

Synthetic clips hide the class evidence in 2 of 25 positions of 2 of 8 frames, among distractor
positions that carry random classes. TP+SA must beat the no-attention baselines clearly, its
p(f|S) must rank the evidence frames first, and its attention must peak on the evidence positions.
"""
import pytest

from emotion_attention.cache.features_store import FeaturesStore
from emotion_attention.pipeline.stages.evaluate import evaluate
from emotion_attention.pipeline.data.synthetic import (SyntheticConfig, evidence_scores, read_evidence, write_synthetic_store)
from emotion_attention.pipeline.configs import TrainConfig
from emotion_attention.pipeline.stages.heads import heads_config_for_store, train_heads

DATA = SyntheticConfig(train_clips=320, val_clips=80, frames=8, evidence_frames=2, grid=5, dim=16, seed=0)
TRAIN = TrainConfig(epochs=12, batch_size=16, seed=0)
MODELS = {"tp_sa": {"spatial": "sa", "pooling": "tp"},       # the paper's model (2 heads, reg 1)
          "tp_mean": {"spatial": "mean", "pooling": "tp"},   # no attention
          "avg_mean": {"spatial": "mean", "pooling": "avg"}}  # Table 2's AVG


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    root = tmp_path_factory.mktemp("mechanism")
    store = write_synthetic_store(root / "synthetic.h5", DATA)["path"]
    out = {}
    for name, fields in MODELS.items():
        run = train_heads(store, root / name, TRAIN, heads_config_for_store(store, **fields))
        out[name] = evaluate(store, run["checkpoint_best"], "Val", None, progress=False)
    with FeaturesStore(store) as s:
        evidence = read_evidence(s, s.complete_ids("Val"))
    return out, evidence


def test_attention_and_softmax_pooling_beat_the_baselines_clearly(results):
    metrics, _ = results
    assert metrics["tp_sa"]["accuracy"] >= 0.9
    for baseline in ("tp_mean", "avg_mean"):
        assert metrics["tp_sa"]["accuracy"] >= metrics[baseline]["accuracy"] + 0.3, baseline


def test_frame_weights_rank_the_evidence_frames_first(results):
    metrics, evidence = results
    scores = evidence_scores(metrics["tp_sa"]["records"], evidence)
    assert scores["top_frame_is_evidence"] >= 0.9
    assert scores["frame_mass_on_evidence"] >= 0.8          # 2 of 7 present frames: 0.29 if uniform


def test_attention_peaks_on_the_evidence_positions(results):
    metrics, evidence = results
    scores = evidence_scores(metrics["tp_sa"]["records"], evidence)
    assert scores["attention_peak_on_evidence"] >= 0.9
    assert scores["attention_mass_on_evidence"] >= 0.8 > 10 * scores["uniform_attention_mass"] / 2
