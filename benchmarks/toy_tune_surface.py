"""How much per-category tuning of the retrieval settings can win in the toy world, and what a tuner keeps of it.

    python benchmarks/toy_tune_surface.py --work /tmp/toy_ab --crops 96 --json benchmarks/results/toy_tune_surface.json

Every candidate of a grid (blend weight x k x weighting x softmax temperature, lsd_runtime.tune.candidates)
refines the same --crops held-out crops with the vault arm of `luna ab` (lsd_runtime.tune.category_scores:
preset=toy, the toy oracle, the vague user prompt; crop i takes noise row i under every candidate). The crops
are benchmarks/toy_ab.py's tuning crops (held-out renders, seed 5, blurred and faded), the vault is
--work's (toy_ab / toy_loop's make_data; built here with --n samples when absent). From the matrix
[candidate, crop] of oracle accuracy it reports:
  surface     each candidate's mean and its paired difference to the global setting (conf/preset/toy.yaml's
              retrieval: weight 0.8, k 5, mean) with a bootstrap 95% interval over all crops, and the same
              global setting under another noise seed (the sampler's own noise floor);
  tuners      --splits seeded 50/50 splits of the crops into search / evaluation halves (as tune=true splits):
              per rule (lsd_runtime.tune.choose: best, significant) how often it leaves the global setting
              and its held-out gain over the global setting on the evaluation half (mean, quantiles).
The toy world has one vault category ("scenes": the toy campaign's one job), so per-category tuning is
global tuning here; the question is whether any setting beats the default by more than the noise.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

SURFACE_GRID = {"weight": [0.25, 0.5, 0.7, 0.8, 0.9, 1.0], "k": [1, 3, 5, 8, 16], "weighting": ["mean", "softmax"],
                "temperature": [0.02, 0.1]}


def ab_context(args, vault: Path):
    """The `luna ab` context (lsd_runtime.ab.prepare) of benchmarks/toy_ab.py's runs, with `vault`."""
    from lsd_runtime.ab import load_oracle, prepare
    from luna.cli import compose
    from luna.models.toy import models as toy_models
    from luna.settings import plain

    from benchmarks.toy_ab import ORACLE

    c = plain(compose("ab", ["preset=toy"]))
    c.update(checkpoint=str(toy_models.checkpoint_paths(args.weights)["toy-base-flat"]), vault=str(vault),
             oracle=ORACLE, prompt=args.prompt, seed=args.seed)
    c["crops"]["size"] = 32
    c["detail"]["working_size"] = 32
    c["vision"]["weights"] = str(args.weights / toy_models.VISION_FILE.name)
    ctx, _ = prepare(c)
    return ctx, c, load_oracle(ORACLE)


