"""Generation on Ray: one pipeline per actor, and the driver-side scheduler that feeds the actors.

An actor (`FactoryWorker`) holds one generator and keeps its pipeline loaded while the checkpoint
stays the same; it runs one task (= one work unit) at a time, applies the quality gate and
returns encoded images. The `Scheduler` in the driver hands each actor the units of one
checkpoint in sequence, so pipeline loads stay near checkpoints + actors, places units only on
nodes that hold their checkpoint, and sends the in-flight units of a dead actor back to the queue
(to be retried on another actor; the driver writes a unit's shard only when its result arrives,
so nothing is ever written twice).

A task is a plain dict: {unit_id, checkpoint: {name, paths: {node: path}}, samples: [{key, prompt,
negative, seed}], sampler: {steps, cfg, scheduler, width, height, batch_size}, image: {format,
quality}, quality: {...}}. A generator is any object with `load(path)` and
`generate(prompts, negatives, seeds, sampler) -> list[HxWx3 float array in 0..1]`.
"""
from __future__ import annotations

import functools
import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
import uuid
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from factory import quality as qgate
from factory.shards import encode_image

log = logging.getLogger(__name__)

SCHEDULERS = {
    "euler": "EulerDiscreteScheduler",
    "euler_a": "EulerAncestralDiscreteScheduler",
    "ddim": "DDIMScheduler",
    "ddpm": "DDPMScheduler",
    "dpmpp_2m": "DPMSolverMultistepScheduler",
    "heun": "HeunDiscreteScheduler",
    "lms": "LMSDiscreteScheduler",
    "pndm": "PNDMScheduler",
    "unipc": "UniPCMultistepScheduler",
}


class FactoryRunError(RuntimeError):
    """The run cannot go on (a unit failed on every retry, or no actor can take a checkpoint)."""


# --------------------------------------------------------------------------- the generator


class SDXLGenerator:
    """Text-to-image with an SDXL pipeline loaded through luna.models (one pipeline at a time)."""

    def __init__(self, device: str = "auto", dtype: str = "auto", threads: int | None = None):
        import torch

        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        if dtype == "auto":
            dtype = "float16" if device.startswith("cuda") else "float32"
        self.device, self.dtype = device, getattr(torch, dtype)
        if threads and device == "cpu":
            torch.set_num_threads(int(threads))
        self.pipe = None
        self._scheduler = None

    def load(self, path: str) -> None:
        from luna.models.sdxl import load_sdxl

        self.pipe = None  # free the old pipeline before loading the next one
        self.pipe = load_sdxl(path, device=self.device, dtype=self.dtype)
        self.pipe.set_progress_bar_config(disable=True)
        self._default_scheduler_config = dict(self.pipe.scheduler.config)
        self._scheduler = None

    def _set_scheduler(self, name: str) -> None:
        if name == self._scheduler:
            return
        import diffusers

        cls_name = SCHEDULERS.get(name)
        if cls_name is None:
            raise ValueError(f"sampler.scheduler={name!r} is not one of {sorted(SCHEDULERS)}")
        self.pipe.scheduler = getattr(diffusers, cls_name).from_config(self._default_scheduler_config)
        self._scheduler = name

    def generate(self, prompts: list[str], negatives: list[str], seeds: list[int], sampler: dict) -> list[np.ndarray]:
        import torch

        self._set_scheduler(str(sampler.get("scheduler", "euler")))
        gens = [torch.Generator(device="cpu").manual_seed(int(s)) for s in seeds]
        with torch.inference_mode():
            out = self.pipe(
                prompt=list(prompts),
                negative_prompt=list(negatives),
                num_inference_steps=int(sampler.get("steps", 20)),
                guidance_scale=float(sampler.get("cfg", 5.0)),
                width=int(sampler.get("width", 336)),
                height=int(sampler.get("height", 336)),
                generator=gens,
                output_type="np",
            )
        return [np.asarray(im) for im in out.images]


# --------------------------------------------------------------------------- the actor


