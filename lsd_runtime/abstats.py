"""Statistics of `luna ab`: per-arm means with bootstrap 95% intervals, paired differences to a baseline.

Pure numpy. The bootstrap resamples crops (the unit that varies), with a fixed seed so the same
results give the same intervals; paired differences use only crops scored under both arms.
"""
from __future__ import annotations

import numpy as np

N_BOOT = 2000


def bootstrap_ci(values, n_boot: int = N_BOOT, seed: int = 0, level: float = 0.95) -> tuple[float, float, float]:
    """(mean, low, high): the mean of `values` and the percentile bootstrap interval of the mean."""
    x = np.asarray([v for v in values if v is not None and np.isfinite(v)], dtype=np.float64)
    if len(x) == 0:
        return float("nan"), float("nan"), float("nan")
    if len(x) == 1:
        return float(x[0]), float(x[0]), float(x[0])
    rng = np.random.default_rng(seed)
    means = x[rng.integers(0, len(x), (int(n_boot), len(x)))].mean(axis=1)
    a = (1.0 - level) / 2.0
    return float(x.mean()), float(np.quantile(means, a)), float(np.quantile(means, 1.0 - a))


def paired(a: dict, b: dict) -> tuple[list[float], list[float]]:
    """Values of the crops present (and finite) in both {crop: value} maps, in crop order."""
    keys = [k for k in a if k in b and a[k] is not None and b[k] is not None
            and np.isfinite(a[k]) and np.isfinite(b[k])]
    return [a[k] for k in keys], [b[k] for k in keys]


def summarise(results: list[dict], metrics: list[str], baseline: str = "none", seed: int = 0) -> dict:
    """{arm: {metric: {mean, low, high, n, diff: {mean, low, high, n} (vs baseline)}}}.

    `results` rows carry "crop", "arm" and the metric values (None where not measured).
    """
    table: dict[str, dict[int, dict]] = {}
    for r in results:
        table.setdefault(r["arm"], {})[r["crop"]] = r
    out: dict = {}
    for arm, rows in table.items():
        out[arm] = {}
        for m in metrics:
            vals = {c: r.get(m) for c, r in rows.items()}
            present = [v for v in vals.values() if v is not None and np.isfinite(v)]  # n counts what the interval uses
            if not present:
                continue
            mean, lo, hi = bootstrap_ci(present, seed=seed)
            entry = {"mean": mean, "low": lo, "high": hi, "n": len(present)}
            if baseline in table and arm != baseline:
                base = {c: r.get(m) for c, r in table[baseline].items()}
                xa, xb = paired(vals, base)
                if xa:
                    d = np.asarray(xa) - np.asarray(xb)
                    dm, dl, dh = bootstrap_ci(d, seed=seed)
                    entry["diff"] = {"mean": dm, "low": dl, "high": dh, "n": len(d)}
            out[arm][m] = entry
    return out


def fmt(entry: dict | None, digits: int = 3) -> str:
    """`0.812 [0.790, 0.833]` (or `-` when missing)."""
    if not entry or not np.isfinite(entry.get("mean", float("nan"))):
        return "-"
    return f"{entry['mean']:.{digits}f} [{entry['low']:.{digits}f}, {entry['high']:.{digits}f}]"
