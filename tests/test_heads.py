"""The mathematics of the heads: temporal softmax pooling, attention, penalty, masking, baselines."""
import itertools
import math

import pytest
import torch
import torch.nn.functional as F

from emotion_attention.cache.errors import ConfigError

from emotion_attention.pipeline.configs import POOLING, SPATIAL, HeadsConfig
from emotion_attention.pipeline.models.heads import (EmotionHeads, SpatialAttention, attention_penalty, average_pool, max_pool, softmax_pool)

VARIANTS = list(itertools.product(SPATIAL, POOLING))
D, E = 8, 5


def make_model(spatial, pooling, **kw):
    torch.manual_seed(0)
    return EmotionHeads(HeadsConfig(in_dim=D, num_classes=E, spatial=spatial, pooling=pooling, hidden=6,
                                    lstm_hidden=6, **kw)).eval()


def test_tp_with_frame_constant_scores_is_the_per_frame_softmax():
    torch.manual_seed(1)
    per_frame = torch.randn(3, E)
    scores = per_frame[:, None, :].expand(3, 6, E)                     # (B, F, E), same for every frame
    mask = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 0, 1, 0, 1, 1], [0, 0, 0, 1, 0, 0]], dtype=torch.bool)
    log_p_class, p_frame, p_joint = softmax_pool(scores, mask)
    assert torch.allclose(log_p_class, F.log_softmax(per_frame, dim=1), atol=1e-6)
    # with constant scores every present frame matters equally
    assert torch.allclose(p_frame, mask.float() / mask.sum(1, keepdim=True), atol=1e-6)
    assert torch.allclose(p_joint.sum(1), log_p_class.exp(), atol=1e-6)


def test_tp_probabilities_sum_to_one_and_match_the_joint_softmax():
    torch.manual_seed(2)
    scores = 3 * torch.randn(4, 7, E)
    mask = torch.rand(4, 7) > 0.3
    mask[:, 0] = True
    log_p_class, p_frame, p_joint = softmax_pool(scores, mask)
    assert torch.allclose(log_p_class.exp().sum(1), torch.ones(4), atol=1e-6)
    assert torch.allclose(p_frame.sum(1), torch.ones(4), atol=1e-6)
    b = 1  # Eq. 5 by hand for one clip: softmax over the present (f, c) cells only
    keep = scores[b][mask[b]]
    joint = torch.exp(keep) / torch.exp(keep).sum()
    assert torch.allclose(p_joint[b][mask[b]], joint, atol=1e-6)
    assert torch.allclose(log_p_class[b].exp(), joint.sum(0), atol=1e-6)


def test_tp_gives_masked_frames_zero_weight_and_empty_clips_a_uniform_answer():
    scores = torch.randn(2, 4, E)
    mask = torch.tensor([[1, 0, 1, 0], [0, 0, 0, 0]], dtype=torch.bool)
    log_p_class, p_frame, p_joint = softmax_pool(scores, mask)
    assert p_frame[0, 1] == 0 and p_frame[0, 3] == 0 and p_joint[0, 1].abs().sum() == 0
    assert torch.allclose(log_p_class[1], torch.full((E,), -math.log(E)))
    assert p_frame[1].abs().sum() == 0
    scores.requires_grad_(True)
    softmax_pool(scores, mask)[0].sum().backward()
    assert torch.isfinite(scores.grad).all()


@pytest.mark.parametrize("spatial,pooling", VARIANTS)
def test_masked_and_padded_frames_change_nothing(spatial, pooling):
    model = make_model(spatial, pooling)
    torch.manual_seed(3)
    maps = torch.randn(2, 6, 9, D)
    mask = torch.tensor([[1, 0, 1, 1, 0, 1], [1, 1, 1, 0, 0, 0]], dtype=torch.bool)
    with torch.no_grad():
        out = model(maps, mask)
        garbage = maps.clone()
        garbage[~mask] = 100 * torch.randn(int((~mask).sum()), 9, D)
        out_garbage = model(garbage, mask)
        # the second clip alone, without its three padded frames
        out_short = model(maps[1:, :3], mask[1:, :3])
    assert torch.allclose(out.log_probs, out_garbage.log_probs, atol=1e-5)
    assert torch.allclose(out.frame_weights, out_garbage.frame_weights, atol=1e-6)
    assert (out.frame_weights[~mask] == 0).all()
    assert torch.allclose(out.log_probs[1], out_short.log_probs[0], atol=1e-5)
    assert torch.allclose(out.frame_weights.sum(1), torch.ones(2), atol=1e-5)
    assert torch.allclose(out.penalty, out_garbage.penalty, atol=1e-5)


