"""300 checkpoints, simulated: the real planner and the scheduler's placement choice on a simulated cluster.

    python benchmarks/scale_sim.py                       # 300 checkpoints, 390k images at 336², nodes 1 + 2 GPUs
    python benchmarks/scale_sim.py --checkpoints 40 --images 20000 --gpus 1 2 --speeds 1.0 0.8 --load-s 8

No models and no Ray: `factory.planner.plan` expands a campaign over synthetic checkpoints into
the run's work units, `factory.run._task` turns them into the tasks the scheduler hands out, and
`factory.scheduler.Placement` (the scheduler's pure choice of each actor's next task, with the
run's join budget of one extra load per actor) decides, on a virtual clock, what each simulated GPU
runs. The event loop mirrors `Scheduler`: `inflight_per_actor` tasks queued per actor (an actor
runs its calls in order), results collected as they finish, the units of a lost actor requeued
(reversed, at the front), a lost node dropped from every checkpoint's holders after the
scheduler's node check (10 s). A unit takes `load_s` when its checkpoint is not the one the actor
has loaded, plus images × seconds per image / the node's GPU speed; seconds per image follow the
planner's own estimate (steps × megapixels × 0.1 s + 0.02 s at speed 1.0).

Reported: makespan against a lower bound (total image work / total GPU speed + one load per
checkpoint spread over the GPUs), pipeline loads against checkpoints + actors, idle GPU time, and
the same with one node lost halfway (its in-flight work is lost and redone elsewhere; lower bound:
the loss time + the work a full-speed cluster would have left / the speed that remains + one load
for each unfinished checkpoint no surviving GPU has loaded, spread over the surviving GPUs).
"""
from __future__ import annotations

import argparse
import heapq
import sys
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from factory.campaign_file import campaign_from_dict  # noqa: E402
from factory.inventory import CheckpointInfo  # noqa: E402
from factory.planner import plan  # noqa: E402
from factory.run import _task  # noqa: E402
from factory.scheduler import Placement  # noqa: E402

NODE_CHECK_S = 10.0  # Scheduler.node_check_s: how late a silently lost node is noticed


def seconds_per_image(sampler: dict) -> float:
    mp = sampler["width"] * sampler["height"] / 1e6
    return sampler["steps"] * mp * 0.1 + 0.02


@dataclass
class SimActor:
    worker: str
    node: str
    speed: float
    free_at: float = 0.0
    loaded: str | None = None
    loads: int = 0
    inflight: deque = field(default_factory=deque)  # (end time, task, start, duration)
    busy_s: float = 0.0  # loading + generating, counted when a call finishes
    alive: bool = True
    lost_s: float = 0.0  # work under way when its node was lost


def campaign(images: int, size: int, steps: int, batch: int):
    return campaign_from_dict({
        "campaign": "scale", "wildcards": {"part": ["eyes", "hands", "lips", "hair", "ears"],
                                            "light": ["soft light", "rim light", "daylight"]},
        "jobs": {"crops": {"quota": images, "templates": ["closeup of __part__, __light__"]}},
        "sampler": {"steps": steps, "cfg": 5.0, "scheduler": "euler", "width": size, "height": size,
                    "batch_size": batch},
        "checkpoints": {"include": ["*"]}, "seed": 1,
    })


def checkpoints(n: int, nodes: list[str]) -> list[CheckpointInfo]:
    return [CheckpointInfo(name=f"ckpt{i:03d}", paths={nd: f"/models/ckpt{i:03d}.safetensors" for nd in nodes},
                           fingerprint=f"fp{i:03d}", te_fingerprint=f"te{i % 7}", family="sdxl", tags=[],
                           format="single_file") for i in range(n)]


def simulate(tasks: list[dict], nodes: dict[str, tuple[int, float]], load_s: float, inflight: int,
             lose: tuple[str, float] | None = None) -> dict:
    """Run `tasks` on simulated actors (`nodes`: name -> (GPUs, speed)); optionally lose a node at a time."""
    actors = [SimActor(f"w{i}", node, speed) for i, (node, (gpus, speed)) in
              enumerate((n, v) for n, v in nodes.items() for _ in range(v[0]))]
    for i, a in enumerate(actors):
        a.worker = f"w{i}"
    place = Placement(tasks, max_retries=3, join_budget=len(actors))
    for a in actors:
        place.add_actor(a.worker, a.node)
    events: list = []  # (end, seq, worker)
    seq = 0
    now, done, images, lost_s, requeued, reloads = 0.0, set(), 0, 0.0, 0, 0
    by_worker = {a.worker: a for a in actors}

    def submit(a: SimActor, task: dict, t: float) -> None:
        nonlocal seq
        name = task["checkpoint"]["name"]
        start = max(t, a.free_at)
        dur = (load_s if name != a.loaded else 0.0) + len(task["samples"]) * seconds_per_image(task["sampler"]) / a.speed
        if name != a.loaded:
            a.loads += 1
            a.loaded = name
        a.free_at = start + dur
        a.inflight.append((a.free_at, task, start, dur))
        seq += 1
        heapq.heappush(events, (a.free_at, seq, a.worker))

    def fill(t: float) -> None:
        for a in actors:
            if not a.alive:
                continue
            while len(a.inflight) < inflight:
                task = place.next_task(a.worker)
                if task is None:
                    break
                submit(a, task, t)

    fill(0.0)
    lose_at = lose[1] + NODE_CHECK_S if lose else None
    while events or lose_at is not None:
        end, _, worker = events[0] if events else (float("inf"), 0, "")
        if lose_at is not None and end > lose_at:
            now = lose_at
            for a in [a for a in actors if a.alive and a.node == lose[0]]:
                a.alive = False
                place.drop_node(a.node)
                for fin, task, start, dur in reversed(a.inflight):
                    lost_s += max(0.0, lose[1] - start)
                    a.lost_s += max(0.0, lose[1] - start)
                    place.requeue(task, f"actor {a.worker} lost")
                    requeued += 1
                a.inflight.clear()
                a.free_at = lose[1]
                place.remove_actor(a.worker)
            survivors = {a.loaded for a in actors if a.alive}
            reloads = len([c for c in place.left() if c not in survivors])  # each needs a load somewhere
            events = [e for e in events if by_worker[e[2]].alive]
            heapq.heapify(events)
            lose_at = None
            fill(now)
            continue
        heapq.heappop(events)
        a = by_worker[worker]
        if lose is not None and a.node == lose[0] and end > lose[1]:
            continue  # the node is gone: this result never arrives (its unit is requeued when noticed)
        now = end
        fin, task, start, dur = a.inflight.popleft()
        a.busy_s += dur
        done.add(task["unit_id"])
        images += len(task["samples"])
        fill(now)
    left = place.left()
    makespan = now
    alive = [a for a in actors if a.alive]
    idle = {a.worker: max(0.0, (makespan if a.alive else lose[1]) - a.busy_s - a.lost_s) for a in actors}
    return {"makespan": makespan, "units": len(done), "images": images, "left": left,
            "loads": sum(a.loads for a in actors), "actors": len(actors), "alive": len(alive),
            "idle": idle, "lost_s": lost_s, "requeued": requeued, "reloads": reloads}


