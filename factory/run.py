"""The factory driver: campaign -> inventory -> plan -> actors -> shards. It only wires the pieces.

Everything a user can get wrong is checked before any model loads: the campaign (factory.campaign_file),
the output folder (a probe file), the checkpoint folders and files (factory.inventory), the
checkpoint selection (factory.planner). Shards are written here, in the driver, from the results
the actors send back, so one folder holds the whole dataset even on a LAN cluster without shared
storage, and a unit counts as done only once its shard and stats file are on disk.

The run's record, `${out}/{campaign}_run.json`, says what the plan skipped (checkpoints whose
sampling needs are not met) and what the poison guard stopped (checkpoints whose images failed the
quality gate at an outlier rate), with the units that moved their samples to other checkpoints; a
rerun reads it, so a stopped checkpoint stays stopped and the moved units resume like any other.
"""
from __future__ import annotations

import datetime as _dt
import errno
import itertools
import json
import logging
import os
import socket
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

from factory import inventory as inv_mod
from factory import quality as qgate
from factory import shards
from factory.campaign_file import load_campaign
from factory.errors import FactoryError
from factory.planner import WorkUnit, reassign
from factory.planner import plan as make_plan
from factory.scheduler import Scheduler, actor_specs
from factory.worker import SDXLGenerator, ray_actor_factory
from luna.cluster import Cluster, NodeInfo, connect, list_nodes
from luna.files import atomic_path
from luna.settings import plain

log = logging.getLogger(__name__)


@dataclass
class RunReport:
    campaign: str = ""
    planned_units: int = 0
    planned_images: int = 0
    skipped_units: int = 0  # already done by an earlier run
    units_done: int = 0
    images: int = 0
    rejected: int = 0
    rejected_reasons: dict = field(default_factory=dict)
    loads: int = 0
    actors: int = 0
    checkpoints: int = 0
    retries: int = 0
    seconds: float = 0.0
    cleaned: list = field(default_factory=list)
    shards: list = field(default_factory=list)
    unit_times: list = field(default_factory=list)  # (time.time(), images) as each unit's shard lands
    dry_run: bool = False
    skipped_checkpoints: dict = field(default_factory=dict)  # name -> why the plan does not use it
    poisoned: dict = field(default_factory=dict)  # name -> why the poison guard stopped it
    moved_samples: int = 0  # samples of stopped checkpoints given to other checkpoints
    unrendered: int = 0  # samples of stopped checkpoints that no healthy checkpoint could take
    record: str = ""  # the run's record file

    @property
    def images_per_s(self) -> float:
        return self.images / self.seconds if self.seconds > 0 else 0.0


def check_writable(folder: Path) -> None:
    """Create `folder` and write + remove a probe file there, or raise FactoryError naming it."""
    probe = folder / f".write-probe-{os.getpid()}"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with open(probe, "wb") as f:
            f.write(b"luna")
            f.flush()
            os.fsync(f.fileno())
        probe.unlink()
    except OSError as e:
        raise FactoryError(f"output folder {folder} is not writable: {e.strerror or e}") from None


def campaign_source(cfg: Mapping) -> str:
    """The campaign a config names: `campaign` (a name in campaigns/ or a path) or `campaign_file`."""
    name, path = cfg.get("campaign"), cfg.get("campaign_file")
    if name and path:
        raise FactoryError("give campaign=NAME_OR_PATH or campaign_file=PATH, not both")
    if not (name or path):
        raise FactoryError("no campaign: give campaign=NAME (a file in campaigns/) or campaign=PATH")
    if not isinstance(path or name, (str, Path)):
        raise FactoryError(f"campaign must be a name or a path to a campaign YAML, got {path or name!r}")
    return str(path or name)


def _task(unit, ckpt: inv_mod.CheckpointInfo, cfg: Mapping) -> dict:
    return {
        "unit_id": unit.id,
        "checkpoint": {"name": ckpt.name, "paths": dict(ckpt.paths)},
        "samples": [{"key": s.key, "prompt": s.prompt, "negative": s.negative, "seed": int(s.seed)}
                    for s in unit.samples],
        # the scheduler follows the checkpoint: v-prediction, zero terminal SNR, EDM (luna.models.sampling)
        "sampler": {**unit.sampler.to_dict(), "prediction": getattr(ckpt, "prediction", "epsilon")},
        "image": dict(cfg.get("image") or {}),
        "quality": _quality_task(cfg.get("quality")),
    }


