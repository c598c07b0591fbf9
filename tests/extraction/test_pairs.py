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


def _stored_rows(folder) -> int:
    total = 0
    for part in sorted(folder.glob("*.h5")):
        with h5py.File(part) as f:
            total += len(f["prompts/cond"])
    return total


def test_many_parts_store_each_prompt_once_and_read_back_identical(tmp_path):
    from extraction.synthetic import synthetic_encode, write_synthetic_pairs

    # every part shows every prompt ("cycle" order): parts would each store all 40 in format 1
    one = write_synthetic_pairs(tmp_path / "one", 800, 40, 8, parts=1)
    many = write_synthetic_pairs(tmp_path / "many", 800, 40, 8, parts=16)
    assert _stored_rows(one) == _stored_rows(many) == 40
    cond_bytes = lambda d: sum(h5py.File(p)["prompts/cond"].id.get_storage_size() for p in d.glob("*.h5"))  # noqa: E731
    assert cond_bytes(many) == cond_bytes(one)
    with Pairs(one) as a, Pairs(many) as b:
        assert a.prompt_text == b.prompt_text and a.num_prompts == b.num_prompts == 40
        ids = np.arange(40)
        np.testing.assert_array_equal(a.cond(ids), b.cond(ids))
        np.testing.assert_array_equal(a.pooled(ids), b.pooled(ids))
        np.testing.assert_array_equal(b.cond(b.prompt_id)[:, 0], a.cond(a.prompt_id)[:, 0])
        cond, _ = synthetic_encode(b.prompt_text, text_dims=(32, 64))
        np.testing.assert_allclose(b.cond(ids).astype(np.float32), cond, atol=2e-3)
    # one part opened alone finds the conditionings its siblings store
    last = sorted(many.glob("*.h5"))[-1]
    with h5py.File(last) as f:
        assert len(f["prompts/cond"]) == 0 and len(f["prompts/text"]) == 40
    with Pairs(last) as p, Pairs(one) as a:
        assert len(p) == 50 and p.parts == [last]
        np.testing.assert_array_equal(p.cond(np.arange(40)), a.cond([a.prompt_text.index(t) for t in p.prompt_text]))


def test_removed_part_is_a_clear_error_when_its_conditionings_are_read(tmp_path):
    from extraction.synthetic import write_synthetic_pairs

    many = write_synthetic_pairs(tmp_path / "many", 200, 10, 8, parts=4)
    (many / "part-00000.h5").unlink()  # the part that stored every prompt
    with Pairs(many) as p:
        assert len(p) == 150  # image columns still read
        with pytest.raises(PairsFormatError, match="stored in no part of the folder"):
            p.cond([0])


def test_row_shape_is_read_from_a_part_that_stores_the_column(tmp_path):
    """A part whose prompts another part stores keeps no conditionings, and `luna extract clip_l=true`
    writes no /prompts/clip_l_* there: the shape of a row comes from a part that holds rows."""
    stored = _part(["blue eyes", "red hair"], ["blue eyes", "red hair"], 1)
    stored.prompts["clip_l_cond"] = np.ones((2, 77, 3))
    stored.prompts["clip_l_pooled"] = np.ones((2, 3))
    write_part(tmp_path / "b.h5", stored)
    empty = _part(["red hair", "blue eyes"], ["red hair"], 0)  # sorts first; stores nothing
    empty.prompts.update(cond_row=np.array([-1, -1]), cond=np.zeros((0, 77, 10)), pooled=np.zeros((0, 6)))
    write_part(tmp_path / "a.h5", empty)
    with Pairs(tmp_path) as p:
        assert p.parts[0].name == "a.h5" and p.has_clip_l
        assert p.row_shape("clip_l_cond") == ((77, 3), np.dtype(np.float16))
        assert p.row_shape("clip_l_pooled") == ((3,), np.dtype(np.float16))
        assert p.row_shape("cond") == ((77, 10), np.dtype(np.float16))
        with pytest.raises(PairsFormatError, match="no part that stores conditionings has /prompts/tokens.*b.h5"):
            p.row_shape("tokens")


def test_format_1_parts_still_read(tmp_path):
    path = write_part(tmp_path / "a.h5", _part(["blue eyes", "red hair"], ["red hair", "blue eyes"]))
    with h5py.File(path, "a") as f:  # what format 1 wrote: no cond_row, every prompt stored
        del f["prompts/cond_row"]
        f.attrs["format_version"] = 1
    write_part(tmp_path / "b.h5", _part(["red hair", "gold"], ["gold"], 1))
    with Pairs(tmp_path) as p:
        assert p.num_prompts == 3 and read_attrs(path)["format_version"] == 1
        texts = [p.prompt_text[i] for i in p.prompt_id]
        for t, c in zip(texts, p.cond(p.prompt_id)):
            assert np.allclose(c, sum(map(ord, t)) / 1000, atol=1e-3)
    with h5py.File(path, "a") as f:
        f.attrs["format_version"] = 3
    with pytest.raises(PairsFormatError, match="format_version 3"):
        read_attrs(path)


def test_cond_rows_must_match_the_stored_conditionings(tmp_path):
    part = _part(["x", "y"], ["x", "y"])
    part.prompts["cond_row"] = np.array([0, -1])  # one stored row, but cond holds two
    with pytest.raises(PairsFormatError, match="/prompts/cond has 2 rows, expected 1"):
        write_part(tmp_path / "a.h5", part)
    part.prompts["cond_row"] = np.array([1, 0])
    with pytest.raises(PairsFormatError, match="cond_row"):
        write_part(tmp_path / "a.h5", part)


def test_pairs_info_bytes_per_prompt_do_not_depend_on_the_number_of_parts(tmp_path):
    from extraction.cli_info import FULL_PROMPT_BYTES, info_text, pairs_info
    from extraction.synthetic import write_synthetic_pairs

    one = pairs_info(write_synthetic_pairs(tmp_path / "one", 600, 30, 16, parts=1))["storage"]
    many = pairs_info(write_synthetic_pairs(tmp_path / "many", 600, 30, 16, parts=12))["storage"]
    assert one["stored_conditionings"] == many["stored_conditionings"] == 30
    assert one["cond_bytes_per_prompt"] == many["cond_bytes_per_prompt"] == (77 * 96 + 64) * 2
    assert one["cond_bytes_per_unique_prompt"] == many["cond_bytes_per_unique_prompt"]
    full = many["full_size"]
    assert FULL_PROMPT_BYTES == 317_952 and full["bytes_per_prompt_stored"] > FULL_PROMPT_BYTES
    assert full["bytes_per_image_stored"] == pytest.approx(
        many["image_bytes_per_image"] + full["bytes_per_prompt_stored"] / 20)
    assert many["image_bytes_per_image"] < full["bytes_per_image_prompts_only"] < full["bytes_per_image_stored"] / 50
    text = info_text(tmp_path / "many")
    assert "per prompt       14912 B conditioning (77x96 + 64, 30 stored)" in text
    assert "317,952 B per prompt" in text and "657,920 B/image at ViT-H-14" in text
