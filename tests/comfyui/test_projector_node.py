"""The ComfyUI Vision Translator node: conventions, CONDITIONING format, blending, mismatches; no ComfyUI needed."""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from projector.export import ProjectorMismatchError, save_projector
from projector.module import ProjectorModule

ROOT = Path(__file__).resolve().parents[2]
DIMS = {"input": "embed", "in_dim": 12, "vision_dim": 12, "vision_model": "synthetic", "num_tokens": None,
        "text_dims": [8, 16], "cond_dim": 24, "pooled_dim": 10, "seq_len": 77}


def _load_node_module():
    spec = importlib.util.spec_from_file_location("luna_comfy_nodes_pn", ROOT / "comfyui" / "__init__.py",
                                                  submodule_search_locations=[str(ROOT / "comfyui")])
    package = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = package
    spec.loader.exec_module(package)
    return sys.modules[spec.name + ".projector_node"]


@pytest.fixture(scope="module")
def node_module():
    return _load_node_module()


@pytest.fixture(scope="module")
def projector_dir(tmp_path_factory):
    torch.manual_seed(0)
    module = ProjectorModule(net={"_target_": "projector.models.LearnedQueryDecoder", "width": 16, "depth": 1, "heads": 2},
                             dims=DIMS, pooled_head={"_target_": "projector.models.PooledHead", "hidden": 16})
    folder = tmp_path_factory.mktemp("node_projector")
    save_projector(module.projector, folder)
    return folder, module.projector.eval()


def test_node_follows_comfyui_conventions(node_module):
    cls = node_module.NODE_CLASS_MAPPINGS["LunaVisionTranslator"]
    assert node_module.NODE_DISPLAY_NAME_MAPPINGS["LunaVisionTranslator"] == "Luna Vision Translator"
    types = cls.INPUT_TYPES()
    assert set(types["required"]) == {"projector", "strength"}
    assert {"projector_path", "clip_vision_output", "image", "clip_vision", "conditioning"} <= set(types["optional"])
    assert types["optional"]["clip_vision_output"][0] == "CLIP_VISION_OUTPUT"
    for section in types.values():  # every input has a tooltip
        assert all(spec[1].get("tooltip") for spec in section.values())
    assert cls.RETURN_TYPES == ("CONDITIONING",) and callable(getattr(cls, cls.FUNCTION)) and cls.CATEGORY


def test_package_registers_the_node():
    spec = importlib.util.spec_from_file_location("luna_comfy_nodes_p", ROOT / "comfyui" / "__init__.py",
                                                  submodule_search_locations=[str(ROOT / "comfyui")])
    package = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = package
    spec.loader.exec_module(package)
    assert "LunaVisionTranslator" in package.NODE_CLASS_MAPPINGS


def test_clip_vision_output_gives_comfyui_conditioning(node_module, projector_dir):
    folder, projector = projector_dir
    embeds = torch.randn(2, 12)
    (result,) = node_module.LunaVisionTranslator().translate("none", 1.0, projector_path=str(folder), clip_vision_output=SimpleNamespace(image_embeds=embeds))
    assert isinstance(result, list) and len(result) == 1
    cond, extra = result[0]
    want_cond, want_pooled = projector(embeds)
    torch.testing.assert_close(cond, want_cond.detach())
    torch.testing.assert_close(extra["pooled_output"], want_pooled.detach())
    assert cond.shape == (2, 77, 24) and extra["pooled_output"].shape == (2, 10)
    assert extra["width"] == extra["target_width"] == 1024 and extra["crop_w"] == 0


def test_blending_with_a_users_conditioning(node_module, projector_dir):
    folder, projector = projector_dir
    embeds = torch.randn(1, 12)
    user = torch.randn(1, 154, 24)  # a prompt longer than 77 tokens: two chunks
    user_pooled = torch.randn(1, 10)
    conditioning = [[user, {"pooled_output": user_pooled, "width": 832}]]
    node = node_module.LunaVisionTranslator()
    (zero,) = node.translate("none", 0.0, projector_path=str(folder), clip_vision_output={"image_embeds": embeds}, conditioning=conditioning)
    torch.testing.assert_close(zero[0][0], user)
    assert zero[0][1]["width"] == 832  # the user's own size keys are kept
    (half,) = node.translate("none", 0.5, projector_path=str(folder), clip_vision_output={"image_embeds": embeds}, conditioning=conditioning)
    proj_cond, proj_pooled = projector(embeds)
    want = 0.5 * user + 0.5 * proj_cond.detach().repeat(1, 2, 1)
    torch.testing.assert_close(half[0][0], want)
    torch.testing.assert_close(half[0][1]["pooled_output"], 0.5 * user_pooled + 0.5 * proj_pooled.detach())