def _quality_task(q) -> dict:
    """The task's `quality:` as plain dicts (the nested `agreement:` too), for the actor."""
    out = dict(q or {})
    if isinstance(out.get("agreement"), Mapping):
        out["agreement"] = dict(out["agreement"])
    return out


def sample_meta(unit, s, result: dict, kept: dict, now: str, checkpoint_path: str | None = None) -> dict:
    """The `key.json` of one sample (DESIGN.md §2). `checkpoint_path`: where the checkpoint was on the
    node that made it (`luna extract` finds its text encoders there without checkpoints.dirs)."""
    sp = unit.sampler
    meta = {
        "key": s.key, "prompt": s.prompt, "negative": s.negative,
        "campaign": unit.campaign, "job": unit.job, "category": unit.category,
        "template": s.template, "choices": s.choices, "index": s.index,
        "checkpoint": unit.checkpoint, "checkpoint_fingerprint": unit.fingerprint,
        "te_fingerprint": unit.te_fingerprint, "family": unit.family,
        "seed": int(kept["seed"]), "planned_seed": int(s.seed),
        "steps": sp.steps, "cfg": sp.cfg, "scheduler": sp.scheduler, "width": sp.width, "height": sp.height,
        "node": result["node"], "worker": result["worker"], "time": now,
        "quality": kept["quality"], "unit_id": unit.id, "format_version": shards.FORMAT_VERSION,
    }
    if checkpoint_path is not None:
        meta["checkpoint_path"] = str(checkpoint_path)
    if sp.timestep_spacing is not None:  # set by a campaign sampler_overrides rule
        meta["timestep_spacing"] = sp.timestep_spacing
    if s.prompt_index is not None:  # `repeats`: the prompt this image is one replica of
        meta["prompt_index"], meta["seed_index"] = s.prompt_index, s.seed_index
    return meta


RECORD_SUFFIX = "_run.json"


def record_path(out: Path, campaign: str) -> Path:
    """The run's record: skipped and stopped checkpoints, moved units, per-checkpoint gate health."""
    return Path(out) / f"{shards.safe_name(campaign)}{RECORD_SUFFIX}"


def read_record(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise FactoryError(f"{path}: unreadable run record ({e}); remove it to start the checkpoints' health afresh")
    if not isinstance(data, dict):
        raise FactoryError(f"{path}: unreadable run record (not a JSON object)")
    return data


def write_record(path: Path, record: dict) -> None:
    record["updated"] = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(record, indent=1, ensure_ascii=False), encoding="utf-8")


