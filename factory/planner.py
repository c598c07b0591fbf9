"""Planner: a campaign × the checkpoint inventory -> deterministic work units.

Each job's quota is balanced over the selected checkpoints (24 over 5 -> 5,5,5,5,4), each
checkpoint gets a contiguous block of sample indices, and the samples are cut into units of
`batch_size` images. Units are ordered checkpoint by checkpoint, so a worker that takes all the
units of one checkpoint in sequence loads it once. A unit's id is a hash of its content
(campaign, job, checkpoint fingerprints, indices, prompts, seeds, sampler settings): a rerun
recognises finished units, and any change to what a unit would produce changes its id.

Sampler settings are resolved per checkpoint: the job's sampler with the campaign's
`sampler_overrides` rules applied (luna.models.sampling.resolve_sampler), checked against the
checkpoint's prediction type (sampling_plan). A checkpoint whose needs cannot be met (a few-step
distilled one that no rule covers, v+ztsnr with a scheduler that cannot rescale, ...) is skipped
here with the reason, before any quota is given to it, never run with defaults.

With `repeats: {checkpoints: K, seeds: S}` each drawn prompt is rendered on K different checkpoints
(other text-encoder families first, then the least loaded) with S seeds each: image `i` of a job is
replica `(i % (K*S)) // S` and seed `i % S` of prompt `i // (K*S)`, under its own key.

Checkpoints are duck-typed: anything with `.name`, `.fingerprint`, `.te_fingerprint`, `.family`,
`.tags` and `.nodes` (factory.inventory.CheckpointInfo), and optionally `.prediction` and
`.distillation` (default epsilon, none).
"""
from __future__ import annotations

import hashlib
import json
import re
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Iterable

from factory.campaign import Campaign, Sampler
from factory.diffusion_schedulers import SCHEDULERS
from factory.errors import CampaignError
from luna.models.sampling import UnsupportedSampling, resolve_sampler, sampling_plan

_KEY_BAD = re.compile(r"[^A-Za-z0-9_\-]")

