"""The driver-side scheduler: which actors run on which node, and which unit each runs next.

`Placement` is the pure part (no Ray): per-checkpoint queues of tasks, the nodes holding each
checkpoint, the checkpoint each actor keeps loaded, and the choice of an actor's next task: more
units of its loaded checkpoint first, else a checkpoint nobody is on (the longest queue), else
join a busy checkpoint from a bounded budget of extra loads. So pipeline loads stay near
checkpoints + actors, and a unit only goes to a node that holds its checkpoint.

`Scheduler` drives `Placement` over Ray actors (`factory.worker`): keeps `inflight_per_actor` units
queued per actor, hands each result to the driver's `on_result`, and sends the in-flight units of
a dead actor back to the queue (retried on another actor; the driver writes a unit's shard only
when its result arrives, so nothing is ever written twice). A task is the plain dict described in
`factory.worker`.
"""
from __future__ import annotations

import logging
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable

from factory.errors import FactoryRunError

log = logging.getLogger(__name__)


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


# --------------------------------------------------------------------------- the placement choice


class Placement:
    """Queues of tasks per checkpoint and the choice of each actor's next task (pure: no Ray)."""

    def __init__(self, tasks: list[dict], max_retries: int = 3, join_budget: int = 0):
        self.queues: dict[str, deque] = {}
        self.holders: dict[str, set] = {}  # checkpoint -> live nodes holding it
        for t in tasks:
            name = t["checkpoint"]["name"]
            self.queues.setdefault(name, deque()).append(t)
            self.holders[name] = set(t["checkpoint"]["paths"])
        self.max_retries = max_retries
        self.join_budget = join_budget  # extra loads allowed for actors joining a started checkpoint
        self.tries: dict[str, int] = {}
        self.nodes: dict[str, str] = {}  # worker -> node
        self.loaded: dict[str, str | None] = {}  # worker -> checkpoint it keeps loaded

    def add_actor(self, worker: str, node: str) -> None:
        self.nodes[worker], self.loaded[worker] = node, None

    def remove_actor(self, worker: str) -> None:
        self.nodes.pop(worker, None)
        self.loaded.pop(worker, None)

    def unload(self, worker: str) -> None:
        """The actor's pipeline state is unknown (a task failed on it): treat it as unloaded."""
        self.loaded[worker] = None

    def drop_node(self, node: str) -> None:
        """A lost node holds nothing any more: its checkpoints' units go to the other holders."""
        for nodes in self.holders.values():
            nodes.discard(node)

    def next_task(self, worker: str) -> dict | None:
        """The task `worker` runs next, or None when it should wait (or nothing is left for it)."""
        current = self.loaded[worker]
        if current and self.queues.get(current):
            return self.queues[current].popleft()
        node = self.nodes[worker]
        mine = [c for c, q in self.queues.items() if q and node in self.holders[c]]
        if not mine:
            self.loaded[worker] = None
            return None
        busy = {c: sum(1 for w, loaded in self.loaded.items() if loaded == c) for c in mine}
        # nobody on it: never started, or its actor died / moved on with units requeued
        free = [c for c in mine if busy[c] == 0]
        if free:
            choice = max(free, key=lambda c: len(self.queues[c]))
        else:  # join a checkpoint another actor has: one extra load, from a bounded budget
            choice = max(mine, key=lambda c: len(self.queues[c]) / (1 + busy[c]))
            if self.join_budget <= 0 or len(self.queues[choice]) < 2:
                return None
            self.join_budget -= 1
        self.loaded[worker] = choice
        return self.queues[choice].popleft()

    def add(self, tasks: list[dict]) -> None:
        """More tasks (e.g. a stopped checkpoint's samples moved to another checkpoint), at the back."""
        for t in tasks:
            name = t["checkpoint"]["name"]
            self.queues.setdefault(name, deque()).append(t)
            self.holders.setdefault(name, set(t["checkpoint"]["paths"]))

    def drop(self, checkpoint: str) -> list[dict]:
        """Stop scheduling a checkpoint: its queued tasks are removed and returned (in-flight ones finish)."""
        queue = self.queues.get(checkpoint) or deque()
        dropped = list(queue)
        queue.clear()
        return dropped

    def requeue(self, task: dict, why: str) -> None:
        """Put a task back at the front of its queue; FactoryRunError once it failed too often."""
        uid = task["unit_id"]
        self.tries[uid] = self.tries.get(uid, 0) + 1
        if self.tries[uid] > self.max_retries:
            raise FactoryRunError(f"unit {uid} failed {self.tries[uid]} times; last error: {why}")
        self.queues[task["checkpoint"]["name"]].appendleft(task)

    def left(self) -> list[str]:
        """Checkpoints that still have queued tasks."""
        return sorted(c for c, q in self.queues.items() if q)


# --------------------------------------------------------------------------- the Ray driver loop


