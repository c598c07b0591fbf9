"""luna.models.tiny: the tiny preset's weights are deterministic."""
from __future__ import annotations

import torch

from luna.models import tiny


def test_tiny_weights_are_deterministic():
    a, b = tiny.tiny_pipeline(1, "pony"), tiny.tiny_pipeline(1, "pony")
    for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
        sa, sb = getattr(a, name).state_dict(), getattr(b, name).state_dict()
        assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    te_base, te_pony = tiny.tiny_text_encoders("base")[1].state_dict(), a.text_encoder_2.state_dict()
    assert any(not torch.equal(te_base[k], te_pony[k]) for k in te_base if te_base[k].numel() > 1)