def test_single_position_attention_is_the_identity():
    attention = SpatialAttention(D, 6, heads=3)
    maps = torch.randn(2, 4, 1, D)                                    # L = 1
    v, attn = attention(maps)
    assert torch.equal(attn, torch.ones(2, 4, 3, 1))
    assert torch.allclose(v, maps[:, :, 0].repeat(1, 1, 3))           # every head returns the descriptor


def test_attention_rows_are_a_softmax_over_positions_and_v_is_their_weighted_sum():
    torch.manual_seed(4)
    attention = SpatialAttention(D, 6, heads=2)
    maps = torch.randn(2, 3, 10, D)
    v, attn = attention(maps)
    logits = attention.w2.weight @ torch.tanh(attention.w1.weight @ maps[1, 2].T)  # Eq. 4 for one frame (heads, L)
    assert torch.allclose(attn[1, 2], logits.softmax(dim=1), atol=1e-6)
    assert torch.allclose(v[1, 2], (attn[1, 2] @ maps[1, 2]).flatten(), atol=1e-5)


def test_penalty_is_zero_for_orthogonal_one_hot_attention_and_exact_otherwise():
    one_hot = torch.zeros(2, 3, 2, 5)
    one_hot[:, :, 0, 1] = 1
    one_hot[:, :, 1, 4] = 1
    mask = torch.ones(2, 3, dtype=torch.bool)
    assert attention_penalty(one_hot, mask).item() == 0.0
    uniform = torch.full((1, 2, 2, 4), 0.25)  # AA^T = 1/4 everywhere: 2 (3/4)^2 + 2 (1/4)^2 = 1.25
    assert attention_penalty(uniform, torch.ones(1, 2, dtype=torch.bool)).item() == pytest.approx(1.25)
    mixed = torch.cat([one_hot[:1, :1], uniform[:, :1, :, :4].new_zeros(1, 1, 2, 5) + 0.2], dim=1)
    # the second frame (uniform over 5) is masked out: only the orthogonal frame counts
    assert attention_penalty(mixed, torch.tensor([[True, False]])).item() == 0.0
    assert attention_penalty(mixed, torch.tensor([[True, True]])).item() == pytest.approx(((0.2 - 1) ** 2 * 2
                                                                                          + 0.2 ** 2 * 2) / 2)


@pytest.mark.parametrize("spatial,pooling", VARIANTS)
def test_gradients_reach_every_parameter(spatial, pooling):
    model = make_model(spatial, pooling).train()
    torch.manual_seed(5)
    maps = torch.randn(3, 5, 9, D)
    mask = torch.ones(3, 5, dtype=torch.bool)
    mask[0, 3:] = False
    total, ce, penalty = model.loss(model(maps, mask), torch.tensor([0, 2, 4]))
    total.backward()
    for name, param in model.named_parameters():
        assert param.grad is not None and param.grad.abs().sum() > 0, f"no gradient reaches {name}"
    assert torch.allclose(total, ce + (model.cfg.reg if spatial == "sa" else 0) * penalty)


@pytest.mark.parametrize("spatial,pooling", VARIANTS)
@pytest.mark.parametrize("frames,positions", [(1, 1), (5, 7), (16, 49)])
def test_shapes_hold_for_any_frames_and_positions(spatial, pooling, frames, positions):
    model = make_model(spatial, pooling, heads=3, shift_clusters=2)
    out = model(torch.randn(2, frames, positions, D), torch.ones(2, frames, dtype=torch.bool))
    assert out.log_probs.shape == (2, E) and out.frame_weights.shape == (2, frames)
    assert out.frame_scores.shape == (2, frames, E) and out.penalty.shape == ()
    units = {"sa": 3, "shift": 2}.get(spatial)
    assert (out.attention is None) if units is None else out.attention.shape == (2, frames, units, positions)
    assert torch.allclose(out.log_probs.exp().sum(1), torch.ones(2), atol=1e-5)


