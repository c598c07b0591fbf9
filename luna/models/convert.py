"""diffusers -> original (ldm/sgm) SDXL key layout, the layout of community single-file checkpoints.

diffusers ships only the other direction (`diffusers.loaders.single_file_utils`), which is what
`load_sdxl` uses to read single files; this module is its inverse, derived from the component
configs so that it holds for the real SDXL sizes and for the tiny preset alike. A test checks
the round trip through diffusers' own converters.
"""
from __future__ import annotations

import torch

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
CLIP_L_PREFIX = "conditioner.embedders.0.transformer."
BIGG_PREFIX = "conditioner.embedders.1.model."

_UNET_TOP = {
    "time_embedding.linear_1.": "time_embed.0.",
    "time_embedding.linear_2.": "time_embed.2.",
    "add_embedding.linear_1.": "label_emb.0.0.",
    "add_embedding.linear_2.": "label_emb.0.2.",
    "conv_in.": "input_blocks.0.0.",
    "conv_norm_out.": "out.0.",
    "conv_out.": "out.2.",
}
_UNET_RESNET = {
    "norm1.": "in_layers.0.",
    "conv1.": "in_layers.2.",
    "norm2.": "out_layers.0.",
    "conv2.": "out_layers.3.",
    "time_emb_proj.": "emb_layers.1.",
    "conv_shortcut.": "skip_connection.",
}


def _unet_prefixes(config: dict) -> list[tuple[str, str, bool]]:
    """(diffusers prefix, ldm prefix, is_resnet) for every block of a UNet2DConditionModel config."""
    per = config["layers_per_block"]
    assert isinstance(per, int), "per-block layers_per_block lists are not an SDXL layout"
    n = len(config["block_out_channels"])
    out: list[tuple[str, str, bool]] = []
    for i, kind in enumerate(config["down_block_types"]):
        for j in range(per):
            ldm = (per + 1) * i + j + 1
            out.append((f"down_blocks.{i}.resnets.{j}.", f"input_blocks.{ldm}.0.", True))
            if "CrossAttn" in kind:
                out.append((f"down_blocks.{i}.attentions.{j}.", f"input_blocks.{ldm}.1.", False))
        if i < n - 1:
            out.append((f"down_blocks.{i}.downsamplers.0.conv.", f"input_blocks.{(per + 1) * (i + 1)}.0.op.", False))
    for i, kind in enumerate(config["up_block_types"]):
        attn = "CrossAttn" in kind
        for j in range(per + 1):
            ldm = (per + 1) * i + j
            out.append((f"up_blocks.{i}.resnets.{j}.", f"output_blocks.{ldm}.0.", True))
            if attn:
                out.append((f"up_blocks.{i}.attentions.{j}.", f"output_blocks.{ldm}.1.", False))
        if i < n - 1:
            ldm = (per + 1) * i + per
            out.append((f"up_blocks.{i}.upsamplers.0.conv.", f"output_blocks.{ldm}.{2 if attn else 1}.conv.", False))
    out.append(("mid_block.resnets.0.", "middle_block.0.", True))
    out.append(("mid_block.attentions.0.", "middle_block.1.", False))
    out.append(("mid_block.resnets.1.", "middle_block.2.", True))
    return out


def _rename(key: str, table: dict[str, str]) -> str | None:
    for old, new in table.items():
        if key.startswith(old):
            return new + key[len(old):]
    return None


def unet_to_original(state: dict[str, torch.Tensor], config: dict) -> dict[str, torch.Tensor]:
    prefixes = _unet_prefixes(config)
    out = {}
    for key, value in state.items():
        ldm = _rename(key, _UNET_TOP)
        if ldm is None:
            for hf, sd, is_resnet in prefixes:
                if key.startswith(hf):
                    rest = key[len(hf):]
                    ldm = sd + ((_rename(rest, _UNET_RESNET) or rest) if is_resnet else rest)
                    break
        if ldm is None:
            raise KeyError(f"UNet key {key!r} has no place in the original SDXL layout")
        out[UNET_PREFIX + ldm] = value
    return out


_VAE_ATTN = {"group_norm.": "norm.", "to_q.": "q.", "to_k.": "k.", "to_v.": "v.", "to_out.0.": "proj_out."}