class HealthWatch:
    """The scheduler's guard: the poison guard over each checkpoint's first units, and the moving of a
    stopped checkpoint's samples (its queued units, its rejected samples) to the other checkpoints."""

    def __init__(self, the_plan, guard: qgate.PoisonGuard, units: dict, make_task: Callable, record: dict,
                 record_file: Path, report: RunReport, echo: Callable[[str], None], unusable: set, bar=None):
        self.plan, self.guard, self.units, self.make_task = the_plan, guard, units, make_task
        self.record, self.record_file, self.report, self.echo = record, record_file, report, echo
        self.unusable, self.bar = set(unusable), bar  # checkpoints no actor of this run can take
        self.rejected: dict[str, dict[str, list]] = {}  # checkpoint -> job -> rejected samples, before a stop

    def __call__(self, task: dict, result: dict, drop: Callable[[str], list]) -> list[dict]:
        unit = self.units[task["unit_id"]]
        name = unit.checkpoint
        by_key = {s.key: s for s in unit.samples}
        rejected = [by_key[r["key"]] for r in result.get("rejected", [])]
        moved: dict[str, list] = {}
        if self.guard.observe(name, result):
            h = self.guard.health[name]
            dropped = [self.units[t["unit_id"]] for t in drop(name)]
            if self.bar is not None:
                self.bar.total -= sum(len(u.samples) for u in dropped)
            for u in dropped:
                moved.setdefault(u.job, []).extend(u.samples)
            for job, ss in self.rejected.pop(name, {}).items():
                moved.setdefault(job, []).extend(ss)
            self.report.poisoned[name] = h.reason
            self.record.setdefault("poisoned", {})[name] = {"fingerprint": unit.fingerprint, **h.to_dict()}
            self.echo(f"stopped checkpoint {name}: {h.reason}; {len(dropped)} queued unit(s) and its rejected "
                      "samples go to the other checkpoints, what passed is kept")
        if name in self.guard.stopped():
            if rejected:
                moved.setdefault(unit.job, []).extend(rejected)
        elif rejected:  # kept until the checkpoint is judged: moved if it is stopped
            self.rejected.setdefault(name, {}).setdefault(unit.job, []).extend(rejected)
        if not moved:
            return []
        new = self.move(moved)
        write_record(self.record_file, self.record)
        return [self.make_task(u) for u in new]

    def move(self, moved: dict) -> list:
        """Units rendering `moved` ({job: samples}) on healthy checkpoints, added to the run and the record."""
        n = sum(len(v) for v in moved.values())
        new = reassign(self.plan, moved, set(self.guard.stopped()) | self.unusable)
        if not new:
            self.report.unrendered += n
            self.record["unrendered"] = self.record.get("unrendered", 0) + n
            self.echo(f"no healthy checkpoint left for {n} sample(s) of stopped checkpoints: they are not rendered")
            return []
        for u in new:
            self.units[u.id] = u
        self.record.setdefault("moved_units", []).extend(u.to_dict() for u in new)
        self.report.moved_samples += n
        if self.bar is not None:
            self.bar.total += n
            self.bar.refresh()
        return new


class ShardSink:
    """Writes finished units into shards (driver side) and keeps the running totals.

    Units are grouped per actor, `units_per_shard` to a shard; a unit is done only once the shard
    holding it is on disk with its stats file, so a unit still waiting in a group when the driver
    dies is simply generated again on the next run. `flush()` writes the groups that are not full.
    """

    def __init__(self, shards_dir: Path, campaign: str, units: dict, next_seq: int, report: RunReport,
                 units_per_shard: int = 1):
        self.dir, self.campaign, self.units, self.report = shards_dir, campaign, units, report
        self.seq = itertools.count(next_seq)
        self.per_shard = max(1, int(units_per_shard))
        self.groups: dict[tuple[str, str], list] = {}

    def __call__(self, task: dict, result: dict) -> None:
        unit = self.units[task["unit_id"]]
        now = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
        by_key = {s.key: s for s in unit.samples}
        where = (task.get("checkpoint") or {}).get("paths", {}).get(result["node"])
        samples = [shards.ShardSample(key=k["key"], image=k["image"], ext=k["ext"], prompt=by_key[k["key"]].prompt,
                                      meta=sample_meta(unit, by_key[k["key"]], result, k, now, where))
                   for k in result["samples"]]
        who = (result["node"], result["worker"])
        group = self.groups.setdefault(who, [])
        group.append((unit, result, samples))
        if len(group) >= self.per_shard:
            self._write(who)

    def flush(self) -> None:
        for who in list(self.groups):
            if self.groups[who]:
                self._write(who)

    def _write(self, who: tuple[str, str]) -> None:
        group = self.groups.pop(who)
        node, worker = who
        samples = [x for _, _, ss in group for x in ss]
        rejected = [r for _, res, _ in group for r in res["rejected"]]
        units = [u for u, _, _ in group]
        now = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
        stats = {
            "count": sum(len(u.samples) for u in units), "successes": len(samples), "failed": len(rejected),
            "rejected": rejected, "unit_ids": [u.id for u in units], "keys": [x.key for x in samples],
            "campaign": self.campaign, "jobs": sorted({u.job for u in units}),
            "checkpoints": sorted({u.checkpoint for u in units}), "node": node, "worker": worker, "end_time": now,
            "timings": {k: round(sum(res["timings"].get(k, 0.0) for _, res, _ in group), 4)
                        for k in ("load_s", "generate_s", "encode_s", "agreement_s", "total_s")}
            | {"start": min(res["timings"].get("start", 0.0) for _, res, _ in group),
               "end": max(res["timings"].get("end", 0.0) for _, res, _ in group)},
        }
        path = self.dir / f"{shards.shard_name(self.campaign, node, worker, next(self.seq))}.tar"
        shards.write_shard(path, samples, stats)
        self.report.shards.append(path)
        self.report.unit_times.append((time.time(), len(samples)))
        for r in rejected:
            for reason in {qgate.reason_kind(x) for attempt in r["reasons"] for x in attempt}:
                self.report.rejected_reasons[reason] = self.report.rejected_reasons.get(reason, 0) + 1


