"""Campaigns: a YAML file of hierarchical wildcards, jobs with quotas and templates, sampler settings.

`load_campaign(path_or_name)` reads and validates the whole file (every template, every wildcard
entry, every reference) and raises `CampaignError` naming the file, the line and the wildcard
path at fault before anything else is loaded. `Campaign.sample(job, index)` draws sample `index`
of a job deterministically from (campaign name, job, index, base seed) with a counter-based
hash RNG, so a sample never depends on how many others were drawn, nor on the Python or
numpy version.

Template syntax (the dynamicprompts subset we use):
  __eyes/color__        a random entry of the wildcard list at path `eyes/color` (recursive)
  __eyes/*__            a random entry of every list under `eyes` (fnmatch glob on paths)
  {a|b|c}               one option, uniformly
  {3::grey|violet}      weighted options (weights are relative; default 1)
  {2$$a|b|c}            two distinct options joined by ", " ({1-3$$…} a range, {2$$ and $$…} a joiner)
  "2::red"              a weighted wildcard entry or template (a leading `N::`)
  \\{ \\} \\| \\\\          literal characters
Options may nest braces and references: `{red|{dark|light} __colors/blue__}`.
"""
from __future__ import annotations

import difflib
import fnmatch
import bisect
import hashlib
import itertools
import math
import operator
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Iterator, Mapping

import yaml

from luna import CONF_DIR

CAMPAIGN_DIR = CONF_DIR / "campaign"

# Bounds that keep hostile input cheap: every one is far above what a real campaign needs.
MAX_FILE_BYTES = 4 * 1024 * 1024        # the campaign YAML
MAX_WILDCARD_FILE_BYTES = 16 * 1024 * 1024  # one .txt file of a wildcards folder
MAX_YAML_DEPTH = 64          # nesting of YAML mappings/sequences
MAX_BRACE_DEPTH = 32         # nesting of {…} inside one string
MAX_REFERENCE_DEPTH = 64     # __a__ -> __b__ -> … chain length
MAX_EXPANSIONS = 10_000      # wildcard references expanded while rendering one prompt
MAX_WILDCARD_ENTRIES = 200_000   # entries plus groups, after YAML aliases are expanded
COMBINATIONS_CAP = 10**30    # combinations() saturates here (it is arithmetic, never enumerated)
MAX_QUOTA = 100_000_000      # images per job (plans are built in memory)
MAX_SEED = 2**63 - 1         # torch.Generator.manual_seed takes 64-bit seeds

NAME_RE = re.compile(r"^[A-Za-z0-9_]+$")           # campaign and job names: go into shard names/keys
SEGMENT_RE = re.compile(r"^[A-Za-z0-9_\-]+$")      # one level of a wildcard path
# Possessive quantifiers (*+) never backtrack: long runs of spaces cannot make a match quadratic.
_REF_RE = re.compile(r"__([A-Za-z0-9*](?:[A-Za-z0-9\-/*]|_(?!_))*+)__")
_REF_START_RE = re.compile(r"__[A-Za-z0-9*]")
_WEIGHT_PREFIX_RE = re.compile(r"([^|{}:]*+)::")
_WS_RE = re.compile(r"\s+")
_PICK_RE = re.compile(r"\s*+(\d*+)\s*+(-?)\s*+(\d*+)\s*+\$\$")
_JOINER_RE = re.compile(r"([^|{}$]*+)\$\$")
_LITERAL_RE = re.compile(r"[^\\{}|_]++")

TOP_KEYS = ("campaign", "description", "wildcards", "wildcards_dir", "jobs", "negative_prompt",
            "sampler", "checkpoints", "seed")
JOB_KEYS = ("quota", "templates", "negative_prompt", "sampler", "description")
SAMPLER_KEYS = ("steps", "cfg", "scheduler", "width", "height", "resolution", "batch_size")
CHECKPOINT_KEYS = ("include", "exclude", "tags", "families")
SEED_KEYS = ("base", "mode")
SEED_MODES = ("per_sample", "fixed")


class CampaignError(ValueError):
    """A campaign the user wrote is wrong; the message names the file, the line and the path."""

    def __init__(self, message: str, file: str | Path | None = None, line: int | None = None,
                 path: str | None = None):
        self.file, self.line, self.path, self.reason = (str(file) if file else None), line, path, message
        where = str(file) if file else "<campaign>"
        if line is not None:
            where += f":{line}"
        if path:
            where += f": {path}"
        super().__init__(f"{where}: {message}")


# --------------------------------------------------------------------------- YAML with line numbers

class _Str(str):
    line: int | None = None


class _Map(dict):
    line: int | None = None
    key_lines: dict


class _List(list):
    line: int | None = None
    item_lines: list


class _Loader(yaml.SafeLoader):
    """yaml.safe_load semantics; mappings, sequences and strings remember their line.

    Pure Python on purpose (libyaml's composer recurses in C); nesting depth is bounded while
    composing, so a 10,000-deep document fails after MAX_YAML_DEPTH levels, not in a stack overflow."""

    _depth = 0

    def compose_node(self, parent, index):
        self._depth += 1
        try:
            if self._depth > MAX_YAML_DEPTH:
                raise CampaignError(f"YAML nested deeper than {MAX_YAML_DEPTH} levels", self.name,
                                    self.peek_event().start_mark.line + 1)
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1