@dataclass
class _Actor:
    spec: ActorSpec
    handle: Any
    inflight: list = field(default_factory=list)  # [(ref, task)]


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
        self._placement = Placement([], max_retries)
        self._restarts = 0
        self._last_death = "none"
        self.guard: Callable | None = None

    def _start(self, spec: ActorSpec) -> _Actor:
        actor = _Actor(spec, self.make_actor(spec))
        self.actors.append(actor)
        self._placement.add_actor(spec.worker, spec.node)
        self.stats.actors_started += 1
        return actor

    def kill_all(self) -> None:
        import ray

        for actor in self.actors:
            try:
                ray.kill(actor.handle, no_restart=True)
            except Exception:  # noqa: BLE001 - already dead is fine
                pass

    def run(self, tasks: list[dict], on_result: Callable[[dict, dict], None], progress: Any = None,
            guard: Callable[[dict, dict, Callable[[str], list]], list] | None = None) -> RunStats:
        """Run every task; `on_result(task, result)` is called in the driver for each finished one.

        `guard(task, result, drop)`, called after `on_result`, may stop a checkpoint (`drop(name)`
        removes its queued tasks and returns them) and returns new tasks to queue."""
        if not tasks:
            return self.stats
        self.guard = guard
        self._placement = Placement(tasks, self.max_retries, join_budget=len(self.specs))
        try:
            for spec in self.specs:
                self._start(spec)
            self._fill()
            last_check = time.time()
            while any(actor.inflight for actor in self.actors):
                if time.time() - last_check > self.node_check_s:  # a node gone silently: its actors never answer
                    last_check = time.time()
                    for actor in [a for a in self.actors if a.inflight and not self.node_alive(a.spec.node)]:
                        self._lose(actor, "its node has died (no longer in the cluster)", "NodeLost")
                    self._fill()
                    continue
                self._collect(on_result, progress)
                self._fill()
            left = self._placement.left()
            if left:  # work left that no live actor can take
                nodes = sorted(set().union(*(self._placement.holders[c] for c in left)))
                gone = f", lost nodes {sorted(self.dead_nodes)}" if self.dead_nodes else ""
                raise FactoryRunError(f"no live actor on a node holding checkpoint(s) {left} (live holders "
                                      f"{nodes}{gone}); last actor death: {self._last_death}")
        finally:
            self.stats.loads = sum(self.stats.loads_by_worker.values())
            self.kill_all()
        return self.stats

    def _fill(self) -> None:
        """Queue tasks on every actor up to `inflight` each, as the placement chooses."""
        for actor in self.actors:
            while len(actor.inflight) < self.inflight:
                task = self._placement.next_task(actor.spec.worker)
                if task is None:
                    break
                actor.inflight.append((actor.handle.run.remote(task), task))

    def _collect(self, on_result: Callable[[dict, dict], None], progress: Any) -> None:
        """Wait up to `poll_s` for one result and hand it on (or requeue its task on an error)."""
        import ray
        from ray.exceptions import GetTimeoutError, RayActorError, RayTaskError

        refs = {ref: actor for actor in self.actors for ref, _ in actor.inflight}
        ready, _ = ray.wait(list(refs), num_returns=1, timeout=self.poll_s)
        if progress is not None and getattr(progress, "luna_live", False):
            progress.refresh()  # keeps elapsed time and ETA moving between results
        for ref in ready:
            actor = refs[ref]
            task = next(t for r, t in actor.inflight if r == ref)
            try:
                result = ray.get(ref, timeout=60)
            except RayActorError as e:
                self._lose(actor, str(e), type(e).__name__)
                return  # the refs map is stale now
            except (RayTaskError, GetTimeoutError) as e:
                actor.inflight = [(r, t) for r, t in actor.inflight if r != ref]
                self._placement.unload(actor.spec.worker)
                self._retry(task, str(e).strip().splitlines()[-1] if str(e).strip() else repr(e))
                continue
            actor.inflight = [(r, t) for r, t in actor.inflight if r != ref]
            self.stats.loads_by_worker[actor.spec.worker] = int(result.get("loads", 0))
            on_result(task, result)
            if self.guard is not None:
                self._placement.add(self.guard(task, result, self._placement.drop) or [])
            self.stats.units_done += 1
            self.stats.images += len(result["samples"])
            self.stats.rejected += len(result["rejected"])
            if progress is not None:
                progress.update(len(result["samples"]) + len(result["rejected"]))

    def _retry(self, task: dict, why: str) -> None:
        self.stats.retries += 1
        self._placement.requeue(task, why)

    def _lose(self, actor: _Actor, text: str, kind: str) -> None:
        """An actor died: kill it for good, requeue its units, start a replacement if allowed."""
        import ray

        self.stats.actors_died += 1
        self._last_death = (text.strip().splitlines() or [kind])[-1]
        node = actor.spec.node
        if "node has died" in text or not self.node_alive(node):
            self.dead_nodes.add(node)  # no replacement there; other holders take its units
            self._placement.drop_node(node)
        log.warning("actor %s on %s lost (%s); its units go back to the queue", actor.spec.worker, node, kind)
        try:  # an actor only "unavailable" might come back: make sure it cannot
            ray.kill(actor.handle, no_restart=True)
        except Exception:  # noqa: BLE001
            pass
        for _, task in reversed(actor.inflight):
            self._retry(task, f"actor {actor.spec.worker} lost: {self._last_death}")
        actor.inflight = []
        self.actors.remove(actor)
        self._placement.remove_actor(actor.spec.worker)
        if self._restarts < self.max_restarts and node not in self.dead_nodes:
            self._restarts += 1
            spec = ActorSpec(f"w{self._next_worker}", node, actor.spec.num_cpus, actor.spec.num_gpus)
            self._next_worker += 1
            self._start(spec)
