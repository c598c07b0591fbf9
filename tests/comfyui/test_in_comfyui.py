"""The Luna nodes inside real ComfyUI (../shared/vendor/ComfyUI, 0.8.0), on the tiny preset's checkpoint
loaded by ComfyUI's own CheckpointLoaderSimple: custom-node loading, object_info, the example workflows
through ComfyUI's executor, the detailer's parity and invariants, node behaviours and bad inputs."""
from __future__ import annotations

import asyncio
import copy
import json
import os
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import comfy_env
from comfy_env import TINY_CKPT, canvas_image

ROOT = Path(__file__).resolve().parents[2]
WORKFLOWS = sorted((ROOT / "comfyui" / "workflows").glob("*.json"))
LUNA_NODES = {"LunaNoiseScaffold", "LunaDetector", "LunaSemanticDetailer", "LunaGlobalRefiner", "LunaVaultQuery",
              "LunaVisionTranslator"}


def _luna(comfy, name):
    return comfy["nodes"].NODE_CLASS_MAPPINGS[name]


def _object_info(comfy) -> dict:
    """GET /object_info answered by ComfyUI's own PromptServer route handler."""
    import server

    loop = asyncio.new_event_loop()
    try:
        ps = server.PromptServer.instance if getattr(server.PromptServer, "instance", None) else server.PromptServer(loop)
        handler = next(r.handler for r in ps.routes if getattr(r, "path", None) == "/object_info" and r.method == "GET")
        response = loop.run_until_complete(handler(None))
    finally:
        loop.close()
    return json.loads(response.text)


# ---------------------------------------------------------------------- loading


def test_package_loads_through_comfyui_custom_node_loading(comfy):
    nodes = comfy["nodes"]
    assert LUNA_NODES <= set(nodes.NODE_CLASS_MAPPINGS)
    for name in LUNA_NODES:  # loaded from custom_nodes/luna-foundry by ComfyUI itself, not imported by us
        assert nodes.NODE_CLASS_MAPPINGS[name].RELATIVE_PYTHON_MODULE == f"custom_nodes.{comfy_env.PACKAGE_NAME}"
    assert any(Path(p).name == comfy_env.PACKAGE_NAME for p in nodes.LOADED_MODULE_DIRS.values())


def test_object_info_lists_every_luna_node_with_types_and_tooltips(comfy, luna_assets):
    info = _object_info(comfy)
    assert LUNA_NODES <= set(info)
    for name in LUNA_NODES:
        node = info[name]
        assert node["category"].startswith("Luna/") and node["display_name"].startswith("Luna ")
        for section in ("required", "optional"):
            for inp, spec in node["input"].get(section, {}).items():
                assert len(spec) > 1 and spec[1].get("tooltip"), f"{name}.{inp} has no tooltip"
    assert info["LunaSemanticDetailer"]["output"] == ["IMAGE", "IMAGE"]
    assert info["LunaNoiseScaffold"]["output"] == ["LUNA_SCAFFOLD", "LATENT", "NOISE"]
    assert info["LunaDetector"]["output"] == ["LUNA_DETECTIONS", "MASK", "IMAGE"]
    req = info["LunaSemanticDetailer"]["input"]["required"]
    assert req["model"][0] == "MODEL" and req["vae"][0] == "VAE" and req["positive"][0] == "CONDITIONING"
    assert req["scaffold"][0] == "LUNA_SCAFFOLD" and req["detections"][0] == "LUNA_DETECTIONS"
    assert "euler" in req["sampler_name"][0] and not any("ancestral" in s for s in req["sampler_name"][0])
    # dropdowns list the model folders (assets written after ComfyUI started: listed without a restart)
    opt = info["LunaSemanticDetailer"]["input"]["optional"]
    assert {"none", "tiny-stored", "tiny-prompts"} <= set(opt["vault"][0])
    assert {"none", "tiny-proj"} <= set(opt["projector"][0])
    assert "tiny-stored" in info["LunaVaultQuery"]["input"]["required"]["vault"][0]


def test_dropdowns_honour_extra_model_paths(comfy, luna_assets, tmp_path):
    import shutil

    import folder_paths

    extra = tmp_path / "elsewhere"
    shutil.copytree(luna_assets["models"] / "luna_vaults" / "tiny-stored", extra / "far-vault")
    folder_paths.add_model_folder_path("luna_vaults", str(extra))  # what extra_model_paths.yaml does
    choices = _luna(comfy, "LunaVaultQuery").INPUT_TYPES()["required"]["vault"][0]
    assert "far-vault" in choices and "tiny-stored" in choices


# ---------------------------------------------------------------------- workflows


