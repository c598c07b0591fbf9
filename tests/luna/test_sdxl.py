"""luna.models.sdxl: the same weights load identically from both on-disk formats, offline; non-SDXL files are refused."""
from __future__ import annotations

import pytest
import torch

from luna.models import sdxl, tiny
from luna.models.fingerprint import te_fingerprint


PROMPTS = ["closeup of blue eyes, detailed iris", "portrait of a person with green eyes, golden hour"]


def _generate(pipe, prompt="closeup of blue eyes", seed=7):
    out = pipe(prompt, num_inference_steps=4, height=64, width=64, guidance_scale=5.0,
               negative_prompt="blurry, lowres", generator=torch.Generator().manual_seed(seed), output_type="pt")
    return out.images


@pytest.fixture(scope="module")
def base_pipes(files):
    single, folder = files["tiny-base-0"]
    return sdxl.load_sdxl(single), sdxl.load_sdxl(folder)


def test_two_formats_give_identical_images(base_pipes):
    from_single, from_folder = base_pipes
    a, b = _generate(from_single), _generate(from_folder)
    assert a.shape == (1, 3, 64, 64)
    assert torch.isfinite(a).all()
    assert torch.equal(a, b)
    # and they are the in-memory tiny preset, weight for weight
    assert torch.equal(a, _generate(tiny.tiny_pipeline(0, "base")))


def test_images_depend_on_checkpoint_prompt_and_seed(base_pipes, files):
    pipe = base_pipes[0]
    seeds = [torch.Generator().manual_seed(s) for s in (7, 7, 8)]
    image, other_prompt, other_seed = pipe(
        ["closeup of blue eyes", "a red brick wall", "closeup of blue eyes"], num_inference_steps=4, height=64,
        width=64, generator=seeds, output_type="pt").images
    other_ckpt = _generate(sdxl.load_sdxl(files["tiny-pony-1"][0]), seed=7)[0]
    assert (image - other_ckpt).abs().mean() > 1e-3
    assert (image - other_prompt).abs().mean() > 1e-4
    assert (image - other_seed).abs().mean() > 1e-3
    assert image.std() > 0.05  # not a flat image: the factory's quality gate must pass tiny images


def test_encode_prompt_equals_diffusers(base_pipes, files):
    pipe = base_pipes[1]
    ref = pipe.encode_prompt(PROMPTS, device="cpu", num_images_per_prompt=1, do_classifier_free_guidance=True,
                             negative_prompt=["blurry", ""])
    ref_zero = pipe.encode_prompt(PROMPTS, device="cpu", num_images_per_prompt=1, do_classifier_free_guidance=True)
    for path in files["tiny-base-0"]:
        enc = sdxl.load_text_encoders(path)
        cond, pooled, neg, neg_pooled = sdxl.encode_prompt(enc, PROMPTS, ["blurry", ""])
        # diffusers returns (prompt_embeds, negative_prompt_embeds, pooled, negative_pooled)
        for mine, theirs in zip((cond, neg, pooled, neg_pooled), ref):
            assert torch.equal(mine, theirs)
        assert cond.shape == (2, 77, 32 + 64) and pooled.shape == (2, 64)
        _, _, zero, zero_pooled = sdxl.encode_prompt(enc, PROMPTS)
        assert torch.equal(zero, ref_zero[1]) and not zero.any() and not zero_pooled.any()


def test_conditioning_uses_both_encoders_and_padding_carries_prompt(base_pipes):
    enc = sdxl.TextEncoders.from_pipeline(base_pipes[0])
    cond, pooled, _, _ = sdxl.encode_prompt(enc, ["blue eyes", "green eyes"])
    assert torch.allclose(cond[0, 0], cond[1, 0])  # the BOS state is the same for every prompt
    assert not torch.allclose(cond[0, 20], cond[1, 20])  # padding states carry the prompt
    assert not torch.allclose(pooled[0], pooled[1])


def test_detect_architecture(files, tmp_path):
    single, folder = files["tiny-base-0"]
    for path, fmt in ((single, "single_file"), (folder, "diffusers")):
        info = sdxl.detect_architecture(path)
        assert (info.family, info.size, info.format) == ("sdxl", "tiny", fmt), info
    (tmp_path / "empty").mkdir()
    assert sdxl.detect_architecture(tmp_path / "empty").family == "unknown"


def _save(path, tensors):
    from safetensors.torch import save_file

    save_file(tensors, str(path))
    return path


