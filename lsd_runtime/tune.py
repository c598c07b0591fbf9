"""`luna ab tune=true`: per-category retrieval settings searched on a held-out part of the crops.

The crops are split (seeded) into a search part (`tune_fraction`) and an evaluation part. Each
crop is routed as the runtime routes it (its label through `retrieval.routes`); for every category
present, the candidates of `tune_grid` (weight x k x weighting x temperature; all of them, or
`tune_trials` Optuna TPE trials) refine that category's search crops with the vault arm and are
scored by `tune_metric`; crops without a category route tune the `default` entry. The best
settings go to OUT/category_settings.json, which `luna refine retrieval.settings=FILE` reads. The
evaluation crops are then refined with `vault` (the global settings) and `vault_tuned` (the
file), so the comparison is on crops the search never saw.

Which candidate replaces the global setting (`tune_rule`):
  significant  (default) the best candidate, only when its paired gain over the global setting on
               the search crops is significant: its simultaneous one-sided lower bound at level
               1 - `tune_alpha` over all candidates (the best of many noisy candidates looks better than
               it is) is above 0; else the global setting stays.
  best         the best candidate whenever its search score is higher than the global setting's.

The simultaneous bounds are a studentised max-T bootstrap (Westfall & Young; Romano & Wolf): the crops
are resampled together for every candidate, and the critical value is the 1 - alpha quantile of the
largest standardised deviation over the candidates. It holds the family-wise error at alpha like a
Bonferroni correction, but neighbouring settings of a grid (nearly the same refinements) are not
counted as independent tries, so a real gain needs fewer search crops: with 50 copies of one candidate
the bound is that one candidate's own.
"""
from __future__ import annotations

import itertools
import logging
from dataclasses import asdict

import numpy as np

from lsd_runtime.categories import DEFAULT_ROUTES, CategorySettings, CategoryTable, global_settings

log = logging.getLogger(__name__)
DEFAULT = "default"


def tune_metric(c: dict, oracle, text_fn) -> str:
    m = str(c.get("tune_metric") or "auto")
    if m != "auto":
        return m
    return "oracle_acc" if oracle is not None else "clip_text" if text_fn is not None else "cos_in"


def candidates(grid: dict) -> list[CategorySettings]:
    keys = ("weight", "k", "weighting", "temperature")
    base = asdict(CategorySettings())
    values = [list(grid.get(k) or [base[k]]) for k in keys]
    out, seen = [], set()
    for combo in itertools.product(*values):
        s = CategorySettings.from_dict(dict(zip(keys, combo)), "tune_grid")
        if s.weighting == "mean":
            s.temperature = base["temperature"]  # temperature only matters for softmax: one candidate
        key = tuple(asdict(s).values())
        if key not in seen:
            seen.add(key)
            out.append(s)
    return out


def split_crops(n: int, fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """(search, evaluation) crop indices: a seeded split, at least one crop on each side."""
    if n < 2:
        raise ValueError(f"tune=true needs at least 2 crops (crops.n), got {n}")
    order = np.random.default_rng([seed, 7]).permutation(n)
    k = min(max(1, int(round(fraction * n))), n - 1)
    return sorted(order[:k].tolist()), sorted(order[k:].tolist())


def global_table(ctx) -> tuple[CategoryTable, list[str]]:
    """(the table of the global `retrieval` settings and the vault's routes, the vault's categories)."""
    ret = dict(ctx.ret)
    known = list(ctx.vault.info().get("categories") or [])
    routes = {lab: cat for lab, cat in {**DEFAULT_ROUTES, **(ret.get("routes") or {})}.items() if cat in known}
    return CategoryTable(routes=routes, default=global_settings(ret)), known


def category_scores(ctx, table: CategoryTable, cat: str, s: CategorySettings, crops: list, metric: str, oracle,
                    text_fn, prompt) -> list:
    """Per crop: `metric` of the crop refined by the vault arm with `table`, category `cat` set to `s`
    (None where not measured). Crop i takes noise row i of `crops`, as in every `luna ab` arm."""
    from lsd_runtime.arms import Arm, refine_crops, score

    trial = CategoryTable(routes=dict(table.routes), default=table.default, categories=dict(table.categories))
    if cat == DEFAULT:
        trial.default = s
    else:
        trial.categories[cat] = s
    refined, _, _ = refine_crops(ctx, Arm("vault_tune", memory="vault"), crops, prompt, routed(ctx.ret, trial))
    vals = [v.get(metric) for v in score(ctx, crops, refined, oracle, text_fn,
                                          [cr.prompt if prompt is None else prompt for cr in crops])]
    return [None if v is None or not np.isfinite(v) else float(v) for v in vals]


def routed(ret: dict, table: CategoryTable) -> dict:
    """Retrieval settings that route every crop by its label through `table` (its routes, default and
    per-category settings): what the search scores and what the `vault` arm of a tune=true run uses."""
    return {**ret, "settings": None, "category": "route", "routes": dict(table.routes),
            "weight": table.default.weight, "k": table.default.k, "weighting": table.default.weighting,
            "temperature": table.default.temperature,
            "per_category": {k: asdict(v) for k, v in table.categories.items()}}


def check_settings(c: dict) -> None:
    """Refuse bad tune_* settings before anything is loaded or refined (each error names its key)."""
    from lsd_runtime.arms import METRICS

    m = str(c.get("tune_metric") or "auto")
    if m != "auto" and (m not in METRICS or m == "seconds"):
        raise ValueError(f"tune_metric={m!r}: auto or one of {[x for x in METRICS if x != 'seconds']}")
    rule = str(c.get("tune_rule") or "significant")
    if rule not in RULES:
        raise ValueError(f"tune_rule={rule!r}: one of {list(RULES)}")
    alpha = float(c.get("tune_alpha", 0.05))
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"tune_alpha={alpha}: a level in (0, 1), e.g. 0.05")
    method = str(c.get("tune_method", "grid"))
    if method not in ("grid", "optuna"):
        raise ValueError(f"tune_method={method!r}: grid or optuna")
    fraction = float(c.get("tune_fraction", 0.5))
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"tune_fraction={fraction}: the share of the crops searched, in (0, 1)")
    candidates(c.get("tune_grid") or {})  # every candidate in range (CategorySettingsError names tune_grid)


