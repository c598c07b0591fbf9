"""Each kind of file a real model collection holds, built small in its real layout.

Every file starts from the tiny preset's checkpoint in the original (single-file) SDXL layout,
fp16, and changes what the real kind changes: marker keys, `__metadata__`, the UNet's input
channels, which text encoders are present, key names. Only SD 3 and Flux are key sketches (a few
tensors under their real names), enough for classification.
"""
from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file

BIGG = "conditioner.embedders.1.model."
CLIP_L = "conditioner.embedders.0.transformer."
UNET_IN = "model.diffusion_model.input_blocks.0.0.weight"
META = {"format": "pt", "modelspec.architecture": "stable-diffusion-xl-v1-base"}


def tiny_state(index: int = 0, family: str = "base") -> dict[str, torch.Tensor]:
    """The tiny checkpoint `index` of `family` as an original-layout fp16 state dict."""
    from luna.models import tiny
    from luna.models.convert import pipeline_to_original

    with tiny.one_thread():
        pipe = tiny.tiny_pipeline(index, family)
    return {k: v.to(torch.float16).contiguous() for k, v in pipeline_to_original(pipe).items()}


def save(path: Path, state: dict, meta: dict | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in state.items()}, str(path), metadata=meta)
    return path


def write_kinds(root: Path, base: dict[str, torch.Tensor]) -> dict[str, Path]:
    """{kind label: path}: one file per kind the inventory tells apart."""
    out: dict[str, Path] = {}
    s = lambda: dict(base)  # noqa: E731

    out["plain"] = save(root / "plainSDXL.safetensors", s(), META)
    vpred = s()
    vpred.update(v_pred=torch.tensor([]), ztsnr=torch.tensor([]))  # how NoobAI v-pred marks itself
    out["vpred_ztsnr"] = save(root / "someMergeV2.safetensors", vpred, META)
    out["vpred_meta"] = save(root / "anotherMerge.safetensors", s(),
                             {**META, "modelspec.prediction_type": "v", "modelspec.title": "Another merge"})
    edm = s()
    edm["edm_mean"] = torch.tensor([-1.6574, 1.886, -1.383, 2.5155])
    edm["edm_std"] = torch.tensor([8.4927, 5.9022, 6.5498, 5.2299])
    out["edm"] = save(root / "pgModel.safetensors", edm, META)
    cosxl = s()
    cosxl["edm_vpred.sigma_max"], cosxl["edm_vpred.sigma_min"] = torch.tensor(120.0), torch.tensor(0.002)
    out["v_edm"] = save(root / "cosModel.safetensors", cosxl, META)
    out["few_step"] = save(root / "fastMerge.safetensors", s(),
                           {**META, "modelspec.title": "Fast Merge Lightning 4-step", "modelspec.usage_hint": "4 steps, cfg 1"})
    # refiner: bigG only, under embedders.0 (open_clip layout), no CLIP-L
    refiner = {k: v for k, v in base.items() if not k.startswith(("conditioner.",))}
    refiner.update({"conditioner.embedders.0.model." + k[len(BIGG):]: v for k, v in base.items() if k.startswith(BIGG)})
    out["refiner"] = save(root / "sdxlRefiner.safetensors", refiner,
                          {"modelspec.architecture": "stable-diffusion-xl-v1-refiner"})
    inpaint = s()
    w = inpaint[UNET_IN]
    inpaint[UNET_IN] = torch.cat([w, torch.zeros(w.shape[0], 5, *w.shape[2:], dtype=w.dtype)], dim=1)  # 9 channels
    out["inpainting"] = save(root / "sdxlInpaint.safetensors", inpaint, META)
    sd1 = {k: v for k, v in base.items() if k.startswith(("model.diffusion_model.", "first_stage_model."))
           and not k.startswith("model.diffusion_model.label_emb.")}
    sd1.update({"cond_stage_model.transformer." + k[len(CLIP_L):]: v for k, v in base.items() if k.startswith(CLIP_L)})
    out["sd1"] = save(root / "dreamshaper8.safetensors", sd1, {"modelspec.architecture": "stable-diffusion-v1"})
    lora = {
        "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight": torch.zeros(4, 64),
        "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q.lora_up.weight": torch.zeros(64, 4),
        "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q.alpha": torch.tensor(4.0),
    }
    out["lora"] = save(root / "styleLora.safetensors", lora, {"ss_network_module": "networks.lora", "ss_network_dim": "4"})
    vae = {k[len("first_stage_model."):]: v for k, v in base.items() if k.startswith("first_stage_model.")}
    out["vae"] = save(root / "sdxl_vae.safetensors", vae)  # the released VAE files drop the prefix
    te = {k: v for k, v in base.items() if k.startswith("conditioner.")}
    out["text_encoders"] = save(root / "clipOnly.safetensors", te)
    tpw = s()
    tpw[BIGG + "text_projection.weight"] = tpw.pop(BIGG + "text_projection").T.contiguous()
    out["tpw"] = save(root / "projWeight.safetensors", tpw, META)
    out["sd3"] = save(root / "sd3medium.safetensors", {
        "model.diffusion_model.joint_blocks.0.x_block.attn.qkv.weight": torch.zeros(24, 8),
        "model.diffusion_model.x_embedder.proj.weight": torch.zeros(8, 16, 2, 2),
    })
    out["flux"] = save(root / "fluxDev.safetensors", {
        "double_blocks.0.img_attn.qkv.weight": torch.zeros(24, 8), "single_blocks.0.linear1.weight": torch.zeros(8, 8),
        "img_in.weight": torch.zeros(8, 64),
    })
    truncated = root / "halfDownloaded.safetensors"
    truncated.write_bytes(out["plain"].read_bytes()[: out["plain"].stat().st_size // 2])
    out["truncated"] = truncated
    out["pickle"] = root / "oldModel.ckpt"
    torch.save({"state_dict": {UNET_IN: base[UNET_IN]}}, out["pickle"])
    return out