def test_non_sdxl_files_are_refused(tmp_path):
    sd15 = _save(tmp_path / "sd15.safetensors", {
        "model.diffusion_model.input_blocks.0.0.weight": torch.zeros(32, 4, 3, 3),
        "cond_stage_model.transformer.text_model.embeddings.position_embedding.weight": torch.zeros(77, 32),
        "first_stage_model.encoder.conv_in.weight": torch.zeros(16, 3, 3, 3),
    })
    noise = _save(tmp_path / "noise.safetensors", {"a": torch.randn(4, 4), "b": torch.randn(3)})
    inpaint = _save(tmp_path / "inpaint.safetensors", {
        "model.diffusion_model.input_blocks.0.0.weight": torch.zeros(32, 9, 3, 3),
        "model.diffusion_model.label_emb.0.0.weight": torch.zeros(128, 112),
        "conditioner.embedders.0.transformer.text_model.embeddings.position_embedding.weight": torch.zeros(77, 32),
        "conditioner.embedders.1.model.positional_embedding": torch.zeros(77, 64),
        "first_stage_model.encoder.conv_in.weight": torch.zeros(16, 3, 3, 3),
    })
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    assert sdxl.detect_architecture(sd15).family == "sd15"
    cases = ((sd15, "SD 1.x"), (noise, "no Stable Diffusion UNet"), (broken, "not a readable"), (inpaint, "9 input channels"))
    for path, words in cases:
        with pytest.raises(sdxl.NotSDXLError) as err:
            sdxl.load_sdxl(path)
        assert str(path) in str(err.value) and words in str(err.value)
        with pytest.raises(sdxl.NotSDXLError):
            sdxl.load_text_encoders(path)


def test_pickle_refused_unless_allowed(files, tmp_path):
    from safetensors.torch import load_file

    ckpt = tmp_path / "tiny.ckpt"
    torch.save({"state_dict": load_file(str(files["tiny-base-0"][0]))}, ckpt)
    with pytest.raises(sdxl.PickleCheckpointError, match="allow_pickle"):
        sdxl.load_sdxl(ckpt)
    pipe = sdxl.load_sdxl(ckpt, allow_pickle=True)  # read with weights_only=True
    ref = tiny.tiny_pipeline(0, "base").unet.state_dict()
    assert all(torch.equal(v, ref[k]) for k, v in pipe.unet.state_dict().items())
    assert te_fingerprint(ckpt, allow_pickle=True) == te_fingerprint(files["tiny-base-0"][0])


def test_vae_helpers_upcast_fp16_and_check_finite():
    vae = tiny.tiny_vae()
    pixels = torch.rand(1, 3, 64, 64) * 2 - 1
    latents = sdxl.vae_encode(vae, pixels)
    assert latents.shape == (1, 4, 8, 8) and latents.dtype == torch.float32
    decoded = sdxl.vae_decode(vae, latents)
    vae.to(torch.float16)
    half = sdxl.vae_decode(vae, latents)
    assert vae.dtype == torch.float16  # restored after the fp32 pass
    assert half.dtype == torch.float32 and torch.allclose(half, decoded, atol=1e-2)
    assert torch.allclose(sdxl.vae_encode(vae, pixels), latents, atol=1e-2)
    with pytest.raises(sdxl.NonFiniteError):
        sdxl.vae_decode(vae, torch.full_like(latents, float("nan")))


def test_fp16_variant_folder(files, tmp_path):
    """Hub-style folders that hold only `*.fp16.safetensors` weights load too, with the same fingerprint."""
    pipe = tiny.tiny_pipeline(0, "base").to(torch.float16)
    pipe.save_pretrained(tmp_path / "variant", variant="fp16")
    assert not list((tmp_path / "variant" / "unet").glob("diffusion_pytorch_model.safetensors"))
    loaded = sdxl.load_sdxl(tmp_path / "variant")
    assert loaded.unet.dtype == torch.float32
    assert te_fingerprint(tmp_path / "variant") == te_fingerprint(files["tiny-base-0"][0])
    enc = sdxl.load_text_encoders(tmp_path / "variant")
    ref = sdxl.encode_prompt(sdxl.load_text_encoders(files["tiny-base-0"][0]), PROMPTS)
    assert all(torch.equal(a, b) for a, b in zip(sdxl.encode_prompt(enc, PROMPTS), ref))


def _sdxl_shapes(depths: dict[str, int]) -> dict:
    """A minimal original-layout SDXL header at full size, with `depths` transformer blocks per attention block."""
    shapes = {sdxl._UNET_IN: (320, 4, 3, 3), sdxl._UNET_LABEL: (1280, 2816), sdxl._CLIP_L_POS: (77, 768),
              sdxl._BIGG_POS: (77, 1280), sdxl._VAE_IN: (128, 3, 3, 3)}
    for block, n in depths.items():
        for t in range(n):
            shapes[f"model.diffusion_model.{block}.transformer_blocks.{t}.attn1.to_q.weight"] = (640, 640)
    return shapes


def test_distilled_sdxl_single_files_are_not_taken_for_sdxl_base():
    """SSD-1B-style files (SDXL's widths, fewer transformer blocks, no middle attention) would fail to load
    with the base config: they are named as such instead of classified "full"."""
    assert sdxl.classify_shapes(_sdxl_shapes(sdxl.FULL_DEPTHS))[:2] == ("sdxl", "full")
    distilled = {**sdxl.FULL_DEPTHS, "input_blocks.7.1": 4, "input_blocks.8.1": 4, "middle_block.1": 0}
    family, size, reason = sdxl.classify_shapes(_sdxl_shapes(distilled))
    assert (family, size) == ("sdxl", None)
    assert "input_blocks.7.1 has 4 (SDXL base 10)" in reason and "SSD-1B" in reason
    assert "middle_block.1 has 0" in reason
