"""The pairs format: atomic parts, cross-part prompt dedup, attribute checks, clear errors."""
import h5py
import numpy as np
import pytest

from extraction.pairs import FORMAT_VERSION, Pairs, PairsFormatError, PairsPart, read_attrs, write_part

ATTRS = {"vision_model": "open_clip:test", "vision_dim": 8, "text_dims": [4, 6], "pooled_dim": 6}


def _part(prompts, image_prompts, seed=0, attrs=ATTRS):
    rng = np.random.default_rng(seed)
    n, p = len(image_prompts), len(prompts)
    images = {
        "key": [f"k{seed}_{i}" for i in range(n)],
        "embed": rng.standard_normal((n, 8)),
        "prompt_id": np.array([prompts.index(t) for t in image_prompts]),
        "checkpoint": ["ckA"] * n,
        "category": ["c/eyes"] * n,
        "campaign": ["c"] * n,
        "seed": np.arange(n),
    }
    cond = np.stack([np.full((77, 10), float(sum(map(ord, t))) / 1000) for t in prompts])
    pooled = cond[:, 0, :6]
    return PairsPart(images, {"text": prompts, "cond": cond, "pooled": pooled, "te_fingerprint": ["fp"] * p}, dict(attrs))


def test_parts_merge_with_prompts_deduplicated(tmp_path):
    write_part(tmp_path / "a.h5", _part(["blue eyes", "red hair"], ["blue eyes", "red hair", "blue eyes"], 0))
    write_part(tmp_path / "b.h5", _part(["red hair", "gold ring"], ["gold ring", "red hair"], 1))
    with Pairs(tmp_path) as pairs:
        assert len(pairs) == 5
        assert pairs.num_prompts == 3  # "red hair" is shared across parts
        texts = [pairs.prompt_text[i] for i in pairs.prompt_id]
        assert texts == ["blue eyes", "red hair", "blue eyes", "gold ring", "red hair"]
        cond = pairs.cond(pairs.prompt_id)
        for t, c in zip(texts, cond):
            assert np.allclose(c, sum(map(ord, t)) / 1000, atol=1e-3)
        assert cond.dtype == np.float16 and cond.shape == (5, 77, 10)
        assert pairs.text_dims == (4, 6) and pairs.vision_dim == 8


def test_chunked_one_prompt_per_chunk_and_no_temp_left(tmp_path):
    path = write_part(tmp_path / "a.h5", _part(["x", "y"], ["x", "y"]))
    with h5py.File(path) as f:
        assert f["prompts/cond"].chunks == (1, 77, 10)
        assert f.attrs["format_version"] == FORMAT_VERSION
    assert [p.name for p in tmp_path.iterdir()] == ["a.h5"]


def test_mismatched_parts_and_bad_files_are_clear_errors(tmp_path):
    write_part(tmp_path / "a.h5", _part(["x"], ["x"]))
    write_part(tmp_path / "b.h5", _part(["y"], ["y"], attrs={**ATTRS, "vision_model": "open_clip:other"}))
    with pytest.raises(PairsFormatError, match="vision_model"):
        Pairs(tmp_path)
    (tmp_path / "b.h5").unlink()
    with h5py.File(tmp_path / "c.h5", "w") as f:
        f.attrs["format_version"] = FORMAT_VERSION
        f.create_group("images")
    with pytest.raises(PairsFormatError, match="missing datasets"):
        read_attrs(tmp_path / "c.h5")
    (tmp_path / "d.h5").write_bytes(b"not hdf5")
    with pytest.raises(PairsFormatError, match="not a readable"):
        read_attrs(tmp_path / "d.h5")
    with pytest.raises(PairsFormatError, match="prompt_id"):
        bad = _part(["x"], ["x"])
        bad.images["prompt_id"] = np.array([3])
        write_part(tmp_path / "e.h5", bad)
    assert not (tmp_path / "e.h5").exists()


def test_reads_a_part_written_by_the_format_v1_writer():
    """tests/fixtures/format_v1: a part written before the redesign reads back unchanged."""
    from pathlib import Path

    fixture = Path(__file__).resolve().parents[1] / "fixtures" / "format_v1"
    expected = np.load(fixture / "expected.npz")
    assert FORMAT_VERSION == 1
    with Pairs(fixture / "pairs") as p:
        assert (len(p), p.num_prompts, p.vision_model, p.vision_dim, p.text_dims) == (3, 2, "tiny", 8, (2, 2))
        assert p.key == [f"fixture_job_{i:06d}" for i in range(3)] and list(p.seed) == [100, 101, 102]
        assert p.prompt_text == ["prompt 0", "prompt 1"] and list(p.prompt_id) == [0, 1, 1]
        np.testing.assert_array_equal(p.embed, expected["embed"])
        np.testing.assert_array_equal(p.cond([0, 1]), expected["cond"])
        np.testing.assert_array_equal(p.pooled([1]), expected["pooled"][1:])