def simulate(matrix, default, default_row, cands, rules, splits: int, fraction: float = 0.5,
             alpha: float = 0.05) -> dict:
    """Per rule: the tuner (lsd_runtime.tune.choose) on `splits` seeded search/evaluation splits of the
    crops; its held-out gain (evaluation half: chosen - default) and how often it left the default."""
    import numpy as np

    from lsd_runtime.tune import choose, split_crops

    m = np.asarray(matrix, float)
    base = np.asarray(default_row, float)
    out = {}
    for rule in rules:
        gains, departed, picks = [], 0, {}
        for sp in range(splits):
            search, held = split_crops(m.shape[1], fraction, sp)
            tried = [(s, m[j, search].tolist()) for j, s in enumerate(cands)]
            ch = choose(default, base[search].tolist(), tried, rule, alpha, sp)
            if ch["departed"]:
                j = next(j for j, s in enumerate(cands) if s is ch["best"])
                departed += 1
                picks[j] = picks.get(j, 0) + 1
                gains.append(float((m[j, held] - base[held]).mean()))
            else:
                gains.append(0.0)
        g = np.asarray(gains)
        out[rule] = {"splits": splits, "departed": departed, "gain_mean": float(g.mean()),
                     "gain_q05": float(np.quantile(g, 0.05)), "gain_q50": float(np.quantile(g, 0.5)),
                     "gain_q95": float(np.quantile(g, 0.95)), "share_positive": float((g > 0).mean()),
                     "share_negative": float((g < 0).mean()),
                     "picks": {str(asdict(cands[j])): n for j, n in sorted(picks.items(), key=lambda t: -t[1])[:5]}}
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, required=True, help="a toy_ab / toy_loop work folder (pairs/, vault/); made if absent")
    ap.add_argument("--weights", type=Path, default=None, help="toy weights folder (default: the committed ones)")
    ap.add_argument("--n", type=int, default=128, help="campaign samples for pairs and vault when --work has none")
    ap.add_argument("--crops", type=int, default=96)
    ap.add_argument("--grid", type=json.loads, default=SURFACE_GRID, help="candidates, JSON (default %(default)s)")
    ap.add_argument("--splits", type=int, default=500, help="simulated search/evaluation splits per tuner rule")
    ap.add_argument("--prompt", default="a shape on a background", help="the user's prompt of every crop")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    os.environ.setdefault("WANDB_MODE", "offline")

    import datetime as dt

    import numpy as np
    import torch
    from tqdm.auto import tqdm

    from demo.toy_quality import degraded_crops
    from benchmarks.toy_loop import make_data
    from demo import toy_quality as tq
    from extraction.pairs import Pairs
    from lsd_runtime.abstats import bootstrap_ci
    from lsd_runtime.tune import candidates, category_scores, global_table
    from luna.models.toy import models as toy_models

    torch.set_num_threads(args.threads)
    args.weights = Path(args.weights or toy_models.WEIGHTS_DIR).resolve()
    t0, cpu0, load = time.perf_counter(), time.process_time(), os.getloadavg()[0]
    work = args.work.resolve()
    if not (work / "vault").exists():
        make_data(work, args.weights, args.n, toy_models.load_vision(weights=args.weights / toy_models.VISION_FILE.name))
    seen = set(Pairs(work / "pairs").prompt_text)
    crops = degraded_crops(tq.held_out_scenes(args.crops, seed=5, exclude_prompts=seen), seed=5)
    ctx, c, oracle = ab_context(args, work / "vault")
    ctx.components.pipe.set_progress_bar_config(disable=True)
    table, known = global_table(ctx)
    cat = table.route(crops[0].label, known)
    cat = cat if cat in known else "default"
    default = table.settings_for(None if cat == "default" else cat)
    cands = [s for s in candidates(args.grid) if asdict(s) != asdict(default)]
    print(f"toy tune surface: {len(crops)} crops, category {cat!r}, global {asdict(default)}, {len(cands)} other "
          f"candidates, load {load:.1f}")

    def run(s, seed_ctx=ctx):
        return category_scores(seed_ctx, table, cat, s, crops, "oracle_acc", oracle, None, args.prompt)

    base = run(default)
    other_seed = run(default, replace(ctx, seed=ctx.seed + 1))
    matrix = [run(s) for s in tqdm(cands, desc="candidates", unit="setting")]
    b = np.asarray(base)

    def diff(row):
        m, lo, hi = bootstrap_ci(np.asarray(row) - b, seed=0)
        return {"mean": m, "low": lo, "high": hi}

    surface = [{"settings": asdict(s), "acc": float(np.mean(r)), "vs_default": diff(r)} for s, r in zip(cands, matrix)]
    surface.sort(key=lambda e: -e["acc"])
    res = {"created": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "load": load,
           "threads": args.threads, "weights": str(args.weights), "work": str(work), "crops": len(crops),
           "category": cat, "prompt": args.prompt, "grid": args.grid, "default": {**asdict(default), "acc": float(b.mean())},
           "default_other_seed": {"acc": float(np.mean(other_seed)), "vs_default": diff(other_seed)},
           "surface": surface,
           "spread": {"best": surface[0]["acc"] - float(b.mean()), "worst": surface[-1]["acc"] - float(b.mean()),
                      "within_1pt": sum(abs(e["acc"] - float(b.mean())) <= 0.01 for e in surface),
                      "ci_above_0": sum(e["vs_default"]["low"] > 0 for e in surface),
                      "ci_below_0": sum(e["vs_default"]["high"] < 0 for e in surface)},
           "tuners": simulate(matrix, default, base, cands, ["best", "significant"], args.splits),
           "matrix": {"candidates": [asdict(s) for s in cands], "values": matrix, "default": base,
                      "default_other_seed": other_seed},
           "command": shlex.join(["python", "benchmarks/toy_tune_surface.py", *(sys.argv[1:] if argv is None else argv)])}
    res["seconds"] = round(time.perf_counter() - t0, 1)
    res["cpu_seconds"] = round(time.process_time() - cpu0, 1)
    d = res["default"]
    print(f"global {d['weight']}/{d['k']}/{d['weighting']}: acc {100 * d['acc']:.1f}; same setting, noise seed +1: "
          f"{100 * res['default_other_seed']['acc']:.1f} (Δ {fmt(res['default_other_seed']['vs_default'])})")
    print("top and bottom candidates (acc %, Δ vs global [95% CI], points):")
    for e in surface[:5] + surface[-3:]:
        print(f"  {e['settings']}: {100 * e['acc']:.1f}  Δ {fmt(e['vs_default'])}")
    sp = res["spread"]
    print(f"spread: best {100 * sp['best']:+.1f}, worst {100 * sp['worst']:+.1f} points; {sp['ci_above_0']} of "
          f"{len(surface)} candidates with the interval above 0, {sp['ci_below_0']} below")
    for rule, t in res["tuners"].items():
        print(f"tuner rule {rule!r} over {t['splits']} splits: left the global setting {t['departed']} times; held-out "
              f"gain mean {100 * t['gain_mean']:+.2f}, 5-95% [{100 * t['gain_q05']:+.1f}, {100 * t['gain_q95']:+.1f}] "
              f"points, >0 in {100 * t['share_positive']:.0f}%, <0 in {100 * t['share_negative']:.0f}%")
    print(f"{res['seconds']:.0f} s, {res['cpu_seconds']:.0f} CPU s")
    if args.json:
        from luna.files import write_json_atomic

        write_json_atomic(args.json, res, default=str)
    return 0


def fmt(d: dict) -> str:
    return f"{100 * d['mean']:+.1f} [{100 * d['low']:+.1f}, {100 * d['high']:+.1f}]"


if __name__ == "__main__":
    sys.exit(main())
