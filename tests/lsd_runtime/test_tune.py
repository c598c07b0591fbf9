"""`luna ab tune=true`'s choice of a category's setting (lsd_runtime.tune.choose): the significant rule
keeps the global setting on noise-level gains and departs on consistent ones; the best rule takes any gain."""
from __future__ import annotations

import numpy as np
import pytest

from lsd_runtime.categories import CategorySettings
from lsd_runtime.tune import candidates, choose

GLOBAL = CategorySettings(weight=0.8, k=5)


def _tried(rng, base, gains):
    """Candidates weight 0.1 .. : per-crop values = base + gain + independent noise."""
    return [(CategorySettings(weight=round(0.1 * (i + 1), 1)), [float(b + g + rng.normal(0, 0.15)) for b in base])
            for i, g in enumerate(gains)]


def test_significant_rule_keeps_the_global_setting_when_every_candidate_is_noise():
    rng = np.random.default_rng(0)
    base = rng.uniform(0.4, 1.0, 32).tolist()
    tried = _tried(rng, base, [0.0] * 24)  # no real difference: the top one is ahead by chance alone
    best_rule = choose(GLOBAL, base, tried, rule="best")
    sig = choose(GLOBAL, base, tried, rule="significant")
    assert best_rule["departed"] and best_rule["best"] is not GLOBAL  # the winner's curse
    assert not sig["departed"] and sig["best"] is GLOBAL and sig["best_score"] == sig["default_score"]
    assert sig["gain"]["low"] <= 0 < sig["gain"]["mean"] and sig["gain"]["level"] == pytest.approx(1 - 0.05 / 24)
    assert sig["search_best"]["score"] == pytest.approx(best_rule["best_score"])


def test_significant_rule_departs_on_a_consistent_gain():
    rng = np.random.default_rng(1)
    base = rng.uniform(0.2, 0.6, 32).tolist()
    tried = _tried(rng, base, [0.0] * 10 + [0.3] + [0.0] * 5)
    got = choose(GLOBAL, base, tried, rule="significant")
    assert got["departed"] and got["best"].weight == pytest.approx(1.1) and got["gain"]["low"] > 0
    assert got["best_score"] > got["default_score"]


def test_no_candidate_better_keeps_the_global_setting_under_both_rules():
    base = [1.0, 0.8, 0.6, 0.4]
    tried = [(CategorySettings(weight=0.2), [v - 0.2 for v in base]), (CategorySettings(weight=0.3), list(base))]
    for rule in ("best", "significant"):
        got = choose(GLOBAL, base, tried, rule=rule)
        assert not got["departed"] and got["best"] is GLOBAL  # a tie is not a gain


def test_unmeasured_crops_are_left_out_of_the_pairs():
    base = [0.5, None, 0.5, 0.5]
    tried = [(CategorySettings(weight=1.0), [0.6, 0.9, None, 0.6])]
    got = choose(GLOBAL, base, tried, rule="best")
    assert got["gain"]["n"] == 2 and got["gain"]["mean"] == pytest.approx(0.1) and got["departed"]


def test_softmax_temperatures_are_candidates_and_mean_ignores_them():
    got = candidates({"weight": [0.5], "k": [4], "weighting": ["mean", "softmax"], "temperature": [0.02, 0.2]})
    assert [(c.weighting, c.temperature) for c in got] == [("mean", 0.05), ("softmax", 0.02), ("softmax", 0.2)]