def test_image_with_a_vision_tower(node_module, projector_dir):
    folder, projector = projector_dir
    embeds = torch.randn(3, 12)
    seen = {}

    class FakeClipVision:  # ComfyUI's CLIP_VISION: encode_image(IMAGE) -> output with image_embeds
        def encode_image(self, image):
            seen["shape"] = tuple(image.shape)
            return SimpleNamespace(image_embeds=embeds)

    image = torch.rand(3, 64, 64, 3)
    (result,) = node_module.LunaVisionTranslator().translate("none", 1.0, projector_path=str(folder), image=image, clip_vision=FakeClipVision())
    assert seen["shape"] == (3, 64, 64, 3)
    torch.testing.assert_close(result[0][0], projector(embeds)[0].detach())


def test_mismatched_or_missing_inputs_are_clear_errors(node_module, projector_dir, tmp_path):
    folder, _ = projector_dir
    node = node_module.LunaVisionTranslator()
    with pytest.raises(ProjectorMismatchError, match="12-d"):
        node.translate("none", 1.0, projector_path=str(folder), clip_vision_output=SimpleNamespace(image_embeds=torch.randn(1, 1024)))
    with pytest.raises(ValueError, match="connect a CLIP_VISION_OUTPUT"):
        node.translate("none", 1.0, projector_path=str(folder))
    with pytest.raises(ValueError, match="not a projector folder"):
        node.translate("none", 1.0, projector_path=str(tmp_path), clip_vision_output=SimpleNamespace(image_embeds=torch.randn(1, 12)))


# ---------------------------------------------------------------------- the CLIP-L head (SD 1.x)

CLIP_L = {**DIMS, "text_dims": [768], "cond_dim": 768, "pooled_dim": 768, "targets": "clip_l"}


@pytest.fixture(scope="module")
def clip_l_dir(tmp_path_factory):
    torch.manual_seed(1)
    module = ProjectorModule(net={"_target_": "projector.models.LearnedQueryDecoder", "width": 16, "depth": 1, "heads": 2},
                             dims=CLIP_L, pooled_head={"_target_": "projector.models.PooledHead", "hidden": 16})
    folder = tmp_path_factory.mktemp("clip_l_projector")
    save_projector(module.projector, folder)
    return folder, module.projector.eval()


def test_clip_l_projector_gives_an_sd1_conditioning(node_module, clip_l_dir):
    import json

    folder, projector = clip_l_dir
    assert json.loads((folder / "projector.json").read_text())["targets"] == "clip_l"  # what the export declares
    embeds = torch.randn(2, 12)
    node = node_module.LunaVisionTranslator()
    for target in ("auto", "sd1.x"):
        (result,) = node.translate("none", 1.0, projector_path=str(folder), target=target,
                                   clip_vision_output=SimpleNamespace(image_embeds=embeds))
        assert len(result) == 1
        cond, extra = result[0]
        want_cond, want_pooled = projector(embeds)
        assert cond.shape == (2, 77, 768) and extra["pooled_output"].shape == (2, 768)
        torch.testing.assert_close(cond, want_cond.detach())
        torch.testing.assert_close(extra["pooled_output"], want_pooled.detach())
        assert set(extra) == {"pooled_output"}  # SD 1.x: no SDXL size keys
    # blended row by row into an SD 1.x prompt's conditioning (CLIP-L's [1, 77, 768] + pooled [1, 768])
    user, user_pooled = torch.randn(1, 77, 768), torch.randn(1, 768)
    (mixed,) = node.translate("none", 0.25, projector_path=str(folder), conditioning=[[user, {"pooled_output": user_pooled}]],
                              clip_vision_output={"image_embeds": embeds})
    want_cond, want_pooled = projector(embeds)
    torch.testing.assert_close(mixed[0][0], 0.75 * user + 0.25 * want_cond.detach())
    torch.testing.assert_close(mixed[0][1]["pooled_output"], 0.75 * user_pooled + 0.25 * want_pooled.detach())