def quality_config(cfg: Mapping) -> qgate.QualityConfig:
    """The `quality:` settings, checked (a bad value is a FactoryError naming the key)."""
    try:
        return qgate.QualityConfig.from_cfg(cfg.get("quality"))
    except (TypeError, ValueError) as e:
        raise FactoryError(f"quality: {e}") from None


def prepare_units(the_plan, ckpts: dict, index: shards.ShardIndex, out: Path, cfg: Mapping, report: RunReport,
                  echo: Callable[[str], None]) -> tuple[list, "HealthWatch"]:
    """The units this run generates and its guard, from the plan, the shards already written and the run's
    record: finished units are skipped, a checkpoint stopped by an earlier run stays stopped, units moved
    off it resume, and its samples no healthy unit renders yet are moved now (the record is rewritten)."""
    campaign = the_plan.campaign
    shards_dir = Path(out) / "shards"
    rec_file = record_path(out, campaign.name)
    report.record = str(rec_file)
    record = read_record(rec_file)
    record.update(campaign=campaign.name, skipped_checkpoints=dict(the_plan.skipped))
    fps = {str(c.name): str(c.fingerprint) for c in the_plan.checkpoints}
    stopped = {n: v for n, v in (record.get("poisoned") or {}).items() if fps.get(n) == v.get("fingerprint")}
    record["poisoned"] = stopped  # an entry for a checkpoint no longer planned (or changed) is dropped
    moved = [WorkUnit.from_dict(d) for d in record.get("moved_units") or []]
    moved = [u for u in moved if fps.get(u.checkpoint) == u.fingerprint]
    record["moved_units"] = [u.to_dict() for u in moved]
    for name, v in stopped.items():
        report.poisoned[name] = v.get("reason", "")
        echo(f"checkpoint {name} was stopped by the poison guard in an earlier run ({v.get('reason', '')}); "
             f"remove {rec_file} to try it again")
    all_units = the_plan.units + moved
    live_keys = {s.key for u in all_units if u.checkpoint not in stopped for s in u.samples}
    orphans: dict = {}  # samples of stopped checkpoints that no healthy unit renders yet
    for u in all_units:
        if u.checkpoint in stopped:
            for smp in u.samples:
                if smp.key not in index.done_keys and smp.key not in live_keys:
                    orphans.setdefault(u.job, []).append(smp)
    pending = [u for u in all_units if u.id not in index.done_units and u.checkpoint not in stopped]
    # a unit whose every key is already in the shards was rendered under another id (an edited
    # wildcard list or template, or its samples moved off a checkpoint the guard stopped): it is done
    rendered = [u for u in pending if all(s.key in index.done_keys for s in u.samples)]
    pending = [u for u in pending if not all(s.key in index.done_keys for s in u.samples)]
    report.skipped_units = sum(1 for u in all_units if u.id in index.done_units) + len(rendered)
    if report.skipped_units:
        echo(f"resuming: {report.skipped_units} of {len(all_units)} units already done")
    if rendered:
        echo(f"{len(rendered)} unit(s) changed since their samples were rendered (e.g. {rendered[0].keys[0]}): "
             f"the samples already in {shards_dir} are kept, not rendered again")
    partial = [u for u in pending if any(s.key in index.done_keys for s in u.samples)]
    if partial:  # samples are grouped into units differently from the run that wrote those shards
        u = partial[0]
        done = [s.key for s in u.samples if s.key in index.done_keys]
        raise FactoryError(
            f"{len(partial)} unit(s) of this plan are partly in {shards_dir} already (e.g. the unit of job "
            f"{u.job!r} on checkpoint {u.checkpoint}: {len(done)} of its {len(u.samples)} keys, such as {done[0]}): "
            "this plan cuts the samples into units differently from the run that wrote those shards "
            "(sampler batch_size, quotas, jobs or checkpoints changed). Restore those settings, use a new "
            "out= folder, or remove those shards, so the dataset holds no duplicate keys")
    qcfg = quality_config(cfg)
    guard = qgate.PoisonGuard(qcfg.poison_rate if qcfg.enabled else None, qcfg.poison_window)
    for name, v in stopped.items():
        guard.stop(name, v.get("reason", ""))
    units_by_id = {u.id: u for u in pending}
    watch = HealthWatch(the_plan, guard, units_by_id, lambda u: _task(u, ckpts[u.checkpoint], cfg), record,
                        rec_file, report, echo, unusable=set())
    if orphans:
        pending += watch.move(orphans)
    write_record(rec_file, record)
    guard.totals = dict(Counter(u.checkpoint for u in pending))
    return pending, watch


