"""`luna ab tune=true`'s choice of a category's setting (lsd_runtime.tune.choose): the significant rule
keeps the global setting on noise-level gains and departs on consistent ones; the best rule takes any gain."""
from __future__ import annotations

import numpy as np
import pytest

from lsd_runtime.categories import CategorySettings
from lsd_runtime.tune import candidates, choose, max_t_bounds

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
    assert sig["gain"]["low"] <= 0 < sig["gain"]["mean"]
    assert sig["gain"]["level"] == pytest.approx(0.95) and sig["gain"]["simultaneous_over"] == 24
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


def test_copies_of_one_candidate_cost_no_extra_margin_but_independent_candidates_do():
    """The max-T bound of 40 identical candidates is the single candidate's; 40 independent candidates
    widen it (the critical value grows with the number of independent tries, as a Bonferroni one would)."""
    rng = np.random.default_rng(3)
    gain = rng.normal(0.05, 0.2, 48)
    one = max_t_bounds(gain[None, :], seed=0)
    copies = max_t_bounds(np.repeat(gain[None, :], 40, axis=0), seed=0)
    assert copies[1] == pytest.approx(np.full(40, one[1][0]))
    independent = np.vstack([gain, rng.normal(0.05, 0.2, (39, 48))])
    wide = max_t_bounds(independent, seed=0)
    c_one = (one[0][0] - one[1][0]) / (gain.std(ddof=1) / np.sqrt(48))
    c_wide = (wide[0][0] - wide[1][0]) / (gain.std(ddof=1) / np.sqrt(48))
    assert 1.4 < c_one < 2.0 and c_wide > c_one + 0.8  # ~1.65 for one one-sided 95% bound, ~3 for 40


def test_significant_rule_holds_its_error_rate_on_correlated_noise_candidates():
    """40 candidates sharing most of their per-crop noise (neighbouring grid settings) and no real gain:
    the significant rule leaves the global setting in at most ~alpha of repeated searches."""
    departed = 0
    for trial in range(60):
        rng = np.random.default_rng(100 + trial)
        base = rng.uniform(0.3, 0.9, 40)
        shared = rng.normal(0, 0.15, 40)
        tried = [(CategorySettings(weight=round(0.02 * (i + 1), 2)),
                  (base + shared + rng.normal(0, 0.03, 40)).tolist()) for i in range(40)]
        departed += choose(GLOBAL, base.tolist(), tried, rule="significant", seed=trial)["departed"]
    assert departed <= 8  # alpha 0.05 of 60 is 3; the bootstrap is approximate at 40 crops


def test_a_gain_shared_by_neighbouring_candidates_is_found_with_fewer_crops_than_bonferroni_needs():
    """A real gain (t = 2.4 on 40 crops) carried by 40 near-identical neighbours: the max-T bound is above 0
    (the rule departs) while a Bonferroni bound over the same 40 candidates (critical value 3.0) is not."""
    rng = np.random.default_rng(7)
    base = rng.uniform(0.3, 0.9, 40)
    z = rng.normal(0, 1, 40)
    shared = 0.076 + 0.2 * (z - z.mean()) / z.std(ddof=1)  # t = 0.076 / (0.2 / sqrt(40)) = 2.4
    tried = [(CategorySettings(weight=round(0.02 * (i + 1), 2)), (base + shared + rng.normal(0, 0.01, 40)).tolist())
             for i in range(40)]
    got = choose(GLOBAL, base.tolist(), tried, rule="significant")
    top = np.asarray(tried[[s.weight for s, _ in tried].index(got["best"].weight)][1]) - base
    from scipy.stats import norm

    bonferroni = top.mean() - norm.ppf(1 - 0.05 / 40) * top.std(ddof=1) / np.sqrt(40)
    assert got["departed"] and got["gain"]["low"] > 0 > bonferroni