def tune_categories(ctx, c: dict, crops: list, oracle, text_fn, out) -> dict:
    from lsd_runtime.arms import Arm

    check_settings(c)
    metric = tune_metric(c, oracle, text_fn)
    ret = dict(ctx.ret)
    table, known = global_table(ctx)
    search, held = split_crops(len(crops), float(c.get("tune_fraction", 0.5)), int(c["seed"]))
    groups: dict[str, list[int]] = {}
    for i in search:
        cat = table.route(crops[i].label, known)
        groups.setdefault(cat if cat in known else DEFAULT, []).append(i)
    cands = candidates(c.get("tune_grid") or {})
    prompt = c.get("prompt")

    def objective(cat: str, s: CategorySettings) -> list:
        """Per search crop of `cat`: `metric` of the crop refined with `s` (None where not measured)."""
        vals = category_scores(ctx, table, cat, s, [crops[i] for i in groups[cat]], metric, oracle, text_fn, prompt)
        if all(v is None for v in vals):
            raise ValueError(f"tune_metric={metric}: not measured on these crops (set oracle=, or tune_metric=cos_in)")
        return vals

    rule, alpha = str(c.get("tune_rule") or "significant"), float(c.get("tune_alpha", 0.05))
    evidence: dict = {"metric": metric, "method": c.get("tune_method", "grid"), "rule": rule, "alpha": alpha,
                      "search_indices": search, "eval_indices": held, "candidates": len(cands), "categories": {}}
    from tqdm.auto import tqdm

    chosen: dict[str, CategorySettings] = {}
    for cat in sorted(groups):
        current = table.settings_for(None if cat == DEFAULT else cat)  # the global table's, never a tuned one
        base_vals = objective(cat, current)
        if str(c.get("tune_method", "grid")) == "optuna":
            tried = _optuna(lambda s: objective(cat, s), cands, int(c.get("tune_trials", 20)), int(c["seed"]))
        else:
            tried = [(s, objective(cat, s)) for s in tqdm(cands, desc=f"luna ab: tune {cat}", unit="setting")]
        choice = choose(current, base_vals, tried, rule, alpha, int(c["seed"]))
        chosen[cat] = choice["best"]
        evidence["categories"][cat] = {"n": len(groups[cat]), **choice, "best": asdict(choice["best"]),
                                       "tried": len(tried),
                                       # per search crop (these keys, in order): to re-check the choice or try another rule
                                       "search_scores": {"crops": [crops[i].key for i in groups[cat]], "global": base_vals,
                                                         "candidates": [{**asdict(s), "values": v} for s, v in tried]}}
    baseline = Arm("vault", memory="vault")  # the global settings, routed as the search routed them
    baseline.ret = routed(ret, table)
    for cat, s in chosen.items():  # applied after the loop: every category was searched against the global table
        if cat == DEFAULT:
            table.default = s
        else:
            table.categories[cat] = s
    table.tuned = {**evidence, "categories": {k: {x: y for x, y in e.items() if x != "search_scores"}  # ab.json keeps them
                                              for k, e in evidence["categories"].items()}}
    path = table.write(out / "category_settings.json")
    held_crops = [crops[i] for i in held]
    tuned_arm = Arm("vault_tuned", memory="vault")
    tuned_arm.ret = {**ret, "settings": str(path), "category": "route"}
    evidence.update(search_keys=[crops[i].key for i in search], eval_keys=[cr.key for cr in held_crops])
    return {**evidence, "settings_file": str(path), "eval_crops": held_crops, "arms": [baseline, tuned_arm]}


