"""The CLIP-L head: trained and exported alone (model.heads=[clip_l]), round-trips, refused for SDXL;
`loss.clip_l_weight` weights the CLIP-L half of the SDXL loss."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from projector import metrics
from projector.cli import main
from projector.export import ProjectorTargetsError, load_projector


@pytest.fixture(scope="module")
def clip_l_pairs(tiny_pairs, tmp_path_factory):
    """tiny_pairs plus /prompts/clip_l_*: a function of each prompt's conditioning (so images predict it)."""
    from extraction.pairs import Pairs, PairsPart, write_part

    out = tmp_path_factory.mktemp("clip_l") / "pairs"
    with Pairs(tiny_pairs) as p:
        ids = np.arange(p.num_prompts)
        cond, pooled = p.cond(ids).astype(np.float32), p.pooled(ids).astype(np.float32)
        images = {"key": np.array(p.key, dtype=object), "embed": p.embed, "prompt_id": p.prompt_id,
                  "checkpoint": np.array(p.checkpoint, dtype=object), "category": np.array(p.category, dtype=object),
                  "campaign": np.array(p.campaign, dtype=object), "seed": p.seed}
        prompts = {"text": np.array(p.prompt_text, dtype=object), "cond": cond, "pooled": pooled,
                   "te_fingerprint": np.array(p.te_fingerprint, dtype=object),
                   "clip_l_cond": np.tanh(cond[..., :16] * 0.5), "clip_l_pooled": np.tanh(cond[:, -1, :16])}
        write_part(out / "part-00000.h5", PairsPart(images, prompts, {k: p.attrs[k] for k in
                                                                      ("vision_model", "vision_dim", "text_dims",
                                                                       "pooled_dim")}), dtype="float32")
    return out


def test_clip_l_head_trains_exports_round_trips_and_is_refused_for_sdxl(clip_l_pairs, tmp_path, fast, small_queries):
    from lsd_runtime.conditioning import ConditioningError, CropEmbedder, open_projector
    from luna.models.vision import load_vision
    from projector.module import ProjectorModule

    out = tmp_path / "run"
    code = main([f"pairs={clip_l_pairs}", f"out={out}", "logger=none", "heads=[clip_l]", "loss.clip_l_weight=2.0",
                 "trainer.max_epochs=1", "data.val_checkpoints=0", *small_queries, *fast])
    assert code == 0
    cfg = json.loads((out / "projector.json").read_text())
    assert cfg["targets"] == "clip_l" and cfg["dims"]["targets"] == "clip_l"
    assert cfg["dims"]["cond_dim"] == 16 and cfg["dims"]["text_dims"] == [16] and cfg["dims"]["pooled_dim"] == 16
    assert cfg["architecture"]["net"]["heads"] == 2  # the decoder's attention heads, not the output heads
    proj = load_projector(out)
    x = torch.randn(4, 32)
    cond, pooled = proj(x)
    assert cond.shape == (4, 77, 16) and pooled.shape == (4, 16) and torch.isfinite(cond).all()
    ckpt = torch.load(next((out / "checkpoints").glob("last.ckpt")), map_location="cpu", weights_only=False)
    module = ProjectorModule(**{k: ckpt["hyper_parameters"][k] for k in ("net", "dims", "pooled_head", "optim", "loss")})
    module.load_state_dict(ckpt["state_dict"])
    ref_cond, ref_pooled = module.projector.eval()(x)
    torch.testing.assert_close(cond, ref_cond)  # the export is the trained module
    torch.testing.assert_close(pooled, ref_pooled)
    assert module.loss_weights["clip_l_weight"] == 2.0
    with pytest.raises(ProjectorTargetsError, match="clip_l targets .*SD 1.x"):
        load_projector(out, expect_targets="sdxl")
    assert load_projector(out, expect_targets="clip_l").dims["targets"] == "clip_l"
    with pytest.raises(ConditioningError, match="SD 1.x"):  # what `luna refine projector=` and the runtime do
        open_projector(out, CropEmbedder(load_vision("tiny")))


def test_clip_l_head_needs_the_clip_l_datasets(tiny_pairs, tmp_path, fast):
    code = main([f"pairs={tiny_pairs}", f"out={tmp_path / 'r'}", "logger=none", "+model.heads=[clip_l]",
                 "model=ridge", *fast])
    assert code == 2