def vae_to_original(state: dict[str, torch.Tensor], config: dict) -> dict[str, torch.Tensor]:
    n = len(config["block_out_channels"])
    table = {"encoder.conv_norm_out.": "encoder.norm_out.", "decoder.conv_norm_out.": "decoder.norm_out."}
    for i in range(n):
        table[f"encoder.down_blocks.{i}.resnets."] = f"encoder.down.{i}.block."
        table[f"encoder.down_blocks.{i}.downsamplers.0."] = f"encoder.down.{i}.downsample."
        table[f"decoder.up_blocks.{i}.resnets."] = f"decoder.up.{n - 1 - i}.block."
        table[f"decoder.up_blocks.{i}.upsamplers.0."] = f"decoder.up.{n - 1 - i}.upsample."
    for part in ("encoder", "decoder"):
        table[f"{part}.mid_block.resnets.0."] = f"{part}.mid.block_1."
        table[f"{part}.mid_block.resnets.1."] = f"{part}.mid.block_2."
    out = {}
    for key, value in state.items():
        attn = next((p for p in ("encoder.mid_block.attentions.0.", "decoder.mid_block.attentions.0.") if key.startswith(p)), None)
        if attn is not None:
            rest = _rename(key[len(attn):], _VAE_ATTN)
            ldm = attn.split(".")[0] + ".mid.attn_1." + rest
            if value.ndim == 2:  # the original attention projections are 1x1 convolutions
                value = value[:, :, None, None]
        else:
            ldm = _rename(key, table) or key
            ldm = ldm.replace("conv_shortcut.", "nin_shortcut.")
        out[VAE_PREFIX + ldm] = value
    return out


def _text_model_keys(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    # transformers >= 5.6 flattens CLIPTextModel (no `text_model.` prefix); the files keep it.
    return {(k if k.startswith(("text_model.", "text_projection")) else "text_model." + k): v for k, v in state.items()}


def clip_l_to_original(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {CLIP_L_PREFIX + k: v for k, v in _text_model_keys(state).items() if not k.endswith("position_ids")}


_BIGG_TOP = {
    "text_model.embeddings.token_embedding.weight": "token_embedding.weight",
    "text_model.embeddings.position_embedding.weight": "positional_embedding",
    "text_model.final_layer_norm.weight": "ln_final.weight",
    "text_model.final_layer_norm.bias": "ln_final.bias",
}
_BIGG_LAYER = {
    "layer_norm1.": "ln_1.",
    "layer_norm2.": "ln_2.",
    "mlp.fc1.": "mlp.c_fc.",
    "mlp.fc2.": "mlp.c_proj.",
    "self_attn.out_proj.": "attn.out_proj.",
}


def bigg_to_original(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """CLIPTextModelWithProjection (diffusers' text_encoder_2) -> open_clip layout under conditioner.embedders.1.model."""
    state = _text_model_keys(state)
    out: dict[str, torch.Tensor] = {}
    qkv: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in state.items():
        if key.endswith("position_ids"):
            continue
        if key in _BIGG_TOP:
            out[_BIGG_TOP[key]] = value
        elif key == "text_projection.weight":
            out["text_projection"] = value.T.contiguous()
        elif key.startswith("text_model.encoder.layers."):
            layer, rest = key[len("text_model.encoder.layers."):].split(".", 1)
            base = f"transformer.resblocks.{layer}."
            if rest.startswith("self_attn.") and rest.split(".")[1] in ("q_proj", "k_proj", "v_proj"):
                _, proj, kind = rest.split(".")
                qkv.setdefault(f"{base}attn.in_proj_{kind}", {})[proj] = value
            else:
                mapped = _rename(rest, _BIGG_LAYER)
                if mapped is None:
                    raise KeyError(f"text_encoder_2 key {key!r} has no place in the open_clip layout")
                out[base + mapped] = value
        else:
            raise KeyError(f"text_encoder_2 key {key!r} has no place in the open_clip layout")
    for key, parts in qkv.items():
        out[key] = torch.cat([parts["q_proj"], parts["k_proj"], parts["v_proj"]], dim=0)
    return {BIGG_PREFIX + k: v for k, v in out.items()}


def pipeline_to_original(pipe) -> dict[str, torch.Tensor]:
    """All four SDXL components of a diffusers pipeline as one original-layout state dict."""
    state: dict[str, torch.Tensor] = {}
    state.update(unet_to_original(pipe.unet.state_dict(), dict(pipe.unet.config)))
    state.update(vae_to_original(pipe.vae.state_dict(), dict(pipe.vae.config)))
    state.update(clip_l_to_original(pipe.text_encoder.state_dict()))
    state.update(bigg_to_original(pipe.text_encoder_2.state_dict()))
    return {k: v.contiguous() for k, v in state.items()}
