"""vault.index: recall of the chosen index against exact search, index choice by size and memory."""
from __future__ import annotations

import numpy as np
import pytest

from tests.vault.conftest import _queries
from vault.build import build_vault
from vault.index import choose_index_spec, exact_search, recall_at
from vault.query import Vault


@pytest.mark.parametrize("spec", ["HNSW32", "IVF64,Flat"])
def test_recall_at_10_against_exact_search(pairs, pairs_dir, tmp_path, spec):
    vault = Vault.open(build_vault(pairs_dir, tmp_path / "v", index=spec, categories=False) and tmp_path / "v")
    q = _queries(pairs)
    _, truth = exact_search(pairs.embed.astype(np.float32), q, 10)
    found = vault.search(q, k=10)
    ids = np.array([[int(n["key"]) for n in nb] for nb in found.neighbours])  # synthetic keys are row numbers
    assert recall_at(ids, truth) >= 0.95


def test_index_choice_follows_size_and_memory():
    assert choose_index_spec(500, 1024, 2**32) == "Flat"
    assert choose_index_spec(5000, 1024, 2**32) == "HNSW15"
    assert choose_index_spec(200_000, 1024, 16 * 2**30) == "HNSW32"
    assert choose_index_spec(1_000_000, 1024, 4 * 2**30) == "HNSW24"
    assert choose_index_spec(200_000, 1024, 830_000_000) == "IVF2048,Flat"  # HNSW8 would not fit
    assert choose_index_spec(5_000_000, 1024, 16 * 2**30) == "OPQ256,IVF16384_HNSW32,PQ256x8"
