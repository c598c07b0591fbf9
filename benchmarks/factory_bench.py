"""Factory throughput vs a bare diffusers loop, and pipeline loads vs checkpoints + actors.

    .venv/bin/python benchmarks/factory_bench.py            # tiny preset on CPU (about 1-2 minutes)
    .venv/bin/python benchmarks/factory_bench.py --images 96 --threads 2

Same checkpoint file, prompts, seeds, batch size, steps, size and torch threads on both sides.
The bare loop is `load_sdxl` + `pipe(...)` per batch, images turned into PIL (what a user's own
script keeps). The factory is `factory.run.run` on a local Ray instance with one CPU actor: Ray
start, inventory, actor start, load, generation, quality gate, PNG encoding and shard writing.
Two ratios are printed: steady state (images/s from the end of the first unit, on the actor's
clock, to the last shard on disk, against the mean of both bare runs from the end of their first
batch) and cold start (from the first unit's start, diffusers imports and pipeline load included,
to the last shard on disk, against the first bare run, whose process also imports diffusers for
the first time; Ray start, inventory and the actor process start are excluded). The bare loop runs before and after the factory, and
the mean is used, so a change in machine load during the run shows up in the printout.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

CAMPAIGN = """\
campaign: bench
wildcards:
  eyes: [blue eyes, green eyes, amber eyes, grey eyes, violet eyes]
  lighting: [soft studio lighting, dramatic rim light, golden hour]
jobs:
  eyes:
    quota: {images}
    templates: ["closeup of __eyes__, __lighting__"]
