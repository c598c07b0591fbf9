"""The campaign file: a YAML file of hierarchical wildcards, jobs with quotas and templates, sampler
settings, read and fully validated into a `factory.campaign.Campaign`.

`load_campaign(path_or_name)` reads the file once (`campaigns/NAME.yaml` for a bare name) and checks
every template, every wildcard entry and every reference, raising `CampaignError` as
`file:line: path: message` before anything else is loaded. Validation is hand-written rather than a
pydantic model: each check knows the YAML line of the value it refuses and says what to write
instead (did-you-mean, the allowed keys, the group a reference names), which pydantic's `loc`
tuples and generic messages would have to be mapped back to by hand.
"""
from __future__ import annotations

import difflib
import math
import re
from dataclasses import replace
from pathlib import Path
from typing import Mapping

from factory.campaign import Campaign, CheckpointSelection, Job, Repeats, Sampler, SeedPolicy
from factory.errors import CampaignError
from factory.diffusion_schedulers import SCHEDULERS
from factory.template import MAX_EXPANSIONS, Ref, Template, Variant, iter_refs, parse_template
from factory.yaml_lines import key_line, line_of, read_yaml
from luna import CAMPAIGNS_DIR  # the shipped campaigns: `campaign=NAME` reads NAME.yaml there
from luna.models.sampling import OVERRIDE_KEYS, SELECTOR_KEYS, check_overrides

# Bounds that keep hostile input cheap: every one is far above what a real campaign needs.
MAX_WILDCARD_FILE_BYTES = 16 * 1024 * 1024  # one .txt file of a wildcards folder
MAX_REFERENCE_DEPTH = 64     # __a__ -> __b__ -> … chain length
MAX_WILDCARD_ENTRIES = 200_000   # entries plus groups, after YAML aliases are expanded
MAX_QUOTA = 100_000_000      # images per job (plans are built in memory)
MAX_SEED = 2**63 - 1         # torch.Generator.manual_seed takes 64-bit seeds

NAME_RE = re.compile(r"^[A-Za-z0-9_]+$")           # campaign and job names: go into shard names/keys
SEGMENT_RE = re.compile(r"^[A-Za-z0-9_\-]+$")      # one level of a wildcard path

TOP_KEYS = ("campaign", "description", "wildcards", "wildcards_dir", "jobs", "negative_prompt",
            "sampler", "checkpoints", "seed", "sampler_overrides", "repeats")
JOB_KEYS = ("quota", "templates", "negative_prompt", "sampler", "description")
SAMPLER_KEYS = ("steps", "cfg", "scheduler", "width", "height", "resolution", "batch_size")
CHECKPOINT_KEYS = ("include", "exclude", "tags", "families")
SEED_KEYS = ("base", "mode")
SEED_MODES = ("per_sample", "fixed")
RULE_KEYS = SELECTOR_KEYS + OVERRIDE_KEYS   # one sampler_overrides rule (luna.models.sampling)
DISTILLATIONS = ("none", "few-step")        # the inventory's distillation values
TIMESTEP_SPACINGS = ("leading", "linspace", "trailing")  # diffusers' timestep_spacing values
REPEAT_KEYS = ("checkpoints", "seeds")
MAX_REPEATS = 1000


def available_campaigns() -> list[str]:
    """Names of the shipped campaigns (`campaigns/NAME.yaml`)."""
    return sorted(p.stem for p in CAMPAIGNS_DIR.glob("*.yaml"))


