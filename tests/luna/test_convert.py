"""luna.models.convert: the original single-file key layout at the real SDXL sizes."""
from __future__ import annotations

import torch

from luna.models import sdxl


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
