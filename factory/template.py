"""The prompt-template grammar (the dynamicprompts subset we use): parse, render, count combinations.

  __eyes/color__        a random entry of the wildcard list at path `eyes/color` (recursive)
  __eyes/*__            a random entry of every list under `eyes` (fnmatch glob on paths)
  {a|b|c}               one option, uniformly
  {3::grey|violet}      weighted options (weights are relative; default 1)
  {2$$a|b|c}            two distinct options joined by ", " ({1-3$$…} a range, {2$$ and $$…} a joiner)
  "2::red"              a weighted wildcard entry or template (a leading `N::`)
  \\{ \\} \\| \\\\          literal characters
Options may nest braces and references: `{red|{dark|light} __colors/blue__}`.

`render` and `count_combinations` take the wildcard lists through `entries_of(path) -> (entries,
cumulative weights)` and draws through any `rng` with `pick(weights)` and `pick_cumulative(cum)`
(the campaign's counter-based RNG), so the grammar knows nothing of files or campaigns.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Callable, Iterator

from factory.errors import CampaignError

MAX_BRACE_DEPTH = 32         # nesting of {…} inside one string
MAX_EXPANSIONS = 10_000      # wildcard references expanded while rendering one prompt
COMBINATIONS_CAP = 10**30    # combinations saturate here (arithmetic, never enumerated)

# Possessive quantifiers (*+) never backtrack: long runs of spaces cannot make a match quadratic.
_REF_RE = re.compile(r"__([A-Za-z0-9*](?:[A-Za-z0-9\-/*]|_(?!_))*+)__")
_REF_START_RE = re.compile(r"__[A-Za-z0-9*]")
_WEIGHT_PREFIX_RE = re.compile(r"([^|{}:]*+)::")
_WS_RE = re.compile(r"\s+")
_PICK_RE = re.compile(r"\s*+(\d*+)\s*+(-?)\s*+(\d*+)\s*+\$\$")
_JOINER_RE = re.compile(r"([^|{}$]*+)\$\$")
_LITERAL_RE = re.compile(r"[^\\{}|_]++")

EntriesOf = Callable[[str], tuple]  # path -> (tuple of Template, cumulative weights)


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


def iter_refs(parts) -> Iterator[Ref]:
    """Every reference in `parts`, braces included."""
    for p in parts:
        if isinstance(p, Ref):
            yield p
        elif isinstance(p, Variant):
            for _, sub in p.options:
                yield from iter_refs(sub)


# --------------------------------------------------------------------------- rendering


def render(parts, rng, entries_of: EntriesOf, choices: dict, budget: list, source=None) -> str:
    """The text of `parts` with every reference and brace drawn from `rng`; each draw is recorded
    in `choices` (reference path or brace text -> the text chosen). `budget[0]` counts expansions."""
    out = []
    for p in parts:
        if isinstance(p, str):
            out.append(p)
        elif isinstance(p, Ref):
            budget[0] += 1
            if budget[0] > MAX_EXPANSIONS:  # validated at load; kept as a guard
                raise CampaignError(f"more than {MAX_EXPANSIONS} wildcard expansions", source)
            entries, cum = entries_of(p.path)
            entry = entries[rng.pick_cumulative(cum)]
            text = render(entry.parts, rng, entries_of, choices, budget, source)
            record_choice(choices, p.path, clean(text))
            out.append(text)
        elif p.pick is None:
            k = rng.pick([w for w, _ in p.options])
            text = render(p.options[k][1], rng, entries_of, choices, budget, source)
            record_choice(choices, p.text, clean(text))
            out.append(text)
        else:
            lo, hi = p.pick
            n = lo + rng.pick([1.0] * (hi - lo + 1))
            weights = [w for w, _ in p.options]
            picked = []
            for _ in range(n):  # without replacement
                k = rng.pick(weights)
                weights[k] = 0.0
                picked.append(clean(render(p.options[k][1], rng, entries_of, choices, budget, source)))
            text = p.joiner.join(picked)
            record_choice(choices, p.text, text)
            out.append(text)
    return "".join(out)


def record_choice(choices: dict, key: str, value: str) -> None:
    """`choices[key] = value`; a key drawn again gets `key#2`, `key#3`, …"""
    if key not in choices:
        choices[key] = value
        return
    i = 2
    while f"{key}#{i}" in choices:
        i += 1
    choices[f"{key}#{i}"] = value


def clean(text: str) -> str:
    """Runs of whitespace collapsed to one space, ends stripped."""
    return _WS_RE.sub(" ", text).strip()


# --------------------------------------------------------------------------- counting


def count_combinations(parts, entries_of: EntriesOf, memo: dict) -> int:
    """Distinct draws of `parts` (entries counted as distinct), saturating at COMBINATIONS_CAP;
    arithmetic, never enumeration. `memo` caches per reference path across calls."""
    n = 1
    for p in parts:
        if isinstance(p, Ref):
            if p.path not in memo:
                memo[p.path] = min(COMBINATIONS_CAP,
                                   sum(count_combinations(t.parts, entries_of, memo)
                                       for t in entries_of(p.path)[0] if t.weight > 0))
            c = memo[p.path]
        elif isinstance(p, Variant) and p.pick is None:
            c = min(COMBINATIONS_CAP, sum(count_combinations(o, entries_of, memo) for w, o in p.options if w > 0))
        elif isinstance(p, Variant):
            c = _ordered_picks([count_combinations(o, entries_of, memo) for w, o in p.options if w > 0], *p.pick)
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