def load_campaign(path_or_name: str | Path | Mapping, source: str | Path | None = None) -> Campaign:
    """Load and fully validate a campaign from a YAML path, a name in campaigns/, or a mapping.

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
        named = CAMPAIGNS_DIR / f"{path_or_name}.yaml"
        if named.is_file() and "/" not in str(path_or_name):
            p = named
        else:
            raise CampaignError(f"no campaign file {str(path_or_name)!r} (and no campaigns/"
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
                                f"{', '.join(allowed)}", file, key_line(mapping, k), where)


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


def _parse_sampler(raw, base: Sampler, file, line, where) -> Sampler:
    if raw is None:
        return base
    if not isinstance(raw, Mapping):
        raise CampaignError(f"expected a mapping of sampler settings, got {raw!r}", file, line, where)
    _check_keys(raw, SAMPLER_KEYS, file, where)
    kw = {}
    for k, v in raw.items():
        kl = key_line(raw, k, line)
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
            known = set(SCHEDULERS)
            if str(v).strip() not in known:
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
    kw = {k: _as_str_list(v, file, key_line(raw, k, line), f"{where}/{k}") for k, v in raw.items()}
    kw.setdefault("include", ("*",))
    return CheckpointSelection(**kw, line=line)


def _parse_overrides(raw, file, line) -> tuple:
    """`sampler_overrides:` a list of rules, each selecting checkpoints (family, checkpoints globs,
    distillation) and setting steps / cfg / scheduler / timestep_spacing; applied in order."""
    where = "sampler_overrides"
    if raw is None:
        return ()
    if not isinstance(raw, list):
        raise CampaignError("expected a list of rules like {distillation: few-step, steps: 6, cfg: 1.5}, "
                            f"got {raw!r}", file, line, where)
    rules = []
    for i, (rule, rline) in enumerate(zip(raw, getattr(raw, "item_lines", [line] * len(raw)))):
        rp = f"{where}[{i}]"
        if not isinstance(rule, Mapping):
            raise CampaignError(f"a rule is a mapping like {{family: noobai, cfg: 4.5}}, got {rule!r}", file, rline, rp)
        _check_keys(rule, RULE_KEYS, file, rp)
        if not set(rule) & set(SELECTOR_KEYS):
            raise CampaignError(f"selects no checkpoint: give {', '.join(SELECTOR_KEYS)}", file, rline, rp)
        if not set(rule) & set(OVERRIDE_KEYS):
            raise CampaignError(f"changes nothing: give {', '.join(OVERRIDE_KEYS)}", file, rline, rp)
        out = {}
        for k, v in rule.items():
            kl, kp = key_line(rule, k, rline), f"{rp}/{k}"
            if k in ("family", "checkpoints"):
                vals = _as_str_list(v, file, kl, kp)
                if not vals or not all(x.strip() for x in vals):
                    raise CampaignError(f"expected non-empty names, got {v!r}", file, kl, kp)
                out[k] = list(vals)
            elif k == "distillation":
                if v not in DISTILLATIONS:
                    raise CampaignError(f"unknown distillation {v!r}; one of {', '.join(DISTILLATIONS)}", file, kl, kp)
                out[k] = str(v)
            elif k == "timestep_spacing":
                if v not in TIMESTEP_SPACINGS:
                    raise CampaignError(f"unknown timestep_spacing {v!r}{_did_you_mean(v, TIMESTEP_SPACINGS)}; one of "
                                        f"{', '.join(TIMESTEP_SPACINGS)}", file, kl, kp)
                out[k] = str(v)
            else:  # steps, cfg, scheduler: the same checks as a sampler's
                out[k] = getattr(_parse_sampler({k: v}, Sampler(), file, kl, rp), k)
        rules.append(out)
    return tuple(check_overrides(rules))


def _parse_repeats(raw, file, line) -> Repeats:
    where = "repeats"
    if raw is None:
        return Repeats(line=line)
    if not isinstance(raw, Mapping):
        raise CampaignError(f"expected a mapping like {{checkpoints: 3, seeds: 1}}, got {raw!r}", file, line, where)
    _check_keys(raw, REPEAT_KEYS, file, where)
    kw = {}
    for k in REPEAT_KEYS:
        if k in raw:
            kw[k] = _as_int(raw[k], file, key_line(raw, k, line), f"{where}/{k}", minimum=1)
            if kw[k] > MAX_REPEATS:
                raise CampaignError(f"at most {MAX_REPEATS}, got {kw[k]}", file, key_line(raw, k, line), f"{where}/{k}")
    return Repeats(**kw, line=line)


def _parse_seed(raw, file, line) -> SeedPolicy:
    if raw is None:
        return SeedPolicy()
    if isinstance(raw, Mapping):
        _check_keys(raw, SEED_KEYS, file, "seed")
        base = _as_int(raw.get("base", 0), file, key_line(raw, "base", line), "seed/base", minimum=0)
        if base > MAX_SEED:
            raise CampaignError(f"seed must be below 2**63, got {base}", file, key_line(raw, "base", line),
                                "seed/base")
        mode = raw.get("mode", "per_sample")
        if mode not in SEED_MODES:
            raise CampaignError(f"unknown seed mode {mode!r}; one of {', '.join(SEED_MODES)}",
                                file, key_line(raw, "mode", line), "seed/mode")
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
            kline = key_line(node, key)
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


def _parse_wildcards(data: Mapping, file, source: Path | None) -> tuple[dict, tuple]:
    """The YAML `wildcards` tree plus the `wildcards_dir` folders of .txt files, parsed:
    ({path: tuple of Template}, the folders as written)."""
    kl = lambda k: key_line(data, k, 1)  # noqa: E731
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
    return wildcards, dirs


def _parse_job(jname, jraw, jline: int, sampler: Sampler, file) -> Job:
    """One entry of `jobs:`; `sampler` is the campaign's settings, which the job's `sampler:` overrides."""
    where = f"jobs/{jname}"
    if not isinstance(jname, str) or not NAME_RE.match(jname):
        raise CampaignError(f"job name must match [A-Za-z0-9_]+, got {jname!r}", file, jline, where)
    if not isinstance(jraw, Mapping):
        raise CampaignError("a job is a mapping with quota and templates", file, jline, where)
    _check_keys(jraw, JOB_KEYS, file, where)
    if "quota" not in jraw:
        raise CampaignError("missing quota (number of images)", file, jline, where)
    quota = _as_int(jraw["quota"], file, key_line(jraw, "quota", jline), f"{where}/quota", minimum=0)
    if quota > MAX_QUOTA:
        raise CampaignError(f"quota {quota} is above {MAX_QUOTA:,} images per job; split it into jobs",
                            file, key_line(jraw, "quota", jline), f"{where}/quota")
    if "templates" not in jraw:
        raise CampaignError("missing templates", file, jline, where)
    traw = jraw["templates"]
    tline = key_line(jraw, "templates", jline)
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
        raise CampaignError(f"expected text, got {jneg!r}", file, key_line(jraw, "negative_prompt", jline),
                            f"{where}/negative_prompt")
    jsampler = _parse_sampler(jraw.get("sampler"), sampler, file, key_line(jraw, "sampler", jline),
                              f"{where}/sampler")
    return Job(name=str(jname), quota=quota, templates=tuple(templates),
               negative_prompt=None if jneg is None else str(jneg), sampler=jsampler, line=jline)


def campaign_from_dict(data, source: Path | None = None) -> Campaign:
    """Validate a parsed campaign mapping (from `read_yaml`, or any plain mapping) into a Campaign."""
    file = str(source) if source else None
    if data is None:
        raise CampaignError("the campaign file is empty", file, 1)
    if not isinstance(data, Mapping):
        raise CampaignError(f"a campaign file must be a mapping at the top level, got {type(data).__name__}",
                            file, line_of(data, 1))
    _check_keys(data, TOP_KEYS, file, "")
    kl = lambda k: key_line(data, k, 1)  # noqa: E731

    name = data.get("campaign", Path(file).stem if file else None)
    if not isinstance(name, str) or not NAME_RE.match(name):
        hint = "" if "campaign" in data else " (taken from the file name: add 'campaign: NAME')"
        raise CampaignError(f"campaign name must match [A-Za-z0-9_]+, got {name!r}{hint}", file,
                            kl("campaign"), "campaign")
    name = str(name)

    wildcards, dirs = _parse_wildcards(data, file, source)

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
        job = _parse_job(jname, jraw, key_line(jobs_raw, jname, kl("jobs")), sampler, file)
        jobs[job.name] = job

    negatives = {}
    for text, line, where in [(negative, kl("negative_prompt"), "negative_prompt")] + [
            (j.negative_prompt, j.line, f"jobs/{j.name}/negative_prompt") for j in jobs.values()
            if j.negative_prompt is not None]:
        if text and text not in negatives:
            negatives[text] = parse_template(text, file, line, where, weighted=False)

    repeats = _parse_repeats(data.get("repeats"), file, kl("repeats"))
    for j in jobs.values():  # every prompt gets all its K*S images: the quota counts images
        if j.quota % repeats.per_prompt:
            n = repeats.per_prompt
            down, up = j.quota - j.quota % n, j.quota - j.quota % n + n
            raise CampaignError(f"quota {j.quota} is not a multiple of repeats (checkpoints {repeats.checkpoints} x "
                                f"seeds {repeats.seeds} = {n} images per prompt): use {down or up} or {up}",
                                file, key_line(jobs_raw[j.name], "quota", j.line), f"jobs/{j.name}/quota")

    camp = Campaign(name=name, source=source, wildcards=wildcards, jobs=jobs, negative_prompt=negative,
                    sampler=sampler,
                    checkpoints=_parse_checkpoints(data.get("checkpoints"), file, kl("checkpoints")),
                    seed=_parse_seed(data.get("seed"), file, kl("seed")),
                    description=str(data.get("description", "") or ""), wildcards_dirs=dirs,
                    negative_templates=negatives,
                    sampler_overrides=_parse_overrides(data.get("sampler_overrides"), file, kl("sampler_overrides")),
                    sampler_overrides_line=kl("sampler_overrides") if "sampler_overrides" in data else None,
                    repeats=repeats)
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
        for r in iter_refs(t.parts):
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
                             [h for r in iter_refs(t.parts) for h in camp.resolve(r.path)])
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
            kids = {q for t in entries for r in iter_refs(t.parts) for q in camp.resolve(r.path)}
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
    """`python -m factory.campaign_file FILE_OR_NAME [-n N]`: validate a campaign and print sample prompts."""
    import argparse
    import sys

    ap = argparse.ArgumentParser(prog="python -m factory.campaign_file", description=main.__doc__)
    ap.add_argument("campaign", help="a campaign YAML path or a name in campaigns/")
    ap.add_argument("-n", "--prompts", type=int, default=5, help="sample prompts to print per job")
    args = ap.parse_args(argv)
    try:
        campaign = load_campaign(args.campaign)
    except CampaignError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"campaign {campaign.name} ({campaign.source}): {campaign.total_quota} images, "
          f"{len(campaign.wildcards)} wildcard lists")
    if campaign.repeats.active:
        print(f"repeats: each prompt on {campaign.repeats.checkpoints} checkpoints x {campaign.repeats.seeds} seeds")
    for rule in campaign.sampler_overrides:
        print(f"sampler override: {rule}")
    for name, job in campaign.jobs.items():
        comb = campaign.combinations(name)
        comb_txt = f"{comb:,}" if comb < 10**15 else f"~1e{len(str(comb)) - 1}"
        sampler = campaign.sampler_for(name)
        print(f"\n{campaign.category(name)}: quota {job.quota}, {comb_txt} combinations, "
              f"{sampler.width}x{sampler.height}, {sampler.steps} steps, cfg {sampler.cfg}, {sampler.scheduler}")
        for draw in campaign.draws(name, 0, min(args.prompts, job.quota)):
            print(f"  [{draw.index}] {draw.prompt}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())