def tiny_prompt(workflow: dict, assets: dict) -> dict:
    """An example workflow at the tiny preset's scale: the tiny checkpoint, 128 px canvas, 64 px crops, 3 steps,
    the detections file instead of the face cascade, the tiny vault/projector/vision tower."""
    p = copy.deepcopy(workflow)
    for nid in [n for n, node in p.items() if node["class_type"] == "CLIPVisionLoader"]:
        del p[nid]  # the tiny tower is luna's own (ComfyUI has no config for it)
    for node in p.values():
        inputs, kind = node["inputs"], node["class_type"]
        if kind == "CheckpointLoaderSimple":
            inputs["ckpt_name"] = TINY_CKPT
        if kind == "LunaNoiseScaffold":
            inputs.update(width=128, height=128, draft_width=64, draft_height=64)
        if kind == "ImageScale":  # the 4K canvas -> 128 px, the 1.5K smoothing pass -> 96 px
            size = 128 if inputs["width"] >= 4096 else 96
            inputs.update(width=size, height=size)
        if kind in ("KSampler", "KSamplerAdvanced", "BasicScheduler", "LunaSemanticDetailer", "LunaGlobalRefiner"):
            inputs["steps"] = 3
        if kind == "LunaDetector":
            inputs.update(detections_file=str(assets["detections_file"]), prompts="face, hand", detect_size=0)
        if kind == "LunaSemanticDetailer":
            inputs.update(crop_size=64, feather=8.0)
        if kind == "LunaGlobalRefiner":
            inputs.update(tile_size=64, overlap=16)
        if kind == "LunaVaultQuery":
            inputs["vault"] = "tiny-stored"
        if kind == "LunaVisionTranslator":
            inputs.update(projector="tiny-proj", vision_model="tiny")
            inputs.pop("clip_vision", None)
    return p


def _saved(comfy, prefix: str) -> list[Path]:
    return sorted((comfy["base"] / "output").glob(f"{prefix}*.png"), key=os.path.getmtime)


@pytest.mark.parametrize("path", WORKFLOWS, ids=[p.stem for p in WORKFLOWS])
def test_example_workflow_runs_in_comfyui_executor(comfy, luna_assets, path):
    from PIL import Image

    workflow = json.loads(path.read_text())
    assert any(n["class_type"].startswith("Luna") for n in workflow.values())
    prefix = next(n["inputs"]["filename_prefix"] for n in workflow.values() if n["class_type"] == "SaveImage")
    before = set(_saved(comfy, prefix))
    outputs, error = comfy_env.run(tiny_prompt(workflow, luna_assets))
    assert error is None, error
    new = [p for p in _saved(comfy, prefix) if p not in before]
    assert len(new) == 1
    img = np.asarray(Image.open(new[0]))
    assert img.ndim == 3 and img.std() > 1.0  # a real picture, not a flat or blank one


def test_detail_workflow_refines_only_inside_the_detections(comfy, luna_assets):
    """The 4K workflow up to the detailer: its output differs from its input only inside the crops' masks."""
    workflow = tiny_prompt(json.loads((ROOT / "comfyui" / "workflows" / "luna_4k_detail.json").read_text()),
                           luna_assets)
    outputs, error = comfy_env.run(workflow)
    assert error is None, error
    ids = {n["class_type"]: nid for nid, n in workflow.items()}
    canvas = outputs[workflow[ids["LunaDetector"]]["inputs"]["image"][0]][0][0]  # the 4K canvas the detector saw
    detailed = outputs[ids["LunaSemanticDetailer"]][0][0]
    masks = outputs[ids["LunaDetector"]][1][0]
    assert detailed.shape == canvas.shape == (1, 128, 128, 3)
    changed = (detailed != canvas).any(-1)[0]
    assert changed.any()
    # every changed pixel lies inside some detection's padded crop (masks are the boxes; crops pad them)
    from lsd_runtime.detailer import DetailSettings, plan_crops

    crops, _ = plan_crops(luna_assets["detections"], (128, 128), DetailSettings(working_size=64, feather=8.0,
                                                                                 min_crop=64), 42)
    inside = torch.zeros(128, 128, dtype=torch.bool)
    for c in crops:
        x0, y0, x1, y1 = c.box
        inside[y0:y1, x0:x1] |= torch.from_numpy(c.mask > 0)
    assert not (changed & ~inside).any()
    assert masks.shape == (3, 128, 128)
    # seed 000's prep phase: 1K draft -> upscale to 1.5K -> light smoothing pass (SamplerCustomAdvanced drawing
    # its noise from the scaffold) -> upscale to 4K, which is the canvas the detector and the detailer see
    scale_4k = workflow[ids["LunaDetector"]]["inputs"]["image"][0]
    decode = workflow[workflow[scale_4k]["inputs"]["image"][0]]
    smooth = workflow[decode["inputs"]["samples"][0]]
    assert decode["class_type"] == "VAEDecode" and smooth["class_type"] == "SamplerCustomAdvanced"
    assert workflow[smooth["inputs"]["noise"][0]]["class_type"] == "LunaNoiseScaffold"
    assert workflow[smooth["inputs"]["sigmas"][0]]["inputs"]["denoise"] < 0.5  # light
    upscaled = workflow[smooth["inputs"]["latent_image"][0]]["inputs"]["pixels"][0]
    before, after = outputs[upscaled][0][0], outputs[workflow[scale_4k]["inputs"]["image"][0]][0][0]
    assert before.shape == after.shape == (1, 96, 96, 3)
    assert (after - before).abs().max() > 2 / 255  # the smoothing pass changed the 1.5K image


# ---------------------------------------------------------------------- the detailer: parity and invariants


def _module(sub: str):
    """A module of the package as ComfyUI loaded it (its types are the ones the nodes check)."""
    import sys

    return next(m for name, m in list(sys.modules.items())
                if name.endswith(f"{comfy_env.PACKAGE_NAME}.{sub}") and "luna_comfy_nodes" not in name)


def _lsd(comfy):
    return _module("lsd_nodes")