class _TextClip:
    """ComfyUI CLIP stand-in (tokenize + encode_from_tokens(return_pooled=True)): a fixed non-zero encoding per
    prompt, `width` wide (768: an SD 1.x checkpoint's CLIP-L)."""

    def __init__(self, width=768, pooled=768):
        self.width, self.pooled, self.prompts = width, pooled, []

    def tokenize(self, text):
        return text

    def encode_from_tokens(self, tokens, return_pooled=False):
        self.prompts.append(tokens)
        g = torch.Generator().manual_seed(len(tokens) + 1)
        return torch.randn(1, 77, self.width, generator=g), torch.randn(1, self.pooled, generator=g)


def test_without_conditioning_strength_blends_against_the_empty_prompt(node_module, clip_l_dir, projector_dir):
    """One rule for both heads: (1 - s) * the model's empty prompt + s * projected. SDXL's empty prompt is zeros
    (so s * projected); SD 1.x's is CLIP-L's encoding of "", from the clip input."""
    embeds, s = torch.randn(2, 12), 0.3
    node = node_module.LunaVisionTranslator()
    folder, projector = projector_dir  # SDXL
    (out,) = node.translate("none", s, projector_path=str(folder), clip_vision_output={"image_embeds": embeds})
    want_cond, want_pooled = (t.detach() for t in projector(embeds))
    torch.testing.assert_close(out[0][0], (1 - s) * torch.zeros_like(want_cond) + s * want_cond)
    torch.testing.assert_close(out[0][1]["pooled_output"], s * want_pooled)
    folder, projector = clip_l_dir  # SD 1.x
    clip = _TextClip()
    (out,) = node.translate("none", s, projector_path=str(folder), clip=clip,
                            clip_vision_output={"image_embeds": embeds})
    assert clip.prompts == [""]
    empty_cond, empty_pooled = _TextClip().encode_from_tokens("", return_pooled=True)
    want_cond, want_pooled = (t.detach() for t in projector(embeds))
    cond, extra = out[0]
    assert cond.shape == (2, 77, 768) and set(extra) == {"pooled_output"}  # one row per image, no SDXL size keys
    torch.testing.assert_close(cond, (1 - s) * empty_cond + s * want_cond)
    torch.testing.assert_close(extra["pooled_output"], (1 - s) * empty_pooled + s * want_pooled)
    assert not torch.allclose(cond, s * want_cond)  # not a blend against zeros, which SD 1.x never sees
    (out,) = node.translate("none", 0.0, projector_path=str(folder), clip=_TextClip(),
                            clip_vision_output={"image_embeds": embeds})
    assert out[0][0].shape == (2, 77, 768)  # strength 0: the empty prompt, still one row per image
    torch.testing.assert_close(out[0][0], empty_cond.expand(2, -1, -1))
    # without a clip, strength < 1 has nothing to blend against: an error naming the input (strength 1 needs none)
    with pytest.raises(ValueError, match=r"input 'clip'.*connect your checkpoint's CLIP"):
        node.translate("none", s, projector_path=str(folder), clip_vision_output={"image_embeds": embeds})
    with pytest.raises(ValueError, match=r"input 'clip' encodes the empty prompt 2048 wide"):  # an SDXL CLIP
        node.translate("none", s, projector_path=str(folder), clip=_TextClip(2048, 1280),
                       clip_vision_output={"image_embeds": embeds})


def test_clip_l_projector_is_refused_for_sdxl(node_module, clip_l_dir, projector_dir):
    from projector.export import ProjectorTargetsError

    folder, _ = clip_l_dir
    node = node_module.LunaVisionTranslator()
    out = {"image_embeds": torch.randn(1, 12)}
    with pytest.raises(ProjectorTargetsError, match=r"input 'projector': .*CLIP-L .*target=sdxl needs \[77, 2048\]"):
        node.translate("none", 0.5, projector_path=str(folder), clip_vision_output=out, target="sdxl")
    sdxl = [[torch.randn(1, 77, 2048), {"pooled_output": torch.randn(1, 1280), "width": 1024}]]
    with pytest.raises(ProjectorTargetsError, match=r"input 'projector': .*CLIP-L .*refused for input 'conditioning' of "
                                                    r"width 2048"):
        node.translate("none", 0.5, projector_path=str(folder), clip_vision_output=out, conditioning=sdxl)
    sdxl_folder, _ = projector_dir  # and the other way round: an SDXL projector asked for SD 1.x
    with pytest.raises(ProjectorTargetsError, match=r"input 'projector': .*an SDXL projector .*target=sd1.x"):
        node.translate("none", 0.5, projector_path=str(sdxl_folder), clip_vision_output=out, target="sd1.x")


