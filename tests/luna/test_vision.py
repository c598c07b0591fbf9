"""luna.models.vision: open_clip towers from local weights only, equal to open_clip's own encode_image."""
from __future__ import annotations

import pytest
import torch
from PIL import Image

from luna.models import tiny, vision


@pytest.fixture(scope="module")
def tower():
    return vision.load_vision("tiny")


@pytest.fixture(scope="module")
def pixels(tower):
    images = [Image.new("RGB", (300, 200), (200, 30, 30)), Image.linear_gradient("L").convert("RGB")]
    return torch.stack([tower.preprocess(im) for im in images])


def test_tiny_tower_matches_open_clip(tower, pixels):
    assert tower.model_id == "open_clip:luna-tiny-vit"
    assert pixels.shape == (2, 3, 224, 224)  # the model's own preprocessing (resize + centre crop)
    emb = tower.encode(pixels)
    assert emb.shape == (2, tower.dim) and tower.dim == 32
    with torch.no_grad():
        assert torch.equal(emb, tower.model.encode_image(pixels))
    assert not torch.allclose(emb[0], emb[1])


def test_penultimate_tokens(tower, pixels):
    tokens = tower.encode_tokens(pixels)
    width = tower.visual.transformer.width
    assert tokens.shape == (2, 1 + (224 // 32) ** 2, width)
    # run the blocks by hand: the output of the second-to-last block, class token first
    visual = tower.visual
    with torch.no_grad():
        x = visual._embeds(pixels)
        for block in visual.transformer.resblocks[:-1]:
            x = block(x)
    assert torch.allclose(tokens, x, atol=1e-6)


def test_weights_file_round_trip_and_determinism(tower, pixels, tmp_path):
    path = tiny.write_vision(tmp_path)
    loaded = vision.load_vision("tiny", weights=path)
    assert torch.equal(loaded.encode(pixels), tower.encode(pixels))
    assert torch.equal(vision.load_vision("tiny").encode(pixels), tower.encode(pixels))


def test_vision_only_and_pickle_weights(tower, pixels, tmp_path):
    visual_only = {k: v for k, v in tower.model.state_dict().items() if k.startswith("visual.")}
    torch.save({"state_dict": visual_only}, tmp_path / "visual.pt")
    loaded = vision.load_vision("tiny", weights=tmp_path / "visual.pt")  # torch.load(weights_only=True)
    assert torch.equal(loaded.encode(pixels), tower.encode(pixels))


def test_mismatched_weights_name_the_tensor(tmp_path):
    path = tiny.write_vision(tmp_path)
    with pytest.raises(vision.VisionWeightsError, match=r"ViT-B-32.*'visual\.[a-z_.0-9]+'"):
        vision.load_vision("ViT-B-32", weights=path)


def test_real_architectures_need_a_local_file():
    with pytest.raises(ValueError, match="local weights file"):
        vision.load_vision("ViT-H-14")
    with pytest.raises(ValueError, match="unknown open_clip architecture"):
        vision.load_vision("no-such-model", weights="x.safetensors")


def test_transformers_clip_vision_weights(tower, pixels, tmp_path):
    """IP-Adapter ships its ViT-H-14 as a transformers CLIPVisionModelWithProjection; it loads too."""
    from safetensors.torch import save_file

    visual = {k: v for k, v in tower.model.state_dict().items() if k.startswith("visual.")}
    hf = {"vision_model.embeddings.class_embedding": visual["visual.class_embedding"],
          "vision_model.embeddings.patch_embedding.weight": visual["visual.conv1.weight"],
          "vision_model.embeddings.position_embedding.weight": visual["visual.positional_embedding"],
          "vision_model.pre_layrnorm.weight": visual["visual.ln_pre.weight"],
          "vision_model.pre_layrnorm.bias": visual["visual.ln_pre.bias"],
          "vision_model.post_layernorm.weight": visual["visual.ln_post.weight"],
          "vision_model.post_layernorm.bias": visual["visual.ln_post.bias"],
          "visual_projection.weight": visual["visual.proj"].T.contiguous()}
    names = {"ln_1": "layer_norm1", "ln_2": "layer_norm2", "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2",
             "attn.out_proj": "self_attn.out_proj"}
    for key, value in visual.items():
        if not key.startswith("visual.transformer.resblocks."):
            continue
        layer, rest = key[len("visual.transformer.resblocks."):].split(".", 1)
        base = f"vision_model.encoder.layers.{layer}."
        if rest.startswith("attn.in_proj_"):
            kind = rest.rsplit("_", 1)[1]
            for name, part in zip(("q_proj", "k_proj", "v_proj"), value.chunk(3)):
                hf[f"{base}self_attn.{name}.{kind}"] = part.contiguous()
        else:
            old = next(o for o in names if rest.startswith(o))
            hf[base + names[old] + rest[len(old):]] = value
    save_file(hf, str(tmp_path / "image_encoder.safetensors"))
    loaded = vision.load_vision("tiny", weights=tmp_path / "image_encoder.safetensors")
    assert torch.equal(loaded.encode(pixels), tower.encode(pixels))


def test_quickgelu_weights_are_refused_by_a_gelu_architecture(tower, pixels, tmp_path):
    """QuickGELU and GELU weights share every tensor and shape: the file's config or OpenAI's key signature decides."""
    import json

    from safetensors.torch import save_file

    state = {k: v.contiguous() for k, v in tower.model.state_dict().items()}
    (tmp_path / "hf").mkdir()
    save_file(state, str(tmp_path / "hf" / "model.safetensors"))
    (tmp_path / "hf" / "config.json").write_text(json.dumps({"vision_config": {"hidden_act": "quick_gelu"}}))
    with pytest.raises(vision.VisionWeightsError, match="quick_gelu.*quickgelu"):
        vision.load_vision("tiny", weights=tmp_path / "hf" / "model.safetensors")
    openai = tmp_path / "openai.pt"
    torch.save({**state, "input_resolution": torch.tensor(336), "vocab_size": torch.tensor(49408)}, openai)
    with pytest.raises(vision.VisionWeightsError, match="OpenAI CLIP key signature"):
        vision.load_vision("tiny", weights=openai)
    (tmp_path / "hf" / "config.json").write_text(json.dumps({"vision_config": {"hidden_act": "gelu"}}))
    ok = vision.load_vision("tiny", weights=tmp_path / "hf" / "model.safetensors")  # declared GELU: loads
    assert torch.equal(ok.encode(pixels), tower.encode(pixels))


def test_vision_configs_name_their_weights_and_openai_uses_quickgelu():
    import open_clip
    import yaml

    from luna import CONF_DIR

    vision._register_configs()
    for path in sorted((CONF_DIR / "vision").glob("*.yaml")):
        cfg = yaml.safe_load(path.read_text())
        assert cfg.get("weights_for"), f"{path.name} does not say which weight files it is for"
        if "OpenAI" in cfg["weights_for"]:
            assert open_clip.get_model_config(cfg["name"]).get("quick_gelu") is True, path.name


def test_embed_gives_what_each_earlier_path_gave():
    """`embed` replaced three paths (vault query, runtime crops, extraction); on CPU every one of
    them must give the same numbers as before, to 1e-6 (the fixture was written by the old code)."""
    from pathlib import Path

    import numpy as np

    old = np.load(Path(__file__).parents[1] / "fixtures" / "vision" / "tiny_embeds_v1.npz")
    rng = np.random.default_rng(11)
    images = [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
              for h, w in ((96, 128), (224, 224), (300, 180))]
    tower = vision.load_vision("tiny")
    got = vision.embed(tower, images)
    assert got.tokens is None and got.embed.dtype == torch.float32 and got.embed.device.type == "cpu"
    for path in ("vault", "runtime", "extraction"):
        np.testing.assert_allclose(got.embed.numpy(), old[path], rtol=0, atol=1e-6)
    pixels = torch.stack([tower.preprocess(im) for im in images])  # extraction's reader preprocesses itself
    with_tokens = vision.embed(tower, pixels, tokens=True)
    np.testing.assert_allclose(with_tokens.embed.numpy(), old["extraction"], rtol=0, atol=1e-6)
    np.testing.assert_allclose(with_tokens.tokens.numpy(), old["extraction_tokens"], rtol=0, atol=1e-6)
    assert torch.allclose(with_tokens.tokens, tower.encode_tokens(pixels), atol=1e-6)


def test_text_side_and_text_agreement(tower, tmp_path):
    side = vision.text_side(tower)
    assert side is not None  # the tiny preset's tower keeps its text side
    t = side(["a red fox", "a blue car"])
    assert t.shape == (2, tower.dim) and torch.allclose(t.norm(dim=-1), torch.ones(2), atol=1e-5)
    img = torch.randn(2, tower.dim)
    got = vision.text_agreement(img * 3.0, t)  # unnormalised image side: the cosine all the same
    assert got == pytest.approx((torch.nn.functional.normalize(img, dim=-1) * t).sum(-1).tolist(), abs=1e-6)
    assert vision.text_agreement(t, t) == pytest.approx([1.0, 1.0], abs=1e-5)
    with pytest.raises(ValueError, match=r"\(2, .*\) image embeddings against \(1, .*\) text"):
        vision.text_agreement(img, t[:1])
    visual_only = {k: v for k, v in tower.model.state_dict().items() if k.startswith("visual.")}
    torch.save({"state_dict": visual_only}, tmp_path / "visual.pt")
    assert vision.text_side(vision.load_vision("tiny", weights=tmp_path / "visual.pt")) is None
    assert vision.text_side(None) is None
