"""Planner: a campaign × the checkpoint inventory -> deterministic work units.

Each job's quota is balanced over the selected checkpoints (24 over 5 -> 5,5,5,5,4), each
checkpoint gets a contiguous block of sample indices, and the samples are cut into units of
`batch_size` images. Units are ordered checkpoint by checkpoint, so a worker that takes all the
units of one checkpoint in sequence loads it once. A unit's id is a hash of its content
(campaign, job, checkpoint fingerprints, indices, prompts, seeds, sampler settings): a rerun
recognises finished units, and any change to what a unit would produce changes its id.

Checkpoints are duck-typed: anything with `.name`, `.fingerprint`, `.te_fingerprint`, `.family`,
`.tags` and `.nodes` (factory.inventory.CheckpointInfo).
"""
from __future__ import annotations

import hashlib
import json
import re
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Iterable

from factory.campaign import Campaign, Sampler
from factory.errors import CampaignError

_KEY_BAD = re.compile(r"[^A-Za-z0-9_\-]")

# Rough defaults when the caller has no measurement (printed as an assumption): SDXL at 1024²
# runs ~10 it/s on an RTX 4090-class GPU and time scales with steps and pixels, plus a fixed
# VAE/encode cost per image; loading one SDXL checkpoint takes ~10 s.
_SECONDS_PER_STEP_MEGAPIXEL = 0.1
_SECONDS_PER_IMAGE_FIXED = 0.02
_SECONDS_PER_LOAD = 10.0


def sample_key(campaign: str, job: str, index: int) -> str:
    """Shard key of a sample: unique per (campaign, job, index), dot-free, stable."""
    return _KEY_BAD.sub("-", f"{campaign}_{job}_{index:06d}")


@dataclass
class PlannedSample:
    """A campaign draw placed in a work unit, under its shard key."""
    index: int
    key: str
    prompt: str
    negative: str
    seed: int
    template: str
    choices: dict


@dataclass
class WorkUnit:
    """One batch of images for one checkpoint: plain data, picklable, sent to Ray actors."""
    id: str
    campaign: str
    job: str
    category: str
    checkpoint: str
    fingerprint: str
    te_fingerprint: str
    family: str | None
    nodes: list
    samples: list  # of PlannedSample
    sampler: Sampler

    def __len__(self) -> int:
        return len(self.samples)

    @property
    def keys(self) -> list[str]:
        return [s.key for s in self.samples]

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "WorkUnit":
        d = dict(d)
        d["samples"] = [PlannedSample(**s) for s in d["samples"]]
        d["sampler"] = Sampler(**d["sampler"])
        d["nodes"] = list(d["nodes"])
        return cls(**d)


def unit_id(campaign: str, job: str, fingerprint: str, te_fingerprint: str, sampler: Sampler,
            samples: Iterable[PlannedSample]) -> str:
    """Content hash: same campaign/job/checkpoint/samples/settings -> same id, in any process."""
    payload = {
        "v": 1, "campaign": campaign, "job": job, "fingerprint": fingerprint,
        "te_fingerprint": te_fingerprint, "sampler": sampler.to_dict(),
        "samples": [[s.index, s.key, s.prompt, s.negative, s.seed] for s in samples],
    }
    blob = json.dumps(payload, sort_keys=True, ensure_ascii=False, separators=(",", ":")).encode()
    return hashlib.sha256(blob).hexdigest()[:24]


def balance(quota: int, n: int, offset: int = 0) -> list[int]:
    """Split `quota` over `n` bins as evenly as possible; the extra ones start at bin `offset`."""
    base, extra = divmod(quota, n)
    counts = [base] * n
    for k in range(extra):
        counts[(offset + k) % n] += 1
    return counts