def _construct_str(loader, node):
    s = _Str(loader.construct_scalar(node))
    s.line = node.start_mark.line + 1
    return s


def _construct_seq(loader, node):
    out = _List()
    out.line = node.start_mark.line + 1
    out.item_lines = [n.start_mark.line + 1 for n in node.value]
    yield out
    out.extend(loader.construct_object(n, deep=True) for n in node.value)


def _construct_map(loader, node):
    out = _Map()
    out.line = node.start_mark.line + 1
    out.key_lines = {}
    yield out
    loader.flatten_mapping(node)
    for key_node, value_node in node.value:
        key = loader.construct_object(key_node, deep=True)
        line = key_node.start_mark.line + 1
        try:
            hash(key)
        except TypeError:
            raise CampaignError("mapping keys must be plain values", loader.name, line) from None
        if key in out:
            raise CampaignError(f"duplicate key {str(key)!r} (first on line {out.key_lines[key]})",
                                loader.name, line)
        out.key_lines[key] = line
        out[key] = loader.construct_object(value_node, deep=True)


_Loader.add_constructor("tag:yaml.org,2002:str", _construct_str)
_Loader.add_constructor("tag:yaml.org,2002:seq", _construct_seq)
_Loader.add_constructor("tag:yaml.org,2002:map", _construct_map)


def _line(obj, default=None):
    return getattr(obj, "line", None) or default


def _key_line(mapping, key, default=None):
    return getattr(mapping, "key_lines", {}).get(key) or _line(mapping, default)


def read_yaml(text: str, source: str) -> Any:
    """yaml.safe_load with line numbers and bounded size and depth (no recursion blow-up)."""
    if len(text.encode("utf-8", "surrogatepass")) > MAX_FILE_BYTES:
        raise CampaignError(f"file larger than {MAX_FILE_BYTES} bytes", source)
    try:
        loader = _Loader(text)
        loader.name = source
        try:
            return loader.get_single_data()
        finally:
            loader.dispose()
    except CampaignError:
        raise
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        line = mark.line + 1 if mark else None
        msg = " ".join(str(x) for x in (e.context, e.problem) if x) or str(e)
        raise CampaignError(f"malformed YAML: {msg}", source, line) from None
    except yaml.YAMLError as e:
        raise CampaignError(f"malformed YAML: {e}", source) from None
    except RecursionError:
        raise CampaignError("malformed YAML: nested too deeply", source) from None


# --------------------------------------------------------------------------- template syntax

@dataclass(frozen=True)
class Ref:
    """`__path__`: a wildcard reference (path may be an fnmatch glob)."""
    path: str


@dataclass(frozen=True)
class Variant:
    """`{w1::a|b|…}`: one option drawn by weight; `text` is the brace as written (the choice key).
    `{lo-hi$$joiner$$a|b|c}`: between lo and hi distinct options, joined by `joiner`."""
    options: tuple  # ((weight, parts), ...)
    text: str
    pick: tuple | None = None  # (lo, hi) for `$$`; None = exactly one
    joiner: str = ", "


@dataclass(frozen=True)
class Template:
    """A parsed string: literal text, references and variants, plus where it was written."""
    text: str
    parts: tuple
    weight: float = 1.0
    file: str | None = None
    line: int | None = None


class _SyntaxProblem(Exception):
    pass


def _parse_weight(raw: str) -> float:
    raw = raw.strip()
    try:
        w = float(raw)
    except ValueError:
        raise _SyntaxProblem(f"bad weight {raw!r} (expected a number before '::')") from None
    if not math.isfinite(w) or w < 0:
        raise _SyntaxProblem(f"bad weight {raw!r} (must be a finite number >= 0)")
    return w


def _parse_seq(text: str, pos: int, depth: int, in_brace: bool) -> tuple[list, int]:
    """Parse until end (top level) or an unescaped `|` / `}` (inside braces)."""
    parts: list = []
    buf: list[str] = []

    def flush():
        if buf:
            parts.append("".join(buf))
            buf.clear()

    n = len(text)
    while pos < n:
        lit = _LITERAL_RE.match(text, pos)
        if lit:  # a run of plain text in one step
            buf.append(lit.group())
            pos = lit.end()
            continue
        c = text[pos]
        if c == "\\" and pos + 1 < n and text[pos + 1] in "{}|\\_":
            buf.append(text[pos + 1])
            pos += 2
        elif c == "{":
            flush()
            variant, pos = _parse_variant(text, pos, depth + 1)
            parts.append(variant)
        elif c == "}":
            if not in_brace:
                raise _SyntaxProblem(f"unbalanced '}}' at column {pos + 1}")
            break
        elif c == "|" and in_brace:
            break
        elif c == "_" and text.startswith("__", pos):
            m = _REF_RE.match(text, pos)
            if m:
                flush()
                path = m.group(1)
                if path.endswith("/") or "//" in path:
                    raise _SyntaxProblem(f"bad wildcard path {path!r}")
                parts.append(Ref(path))
                pos = m.end()
            elif _REF_START_RE.match(text, pos):
                raise _SyntaxProblem(f"unterminated wildcard reference at column {pos + 1} "
                                     f"(expected '__name__')")
            else:
                buf.append("__")
                pos += 2
        else:
            buf.append(c)
            pos += 1
    flush()
    return parts, pos


