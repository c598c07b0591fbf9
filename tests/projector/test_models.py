"""Projector networks: parameter budget, closed-form ridge, architecture specs."""
from __future__ import annotations

import pytest
import torch

from projector import models


def test_learned_query_decoder_at_full_size_is_within_the_30m_budget():
    net = models.LearnedQueryDecoder(in_dim=1024, cond_dim=2048)  # conf/model/queries.yaml defaults
    n = models.count_parameters(net)
    assert 10_000_000 < n <= 30_000_000
    # the seed MLP at the same size is ~20x that (its last layer alone: 4096 * 77 * 2048 weights)
    seed_last = 4096 * 77 * 2048 + 77 * 2048
    assert seed_last > 20 * n


def test_query_decoder_shares_one_output_layer_across_positions():
    net = models.LearnedQueryDecoder(in_dim=8, cond_dim=6, width=16, depth=1, heads=2)
    assert net.out.weight.shape == (6, 16)  # one Linear(width -> C) for all 77 queries
    cond, pooled = net(torch.randn(3, 8))
    assert cond.shape == (3, 77, 6) and pooled is None


def test_query_decoder_attends_to_vision_tokens():
    net = models.LearnedQueryDecoder(in_dim=12, cond_dim=6, width=16, depth=1, heads=2, num_tokens=5)
    assert net.input_kind == "tokens"
    assert net(torch.randn(2, 5, 12))[0].shape == (2, 77, 6)
    with pytest.raises(ValueError, match="tokens"):
        net(torch.randn(2, 12))


def test_seed_mlp_has_the_seed_shape():
    net = models.SeedMLP(in_dim=8, cond_dim=6, hidden=(16, 32))
    kinds = [type(m).__name__ for m in net.encoder] + [type(m).__name__ for m in net.decoder]
    assert kinds == ["Linear", "LayerNorm", "GELU", "Linear", "LayerNorm", "GELU", "Linear", "Unflatten"]
    assert net.decoder[0].out_features == 77 * 6
    assert net(torch.randn(2, 8))[0].shape == (2, 77, 6)


def test_ridge_recovers_a_linear_map_in_closed_form():
    torch.manual_seed(0)
    d, c, p, seq = 6, 4, 3, 5
    w = torch.randn(d, (seq - 1) * c + p)
    x = torch.randn(200, d)
    y = x @ w + 0.5
    cond = torch.cat([torch.zeros(200, 1, c), y[:, : (seq - 1) * c].reshape(200, seq - 1, c)], dim=1)
    ridge = models.RidgeProjector(d, c, p, seq_len=seq, lam=1e-6)
    for chunk in range(0, 200, 64):  # streamed: sufficient statistics over batches
        ridge.accumulate(x[chunk:chunk + 64], cond[chunk:chunk + 64], y[chunk:chunk + 64, (seq - 1) * c:])
    ridge.solve()
    pred_cond, pred_pooled = ridge(x[:10])
    torch.testing.assert_close(pred_cond[:, 1:], cond[:10, 1:], atol=1e-3, rtol=1e-3)
    torch.testing.assert_close(pred_pooled, y[:10, (seq - 1) * c:], atol=1e-3, rtol=1e-3)


def test_build_fills_data_dims_and_rejects_unknown_specs():
    net = models.build({"_target_": "projector.models.SeedMLP", "hidden": [8, 8]}, in_dim=4, cond_dim=3, pooled_dim=2, seq_len=77)
    assert isinstance(net, models.SeedMLP) and net.decoder[0].in_features == 8
    with pytest.raises(models.ArchitectureError, match="unknown projector architecture"):
        models.build({"_target_": "os.system"}, in_dim=4, cond_dim=3)
    with pytest.raises(models.ArchitectureError, match="takes no argument"):
        models.build({"_target_": "projector.models.SeedMLP", "width": 3}, in_dim=4, cond_dim=3)