def _detail(comfy, models, image, dets, scaffold, *, batch_size=4, denoise=0.5, positive=None, **kw):
    model, clip, vae = models
    lsd = _lsd(comfy)
    nodes = comfy["nodes"]
    pos = positive or nodes.CLIPTextEncode().encode(clip, "a portrait")[0]
    neg = nodes.CLIPTextEncode().encode(clip, "")[0]
    d = lsd.LunaDetections((image.shape[2], image.shape[1]), [dets])
    with torch.inference_mode():
        return lsd.LunaSemanticDetailer().detail(model, vae, pos, neg, image, scaffold, 3, 3.0, "euler", "normal",
                                                 denoise, batch_size, d, 64, 0.25, 8.0, **kw)


def _scaffold(comfy, models, seed=3, size=128):
    return _lsd(comfy).LunaNoiseScaffold().build(models[0], seed, size, size, 64, 64)[0]


def test_detailer_parity_with_luna_refine_denoiser(comfy, tiny_models, luna_assets):
    """The same crops, scaffold and conditioning through luna refine's diffusers loop and through ComfyUI's
    sampler (Euler on diffusers' sigma schedule) agree within 1/255: only the denoising call differs."""
    from lsd_runtime.conditioning import TextSource
    from lsd_runtime.denoiser import ComfyDenoiser, DiffusersDenoiser
    from lsd_runtime.detailer import DetailSettings, detail
    from lsd_runtime.sampler import SamplerSettings, make_scheduler
    from lsd_runtime.scaffold import NoiseScaffold
    from lsd_runtime.workflow import tiny_components

    model, _clip, vae = tiny_models
    comps = tiny_components(vision=False)
    text = TextSource(comps.encoders, "a portrait", None)
    settings = SamplerSettings(steps=4, strength=0.5, cfg=3.0)
    sched = make_scheduler(comps.sampler.scheduler_config, "euler")
    sched.set_timesteps(4)
    sigmas = sched.sigmas[4 - int(4 * 0.5):].float()
    canvas = (canvas_image(128, 1)[0].numpy() * 255).round().astype(np.uint8)
    scaffold = NoiseScaffold(3, (128, 128))
    ds = DetailSettings(working_size=64, min_crop=32, feather=8.0, batch_size=4)
    zeros = [[torch.zeros(1, 77, 96), {"pooled_output": torch.zeros(1, 64)}]]  # force_zeros_for_empty_prompt
    a, crops, _ = detail(canvas.copy(), luna_assets["detections"], scaffold, text,
                         DiffusersDenoiser(comps.sampler, settings, text.negative_row), ds)
    b, _, _ = detail(canvas.copy(), luna_assets["detections"], scaffold, text,
                     ComfyDenoiser(model, vae, zeros, steps=4, cfg=3.0, sigmas=sigmas, denoise=1.0), ds)
    assert len(crops) == 3 and (a != canvas).mean() > 0.1
    assert np.abs(a.astype(int) - b.astype(int)).max() <= 1


def test_detailer_keeps_pixels_outside_masks_exactly(comfy, tiny_models, luna_assets):
    image = canvas_image(128, 2) + 0.3 / 255  # off the 1/255 grid: kept bit-exact anyway
    out, debug = _detail(comfy, tiny_models, image, luna_assets["detections"], _scaffold(comfy, tiny_models))
    from lsd_runtime.detailer import DetailSettings, plan_crops

    crops, _ = plan_crops(luna_assets["detections"], (128, 128), DetailSettings(working_size=64, feather=8.0,
                                                                                 min_crop=64), 3)
    inside = torch.zeros(128, 128, dtype=torch.bool)
    for c in crops:
        x0, y0, x1, y1 = c.box
        inside[y0:y1, x0:x1] |= torch.from_numpy(c.mask > 0)
    assert torch.equal(out[0][~inside], image[0][~inside])
    assert (out[0][inside] != image[0][inside]).any()
    assert debug.shape == (3, 64, 132, 3)  # three crops at the working size, before | after


def test_detailer_batched_equals_one_by_one(comfy, tiny_models, luna_assets):
    image = canvas_image(128, 3)
    scaffold = _scaffold(comfy, tiny_models)
    batched, _ = _detail(comfy, tiny_models, image, luna_assets["detections"], scaffold, batch_size=4)
    single, _ = _detail(comfy, tiny_models, image, luna_assets["detections"], scaffold, batch_size=1)
    assert (batched - single).abs().max() <= 1 / 255 + 1e-6


def test_detailer_injected_noise_is_the_only_noise(comfy, tiny_models, luna_assets):
    image = canvas_image(128, 4)
    dets = luna_assets["detections"]
    a, _ = _detail(comfy, tiny_models, image, dets, _scaffold(comfy, tiny_models, seed=5))
    b, _ = _detail(comfy, tiny_models, image, dets, _scaffold(comfy, tiny_models, seed=5))
    c, _ = _detail(comfy, tiny_models, image, dets, _scaffold(comfy, tiny_models, seed=6))
    assert torch.equal(a, b)  # same scaffold, same output: nothing else drew noise
    assert (a - c).abs().max() > 2 / 255  # another scaffold, another output