def fmt(s: float) -> str:
    h, rem = divmod(int(round(s)), 3600)
    return f"{h}h{rem // 60:02d}m{rem % 60:02d}s"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoints", type=int, default=300)
    ap.add_argument("--images", type=int, default=390_000)
    ap.add_argument("--size", type=int, default=336)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--gpus", type=int, nargs="+", default=[1, 2], help="GPUs per node")
    ap.add_argument("--speeds", type=float, nargs="+", default=[1.0, 0.8], help="speed of each node's GPUs")
    ap.add_argument("--load-s", type=float, default=8.0)
    ap.add_argument("--inflight", type=int, default=2)
    ap.add_argument("--lose", default="pc2", help="the node lost halfway ('' for none)")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    nodes = {f"pc{i + 1}": (g, s) for i, (g, s) in enumerate(zip(args.gpus, args.speeds))}
    t0 = time.perf_counter()
    camp = campaign(args.images, args.size, args.steps, args.batch)
    ckpts = checkpoints(args.checkpoints, list(nodes))
    p = plan(camp, ckpts)
    by_name = {c.name: c for c in ckpts}
    tasks = [_task(u, by_name[u.checkpoint], {}) for u in p.units]
    plan_s = time.perf_counter() - t0
    spi = seconds_per_image(tasks[0]["sampler"])
    work = sum(len(t["samples"]) for t in tasks) * spi
    speed = sum(g * s for g, s in nodes.values())
    n_gpus = sum(g for g, _ in nodes.values())
    bound = work / speed + args.checkpoints * args.load_s / n_gpus
    lines = [f"scale_sim: {len(ckpts)} checkpoints, {sum(len(t['samples']) for t in tasks):,} images at "
             f"{args.size}² ({args.steps} steps, {spi:.3f} s/image at speed 1.0), {len(tasks):,} units of "
             f"{args.batch}; nodes {', '.join(f'{n}: {g} GPU x {s}' for n, (g, s) in nodes.items())}; "
             f"load {args.load_s:g} s; inflight {args.inflight} per actor (plan + tasks built in {plan_s:.1f} s)", ""]
    rows = []
    t1 = time.perf_counter()
    r = simulate(tasks, nodes, args.load_s, args.inflight)
    rows.append(("all nodes", r, bound))
    if args.lose:
        half = r["makespan"] / 2
        lost_speed = nodes[args.lose][0] * nodes[args.lose][1]
        r2 = simulate(tasks, nodes, args.load_s, args.inflight, lose=(args.lose, half))
        left_gpus = n_gpus - nodes[args.lose][0]
        bound_l = (half + max(0.0, work - speed * half) / (speed - lost_speed)
                   + r2["reloads"] * args.load_s / left_gpus)
        rows.append((f"{args.lose} lost at {fmt(half)}", r2, bound_l))
    sim_s = time.perf_counter() - t1
    lines += ["| scenario | makespan | lower bound | makespan / bound | units done | loads | checkpoints + actors "
              "| idle GPU time (sum) | lost work (redone) |", "|---|---|---|---|---|---|---|---|---|"]
    for name, r, b in rows:
        lines.append(f"| {name} | {fmt(r['makespan'])} | {fmt(b)} | {r['makespan'] / b:.3f} | {r['units']:,}/{len(tasks):,}"
                     f"{' (left: ' + ', '.join(r['left'][:3]) + ')' if r['left'] else ''} | {r['loads']} "
                     f"| {args.checkpoints} + {r['actors']} = {args.checkpoints + r['actors']} "
                     f"({'ok' if r['loads'] <= args.checkpoints + r['actors'] else 'OVER'}) "
                     f"| {fmt(sum(r['idle'].values()))} ({100 * sum(r['idle'].values()) / (r['makespan'] * r['actors']):.2f}%) "
                     f"| {fmt(r['lost_s'])}, {r['requeued']} units requeued |")
    lines += ["", f"simulated in {sim_s:.1f} s; target: makespan <= 1.10 x the lower bound, loads <= checkpoints + actors"]
    text = "\n".join(lines)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(f"```\npython benchmarks/scale_sim.py {' '.join(argv if argv is not None else sys.argv[1:])}\n```\n\n{text}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
