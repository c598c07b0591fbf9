"""luna.models.fingerprint: checkpoint and text-encoder fingerprints, stable across formats, blind to the UNet;
the text-encoder fingerprint sees every weight and treats fp32/fp16/bf16 releases as documented."""
from __future__ import annotations

import pytest
import torch

from luna.models import tiny
from luna.models.fingerprint import canonical, file_fingerprint, te_fingerprint, te_fingerprint_of_state
from tests.luna.model_kinds import BIGG, CLIP_L, META, save, tiny_state


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


@pytest.fixture(scope="module")
def te_state():
    return {k: v for k, v in tiny_state(0, "base").items() if k.startswith("conditioner.")}


def _edit_row(t: torch.Tensor, row: int) -> torch.Tensor:
    t = t.clone()
    if t.ndim == 0:
        return t + 1
    t[row] = t[row] + 0.5
    return t


def test_any_single_row_of_any_text_encoder_tensor_changes_it(te_state):
    base = te_fingerprint_of_state(te_state)
    seen = {base}
    for i, key in enumerate(sorted(te_state)):
        t = te_state[key]
        row = (i * 7919) % t.shape[0] if t.ndim else 0
        fp = te_fingerprint_of_state({**te_state, key: _edit_row(t, row)})
        assert fp not in seen, f"editing row {row} of {key} left the fingerprint unchanged"
        seen.add(fp)
    assert len(seen) == len(te_state) + 1


@pytest.mark.parametrize("where", ["unsampled token row", "CLIP-L start token", "fused attention row", "projection column"])
def test_the_rows_a_sampled_fingerprint_missed(te_state, where):
    key, edit = {
        "unsampled token row": (BIGG + "token_embedding.weight", lambda t: t.index_add(0, torch.tensor([4321]), torch.ones(1, t.shape[1], dtype=t.dtype))),
        "CLIP-L start token": (CLIP_L + "text_model.embeddings.token_embedding.weight",
                               lambda t: t.index_add(0, torch.tensor([49406]), torch.ones(1, t.shape[1], dtype=t.dtype))),
        "fused attention row": (BIGG + "transformer.resblocks.0.attn.in_proj_weight", lambda t: _edit_row(t, t.shape[0] // 3 + 1)),
        "projection column": (BIGG + "text_projection", lambda t: torch.cat([t[:, :1] + 1, t[:, 1:]], dim=1)),
    }[where]
    assert te_fingerprint_of_state({**te_state, key: edit(te_state[key])}) != te_fingerprint_of_state(te_state)


def test_position_ids_and_logit_scale_do_not_count(te_state):
    extra = {**te_state, CLIP_L + "text_model.embeddings.position_ids": torch.arange(77)[None],
             BIGG + "logit_scale": torch.tensor(4.6)}
    assert te_fingerprint_of_state(extra) == te_fingerprint_of_state(te_state)


def test_canonical_rounding_of_fp32_fp16_and_bf16_releases(tmp_path, te_state):
    """fp32 master == its fp16 release == a bf16 copy of the fp16; a bf16 rounded straight from fp32 differs."""
    gen = torch.Generator().manual_seed(0)
    master = {k: (torch.randn(v.shape, generator=gen) * 0.05 if v.is_floating_point() else v) for k, v in te_state.items()}
    fp16 = {k: v.to(torch.float16) for k, v in master.items()}
    bf16_of_fp16 = {k: v.to(torch.bfloat16) for k, v in fp16.items()}
    bf16_direct = {k: v.to(torch.bfloat16) for k, v in master.items()}
    paths = {n: save(tmp_path / f"{n}.safetensors", st, META) for n, st in
             (("fp32", master), ("fp16", fp16), ("bf16_of_fp16", bf16_of_fp16), ("bf16_direct", bf16_direct))}
    fps = {n: te_fingerprint(p) for n, p in paths.items()}
    assert fps["fp32"] == fps["fp16"] == fps["bf16_of_fp16"]
    assert fps["bf16_direct"] != fps["fp32"]  # double rounding: documented in docs/models.md
    # what the canonical form is: fp16 then bf16, round to nearest even
    x = torch.tensor([1.0 + 2**-9, 1.0 + 3 * 2**-9, 0.1])
    assert torch.equal(canonical(x), x.to(torch.float16).to(torch.bfloat16).view(torch.int16))
    assert torch.equal(canonical(x.to(torch.float16)), canonical(x))
    from luna.models.fingerprint import _canonical_into_buffer  # the fast path hashes the same bits

    for t in (x, x.to(torch.float16), x.to(torch.bfloat16), torch.randn(5, 3).T):
        assert torch.equal(_canonical_into_buffer(t), canonical(t))