def _progress(total: int, enabled: bool):
    if not enabled:
        return None
    from tqdm import tqdm

    live = sys.stderr.isatty()  # in a log file: a line every 30 s instead of a live bar
    bar = tqdm(total=total, unit="img", desc="generating", dynamic_ncols=True, smoothing=0.1, file=sys.stderr,
               mininterval=0.5 if live else 30.0)
    bar.luna_live = live
    return bar


def _this_machine(cfg: Mapping) -> Cluster | None:
    """This machine as the one node of a local cluster, without starting Ray (None: a LAN cluster,
    or a Ray connection this process already has)."""
    ccfg = cfg.get("cluster") or {}
    if str(ccfg.get("mode", "local")) != "local" or ("ray" in sys.modules and sys.modules["ray"].is_initialized()):
        return None
    gpus = ccfg.get("num_gpus")
    if gpus is None:  # the device files, not torch: importing torch costs seconds
        gpus = len([p for p in Path("/dev").glob("nvidia[0-9]*")])
    name = str(ccfg.get("node_name") or "local")
    node = NodeInfo(name=name, node_id="", hostname=socket.gethostname(), num_cpus=float(ccfg.get("num_cpus") or os.cpu_count() or 1),
                    num_gpus=float(gpus), via_resource=True)
    return Cluster(nodes={name: node}, owned=False, address=None)


