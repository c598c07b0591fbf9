"""Files written before the redesign (tests/fixtures/formats_v1, written by commit a57b575's code) are
read by today's contract modules, and the format versions are unchanged (pairs: 2, reading 1)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

OLD = Path(__file__).parent / "fixtures" / "formats_v1"


def test_format_versions_are_unchanged():
    import extraction.pairs
    import factory.shards
    import projector.export
    import vault.manifest

    assert factory.shards.FORMAT_VERSION == 1
    # pairs 2: a folder stores each prompt's conditioning once (/prompts/cond_row); version 1 still read
    assert extraction.pairs.FORMAT_VERSION == 2 and extraction.pairs.READ_VERSIONS == (1, 2)
    assert vault.manifest.FORMAT_VERSION == projector.export.FORMAT_VERSION == 1


def test_old_shards_are_read():
    from factory.shards import complete_shards, read_shard

    (tar,) = complete_shards(OLD / "shards")
    samples = list(read_shard(tar))
    assert [s["__key__"] for s in samples] == ["old_000000", "old_000001", "old_000002"]
    assert json.loads(samples[1]["json"])["prompt"] == "an old prompt 1" and samples[1]["png"][:4] == b"\x89PNG"


def test_old_pairs_are_read():
    from extraction.pairs import Pairs

    with Pairs(OLD / "pairs") as pairs:
        assert len(pairs) == 64 and pairs.vision_model == "open_clip:luna-tiny-vit" and pairs.vision_dim == 8
        assert pairs.embed.shape == (64, 8) and pairs.num_prompts == 8


def test_old_vault_is_read_and_answers():
    from extraction.pairs import Pairs
    from vault.query import Vault

    vault = Vault.open(OLD / "vault")
    with Pairs(OLD / "pairs") as pairs:
        found = vault.query(pairs.embed[:4].astype(np.float32), k=2)
        assert [nb[0]["key"] for nb in found.neighbours] == list(pairs.key[:4])
    assert tuple(found.cond.shape) == (4, 77, 16)


def test_old_projector_loads_and_gives_the_same_output():
    from projector.export import load_projector

    projector = load_projector(OLD / "projector", expect_dim=8)
    io = np.load(OLD / "projector_io.npz")
    with torch.no_grad():
        cond, pooled = projector(torch.from_numpy(io["x"]))
    np.testing.assert_allclose(cond.numpy(), io["cond"], rtol=0, atol=1e-6)
    np.testing.assert_allclose(pooled.numpy(), io["pooled"], rtol=0, atol=1e-6)
