"""The campaign model: jobs with quotas and templates, wildcard lists, sampler settings, and
counter-based drawing.

`Campaign.draw(job, index)` draws prompt `index` of a job deterministically from (campaign name,
job, index, base seed) with a counter-based hash RNG, so a draw never depends on how many others
were drawn, nor on the Python or numpy version. The model is plain data: `factory.campaign_file`
reads and validates a campaign file into it, `factory.template` parses and renders its templates.
"""
from __future__ import annotations

import bisect
import fnmatch
import hashlib
import itertools
import math
import operator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from factory.errors import CampaignError
from factory.template import COMBINATIONS_CAP, clean, count_combinations, render


@dataclass(frozen=True)
class Sampler:
    steps: int = 20
    cfg: float = 5.0
    scheduler: str = "euler"
    width: int = 336
    height: int = 336
    batch_size: int = 8
    timestep_spacing: str | None = None  # only from a sampler_overrides rule; None: the scheduler's own

    def to_dict(self) -> dict:
        d = dict(steps=self.steps, cfg=self.cfg, scheduler=self.scheduler, width=self.width,
                 height=self.height, batch_size=self.batch_size)
        if self.timestep_spacing is not None:  # absent otherwise: the unit ids of earlier plans stay the same
            d["timestep_spacing"] = self.timestep_spacing
        return d


@dataclass(frozen=True)
class CheckpointSelection:
    """Which checkpoints a campaign runs on: name globs in, name globs out, tags/families (any of)."""
    include: tuple = ("*",)
    exclude: tuple = ()
    tags: tuple = ()
    families: tuple = ()
    line: int | None = None

    def matches(self, ckpt) -> bool:
        name = str(ckpt.name)
        if not any(fnmatch.fnmatchcase(name, g) for g in self.include):
            return False
        if any(fnmatch.fnmatchcase(name, g) for g in self.exclude):
            return False
        if self.tags and not set(self.tags) & set(getattr(ckpt, "tags", ()) or ()):
            return False
        if self.families and getattr(ckpt, "family", None) not in self.families:
            return False
        return True


@dataclass(frozen=True)
class SeedPolicy:
    """`per_sample`: each sample gets its own seed derived from (campaign, job, index, base);
    `fixed`: every image uses `base` (prompts still vary)."""
    base: int = 0
    mode: str = "per_sample"


@dataclass(frozen=True)
class Repeats:
    """`repeats: {checkpoints: K, seeds: S}`: each drawn prompt is rendered on K different checkpoints
    (spread over text-encoder families where possible) with S seeds each, K*S images per prompt."""
    checkpoints: int = 1
    seeds: int = 1
    line: int | None = None

    @property
    def per_prompt(self) -> int:
        return self.checkpoints * self.seeds

    @property
    def active(self) -> bool:
        return self.per_prompt > 1


@dataclass(frozen=True)
class Job:
    name: str
    quota: int
    templates: tuple  # of Template
    negative_prompt: str | None = None  # None: the campaign's
    sampler: Sampler | None = None      # resolved (campaign's settings with the job's overrides)
    line: int | None = None


@dataclass
class Draw:
    """What a campaign draws for one index of a job: the prompts, the seed and how they were made."""
    index: int
    prompt: str
    negative: str
    job: str
    category: str
    template: str
    choices: dict
    seed: int
    campaign: str = ""


class CounterRNG:
    """Counter-based RNG: draw k of a sample is blake2b(key, k): independent of every other sample
    and stable across Python/numpy versions."""

    def __init__(self, key: bytes):
        self.key, self.counter = key, 0

    def random(self) -> float:
        d = hashlib.blake2b(self.counter.to_bytes(8, "little"), key=self.key, digest_size=8).digest()
        self.counter += 1
        return (int.from_bytes(d, "little") >> 11) / float(1 << 53)

    def pick(self, weights) -> int:
        total = math.fsum(weights)
        u = self.random() * total
        acc = 0.0
        last = 0
        for i, w in enumerate(weights):
            if w <= 0:
                continue
            acc += w
            last = i
            if u < acc:
                return i
        return last

    def pick_cumulative(self, cum: list) -> int:
        """`pick` over precomputed cumulative weights (long wildcard lists): O(log n)."""
        i = bisect.bisect_right(cum, self.random() * cum[-1])
        while i >= len(cum) or (i > 0 and cum[i] == cum[i - 1]):  # float edge: back to a real entry
            i -= 1
        return i


def _rng_key(campaign: str, job: str, index: int, seed: int) -> bytes:
    """The key of draw `index`'s random stream (not a shard key: see factory.planner.sample_key)."""
    msg = "\x1f".join(["luna-campaign-v1", campaign, job, str(index), str(seed)]).encode()
    return hashlib.blake2b(msg, digest_size=32).digest()


