"""Fault injection on the factory, tiny preset on CPU: does the dataset end exact after the faults?

    .venv/bin/python benchmarks/chaos.py                      # all three scenarios (several minutes)
    .venv/bin/python benchmarks/chaos.py --only kills --seed 3

Scenarios (each in its own process, so a hang is caught by a time limit, and Ray starts clean):
  kills   `factory.run.run` on a local Ray with 2 actors; a side thread `ray.kill`s a random busy
          worker actor at random times, at least --kills times.
  node    a 3-node Ray cluster on this machine (ray.cluster_utils.Cluster, nodes pc1..pc3, each
          with its own copy of the checkpoint folder); worker node pc3 is removed (with its actor
          and the units in flight there) soon after the first shard lands.
  driver  `luna factory` in a subprocess (its own local Ray), SIGKILLed with its Ray processes at
          random points (Ray start, actor start, just after a shard lands), at least
          --driver-kills times, then rerun until it exits 0.

Each ends with a check of the shards folder: exactly the quota, unique keys (duplicates), every
planned key present (lost), every tar with its `_stats.json` and no temporary file, and every
sample's metadata consistent with its image: key, prompt and `.txt` agree with the campaign's
sample at that index, the seed is the planned one or a derived retry seed, the image decodes at the
metadata's size, and (for a few random samples per scenario) regenerating the image from its
metadata's checkpoint, prompt and seed gives the stored image. The table at the end is the figure.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from factory.shards import STATS_SUFFIX  # noqa: E402

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")

CAMPAIGN = """\
campaign: chaos
wildcards:
  eyes: [blue eyes, green eyes, "{{amber|hazel}} eyes", grey eyes, violet eyes]
  lighting: [soft studio lighting, dramatic rim light, golden hour]
  person: [an astronaut, a woman, an old sailor]
jobs:
  eyes:
    quota: {eyes}
    templates: ["closeup of __eyes__, __lighting__"]
  faces:
    quota: {faces}
    templates: ["portrait of __person__ with __eyes__"]
negative_prompt: "blurry, lowres"
sampler: {{steps: {steps}, cfg: 5.0, scheduler: euler, width: 64, height: 64, batch_size: 4}}
checkpoints: {{include: ["*"]}}
seed: 2026
"""


def write_campaign(folder: Path, quota: int, steps: int) -> Path:
    path = folder / "chaos.yaml"
    eyes = quota * 3 // 5
    path.write_text(CAMPAIGN.format(eyes=eyes, faces=quota - eyes, steps=steps))
    return path


def tiny_models(folder: Path) -> Path:
    """The tiny preset's single-file checkpoints (written once, reused across runs)."""
    single = folder / "single"
    if not list(single.glob("*.safetensors")):
        from luna.models import tiny

        tiny.write_checkpoints(folder, n=1)
    return single


# --------------------------------------------------------------------------- the check