def run(cfg: Any, *, make_generator: Callable[[], Any] | None = None, echo: Callable[[str], None] = print,
        scheduler_hook: Callable[[Scheduler], None] | None = None) -> RunReport:
    """Run (or with dry_run only plan) a campaign. `make_generator` replaces the SDXL generator (tests)."""
    cfg = plain(cfg)
    t_start = time.time()
    report = RunReport(dry_run=bool(cfg.get("dry_run", False)))
    campaign = load_campaign(campaign_source(cfg))
    quality_config(cfg)  # checked before any folder is scanned
    report.campaign = campaign.name
    out = Path(str(cfg.get("out") or "luna_out")).expanduser()
    shards_dir = out / "shards"
    if not report.dry_run:
        check_writable(shards_dir)
    here = _this_machine(cfg) if report.dry_run else None  # a dry run over local folders needs no Ray
    cluster = here or connect(cfg.get("cluster"))
    try:
        inv = inv_mod.scan(cluster, cfg.get("checkpoints") or {}, local=here is not None)
        echo(inv.format())
        workers = dict(cfg.get("workers") or {})
        n_actors = len(actor_specs(cluster.nodes, sorted(inv.scanned), workers))
        the_plan = make_plan(campaign, inv.checkpoints, workers=n_actors)
        report.planned_units, report.planned_images = len(the_plan.units), len(the_plan)
        report.checkpoints = len(the_plan.checkpoints)
        report.skipped_checkpoints = dict(the_plan.skipped)
        if report.dry_run:
            echo(the_plan.format_summary())
            earlier = read_record(record_path(out, campaign.name)).get("poisoned") or {}
            for name, v in earlier.items():
                echo(f"note: checkpoint {name} was stopped by the poison guard in an earlier run into this out= "
                     f"folder ({v.get('reason', '')}); a run skips it")
            return report
        for name, why in the_plan.skipped.items():
            echo(f"skipped checkpoint {name}: {why}")
        index = shards.scan(shards_dir, campaign.name)
        report.cleaned = [str(p) for p in shards.clean_incomplete(index)]
        if report.cleaned:
            echo(f"removed {len(report.cleaned)} interrupted shard write(s) from an earlier run")
        pending, watch = prepare_units(the_plan, inv.by_name(), index, out, cfg, report, echo)
        if not pending:
            echo(f"nothing to do: all {report.skipped_units} units of {campaign.name} are in {shards_dir}")
            return report
        guard, record, rec_file = watch.guard, watch.record, watch.record_file
        ckpts = inv.by_name()
        nodes_needed = sorted({n for u in pending for n in ckpts[u.checkpoint].nodes})
        specs = actor_specs(cluster.nodes, nodes_needed, workers)
        report.actors = len(specs)
        # moved samples only go to checkpoints an actor of this run can load
        watch.unusable = {str(c.name) for c in the_plan.checkpoints if not set(c.nodes) & set(nodes_needed)}
        if make_generator is None:
            import functools

            make_generator = functools.partial(SDXLGenerator, device=str(workers.get("device", "auto")),
                                               dtype=str(workers.get("dtype", "auto")),
                                               threads=int(workers.get("cpus_per_actor", 1) or 1))
        scheduler = Scheduler(specs, ray_actor_factory(cluster, make_generator),
                              max_retries=int(workers.get("max_retries", 3)),
                              inflight=int(workers.get("inflight_per_actor", 2)),
                              node_alive=lambda node: node in list_nodes())
        if scheduler_hook is not None:
            scheduler_hook(scheduler)
        sink = ShardSink(shards_dir, campaign.name, watch.units, index.next_seq, report,
                         units_per_shard=int(cfg.get("units_per_shard", 1) or 1))
        total = sum(len(u.samples) for u in pending)
        echo(f"generating {total} images in {len(pending)} units with {len(specs)} actor(s) on "
             f"{', '.join(nodes_needed)}")
        bar = _progress(total, bool(cfg.get("progress", True)))
        watch.bar = bar
        try:
            failed = True
            try:
                stats = scheduler.run([_task(u, ckpts[u.checkpoint], cfg) for u in pending], sink, bar, guard=watch)
                failed = False
            finally:  # finished units waiting for a full shard are written even on Ctrl-C or an error
                try:
                    sink.flush()
                except shards.ShardWriteError as e:
                    if not failed:
                        raise
                    log.warning("could not write the last shard: %s", e)
        except shards.ShardWriteError as e:
            full = " (disk full)" if e.errno == errno.ENOSPC else ""
            raise FactoryError(f"{e.strerror}{full}; the shards written so far are kept, rerun to resume") from None
        finally:
            if bar is not None:
                bar.close()
            report.loads = scheduler.stats.loads
            report.retries = scheduler.stats.retries
            report.units_done = scheduler.stats.units_done
            report.images = scheduler.stats.images
            report.rejected = scheduler.stats.rejected
            report.seconds = time.time() - t_start
            record["health"] = {c: h.to_dict() for c, h in sorted(guard.health.items())}
            write_record(rec_file, record)
        report.actors = stats.actors_started
        echo(f"done: {report.images} images from {report.units_done} units in {len(report.shards)} shards, "
             f"{report.rejected} rejected"
             + (f" {report.rejected_reasons}" if report.rejected else "")
             + f", {report.loads} pipeline loads, {report.retries} retries, {report.seconds:.1f}s")
        if report.rejected:
            echo(f"note: {report.rejected} sample(s) failed the quality gate on every attempt; "
                 "they are listed in their shards' _stats.json (see docs/factory.md)")
        for name, why in report.poisoned.items():
            echo(f"poisoned checkpoint {name} stopped: {why}")
        if report.poisoned:
            echo(f"{report.moved_samples} sample(s) of stopped checkpoints were rendered by other checkpoints"
                 + (f", {report.unrendered} could not be" if report.unrendered else "") + f"; record: {rec_file}")
        return report
    finally:
        if here is None:
            cluster.close()