def test_a_few_search_crops_are_not_enough_to_leave_the_global_setting():
    """Three crops: the bootstrap's max-T quantile alone would be ~1.2 and bound this gain above 0; the
    Student t floor (t(2) = 2.92) keeps the global setting."""
    base = [0.8, 0.4, 0.8]
    tried = [(CategorySettings(weight=0.5), [0.8, 0.8, 1.0]), (CategorySettings(weight=0.8), list(base))]
    got = choose(GLOBAL, base, tried, rule="significant")
    se = np.std([0.0, 0.4, 0.2], ddof=1) / np.sqrt(3)
    assert not got["departed"] and got["gain"]["low"] == pytest.approx(0.2 - 2.92 * se, abs=0.01)


def test_every_category_is_searched_against_the_global_setting(tmp_path, monkeypatch):
    """A category that sorts after "default" is compared with the global setting, not with the default entry
    tuned before it; the `vault` arm of the evaluation routes by label with the global settings."""
    from types import SimpleNamespace as NS

    import lsd_runtime.tune as tune
    from lsd_runtime.categories import CategoryTable

    vault = NS(info=lambda: {"categories": ["animals", "faces"]})
    ctx = NS(ret={"weight": 0.5, "k": 8}, vault=vault)

    def fake_scores(ctx, table, cat, s, crops, metric, oracle, text_fn, prompt):
        noise = np.random.default_rng(len(crops)).normal(0, 0.01, len(crops))
        if cat == tune.DEFAULT:  # unrouted crops gain from weight 0.9; the categories from nothing
            return list(0.5 + (0.2 if s.weight == 0.9 else 0.0) + noise)
        return list(0.5 + noise)

    monkeypatch.setattr(tune, "category_scores", fake_scores)
    crops = [NS(label=lab, key=f"c{i}") for i, lab in enumerate(["faces", "animals", "cat"] * 20)]
    res = tune.tune_categories(ctx, {"seed": 0, "tune_metric": "cos_in", "tune_grid": {"weight": [0.5, 0.9]}},
                               crops, None, None, tmp_path)
    cats = res["categories"]
    assert cats["default"]["departed"] and not cats["faces"]["departed"] and not cats["animals"]["departed"]
    table = CategoryTable.read(res["settings_file"])
    assert table.default.weight == 0.9 and table.categories["faces"].weight == 0.5
    assert table.categories["animals"].weight == 0.5
    base, tuned = res["arms"]
    assert (base.name, tuned.name) == ("vault", "vault_tuned")
    assert base.ret["category"] == "route" and base.ret["weight"] == 0.5 and not base.ret["per_category"]
    assert cats["faces"]["search_scores"]["crops"] == [k for k in res["search_keys"] if int(k[1:]) % 3 == 0]
    assert sorted(res["search_keys"] + res["eval_keys"], key=lambda k: int(k[1:])) == [c.key for c in crops]


def test_check_settings_names_the_key_at_fault():
    from lsd_runtime.tune import check_settings

    for bad, key in [({"tune_metric": "cosin"}, "tune_metric"), ({"tune_metric": "seconds"}, "tune_metric"),
                     ({"tune_rule": "loose"}, "tune_rule"), ({"tune_alpha": 1.5}, "tune_alpha"),
                     ({"tune_method": "random"}, "tune_method"), ({"tune_fraction": 1.0}, "tune_fraction"),
                     ({"tune_grid": {"weight": [2.0]}}, "tune_grid")]:
        with pytest.raises(ValueError, match=key):
            check_settings(bad)
    check_settings({"tune_metric": "oracle_acc", "tune_rule": "best", "tune_grid": {"k": [1, 4]}})


def test_optuna_refines_each_candidate_once():
    """TPE suggests candidates again; each is refined (scored) once and listed once."""
    from lsd_runtime.tune import _optuna

    cands = candidates({"weight": [0.25, 0.5, 1.0], "k": [4]})
    calls = []

    def objective(s):
        calls.append(s.weight)
        return [s.weight, s.weight]

    tried = _optuna(objective, cands, trials=6, seed=0)
    assert len(calls) == len(set(calls)) == len(tried) <= 3