negative_prompt: "blurry, lowres"
sampler: {{steps: {steps}, cfg: 5.0, scheduler: euler, width: {size}, height: {size}, batch_size: {batch}}}
checkpoints: {{include: ["{include}"]}}
seed: 7
"""


def bare_loop(path: str, units, threads: int) -> dict:
    """The baseline: one pipeline, the plan's batches in order, nothing else."""
    import diffusers
    import torch

    from luna.models.sdxl import load_sdxl

    torch.set_num_threads(threads)
    t0 = time.perf_counter()
    pipe = load_sdxl(path, device="cpu", dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    pipe.scheduler = diffusers.EulerDiscreteScheduler.from_config(pipe.scheduler.config)
    t_loaded = time.perf_counter()
    marks, n = [], 0
    for u in units:
        sp = u.sampler
        gens = [torch.Generator("cpu").manual_seed(int(s.seed)) for s in u.samples]
        with torch.inference_mode():
            images = pipe(prompt=[s.prompt for s in u.samples], negative_prompt=[s.negative for s in u.samples],
                          num_inference_steps=sp.steps, guidance_scale=sp.cfg, width=sp.width, height=sp.height,
                          generator=gens, output_type="pil").images
        n += len(images)
        marks.append((time.perf_counter(), len(images)))
    end = marks[-1][0]
    steady_imgs = n - marks[0][1]
    return {"images": n, "total_s": end - t0, "load_s": t_loaded - t0,
            "steady_ips": steady_imgs / (end - marks[0][0]) if len(marks) > 1 else float("nan"),
            "e2e_ips": n / (end - t0)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=48)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--threads", type=int, default=1, help="torch threads on both sides (cpus_per_actor)")
    ap.add_argument("--models", type=str, default=None, help="a folder from `luna make-tiny` (default: write one)")
    args = ap.parse_args()

    import ray

    from factory.campaign_file import load_campaign
    from factory.planner import plan
    from factory.run import run
    from luna.models import tiny

    work = Path(tempfile.mkdtemp(prefix="luna-factory-bench-"))
    models = Path(args.models) if args.models else work / "models"
    if not args.models:
        tiny.write_checkpoints(models, n=2)
    single = models / "single"
    camp = work / "bench.yaml"
    camp.write_text(CAMPAIGN.format(images=args.images, steps=args.steps, size=args.size, batch=args.batch,
                                    include="tiny-base-0"))
    cfg = {
        "campaign_file": str(camp), "dry_run": False, "progress": False,
        "checkpoints": {"dirs": [str(single)], "node_dirs": {}},
        "cluster": {"mode": "local", "node_name": "bench", "num_cpus": max(2, args.threads), "include_dashboard": False},
        "workers": {"device": "cpu", "cpus_per_actor": args.threads, "actors_per_node": 1, "inflight_per_actor": 2,
                    "max_retries": 1},
        "image": {"format": "png"}, "quality": {"max_attempts": 1},
    }
    quiet = lambda *_: None  # noqa: E731

    # the plan, for the bare loop: same units, prompts and seeds
    from factory.inventory import merge, scan_folders

    inv = merge([scan_folders([str(single)], "bench")])
    units = plan(load_campaign(str(camp)), [c for c in inv.checkpoints if c.name == "tiny-base-0"]).units
    path = inv.by_name()["tiny-base-0"].paths["bench"]

    print(f"factory_bench: {args.images} images, batch {args.batch}, {args.steps} steps, {args.size}px, "
          f"{args.threads} torch thread(s), tiny preset, CPU")
    base1 = bare_loop(path, units, args.threads)
    print(f"bare diffusers loop (1st): {base1['steady_ips']:.2f} img/s steady, {base1['e2e_ips']:.2f} img/s "
          f"with load ({base1['load_s']:.1f}s load)")

    t0 = time.perf_counter()
    rep = run(dict(cfg, out=str(work / "out1")), echo=quiet)
    fact_wall = time.perf_counter() - t0
    first = _first_unit(work / "out1")  # actor-side wall clock of the first unit (same machine)
    last_on_disk = max(t for t, _ in rep.unit_times)
    steady = (rep.images - first["successes"]) / (last_on_disk - first["timings"]["end"])
    fact_e2e = rep.images / (last_on_disk - first["timings"]["start"])
    print(f"factory: {steady:.2f} img/s steady, {fact_e2e:.2f} img/s with load; whole run {fact_wall:.1f}s "
          f"(Ray start, inventory, actor start included)")

    base2 = bare_loop(path, units, args.threads)
    print(f"bare diffusers loop (2nd): {base2['steady_ips']:.2f} img/s steady, {base2['e2e_ips']:.2f} img/s with load")
    base_steady = (base1["steady_ips"] + base2["steady_ips"]) / 2
    print(f"RATIO steady    factory/bare = {steady / base_steady:.3f}  (target >= 0.9; bare = mean of both runs)")
    print(f"RATIO cold start factory/bare = {fact_e2e / base1['e2e_ips']:.3f}  (pipeline load and first imports "
          f"on both sides; bare = 1st run)")

    # pipeline loads: 2 checkpoints, 2 actors on one node
    camp2 = work / "bench2.yaml"
    camp2.write_text(CAMPAIGN.format(images=max(16, args.images // 2), steps=1, size=args.size, batch=args.batch,
                                     include="*"))
    cfg2 = dict(cfg, campaign_file=str(camp2), out=str(work / "out2"),
                workers=dict(cfg["workers"], actors_per_node=2),
                cluster=dict(cfg["cluster"], num_cpus=max(2, 2 * args.threads)))
    cfg2["checkpoints"] = {"dirs": [str(single)], "node_dirs": {}}
    rep2 = run(cfg2, echo=quiet)
    bound = rep2.checkpoints + rep2.actors
    print(f"LOADS pipeline loads = {rep2.loads}, checkpoints + actors = {rep2.checkpoints} + {rep2.actors} = {bound} "
          f"({'ok' if rep2.loads <= bound else 'OVER'}; {rep2.planned_units} units)")
    if ray.is_initialized():
        ray.shutdown()
    return 0


def _first_unit(out: Path) -> dict:
    """The stats of the unit that finished first (its timings hold the actor's start/end clock)."""
    from factory import shards

    stats = [shards.read_stats(tar) for tar in shards.complete_shards(out / "shards")]
    return min(stats, key=lambda s: s["timings"]["end"])


if __name__ == "__main__":
    sys.exit(main())