def select_checkpoints(campaign: Campaign, checkpoints: Iterable) -> list:
    """The campaign's checkpoints, sorted by name; one per fingerprint; none -> CampaignError."""
    checkpoints = list(checkpoints)
    sel = campaign.checkpoints
    chosen = sorted((c for c in checkpoints if sel.matches(c)), key=lambda c: (str(c.name), str(c.fingerprint)))
    seen, unique = set(), []
    for c in chosen:  # the same file under two names is one model: generate with it once
        if c.fingerprint not in seen:
            seen.add(c.fingerprint)
            unique.append(c)
    if not unique:
        names = sorted(str(c.name) for c in checkpoints)
        shown = ", ".join(names[:30]) + (f", … ({len(names)} in all)" if len(names) > 30 else "")
        rule = f"include={list(sel.include)}"
        if sel.exclude:
            rule += f" exclude={list(sel.exclude)}"
        if sel.tags:
            rule += f" tags={list(sel.tags)}"
        if sel.families:
            rule += f" families={list(sel.families)}"
        raise CampaignError(f"no checkpoint matched {rule}; available: {shown or 'none (the inventory is empty)'}",
                            campaign.source, sel.line, "checkpoints")
    return unique


@dataclass
class Plan:
    campaign: Campaign
    checkpoints: list                    # selected, in unit order
    units: list                          # of WorkUnit, checkpoint-contiguous
    seconds_per_image: float | None = None
    workers: int = 1
    notes: list = field(default_factory=list)

    def __len__(self) -> int:
        return sum(len(u.samples) for u in self.units)

    def __iter__(self):
        return iter(self.units)

    def units_for_checkpoint(self, name: str) -> list:
        return [u for u in self.units if u.checkpoint == name]

    def remaining(self, finished_ids: Iterable[str]) -> list:
        done = set(finished_ids)
        return [u for u in self.units if u.id not in done]

    def _seconds_per_image(self) -> tuple[float, bool]:
        if self.seconds_per_image is not None:
            return float(self.seconds_per_image), True
        total = 0.0
        for u in self.units:
            s = u.sampler
            per = s.steps * (s.width * s.height / 1024**2) * _SECONDS_PER_STEP_MEGAPIXEL + _SECONDS_PER_IMAGE_FIXED
            total += len(u.samples) * per
        return (total / len(self) if len(self) else 0.0), False

    def summary(self, n_examples: int = 5) -> dict:
        per_job = Counter()
        per_ckpt = Counter()
        per_job_ckpt: dict = {}
        prompts = set()
        for u in self.units:
            per_job[u.job] += len(u.samples)
            per_ckpt[u.checkpoint] += len(u.samples)
            per_job_ckpt.setdefault(u.job, Counter())[u.checkpoint] += len(u.samples)
            prompts.update(s.prompt for s in u.samples)
        examples = []
        for job in self.campaign.jobs:
            for u in self.units:
                if u.job == job:
                    examples += [s.prompt for s in u.samples[:2]]
                    break
        spi, measured = self._seconds_per_image()
        workers = max(1, int(self.workers))
        return {
            "campaign": self.campaign.name,
            "total_images": len(self),
            "jobs": dict(per_job),
            "checkpoints": dict(per_ckpt),
            "per_job_checkpoint": {j: dict(c) for j, c in per_job_ckpt.items()},
            "units": len(self.units),
            "checkpoint_loads": _switches(self.units),
            "unique_prompts": len(prompts),
            "combinations": {j: self.campaign.combinations(j) for j in self.campaign.jobs},
            "sample_prompts": examples[:max(n_examples, len(self.campaign.jobs))],
            "seconds_per_image": spi,
            "seconds_per_image_measured": measured,
            "workers": workers,
            "estimated_seconds": (spi * len(self) + _SECONDS_PER_LOAD * _switches(self.units)) / workers,
            "notes": list(self.notes),
        }

    def format_summary(self) -> str:
        s = self.summary()
        lines = [f"campaign {s['campaign']}: {s['total_images']} images in {s['units']} units, "
                 f"{len(s['checkpoints'])} checkpoints ({s['checkpoint_loads']} pipeline loads)"]
        lines.append("per job:")
        for j, n in s["jobs"].items():
            comb = s["combinations"][j]
            comb_txt = f"{comb:,}" if comb < 10**15 else f"~1e{len(str(comb)) - 1}"
            lines.append(f"  {self.campaign.category(j):<40} {n:>8}   ({comb_txt} combinations)")
        lines.append("per checkpoint:")
        for c, n in s["checkpoints"].items():
            lines.append(f"  {c:<40} {n:>8}")
        lines.append(f"unique prompts: {s['unique_prompts']} of {s['total_images']}")
        lines.append("sample prompts:")
        lines += [f"  - {p}" for p in s["sample_prompts"]]
        how = "measured" if s["seconds_per_image_measured"] else "rough default for a 4090-class GPU"
        lines.append(f"estimated time: {_fmt_duration(s['estimated_seconds'])} "
                     f"({s['seconds_per_image']:.3g} s/image, {how}; {s['checkpoint_loads']} loads of "
                     f"~{_SECONDS_PER_LOAD:.0f} s; {s['workers']} worker(s))")
        lines += [f"note: {n}" for n in s["notes"]]
        return "\n".join(lines)

    def to_dict(self) -> dict:
        return {"campaign": self.campaign.name, "units": [u.to_dict() for u in self.units],
                "summary": self.summary()}


