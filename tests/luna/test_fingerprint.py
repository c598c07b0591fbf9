"""luna.models.fingerprint: checkpoint and text-encoder fingerprints, stable across formats, blind to the UNet."""
from __future__ import annotations

import torch

from luna.models import tiny
from luna.models.fingerprint import file_fingerprint, te_fingerprint


def test_checkpoints_are_distinct_and_fingerprints_stable(files):
    (s0, d0), (s1, d1) = files["tiny-base-0"], files["tiny-pony-1"]
    assert file_fingerprint(s0) != file_fingerprint(s1)
    assert file_fingerprint(d0) != file_fingerprint(d1)
    assert file_fingerprint(s0) == file_fingerprint(s0)
    u0, u1 = tiny.tiny_unet(0).state_dict(), tiny.tiny_unet(1).state_dict()
    assert any(not torch.equal(u0[k], u1[k]) for k in u0 if u0[k].numel() > 1)


def test_te_fingerprint_same_across_formats_and_family(files, tmp_path):
    (s0, d0), (s1, d1) = files["tiny-base-0"], files["tiny-pony-1"]
    assert te_fingerprint(s0) == te_fingerprint(d0)
    assert te_fingerprint(s1) == te_fingerprint(d1)
    assert te_fingerprint(s0) != te_fingerprint(s1)  # another family = retrained text encoders
    # another checkpoint of the base family shares its text encoders but not its UNet
    s2 = tiny.write_single_file(tiny.tiny_pipeline(2, "base"), tmp_path / "tiny-base-2.safetensors")
    assert te_fingerprint(s2) == te_fingerprint(s0)
    assert file_fingerprint(s2) != file_fingerprint(s0)


def test_te_fingerprint_sees_a_fine_tuned_text_encoder(tmp_path):
    pipe = tiny.tiny_pipeline(0, "base")
    before = te_fingerprint(tiny.write_single_file(pipe, tmp_path / "a.safetensors"))
    with torch.no_grad():  # a small fine-tune of one bigG layer
        layer = pipe.text_encoder_2.text_model.encoder.layers[1] if hasattr(pipe.text_encoder_2, "text_model") else pipe.text_encoder_2.encoder.layers[1]
        layer.mlp.fc1.weight.add_(0.01)
    assert te_fingerprint(tiny.write_single_file(pipe, tmp_path / "b.safetensors")) != before
