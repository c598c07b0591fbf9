"""The interpolation split: hold out attribute *combinations*, not just prompts or checkpoints.

`combinations=[["neon", "blue eyes"]]` sends every prompt that contains both "neon" and "blue
eyes" to the `val_combo` split, while prompts with only one of them stay where they were: the
model sees each attribute, never the pair, so `val_combo` measures whether it composes them
(the seed's "interpolation" claim). A term matches as a whole word or phrase, case-insensitive.
Every term must still appear without its partner in what remains for training, else the split
would measure something else: that is a `CombinationSplitError` naming the term.

Pure functions over prompt texts; `PairsDataModule(val_combinations=...)` and `luna ab
crops.split=val_combo` use them.
"""
from __future__ import annotations

import re
from functools import lru_cache

import numpy as np

COMBO = "val_combo"


class CombinationSplitError(ValueError):
    """Combinations that cannot give an interpolation split on these prompts."""


@lru_cache(maxsize=256)
def _pattern(term: str) -> re.Pattern:
    words = [re.escape(w) for w in str(term).strip().lower().split()]
    if not words:
        raise CombinationSplitError("val_combinations: an empty term")
    return re.compile(r"(?<![\w])" + r"\s+".join(words) + r"(?![\w])")


def has_term(text: str, term: str) -> bool:
    """Whether `term` occurs in `text` as a whole word / phrase (case-insensitive)."""
    return _pattern(term).search(str(text).lower()) is not None


def _normalise(combinations) -> list[tuple[str, ...]]:
    out = []
    for combo in combinations or []:
        combo = (combo,) if isinstance(combo, str) else tuple(str(t) for t in combo)
        if len(combo) < 2:
            raise CombinationSplitError(f"val_combinations: {list(combo)} is not a combination (give two or more terms)")
        out.append(combo)
    return out


def held_out_prompts(texts: list[str], combinations) -> np.ndarray:
    """Mask over `texts`: True where the prompt holds every term of at least one combination.

    Raises CombinationSplitError when no prompt holds a combination, or when a term of a
    combination never appears in the remaining (training) prompts.
    """
    combos = _normalise(combinations)
    held = np.zeros(len(texts), dtype=bool)
    for combo in combos:
        rows = np.array([all(has_term(t, term) for term in combo) for t in texts], dtype=bool)
        if not rows.any():
            raise CombinationSplitError(f"val_combinations: no prompt contains all of {list(combo)}")
        held |= rows
    for combo in combos:
        for term in combo:
            if not any(has_term(t, term) for t, h in zip(texts, held) if not h):
                raise CombinationSplitError(
                    f"val_combinations: {term!r} (of {list(combo)}) appears only in held-out combinations; training "
                    "would never see it alone, so the split could not measure interpolation")
    return held


def with_combinations(splits: dict[str, np.ndarray], texts_of_row, combinations) -> dict[str, np.ndarray]:
    """`splits` (image rows per split) with the rows of combination prompts moved to `val_combo`.

    `texts_of_row(rows) -> list of prompt texts` of image rows. Rows of held-out checkpoints stay in
    `val_ckpt` only if their prompt is not a combination (a row belongs to one split)."""
    if not combinations:
        return splits
    rows = np.concatenate([np.asarray(v, dtype=np.int64) for v in splits.values()])
    texts = list(texts_of_row(rows))
    uniq = sorted(set(texts))
    held_text = dict(zip(uniq, held_out_prompts(uniq, combinations)))
    held_rows = {int(r) for r, t in zip(rows, texts) if held_text[t]}
    out = {k: np.asarray([r for r in v if int(r) not in held_rows], dtype=np.int64) for k, v in splits.items()}
    out[COMBO] = np.asarray(sorted(held_rows), dtype=np.int64)
    return out


def split_keys(pairs, split: str = "val", *, combinations=None, val_prompts: float = 0.1, val_checkpoints: int = 1,
               seed: int = 0) -> list[str]:
    """Image keys of one split of a pairs folder, as `PairsDataModule` splits it (same arguments)."""
    from extraction.pairs import Pairs
    from projector.data import split_images

    with Pairs(pairs) as p:
        texts = [p.prompt_text[i] for i in p.prompt_id]
        splits = split_images(texts, list(p.checkpoint), val_prompts, val_checkpoints, seed)
        splits = with_combinations(splits, lambda rows: [texts[r] for r in rows], combinations)
        if split not in splits:
            raise CombinationSplitError(f"split={split!r}: this pairs folder has splits {sorted(splits)}"
                                        + ("" if combinations else " (val_combo needs combinations)"))
        return [p.key[i] for i in splits[split]]
