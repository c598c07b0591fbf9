"""Losses and metrics: BOS excluded, padding weighted apart, halves balanced, retrieval and baselines."""
from __future__ import annotations

import torch

from projector import metrics


def test_bos_is_excluded_and_padding_has_its_own_weight():
    torch.manual_seed(0)
    target = torch.randn(2, 77, 6)
    n_content = torch.tensor([5, 10])
    pred = target.clone()
    pred[:, 0] += 100.0  # a wrong BOS costs nothing
    assert metrics.sequence_loss(pred, target, n_content, split=2)["loss"].item() < 1e-6
    pad_wrong = target.clone()
    pad_wrong[:, 20:] += 1.0  # only padding positions wrong
    light = metrics.sequence_loss(pad_wrong, target, n_content, split=2, pad_weight=0.1)
    heavy = metrics.sequence_loss(pad_wrong, target, n_content, split=2, pad_weight=1.0)
    assert light["content"].item() < 1e-6 and light["pad"].item() > 0
    assert torch.isclose(heavy["loss"], 10 * light["loss"])


def test_each_encoder_half_counts_equally_whatever_its_width():
    target = torch.zeros(1, 77, 10) + 1.0
    n = torch.tensor([77])
    small_half_wrong, big_half_wrong = target.clone(), target.clone()
    small_half_wrong[..., :2] += 1.0  # the 2-wide half
    big_half_wrong[..., 2:] += 1.0  # the 8-wide half
    a = metrics.sequence_loss(small_half_wrong, target, n, split=2, cos_weight=0)["loss"]
    b = metrics.sequence_loss(big_half_wrong, target, n, split=2, cos_weight=0)["loss"]
    assert torch.isclose(a, b)


def test_content_and_pad_cosines_use_the_right_positions():
    target = torch.randn(1, 77, 4)
    pred = target.clone()
    pred[:, 3:] = -target[:, 3:]  # positions 1, 2 right; 3.. (pad) opposite
    content, pad = metrics.content_pad_cosine(pred, target, torch.tensor([3]))
    assert torch.isclose(content, torch.ones(1)).all() and torch.isclose(pad, -torch.ones(1)).all()
    _, no_pad = metrics.content_pad_cosine(pred, target, torch.tensor([77]))
    assert no_pad.isnan().all()


def test_recall_at_1_and_shuffled_pairs():
    torch.manual_seed(0)
    targets = torch.nn.functional.normalize(torch.randn(5, 8), dim=1)
    prompt = torch.tensor([0, 1, 2, 3, 4, 0])
    target = targets[prompt]
    assert metrics.recall_at_1(target, target, prompt) == 1.0
    assert metrics.recall_at_1(target[torch.tensor([1, 2, 3, 4, 0, 1])], target, prompt) == 0.0
    other, differ = metrics.shuffled_pairs(prompt)
    assert (other == torch.tensor([1, 2, 3, 4, 5, 0])).all()
    assert differ.tolist() == [True, True, True, True, True, False]  # sample 5 rolls onto prompt 0 again
    _, same = metrics.shuffled_pairs(torch.tensor([7, 7, 8]))
    assert same.tolist() == [False, True, True]
