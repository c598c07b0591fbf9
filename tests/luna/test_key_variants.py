"""The text-encoder key variants real single files use all load to the same encoders."""
from __future__ import annotations

import pytest
import torch

from luna.models import sdxl, tiny
from tests.luna.model_kinds import BIGG, CLIP_L, META, save, tiny_state

VARIANTS = {
    "plain": lambda s: None,
    "with position_ids": lambda s: s.update({CLIP_L + "text_model.embeddings.position_ids": torch.arange(77)[None]}),
    "with logit_scale": lambda s: s.update({BIGG + "logit_scale": torch.tensor(4.6052)}),
    "text_projection.weight": lambda s: s.update({BIGG + "text_projection.weight": s.pop(BIGG + "text_projection").T.contiguous()}),
}


@pytest.fixture(scope="module")
def reference():
    with tiny.one_thread():
        pipe = tiny.tiny_pipeline(0, "base")
    enc = sdxl.TextEncoders.from_pipeline(pipe)
    return pipe, sdxl.encode_prompt(enc, ["a red fox in snow"])


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_key_variant_loads_exactly(variant, reference, tmp_path):
    pipe, (cond, pooled, _, _) = reference
    state = tiny_state(0, "base")
    VARIANTS[variant](state)
    path = save(tmp_path / "v.safetensors", state, META)
    ref_proj = pipe.text_encoder_2.text_projection.weight
    for loaded in (sdxl.load_text_encoders(path), sdxl.TextEncoders.from_pipeline(sdxl.load_sdxl(path))):
        proj = loaded.text_encoder_2.text_projection.weight
        assert proj.device.type == "cpu" and torch.equal(proj, ref_proj), variant
        c, p, _, _ = sdxl.encode_prompt(loaded, ["a red fox in snow"])
        assert torch.equal(c, cond) and torch.equal(p, pooled), variant