def test_detailer_strength_zero_and_empty_detections_return_the_image(comfy, tiny_models, luna_assets):
    image = canvas_image(128, 5) + 0.1 / 255
    scaffold = _scaffold(comfy, tiny_models)
    out, _ = _detail(comfy, tiny_models, image, luna_assets["detections"], scaffold, denoise=0.0)
    assert torch.equal(out, image)
    out, debug = _detail(comfy, tiny_models, image, [], scaffold)
    assert torch.equal(out, image) and debug.shape[0] == 1


def test_detailer_batch_of_images_is_each_image_refined(comfy, tiny_models, luna_assets):
    lsd = _lsd(comfy)
    model, clip, vae = tiny_models
    nodes = comfy["nodes"]
    pos = nodes.CLIPTextEncode().encode(clip, "a portrait")[0]
    images = torch.cat([canvas_image(128, 6), canvas_image(128, 7)])
    scaffold = _scaffold(comfy, tiny_models)
    dets = luna_assets["detections"]
    d2 = lsd.LunaDetections((128, 128), [dets, dets[:1]])
    with torch.inference_mode():
        both, _ = lsd.LunaSemanticDetailer().detail(model, vae, pos, pos, images, scaffold, 3, 3.0, "euler", "normal",
                                                    0.5, 4, d2, 64, 0.25, 8.0)
        first, _ = lsd.LunaSemanticDetailer().detail(model, vae, pos, pos, images[:1], scaffold, 3, 3.0, "euler",
                                                     "normal", 0.5, 4, lsd.LunaDetections((128, 128), [dets]), 64,
                                                     0.25, 8.0)
    assert both.shape == images.shape
    assert (both[:1] - first).abs().max() <= 1 / 255 + 1e-6


def test_detailer_with_vault_and_projector_conditions_each_crop(comfy, tiny_models, luna_assets):
    image = canvas_image(128, 8)
    scaffold = _scaffold(comfy, tiny_models)
    dets = luna_assets["detections"]
    plain, _ = _detail(comfy, tiny_models, image, dets, scaffold)
    vault, _ = _detail(comfy, tiny_models, image, dets, scaffold, vault="tiny-stored", vault_strength=1.0,
                       vision_model="tiny")
    both, _ = _detail(comfy, tiny_models, image, dets, scaffold, vault="tiny-stored", vault_strength=1.0,
                      projector="tiny-proj", projector_strength=0.5, vision_model="tiny")
    off, _ = _detail(comfy, tiny_models, image, dets, scaffold, vault="tiny-stored", vault_strength=0.0,
                     vision_model="tiny")
    assert (vault - plain).abs().max() > 1 / 255 and (both - vault).abs().max() > 1 / 255
    assert torch.equal(off, plain)  # strength 0: the text conditioning alone


# ---------------------------------------------------------------------- IP-Adapter per crop


def _ip_items(comfy, embeds, seed=0):
    """Denoise items identical in everything (image, noise, text row) except their image embedding."""
    from lsd_runtime.conditioning import CondRow
    from lsd_runtime.sampler import DenoiseItem

    g = torch.Generator().manual_seed(seed)
    image = torch.rand(64, 64, 3, generator=g).numpy() * 255
    noise = torch.randn(4, 8, 8, generator=g)
    cond, pooled = torch.randn(77, 96, generator=g), torch.randn(64, generator=g)
    return [DenoiseItem(image, noise, CondRow(cond, pooled, "text", 0.0, image_embed=e), 0,
                        torch.tensor([64.0, 64, 0, 0, 64, 64])) for e in embeds]


def _comfy_ip(comfy, path, strength):
    ipa = _module("ip_adapter")
    return ipa.ComfyIPAdapter(ipa.IPAdapterWeights(path), strength)


def test_ip_adapter_conditions_each_item_on_its_own_embedding(comfy, tiny_models, luna_assets, tower):
    """One batched sampler call: item i depends on embedding i only; strength 0 equals no IP-Adapter exactly."""
    from lsd_runtime.denoiser import ComfyDenoiser

    model, clip, vae = tiny_models
    neg = comfy["nodes"].CLIPTextEncode().encode(clip, "")[0]
    g = torch.Generator().manual_seed(1)
    embeds = torch.randn(3, tower.dim, generator=g)
    items = _ip_items(comfy, embeds)

    def run(ip, items, on=model):
        with torch.inference_mode():
            return np.stack(ComfyDenoiser(on, vae, neg, steps=3, cfg=3.0, denoise=0.6, ip_adapter=ip)(items))

    plain = run(None, items)
    off = run(_comfy_ip(comfy, luna_assets["ip_adapter"], 0.0), items)
    assert np.array_equal(off, plain)  # the patched attention at strength 0 is the model's own
    on = run(_comfy_ip(comfy, luna_assets["ip_adapter"], 1.0), items)
    assert np.abs(on - plain).max() > 2.0  # > 2/255 of the range: the IP-Adapter conditions the items
    assert np.abs(on[0] - on[1]).max() > 2.0  # same image, noise and text; different embeddings
    changed = embeds.clone()
    changed[1] = torch.randn(tower.dim, generator=g) * 3
    again = run(_comfy_ip(comfy, luna_assets["ip_adapter"], 1.0), _ip_items(comfy, changed))
    np.testing.assert_allclose(again[0], on[0], atol=1e-3)  # item 0 and 2 do not see item 1's embedding
    np.testing.assert_allclose(again[2], on[2], atol=1e-3)
    assert np.abs(again[1] - on[1]).max() > 2.0
    # a cross-attention replacement another node put on the MODEL stays: the per-crop term is added to it
    from comfy.ldm.modules.attention import optimized_attention

    patched = model.clone()
    patched.set_model_attn2_replace(lambda q, k, v, eo: 0.5 * optimized_attention(q, k, v, eo["n_heads"]), "middle", 0, 0)
    theirs = run(None, items, patched)
    assert np.abs(theirs - plain).max() > 0.5
    assert np.array_equal(run(_comfy_ip(comfy, luna_assets["ip_adapter"], 0.0), items, patched), theirs)