def test_detailer_refuses_a_clip_l_projector_the_translator_has_cached(node_module, clip_l_dir):
    """Both nodes keep loaded projectors in the shared cache: the detailer's SDXL targets check must hold
    even when the Vision Translator loaded the same folder first (it loads without that check)."""
    lsd_nodes, host = sys.modules["luna_comfy_nodes_pn.lsd_nodes"], sys.modules["luna_comfy_nodes_pn.host"]
    InputError = sys.modules["luna_comfy_nodes_pn.sources"].InputError
    folder, _ = clip_l_dir

    class Vision:
        def encode_image(self, image):
            return SimpleNamespace(image_embeds=torch.randn(image.shape[0], 12))

    positive = [[torch.randn(1, 77, 768), {"pooled_output": torch.randn(1, 768)}]]  # an SD 1.x prompt: widths agree
    host.HOST.clear()
    node_module.LunaVisionTranslator().translate("none", 0.5, projector_path=str(folder), conditioning=positive,
                                                 clip_vision_output={"image_embeds": torch.randn(1, 12)})
    with pytest.raises(InputError, match=r"input 'projector': .*clip_l targets"):
        lsd_nodes.build_source(positive, clip_vision=Vision(), projector_path=str(folder), projector_strength=0.3)
    host.HOST.clear()


def test_detailer_refuses_a_combined_or_batched_positive(node_module):
    """Only the first entry / row of `positive` would be used: ConditioningCombine or a batch is an error."""
    lsd_nodes = sys.modules["luna_comfy_nodes_pn.lsd_nodes"]
    InputError = sys.modules["luna_comfy_nodes_pn.sources"].InputError
    one = [torch.zeros(1, 77, 2048), {"pooled_output": torch.zeros(1, 1280)}]
    with pytest.raises(InputError, match=r"input 'positive': 2 conditioning entries"):
        lsd_nodes.build_source([one, [torch.ones(1, 77, 2048), {"pooled_output": torch.ones(1, 1280)}]])
    with pytest.raises(InputError, match=r"input 'positive': 1 conditioning entries of batch 2"):
        lsd_nodes.build_source([[torch.zeros(2, 77, 2048), {"pooled_output": torch.zeros(2, 1280)}]])
    source, hook = lsd_nodes.build_source([one])  # one prompt: the text source, no hook
    assert hook is None and source.cond.shape == (77, 2048)


def test_category_settings_route_and_set_each_categorys_knobs(node_module, tmp_path):
    """A tune=true settings file in the detailer: its routes send a face to `faces`, which is queried with the
    file's strength / k / weighting / temperature; a hand (routed by category_routing) and an unrouted crop keep
    the node's own settings; the source's settings are restored afterwards."""
    from lsd_runtime.categories import CategorySettings, CategoryTable

    sources = sys.modules["luna_comfy_nodes_pn.sources"]
    lsd_nodes = sys.modules["luna_comfy_nodes_pn.lsd_nodes"]
    table = CategoryTable(routes={"face": "faces"}, categories={"faces": CategorySettings(0.9, 3, "mean", 0.2)})
    path = table.write(tmp_path / "category_settings.json")

    class Stub:  # a VaultSource's knobs; rows() reports what each query used
        text, name, category, weight, k, weighting, temperature = None, "vault", None, 0.5, 8, "softmax", 0.05
        vault = SimpleNamespace(info=lambda: {"categories": ["faces", "hands"]})

        def rows(self, crops):
            return [(self.category, self.weight, self.k, self.weighting, self.temperature) for _ in crops]

    stub = Stub()
    routed = sources.Routed(stub, sources.parse_routing("hand=hands"), lsd_nodes.read_category_settings(str(path)))
    dets = [SimpleNamespace(label=x) for x in ("Face", "hand", "tree")]
    assert routed.rows_for([0, 1, 2], dets) == [("faces", 0.9, 3, "mean", 0.2), ("hands", 0.5, 8, "softmax", 0.05),
                                                (None, 0.5, 8, "softmax", 0.05)]
    assert (stub.category, stub.weight, stub.k, stub.weighting, stub.temperature) == (None, 0.5, 8, "softmax", 0.05)
    InputError = sources.InputError
    with pytest.raises(InputError, match=r"input 'category_settings': .*nope.json"):
        lsd_nodes.read_category_settings(str(tmp_path / "nope.json"))
    other = CategoryTable(categories={"eyes": CategorySettings()})
    with pytest.raises(InputError, match=r"input 'category_settings': categories \['eyes'\] are not in the vault"):
        sources.Routed(stub, {}, other, "category_settings")
    assert lsd_nodes.read_category_settings("  ") is None
