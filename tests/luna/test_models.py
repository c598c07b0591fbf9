"""luna.models: the same weights load identically from both on-disk formats, offline."""
from __future__ import annotations

import pytest
import torch

from luna.models import sdxl, tiny
from luna.models.fingerprint import file_fingerprint, te_fingerprint

PROMPTS = ["closeup of blue eyes, detailed iris", "portrait of a person with green eyes, golden hour"]


def _generate(pipe, prompt="closeup of blue eyes", seed=7):
    out = pipe(prompt, num_inference_steps=4, height=64, width=64, guidance_scale=5.0,
               negative_prompt="blurry, lowres", generator=torch.Generator().manual_seed(seed), output_type="pt")
    return out.images


@pytest.fixture(scope="module")
def files(tiny_dir):
    single = sorted((tiny_dir / "single").glob("*.safetensors"))
    folders = sorted(p for p in (tiny_dir / "diffusers").iterdir() if p.is_dir())
    assert [p.stem for p in single] == [p.name for p in folders] == ["tiny-base-0", "tiny-pony-1"]
    return dict(zip([p.stem for p in single], zip(single, folders)))


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


def test_checkpoints_are_distinct_and_fingerprints_stable(files):
    (s0, d0), (s1, d1) = files["tiny-base-0"], files["tiny-pony-1"]
    assert file_fingerprint(s0) != file_fingerprint(s1)
    assert file_fingerprint(d0) != file_fingerprint(d1)
    assert file_fingerprint(s0) == file_fingerprint(s0)
    u0, u1 = tiny.tiny_unet(0).state_dict(), tiny.tiny_unet(1).state_dict()
    assert any(not torch.equal(u0[k], u1[k]) for k in u0 if u0[k].numel() > 1)


def test_te_fingerprint_same_across_formats_and_family(files, tmp_path):
    (s0, d0), (s1, d1) = files["tiny-base-0"], files["tiny-pony-1"]
    assert te_fingerprint(s0) == te_fingerprint(d0)
    assert te_fingerprint(s1) == te_fingerprint(d1)
    assert te_fingerprint(s0) != te_fingerprint(s1)  # another family = retrained text encoders
    # another checkpoint of the base family shares its text encoders but not its UNet
    s2 = tiny.write_single_file(tiny.tiny_pipeline(2, "base"), tmp_path / "tiny-base-2.safetensors")
    assert te_fingerprint(s2) == te_fingerprint(s0)
    assert file_fingerprint(s2) != file_fingerprint(s0)


def test_te_fingerprint_sees_a_fine_tuned_text_encoder(tmp_path):
    pipe = tiny.tiny_pipeline(0, "base")
    before = te_fingerprint(tiny.write_single_file(pipe, tmp_path / "a.safetensors"))
    with torch.no_grad():  # a small fine-tune of one bigG layer
        layer = pipe.text_encoder_2.text_model.encoder.layers[1] if hasattr(pipe.text_encoder_2, "text_model") else pipe.text_encoder_2.encoder.layers[1]
        layer.mlp.fc1.weight.add_(0.01)
    assert te_fingerprint(tiny.write_single_file(pipe, tmp_path / "b.safetensors")) != before


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


def test_tokenizers_pad_like_sdxl():
    import open_clip

    from luna.models.tokenizers import sdxl_tokenizers

    tok, tok2 = sdxl_tokenizers()
    text = "closeup of hazel eyes, macro photo of an eye"
    ids = tok(text, padding="max_length", max_length=77).input_ids
    ids2 = tok2(text, padding="max_length", max_length=77).input_ids
    reference = open_clip.tokenizer.SimpleTokenizer()(text)[0].tolist()  # pads with 0
    n = reference.index(49407) + 1
    assert ids[:n] == ids2[:n] == reference[:n]
    assert ids[n:] == [49407] * (77 - n)  # CLIP-L pads with EOS
    assert ids2[n:] == [0] * (77 - n)  # bigG pads with "!" (id 0)
    assert tok2.pad_token == "!" and tok.pad_token == "<|endoftext|>"


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


def test_tiny_weights_are_deterministic():
    a, b = tiny.tiny_pipeline(1, "pony"), tiny.tiny_pipeline(1, "pony")
    for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
        sa, sb = getattr(a, name).state_dict(), getattr(b, name).state_dict()
        assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    te_base, te_pony = tiny.tiny_text_encoders("base")[1].state_dict(), a.text_encoder_2.state_dict()
    assert any(not torch.equal(te_base[k], te_pony[k]) for k in te_base if te_base[k].numel() > 1)


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


def test_original_layout_of_real_sdxl_sizes():
    """The repo's SDXL base configs build the real sizes, and the diffusers->original conversion
    gives the community key layout that diffusers' own converters map back exactly (meta tensors)."""
    import json

    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint, convert_ldm_vae_checkpoint
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from luna.models import convert
    from luna.models.configs import SDXL_BASE

    cfg = lambda sub: json.loads((SDXL_BASE / sub / "config.json").read_text())  # noqa: E731
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(cfg("unet"))
        vae = AutoencoderKL.from_config(cfg("vae"))
        te1 = CLIPTextModel(CLIPTextConfig(**cfg("text_encoder")))
        te2 = CLIPTextModelWithProjection(CLIPTextConfig(**cfg("text_encoder_2")))
    counts = [sum(p.numel() for p in m.parameters()) for m in (unet, vae, te1, te2)]
    assert counts == [2_567_463_684, 83_653_863, 123_060_480, 694_659_840]  # SDXL base 1.0
    original = convert.unet_to_original(unet.state_dict(), dict(unet.config))
    assert set(convert_ldm_unet_checkpoint(original, dict(unet.config))) == set(unet.state_dict())
    assert original["model.diffusion_model.input_blocks.8.1.transformer_blocks.9.attn2.to_k.weight"].shape == (1280, 2048)
    assert original["model.diffusion_model.output_blocks.2.2.conv.weight"].shape == (1280, 1280, 3, 3)
    assert original["model.diffusion_model.label_emb.0.0.weight"].shape == (1280, 2816)
    vae_original = convert.vae_to_original(vae.state_dict(), dict(vae.config))
    assert set(convert_ldm_vae_checkpoint(vae_original, dict(vae.config))) == set(vae.state_dict())
    assert vae_original["first_stage_model.encoder.mid.attn_1.q.weight"].shape == (512, 512, 1, 1)
    bigg = convert.bigg_to_original(te2.state_dict())
    assert bigg["conditioner.embedders.1.model.transformer.resblocks.31.attn.in_proj_weight"].shape == (3840, 1280)
    shapes = {k: tuple(v.shape) for k, v in {**original, **vae_original, **convert.clip_l_to_original(te1.state_dict()), **bigg}.items()}
    assert sdxl.classify_shapes(shapes)[:2] == ("sdxl", "full")


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
