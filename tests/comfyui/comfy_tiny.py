"""Test-only: teach real ComfyUI to load the tiny preset's single-file checkpoints.

Real SDXL files need none of this. The tiny preset (luna/models/tiny.py) has SDXL's
architecture at widths no supported model has, so ComfyUI's CheckpointLoaderSimple cannot
detect it. `register()` adds a model config matched by the tiny UNet's widths, with
- the tiny UNet's GroupNorm groups (8; ComfyUI hard-codes 32) through custom operations,
- SDXL's size embedding at the tiny width (addition_time_embed_dim 8, ComfyUI's is 256),
- text encoders of the tiny widths (ComfyUI reads bigG/L configs of full size),
and wraps comfy.sd.VAE so a tiny VAE (16/32 channels, 8 groups, one resnet per level) is
built at its own widths instead of SD's 128-channel default.
"""
from __future__ import annotations

import contextlib
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
TINY_CONFIGS = ROOT / "luna" / "models" / "configs" / "sdxl-tiny"
GROUPS = 8

_registered = False


def _cfg(sub: str) -> dict:
    return json.loads((TINY_CONFIGS / sub / "config.json").read_text())


def register() -> None:
    """Register the tiny model config with the imported ComfyUI (idempotent)."""
    global _registered
    if _registered:
        return
    import comfy.ldm.modules.diffusionmodules.model as vae_model
    import comfy.model_base as model_base
    import comfy.ops
    import comfy.sd
    import comfy.sd1_clip as sd1_clip
    import comfy.sdxl_clip as sdxl_clip
    import comfy.supported_models
    import comfy.supported_models_base as smb
    from comfy.ldm.modules.diffusionmodules.openaimodel import Timestep

    unet, te1, te2 = _cfg("unet"), _cfg("text_encoder"), _cfg("text_encoder_2")

    class TinyOps(comfy.ops.disable_weight_init):
        class GroupNorm(comfy.ops.disable_weight_init.GroupNorm):
            def __init__(self, num_groups, num_channels, *args, **kwargs):
                super().__init__(GROUPS, num_channels, *args, **kwargs)

    class TinySDXLModel(model_base.SDXL):
        def __init__(self, model_config, model_type=model_base.ModelType.EPS, device=None):
            super().__init__(model_config, model_type, device=device)
            self.embedder = Timestep(int(unet["addition_time_embed_dim"]))

    def text_config(c: dict, eos: int) -> dict:
        return {**c, "eos_token_id": eos}

    class TinyClipL(sd1_clip.SDClipModel):
        def __init__(self, device="cpu", dtype=None, model_options={}):
            super().__init__(layer="hidden", layer_idx=te1["num_hidden_layers"] - 2, device=device, dtype=dtype,
                             layer_norm_hidden_state=False, textmodel_json_config=text_config(te1, 49407),
                             model_options={**model_options, "model_name": "clip_l"})

    class TinyClipG(sd1_clip.SDClipModel):
        def __init__(self, device="cpu", dtype=None, model_options={}):
            super().__init__(layer="hidden", layer_idx=te2["num_hidden_layers"] - 2, device=device, dtype=dtype,
                             textmodel_json_config=text_config(te2, 49407),
                             special_tokens={"start": 49406, "end": 49407, "pad": 0}, layer_norm_hidden_state=False,
                             return_projected_pooled=True, model_options={**model_options, "model_name": "clip_g"})

    class TinyClipModel(sdxl_clip.SDXLClipModel):
        def __init__(self, device="cpu", dtype=None, model_options={}):
            import torch

            torch.nn.Module.__init__(self)
            self.clip_l = TinyClipL(device=device, dtype=dtype, model_options=model_options)
            self.clip_g = TinyClipG(device=device, dtype=dtype, model_options=model_options)
            self.dtypes = {dtype}

        def load_sd(self, sd):
            width = sd["text_model.embeddings.token_embedding.weight"].shape[1]
            return (self.clip_g if width == te2["hidden_size"] else self.clip_l).load_sd(sd)

    class TinySDXL(comfy.supported_models.SDXL):
        unet_config = {
            "model_channels": unet["block_out_channels"][0],
            "use_linear_in_transformer": True,
            "context_dim": unet["cross_attention_dim"],
            "adm_in_channels": unet["projection_class_embeddings_input_dim"],
            "use_temporal_attention": False,
        }
        # heads: the tiny UNet has 4 heads on its 64-channel blocks (diffusers' "attention_head_dim")
        unet_extra_config = {"num_heads": -1, "num_head_channels": unet["block_out_channels"][-1] // unet["attention_head_dim"][-1]}
        custom_operations = TinyOps

        def __init__(self, unet_config):
            super().__init__(unet_config)
            self.custom_operations = TinyOps

        def get_model(self, state_dict, prefix="", device=None):
            return TinySDXLModel(self, model_type=self.model_type(state_dict, prefix), device=device)

        def clip_target(self, state_dict={}):
            return smb.ClipTarget(sdxl_clip.SDXLTokenizer, TinyClipModel)

    comfy.supported_models.models.insert(0, TinySDXL)

    BaseVAE = comfy.sd.VAE

    @contextlib.contextmanager
    def tiny_groups():
        saved = vae_model.ops  # Normalize (a default argument everywhere) builds ops.GroupNorm
        vae_model.ops = TinyOps
        try:
            yield
        finally:
            vae_model.ops = saved

    class TinyAwareVAE(BaseVAE):
        def __init__(self, sd=None, device=None, config=None, dtype=None, metadata=None):
            w = (sd or {}).get("encoder.conv_in.weight")
            if config is None and w is not None and w.shape[0] < 32:
                vae = _cfg("vae")
                chans = vae["block_out_channels"]
                ddconfig = {"double_z": True, "z_channels": vae["latent_channels"], "resolution": 256, "in_channels": 3,
                            "out_ch": 3, "ch": chans[0], "ch_mult": [c // chans[0] for c in chans],
                            "num_res_blocks": vae["layers_per_block"], "attn_resolutions": [], "dropout": 0.0}
                with tiny_groups():
                    super().__init__(sd=sd, device=device, dtype=dtype, metadata=metadata,
                                     config={"params": {"ddconfig": ddconfig, "embed_dim": vae["latent_channels"]}})
                return
            super().__init__(sd=sd, device=device, config=config, dtype=dtype, metadata=metadata)

    comfy.sd.VAE = TinyAwareVAE
    _registered = True


def write_tiny_checkpoint(path: Path, index: int = 0, family: str = "base") -> Path:
    """The tiny preset's checkpoint `index` as one SDXL-layout .safetensors (what `luna make-tiny` writes)."""
    from luna.models.tiny import one_thread, tiny_pipeline, write_single_file

    with one_thread():
        return write_single_file(tiny_pipeline(index, family), Path(path))