def _parse_variant(text: str, start: int, depth: int) -> tuple[Variant, int]:
    if depth > MAX_BRACE_DEPTH:
        raise _SyntaxProblem(f"braces nested deeper than {MAX_BRACE_DEPTH} levels")
    pos = start + 1
    pick, joiner = None, ", "
    m = _PICK_RE.match(text, pos)
    if m:
        lo_txt, dash, hi_txt = m.groups()
        if not (lo_txt or hi_txt):
            raise _SyntaxProblem(f"bad '$$' count at column {pos + 1} (expected N$$, N-M$$, -M$$ or N-$$)")
        lo = int(lo_txt) if lo_txt else 1
        hi = (int(hi_txt) if hi_txt else None) if dash else lo
        pick = (lo, hi)
        pos = m.end()
        j = _JOINER_RE.match(text, pos)
        if j:
            joiner, pos = j.group(1), j.end()
    options = []
    while True:
        weight = 1.0
        m = _WEIGHT_PREFIX_RE.match(text, pos)
        if m:
            weight = _parse_weight(m.group(1))
            pos = m.end()
        opt_start = pos
        parts, pos = _parse_seq(text, pos, depth, in_brace=True)
        if not parts or all(isinstance(p, str) and not p.strip() for p in parts):
            raise _SyntaxProblem(f"empty option in braces at column {opt_start + 1}")
        options.append((weight, tuple(parts)))
        if pos >= len(text):
            raise _SyntaxProblem(f"unbalanced '{{' at column {start + 1} (no closing '}}')")
        if text[pos] == "}":
            pos += 1
            break
        pos += 1  # the '|'
    if not any(w > 0 for w, _ in options):
        raise _SyntaxProblem(f"all weights are zero in {text[start:pos]!r}")
    if pick is not None:
        usable = sum(1 for w, _ in options if w > 0)
        lo, hi = pick
        hi = usable if hi is None else min(hi, usable)
        if lo > hi or lo > usable:
            raise _SyntaxProblem(f"{text[start:pos]!r} asks for {lo} of {usable} options")
        pick = (lo, hi)
    return Variant(tuple(options), text[start:pos], pick, joiner), pos


def parse_template(text: str, file: str | None = None, line: int | None = None,
                   path: str | None = None, weighted: bool = True) -> Template:
    """Parse one template or wildcard entry; a leading `N::` is its weight when `weighted`."""
    weight = 1.0
    body = text
    if weighted:
        m = _WEIGHT_PREFIX_RE.match(text)
        if m:
            try:
                weight = _parse_weight(m.group(1))
            except _SyntaxProblem as e:
                raise CampaignError(f"{e} in {text!r}", file, line, path) from None
            body = text[m.end():]
    try:
        parts, _ = _parse_seq(body, 0, 0, in_brace=False)
    except _SyntaxProblem as e:
        raise CampaignError(f"malformed template {text!r}: {e}", file, line, path) from None
    if not parts or all(isinstance(p, str) and not p.strip() for p in parts):
        raise CampaignError("empty entry", file, line, path)
    return Template(text=body, parts=tuple(parts), weight=weight, file=file, line=line)


def _iter_refs(parts) -> Iterator[Ref]:
    for p in parts:
        if isinstance(p, Ref):
            yield p
        elif isinstance(p, Variant):
            for _, sub in p.options:
                yield from _iter_refs(sub)


# --------------------------------------------------------------------------- the campaign model

@dataclass(frozen=True)
class Sampler:
    steps: int = 20
    cfg: float = 5.0
    scheduler: str = "euler"
    width: int = 336
    height: int = 336
    batch_size: int = 8

    def to_dict(self) -> dict:
        return dict(steps=self.steps, cfg=self.cfg, scheduler=self.scheduler, width=self.width,
                    height=self.height, batch_size=self.batch_size)


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
class Job:
    name: str
    quota: int
    templates: tuple  # of Template
    negative_prompt: str | None = None  # None: the campaign's
    sampler: Sampler | None = None      # resolved (campaign's settings with the job's overrides)
    line: int | None = None


@dataclass
class Sample:
    index: int
    prompt: str
    negative: str
    job: str
    category: str
    template: str
    choices: dict
    seed: int
    campaign: str = ""


class _Draws:
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


