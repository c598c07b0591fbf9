"""The Ray path (image actors on both nodes, one text actor) writes the same arrays as one process."""
from __future__ import annotations

from extraction.extract import extract
from tests.extraction.conftest import assert_same_parts, extract_cfg


def test_ray_and_single_process_outputs_identical(extracted, ray_cluster, shards_dir, tiny_checkpoints, tmp_path):
    reference, full = extracted
    out = tmp_path / "pairs"
    result = extract(extract_cfg(shards_dir, out, tiny_checkpoints, "dtype=float32", "cluster=local", "ray.actors=2",
                                 "ray.send_bytes=true"))
    assert len(result.written) == 3 and result.images == full.images
    assert result.text["prompts_encoded"] == full.text["prompts_encoded"] == result.unique_prompts
    assert_same_parts(reference, out)
