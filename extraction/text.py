"""The text side of extraction: one encoder call per unique (prompt, text-encoder fingerprint).

`PromptStore` knows every (prompt, fingerprint) already encoded for an output folder (in memory
for the part being built, on disk as (part, row) once written), so a prompt is never encoded twice,
across parts or across a resumed run. The encoders themselves (`TextConditioner`: finding and
loading the encoders of a fingerprint, encoding, counting calls) live in `luna.models.conditioner`,
shared with the projector's online targets; they are re-exported here.
"""
from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np

from luna.models.conditioner import (  # noqa: F401 - re-exported: extraction's text side
    CLIP_L_COLUMNS,
    CheckpointLocator,
    Encoded,
    TextConditioner,
    TextEncoderNotFound,
    checkpoint_name,
    e_fp,
    encode_clip_l,
    list_checkpoints,
    make_conditioner,
    text_widths,
)

PromptKey = tuple[str, str]  # (prompt text, text-encoder fingerprint)


# --- the store ---------------------------------------------------------------------------------
class PromptStore:
    """(prompt, fingerprint) -> (cond, pooled), encoded at most once per output folder."""

    def __init__(self):
        self._mem: dict[PromptKey, tuple[np.ndarray, np.ndarray]] = {}
        self._extra: dict[PromptKey, dict[str, np.ndarray]] = {}  # optional columns (CLIP_L_COLUMNS)
        self._disk: dict[PromptKey, tuple[Path, int]] = {}
        self._handles: dict[Path, h5py.File] = {}

    @classmethod
    def from_parts(cls, parts: list[Path]) -> "PromptStore":
        from extraction.pairs import read_prompt_table

        store = cls()
        for path in parts:
            with h5py.File(path, "r") as f:
                texts, fps, rows = read_prompt_table(f)
            for key, row in zip(zip(texts, fps), rows):
                if row >= 0:  # -1: stored by another part
                    store._disk.setdefault(key, (Path(path), int(row)))
        return store

    def __len__(self) -> int:
        return len(self._mem.keys() | self._disk.keys())

    def __contains__(self, key: PromptKey) -> bool:
        return key in self._mem or key in self._disk

    def missing(self, keys) -> list[PromptKey]:
        seen, out = set(), []
        for k in keys:
            if k not in self and k not in seen:
                seen.add(k)
                out.append(k)
        return out

    def on_disk(self, key: PromptKey) -> bool:
        """Stored in a part already written (a new part need not store it again)."""
        return key in self._disk

    def add(self, keys: list[PromptKey], cond: np.ndarray, pooled: np.ndarray, **extra: np.ndarray) -> None:
        for i, k in enumerate(keys):
            self._mem[k] = (cond[i], pooled[i])
            if extra:
                self._extra[k] = {name: v[i] for name, v in extra.items()}

    def extras(self, keys: list[PromptKey], names=CLIP_L_COLUMNS) -> dict[str, np.ndarray]:
        """Optional columns of `keys` ({} when none of them has any); a key without them while others
        have them is an error naming the part it was read from (mixing runs with and without clip_l)."""
        have = [k in self._extra or (k in self._disk and names[0] in self._file(self._disk[k][0])["prompts"])
                for k in keys]
        if not any(have):
            return {}
        if not all(have):
            k = keys[have.index(False)]
            where = self._disk[k][0] if k in self._disk else "this run"
            raise ValueError(f"{where}: prompt {k[0]!r} has no /prompts/{names[0]} while other prompts do; extract "
                             "clip_l into a new out folder (or rerun without clip_l)")
        out: dict[str, list] = {n: [] for n in names}
        for k in keys:
            if k in self._extra:
                row = self._extra[k]
            else:
                path, r = self._disk[k]
                row = {n: self._file(path)[f"prompts/{n}"][r] for n in names}
            for n in names:
                out[n].append(row[n])
        return {n: np.stack(v) for n, v in out.items()}

    def get(self, keys: list[PromptKey]) -> tuple[np.ndarray, np.ndarray]:
        conds, pooled = [], []
        for k in keys:
            if k in self._mem:
                c, p = self._mem[k]
            else:
                path, row = self._disk[k]
                f = self._file(path)
                c, p = f["prompts/cond"][row], f["prompts/pooled"][row]
            conds.append(c)
            pooled.append(p)
        return np.stack(conds), np.stack(pooled)

    def written(self, path: Path, keys: list[PromptKey]) -> None:
        """`keys` are conditioning rows 0.. of the part at `path`: drop them from memory, read them from there."""
        for row, k in enumerate(keys):
            if k in self._mem:
                del self._mem[k]
                self._extra.pop(k, None)
                self._disk[k] = (Path(path), row)

    def _file(self, path: Path) -> h5py.File:
        if path not in self._handles:
            self._handles[path] = h5py.File(path, "r")
        return self._handles[path]

    def close(self) -> None:
        for f in self._handles.values():
            f.close()
        self._handles.clear()