def test_ip_adapter_parity_with_luna_refine_denoiser(comfy, tiny_models, luna_assets, tower):
    """The same crops and IP-Adapter weights through luna refine's diffusers loop (diffusers' IP-Adapter
    processors) and through ComfyUI's sampler with the Luna attention patch agree within 1/255."""
    from lsd_runtime.conditioning import CropEmbedder, TextSource, WithImageEmbeds
    from lsd_runtime.denoiser import ComfyDenoiser, DiffusersDenoiser
    from lsd_runtime.detailer import DetailSettings, detail
    from lsd_runtime.ip_adapter import load_ip_adapter
    from lsd_runtime.sampler import Sampler, SamplerSettings, make_scheduler
    from lsd_runtime.scaffold import NoiseScaffold
    from lsd_runtime.workflow import tiny_components

    model, _clip, vae = tiny_models
    comps = tiny_components(vision=False)
    pipe = copy.deepcopy(comps.pipe)
    load_ip_adapter(pipe, luna_assets["ip_adapter"], scale=0.8)
    sampler = Sampler.from_pipeline(pipe)
    text = TextSource(comps.encoders, "a portrait", None)
    source = WithImageEmbeds(text, CropEmbedder(tower))
    settings = SamplerSettings(steps=4, strength=0.5, cfg=3.0)
    sched = make_scheduler(comps.sampler.scheduler_config, "euler")
    sched.set_timesteps(4)
    sigmas = sched.sigmas[4 - int(4 * 0.5):].float()
    canvas = (canvas_image(128, 11)[0].numpy() * 255).round().astype(np.uint8)
    scaffold = NoiseScaffold(3, (128, 128))
    ds = DetailSettings(working_size=64, min_crop=32, feather=8.0, batch_size=4)
    zeros = [[torch.zeros(1, 77, 96), {"pooled_output": torch.zeros(1, 64)}]]
    dets = luna_assets["detections"]
    a, crops, _ = detail(canvas.copy(), dets, scaffold, source, DiffusersDenoiser(sampler, settings, text.negative_row),
                         ds)
    b, _, _ = detail(canvas.copy(), dets, scaffold, source,
                     ComfyDenoiser(model, vae, zeros, steps=4, cfg=3.0, sigmas=sigmas, denoise=1.0,
                                   ip_adapter=_comfy_ip(comfy, luna_assets["ip_adapter"], 0.8)), ds)
    c, _, _ = detail(canvas.copy(), dets, scaffold, text,
                     ComfyDenoiser(model, vae, zeros, steps=4, cfg=3.0, sigmas=sigmas, denoise=1.0), ds)
    assert len(crops) == 3
    assert np.abs(a.astype(int) - b.astype(int)).max() <= 1
    assert np.abs(b.astype(int) - c.astype(int)).max() > 2  # and the IP-Adapter did something


def test_detailer_ip_adapter_input(comfy, tiny_models, luna_assets, tower):
    """The node: strength 0 equals no IP-Adapter; strength > 0 differs; every crop carries its own embedding."""
    from PIL import Image

    image = canvas_image(128, 12)
    scaffold = _scaffold(comfy, tiny_models)
    dets = luna_assets["detections"]
    plain, _ = _detail(comfy, tiny_models, image, dets, scaffold)
    off, _ = _detail(comfy, tiny_models, image, dets, scaffold, ip_adapter="tiny-ip.safetensors",
                     ip_adapter_strength=0.0, vision_model="tiny")
    on, _ = _detail(comfy, tiny_models, image, dets, scaffold, ip_adapter="tiny-ip.safetensors",
                    ip_adapter_strength=1.0, vision_model="tiny")
    assert torch.equal(off, plain)
    assert (on - plain).abs().max() > 2 / 255
    with_vault, _ = _detail(comfy, tiny_models, image, dets, scaffold, ip_adapter_path=str(luna_assets["ip_adapter"]),
                            ip_adapter_strength=1.0, vault="tiny-stored", vault_strength=1.0, vision_model="tiny")
    assert (with_vault - on).abs().max() > 1 / 255  # the vault's rows and the IP-Adapter together
    # per crop: two different crops get two different embeddings, each the embedder's for that crop
    lsd = _lsd(comfy)
    pos = comfy["nodes"].CLIPTextEncode().encode(tiny_models[1], "a portrait")[0]
    source, ip = lsd.build_source(pos, vision_model="tiny", ip_adapter="tiny-ip.safetensors", ip_adapter_strength=0.7)
    assert ip is not None and ip.strength == 0.7 and ip.dim == tower.dim
    crops = [Image.fromarray((canvas_image(64, s)[0].numpy() * 255).astype(np.uint8)) for s in (1, 2)]
    rows = source.rows(crops)
    from luna.models.vision import embed

    expected = embed(tower, crops).embed
    assert torch.allclose(rows[0].image_embed, expected[0], atol=1e-5)
    assert torch.allclose(rows[1].image_embed, expected[1], atol=1e-5)
    assert not torch.allclose(rows[0].image_embed, rows[1].image_embed, atol=1e-3)
    # IS_CHANGED follows the IP-Adapter file
    assert lsd.conditioning_fingerprint(ip_adapter="tiny-ip.safetensors") != lsd.conditioning_fingerprint()


