"""Extraction end to end on the tiny preset: equality with diffusers and open_clip, dedup, bad input, resume."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from extraction.extract import OutputMismatch, extract
from extraction.image import VisionModelError
from extraction.pairs import Pairs
from extraction.reader import ShardError
from factory.shards import iter_samples
from tests.extraction.conftest import assert_same_parts, extract_cfg
from tests.extraction.extraction_shards import PROMPTS, shard_metas, write_shard

REPO = Path(__file__).resolve().parents[2]


def _sdxl_pipeline(family: str):
    from diffusers import StableDiffusionXLPipeline

    from luna.models.tiny import tiny_text_encoders
    from luna.models.tokenizers import sdxl_tokenizers

    te1, te2 = tiny_text_encoders(family)
    tok, tok2 = sdxl_tokenizers()
    return StableDiffusionXLPipeline(vae=None, text_encoder=te1, text_encoder_2=te2, tokenizer=tok, tokenizer_2=tok2,
                                     unet=None, scheduler=None, force_zeros_for_empty_prompt=True, add_watermarker=False)


def test_conditioning_equals_diffusers_encode_prompt(extracted, tiny_checkpoints):
    out, _ = extracted
    family_of = {c["te_fingerprint"]: c["family"] for c in tiny_checkpoints}
    with Pairs(out) as p:
        assert p.text_dims == (32, 64)
        for fp in set(p.te_fingerprint):
            pipe = _sdxl_pipeline(family_of[fp])
            ids = [i for i in range(p.num_prompts) if p.te_fingerprint[i] == fp]
            texts = [p.prompt_text[i] for i in ids]
            with torch.no_grad():
                cond, _, pooled, _ = pipe.encode_prompt(texts, device="cpu", do_classifier_free_guidance=False)
            np.testing.assert_allclose(p.cond(ids), cond.numpy(), rtol=1e-5, atol=1e-5)
            np.testing.assert_allclose(p.pooled(ids), pooled.numpy(), rtol=1e-5, atol=1e-5)
        # the two families' encoders differ, so the stored conditioning depends on the checkpoint
        a = p.prompt_text.index(PROMPTS[0])
        b = next(i for i in range(p.num_prompts) if p.prompt_text[i] == PROMPTS[0] and i != a)
        assert not np.allclose(p.cond([a]), p.cond([b]))


def test_image_embeddings_equal_open_clip_encode_image(extracted, shards_dir):
    from PIL import Image

    from luna.models.vision import TINY_NAME, create_open_clip

    out, _ = extracted
    model = create_open_clip(TINY_NAME)
    images, keys = [], []
    for tar in sorted(shards_dir.glob("*.tar")):
        for key, files in iter_samples(tar):
            keys.append(key)
            images.append(model.luna_preprocess(Image.open(__import__("io").BytesIO(files["png"])).convert("RGB")))
    with torch.no_grad():
        ref = model.encode_image(torch.stack(images)).numpy()
    with Pairs(out) as p:
        assert p.vision_model == f"open_clip:{TINY_NAME}" and p.vision_dim == ref.shape[1]
        row = {k: i for i, k in enumerate(p.key)}
        got = p.embed[[row[k] for k in keys]]
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5)


def test_each_unique_prompt_encoded_once_across_parts_and_runs(extracted, shards_dir, tiny_checkpoints, tmp_path):
    out, result = extracted
    metas = [json.loads(f["json"]) for t in sorted(shards_dir.glob("*.tar")) for _, f in iter_samples(t)]
    unique = {(m["prompt"], m["te_fingerprint"]) for m in metas}
    assert len(unique) < len(metas)  # prompts repeat: dedup has something to do
    assert result.text["prompts_encoded"] == len(unique) == result.unique_prompts
    assert set(result.text["encoder_loads"].values()) == {1} and len(result.text["encoder_loads"]) == 2
    assert [w.name for w in result.written] == [f"pairs-{t.stem}.h5" for t in sorted(shards_dir.glob("*.tar"))]
    with Pairs(out) as p:
        assert len(p) == len(metas) and p.num_prompts == len(unique)
        stored = []
        for part in p.parts:  # every part lists the prompts its images use, once each
            with h5py.File(part, "r") as f:
                pairs = list(zip(f["prompts/text"].asstr()[()], f["prompts/te_fingerprint"].asstr()[()]))
                assert len(pairs) == len(set(pairs)) and f["prompts/cond"].chunks[0] == 1
                rows = f["prompts/cond_row"][()]
                stored += [k for k, r in zip(pairs, rows) if r >= 0]
                assert len(f["prompts/cond"]) == (rows >= 0).sum()
        assert sorted(stored) == sorted(unique)  # the folder stores each conditioning once, whatever the parts

    # a later run over a copy of the folder with one more shard encodes only the prompt never seen
    import shutil

    more = tmp_path / "shards"
    shutil.copytree(shards_dir, more)
    new_metas = shard_metas(tiny_checkpoints[:1], 3, offset=0) + shard_metas(tiny_checkpoints[:1], 1, 0, ["a new prompt"])
    write_shard(more, "faces-pc2-w0-000000", new_metas, seed=9)
    out2 = tmp_path / "pairs"
    shutil.copytree(out, out2)
    again = extract(extract_cfg(more, out2, tiny_checkpoints, "dtype=float32", "workers=0"))
    assert again.skipped_done == [t.name for t in sorted(shards_dir.glob("*.tar"))]
    assert again.text["prompts_encoded"] == 1 and again.images == 4


def test_tokens_and_fp16_storage(shards_dir, tiny_checkpoints, tmp_path):
    from extraction.reader import decode_image
    from luna.models.vision import load_vision

    out = tmp_path / "pairs"
    extract(extract_cfg(str(shards_dir / "faces-pc1-w0-000000.tar"), out, tiny_checkpoints, "tokens=true",
                        "workers=0"))
    tower = load_vision("tiny")
    files = [f for _, f in iter_samples(shards_dir / "faces-pc1-w0-000000.tar")]
    pixels = torch.stack([tower.preprocess(decode_image(f)) for f in files])
    with Pairs(out) as p:
        assert p.has_tokens and p.embed.dtype == np.float16
        tokens = p.tokens(np.arange(len(p)))
        assert tokens.dtype == np.float16
        np.testing.assert_allclose(tokens, tower.encode_tokens(pixels).numpy(), rtol=2e-3, atol=2e-3)
        np.testing.assert_allclose(p.embed, tower.encode(pixels).numpy(), rtol=2e-3, atol=2e-3)
        assert p.cond([0]).dtype == np.float16


def test_reference_text_encoders(shards_dir, tiny_checkpoints, tmp_path):
    ref = tiny_checkpoints[1]
    # a brace pattern, quoted for Hydra as a user types it on the command line
    r = extract(extract_cfg(f"'{shards_dir}/faces-pc1-w0-00000{{0,1}}.tar'", tmp_path / "p", tiny_checkpoints,
                            "text=reference", f"text.checkpoint={ref['path']}", "workers=0"))
    with Pairs(tmp_path / "p") as p:
        assert set(p.te_fingerprint) == {ref["te_fingerprint"]}
        assert p.num_prompts == len(set(p.prompt_text)) == r.text["prompts_encoded"]
    assert r.text["encoder_loads"] == {ref["te_fingerprint"]: 1}


def test_bad_input_is_a_clear_error_and_loses_nothing(shards_dir, tiny_checkpoints, tmp_path):
    from extraction.synthetic import write_synthetic_pairs
    from luna.models.vision import TINY_NAME, create_open_clip

    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ShardError, match="no shard tars"):
        extract(extract_cfg(empty, tmp_path / "o1", tiny_checkpoints))

    other = tmp_path / "other_vision"
    write_synthetic_pairs(other, n_images=8, n_prompts=4, dim=16, vision_model="open_clip:ViT-H-14")
    before = {p.name: p.read_bytes() for p in other.iterdir()}
    with pytest.raises(OutputMismatch, match="ViT-H-14"):
        extract(extract_cfg(shards_dir, other, tiny_checkpoints))
    assert {p.name: p.read_bytes() for p in other.iterdir()} == before

    # weights of another architecture (the tiny tower with one tensor the wrong shape)
    from safetensors.torch import save_file

    state = {k: v.contiguous() for k, v in create_open_clip(TINY_NAME).state_dict().items()}
    state["visual.proj"] = torch.zeros(64, 48)
    save_file(state, str(tmp_path / "wrong.safetensors"))
    with pytest.raises(VisionModelError, match="visual.proj"):
        extract(extract_cfg(shards_dir, tmp_path / "o2", tiny_checkpoints, f"vision.weights={tmp_path / 'wrong.safetensors'}"))
    assert not (tmp_path / "o2").exists()

    bad_version = tmp_path / "v2"
    write_shard(bad_version, "faces-pc1-w0-000000", shard_metas(tiny_checkpoints, 2, 0), format_version=2)
    with pytest.raises(ShardError, match="format_version 2"):
        extract(extract_cfg(bad_version, tmp_path / "o3", tiny_checkpoints))


def test_corrupt_shard_is_reported_and_the_rest_extracted(shards_dir, tiny_checkpoints, tmp_path):
    import shutil

    folder = tmp_path / "shards"
    shutil.copytree(shards_dir, folder)
    bad = folder / "faces-pc1-w0-000001.tar"
    bad.write_bytes(bad.read_bytes()[: bad.stat().st_size // 2])
    out = tmp_path / "pairs"
    r = extract(extract_cfg(folder, out, tiny_checkpoints, "workers=0"))
    report = json.loads((out / "extract_report.json").read_text())
    assert [Path(c["shard"]).name for c in report["corrupt"]] == [bad.name]
    assert sorted(p.name for p in out.glob("*.h5")) == ["pairs-faces-pc1-w0-000000.h5", "pairs-faces-pc1-w0-000002.h5"]
    assert r.images == 8 and report["images"] == 8


# --- resume after a crash ------------------------------------------------------------------------

# The child runs `luna extract` and SIGKILLs itself when the second part is about to be written,
# leaving a half-written temporary file behind as a real crash would.
CHILD = textwrap.dedent(
    """
    import os, signal, sys
    from pathlib import Path
    import extraction.pairs as pairs

    real, calls = pairs.write_part, []

    def write_then_die(path, part, dtype="float16"):
        calls.append(path)
        if len(calls) == 2:
            Path(path).with_name(f".{Path(path).name}.tmp-{os.getpid()}").write_bytes(b"half a part")
            os.kill(os.getpid(), signal.SIGKILL)
        return real(path, part, dtype=dtype)

    pairs.write_part = write_then_die
    from extraction.cli import main
    sys.exit(main(sys.argv[1:]))
    """
)


def test_resume_after_kill_gives_the_uninterrupted_result(extracted, shards_dir, tiny_checkpoints, tmp_path):
    reference, full = extracted
    out = tmp_path / "pairs"
    args = [f"shards={shards_dir}", f"out={out}", f"checkpoints.dirs=[{tiny_checkpoints[0]['dir']}]",
            "progress=false", "batch_size=3", "dtype=float32", "workers=2"]
    env = dict(os.environ, PYTHONPATH=str(REPO))
    child = subprocess.run([sys.executable, "-c", CHILD, *args], cwd=REPO, env=env, capture_output=True, text=True,
                           timeout=300)
    assert child.returncode == -9, child.stderr[-2000:]
    assert [p.name for p in out.glob("*.h5")] == ["pairs-faces-pc1-w0-000000.h5"]

    resumed = extract(extract_cfg(shards_dir, out, tiny_checkpoints, "dtype=float32", "workers=2"))
    assert resumed.skipped_done == ["faces-pc1-w0-000000.tar"] and len(resumed.written) == 2
    # prompts of the first part were not encoded again
    assert resumed.text["prompts_encoded"] < full.text["prompts_encoded"]
    assert resumed.unique_prompts == full.unique_prompts
    assert_same_parts(reference, out)


def test_parts_record_their_shard_folder_and_a_vault_finds_it(extracted, shards_dir, tmp_path):
    from extraction.pairs import read_attrs
    from vault.build import build_vault

    out, _ = extracted
    parts = sorted(out.glob("*.h5"))
    assert parts and all(read_attrs(p)["shards_dir"] == str(shards_dir.resolve()) for p in parts)
    m = build_vault(out, tmp_path / "v", categories=False)  # no shards=: the folder comes from the parts
    assert m.shard_folders == [str(shards_dir.resolve())]
