"""The interpolation split: hold out attribute *combinations*, not just prompts or checkpoints.

`combinations=[["neon", "blue eyes"]]` sends every prompt that contains both "neon" and "blue
eyes" to the `val_combo` split, while prompts with only one of them stay where they were: the
model sees each attribute, never the pair, so `val_combo` measures whether it composes them
(the seed's "interpolation" claim). A term matches as a whole word or phrase, case-insensitive.
Every term must still appear without its partner in the training split's prompts (validation
prompts do not count: training never sees them), else the split would measure something else:
that is a `CombinationSplitError` naming the term.

Pure functions over prompt texts, with the prompt/checkpoint split (`split_images`) they refine:
`PairsDataModule` and `luna ab crops.pairs=... crops.split=...` use them, so the runtime's
held-out crops are exactly the projector's validation images.
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


def held_out_prompts(texts: list[str], combinations, training: list[str] | None = None) -> np.ndarray:
    """Mask over `texts`: True where the prompt holds every term of at least one combination.

    `training`: the prompts the training split keeps (default: all of `texts`). Raises
    CombinationSplitError when no prompt holds a combination, or when a term of a combination
    appears in no training prompt that is not held out (a term seen alone only in validation
    prompts is never trained on alone).
    """
    combos = _normalise(combinations)
    held = np.zeros(len(texts), dtype=bool)
    for combo in combos:
        rows = np.array([all(has_term(t, term) for term in combo) for t in texts], dtype=bool)
        if not rows.any():
            raise CombinationSplitError(f"val_combinations: no prompt contains all of {list(combo)}")
        held |= rows
    is_held = lambda t: any(all(has_term(t, term) for term in combo) for combo in combos)  # noqa: E731
    kept = [t for t, h in zip(texts, held) if not h] if training is None else [t for t in training if not is_held(t)]
    for combo in combos:
        for term in combo:
            if not any(has_term(t, term) for t in kept):
                raise CombinationSplitError(
                    f"val_combinations: {term!r} (of {list(combo)}) appears in no training prompt without the "
                    "combination (only in held-out combinations or validation prompts); training would never see "
                    "it alone, so the split could not measure interpolation")
    return held


def with_combinations(splits: dict[str, np.ndarray], texts_of_row, combinations) -> dict[str, np.ndarray]:
    """`splits` (image rows per split) with the rows of combination prompts moved to `val_combo`.

    `texts_of_row(rows) -> list of prompt texts` of image rows. Rows of held-out checkpoints stay in
    `val_ckpt` only if their prompt is not a combination (a row belongs to one split). Each term
    must appear alone in the `train` split's prompts (`held_out_prompts`)."""
    if not combinations:
        return splits
    rows = np.concatenate([np.asarray(v, dtype=np.int64) for v in splits.values()])
    texts = list(texts_of_row(rows))
    uniq = sorted(set(texts))
    training = sorted(set(texts_of_row(np.asarray(splits.get("train", ()), dtype=np.int64))))
    held_text = dict(zip(uniq, held_out_prompts(uniq, combinations, training)))
    held_rows = {int(r) for r, t in zip(rows, texts) if held_text[t]}
    out = {k: np.asarray([r for r in v if int(r) not in held_rows], dtype=np.int64) for k, v in splits.items()}
    out[COMBO] = np.asarray(sorted(held_rows), dtype=np.int64)
    return out


def split_images(
    texts: list[str], checkpoints: list[str], val_prompts: float, val_checkpoints: int, seed: int
) -> dict[str, np.ndarray]:
    """Image indices of the splits {"train", "val" (held-out prompts), "val_ckpt" (held-out checkpoints)}.

    `texts[i]` / `checkpoints[i]` belong to image i. Deterministic in `seed`. An image whose prompt
    and checkpoint are both held out is in no split (it would blur what each split measures).
    """
    rng = np.random.default_rng(seed)
    uniq_texts = sorted(set(texts))
    n_val = int(round(val_prompts * len(uniq_texts)))
    if val_prompts > 0 and len(uniq_texts) >= 2:
        n_val = min(max(n_val, 1), len(uniq_texts) - 1)
    held_texts = set(rng.permutation(uniq_texts)[:n_val].tolist()) if n_val else set()
    uniq_ckpts = sorted(set(checkpoints))
    n_ck = val_checkpoints if len(uniq_ckpts) > val_checkpoints else 0
    held_ckpts = set(rng.permutation(uniq_ckpts)[:n_ck].tolist()) if n_ck else set()
    t = np.array([x in held_texts for x in texts], dtype=bool)
    c = np.array([x in held_ckpts for x in checkpoints], dtype=bool)
    return {
        "train": np.flatnonzero(~t & ~c),
        "val": rng.permutation(np.flatnonzero(t & ~c)),  # a fixed shuffle: rolled baselines compare different prompts
        "val_ckpt": rng.permutation(np.flatnonzero(c & ~t)),
    }


def fingerprint_rows(pairs, te_fingerprint: str | None = None) -> np.ndarray:
    """Image rows of `pairs` whose prompt's conditioning is of the text encoders `te_fingerprint`
    (all rows when None); a fingerprint no image has is a ValueError naming those the pairs have."""
    keep = np.arange(len(pairs))
    if te_fingerprint is None:
        return keep
    fps = np.array(pairs.te_fingerprint, dtype=object)
    keep = keep[fps[pairs.prompt_id] == te_fingerprint] if len(keep) else keep
    if not len(keep):
        raise ValueError(f"no images with te_fingerprint {te_fingerprint!r}; have {sorted(set(fps))}")
    return keep


def split_pairs(pairs, *, val_prompts: float = 0.1, val_checkpoints: int = 1, seed: int = 0, combinations=None,
                te_fingerprint: str | None = None) -> dict[str, np.ndarray]:
    """Image rows (of all of `pairs`, an open `Pairs`) of each split, the one split `PairsDataModule`
    trains and validates on: with `te_fingerprint` (`data.te_fingerprint`) only the images whose
    prompt's conditioning is of those text encoders are split (the others are in no split), then
    `split_images` and `with_combinations`. A fingerprint no image has is a ValueError naming those
    the pairs have."""
    keep = fingerprint_rows(pairs, te_fingerprint)
    texts = [pairs.prompt_text[p] for p in pairs.prompt_id[keep]]
    ckpts = [pairs.checkpoint[i] for i in keep]
    splits = {k: keep[v] for k, v in split_images(texts, ckpts, val_prompts, val_checkpoints, seed).items()}
    return with_combinations(splits, lambda rows: [pairs.prompt_text[p] for p in pairs.prompt_id[rows]], combinations)


def split_keys(pairs, split: str = "val", *, combinations=None, val_prompts: float = 0.1, val_checkpoints: int = 1,
               seed: int = 0, te_fingerprint: str | None = None) -> list[str]:
    """Image keys of one split of a pairs folder, as `PairsDataModule` splits it (same arguments:
    `te_fingerprint` is its `data.te_fingerprint`, which changes every split, not only which images)."""
    from extraction.pairs import Pairs

    with Pairs(pairs) as p:
        try:
            splits = split_pairs(p, val_prompts=val_prompts, val_checkpoints=val_checkpoints, seed=seed,
                                 combinations=combinations, te_fingerprint=te_fingerprint)
        except CombinationSplitError:
            raise
        except ValueError as e:
            raise ValueError(f"{pairs}: {e}") from e
        if split not in splits:
            raise CombinationSplitError(f"split={split!r}: this pairs folder has splits {sorted(splits)}"
                                        + ("" if combinations else " (val_combo needs combinations)"))
        return [p.key[i] for i in splits[split]]