def test_ip_adapter_bad_weights_are_clear_errors(comfy, tiny_models, luna_assets, tmp_path):
    from safetensors.torch import load_file, save_file

    image = canvas_image(128, 13)
    scaffold = _scaffold(comfy, tiny_models)
    dets = luna_assets["detections"]
    with pytest.raises(ValueError, match=r"input 'ip_adapter_path': .*takes \d+-d image embeddings, vision_model "
                                         r"'tiny' gives \d+-d"):
        _detail(comfy, tiny_models, image, dets, scaffold, ip_adapter_path=str(luna_assets["ip_wrong_dim"]),
                vision_model="tiny")
    state = load_file(str(luna_assets["ip_adapter"]))
    last = max(int(k.split(".")[1]) for k in state if k.startswith("ip_adapter."))
    fewer = tmp_path / "fewer-layers.safetensors"
    save_file({k: v for k, v in state.items() if not k.startswith(f"ip_adapter.{last}.")}, str(fewer))
    with pytest.raises(ValueError, match="input 'ip_adapter_path': .*cross-attention K/V pairs, this model has"):
        _detail(comfy, tiny_models, image, dets, scaffold, ip_adapter_path=str(fewer), vision_model="tiny")
    narrow = tmp_path / "narrow.safetensors"
    save_file({k: (v[:, :-8].contiguous() if ".to_k_ip." in k else v) for k, v in state.items()}, str(narrow))
    with pytest.raises(ValueError, match="input 'ip_adapter_path': .*to_k_ip of .* the model's cross-attention"):
        _detail(comfy, tiny_models, image, dets, scaffold, ip_adapter_path=str(narrow), vision_model="tiny")
    plus = tmp_path / "plus.safetensors"
    save_file({"image_proj.latents": torch.zeros(1, 4, 8)}, str(plus))
    with pytest.raises(ValueError, match="input 'ip_adapter_path': .*only the plain IP-Adapter"):
        _detail(comfy, tiny_models, image, dets, scaffold, ip_adapter_path=str(plus), vision_model="tiny")
    with pytest.raises(ValueError, match="input 'clip_vision': a vault, projector or IP-Adapter needs"):
        _detail(comfy, tiny_models, image, dets, scaffold, ip_adapter="tiny-ip.safetensors")


def test_scaffold_draft_latent_draws_from_the_scaffold(comfy, tiny_models):
    """KSamplerAdvanced with add_noise disabled on the scaffold's draft latent == sampling an empty latent with the
    scaffold's draft noise as the noise."""
    from comfy import sample as comfy_sample

    model, clip, _vae = tiny_models
    lsd = _lsd(comfy)
    nodes = comfy["nodes"]
    pos = nodes.CLIPTextEncode().encode(clip, "a portrait")[0]
    scaffold, latent, noise = lsd.LunaNoiseScaffold().build(model, 9, 128, 128, 64, 64)
    with torch.inference_mode():
        a = nodes.KSamplerAdvanced().sample(model, "disable", 0, 3, 3.0, "euler", "normal", pos, pos, latent, 0, 10000,
                                            "disable")[0]["samples"]
        empty = {"samples": torch.zeros(1, 4, 8, 8)}
        n = noise.generate_noise(empty)
        torch.testing.assert_close(n[0], scaffold.latent_for_size(64, 64))
        b = comfy_sample.sample(model, n, 3, 3.0, "euler", "normal", pos, pos, empty["samples"], denoise=1.0,
                                disable_pbar=True, seed=0)
    torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


# ---------------------------------------------------------------------- the global refiner


def test_global_refiner_in_comfyui(comfy, tiny_models):
    lsd = _lsd(comfy)
    model, clip, vae = tiny_models
    nodes = comfy["nodes"]
    pos = nodes.CLIPTextEncode().encode(clip, "a garden")[0]
    image = canvas_image(96, 9) + 0.2 / 255  # 2 x 2 tiles of 64 px
    scaffold = _scaffold(comfy, tiny_models, size=96)
    node = lsd.LunaGlobalRefiner()
    with torch.inference_mode():
        out = node.refine(model, vae, pos, pos, image, scaffold, 3, 3.0, "euler", "normal", 0.4, 4, 64, 32)[0]
        again = node.refine(model, vae, pos, pos, image, scaffold, 3, 3.0, "euler", "normal", 0.4, 4, 64, 32)[0]
        single = node.refine(model, vae, pos, pos, image, scaffold, 3, 3.0, "euler", "normal", 0.4, 1, 64, 32)[0]
        zero = node.refine(model, vae, pos, pos, image, scaffold, 3, 3.0, "euler", "normal", 0.0, 4, 64, 32)[0]
    assert out.shape == image.shape and (out - image).abs().max() > 2 / 255
    assert torch.equal(out, again)
    assert (out - single).abs().max() <= 1 / 255 + 1e-6
    assert torch.equal(zero, image)


