"""The quality gate: black, flat and NaN images, and the derived seeds of retries."""
from __future__ import annotations

import numpy as np

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