def _sample_key(campaign: str, job: str, index: int, seed: int) -> bytes:
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

    # ---- sampling
    def sample_seed(self, job: str, index: int) -> int:
        if self.seed.mode == "fixed":
            return self.seed.base
        d = _sample_key(self.name, job, index, self.seed.base)
        return int.from_bytes(hashlib.blake2b(d, digest_size=8).digest(), "little") & ((1 << 53) - 1)

    def sample(self, job: str, index: int) -> Sample:
        """Sample `index` of `job`: a pure function of (campaign name, job, index, base seed) and
        the campaign's contents."""
        j = self.job(job)
        index = operator.index(index)
        if index < 0:
            raise ValueError(f"sample index must be >= 0, got {index}")
        rng = _Draws(_sample_key(self.name, job, index, self.seed.base))
        t = j.templates[rng.pick([t.weight for t in j.templates])] if len(j.templates) > 1 else j.templates[0]
        choices: dict = {}
        prompt = _clean(self._render(t.parts, rng, choices, [0]))
        neg_text = self.negative_for(job)
        neg_t = self.negative_templates.get(neg_text)
        negative = _clean(self._render(neg_t.parts, rng, {}, [0])) if neg_t else neg_text
        return Sample(index=index, prompt=prompt, negative=negative, job=job,
                      category=self.category(job), template=t.text, choices=choices,
                      seed=self.sample_seed(job, index), campaign=self.name)

    def samples(self, job: str, start: int = 0, stop: int | None = None) -> Iterator[Sample]:
        """Samples start..stop (default: the whole quota) of a job."""
        stop = self.job(job).quota if stop is None else stop
        for i in range(start, stop):
            yield self.sample(job, i)

    def _render(self, parts, rng: _Draws, choices: dict, budget: list) -> str:
        out = []
        for p in parts:
            if isinstance(p, str):
                out.append(p)
            elif isinstance(p, Ref):
                budget[0] += 1
                if budget[0] > MAX_EXPANSIONS:  # validated at load; kept as a guard
                    raise CampaignError(f"more than {MAX_EXPANSIONS} wildcard expansions", self.source)
                entries, cum = self._entries(p.path)
                e = entries[rng.pick_cumulative(cum)]
                text = self._render(e.parts, rng, choices, budget)
                _record(choices, p.path, _clean(text))
                out.append(text)
            elif p.pick is None:
                k = rng.pick([w for w, _ in p.options])
                text = self._render(p.options[k][1], rng, choices, budget)
                _record(choices, p.text, _clean(text))
                out.append(text)
            else:
                lo, hi = p.pick
                n = lo + rng.pick([1.0] * (hi - lo + 1))
                weights = [w for w, _ in p.options]
                picked = []
                for _ in range(n):  # without replacement
                    k = rng.pick(weights)
                    weights[k] = 0.0
                    picked.append(_clean(self._render(p.options[k][1], rng, choices, budget)))
                text = p.joiner.join(picked)
                _record(choices, p.text, text)
                out.append(text)
        return "".join(out)

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
        COMBINATIONS_CAP; computed arithmetically, never by enumeration."""
        memo: dict = {}
        total = 0
        for t in self.job(job).templates:
            total = min(COMBINATIONS_CAP, total + self._combos(t.parts, memo))
        return total

    def _combos(self, parts, memo) -> int:
        n = 1
        for p in parts:
            if isinstance(p, Ref):
                if p.path not in memo:
                    memo[p.path] = min(COMBINATIONS_CAP,
                                       sum(self._combos(t.parts, memo) for t in self._entries(p.path)[0]
                                           if t.weight > 0))
                c = memo[p.path]
            elif isinstance(p, Variant) and p.pick is None:
                c = min(COMBINATIONS_CAP, sum(self._combos(o, memo) for w, o in p.options if w > 0))
            elif isinstance(p, Variant):
                c = _ordered_picks([self._combos(o, memo) for w, o in p.options if w > 0], *p.pick)
            else:
                continue
            n = min(COMBINATIONS_CAP, n * c)
        return n


def _ordered_picks(counts: list, lo: int, hi: int) -> int:
    """Distinct outputs of picking k in lo..hi distinct options in order: sum_k k! * e_k(counts)
    (e_k: elementary symmetric polynomial), saturating at COMBINATIONS_CAP."""
    e = [1] + [0] * hi
    for c in counts:
        for j in range(hi, 0, -1):
            e[j] = min(COMBINATIONS_CAP, e[j] + e[j - 1] * c)
    total, fact = 0, 1
    for k in range(0, hi + 1):
        fact = fact * k if k else 1
        if k >= lo:
            total = min(COMBINATIONS_CAP, total + min(COMBINATIONS_CAP, fact * e[k]))
    return total


def _record(choices: dict, key: str, value: str) -> None:
    if key not in choices:
        choices[key] = value
        return
    i = 2
    while f"{key}#{i}" in choices:
        i += 1
    choices[f"{key}#{i}"] = value


def _clean(text: str) -> str:
    return _WS_RE.sub(" ", text).strip()


# --------------------------------------------------------------------------- loading

def available_campaigns() -> list[str]:
    return sorted(p.stem for p in CAMPAIGN_DIR.glob("*.yaml"))


def load_campaign(path_or_name: str | Path | Mapping, source: str | Path | None = None) -> Campaign:
    """Load and fully validate a campaign from a YAML path, a name in conf/campaign/, or a mapping.

    A mapping (e.g. Hydra's `cfg.campaign`) has no line numbers; `source` names where it came from
    and is the folder base for `wildcards_dir`. Prefer passing the path or name."""
    if isinstance(path_or_name, Mapping):
        data = path_or_name
        if not isinstance(data, dict):  # omegaconf DictConfig and friends
            try:
                from omegaconf import OmegaConf
                data = OmegaConf.to_container(data, resolve=True)
            except (ImportError, ValueError):
                data = dict(data)
        return campaign_from_dict(data, source=Path(source) if source else None)
    p = Path(path_or_name).expanduser()
    if not p.is_file():
        named = CAMPAIGN_DIR / f"{path_or_name}.yaml"
        if named.is_file() and "/" not in str(path_or_name):
            p = named
        else:
            raise CampaignError(f"no campaign file {str(path_or_name)!r} (and no conf/campaign/"
                                f"{path_or_name}.yaml); named campaigns: {', '.join(available_campaigns())}",
                                path_or_name)
    try:
        text = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise CampaignError(f"cannot read: {e}", p) from None
    data = read_yaml(text, str(p))
    return campaign_from_dict(data, source=p)


def _did_you_mean(key, allowed) -> str:
    close = difflib.get_close_matches(str(key), allowed, n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _check_keys(mapping, allowed, file, where: str) -> None:
    for k in mapping:
        if k not in allowed:
            raise CampaignError(f"unknown key {str(k)!r}{_did_you_mean(k, allowed)}; allowed: "
                                f"{', '.join(allowed)}", file, _key_line(mapping, k), where)


def _as_int(value, file, line, path, minimum=None) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise CampaignError(f"expected an integer, got {value!r}", file, line, path)
    if minimum is not None and value < minimum:
        raise CampaignError(f"must be >= {minimum}, got {value}", file, line, path)
    return value


def _as_str_list(value, file, line, path) -> tuple:
    if isinstance(value, str):
        return (str(value),)
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise CampaignError(f"expected a string or a list of strings, got {value!r}", file, line, path)
    return tuple(str(v) for v in value)


def _known_schedulers() -> set | None:
    """The scheduler names the workers accept (factory.worker owns the list)."""
    try:
        from factory.worker import SCHEDULERS
    except Exception:  # pragma: no cover - the worker module is optional for pure planning
        return None
    return set(SCHEDULERS)


def _parse_sampler(raw, base: Sampler, file, line, where) -> Sampler:
    if raw is None:
        return base
    if not isinstance(raw, Mapping):
        raise CampaignError(f"expected a mapping of sampler settings, got {raw!r}", file, line, where)
    _check_keys(raw, SAMPLER_KEYS, file, where)
    kw = {}
    for k, v in raw.items():
        kl = _key_line(raw, k, line)
        kp = f"{where}/{k}"
        if k in ("steps", "batch_size"):
            kw[k] = _as_int(v, file, kl, kp, minimum=1)
        elif k in ("width", "height", "resolution"):
            v = _as_int(v, file, kl, kp, minimum=8)
            if v % 8:
                raise CampaignError(f"must be a multiple of 8 (the VAE works in 8x8 cells), got {v}",
                                    file, kl, kp)
            if k == "resolution":
                kw.setdefault("width", v)
                kw.setdefault("height", v)
            else:
                kw[k] = v
        elif k == "cfg":
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
                raise CampaignError(f"expected a number >= 0, got {v!r}", file, kl, kp)
            kw[k] = float(v)
        elif k == "scheduler":
            if not isinstance(v, str) or not v.strip():
                raise CampaignError(f"expected a scheduler name, got {v!r}", file, kl, kp)
            known = _known_schedulers()
            if known and str(v).strip() not in known:
                raise CampaignError(f"unknown scheduler {v!r}{_did_you_mean(v, sorted(known))}; one of "
                                    f"{', '.join(sorted(known))}", file, kl, kp)
            kw[k] = str(v).strip()
    if "resolution" in raw and ("width" in raw or "height" in raw):
        raise CampaignError("give either resolution or width/height, not both", file, line, where)
    return replace(base, **kw)


def _parse_checkpoints(raw, file, line) -> CheckpointSelection:
    where = "checkpoints"
    if raw is None or raw == "all":
        return CheckpointSelection(line=line)
    if isinstance(raw, (str, list)):
        return CheckpointSelection(include=_as_str_list(raw, file, line, where), line=line)
    if not isinstance(raw, Mapping):
        raise CampaignError(f"expected 'all', a list of name globs or a mapping, got {raw!r}",
                            file, line, where)
    _check_keys(raw, CHECKPOINT_KEYS, file, where)
    kw = {k: _as_str_list(v, file, _key_line(raw, k, line), f"{where}/{k}") for k, v in raw.items()}
    kw.setdefault("include", ("*",))
    return CheckpointSelection(**kw, line=line)


def _parse_seed(raw, file, line) -> SeedPolicy:
    if raw is None:
        return SeedPolicy()
    if isinstance(raw, Mapping):
        _check_keys(raw, SEED_KEYS, file, "seed")
        base = _as_int(raw.get("base", 0), file, _key_line(raw, "base", line), "seed/base", minimum=0)
        if base > MAX_SEED:
            raise CampaignError(f"seed must be below 2**63, got {base}", file, _key_line(raw, "base", line),
                                "seed/base")
        mode = raw.get("mode", "per_sample")
        if mode not in SEED_MODES:
            raise CampaignError(f"unknown seed mode {mode!r}; one of {', '.join(SEED_MODES)}",
                                file, _key_line(raw, "mode", line), "seed/mode")
        return SeedPolicy(base=base, mode=str(mode))
    base = _as_int(raw, file, line, "seed", minimum=0)
    if base > MAX_SEED:
        raise CampaignError(f"seed must be below 2**63, got {base}", file, line, "seed")
    return SeedPolicy(base=base)


def _expanded_size(node, memo: dict) -> int:
    """Entries + groups once YAML aliases are expanded, counted per distinct object (an alias bomb
    is refused without being walked); depth is already bounded by the loader."""
    key = id(node)
    if key not in memo:
        if isinstance(node, Mapping):
            memo[key] = 1 + sum(_expanded_size(v, memo) for v in node.values())
        elif isinstance(node, list):
            memo[key] = max(1, len(node))
        else:
            memo[key] = 1
    return memo[key]


def _flatten_wildcards(tree, file, out: dict, prefix: str, count: list) -> None:
    """Nested mappings -> {"eyes/color": [(text, line), ...]} (iterative: depth is already bounded)."""
    stack = [(tree, prefix)]
    while stack:
        node, pre = stack.pop()
        for key, value in node.items():
            kline = _key_line(node, key)
            if not isinstance(key, str) or not SEGMENT_RE.match(key):
                raise CampaignError(f"bad wildcard name {str(key)!r} (letters, digits, '_' and '-' only)",
                                    file, kline, f"{pre}{key}")
            path = f"{pre}{key}"
            if isinstance(value, Mapping):
                count[0] += 1
                if count[0] > MAX_WILDCARD_ENTRIES:
                    raise CampaignError(f"more than {MAX_WILDCARD_ENTRIES} wildcard entries and groups",
                                        file, kline, path)
                if not value:
                    raise CampaignError("empty wildcard group", file, kline, path)
                stack.append((value, path + "/"))
                continue
            if isinstance(value, list):
                items = [(v, ln) for v, ln in zip(value, getattr(value, "item_lines", [kline] * len(value)))]
            elif value is None:
                items = []
            else:
                items = [(value, kline)]
            if not items:
                raise CampaignError("empty wildcard list", file, kline, path)
            entries = []
            for v, ln in items:
                count[0] += 1
                if count[0] > MAX_WILDCARD_ENTRIES:
                    raise CampaignError(f"more than {MAX_WILDCARD_ENTRIES} wildcard entries", file, ln, path)
                if isinstance(v, (Mapping, list)) or v is None:
                    raise CampaignError(f"wildcard entries must be text, got {v!r}", file, ln, path)
                entries.append((str(v), ln))
            if path in out:
                raise CampaignError(f"wildcard defined twice (also in {out[path][1]})", file, kline, path)
            out[path] = (entries, file)


def _read_wildcard_dir(folder: Path, file, line, out: dict, count: list) -> None:
    """`name.txt` files (one entry per line, `#` comments) become paths relative to the folder."""
    if not folder.is_dir():
        raise CampaignError(f"wildcards folder {str(folder)!r} does not exist", file, line, "wildcards_dir")
    for txt in sorted(folder.rglob("*.txt")):
        rel = txt.relative_to(folder).with_suffix("").as_posix()
        for seg in rel.split("/"):
            if not SEGMENT_RE.match(seg):
                raise CampaignError(f"bad wildcard file name {seg!r} (letters, digits, '_' and '-' only)",
                                    txt, None, rel)
        try:
            if txt.stat().st_size > MAX_WILDCARD_FILE_BYTES:
                raise CampaignError(f"wildcard file larger than {MAX_WILDCARD_FILE_BYTES} bytes", txt, None, rel)
            lines = txt.read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as e:
            raise CampaignError(f"cannot read wildcard file: {e}", txt, None, rel) from None
        entries = []
        for i, raw in enumerate(lines, 1):
            s = raw.strip()
            if not s or s.startswith("#"):
                continue
            count[0] += 1
            if count[0] > MAX_WILDCARD_ENTRIES:
                raise CampaignError(f"more than {MAX_WILDCARD_ENTRIES} wildcard entries", txt, i, rel)
            entries.append((s, i))
        if not entries:
            raise CampaignError("empty wildcard list (no entries in file)", txt, 1, rel)
        if rel in out:
            raise CampaignError(f"wildcard defined twice (also in {out[rel][1]})", txt, 1, rel)
        out[rel] = (entries, txt)


def campaign_from_dict(data, source: Path | None = None) -> Campaign:
    """Validate a parsed campaign mapping (from `read_yaml`, or any plain mapping) into a Campaign."""
    file = str(source) if source else None
    if data is None:
        raise CampaignError("the campaign file is empty", file, 1)
    if not isinstance(data, Mapping):
        raise CampaignError(f"a campaign file must be a mapping at the top level, got {type(data).__name__}",
                            file, _line(data, 1))
    _check_keys(data, TOP_KEYS, file, "")
    kl = lambda k: _key_line(data, k, 1)  # noqa: E731

    name = data.get("campaign", Path(file).stem if file else None)
    if not isinstance(name, str) or not NAME_RE.match(name):
        hint = "" if "campaign" in data else " (taken from the file name: add 'campaign: NAME')"
        raise CampaignError(f"campaign name must match [A-Za-z0-9_]+, got {name!r}{hint}", file,
                            kl("campaign"), "campaign")
    name = str(name)

    # wildcards: the YAML tree plus optional folders of .txt files
    raw_wc: dict = {}
    count = [0]
    tree = data.get("wildcards") or {}
    if not isinstance(tree, Mapping):
        raise CampaignError("wildcards must be a mapping of names to lists (or nested mappings)",
                            file, kl("wildcards"), "wildcards")
    if _expanded_size(tree, {}) > MAX_WILDCARD_ENTRIES:
        raise CampaignError(f"more than {MAX_WILDCARD_ENTRIES} wildcard entries and groups (YAML aliases "
                            f"expanded)", file, kl("wildcards"), "wildcards")
    _flatten_wildcards(tree, file, raw_wc, "", count)
    dirs = ()
    if "wildcards_dir" in data:
        dirs = _as_str_list(data["wildcards_dir"], file, kl("wildcards_dir"), "wildcards_dir")
        base = source.parent if source else Path.cwd()
        for d in dirs:
            _read_wildcard_dir((base / d).resolve(), file, kl("wildcards_dir"), raw_wc, count)
    groups = {q.rsplit("/", 1)[0] for q in raw_wc if "/" in q}
    groups = {"/".join(g.split("/")[:k]) for g in groups for k in range(1, g.count("/") + 2)}
    for p in raw_wc:  # a leaf may not also be a group (eyes.txt beside eyes/color.txt)
        if p in groups:
            raise CampaignError("is both a list and a group of lists", raw_wc[p][1],
                                raw_wc[p][0][0][1], p)
    wildcards = {p: tuple(parse_template(t, str(f), ln, p) for t, ln in entries)
                 for p, (entries, f) in raw_wc.items()}
    for p, entries in wildcards.items():
        if not any(t.weight > 0 for t in entries):
            raise CampaignError("all entry weights are zero", entries[0].file, entries[0].line, p)

    sampler = _parse_sampler(data.get("sampler"), Sampler(), file, kl("sampler"), "sampler")
    negative = data.get("negative_prompt", "") or ""
    if not isinstance(negative, str):
        raise CampaignError(f"expected text, got {negative!r}", file, kl("negative_prompt"), "negative_prompt")

    jobs_raw = data.get("jobs")
    if not isinstance(jobs_raw, Mapping) or not jobs_raw:
        raise CampaignError("a campaign needs 'jobs': a mapping of job names to {quota, templates}",
                            file, kl("jobs"), "jobs")
    jobs = {}
    for jname, jraw in jobs_raw.items():
        jline = _key_line(jobs_raw, jname, kl("jobs"))
        where = f"jobs/{jname}"
        if not isinstance(jname, str) or not NAME_RE.match(jname):
            raise CampaignError(f"job name must match [A-Za-z0-9_]+, got {jname!r}", file, jline, where)
        if not isinstance(jraw, Mapping):
            raise CampaignError("a job is a mapping with quota and templates", file, jline, where)
        _check_keys(jraw, JOB_KEYS, file, where)
        if "quota" not in jraw:
            raise CampaignError("missing quota (number of images)", file, jline, where)
        quota = _as_int(jraw["quota"], file, _key_line(jraw, "quota", jline), f"{where}/quota", minimum=0)
        if quota > MAX_QUOTA:
            raise CampaignError(f"quota {quota} is above {MAX_QUOTA:,} images per job; split it into jobs",
                                file, _key_line(jraw, "quota", jline), f"{where}/quota")
        if "templates" not in jraw:
            raise CampaignError("missing templates", file, jline, where)
        traw = jraw["templates"]
        tline = _key_line(jraw, "templates", jline)
        tlist = [traw] if isinstance(traw, str) else traw
        if not isinstance(tlist, list) or not tlist:
            raise CampaignError("templates must be a non-empty list of strings", file, tline, f"{where}/templates")
        lines = getattr(tlist, "item_lines", [tline] * len(tlist))
        templates = []
        for t, ln in zip(tlist, lines):
            if not isinstance(t, str):
                raise CampaignError(f"a template must be text, got {t!r}", file, ln, f"{where}/templates")
            templates.append(parse_template(str(t), file, ln, f"{where}/templates"))
        if not any(t.weight > 0 for t in templates):
            raise CampaignError("all template weights are zero", file, tline, f"{where}/templates")
        jneg = jraw.get("negative_prompt")
        if jneg is not None and not isinstance(jneg, str):
            raise CampaignError(f"expected text, got {jneg!r}", file, _key_line(jraw, "negative_prompt", jline),
                                f"{where}/negative_prompt")
        jsampler = _parse_sampler(jraw.get("sampler"), sampler, file, _key_line(jraw, "sampler", jline),
                                  f"{where}/sampler")
        jobs[str(jname)] = Job(name=str(jname), quota=quota, templates=tuple(templates),
                               negative_prompt=None if jneg is None else str(jneg), sampler=jsampler,
                               line=jline)

    negatives = {}
    for text, line, where in [(negative, kl("negative_prompt"), "negative_prompt")] + [
            (j.negative_prompt, j.line, f"jobs/{j.name}/negative_prompt") for j in jobs.values()
            if j.negative_prompt is not None]:
        if text and text not in negatives:
            negatives[text] = parse_template(text, file, line, where, weighted=False)

    camp = Campaign(name=name, source=source, wildcards=wildcards, jobs=jobs, negative_prompt=negative,
                    sampler=sampler,
                    checkpoints=_parse_checkpoints(data.get("checkpoints"), file, kl("checkpoints")),
                    seed=_parse_seed(data.get("seed"), file, kl("seed")),
                    description=str(data.get("description", "") or ""), wildcards_dirs=dirs,
                    negative_templates=negatives)
    roots = [(f"jobs/{j.name}/templates", t) for j in jobs.values() for t in j.templates]
    roots += [("negative_prompt", t) for t in negatives.values()]
    _check_references(camp, roots)
    return camp


def _check_references(camp: Campaign, roots: list) -> None:
    """Every reference resolves, no cycle, bounded depth and bounded expansion per prompt.

    Iterative DFS over wildcard paths (a long reference chain must not hit Python's recursion
    limit); `cost[path]` = most references one draw of `path` can expand (itself included)."""

    def targets(t: Template, owner: str) -> list[str]:
        out = []
        for r in _iter_refs(t.parts):
            hits = camp.resolve(r.path)
            if not hits:
                groups = sorted({p.rsplit("/", 1)[0] for p in camp.wildcards if p.startswith(r.path + "/")})
                if groups or any(p.startswith(r.path + "/") for p in camp.wildcards):
                    hint = f" ({r.path!r} is a group: use __{r.path}/*__ or one of its lists)"
                else:
                    close = difflib.get_close_matches(r.path, list(camp.wildcards), n=3)
                    hint = f" (did you mean {', '.join(close)}?)" if close else (
                        f"; defined: {', '.join(sorted(camp.wildcards)[:20]) or 'none'}")
                raise CampaignError(f"undefined wildcard __{r.path}__{hint}", t.file, t.line, r.path)
            out.extend(hits)
        return out

    def max_cost(parts, cost) -> int:
        n = 0
        for p in parts:
            if isinstance(p, Ref):
                n += 1 + max(cost[q] for q in camp.resolve(p.path))
            elif isinstance(p, Variant) and p.pick is None:
                n += max(max_cost(o, cost) for w, o in p.options)
            elif isinstance(p, Variant):
                n += sum(max_cost(o, cost) for w, o in p.options)
        return n

    cost: dict[str, int] = {}
    depth: dict[str, int] = {}
    state: dict[str, int] = {}  # 1 = on the stack, 2 = done
    for path in camp.wildcards:
        if state.get(path) == 2:
            continue
        stack = [(path, None)]
        trail: list[str] = []
        while stack:
            node, it = stack.pop()
            if it is None:
                state[node] = 1
                trail.append(node)
                kids = [q for t in camp.wildcards[node] for q in targets(t, node)]
                it = iter(kids)
            advanced = False
            for q in it:
                if state.get(q) == 1:
                    cyc = trail[trail.index(q):] + [q]
                    t = next(t for t in camp.wildcards[node] if q in
                             [h for r in _iter_refs(t.parts) for h in camp.resolve(r.path)])
                    raise CampaignError("reference cycle " + " -> ".join(f"__{c}__" for c in cyc),
                                        t.file, t.line, node)
                if state.get(q) != 2:
                    stack.append((node, it))
                    stack.append((q, None))
                    advanced = True
                    break
            if advanced:
                continue
            entries = camp.wildcards[node]
            kids = {q for t in entries for r in _iter_refs(t.parts) for q in camp.resolve(r.path)}
            depth[node] = 1 + max((depth[q] for q in kids), default=0)
            cost[node] = max(max_cost(t.parts, cost) for t in entries)
            if depth[node] > MAX_REFERENCE_DEPTH:
                t = entries[0]
                raise CampaignError(f"wildcard references nested deeper than {MAX_REFERENCE_DEPTH} levels",
                                    t.file, t.line, node)
            if cost[node] > MAX_EXPANSIONS:
                t = entries[0]
                raise CampaignError(f"one draw can expand more than {MAX_EXPANSIONS} wildcard references",
                                    t.file, t.line, node)
            state[node] = 2
            trail.pop()
    for where, t in roots:
        targets(t, where)
        if max_cost(t.parts, cost) > MAX_EXPANSIONS:
            raise CampaignError(f"one prompt can expand more than {MAX_EXPANSIONS} wildcard references",
                                t.file, t.line, where)


def main(argv: list[str] | None = None) -> int:
    """`python -m factory.campaign FILE_OR_NAME [-n N]`: validate a campaign and print sample prompts."""
    import argparse
    import sys

    ap = argparse.ArgumentParser(prog="python -m factory.campaign", description=main.__doc__)
    ap.add_argument("campaign", help="a campaign YAML path or a name in conf/campaign/")
    ap.add_argument("-n", type=int, default=5, help="sample prompts to print per job")
    args = ap.parse_args(argv)
    try:
        c = load_campaign(args.campaign)
    except CampaignError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"campaign {c.name} ({c.source}): {c.total_quota} images, {len(c.wildcards)} wildcard lists")
    for name, job in c.jobs.items():
        comb = c.combinations(name)
        comb_txt = f"{comb:,}" if comb < 10**15 else f"~1e{len(str(comb)) - 1}"
        s = c.sampler_for(name)
        print(f"\n{c.category(name)}: quota {job.quota}, {comb_txt} combinations, "
              f"{s.width}x{s.height}, {s.steps} steps, cfg {s.cfg}, {s.scheduler}")
        for sample in c.samples(name, 0, min(args.n, job.quota)):
            print(f"  [{sample.index}] {sample.prompt}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