# ---------------------------------------------------------------------- Vault Query / Vision Translator


def test_vault_query_is_changed_and_rebuilt_vault_is_reopened(comfy, tiny_models, luna_assets, tower, tmp_path):
    import shutil

    from vault.build import build_vault

    cls = _luna(comfy, "LunaVaultQuery")
    folder = luna_assets["models"] / "luna_vaults" / "rebuilt"
    build_vault(luna_assets["pairs"], folder, index="Flat")
    image = canvas_image(64, 10)
    first = cls.IS_CHANGED(vault="rebuilt")
    assert first == cls.IS_CHANGED(vault="rebuilt")  # unchanged files, same fingerprint: ComfyUI's cache holds
    (c1, _), = cls().query("rebuilt", image, 4, 1.0)[0]
    time.sleep(0.01)
    shutil.rmtree(folder)
    from extraction.synthetic import write_synthetic_pairs

    other = write_synthetic_pairs(tmp_path / "pairs2", 90, 9, tower.dim, text_dims=(32, 64), pooled_dim=64,
                                  vision_model=tower.model_id, seed=1)
    build_vault(other, folder, index="Flat")
    assert cls.IS_CHANGED(vault="rebuilt") != first
    (c2, _), = cls().query("rebuilt", image, 4, 1.0)[0]
    assert not torch.allclose(c1, c2)  # the rebuilt vault answered, without restarting anything


def test_vault_query_and_translator_strength_zero_return_the_input(comfy, tiny_models, luna_assets):
    _model, clip, _vae = tiny_models
    pos = comfy["nodes"].CLIPTextEncode().encode(clip, "a portrait")[0]
    image = canvas_image(64, 11)
    out, _ = _luna(comfy, "LunaVaultQuery")().query("tiny-stored", image, 4, 0.0, conditioning=pos)
    assert out is pos
    (out,) = _luna(comfy, "LunaVisionTranslator")().translate("tiny-proj", 0.0, image=image, vision_model="tiny",
                                                               conditioning=pos)
    assert out is pos and "width" not in out[0][1]


def test_vault_query_without_conditioning_carries_clip_text_encode_sdxl_keys(comfy, tiny_models, luna_assets):
    model, clip, _vae = tiny_models
    encode_sdxl = comfy["nodes"].NODE_CLASS_MAPPINGS["CLIPTextEncodeSDXL"]  # ComfyUI's own node and dict layout
    node = _luna(comfy, "LunaVaultQuery")()
    image = canvas_image(64, 14)
    for size in ({}, {"width": 832, "height": 1216}):  # the node's defaults (CLIPTextEncodeSDXL's), then its inputs
        w, h = size.get("width", 1024), size.get("height", 1024)
        want = encode_sdxl.execute(clip=clip, width=w, height=h, crop_w=0, crop_h=0, target_width=w, target_height=h,
                                   text_g="a portrait", text_l="a portrait")[0][0][1]
        (_, extra), = node.query("tiny-stored", image, 4, 0.5, **size)[0]
        assert set(extra) == set(want)
        assert {k: v for k, v in extra.items() if k != "pooled_output"} == \
            {k: v for k, v in want.items() if k != "pooled_output"}
        # the SDXL UNet's size embedding sees what CLIPTextEncodeSDXL gives it (a missing key reads as 768)
        torch.testing.assert_close(model.model.encode_adm(**extra),
                                   model.model.encode_adm(**{**want, "pooled_output": extra["pooled_output"]}))
    pos = comfy["nodes"].CLIPTextEncode().encode(clip, "a portrait")[0]
    (_, mixed), = node.query("tiny-stored", image, 4, 0.5, conditioning=pos)[0]
    assert "width" not in mixed  # a user's conditioning keeps its own keys


def test_translator_one_conditioning_per_image_keeps_user_size_keys(comfy, tiny_models, luna_assets):
    _model, clip, _vae = tiny_models
    pos = comfy["nodes"].CLIPTextEncode().encode(clip, "a portrait")[0]
    images = torch.cat([torch.zeros(1, 64, 64, 3), torch.ones(1, 64, 64, 3)])
    (out,) = _luna(comfy, "LunaVisionTranslator")().translate("tiny-proj", 0.5, image=images, vision_model="tiny",
                                                               conditioning=pos)
    cond, extra = out[0]
    assert cond.shape == (2, 77, 96) and extra["pooled_output"].shape == (2, 64)
    assert "width" not in extra  # no SDXL size keys forced onto the user's conditioning
    assert not torch.allclose(cond[0], cond[1])


def test_vault_query_clip_reencodes_only_prompts_only_vaults(comfy, tiny_models, luna_assets):
    _model, clip, _vae = tiny_models
    node = _luna(comfy, "LunaVaultQuery")()
    image = canvas_image(64, 12)
    stored = node.query("tiny-stored", image, 4, 1.0)[0][0][0]
    stored_with_clip = node.query("tiny-stored", image, 4, 1.0, clip=clip)[0][0][0]
    assert torch.equal(stored, stored_with_clip)  # a stored vault's rows are used as stored
    prompts = node.query("tiny-prompts", image, 4, 1.0, clip=clip)[0][0][0]
    assert prompts.shape == stored.shape and not torch.allclose(prompts, stored)  # ComfyUI's encoders, not the synthetic ones