def check_dataset(shards_dir: Path, campaign_file: Path, models: dict[str, Path], regenerate: int,
                  rng: random.Random, max_attempts: int = 3) -> dict:
    """Counts and consistency of a finished shards folder (see the module docstring)."""
    import io

    import numpy as np
    from PIL import Image

    from factory import shards
    from factory.campaign_file import load_campaign
    from factory.planner import sample_key
    from factory.quality import derive_seed

    campaign = load_campaign(str(campaign_file))
    expected = {sample_key(campaign.name, job, i): (job, i) for job in campaign.jobs
                for i in range(campaign.jobs[job].quota)}
    files = sorted(shards_dir.iterdir())
    tars = [f for f in files if f.suffix == ".tar" and not f.name.startswith(".")]
    problems: list[str] = []
    temp = [f.name for f in files if f.name.startswith(".")]
    if temp:
        problems.append(f"temporary files left: {temp}")
    no_stats = [t.name for t in tars if not shards.stats_path(t).exists()]
    if no_stats:
        problems.append(f"tars without {shards.STATS_SUFFIX}: {no_stats}")
    found: list[str] = []
    samples: dict[str, dict] = {}
    for tar in shards.complete_shards(shards_dir, campaign.name):
        stats = shards.read_stats(tar)
        keys = []
        for s in shards.read_shard(tar):
            key = s["__key__"]
            keys.append(key)
            meta = json.loads(s["json"])
            ext = next(e for e in ("png", "jpg", "webp") if e in s)
            img = Image.open(io.BytesIO(s[ext]))
            img.load()
            where = f"{tar.name}:{key}"
            if meta.get("key") != key:
                problems.append(f"{where}: json key {meta.get('key')!r}")
            if s.get("txt", b"").decode() != meta.get("prompt"):
                problems.append(f"{where}: .txt differs from the json prompt")
            if key in expected:
                job, index = expected[key]
                planned = campaign.draw(job, index)
                if (meta.get("job"), meta.get("index")) != (job, index) or meta.get("prompt") != planned.prompt:
                    problems.append(f"{where}: prompt/job/index are not the campaign's draw {job}[{index}]")
                if meta.get("planned_seed") != planned.seed or meta.get("seed") not in {
                        derive_seed(planned.seed, a) for a in range(max_attempts)}:
                    problems.append(f"{where}: seed {meta.get('seed')} is not sample {job}[{index}]'s")
            if img.size != (meta.get("width"), meta.get("height")):
                problems.append(f"{where}: image {img.size} but metadata {meta.get('width')}x{meta.get('height')}")
            samples[key] = {"meta": meta, "image": np.asarray(img.convert("RGB"))}
        if stats.get("keys") != keys or stats.get("successes") != len(keys):
            problems.append(f"{tar.name}: stats list {stats.get('successes')} keys, the tar holds {len(keys)}")
        found += keys
    unique = set(found)
    regenerated = 0
    if regenerate and samples:
        regenerated = _regenerate(samples, rng.sample(sorted(samples), min(regenerate, len(samples))), models, problems)
    return {"expected": len(expected), "found": len(found), "unique": len(unique),
            "duplicates": len(found) - len(unique), "lost": len(set(expected) - unique),
            "unplanned": len(unique - set(expected)), "shards": len(tars), "regenerated": regenerated,
            "problems": problems}


def _regenerate(samples: dict, keys: list[str], models: dict[str, Path], problems: list[str]) -> int:
    """Generate `keys` again from their metadata alone and compare with the stored images."""
    import numpy as np
    import torch

    from factory.shards import encode_image
    from factory.worker import SDXLGenerator

    torch.set_num_threads(1)
    gen = SDXLGenerator(device="cpu", dtype="float32", threads=1)
    loaded = None
    done = 0
    for key in keys:
        meta = samples[key]["meta"]
        if meta["checkpoint"] != loaded:
            gen.load(str(models[meta["checkpoint"]]))
            loaded = meta["checkpoint"]
        sampler = {k: meta[k] for k in ("steps", "cfg", "scheduler", "width", "height")}
        im = gen.generate([meta["prompt"]], [meta["negative"]], [meta["seed"]], sampler)[0]
        from PIL import Image
        import io

        again = np.asarray(Image.open(io.BytesIO(encode_image(im, "png"))).convert("RGB")).astype(np.int16)
        diff = np.abs(again - samples[key]["image"].astype(np.int16))
        others = [k for k in samples if k != key]
        if others:  # the comparison must tell two samples apart, or it proves nothing
            d_other = np.abs(again - samples[others[0]]["image"].astype(np.int16)).mean()
            if d_other <= 2.0:
                problems.append(f"{key}: regenerated image is as close to {others[0]} ({d_other:.2f})")
        if diff.max() > 3 or diff.mean() > 0.5:
            problems.append(f"{key}: regenerated image differs (max {diff.max()}, mean {diff.mean():.3f})")
        done += 1
    return done


# --------------------------------------------------------------------------- scenarios