class FactoryWorker:
    """Ray actor body: one generator, one unit at a time, quality gate, encoded images back."""

    def __init__(self, worker: str, node: str, make_generator: Callable[[], Any]):
        self.worker, self.node = worker, node
        self.generator = make_generator()
        self.loaded: str | None = None
        self.loads = 0
        self._encoders: ThreadPoolExecutor | None = None

    def ping(self) -> dict:
        return {"worker": self.worker, "node": self.node, "pid": os.getpid()}

    def run(self, task: dict) -> dict:
        t0 = time.time()
        path = task["checkpoint"]["paths"][self.node]
        load_s = 0.0
        if path != self.loaded:
            self.loaded = None
            self.generator.load(path)
            self.loaded, self.loads = path, self.loads + 1
            load_s = time.time() - t0
        sampler, img = task["sampler"], task.get("image", {})
        qcfg = qgate.QualityConfig.from_cfg(task.get("quality"))
        ext, jpeg_q = str(img.get("format", "png")), int(img.get("quality", 95))
        level = img.get("png_level")
        gate = functools.partial(_gate_and_encode, qcfg=qcfg, ext=ext, quality=jpeg_q,
                                 png_level=None if level is None else int(level))
        pool = self._pool(int(img.get("encode_threads", 2)))
        batch = max(1, int(sampler.get("batch_size", 4)))
        samples = task["samples"]
        history: dict[str, list[list[str]]] = {s["key"]: [] for s in samples}
        encoded: dict[str, bytes] = {}
        seeds_used: dict[str, int] = {}
        pending = list(samples)
        gen_s = wait_s = enc_s = 0.0
        for attempt in range(max(1, qcfg.max_attempts)):
            if not pending:
                break
            # each image's quality gate and encoding run on the pool while the next batch generates
            jobs = []
            for i in range(0, len(pending), batch):
                chunk = pending[i : i + batch]
                seeds = [qgate.derive_seed(s["seed"], attempt) for s in chunk]
                t = time.time()
                outs = self.generator.generate(
                    [s["prompt"] for s in chunk], [s.get("negative", "") for s in chunk], seeds, sampler
                )
                gen_s += time.time() - t
                for s, seed, im in zip(chunk, seeds, outs):
                    jobs.append((s, seed, pool.submit(gate, im) if pool else _Done(gate(im))))
            t = time.time()
            failed = []
            for s, seed, job in jobs:  # in sample order: the result does not depend on timing
                reasons, data, seconds = job.result()
                enc_s += seconds
                history[s["key"]].append(reasons)
                if reasons:
                    failed.append(s)
                else:
                    encoded[s["key"]], seeds_used[s["key"]] = data, seed
            wait_s += time.time() - t
            pending = failed
        out, rejected = [], []
        for s in samples:
            key = s["key"]
            flags = qgate.flags(history[key])
            if key in encoded:
                out.append({"key": key, "image": encoded[key], "ext": ext, "seed": seeds_used[key], "quality": flags})
            else:
                rejected.append({"key": key, "reasons": flags["rejected_attempts"]})
        return {
            "unit_id": task["unit_id"], "worker": self.worker, "node": self.node, "loads": self.loads,
            "samples": out, "rejected": rejected,
            # encode_s: gate + encoding time (on the pool, mostly hidden); wait_s: what generation waited for it
            "timings": {"load_s": load_s, "generate_s": gen_s, "encode_s": enc_s, "wait_s": wait_s,
                        "total_s": time.time() - t0, "start": t0, "end": time.time()},
        }

    def _pool(self, threads: int) -> ThreadPoolExecutor | None:
        """The actor's encoding threads (0: gate and encode in line, after each image)."""
        if threads <= 0:
            return None
        if self._encoders is None or self._encoders._max_workers != threads:
            if self._encoders is not None:
                self._encoders.shutdown(wait=True)
            self._encoders = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="luna-encode")
        return self._encoders


class _Done:
    """A finished job, for the in-line path (the same interface as a Future)."""

    def __init__(self, value):
        self.value = value

    def result(self):
        return self.value


def _gate_and_encode(image: np.ndarray, qcfg, ext: str, quality: int, png_level: int | None):
    """(gate reasons, encoded bytes or None, seconds) of one generated image; PIL and zlib release
    the GIL, so this runs beside the generator's next batch."""
    t = time.perf_counter()
    reasons = qgate.check_image(image, qcfg)
    data = None if reasons else encode_image(image, ext, quality, png_level)
    return reasons, data, time.perf_counter() - t


# --------------------------------------------------------------------------- actors on the cluster


@dataclass
class ActorSpec:
    worker: str  # w0, w1, ... unique within a run
    node: str
    num_cpus: float = 1.0
    num_gpus: float = 0.0


