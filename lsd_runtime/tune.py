"""`luna ab tune=true`: per-category retrieval settings searched on a held-out part of the crops.

The crops are split (seeded) into a search part (`tune_fraction`) and an evaluation part. Each
crop is routed as the runtime routes it (its label through `retrieval.routes`); for every category
present, the candidates of `tune_grid` (weight x k x weighting x temperature; all of them, or
`tune_trials` Optuna TPE trials) refine that category's search crops with the vault arm and are
scored by `tune_metric`; crops without a category route tune the `default` entry. The best
settings go to OUT/category_settings.json, which `luna refine retrieval.settings=FILE` reads. The
evaluation crops are then refined with `vault` (the global settings) and `vault_tuned` (the
file), so the comparison is on crops the search never saw.
"""
from __future__ import annotations

import itertools
import logging
from dataclasses import asdict

import numpy as np

from lsd_runtime.categories import DEFAULT_ROUTES, CategorySettings, CategoryTable

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


def tune_categories(ctx, c: dict, crops: list, oracle, text_fn, out) -> dict:
    from lsd_runtime.arms import Arm, refine_crops, score

    metric = tune_metric(c, oracle, text_fn)
    ret = dict(ctx.ret)
    known = list(ctx.vault.info().get("categories") or [])
    routes = {lab: cat for lab, cat in {**DEFAULT_ROUTES, **(ret.get("routes") or {})}.items() if cat in known}
    table = CategoryTable(routes=routes, default=CategorySettings.from_dict(
        {"weight": ret.get("weight", 0.5), "k": ret.get("k", 8), "weighting": ret.get("weighting", "mean"),
         "temperature": ret.get("temperature", 0.05)}, "retrieval"))
    search, held = split_crops(len(crops), float(c.get("tune_fraction", 0.5)), int(c["seed"]))
    groups: dict[str, list[int]] = {}
    for i in search:
        cat = table.route(crops[i].label, known)
        groups.setdefault(cat if cat in known else DEFAULT, []).append(i)
    cands = candidates(c.get("tune_grid") or {})
    arm = Arm("vault_tune", memory="vault")
    prompt = c.get("prompt")

    def objective(cat: str, s: CategorySettings) -> float:
        idx = groups[cat]
        sub = [crops[i] for i in idx]
        trial = CategoryTable(routes=dict(table.routes), default=table.default, categories=dict(table.categories))
        if cat == DEFAULT:
            trial.default = s
        else:
            trial.categories[cat] = s
        r = {**ret, "settings": None, "category": "route", "routes": trial.routes,
             "weight": trial.default.weight, "k": trial.default.k, "weighting": trial.default.weighting,
             "temperature": trial.default.temperature,
             "per_category": {k: asdict(v) for k, v in trial.categories.items()}}
        refined, _, _ = refine_crops(ctx, arm, sub, prompt, r)
        vals = [v.get(metric) for v in score(ctx, sub, refined, oracle, text_fn,
                                              [cr.prompt if prompt is None else prompt for cr in sub])]
        vals = [v for v in vals if v is not None and np.isfinite(v)]
        if not vals:
            raise ValueError(f"tune_metric={metric}: not measured on these crops (set oracle=, or tune_metric=cos_in)")
        return float(np.mean(vals))

    evidence: dict = {"metric": metric, "method": c.get("tune_method", "grid"), "search_indices": search,
                      "eval_indices": held, "candidates": len(cands), "categories": {}}
    from tqdm.auto import tqdm

    for cat in sorted(groups):
        base = objective(cat, table.settings_for(None if cat == DEFAULT else cat))
        if str(c.get("tune_method", "grid")) == "optuna":
            best, best_val, tried = _optuna(lambda s: objective(cat, s), cands, int(c.get("tune_trials", 20)),
                                            int(c["seed"]))
        else:
            tried = [(s, objective(cat, s)) for s in tqdm(cands, desc=f"luna ab: tune {cat}", unit="setting")]
            best, best_val = max(tried, key=lambda t: t[1])
        if best_val <= base:  # keep the global setting unless the search found better on the search crops
            best, best_val = table.settings_for(None if cat == DEFAULT else cat), base
        if cat == DEFAULT:
            table.default = best
        else:
            table.categories[cat] = best
        evidence["categories"][cat] = {"n": len(groups[cat]), "default_score": base, "best_score": best_val,
                                       "best": asdict(best), "tried": len(tried)}
    table.tuned = evidence
    path = table.write(out / "category_settings.json")
    held_crops = [crops[i] for i in held]
    tuned_arm = Arm("vault_tuned", memory="vault")
    tuned_arm.ret = {**ret, "settings": str(path), "category": "route"}
    return {**evidence, "settings_file": str(path), "eval_crops": held_crops, "arms": [tuned_arm]}


def _optuna(objective, cands: list[CategorySettings], trials: int, seed: int):
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(direction="maximize", sampler=optuna.samplers.TPESampler(seed=seed))
    tried = []

    def f(trial):
        s = cands[trial.suggest_categorical("candidate", list(range(len(cands))))]
        v = objective(s)
        tried.append((s, v))
        return v

    study.optimize(f, n_trials=min(trials, len(cands) * 2))
    best = max(tried, key=lambda t: t[1])
    return best[0], best[1], tried