# Rough defaults when the caller has no measurement (printed as an assumption): SDXL at 1024²
# runs ~10 it/s on an RTX 4090-class GPU and time scales with steps and pixels, plus a fixed
# VAE/encode cost per image; loading one SDXL checkpoint takes ~10 s.
_SECONDS_PER_STEP_MEGAPIXEL = 0.1
_SECONDS_PER_IMAGE_FIXED = 0.02
_SECONDS_PER_LOAD = 10.0
# Storage of the pairs the extraction stage writes from these images (docs/extraction.md): one
# full-size SDXL conditioning per (prompt, text encoders), [77, 2048] + [1280] fp16, and one image
# embedding per image (ViT-H-14, 1024 fp16, with its metadata ~2.1 KB).
_COND_BYTES = (77 * 2048 + 1280) * 2
_IMAGE_EMBED_BYTES = 2100


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
    prompt_index: int | None = None  # with `repeats`: the draw this image renders (None: `index` itself)
    seed_index: int = 0              # with `repeats.seeds`: which of the prompt's seeds


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
        d["sampler"] = Sampler(**d["sampler"])  # timestep_spacing only when a rule set it
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
    checkpoints: list                    # selected and usable, in unit order
    units: list                          # of WorkUnit, checkpoint-contiguous
    seconds_per_image: float | None = None
    workers: int = 1
    notes: list = field(default_factory=list)
    skipped: dict = field(default_factory=dict)   # checkpoint name -> why it is not used (few-step without a rule, ...)
    samplers: dict = field(default_factory=dict)  # (checkpoint name, job) -> the resolved Sampler

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

    def storage(self) -> dict:
        """Pairs storage of this plan (full-size SDXL, fp16): one conditioning per (prompt, text encoders),
        one image embedding per image; and what the same images would need at one image per prompt."""
        conds = {(s.prompt, u.te_fingerprint) for u in self.units for s in u.samples}
        images = len(self)
        return {"images": images, "conditionings": len(conds), "bytes_per_conditioning": _COND_BYTES,
                "bytes": len(conds) * _COND_BYTES + images * _IMAGE_EMBED_BYTES,
                "bytes_one_image_per_prompt": images * (_COND_BYTES + _IMAGE_EMBED_BYTES)}

    def replication(self) -> dict:
        """Per job: prompts drawn, checkpoints and text-encoder families per prompt (min, max)."""
        per: dict = {}
        for u in self.units:
            for s in u.samples:
                p = s.index if s.prompt_index is None else s.prompt_index
                entry = per.setdefault((u.job, p), (set(), set()))
                entry[0].add(u.checkpoint)
                entry[1].add(family_key(self._ckpt(u.checkpoint)))
        out = {}
        for job in self.campaign.jobs:
            rows = [v for (j, _), v in per.items() if j == job]
            if rows:
                out[job] = {"prompts": len(rows),
                            "checkpoints_per_prompt": (min(len(c) for c, _ in rows), max(len(c) for c, _ in rows)),
                            "families_per_prompt": (min(len(f) for _, f in rows), max(len(f) for _, f in rows))}
        return out

    def _ckpt(self, name: str):
        by = self.__dict__.setdefault("_by_name", {str(c.name): c for c in self.checkpoints})
        return by[name]

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
        rep = self.campaign.repeats
        overridden = {}
        for (c, j), smp in self.samplers.items():
            if smp != self.campaign.sampler_for(j):
                overridden.setdefault(c, {})[j] = smp.to_dict()
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
            "skipped_checkpoints": dict(self.skipped),
            "sampler_overrides": overridden,
            "repeats": {"checkpoints": rep.checkpoints, "seeds": rep.seeds, "images_per_prompt": rep.per_prompt},
            "replication": self.replication() if rep.active else {},
            "storage": self.storage(),
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
            over = s["sampler_overrides"].get(c)
            extra = ""
            if over:
                extra = "   (" + "; ".join(f"{j}: {_fmt_sampler(d)}" for j, d in over.items()) + ")"
            lines.append(f"  {c:<40} {n:>8}{extra}")
        for c, why in s["skipped_checkpoints"].items():
            lines.append(f"skipped checkpoint {c}: {why}")
        rep = s["repeats"]
        if rep["images_per_prompt"] > 1:
            for j, r in s["replication"].items():
                cmin, cmax = r["checkpoints_per_prompt"]
                fmin, fmax = r["families_per_prompt"]
                lines.append(f"repeats {self.campaign.category(j)}: {r['prompts']} prompts x {rep['checkpoints']} "
                             f"checkpoints x {rep['seeds']} seeds = {s['jobs'].get(j, 0)} images; "
                             f"checkpoints per prompt {_span(cmin, cmax)}, text-encoder families per prompt "
                             f"{_span(fmin, fmax)}")
        lines.append(f"unique prompts: {s['unique_prompts']} of {s['total_images']}")
        st = s["storage"]
        lines.append(f"storage estimate (pairs, full-size SDXL, fp16): {st['conditionings']:,} conditionings "
                     f"(one per prompt and text encoders) x {st['bytes_per_conditioning']:,} B + "
                     f"{st['images']:,} image embeddings = {_fmt_bytes(st['bytes'])}"
                     + (f" ({_fmt_bytes(st['bytes_one_image_per_prompt'])} at one image per prompt)"
                        if rep["images_per_prompt"] > 1 else ""))
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


def _span(lo: int, hi: int) -> str:
    return str(lo) if lo == hi else f"{lo}-{hi}"


def _fmt_sampler(d: dict) -> str:
    out = f"{d['steps']} steps, cfg {d['cfg']:g}, {d['scheduler']}"
    return out + (f" {d['timestep_spacing']}" if d.get("timestep_spacing") else "")


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000.0
    return f"{n:.1f} TB"


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


def family_key(ckpt) -> str:
    """What `repeats` spreads a prompt over: the inventory's family, or the text-encoder fingerprint
    when the family is unknown (two unknown checkpoints with other encoders are other families)."""
    fam = getattr(ckpt, "family", None)
    if fam and fam != "unknown":
        return str(fam)
    return f"te:{getattr(ckpt, 'te_fingerprint', '') or ckpt.name}"


