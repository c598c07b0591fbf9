"""vault.blend: neighbour weights and the linear / concat blends."""
from __future__ import annotations

import numpy as np
import pytest

from vault.blend import blend_concat, blend_linear, neighbour_weights


def test_weights_and_blends():
    valid = np.array([[True, True, False]])
    w = neighbour_weights(np.array([[0.9, 0.8, 0.0]]), valid, "softmax", 0.05)
    assert w[0, 2] == 0 and w[0, 0] > w[0, 1] and w.sum() == pytest.approx(1)
    assert neighbour_weights(np.array([[0.9, 0.1, 0.0]]), valid, "mean").tolist() == [[0.5, 0.5, 0.0]]
    user, ret = np.ones((2, 77, 8), np.float32), np.zeros((1, 77, 8), np.float32)
    assert float(blend_linear(user, ret, 0.25).mean()) == pytest.approx(0.75)
    cond, pooled = blend_concat(user, ret, user_pooled="p")
    assert tuple(cond.shape) == (2, 154, 8) and pooled == "p" and float(cond[:, 77:].abs().sum()) == 0
