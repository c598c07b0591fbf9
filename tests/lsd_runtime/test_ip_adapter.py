"""IP-Adapter with one distinct image embedding per batch item (not diffusers' batched path, issue 9813)."""
from __future__ import annotations

import copy

import pytest
import torch

from lsd_runtime.ip_adapter import IPAdapterError, image_embed_dim, ip_image_embeds, load_ip_adapter, write_tiny_ip_adapter
from lsd_runtime.sampler import CondBatch, Sampler, SamplerError, SamplerSettings, time_ids

B, DIM = 3, 32


@pytest.fixture(scope="module")
def ip(tmp_path_factory):
    """A private copy of the tiny pipeline with a random tiny IP-Adapter loaded from a local file."""
    from lsd_runtime.workflow import tiny_components

    pipe = copy.deepcopy(tiny_components().pipe)
    path = write_tiny_ip_adapter(pipe.unet, DIM, tmp_path_factory.mktemp("ip") / "ip-adapter_tiny.safetensors")
    dim = load_ip_adapter(pipe, path, scale=1.0)
    return {"pipe": pipe, "sampler": Sampler.from_pipeline(pipe), "dim": dim}


def _batch(sampler, embeds):
    g = torch.Generator().manual_seed(3)
    cond = torch.randn(1, 77, sampler.cross_attention_dim, generator=g).repeat(B, 1, 1)  # same text for all
    pooled = torch.randn(1, sampler.pooled_dim, generator=g).repeat(B, 1)
    return CondBatch(cond, pooled, torch.zeros_like(cond), torch.zeros_like(pooled), time_ids((64, 64), batch=B),
                     image_embeds=embeds)


def test_item_i_depends_only_on_embedding_i(ip):
    sampler = ip["sampler"]
    assert ip["dim"] == DIM and image_embed_dim(ip["pipe"].unet) == DIM
    g = torch.Generator().manual_seed(0)
    latents = torch.randn(1, 4, 8, 8, generator=g).repeat(B, 1, 1, 1)  # identical items except the embedding
    noise = torch.randn(1, 4, 8, 8, generator=g).repeat(B, 1, 1, 1)
    embeds = torch.randn(B, DIM, generator=g)
    s = SamplerSettings(steps=3, strength=0.7, cfg=3.0)
    base = sampler.denoise(latents, noise, _batch(sampler, embeds), s)
    assert not torch.allclose(base[0], base[1], atol=1e-4)  # distinct embeddings -> distinct items
    changed = embeds.clone()
    changed[1] = torch.randn(DIM, generator=g) * 3
    out = sampler.denoise(latents, noise, _batch(sampler, changed), s)
    torch.testing.assert_close(out[0], base[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out[2], base[2], rtol=1e-5, atol=1e-5)
    assert (out[1] - base[1]).abs().max() > 1e-3


def test_cfg_rows_put_zero_negatives_first():
    e = torch.arange(6.0).reshape(2, 3) + 1
    (rows,) = ip_image_embeds(e, None, True, "cpu", torch.float32)
    assert tuple(rows.shape) == (4, 1, 3)
    assert not rows[:2].any() and torch.equal(rows[2:, 0], e)


def test_missing_embeddings_with_an_adapter_loaded_are_refused(ip):
    sampler = ip["sampler"]
    z = torch.zeros(B, 4, 8, 8)
    with pytest.raises(SamplerError, match="IP-Adapter"):
        sampler.denoise(z, z, _batch(sampler, None), SamplerSettings(steps=2, strength=0.5))


def test_bad_weights_are_clear_errors(tmp_path, ip):
    with pytest.raises(IPAdapterError, match="no such"):
        load_ip_adapter(ip["pipe"], tmp_path / "missing.safetensors")
    pickle = tmp_path / "ip.bin"
    pickle.write_bytes(b"\0" * 16)
    with pytest.raises(IPAdapterError, match="safetensors"):
        load_ip_adapter(ip["pipe"], pickle)


def test_refine_gives_every_crop_its_own_image_embedding(ip):
    import numpy as np

    from lsd_runtime.conditioning import CropEmbedder, TextSource, WithImageEmbeds
    from lsd_runtime.detect import Detection
    from lsd_runtime.workflow import Components, refine, settings_from_config, tiny_components
    from luna.cli import compose

    comps = Components.from_pipeline(ip["pipe"], vision=tiny_components().vision)
    source = WithImageEmbeds(TextSource(comps.encoders, "a face"), CropEmbedder(comps.vision))
    img = np.random.default_rng(0).integers(0, 256, (256, 256, 3), dtype=np.uint8)
    dets = [Detection(box=(0.1, 0.1, 0.3, 0.3)), Detection(box=(0.6, 0.6, 0.8, 0.8))]
    settings = settings_from_config(compose("refine", ["preset=tiny", "refine.enabled=false", "detail.steps=2",
                                                      "detail.strength=0.5", "detail.cfg=2.0"]))
    res = refine(img, "a face", components=comps, detections=dets, conditioning=source, settings=settings)
    assert len(res.record["crops"]) == 2 and res.record["crops"][0]["batch"] == res.record["crops"][1]["batch"]
    assert not np.array_equal(np.asarray(res.image), img)
    with pytest.raises(ValueError, match="IP-Adapter"):
        refine(img, "a face", components=comps, detections=dets, settings=settings)  # text rows carry no embedding