def checkpoint_sampler(campaign: Campaign, job: str, ckpt) -> Sampler:
    """The job's sampler with the campaign's sampler_overrides applied for `ckpt`, checked against
    its prediction type; UnsupportedSampling (the reason) when the checkpoint's needs cannot be met."""
    base = campaign.sampler_for(job)
    settings = resolve_sampler(base.to_dict(), str(ckpt.name), getattr(ckpt, "family", None),
                               getattr(ckpt, "distillation", "none") or "none", campaign.sampler_overrides)
    sampler = Sampler(**settings)
    prediction = getattr(ckpt, "prediction", "epsilon") or "epsilon"
    sampling_plan({}, SCHEDULERS[sampler.scheduler], prediction, sampler.timestep_spacing)  # raises when unmet
    return sampler


def make_unit(campaign: Campaign, job: str, ckpt, sampler: Sampler, samples: list) -> WorkUnit:
    fp, te = str(ckpt.fingerprint), str(getattr(ckpt, "te_fingerprint", "") or "")
    return WorkUnit(id=unit_id(campaign.name, job, fp, te, sampler, samples), campaign=campaign.name, job=job,
                    category=campaign.category(job), checkpoint=str(ckpt.name), fingerprint=fp, te_fingerprint=te,
                    family=getattr(ckpt, "family", None), nodes=list(getattr(ckpt, "nodes", []) or []),
                    samples=samples, sampler=sampler)


def _planned(campaign: Campaign, job: str, i: int, cache: dict) -> PlannedSample:
    """Image `i` of `job` (a draw index without repeats; replica/seed of a prompt with them)."""
    rep = campaign.repeats
    if not rep.active:
        d = campaign.draw(job, i)
        return PlannedSample(index=i, key=sample_key(campaign.name, job, i), prompt=d.prompt, negative=d.negative,
                             seed=d.seed, template=d.template, choices=d.choices)
    p, seed_index = i // rep.per_prompt, i % rep.seeds
    d = cache.get(p)
    if d is None:
        cache.clear()  # images of one prompt are placed together: one draw in memory at a time
        d = cache[p] = campaign.draw(job, p)
    return PlannedSample(index=i, key=sample_key(campaign.name, job, i), prompt=d.prompt, negative=d.negative,
                         seed=campaign.replica_seed(d.seed, seed_index), template=d.template, choices=d.choices,
                         prompt_index=p, seed_index=seed_index)


def _pick(candidates: list, families: set, load: Counter, avoid: set = frozenset()):
    """The checkpoint for one more replica: not `avoid`, another family first, then the least loaded."""
    return min(candidates, key=lambda kc: (kc[1].name in avoid, family_key(kc[1]) in families, load[kc[1].name], kc[0]))