@dataclass
class Campaign:
    name: str
    source: Path | None
    wildcards: dict            # path -> tuple[Template, ...]
    jobs: dict                 # name -> Job (YAML order)
    negative_prompt: str = ""
    sampler: Sampler = field(default_factory=Sampler)
    checkpoints: CheckpointSelection = field(default_factory=CheckpointSelection)
    seed: SeedPolicy = field(default_factory=SeedPolicy)
    description: str = ""
    wildcards_dirs: tuple = ()
    negative_templates: dict = field(default_factory=dict, repr=False)  # text -> Template
    sampler_overrides: tuple = ()  # of dicts (luna.models.sampling rules), applied per checkpoint by the planner
    sampler_overrides_line: int | None = None
    repeats: Repeats = field(default_factory=Repeats)

    # ---- lookups
    def job(self, name: str) -> Job:
        try:
            return self.jobs[name]
        except KeyError:
            raise CampaignError(f"unknown job {name!r}; jobs: {', '.join(self.jobs)}",
                                self.source, None, name) from None

    def category(self, job: str) -> str:
        return f"{self.name}/{job}"

    def sampler_for(self, job: str) -> Sampler:
        return self.job(job).sampler or self.sampler

    def negative_for(self, job: str) -> str:
        j = self.job(job)
        return self.negative_prompt if j.negative_prompt is None else j.negative_prompt

    @property
    def total_quota(self) -> int:
        return sum(j.quota for j in self.jobs.values())

    def resolve(self, path: str) -> list[str]:
        """The leaf list paths a reference names (itself, or every match of a glob)."""
        if any(c in path for c in "*?["):
            return sorted(p for p in self.wildcards if fnmatch.fnmatchcase(p, path))
        return [path] if path in self.wildcards else []

    # ---- drawing
    def seed_for(self, job: str, index: int) -> int:
        """The generation seed of draw `index` of `job` (the base seed in `fixed` mode)."""
        if self.seed.mode == "fixed":
            return self.seed.base
        d = _rng_key(self.name, job, index, self.seed.base)
        return int.from_bytes(hashlib.blake2b(d, digest_size=8).digest(), "little") & ((1 << 53) - 1)

    def replica_seed(self, seed: int, replica: int) -> int:
        """The seed of a prompt's `replica`-th seed under `repeats.seeds` (0: the draw's own seed)."""
        if replica == 0:
            return int(seed)
        msg = f"luna-replica-v1\x1f{int(seed)}\x1f{int(replica)}".encode()
        return int.from_bytes(hashlib.blake2b(msg, digest_size=8).digest(), "little") & ((1 << 53) - 1)

    def prompts_for(self, job: str) -> int:
        """Prompts drawn for a job: its quota over the images per prompt (`repeats`)."""
        return self.job(job).quota // self.repeats.per_prompt

    def draw(self, job: str, index: int) -> Draw:
        """Draw `index` of `job`: a pure function of (campaign name, job, index, base seed) and
        the campaign's contents."""
        j = self.job(job)
        index = operator.index(index)
        if index < 0:
            raise ValueError(f"draw index must be >= 0, got {index}")
        rng = CounterRNG(_rng_key(self.name, job, index, self.seed.base))
        t = j.templates[rng.pick([t.weight for t in j.templates])] if len(j.templates) > 1 else j.templates[0]
        choices: dict = {}
        prompt = clean(render(t.parts, rng, self._entries, choices, [0], self.source))
        neg_text = self.negative_for(job)
        neg_t = self.negative_templates.get(neg_text)
        negative = clean(render(neg_t.parts, rng, self._entries, {}, [0], self.source)) if neg_t else neg_text
        return Draw(index=index, prompt=prompt, negative=negative, job=job,
                    category=self.category(job), template=t.text, choices=choices,
                    seed=self.seed_for(job, index), campaign=self.name)

    def draws(self, job: str, start: int = 0, stop: int | None = None) -> Iterator[Draw]:
        """Draws start..stop (default: the whole quota) of a job."""
        stop = self.job(job).quota if stop is None else stop
        for i in range(start, stop):
            yield self.draw(job, i)

    def _entries(self, path: str) -> tuple:
        """(entries, cumulative weights) of a reference; a glob pools every matching list."""
        cache = self.__dict__.setdefault("_entries_cache", {})
        if path not in cache:
            entries = tuple(t for p in self.resolve(path) for t in self.wildcards[p])
            cache[path] = (entries, list(itertools.accumulate(t.weight for t in entries)))
        return cache[path]

    # ---- arithmetic
    def combinations(self, job: str) -> int:
        """Distinct draws of a job's templates (entries counted as distinct), saturating at
        COMBINATIONS_CAP; computed arithmetically, never by enumeration. Templates weighted 0 (never
        drawn) do not count."""
        memo: dict = {}
        total = 0
        for t in self.job(job).templates:
            if t.weight <= 0:
                continue
            total = min(COMBINATIONS_CAP, total + count_combinations(t.parts, self._entries, memo))
        return total
