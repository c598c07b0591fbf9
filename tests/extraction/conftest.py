"""Fixtures of the extraction tests: tiny checkpoints with their fingerprints, and a folder of shards."""
from __future__ import annotations

from pathlib import Path

import pytest
from tests.extraction.extraction_shards import shard_metas, write_shard


@pytest.fixture(scope="session")
def tiny_checkpoints(tiny_dir) -> list[dict]:
    """The session's tiny single-file checkpoints with their fingerprints."""
    from luna.models.fingerprint import te_fingerprint

    out = []
    for p in sorted((Path(tiny_dir) / "single").glob("*.safetensors")):
        out.append({"name": p.name[: -len(".safetensors")], "path": p, "fingerprint": p.name,
                    "te_fingerprint": te_fingerprint(p)})
    return out


@pytest.fixture(scope="session")
def shards_dir(tmp_path_factory, tiny_checkpoints) -> Path:
    """Three complete shards (12 samples, 5 prompts x 2 text-encoder families, repeats across shards)."""
    folder = tmp_path_factory.mktemp("shards")
    for s in range(3):
        write_shard(folder, f"faces-pc1-w0-{s:06d}", shard_metas(tiny_checkpoints, 4, offset=4 * s), seed=s)
    return folder