def plan(campaign: Campaign, checkpoints: Iterable, *, seconds_per_image: float | None = None,
         workers: int = 1) -> Plan:
    """Expand `campaign` over the selected `checkpoints` into checkpoint-contiguous work units."""
    all_ckpts = list(checkpoints)
    chosen = select_checkpoints(campaign, all_ckpts)
    notes = []
    dup = len([c for c in all_ckpts if campaign.checkpoints.matches(c)]) - len(chosen)
    if dup:
        notes.append(f"{dup} selected checkpoint(s) share a fingerprint with another and were skipped")
    selected, skipped, samplers = [], {}, {}
    for ckpt in chosen:  # each checkpoint's sampler settings, or the reason it cannot be used
        try:
            mine = {j: checkpoint_sampler(campaign, j, ckpt) for j in campaign.jobs}
        except UnsupportedSampling as e:
            skipped[str(ckpt.name)] = str(e)
            continue
        selected.append(ckpt)
        samplers.update({(str(ckpt.name), j): smp for j, smp in mine.items()})
    if not selected:
        why = "; ".join(f"{c}: {r}" for c, r in skipped.items())
        raise CampaignError(f"every selected checkpoint was skipped: {why}", campaign.source,
                            campaign.sampler_overrides_line or campaign.checkpoints.line, "sampler_overrides")
    n = len(selected)
    rep = campaign.repeats
    if rep.checkpoints > n:
        raise CampaignError(f"repeats.checkpoints={rep.checkpoints} renders each prompt on {rep.checkpoints} different "
                            f"checkpoints, but only {n} can be used ({', '.join(str(c.name) for c in selected)}"
                            + (f"; skipped: {', '.join(skipped)}" if skipped else "") + ")",
                            campaign.source, rep.line, "repeats/checkpoints")
    # per checkpoint, per job: the image indices it renders (ascending)
    indices: list[list[tuple[str, Iterable[int]]]] = [[] for _ in selected]
    if not rep.active:  # contiguous blocks, balanced (24 over 5 -> 5,5,5,5,4)
        offset = 0
        for job in campaign.jobs.values():
            counts = balance(job.quota, n, offset)
            offset = (offset + job.quota % n) % n  # spread the remainders over checkpoints across jobs
            start = 0
            for k, c in enumerate(counts):
                if c:
                    indices[k].append((job.name, range(start, start + c)))
                start += c
    else:  # each prompt on K checkpoints: other families first, then the least loaded
        load: Counter = Counter()
        candidates = list(enumerate(selected))
        for job in campaign.jobs.values():
            mine: list[list[int]] = [[] for _ in selected]
            for p in range(campaign.prompts_for(job.name)):
                picked, families = [], set()
                for r in range(rep.checkpoints):
                    k, ckpt = _pick([kc for kc in candidates if kc[0] not in picked], families, load)
                    picked.append(k)
                    families.add(family_key(ckpt))
                    load[ckpt.name] += rep.seeds
                    first = p * rep.per_prompt + r * rep.seeds
                    mine[k].extend(range(first, first + rep.seeds))
            for k, idx in enumerate(mine):
                if idx:
                    indices[k].append((job.name, idx))
    units = []
    cache: dict = {}
    for ckpt, per_job in zip(selected, indices):
        for job_name, idx in per_job:
            sampler = samplers[(str(ckpt.name), job_name)]
            idx = list(idx)
            for b in range(0, len(idx), sampler.batch_size):
                samples = [_planned(campaign, job_name, i, cache) for i in idx[b:b + sampler.batch_size]]
                units.append(make_unit(campaign, job_name, ckpt, sampler, samples))
    if skipped:
        notes.append(f"{len(skipped)} checkpoint(s) skipped: their sampling needs are not met (see above)")
    return Plan(campaign=campaign, checkpoints=selected, units=units, seconds_per_image=seconds_per_image,
                workers=workers, notes=notes, skipped=skipped, samplers=samplers)


def reassign(the_plan: Plan, samples: dict, stopped: Iterable[str]) -> list[WorkUnit]:
    """New units rendering `samples` ({job: [PlannedSample]}) on the plan's checkpoints that are not
    `stopped`: per sample, a checkpoint that does not already render its prompt (repeats), then
    another family than the prompt's other images, then the least loaded. [] when none is left."""
    stopped = set(stopped)
    healthy = [(k, c) for k, c in enumerate(the_plan.checkpoints) if str(c.name) not in stopped]
    if not healthy:
        return []
    load: Counter = Counter()
    renders: dict = {}  # (job, prompt) -> checkpoints already rendering it
    for u in the_plan.units:
        load[u.checkpoint] += len(u.samples)
        for s in u.samples:
            renders.setdefault((u.job, s.index if s.prompt_index is None else s.prompt_index), set()).add(u.checkpoint)
    units = []
    for job, job_samples in samples.items():
        per: dict = {}
        for s in sorted(job_samples, key=lambda s: s.index):
            have = renders.get((job, s.index if s.prompt_index is None else s.prompt_index), set())
            fams = {family_key(the_plan._ckpt(c)) for c in have if c not in stopped}
            k, ckpt = _pick(healthy, fams, load, avoid={c for c in have if c not in stopped})
            load[ckpt.name] += 1
            per.setdefault(k, []).append(s)
        for k in sorted(per):
            ckpt = the_plan.checkpoints[k]
            sampler = the_plan.samplers[(str(ckpt.name), job)]
            chunk = per[k]
            for b in range(0, len(chunk), sampler.batch_size):
                units.append(make_unit(the_plan.campaign, job, ckpt, sampler, chunk[b:b + sampler.batch_size]))
    return units