def test_avg_is_the_softmax_of_mean_scores_and_trains_frame_wise():
    model = make_model("mean", "avg")
    maps = torch.randn(2, 4, 9, D)
    mask = torch.tensor([[1, 1, 0, 1], [1, 1, 1, 1]], dtype=torch.bool)
    out = model(maps, mask)
    scores = model.classifier(maps.mean(2))                           # (B, F, E)
    expected = F.log_softmax(torch.stack([scores[0, [0, 1, 3]].mean(0), scores[1].mean(0)]), dim=1)
    assert torch.allclose(out.log_probs, expected, atol=1e-6)
    labels = torch.tensor([2, 0])
    frame_ce = [F.cross_entropy(scores[0, [0, 1, 3]], labels[:1].repeat(3)),
                F.cross_entropy(scores[1], labels[1:].repeat(4))]     # Eq. 7: mean over frames
    assert torch.allclose(model.loss(out, labels)[1], torch.stack(frame_ce).mean(), atol=1e-6)
    # Eq. 7's product of frame probabilities ranks classes like the summed (or averaged) scores
    product = F.log_softmax(scores[1], dim=1).sum(0)
    assert product.argmax() == out.log_probs[1].argmax()


def test_max_pool_takes_each_class_best_present_frame():
    scores = torch.tensor([[[0.0, 5.0], [3.0, 1.0], [9.0, 9.0]]])     # (1, 3, 2); frame 2 masked
    log_probs, weights = max_pool(scores, torch.tensor([[True, True, False]]))
    assert torch.allclose(log_probs, F.log_softmax(torch.tensor([[3.0, 5.0]]), dim=1))
    assert weights.tolist() == [[1.0, 0.0, 0.0]]                      # class 1 wins, from frame 0
    log_avg, w_avg = average_pool(scores, torch.tensor([[True, True, False]]))
    assert torch.allclose(w_avg, torch.tensor([[0.5, 0.5, 0.0]]))


def test_lstm_reads_present_frames_in_time_order():
    model = make_model("mean", "lstm")
    maps = torch.randn(1, 5, 4, D)
    mask = torch.tensor([[True, False, True, True, False]])
    with torch.no_grad():
        out = model(maps, mask)
        compact = model(maps[:, [0, 2, 3]], torch.ones(1, 3, dtype=torch.bool))
        reordered = model(maps[:, [3, 2, 0]], torch.ones(1, 3, dtype=torch.bool))
    assert torch.allclose(out.log_probs, compact.log_probs, atol=1e-6)
    assert torch.allclose(out.frame_scores[0, [0, 2, 3]], compact.frame_scores[0], atol=1e-6)
    assert not torch.allclose(out.log_probs, reordered.log_probs, atol=1e-4)  # order matters to an LSTM


def test_config_errors_name_the_field_and_wrong_channels_are_refused():
    with pytest.raises(ConfigError, match="pooling='mean'"):
        HeadsConfig(pooling="mean")
    with pytest.raises(ValueError, match="D=9 channels"):
        make_model("sa", "tp")(torch.randn(1, 2, 3, 9), torch.ones(1, 2, dtype=torch.bool))


def test_standardisation_buffers_apply_in_forward_and_travel_in_the_state_dict():
    from emotion_attention.pipeline.models.heads import map_statistics

    torch.manual_seed(0)
    maps, mask = 1e3 * torch.rand(2, 5, 4, 6) + 50, torch.ones(2, 5, dtype=torch.bool)
    mean, std = map_statistics([maps.numpy()], 6)
    torch.testing.assert_close(mean, maps.reshape(-1, 6).double().mean(0).float())
    torch.testing.assert_close(std, maps.reshape(-1, 6).double().std(0, unbiased=False).float())
    scaled = EmotionHeads(HeadsConfig(in_dim=6, num_classes=3, hidden=4))
    plain = EmotionHeads(HeadsConfig(in_dim=6, num_classes=3, hidden=4))
    plain.load_state_dict(scaled.state_dict())
    scaled.set_map_statistics(mean, std)
    torch.testing.assert_close(scaled(maps, mask).log_probs, plain((maps - mean) / std, mask).log_probs)
    assert torch.equal(EmotionHeads(scaled.cfg).state_dict()["map_mean"], torch.zeros(6))  # identity by default
    reloaded = EmotionHeads(scaled.cfg)
    reloaded.load_state_dict(scaled.state_dict())
    assert torch.equal(reloaded.map_std, std)
    _, floored = map_statistics([torch.tensor([[1.0, 10.0], [3.0, 10.0]]).numpy()], 2)
    assert floored.tolist() == pytest.approx([1.0, 0.005])       # a constant channel: 1 % of the mean spread (0.5)