def scenario_kills(work: Path, args) -> dict:
    import ray

    from factory.run import run

    rng = random.Random(args.seed)
    single = tiny_models(work / "models")
    camp = write_campaign(work, args.quota, args.steps)
    out = work / "out"
    cfg = {"campaign_file": str(camp), "out": str(out), "progress": False,
           "cluster": {"mode": "local", "num_cpus": 2, "object_store_memory": 100 * 1024**2,
                       "include_dashboard": False, "log_to_driver": False},
           "checkpoints": {"dirs": [str(single)]},
           "workers": {"device": "cpu", "cpus_per_actor": 1, "actors_per_node": 2, "inflight_per_actor": 2,
                       "max_retries": args.kills + 5}}
    holder: dict = {}
    kills: list[str] = []
    stop = threading.Event()

    def killer():
        while len(kills) < args.kills and not stop.is_set():
            time.sleep(rng.uniform(1.0, 4.0))
            sched = holder.get("scheduler")
            busy = [a for a in list(sched.actors) if a.inflight] if sched else []
            if not busy or stop.is_set():
                continue
            victim = rng.choice(busy)
            try:
                ray.kill(victim.handle, no_restart=True)
                kills.append(f"{victim.spec.worker}@{time.time() - t0:.1f}s")
            except Exception:  # noqa: BLE001 - already gone
                pass

    t0 = time.time()
    thread = threading.Thread(target=killer, daemon=True)
    thread.start()
    report = run(cfg, scheduler_hook=lambda s: holder.__setitem__("scheduler", s), echo=lambda m: print("  " + m))
    stop.set()
    thread.join(timeout=10)
    return {"faults": len(kills), "fault_log": kills, "retries": report.retries, "loads": report.loads,
            "seconds": round(time.time() - t0, 1), "out": str(out), "campaign": str(camp),
            "models": {p.stem: str(p) for p in single.glob("*.safetensors")}}


def scenario_node(work: Path, args) -> dict:
    import ray
    from ray.cluster_utils import Cluster

    from factory.run import run

    single = tiny_models(work / "models")
    node_dirs = {}
    for name in ("pc1", "pc2", "pc3"):  # each node its own copy of the models folder
        d = work / f"models_{name}"
        if not d.exists():
            shutil.copytree(single, d)
        node_dirs[name] = [str(d)]
    camp = write_campaign(work, 2 * args.quota, args.steps)
    out = work / "out"
    common = dict(num_cpus=1, object_store_memory=100 * 1024**2)
    cluster = Cluster(initialize_head=True,
                      head_node_args=dict(**common, resources={"luna_node:pc1": 1000}, include_dashboard=False))
    cluster.add_node(**common, resources={"luna_node:pc2": 1000})
    pc3 = cluster.add_node(**common, resources={"luna_node:pc3": 1000})
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, include_dashboard=False, log_to_driver=False)
    removed: list[str] = []
    stop = threading.Event()
    t0 = time.time()

    def remover():
        shards_dir = out / "shards"
        while not stop.is_set():
            if shards_dir.is_dir() and list(shards_dir.glob(f"*{STATS_SUFFIX}")):  # pc3's actor is busy by now
                time.sleep(random.Random(args.seed).uniform(0.0, 0.5))
                cluster.remove_node(pc3, allow_graceful=False)
                removed.append(f"pc3@{time.time() - t0:.1f}s")
                return
            time.sleep(0.2)

    thread = threading.Thread(target=remover, daemon=True)
    thread.start()
    cfg = {"campaign_file": str(camp), "out": str(out), "progress": False, "checkpoints": {"dirs": [], "node_dirs": node_dirs},
           "workers": {"device": "cpu", "cpus_per_actor": 1, "inflight_per_actor": 2, "max_retries": 5}}
    try:
        report = run(cfg, echo=lambda m: print("  " + m))
        note = ""
    except Exception as e:  # noqa: BLE001 - reported in the table; the rerun below is the user's recovery
        report, note = None, f"first run failed: {type(e).__name__}: {e}"
        print("  " + note)
    stop.set()
    thread.join(timeout=10)
    reruns = 0
    if report is None:  # what a user does after a failure: rerun the same command on the remaining nodes
        node_dirs.pop("pc3", None)
        cfg["checkpoints"]["node_dirs"] = node_dirs
        report = run(cfg, echo=lambda m: print("  " + m))
        reruns = 1
    ray.shutdown()
    cluster.shutdown()
    return {"faults": len(removed), "fault_log": removed, "retries": report.retries, "loads": report.loads,
            "reruns": reruns, "note": note, "seconds": round(time.time() - t0, 1), "out": str(out),
            "campaign": str(camp), "models": {p.stem: str(p) for p in single.glob("*.safetensors")}}


