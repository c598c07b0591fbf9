"""Vault metadata (one row per image) and the conditioning store (one row per unique prompt)."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np

from luna.files import atomic_path
from vault.manifest import VaultError

_STR = h5py.string_dtype(encoding="utf-8")


def _strings(ds) -> list[str]:
    return [s.decode() if isinstance(s, bytes) else str(s) for s in ds[()]]


@dataclass
class Metadata:
    """Per-image columns as codes into the manifest's name tables, plus category centroid sums."""

    key: np.ndarray  # object [N]
    prompt_id: np.ndarray  # int64 [N], vault-global prompt ids
    checkpoint: np.ndarray  # int32 [N] -> manifest.checkpoints
    category: np.ndarray  # int32 [N] -> list(manifest.categories)
    campaign: np.ndarray  # int32 [N] -> manifest.campaigns
    centroid_sum: np.ndarray  # float64 [C, D]: sum of normalised embeddings per category

    def __len__(self) -> int:
        return len(self.key)

    def members(self, code: int) -> np.ndarray:
        """Global ids of a category, in the order its index holds them."""
        return np.flatnonzero(self.category == code)

    def write(self, path: Path) -> None:
        with atomic_path(path) as tmp:
            with h5py.File(tmp, "w") as f:
                f.create_dataset("key", data=np.asarray(self.key, dtype=object), dtype=_STR)
                for name in ("prompt_id", "checkpoint", "category", "campaign", "centroid_sum"):
                    f.create_dataset(name, data=getattr(self, name))

    @classmethod
    def read(cls, path: Path) -> "Metadata":
        if not path.is_file():
            raise VaultError(f"{path}: vault metadata missing")
        try:
            with h5py.File(path, "r") as f:
                return cls(
                    key=np.array(_strings(f["key"]), dtype=object),
                    **{n: f[n][()] for n in ("prompt_id", "checkpoint", "category", "campaign", "centroid_sum")},
                )
        except (OSError, KeyError) as e:
            raise VaultError(f"{path}: corrupted vault metadata ({e})") from e


def write_prompts(path: Path, text: list[str], fingerprint: list[str]) -> None:
    with atomic_path(path) as tmp:
        with h5py.File(tmp, "w") as f:
            f.create_dataset("text", data=np.asarray(text, dtype=object), dtype=_STR)
            f.create_dataset("te_fingerprint", data=np.asarray(fingerprint, dtype=object), dtype=_STR)


def read_prompts(path: Path) -> tuple[list[str], list[str]]:
    if not path.is_file():
        raise VaultError(f"{path}: vault prompt table missing")
    try:
        with h5py.File(path, "r") as f:
            return _strings(f["text"]), _strings(f["te_fingerprint"])
    except (OSError, KeyError) as e:
        raise VaultError(f"{path}: corrupted vault prompt table ({e})") from e


def write_cond_file(path: Path, pairs_list, rows: list[tuple[int, int]], seq: int, width: int, pooled_dim: int,
                    batch: int = 64) -> None:
    """Copy conditionings into one contiguous fp16 HDF5 file (rows: (pairs index, prompt id) in order).

    Contiguous (unchunked) datasets let readers memory-map the rows at the dataset offset.
    """
    with atomic_path(path) as tmp:
        with h5py.File(tmp, "w") as f:
            cond = f.create_dataset("cond", shape=(len(rows), seq, width), dtype=np.float16)
            pooled = f.create_dataset("pooled", shape=(len(rows), pooled_dim), dtype=np.float16)
            for lo in range(0, len(rows), batch):
                chunk = rows[lo : lo + batch]
                cond[lo : lo + len(chunk)] = np.stack([pairs_list[p].cond([i])[0] for p, i in chunk]).astype(np.float16)
                pooled[lo : lo + len(chunk)] = np.stack([pairs_list[p].pooled([i])[0] for p, i in chunk]).astype(np.float16)


class CondStore:
    """Read-only view over the vault's cond files as one table of prompt rows (memory-mapped)."""

    def __init__(self, folder: Path, files: list[str]):
        self.cond, self.pooled, self.starts = [], [], [0]
        for name in files:
            path = folder / name
            if not path.is_file():
                raise VaultError(f"{path}: conditioning store file missing")
            try:
                with h5py.File(path, "r") as f:
                    c, p = f["cond"], f["pooled"]
                    views = []
                    for ds in (c, p):
                        offset = ds.id.get_offset()
                        if offset is None:  # empty or not contiguous: read into memory
                            views.append(ds[()])
                        else:
                            views.append(np.memmap(path, dtype=np.float16, mode="r", offset=offset, shape=ds.shape))
            except (OSError, KeyError) as e:
                raise VaultError(f"{path}: corrupted conditioning store ({e})") from e
            self.cond.append(views[0])
            self.pooled.append(views[1])
            self.starts.append(self.starts[-1] + len(views[0]))

    def __len__(self) -> int:
        return self.starts[-1]

    def rows(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """fp16 (cond [U,77,C], pooled [U,P]) of sorted unique prompt ids."""
        ids = np.asarray(ids, dtype=np.int64)
        file_of = np.searchsorted(self.starts, ids, side="right") - 1
        conds, pooleds = [], []
        for fi in np.unique(file_of):
            local = ids[file_of == fi] - self.starts[fi]
            conds.append(self.cond[fi][local])
            pooleds.append(self.pooled[fi][local])
        return np.concatenate(conds), np.concatenate(pooleds)