RULES = ("significant", "best")


def _mean(vals) -> float:
    x = [v for v in vals if v is not None]
    return float(np.mean(x)) if x else float("nan")


def choose(current: CategorySettings, base_vals: list, tried: list, rule: str = "significant", alpha: float = 0.05,
           seed: int = 0) -> dict:
    """The setting a category keeps: {best, default_score, best_score, search_best, gain, departed}.

    `base_vals` / each tried candidate's values: the metric per search crop (same crops, same order).
    The top candidate by mean (ties: the earlier one) replaces `current` only if its mean is higher
    and, with rule "significant", the simultaneous lower bound of its paired gain (`max_t_bounds` over
    every tried candidate, one-sided, level 1 - alpha) is above 0. `gain` is that paired gain (mean and
    n over the crops both measured; low / high: the simultaneous bounds, over the crops every candidate
    and the global setting measured)."""
    base = _mean(base_vals)
    top_i, (top, top_vals) = max(enumerate(tried), key=lambda t: _mean(t[1][1])) if tried else (0, (current, base_vals))
    d = [a - b for a, b in zip(top_vals, base_vals) if a is not None and b is not None]
    lo = hi = float("nan")
    if tried:
        rows = [base_vals] + [v for _, v in tried]
        common = [i for i in range(len(base_vals)) if all(r[i] is not None for r in rows)]
        if len(common) > 1:
            b = np.asarray([base_vals[i] for i in common], np.float64)
            diffs = np.asarray([[v[i] for i in common] for _, v in tried], np.float64) - b
            _, lows, highs = max_t_bounds(diffs, alpha, seed=seed)
            lo, hi = float(lows[top_i]), float(highs[top_i])
    better = _mean(top_vals) > base
    departed = better if rule == "best" else bool(better and len(d) > 1 and lo > 0)
    return {"best": top if departed else current, "default_score": base,
            "best_score": _mean(top_vals) if departed else base, "search_best": {**asdict(top), "score": _mean(top_vals)},
            "gain": {"mean": _mean(d), "low": lo, "high": hi, "n": len(d), "level": 1.0 - alpha, "one_sided": True,
                     "simultaneous_over": len(tried), "method": "max-T bootstrap"},
            "departed": departed}


def max_t_bounds(diffs, alpha: float = 0.05, n_boot: int = 4000,
                 seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(means, lower bounds, upper bounds) [m]: one-sided simultaneous bounds at level 1 - alpha of the
    mean of each row of `diffs` [m candidates, n crops], by a studentised max-T bootstrap over crops
    (upper: the same critical value above the mean; the critical value is at least the one-sided Student
    t quantile with n - 1 degrees of freedom). Rows with no spread (a candidate that scores as the global
    setting shifted by a constant) bound at their mean."""
    x = np.asarray(diffs, np.float64)
    m, n = x.shape
    means = x.mean(axis=1)
    se = x.std(axis=1, ddof=1) / np.sqrt(n) if n > 1 else np.zeros(m)
    spread = se > 1e-12
    if not spread.any():
        return means, means.copy(), means.copy()
    rng = np.random.default_rng(seed)
    xs, ses = x[spread], se[spread]
    t = np.empty(int(n_boot))
    step = max(1, int(2_000_000 // max(1, xs.size)))  # bootstrap rows per chunk: ~16 MB at a time
    for lo in range(0, len(t), step):
        idx = rng.integers(0, n, (min(step, len(t) - lo), n))
        boot = xs[:, idx].mean(axis=2)  # [m', chunk]
        t[lo : lo + len(idx)] = ((boot - means[spread][:, None]) / ses[:, None]).max(axis=0)
    # Never below one candidate's Student t quantile: with a handful of crops the bootstrap has few distinct
    # resamples and its max-T quantile comes out too small (3 crops: ~1.2 where t(2) gives 2.9).
    from scipy.stats import t as student_t

    c = max(float(np.quantile(t, 1.0 - alpha)), float(student_t.ppf(1.0 - alpha, n - 1)))
    return means, means - c * se, means + c * se


def _optuna(objective, cands: list[CategorySettings], trials: int, seed: int):
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(direction="maximize", sampler=optuna.samplers.TPESampler(seed=seed))
    tried, seen = [], {}

    def f(trial):
        i = trial.suggest_categorical("candidate", list(range(len(cands))))
        if i not in seen:  # TPE suggests a candidate again: its crops were refined already, reuse the scores
            seen[i] = objective(cands[i])
            tried.append((cands[i], seen[i]))
        return _mean(seen[i])

    study.optimize(f, n_trials=min(trials, len(cands) * 2))
    return tried