def test_model_host_is_released_on_comfyui_unload(comfy, luna_assets):
    from comfy import model_management

    host = _module("host").HOST
    _luna(comfy, "LunaVaultQuery")().query("tiny-stored", canvas_image(64, 13), 4, 1.0)
    assert len(host) > 0
    model_management.unload_all_models()
    assert len(host) == 0


# ---------------------------------------------------------------------- bad inputs: clear errors naming the input


def _detail_prompt(assets, **changes) -> dict:
    p = tiny_prompt(json.loads((ROOT / "comfyui" / "workflows" / "luna_4k_detail.json").read_text()), assets)
    for nid, node in p.items():
        node["inputs"].update(changes.get(node["class_type"], {}))
    return p


@pytest.mark.parametrize("case, changes, message", [
    ("not a vault", {"LunaSemanticDetailer": {"vault_path": "__FOLDER__", "vision_model": "tiny"}},
     "input 'vault_path'"),
    ("projector for another width", {"LunaSemanticDetailer": {"projector": "sdxl-width-proj", "vision_model": "tiny"}},
     "input 'projector'"),
    ("scaffold smaller than the image", {"LunaNoiseScaffold": {"width": 96, "height": 96}}, "input 'scaffold'"),
    ("IP-Adapter for other embeddings", {"LunaSemanticDetailer": {"ip_adapter_path": "__IP_WRONG_DIM__",
                                                                  "vision_model": "tiny"}}, "input 'ip_adapter_path'"),
    ("ancestral sampler", {}, None),
])
def test_bad_inputs_are_clear_errors_and_the_executor_goes_on(comfy, luna_assets, tmp_path, case, changes, message):
    if message is None:  # not offered at all: validation refuses it before anything runs
        p = _detail_prompt(luna_assets, LunaSemanticDetailer={"sampler_name": "euler_ancestral"})
        _, error = comfy_env.run(p)
        assert error and "sampler_name" in error
        return
    not_a_vault = tmp_path / "not-a-vault"
    not_a_vault.mkdir()
    (not_a_vault / "readme.txt").write_text("hello")
    for node in changes.values():
        for k, v in node.items():
            if v == "__FOLDER__":
                node[k] = str(not_a_vault)
            if v == "__IP_WRONG_DIM__":
                node[k] = str(luna_assets["ip_wrong_dim"])
    _, error = comfy_env.run(_detail_prompt(luna_assets, **changes))
    assert error is not None and message in error, error
    assert "Traceback" not in error
    _, again = comfy_env.run(_detail_prompt(luna_assets))  # the same executor runs the next prompt
    assert again is None, again


def test_detections_from_another_image_size_is_a_clear_error(comfy, tiny_models, luna_assets):
    lsd = _lsd(comfy)
    model, clip, vae = tiny_models
    pos = comfy["nodes"].CLIPTextEncode().encode(clip, "a portrait")[0]
    image = canvas_image(128, 14)
    wrong = lsd.LunaDetections((256, 256), [luna_assets["detections"]])
    with pytest.raises(ValueError, match="input 'detections': found on a 256x256 image, this image is 128x128"):
        lsd.LunaSemanticDetailer().detail(model, vae, pos, pos, image, _scaffold(comfy, tiny_models), 3, 3.0, "euler",
                                          "normal", 0.5, 4, wrong, 64, 0.25, 8.0)


def test_empty_detections_through_the_executor_return_the_image(comfy, luna_assets, tmp_path):
    from lsd_runtime.detect import write_detections

    empty = write_detections(tmp_path / "none.json", [])
    p = _detail_prompt(luna_assets, LunaDetector={"detections_file": str(empty)})
    outputs, error = comfy_env.run(p)
    assert error is None, error
    ids = {n["class_type"]: nid for nid, n in p.items()}
    assert torch.equal(outputs[ids["LunaSemanticDetailer"]][0][0], outputs[ids["ImageScale"]][0][0])


def test_vault_query_and_detailer_through_the_shared_ray_service(comfy, tiny_models, luna_assets, ray_cluster):
    """`vault_path: ray:NAME` (luna vault serve) answers the nodes as the vault folder does."""
    from vault.service import serve, stop

    folder = luna_assets["models"] / "luna_vaults" / "tiny-stored"
    node = _luna(comfy, "LunaVaultQuery")()
    images = torch.cat([torch.zeros(1, 64, 64, 3), torch.ones(1, 64, 64, 3)])
    try:
        serve(folder, name="comfy-test-vault", num_cpus=0)
        (remote, _), = node.query("none", images, 4, 1.0, vault_path="ray:comfy-test-vault")[0]
        (local, _), = node.query("tiny-stored", images, 4, 1.0)[0]
        torch.testing.assert_close(remote, local, atol=1e-5, rtol=0)
        image = canvas_image(128, 15)
        scaffold = _scaffold(comfy, tiny_models)
        dets = luna_assets["detections"]
        a, _ = _detail(comfy, tiny_models, image, dets, scaffold, vault_path="ray:comfy-test-vault",
                       vault_strength=1.0, vision_model="tiny")
        b, _ = _detail(comfy, tiny_models, image, dets, scaffold, vault="tiny-stored", vault_strength=1.0,
                       vision_model="tiny")
        assert (a - b).abs().max() <= 1 / 255 + 1e-6
    finally:
        stop("comfy-test-vault")