def test_clip_l_weight_weights_the_clip_l_half():
    g = torch.Generator().manual_seed(0)
    pred, target = torch.randn(2, 77, 48, generator=g), torch.randn(2, 77, 48, generator=g)
    n = torch.tensor([10, 77])
    l = metrics.sequence_loss(pred[..., :16], target[..., :16], n, 16)["loss"]  # CLIP-L only: one half
    b = metrics.sequence_loss(pred[..., 16:], target[..., 16:], n, 32)["loss"]
    both = metrics.sequence_loss(pred, target, n, 16)["loss"]
    torch.testing.assert_close(both, (l + b) / 2)  # weight 1: each half counts equally, as before
    torch.testing.assert_close(metrics.sequence_loss(pred, target, n, 16, clip_l_weight=3.0)["loss"], (3 * l + b) / 4)


def test_clip_l_targets_from_disk_are_the_clip_l_datasets(clip_l_pairs):
    """Read per batch from disk (chunk-shuffled runs), the CLIP-L head's targets are /prompts/clip_l_*,
    as in RAM, not the SDXL conditionings stored beside them."""
    from projector.data import PairsDataModule

    kw = dict(batch_size=16, val_prompts=0.25, val_checkpoints=0, targets="clip_l", chunk_rows=4)
    ram, disk = PairsDataModule(str(clip_l_pairs), in_memory=True, **kw), PairsDataModule(str(clip_l_pairs), in_memory=False, **kw)
    ram.setup()
    disk.setup()
    loader = disk.train_dataloader()
    assert type(loader.batch_sampler).__name__ == "ChunkShuffleSampler"
    for b in loader:
        pid = b["prompt"].numpy()
        assert b["cond"].shape[1:] == (77, 16) and b["pooled"].shape[1:] == (16,)
        assert np.array_equal(b["cond"].numpy(), ram.source.cond(pid))
        assert np.array_equal(b["pooled"].numpy(), ram.source.pooled(pid))
    disk.teardown()
    ram.teardown()


def test_clip_l_from_disk_when_the_first_part_stores_no_conditionings(clip_l_pairs, tmp_path):
    """A part whose prompts another part stores has no /prompts/clip_l_* (as `luna extract clip_l=true`
    writes it); sorting first, it must not be where the loader looks for the row shape."""
    import shutil

    from extraction.pairs import Pairs, PairsPart, write_part
    from projector.data import PairsDataModule

    folder = tmp_path / "pairs"
    folder.mkdir()
    shutil.copy(clip_l_pairs / "part-00000.h5", folder / "part-00000.h5")
    with Pairs(clip_l_pairs) as p:
        rows = np.flatnonzero(p.prompt_id < 4)
        images = {"key": np.array([f"again-{p.key[i]}" for i in rows], dtype=object), "embed": p.embed[rows],
                  "prompt_id": p.prompt_id[rows], "checkpoint": np.array([p.checkpoint[i] for i in rows], dtype=object),
                  "category": np.array([p.category[i] for i in rows], dtype=object),
                  "campaign": np.array([p.campaign[i] for i in rows], dtype=object), "seed": p.seed[rows]}
        prompts = {"text": np.array(p.prompt_text[:4], dtype=object), "te_fingerprint": np.array(p.te_fingerprint[:4], dtype=object),
                   "cond_row": np.full(4, -1), "cond": np.zeros((0, 77, sum(p.text_dims))),
                   "pooled": np.zeros((0, int(p.attrs["pooled_dim"])))}
        write_part(folder / "a-stored-elsewhere.h5",
                   PairsPart(images, prompts, {k: p.attrs[k] for k in ("vision_model", "vision_dim", "text_dims", "pooled_dim")}))
    disk = PairsDataModule(str(folder), batch_size=16, val_prompts=0.25, val_checkpoints=0, targets="clip_l",
                           in_memory=False, chunk_rows=4)
    disk.setup()
    assert disk.pairs.parts[0].name == "a-stored-elsewhere.h5"
    with Pairs(clip_l_pairs) as ref:
        for b in disk.train_dataloader():
            pid = b["prompt"].numpy()
            assert b["cond"].shape[1:] == (77, 16)
            np.testing.assert_array_equal(b["cond"].numpy(), ref.clip_l(pid).astype(b["cond"].numpy().dtype))
    disk.teardown()
