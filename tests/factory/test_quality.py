"""The quality gate: black, flat and NaN images, and the derived seeds of retries."""
from __future__ import annotations

import numpy as np
import pytest

from factory import quality


def test_quality_gate_checks():
    rng = np.random.default_rng(1)
    good = rng.random((16, 16, 3)).astype(np.float32)
    assert quality.check_image(good) == []
    assert quality.check_image(np.zeros((16, 16, 3))) == ["black"]
    assert quality.check_image(np.full((16, 16, 3), 0.5)) == ["flat"]
    nan = good.copy()
    nan[3, 3, 1] = np.nan
    assert quality.check_image(nan) == ["nan"]
    assert quality.check_finite(np.array([1.0, np.inf])) == ["nan"]
    assert quality.check_image((good * 255).astype(np.uint8)) == []
    assert quality.check_image(np.zeros((4, 4, 3)), quality.QualityConfig(enabled=False)) == []
    seeds = [quality.derive_seed(7, a) for a in range(4)]
    assert seeds[0] == 7 and len(set(seeds)) == 4 and all(0 <= s < 2**32 for s in seeds)
    assert seeds == [quality.derive_seed(7, a) for a in range(4)]


def _result(passed_attempts=(), rejected_attempts=()):
    """A worker result: kept samples with their attempt counts, rejected ones with their reasons."""
    return {"samples": [{"key": f"k{i}", "quality": quality.flags([["flat"]] * (a - 1) + [[]])}
                        for i, a in enumerate(passed_attempts)],
            "rejected": [{"key": f"r{i}", "reasons": [["flat"]] * a} for i, a in enumerate(rejected_attempts)]}


def test_poison_guard_judges_each_checkpoint_over_its_first_units():
    g = quality.PoisonGuard(0.2, window=2)
    assert quality.gate_counts(_result([1, 2], [3]))[:2] == (6, 4)  # every attempt counts
    assert not g.observe("bad", _result([], [2, 2]))  # one unit: not judged yet
    assert g.observe("bad", _result([2], [2]))  # 7 of 8 images failed over 2 units: stopped
    h = g.health["bad"]
    assert h.stopped and (h.checks, h.failed) == (8, 7) and "7 of 8 images failed the quality gate (flat 7)" in h.reason
    assert not g.observe("bad", _result([], [2]))  # already stopped: said once
    # a healthy checkpoint with an occasional retry stays; after the window nothing is judged any more
    assert not g.observe("ok", _result([1, 1, 1, 2])) and not g.observe("ok", _result([1, 1, 1, 1]))
    assert not g.observe("ok", _result([], [2, 2, 2])) and not g.health["ok"].stopped
    assert set(g.stopped()) == {"bad"}
    # fewer units than the window: judged on all of them; rate None never stops
    short = quality.PoisonGuard(0.2, window=4, totals={"one": 1})
    assert short.observe("one", _result([], [1]))
    assert not quality.PoisonGuard(None, window=1).observe("x", _result([], [3]))


def test_poison_settings_are_checked():
    assert quality.QualityConfig.from_cfg({"poison_rate": None}).poison_rate is None
    with pytest.raises(ValueError, match="poison_rate"):
        quality.QualityConfig.from_cfg({"poison_rate": 1.5})
    with pytest.raises(ValueError, match="poison_window"):
        quality.QualityConfig.from_cfg({"poison_window": 0})


def test_gate_decides_as_on_a_float32_copy_for_any_layout():
    # the gate reads a contiguous float32 image without copying it: the decision of the check it replaced (on
    # `astype(float32)`, a copy), near both thresholds and for other float types and layouts
    def on_copy(image, cfg=quality.QualityConfig()):
        x = image.astype(np.float32)
        return ["black"] if float(x.mean()) < cfg.black_mean else ["flat"] if float(x.std()) < cfg.flat_std else []

    images = [np.full((12, 10, 3), v, np.float32) for v in (0.0199, 0.02, 0.0201)]  # about the black mean
    for d in (0.0099, 0.01, 0.0101):  # half the pixels 0.5 - d, half 0.5 + d: std about the flat threshold
        images.append(np.where(np.arange(12 * 10 * 3).reshape(12, 10, 3) % 2, 0.5 + d, 0.5 - d).astype(np.float32))
    assert [on_copy(a) for a in images] == [["black"], ["black"], ["flat"], ["flat"], ["flat"], []]  # float32 edges
    for a in images:
        for layout in (a, np.asfortranarray(a), a[::2], a.astype(np.float64), a.astype(np.float16)):
            assert quality.check_image(layout) == on_copy(layout), (a.flat[:2], layout.dtype)