def scenario_driver(work: Path, args) -> dict:
    rng = random.Random(args.seed)
    single = tiny_models(work / "models")
    camp = write_campaign(work, 8 * args.quota, args.steps)  # room for the kills before the quota is reached
    out = work / "out"
    argv = [sys.executable, "-m", "luna.cli", "factory", f"campaign_file={camp}", f"out={out}",
            f"checkpoints.dirs=[{single}]", "cluster=local", "cluster.num_cpus=2",
            "cluster.object_store_memory=104857600", "workers.device=cpu", "workers.actors_per_node=2",
            "progress=false"]
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_ADDRESS")}
    env.update(PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    kills: list[str] = []
    runs, t0 = 0, time.time()
    # kill points: "early" (Ray start, inventory), "startup" (just after this run prints "generating":
    # actors starting, first units in flight) and "after_shard" (just after a shard of this run lands:
    # other units in flight, the next shard being filled); what was not on disk must be redone, never
    # half kept
    modes = ["after_shard", "after_shard", "early", "startup"]
    modes += [rng.choice(["early", "startup", "after_shard"]) for _ in range(max(0, args.driver_kills - 4))]
    rng.shuffle(modes)
    shards_dir = out / "shards"
    while True:
        runs += 1
        log_path = work / f"driver-run-{runs}.log"
        log = open(log_path, "w")
        before = set(shards_dir.glob(f"*{STATS_SUFFIX}")) if shards_dir.is_dir() else set()
        proc = subprocess.Popen(argv, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        mode = modes[len(kills)] if len(kills) < args.driver_kills else None
        start = time.time()
        deadline = start + rng.uniform(1.0, 8.0) if mode == "early" else None
        killed = False
        while proc.poll() is None:
            if deadline is None and mode == "startup" and "generating" in log_path.read_text(errors="replace"):
                deadline = time.time() + rng.uniform(0.5, 4.0)
            if deadline is None and mode == "after_shard" and shards_dir.is_dir() and \
                    set(shards_dir.glob(f"*{STATS_SUFFIX}")) - before:
                deadline = time.time() + rng.uniform(0.0, 1.5)
            if deadline is not None and time.time() >= deadline and proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)  # the driver and every Ray process it started
                proc.wait()
                killed = True
                on_disk = len(list(shards_dir.glob(f"*{STATS_SUFFIX}"))) if shards_dir.is_dir() else 0
                kills.append(f"run {runs} {mode} @{time.time() - start:.1f}s ({on_disk} shards on disk)")
                break
            if time.time() - start > 900:
                os.killpg(proc.pid, signal.SIGKILL)
                raise RuntimeError(f"luna factory run {runs} did not finish in 900 s")
            time.sleep(0.05)
        log.close()
        if killed:
            print(f"  killed: {kills[-1]}")
            continue
        code = proc.returncode
        print(f"  run {runs} exited {code} after {time.time() - start:.1f}s")
        if code == 0:  # finished (if before all the planned kills, the table shows fewer faults)
            break
        raise RuntimeError(f"luna factory run {runs} exited {code}; see {work}/driver-run-{runs}.log")
    return {"faults": len(kills), "fault_log": kills, "runs": runs, "seconds": round(time.time() - t0, 1),
            "out": str(out), "campaign": str(camp), "models": {p.stem: str(p) for p in single.glob("*.safetensors")}}


SCENARIOS = {"kills": scenario_kills, "node": scenario_node, "driver": scenario_driver}
LABELS = {"kills": "random actor kills (ray.kill)", "node": "worker node removed (3-node cluster)",
          "driver": "driver SIGKILLed + rerun"}


def child(name: str, work: Path, args) -> None:
    """One scenario, then the check; prints one JSON line `CHAOS_RESULT {...}`."""
    import torch

    torch.set_num_threads(1)
    info = SCENARIOS[name](work, args)
    check = check_dataset(Path(info["out"]) / "shards", Path(info["campaign"]),
                          {k: Path(v) for k, v in info["models"].items()}, args.regenerate, random.Random(args.seed))
    print("CHAOS_RESULT " + json.dumps({"scenario": name, **info, **check}), flush=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", choices=sorted(SCENARIOS), action="append")
    ap.add_argument("--quota", type=int, default=120, help="images (node scenario: 2x, driver scenario: 8x)")
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--kills", type=int, default=5, help="actor kills in the kills scenario (at least)")
    ap.add_argument("--driver-kills", type=int, default=5)
    ap.add_argument("--regenerate", type=int, default=3, help="samples per scenario regenerated and compared")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--work", type=Path, default=None, help="keep the outputs here (default: a temporary folder)")
    ap.add_argument("--timeout", type=int, default=1200, help="seconds per scenario")
    ap.add_argument("--child", choices=sorted(SCENARIOS), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args.child, args.work, args)
        return 0
    root = args.work or Path(tempfile.mkdtemp(prefix="luna-chaos-"))
    models = root / "models"
    tiny_models(models)  # once, shared by the scenarios
    rows = []
    for name in args.only or list(SCENARIOS):
        work = root / name
        work.mkdir(parents=True, exist_ok=True)
        if not (work / "models").exists():
            (work / "models").symlink_to(models, target_is_directory=True)
        print(f"== {name}: {LABELS[name]}", flush=True)
        cmd = [sys.executable, __file__, "--child", name, "--work", str(work), "--quota", str(args.quota),
               "--steps", str(args.steps), "--kills", str(args.kills), "--driver-kills", str(args.driver_kills),
               "--regenerate", str(args.regenerate), "--seed", str(args.seed)]
        t0 = time.time()
        try:
            proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=args.timeout)
        except subprocess.TimeoutExpired as e:
            out = (e.stdout or b"").decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
            print(out[-3000:])
            rows.append({"scenario": name, "error": f"no result within {args.timeout}s (hang?)"})
            continue
        result = next((json.loads(ln.split(" ", 1)[1]) for ln in proc.stdout.splitlines()
                       if ln.startswith("CHAOS_RESULT ")), None)
        for ln in proc.stdout.splitlines():
            if not ln.startswith("CHAOS_RESULT "):
                print(ln)
        if result is None:
            print(proc.stderr[-4000:])
            rows.append({"scenario": name, "error": f"exit {proc.returncode}, no result"})
            continue
        result["wall"] = round(time.time() - t0, 1)
        print(f"  faults: {result['fault_log']}")
        for p in result["problems"][:20]:
            print(f"  PROBLEM {p}")
        rows.append(result)
    print()
    head = ("scenario", "faults", "expected", "found", "unique", "duplicates", "lost", "shards", "regen ok", "problems",
            "wall s")
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    ok = True
    for r in rows:
        if "error" in r:
            ok = False
            print(f"| {LABELS[r['scenario']]} | - | - | - | - | - | - | - | - | {r['error']} | - |")
            continue
        bad = r["problems"] or r["lost"] or r["duplicates"] or r["found"] != r["expected"] or r["unplanned"]
        ok = ok and not bad
        regen_ok = r["regenerated"] - sum(1 for p in r["problems"] if "regenerated" in p)
        print(f"| {LABELS[r['scenario']]} | {r['faults']} | {r['expected']} | {r['found']} | {r['unique']} | "
              f"{r['duplicates']} | {r['lost']} | {r['shards']} | {regen_ok}/{r['regenerated']} | "
              f"{len(r['problems'])} | {r['wall']} |")
    print("\nall exact" if ok else "\nNOT EXACT: see the problems above")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