def _switches(units) -> int:
    loads, last = 0, None
    for u in units:
        if u.fingerprint != last:
            loads, last = loads + 1, u.fingerprint
    return loads


def _fmt_duration(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.1f}s"
    seconds = int(round(seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s"


def plan(campaign: Campaign, checkpoints: Iterable, *, seconds_per_image: float | None = None,
         workers: int = 1) -> Plan:
    """Expand `campaign` over the selected `checkpoints` into checkpoint-contiguous work units."""
    all_ckpts = list(checkpoints)
    selected = select_checkpoints(campaign, all_ckpts)
    notes = []
    dup = len([c for c in all_ckpts if campaign.checkpoints.matches(c)]) - len(selected)
    if dup:
        notes.append(f"{dup} selected checkpoint(s) share a fingerprint with another and were skipped")
    n = len(selected)
    # per checkpoint, per job: the contiguous index range it renders
    ranges: list[list[tuple[str, int, int]]] = [[] for _ in selected]
    offset = 0
    for job in campaign.jobs.values():
        counts = balance(job.quota, n, offset)
        offset = (offset + job.quota % n) % n  # spread the remainders over checkpoints across jobs
        start = 0
        for k, c in enumerate(counts):
            if c:
                ranges[k].append((job.name, start, start + c))
            start += c
    units = []
    for ckpt, rs in zip(selected, ranges):
        for job_name, start, stop in rs:
            sampler = campaign.sampler_for(job_name)
            bs = sampler.batch_size
            for b in range(start, stop, bs):
                samples = []
                for i in range(b, min(b + bs, stop)):
                    drawn = campaign.draw(job_name, i)
                    samples.append(PlannedSample(index=i, key=sample_key(campaign.name, job_name, i),
                                                 prompt=drawn.prompt, negative=drawn.negative, seed=drawn.seed,
                                                 template=drawn.template, choices=drawn.choices))
                fp, te = str(ckpt.fingerprint), str(getattr(ckpt, "te_fingerprint", "") or "")
                units.append(WorkUnit(
                    id=unit_id(campaign.name, job_name, fp, te, sampler, samples),
                    campaign=campaign.name, job=job_name, category=campaign.category(job_name),
                    checkpoint=str(ckpt.name), fingerprint=fp, te_fingerprint=te,
                    family=getattr(ckpt, "family", None), nodes=list(getattr(ckpt, "nodes", []) or []),
                    samples=samples, sampler=sampler))
    return Plan(campaign=campaign, checkpoints=selected, units=units,
                seconds_per_image=seconds_per_image, workers=workers, notes=notes)
