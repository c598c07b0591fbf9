"""Issue 15's targets in the toy world, measured by the real `luna ab` harness (lsd_runtime/ab.py, run_ab).

    python benchmarks/toy_ab.py --work /tmp/toy_ab --n 96 --crops 8 --md /tmp/toy_ab.md       # small
    python benchmarks/toy_ab.py --weights /work/toy_run/weights --json benchmarks/results/toy_ab.json

Data: benchmarks/toy_loop.py's own path (make_data): the toy campaign's first --n samples generated
with toy-base-flat by the factory's generator, written as pairs and built into a vault in --work; the
projectors are trained there with the experiments' own settings (compare_projectors). Every `luna ab`
run uses preset=toy with the --weights checkpoint and tower and oracle=luna.models.toy.oracle:read;
its crops are held-out renders (render seeds the training never drew, prompts not in the pairs),
blurred and faded as toy_loop degrades them (demo.toy_quality.Degrade), truth = the rendered scene.
The user's prompt of every crop is --prompt (a vague one), so `none` is that prompt alone, `generic`
the harness's generic prompt, and the memory arms add the vault / projector to the same vague prompt.
Measures:
  held_out       arms none, generic, vault, projector, hybrid (gate), hybrid_mix on --crops crops;
                 each memory arm's paired difference to `generic` (and to `none`) on oracle accuracy
                 (mean over the five scene attributes) and joint accuracy, bootstrap 95% intervals
                 (lsd_runtime.abstats.summarise).
  interpolation  --combinations held out of everything: a learned-query projector trained with
                 data.val_combinations, a vault built from the same training split only (a pairs
                 folder of the train rows, split by projector.splits.split_keys as `luna train`
                 splits); crops of scenes holding a combination; vault vs projector vs hybrid, and the
                 paired difference projector - vault (and hybrid - vault).
  tuning         `luna ab tune=true` (lsd_runtime/tune.py, the conf's tune_grid) on --tune-crops other
                 held-out crops: `vault_tuned` - `vault` on the evaluation half the search never saw.
  projectors     seed MLP vs learned queries trained on the pairs: val cosine of the content tokens and
                 oracle accuracy of images generated from each one's conditioning for --prompts held-out
                 scenes (toy_quality.projected_generation); the learned-query model's parameter count
                 at full SDXL size (1024-d embedding -> [77,2048] + [1280]) against the 30M target.
Targets (issue 15): vault and projector beat generic on held-out crops with the interval above 0; on
held-out combinations the projector (or hybrid) beats the vault; tuned beats the global default;
learned queries beat the seed MLP on val cosine and oracle accuracy at <= 30M parameters.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.toy_loop import compare_projectors, make_data, queries_minus_mlp, write_memory  # noqa: E402
from demo.toy_quality import DESCRIBED, degraded_crops, described_crops  # noqa: E402

ORACLE = "luna.models.toy.oracle:read"
HELD_OUT_ARMS = ["none", "generic", "vault", "projector", "hybrid", "hybrid_mix"]
COMBO_ARMS = ["generic", "vault", "projector", "hybrid", "hybrid_mix"]
COMBINATIONS = [["red", "circle"], ["blue", "square"], ["green", "triangle"]]
METRICS = ["oracle_acc", "oracle_joint"]
SECTIONS = ["projectors", "held_out", "interpolation", "tuning"]
FULL_DIMS = {"in_dim": 1024, "cond_dim": 2048, "pooled_dim": 1280, "seq_len": 77, "input": "embed"}
PARAMETER_BUDGET = 30_000_000


# ---------------------------------------------------------------------- crops and memories


def combination_scenes(n: int, combinations, seed: int = 0):
    """`n` random scenes whose prompts hold every term of one of `combinations` (projector.splits' rule)."""
    import numpy as np

    from demo import toy_quality as tq
    from luna.models.toy import world
    from projector.splits import has_term

    rng = np.random.default_rng(tq.HELD_OUT_SEED + 500 + int(seed))
    out = []
    for _ in range(1000 * n + 1000):
        s = world.random_scene(rng)
        text = world.prompt(s)
        if any(all(has_term(text, t) for t in combo) for combo in combinations):
            out.append(s)
            if len(out) == n:
                return out
    raise ValueError(f"combination_scenes: fewer than {n} scenes hold one of {combinations}")


def by_label(res, baseline: str, arm: str) -> dict:
    """{label: {n, metric: paired difference arm - baseline}} over the run's crops of each label."""
    from lsd_runtime import abstats

    crops = res.record["crops"]
    out = {}
    for label in sorted({c["label"] for c in crops}):
        idx = {c["index"] for c in crops if c["label"] == label}
        rows = [r for r in res.record["results"] if r["crop"] in idx]
        summary = abstats.summarise(rows, METRICS, baseline=baseline, seed=0)
        out[label] = {"n": len(idx), **{m: (summary.get(arm, {}).get(m) or {}).get("diff") for m in METRICS}}
    return out


def split_memory(data: dict, folder: Path, tower, combinations, val_prompts: float = 0.1, seed: int = 0,
                 split: str = "train") -> dict:
    """FOLDER/pairs and FOLDER/vault holding only the rows of one split of data["pairs"], split exactly as
    `luna train data.val_combinations=...` splits it (projector.splits.split_keys, same val_prompts and
    seed): with split="train", a vault that has seen none of the held-out prompts or combinations."""
    from extraction.pairs import Pairs
    from projector.splits import split_keys

    keep = set(split_keys(data["pairs"], split, combinations=combinations, val_prompts=val_prompts, seed=seed))
    with Pairs(data["pairs"]) as p:
        rows = [i for i, k in enumerate(p.key) if k in keep]
    pairs_dir, vault_dir = write_memory(folder, [data["images"][i] for i in rows], [data["prompts"][i] for i in rows],
                                        [data["seeds"][i] for i in rows], tower, data["comps"], data["ckpt"])
    return {"pairs": pairs_dir, "vault": vault_dir, "rows": rows,
            "combo_rows": len(split_keys(data["pairs"], "val_combo", combinations=combinations,
                                         val_prompts=val_prompts, seed=seed))}


def full_size_parameters(experiment: str) -> int:
    """Parameters of `experiment`'s projector (network + pooled head, conf/train.yaml's) at full SDXL size,
    built on the meta device (no memory, no training)."""
    import torch

    from luna.cli import compose
    from luna.settings import plain
    from projector.export import Projector
    from projector.models import count_parameters

    cfg = plain(compose("train", [f"experiment={experiment}", "logger=none"], {"pairs": "-", "out": "-"}))
    with torch.device("meta"):
        model = Projector({"net": cfg["model"], "pooled_head": cfg["pooled_head"]}, FULL_DIMS)
    return count_parameters(model)


# ---------------------------------------------------------------------- luna ab


def ab(out: Path, crops, args, vault, projector, arms, **overrides):
    """One `luna ab` run (preset=toy, the --weights checkpoint and tower, the toy oracle) on `crops`."""
    from lsd_runtime.ab import run_ab
    from luna.models.toy import models as toy_models

    weights = Path(args.weights)
    return run_ab(out, crops=crops, preset="toy", checkpoint=str(toy_models.checkpoint_paths(weights)["toy-base-flat"]),
                  vault=str(vault) if vault else None, projector=str(projector) if projector else None,
                  oracle=ORACLE, arms=arms, prompt=overrides.pop("prompt", args.prompt), seed=args.seed, crops__size=32,
                  detail__working_size=32, vision__weights=str(weights / toy_models.VISION_FILE.name), **overrides)


def versus(res, baseline: str) -> dict:
    """{arm: {metric: {mean, low, high, n, diff vs baseline}}} of one run's rows."""
    from lsd_runtime import abstats

    return abstats.summarise(res.record["results"], METRICS, baseline=baseline, seed=0)


def interval(d: dict | None, scale: float = 100.0) -> str:
    if not d:
        return "-"
    return f"{scale * d['mean']:+.1f} [{scale * d['low']:+.1f}, {scale * d['high']:+.1f}]"


def arm_rows(title: str, res, baselines: list[str]) -> list[dict]:
    """Per arm: mean oracle accuracy / joint and the paired differences to each baseline."""
    sums = {b: versus(res, b) for b in baselines}
    out = []
    for arm in res.arms:
        s = sums[baselines[0]].get(arm, {})
        e = {"section": title, "arm": arm, "n": (s.get("oracle_acc") or {}).get("n"),
             **{m: (s.get(m) or {}).get("mean") for m in METRICS}}
        for b in baselines:
            for m in METRICS:
                e[f"{m}_vs_{b}"] = (sums[b].get(arm, {}).get(m) or {}).get("diff")
        shares = [r["conditioning"]["hybrid"]["vault_share"] for r in res.record["results"]
                  if r["arm"] == arm and (r.get("conditioning") or {}).get("hybrid")]
        e["vault_share"] = sum(shares) / len(shares) if shares else None  # hybrid arms: how much came from the vault
        out.append(e)
    return out


def projector_refinement(queries, mlp) -> dict:
    """The `projector` arm of two `luna ab` runs on the same crops (same noise rows and seeds), one with the
    learned-query projector, one with the seed MLP: mean oracle accuracy / joint of each and the paired
    bootstrap difference queries - MLP over crops (toy_quality.bootstrap_diff)."""
    import numpy as np

    from demo import toy_quality as tq

    def rows(res, m):
        got = {r["crop"]: r[m] for r in res.record["results"] if r["arm"] == "projector"}
        return np.asarray([got[i] for i in sorted(got)], float)

    out = {"n": len(rows(queries, "oracle_acc"))}
    for m in METRICS:
        q, b = rows(queries, m), rows(mlp, m)
        out[m] = {"learned queries": float(q.mean()), "seed MLP": float(b.mean()), "diff": tq.bootstrap_diff(q, b)}
    return out


def refinement_line(r: dict) -> str:
    a, j = r["oracle_acc"], r["oracle_joint"]
    return (f"acc {100 * a['learned queries']:.1f} vs {100 * a['seed MLP']:.1f}, Δ {paired(a['diff'])}; joint "
            f"{100 * j['learned queries']:.1f} vs {100 * j['seed MLP']:.1f}, Δ {paired(j['diff'])} points ({r['n']} crops)")


def tuning_evidence(t: dict) -> str:
    """Per category: the global setting's and the search's best score on the search crops, the paired gain."""
    out = []
    for cat, e in t["categories"].items():
        top, g = e.get("search_best") or {}, e.get("gain") or {}
        gain = f" (gain {100 * g['mean']:+.1f}, bound {100 * g['low']:+.1f} at {100 * g['level']:.1f}%)" if g else ""
        kept = "tuned" if e.get("departed", True) else "global kept"
        out.append(f"{cat}: {100 * e['default_score']:.1f} → {100 * top.get('score', e['best_score']):.1f}{gain}, {kept}")
    return "; ".join(out)


def print_rows(rows: list[dict], baselines: list[str]) -> None:
    for e in rows:
        diffs = "  ".join(f"vs {b}: acc {interval(e[f'oracle_acc_vs_{b}'])} joint {interval(e[f'oracle_joint_vs_{b}'])}"
                          for b in baselines if e[f"oracle_acc_vs_{b}"])
        share = "" if e["vault_share"] is None else f"  (vault share {e['vault_share']:.2f})"
        print(f"  {e['arm']:<11} acc {100 * e['oracle_acc']:5.1f}  joint {100 * e['oracle_joint']:5.1f}  {diffs}{share}")


# ---------------------------------------------------------------------- report


def markdown(results: dict, command: str) -> str:
    r = results
    lines = ["# benchmarks/toy_ab.py", "",
             f"Weights `{r['weights']}` (commit {r.get('weights_commit') or '-'}), {r['created']}, load {r['load']:.1f}, {r['threads']} torch thread(s), "
             f"{r['seconds']:.0f} s wall, {r['cpu_seconds']:.0f} s CPU ({', '.join(f'{k} {v:.0f} s' for k, v in r['timings'].items())}). Data: {r['data']}.", "",
             f"`{command}`", "",
             "Oracle accuracy (%): `acc` = mean over the five scene attributes, `joint` = all five right; "
             "Δ = paired difference (points) with its bootstrap 95% interval over crops.", "",
             "## Targets (issue 15)", ""] + [f"- {v}" for v in verdicts(r)] + [""]
    if "held_out" in r:
        lines += sections(r)
    if "tuning" in r:
        lines += tuning_section(r)
    if "projectors" in r:
        lines += projector_sections(r)
    return "\n".join(lines) + "\n"


def tuning_section(r: dict) -> list[str]:
    """Markdown of the tuning section (the target's rule first, then the other rules on the same crops)."""
    tu = r["tuning"]
    two = bool(tu.get("by_label"))
    cats = (f"two categories: `{DESCRIBED}` crops ({100 * r.get('tune_described', 0):.0f}%) carry their scene's own "
            "prompt and tune the `default` entry, `scenes` crops the vague prompt" if two
            else "one category, the toy campaign's `scenes`")
    lines = ["", f"## Per-category tuning (`tune=true`, {tu['method']}, metric `{tu['metric']}`, "
              f"{tu['candidates']} candidates, {tu['search']} search / {tu['eval']} evaluation crops; {cats})", "",
              "| tune_rule | settings kept | search: global → search's best (paired gain, one-sided bound) | "
              "`vault_tuned` − `vault` acc | joint |", "|---|---|---|---|---|"]
    for t in [tu, *(r.get("tuning_other_rules") or {}).values()]:
        lines.append(f"| {t.get('rule', 'best')}{' (target)' if t is tu else ''} | {t['best']} | {tuning_evidence(t)} | "
                     f"{interval(t['vs_default'].get('oracle_acc'))} | {interval(t['vs_default'].get('oracle_joint'))} |")
    if two:
        lines += ["", "Per label, on the evaluation crops (`vault_tuned` − `vault`, points):", "",
                  "| tune_rule | label | n | acc | joint |", "|---|---|---|---|---|"]
        for t in [tu, *(r.get("tuning_other_rules") or {}).values()]:
            for label, d in (t.get("by_label") or {}).items():
                lines.append(f"| {t.get('rule', 'best')} | {label} | {d['n']} | {interval(d['oracle_acc'])} | "
                             f"{interval(d['oracle_joint'])} |")
    return lines + [""]


def sections(r: dict) -> list[str]:
    """Markdown of the held-out and interpolation sections."""
    lines: list[str] = []
    ho = r["held_out"]
    lines += [f"## Held-out crops ({ho['n']} crops, user prompt {r['prompt']!r})", "",
              "| arm | acc | joint | Δ acc vs generic | Δ joint vs generic | Δ acc vs none | Δ joint vs none |",
              "|---|---|---|---|---|---|---|"]
    for e in ho["arms"]:
        lines.append(f"| {arm_cell(e)} | {100 * e['oracle_acc']:.1f} | {100 * e['oracle_joint']:.1f} | "
                     + " | ".join(interval(e[f"{m}_vs_{b}"]) for b in ("generic", "none") for m in METRICS) + " |")
    it = r["interpolation"]
    lines += ["", f"## Held-out attribute combinations {it['combinations']} ({it['n']} crops; vault: {it['vault_rows']} "
              f"train-split rows, {it['combo_rows']} val_combo rows held out of vault and projector; projector "
              f"val_combo cos {fmt(it['val_combo_cos'])})", "",
              "| arm | acc | joint | Δ acc vs vault | Δ joint vs vault |", "|---|---|---|---|---|"]
    for e in it["arms"]:
        lines.append(f"| {arm_cell(e)} | {100 * e['oracle_acc']:.1f} | {100 * e['oracle_joint']:.1f} | "
                     f"{interval(e['oracle_acc_vs_vault'])} | {interval(e['oracle_joint_vs_vault'])} |")
    return lines


def projector_sections(r: dict) -> list[str]:
    """Markdown of the projector comparison."""
    lines: list[str] = []
    pr = r["projectors"]
    lines += ["", f"## Learned queries vs seed MLP ({pr['n']} held-out scenes generated from each one's conditioning)", "",
              "| model | val cos | acc | joint | parameters (toy) |", "|---|---|---|---|---|"]
    for name, e in pr["models"].items():
        lines.append(f"| {name} | {fmt(e['val_cos_content'])} | {100 * e['acc']:.1f} | {100 * e['accuracy']['joint']:.1f} "
                     f"| {e['parameters']:,} |")
    d = pr["queries_minus_mlp"]
    acc_ci = f" (paired CI [{100 * d['acc']['ci95'][0]:+.1f}, {100 * d['acc']['ci95'][1]:+.1f}])" if d.get("acc") else ""
    lines += ["", f"Learned queries − seed MLP: val cos {d['val_cos_content']:+.3f}, acc {100 * pr['acc_diff']:+.1f} points{acc_ci}, "
              f"joint {100 * d['joint']:+.1f} points (paired CI [{100 * d['paired']['ci95'][0]:+.1f}, "
              f"{100 * d['paired']['ci95'][1]:+.1f}]). Full size (1024-d → [77,2048] + [1280]): "
              f"{pr['full_size_parameters']:,} parameters (target ≤ {PARAMETER_BUDGET:,})."]
    if pr.get("refinement"):
        lines += ["", f"Refinement of degraded crops ({pr['refinement'].get('crops', 'the held-out crops above')}, vague "
                  "prompt) by the `projector` arm with each projector, same crops and noise (off the ceiling; it decides "
                  f"when both projectors are at the generation ceiling): {refinement_line(pr['refinement'])}."]
    pc = r.get("projectors_combo")
    if pc:
        dc = pc["queries_minus_mlp"]
        lines += ["", f"### The same two projectors on held-out attribute combinations {pc['combinations']} "
                  f"(both trained with `data.val_combinations`; {pc['n']} combination scenes generated from each one's "
                  "conditioning; an extra measure, the target's is the one above)", "",
                  "| model | val_combo cos | val cos | acc | joint |", "|---|---|---|---|---|"]
        for name, e in pc["models"].items():
            lines.append(f"| {name} | {fmt(e['val_combo_cos'])} | {fmt(e['val_cos_content'])} | {100 * e['acc']:.1f} | "
                         f"{100 * e['accuracy']['joint']:.1f} |")
        lines += ["", f"Learned queries − seed MLP on combinations: acc {paired(dc['acc'])} points, joint "
                  f"{paired(dc['paired'])} points."]
        if pc.get("refinement"):
            lines += ["", f"Refinement of the combination crops (degraded) by the `projector` arm with each: "
                      f"{refinement_line(pc['refinement'])}."]
    return lines


def verdicts(r: dict) -> list[str]:
    """Issue 15's four targets, each: met / not met and the figure that decides it (oracle_acc unless said)."""
    def arm(section, name):
        return next((e for e in r[section]["arms"] if e["arm"] == name), None)

    def above(d):
        return bool(d) and d["low"] > 0

    out = []
    if "held_out" in r:
        v, p = arm("held_out", "vault"), arm("held_out", "projector")
        ok = above(v and v["oracle_acc_vs_generic"]) and above(p and p["oracle_acc_vs_generic"])
        out.append(f"{'MET' if ok else 'NOT MET'}: held-out crops, vault - generic {interval(v and v['oracle_acc_vs_generic'])}, "
                   f"projector - generic {interval(p and p['oracle_acc_vs_generic'])} (interval above 0 wanted)")
        best = max((e for e in r["interpolation"]["arms"] if e["arm"] in ("projector", "hybrid", "hybrid_mix")),
                   key=lambda e: e["oracle_acc_vs_vault"]["mean"] if e["oracle_acc_vs_vault"] else float("-inf"))
        d = best["oracle_acc_vs_vault"]
        state = "MET" if above(d) else "MET (mean only)" if d and d["mean"] > 0 else f"NOT MET (short by {max(0.0, -100 * d['mean']):.1f} points)" if d else "NOT MEASURED"
        out.append(f"{state}: held-out combinations, best of projector/hybrid ({best['arm']}) - vault {interval(d)}")
    t = r["tuning"]["vs_default"].get("oracle_acc") if "tuning" in r else None
    if "tuning" in r:
        out.append(f"{'MET' if above(t) else 'MET (mean only)' if t and t['mean'] > 0 else 'NOT MET'}: tuning, "
                   f"vault_tuned - vault {interval(t)}")
    if "projectors" in r:
        pr = r["projectors"]
        dq = pr["queries_minus_mlp"]
        gen, ref = dq.get("acc"), (pr.get("refinement") or {}).get("oracle_acc", {}).get("diff")
        # Oracle accuracy of images generated from each one's conditioning decides, unless both sit at its ceiling
        # (>= 99% each): then the `projector` arm's refinement of degraded crops (off the ceiling, the projector's
        # use) decides, provided the generation difference is not below zero (its interval reaches 0).
        ceiling = min(e["acc"] for e in pr["models"].values()) >= 0.99
        base = dq["val_cos_content"] > 0 and pr["full_size_parameters"] <= PARAMETER_BUDGET
        sure = base and bool(gen) and (gen["ci95"][0] > 0 or (ceiling and bool(ref) and ref["ci95"][0] > 0
                                                               and gen["ci95"][1] >= 0))
        ok = base and (pr["acc_diff"] > 0 or (ceiling and bool(ref) and ref["diff"] > 0))
        out.append(f"{'MET' if sure else 'MET (mean only)' if ok else 'NOT MET'}: learned queries - seed MLP, val cos {dq['val_cos_content']:+.3f}, "
                   f"acc {paired(dq['acc']) if dq.get('acc') else format(100 * pr['acc_diff'], '+.1f')} points (joint {100 * dq['joint']:+.1f}), "
                   f"{pr['full_size_parameters'] / 1e6:.1f}M parameters at full size (<= 30M)"
                   + (f"; {'both at the generation ceiling, so ' if ceiling else ''}refining degraded crops "
                      f"({pr['refinement'].get('crops', 'held-out crops')}): {refinement_line(pr['refinement'])}"
                      if pr.get("refinement") else ""))
    return out


def arm_cell(e: dict) -> str:
    return e["arm"] if e["vault_share"] is None else f"{e['arm']} (vault share {e['vault_share']:.2f})"


def weights_commit(folder: Path) -> str | None:
    """The last commit that changed `folder` (None outside a git checkout or when it is untracked)."""
    import subprocess

    try:
        out = subprocess.run(["git", "log", "-1", "--format=%h", "--", str(folder)], cwd=folder, capture_output=True,
                             text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def paired(d: dict | None) -> str:
    """A toy_quality.bootstrap_diff result in points: +m [lo, hi]."""
    if not d:
        return "-"
    return f"{100 * d['diff']:+.1f} [{100 * d['ci95'][0]:+.1f}, {100 * d['ci95'][1]:+.1f}]"


def fmt(x) -> str:
    return "-" if x is None else f"{float(x):.3f}"


def mean_acc(accuracy: dict) -> float:
    from luna.models.toy import world

    return sum(accuracy[a] for a in world.SCENE_ATTRIBUTES) / len(world.SCENE_ATTRIBUTES)


# ---------------------------------------------------------------------- main


def tuning(args, work: Path, data: dict, seen: set, results: dict) -> None:
    """3. per-category tuning on a held-out split: `luna ab tune=true` once per --tune-rules on the same crops."""
    from demo import toy_quality as tq

    scenes = tq.held_out_scenes(args.tune_crops or args.crops, seed=args.tune_seed, exclude_prompts=seen)
    tcrops = degraded_crops(scenes, seed=args.tune_seed)
    grid = {"tune_grid": args.tune_grid} if args.tune_grid else {}
    if args.tune_described:
        described_crops(tcrops, scenes, args.tune_described, args.tune_seed, args.prompt)
        grid["prompt"] = None  # each crop's own prompt: the vague one, or its scene's
    if args.tune_fraction is not None:
        grid["tune_fraction"] = args.tune_fraction
    for k, rule in enumerate(args.tune_rules):
        res = ab(work / ("ab_tune" if k == 0 else f"ab_tune_{rule}"), tcrops, args, data["vault"], None, ["vault"],
                 tune=True, tune_metric="oracle_acc", tune_rule=rule, **grid)
        t = res.record["tune"]
        tu = {"metric": t["metric"], "method": t["method"], "rule": t["rule"], "alpha": t["alpha"],
              "search": len(t["search_indices"]), "candidates": t["candidates"],
              "eval": len(t["eval_indices"]),
              "categories": {c: {k: v for k, v in e.items() if k != "search_scores"}  # those stay in ab_json
                             for c, e in t["categories"].items()},
              "best": {c: e["best"] for c, e in t["categories"].items()},
              "vs_default": {m: (t["vs_default"].get(m) or {}).get("diff") for m in METRICS},
              "by_label": by_label(res, "vault", "vault_tuned") if args.tune_described else None,
              "ab_json": str(res.paths["ab_json"])}
        if k == 0:
            results["tuning"] = tu  # the harness's default rule decides the target
        else:
            results.setdefault("tuning_other_rules", {})[rule] = tu
        print(f"tuning, rule {rule} ({tu['search']} search / {tu['eval']} evaluation crops): best {tu['best']}; "
              f"search {tuning_evidence(tu)}; vault_tuned - vault: acc {interval(tu['vs_default']['oracle_acc'])}, "
              f"joint {interval(tu['vs_default']['oracle_joint'])} points")
        for label, d in (tu["by_label"] or {}).items():
            print(f"  label {label} ({d['n']} evaluation crops): vault_tuned - vault: acc {interval(d['oracle_acc'])}, "
                  f"joint {interval(d['oracle_joint'])} points")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, default=Path("toy_ab_work"), help="folder for pairs, vaults, projectors, ab runs")
    ap.add_argument("--weights", type=Path, default=None, help="toy weights folder (default: the committed ones)")
    ap.add_argument("--n", type=int, default=256, help="campaign samples generated for pairs and vault")
    ap.add_argument("--crops", type=int, default=64, help="held-out crops per arm (held-out and combination runs)")
    ap.add_argument("--tune-crops", type=int, default=None, help="crops of the tune=true run (default --crops)")
    ap.add_argument("--prompts", type=int, default=32, help="held-out scenes generated from each projector")
    ap.add_argument("--epochs", type=int, default=None, help="projector epochs (default: each experiment's own)")
    ap.add_argument("--combinations", type=json.loads, default=COMBINATIONS,
                    help="held-out attribute combinations, JSON (default %(default)s)")
    ap.add_argument("--tune-grid", type=json.loads, default=None,
                    help='tune=true candidates, JSON (default conf/ab.yaml tune_grid), e.g. \'{"weight": [0.5, 1.0], "k": [1, 5]}\'')
    ap.add_argument("--tune-rules", nargs="+", default=["significant", "best"],
                    help="tune_rule of each tune=true run, on the same crops; the first decides the target (default %(default)s)")
    ap.add_argument("--tune-seed", type=int, default=5,
                    help="seed of the tuning crops (scenes and degradation); another seed gives crops no earlier run saw")
    ap.add_argument("--tuning-only", action="store_true", help="only the tuning section (e.g. with another --tune-grid)")
    ap.add_argument("--sections", nargs="+", choices=SECTIONS, default=SECTIONS,
                    help="sections to run (default all; held_out needs projectors); --tuning-only = --sections tuning")
    ap.add_argument("--tune-described", type=float, default=0.0,
                    help="share of the tuning crops labelled 'described' with their scene's own prompt (a second "
                         "category; the others keep the vague --prompt); default 0: one category")
    ap.add_argument("--tune-fraction", type=float, default=None,
                    help="share of the --tune-crops searched, the rest evaluate (default conf/ab.yaml tune_fraction, 0.5)")
    ap.add_argument("--refine-crops", type=int, default=0,
                    help="learned queries vs seed MLP as the `projector` arm on this many fresh degraded crops (seed "
                         "--refine-seed) instead of the held-out section's crops (0: those)")
    ap.add_argument("--refine-seed", type=int, default=7, help="seed of the --refine-crops scenes and degradation")
    ap.add_argument("--prompt", default="a shape on a background", help="the user's prompt of every crop")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--md", type=Path, default=Path(__file__).resolve().parent / "results" / "toy_ab.md",
                    help="markdown table (default %(default)s)")
    args = ap.parse_args(argv)
    os.environ.setdefault("WANDB_MODE", "offline")

    import datetime as dt

    import torch

    from demo import toy_quality as tq
    from extraction.pairs import Pairs
    from luna.models.toy import models as toy_models

    torch.set_num_threads(args.threads)
    args.weights = Path(args.weights or toy_models.WEIGHTS_DIR).resolve()
    t_all, cpu0 = time.perf_counter(), time.process_time()
    load = os.getloadavg()[0]
    results: dict = {"weights": str(args.weights), "threads": args.threads, "load": load, "prompt": args.prompt, "tune_described": args.tune_described,
                     "created": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")}
    results["weights_commit"] = weights_commit(args.weights)
    print(f"toy ab (weights {args.weights}, commit {results['weights_commit']}), {args.threads} torch thread(s), "
          f"load {load:.1f}")
    tower = toy_models.load_vision(weights=args.weights / toy_models.VISION_FILE.name)
    work = args.work.resolve()
    data = make_data(work, args.weights, args.n, tower)
    results["data"] = f"{args.n} campaign samples of toy-base-flat generated here (benchmarks/toy_loop.make_data)"
    results["timings"] = timings = {"data": round(time.perf_counter() - t_all, 1)}
    seen = set(Pairs(data["pairs"]).prompt_text)
    pipe = data["comps"].pipe
    pipe.set_progress_bar_config(disable=True)

    sections = ["tuning"] if args.tuning_only else args.sections
    if "held_out" in sections and "projectors" not in sections:
        ap.error("--sections held_out needs projectors (its projector arm is the learned-query model trained there)")
    if "projectors" in sections:
        # 4. projectors: seed MLP vs learned queries (also the projector of the held-out run)
        held = tq.held_out_scenes(args.prompts, seed=4, exclude_prompts=seen)
        print(f"projectors: images generated from projected conditioning, {len(held)} held-out scenes (oracle, %)")
        models, _ = compare_projectors(pipe, tower, data["pairs"], work / "projectors", held, args.epochs,
                                       experiments={"seed MLP": "projector_seed_mlp", "learned queries": "projector_queries"})
        for e in models.values():
            e["acc"] = mean_acc(e["accuracy"])
        full = full_size_parameters("projector_queries")
        results["projectors"] = pr = {"n": len(held), "models": {k: {x: v for x, v in e.items() if x != "metrics"}
                                                                 for k, e in models.items()},
                                      "queries_minus_mlp": queries_minus_mlp(models),
                                      "acc_diff": models["learned queries"]["acc"] - models["seed MLP"]["acc"],
                                      "full_size_parameters": full, "budget": PARAMETER_BUDGET}
        d = pr["queries_minus_mlp"]
        print(f"  learned queries - seed MLP: val cos {d['val_cos_content']:+.3f}, acc {paired(d['acc'])} points, "
              f"joint {100 * d['joint']:+.1f} points; full size {full / 1e6:.1f}M parameters (target <= 30M)")

        if args.refine_crops:  # the projector arm with each projector on fresh crops (more crops, more power)
            rcrops = degraded_crops(tq.held_out_scenes(args.refine_crops, seed=args.refine_seed, exclude_prompts=seen),
                                    seed=args.refine_seed)
            q = ab(work / "ab_refine_queries", rcrops, args, None, models["learned queries"]["folder"], ["projector"])
            mlp = ab(work / "ab_refine_mlp", rcrops, args, None, models["seed MLP"]["folder"], ["projector"])
            pr["refinement"] = projector_refinement(q, mlp)
            pr["refinement"]["crops"] = f"fresh held-out renders, seed {args.refine_seed}"
            print(f"  projector arm, learned queries - seed MLP ({len(rcrops)} fresh crops, seed {args.refine_seed}): "
                  f"{refinement_line(pr['refinement'])}")

        timings["projectors"] = round(time.perf_counter() - t_all - sum(timings.values()), 1)
    if "held_out" in sections:
        # 1. held-out crops
        crops = degraded_crops(tq.held_out_scenes(args.crops, seed=2, exclude_prompts=seen), seed=2)
        res = ab(work / "ab_held_out", crops, args, data["vault"], models["learned queries"]["folder"], HELD_OUT_ARMS)
        results["held_out"] = {"n": len(crops), "arms": arm_rows("held_out", res, ["generic", "none"]),
                               "missing": res.missing, "ab_json": str(res.paths["ab_json"])}
        print(f"held-out crops ({len(crops)}, luna ab): oracle accuracy (%), paired differences in points [95% CI]")
        print_rows(results["held_out"]["arms"], ["generic", "none"])
        if not args.refine_crops:
            mlp = ab(work / "ab_held_out_mlp", crops, args, None, models["seed MLP"]["folder"], ["projector"])
            pr["refinement"] = projector_refinement(res, mlp)
            pr["refinement"]["crops"] = "the held-out section's crops"
            print(f"  projector arm, learned queries - seed MLP (same crops and noise): {refinement_line(pr['refinement'])}")

        timings["held_out"] = round(time.perf_counter() - t_all - sum(timings.values()), 1)
    if "interpolation" in sections:
        # 2. interpolation: held-out combinations, neither memory has seen them
        combos = args.combinations
        mem = split_memory(data, work / "combo", tower, combos)
        combo_scenes = combination_scenes(args.crops, combos, seed=args.seed)
        combo_models, _ = compare_projectors(pipe, tower, data["pairs"], work / "combo", combo_scenes, args.epochs,
                                             experiments={"seed MLP": "projector_seed_mlp", "learned queries": "projector_queries"},
                                             data={"val_combinations": combos})
        cq = combo_models["learned queries"]
        for e in combo_models.values():
            e["acc"] = mean_acc(e["accuracy"])
        results["projectors_combo"] = {"n": len(combo_scenes), "combinations": combos,
                                       "models": {k: {"val_combo_cos": e["metrics"].get("val_combo/cos_content"),
                                                      "val_cos_content": e["val_cos_content"], "acc": e["acc"],
                                                      "accuracy": e["accuracy"], "acc_hits": e["acc_hits"],
                                                      "hits": e["hits"], "folder": e["folder"]}
                                                  for k, e in combo_models.items()},
                                       "queries_minus_mlp": queries_minus_mlp(combo_models)}
        dc = results["projectors_combo"]["queries_minus_mlp"]
        vc = {k: e["val_combo_cos"] for k, e in results["projectors_combo"]["models"].items()}
        print(f"  held-out combinations, learned queries - seed MLP: val_combo cos {fmt(vc['learned queries'])} vs "
              f"{fmt(vc['seed MLP'])}, acc {paired(dc['acc'])}, joint {paired(dc['paired'])} points")
        combo_crops = degraded_crops(combo_scenes, seed=3)
        res = ab(work / "ab_combo", combo_crops, args, mem["vault"], cq["folder"], COMBO_ARMS)
        mlp = ab(work / "ab_combo_mlp", combo_crops, args, None, combo_models["seed MLP"]["folder"], ["projector"])
        results["projectors_combo"]["refinement"] = projector_refinement(res, mlp)
        results["interpolation"] = {"combinations": combos, "n": len(combo_scenes), "vault_rows": len(mem["rows"]),
                                    "combo_rows": mem["combo_rows"], "val_combo_cos": cq["metrics"].get("val_combo/cos_content"),
                                    "generation_from_projector": cq["accuracy"],
                                    "arms": arm_rows("interpolation", res, ["vault"]), "ab_json": str(res.paths["ab_json"])}
        print(f"held-out combinations {combos} ({len(combo_scenes)} crops; vault of {len(mem['rows'])} train rows, "
              f"{mem['combo_rows']} val_combo rows held out): oracle accuracy (%)")
        print_rows(results["interpolation"]["arms"], ["vault"])
        print(f"  projector arm, learned queries - seed MLP: {refinement_line(results['projectors_combo']['refinement'])}")

        timings["interpolation"] = round(time.perf_counter() - t_all - sum(timings.values()), 1)
    if "tuning" in sections:
        tuning(args, work, data, seen, results)
        timings["tuning"] = round(time.perf_counter() - t_all - sum(timings.values()), 1)
    print("targets (issue 15):")
    for v in verdicts(results):
        print(f"  {v}")
    results["seconds"] = round(time.perf_counter() - t_all, 1)
    results["cpu_seconds"] = round(time.process_time() - cpu0, 1)  # this process's CPU time: the load-free cost
    print(f"total {results['seconds']:.0f} s, {results['cpu_seconds']:.0f} CPU s ({', '.join(f'{k} {v:.0f} s' for k, v in timings.items())})")
    from luna.files import write_json_atomic

    if args.json:
        write_json_atomic(args.json, results, default=str)
    if args.md:
        args.md.parent.mkdir(parents=True, exist_ok=True)
        args.md.write_text(markdown(results, shlex.join(["python", "benchmarks/toy_ab.py", *(sys.argv[1:] if argv is None else argv)])))
        print(f"wrote {args.md}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