def actor_specs(nodes: dict, wanted_nodes: list[str], workers_cfg: dict) -> list[ActorSpec]:
    """How many actors on which node: GPUs / gpus_per_actor on a GPU node, else cpu actors."""
    specs: list[ActorSpec] = []
    per_node = workers_cfg.get("actors_per_node")
    gpa = float(workers_cfg.get("gpus_per_actor", 1.0))
    cpa = float(workers_cfg.get("cpus_per_actor", 1.0))
    use_gpu = str(workers_cfg.get("device", "auto")) != "cpu"
    for node in wanted_nodes:
        info = nodes[node]
        gpus = float(getattr(info, "num_gpus", 0) or 0) if use_gpu else 0.0
        if gpus > 0 and gpa > 0:
            count = int(per_node) if per_node else max(1, int(gpus // gpa + 1e-9))
            specs += [ActorSpec("", node, num_cpus=min(cpa, 1.0), num_gpus=gpa) for _ in range(count)]
        else:
            cpus = float(getattr(info, "num_cpus", 1) or 1)
            count = int(per_node) if per_node else 1
            specs += [ActorSpec("", node, num_cpus=min(cpa, cpus)) for _ in range(count)]
    for i, s in enumerate(specs):
        s.worker = f"w{i}"
    return specs


@dataclass
class _Actor:
    spec: ActorSpec
    handle: Any
    current: str | None = None  # checkpoint it keeps loaded
    inflight: list = field(default_factory=list)  # [(ref, task)]
    loads: int = 0


@dataclass
class RunStats:
    units_done: int = 0
    images: int = 0
    rejected: int = 0
    retries: int = 0
    actors_started: int = 0
    actors_died: int = 0
    loads: int = 0  # pipeline loads reported by all actors, dead ones included
    loads_by_worker: dict = field(default_factory=dict)


class Scheduler:
    """Feeds tasks to actors, one checkpoint per actor at a time, retrying units of dead actors."""

    def __init__(
        self,
        specs: list[ActorSpec],
        make_actor: Callable[[ActorSpec], Any],
        max_retries: int = 3,
        inflight: int = 2,
        max_actor_restarts: int | None = None,
        poll_s: float = 0.5,
        node_alive: Callable[[str], bool] | None = None,
    ):
        self.specs, self.make_actor = specs, make_actor
        self.node_alive = node_alive or (lambda node: True)
        self.node_check_s = 10.0
        self.dead_nodes: set[str] = set()
        self.max_retries, self.inflight = max_retries, max(1, inflight)
        self.max_restarts = max_retries if max_actor_restarts is None else max_actor_restarts
        self.poll_s = poll_s
        self.actors: list[_Actor] = []
        self.stats = RunStats()
        self._next_worker = len(specs)

    def _start(self, spec: ActorSpec) -> _Actor:
        a = _Actor(spec, self.make_actor(spec))
        self.actors.append(a)
        self.stats.actors_started += 1
        return a

    def kill_all(self) -> None:
        import ray

        for a in self.actors:
            try:
                ray.kill(a.handle, no_restart=True)
            except Exception:  # noqa: BLE001 - already dead is fine
                pass

    def run(self, tasks: list[dict], on_result: Callable[[dict, dict], None], progress: Any = None) -> RunStats:
        """Run every task; `on_result(task, result)` is called in the driver for each finished one."""
        import ray
        from ray.exceptions import GetTimeoutError, RayActorError, RayTaskError

        if not tasks:
            return self.stats
        queues: dict[str, deque] = {}
        holders: dict[str, set] = {}
        for t in tasks:
            name = t["checkpoint"]["name"]
            queues.setdefault(name, deque()).append(t)
            holders[name] = set(t["checkpoint"]["paths"])
        tries: dict[str, int] = {}
        restarts, last_death = 0, "none"
        join_budget = len(self.specs)  # extra loads allowed for actors joining a started checkpoint
        try:
            for spec in self.specs:
                self._start(spec)

            def pick(a: _Actor) -> dict | None:
                nonlocal join_budget
                if a.current and queues.get(a.current):
                    return queues[a.current].popleft()
                mine = [c for c, q in queues.items() if q and a.spec.node in holders[c]]
                if not mine:
                    a.current = None
                    return None
                busy = {c: sum(1 for b in self.actors if b.current == c) for c in mine}
                # nobody on it: never started, or its actor died / moved on with units requeued
                free = [c for c in mine if busy[c] == 0]
                if free:
                    choice = max(free, key=lambda c: len(queues[c]))
                else:  # join a checkpoint another actor has: one extra load, from a bounded budget
                    choice = max(mine, key=lambda c: len(queues[c]) / (1 + busy[c]))
                    if join_budget <= 0 or len(queues[choice]) < 2:
                        return None
                    join_budget -= 1
                a.current = choice
                return queues[choice].popleft()

            def fill() -> None:
                for a in self.actors:
                    while len(a.inflight) < self.inflight:
                        t = pick(a)
                        if t is None:
                            break
                        a.inflight.append((a.handle.run.remote(t), t))

            def requeue(t: dict, why: str) -> None:
                tries[t["unit_id"]] = tries.get(t["unit_id"], 0) + 1
                self.stats.retries += 1
                if tries[t["unit_id"]] > self.max_retries:
                    raise FactoryRunError(f"unit {t['unit_id']} failed {tries[t['unit_id']]} times; last error: {why}")
                queues[t["checkpoint"]["name"]].appendleft(t)

            def lost(a: _Actor, text: str, kind: str) -> None:
                nonlocal restarts, last_death
                self.stats.actors_died += 1
                last_death = (text.strip().splitlines() or [kind])[-1]
                if "node has died" in text or not self.node_alive(a.spec.node):
                    self.dead_nodes.add(a.spec.node)  # no replacement there; other holders take its units
                    for c in holders:
                        holders[c].discard(a.spec.node)
                log.warning("actor %s on %s lost (%s); its units go back to the queue", a.spec.worker, a.spec.node, kind)
                try:  # an actor only "unavailable" might come back: make sure it cannot
                    ray.kill(a.handle, no_restart=True)
                except Exception:  # noqa: BLE001
                    pass
                for _, t in reversed(a.inflight):
                    requeue(t, f"actor {a.spec.worker} lost: {last_death}")
                a.inflight = []
                self.actors.remove(a)
                if restarts < self.max_restarts and a.spec.node not in self.dead_nodes:
                    restarts += 1
                    spec = ActorSpec(f"w{self._next_worker}", a.spec.node, a.spec.num_cpus, a.spec.num_gpus)
                    self._next_worker += 1
                    self._start(spec)

            fill()
            last_check = time.time()
            while any(a.inflight for a in self.actors):
                if time.time() - last_check > self.node_check_s:  # a node gone silently: its actors never answer
                    last_check = time.time()
                    for a in [b for b in self.actors if b.inflight and not self.node_alive(b.spec.node)]:
                        lost(a, "its node has died (no longer in the cluster)", "NodeLost")
                    fill()
                    continue
                refs = {ref: a for a in self.actors for ref, _ in a.inflight}
                ready, _ = ray.wait(list(refs), num_returns=1, timeout=self.poll_s)
                if progress is not None and getattr(progress, "luna_live", False):
                    progress.refresh()  # keeps elapsed time and ETA moving between results
                for ref in ready:
                    a = refs[ref]
                    task = next(t for r, t in a.inflight if r == ref)
                    try:
                        result = ray.get(ref, timeout=60)
                    except RayActorError as e:
                        lost(a, str(e), type(e).__name__)
                        break  # the refs map is stale now
                    except (RayTaskError, GetTimeoutError) as e:
                        a.inflight = [(r, t) for r, t in a.inflight if r != ref]
                        a.current = None  # its pipeline state is unknown: treat it as unloaded
                        requeue(task, str(e).strip().splitlines()[-1] if str(e).strip() else repr(e))
                        continue
                    a.inflight = [(r, t) for r, t in a.inflight if r != ref]
                    self.stats.loads_by_worker[a.spec.worker] = int(result.get("loads", 0))
                    on_result(task, result)
                    self.stats.units_done += 1
                    self.stats.images += len(result["samples"])
                    self.stats.rejected += len(result["rejected"])
                    if progress is not None:
                        progress.update(len(result["samples"]) + len(result["rejected"]))
                fill()
            if any(queues.values()):  # work left that no live actor can take
                left = sorted(c for c, q in queues.items() if q)
                nodes = sorted(set().union(*(holders[c] for c in left)))
                gone = f", lost nodes {sorted(self.dead_nodes)}" if self.dead_nodes else ""
                raise FactoryRunError(f"no live actor on a node holding checkpoint(s) {left} (live holders "
                                      f"{nodes}{gone}); last actor death: {last_death}")
        finally:
            self.stats.loads = sum(self.stats.loads_by_worker.values())
            self.kill_all()
        return self.stats


def ray_actor_factory(cluster, make_generator: Callable[[], Any], run_tag: str | None = None,
                      name_prefix: str = "luna-factory") -> Callable[[ActorSpec], Any]:
    """`make_actor(spec)` that starts a FactoryWorker pinned to spec.node with its CPU/GPU share."""
    import ray

    remote_cls = ray.remote(FactoryWorker)
    tag = run_tag or uuid.uuid4().hex[:8]

    def make(spec: ActorSpec):
        opts = dict(cluster.placement(spec.node), num_cpus=spec.num_cpus, num_gpus=spec.num_gpus,
                    max_restarts=0, max_task_retries=0, name=f"{name_prefix}-{tag}-{spec.worker}")
        return remote_cls.options(**opts).remote(spec.worker, spec.node, make_generator)

    return make
