"""`luna make-toy`: same seed -> same weights (also across a resume); the files are SDXL checkpoints
the inventory sorts into two text-encoder families, and load back through the project's loader."""
from __future__ import annotations

import hashlib

import pytest
import torch

from luna.models.toy import train
from luna.models.toy.make_toy import main

STAGES = {name: train.StageConfig(steps=2, batch=2, lr=1e-3) for name in train.STAGES}
CLI_STAGES = "stages={" + ",".join(f"{n}:{{steps:2,batch:2,lr:0.001}}" for n in train.STAGES) + "}"


def _weights_hash(path) -> str:
    """sha256 of every tensor's name, dtype, shape and bytes in name order (safetensors writes its
    metadata map in an arbitrary order, so the file bytes may differ for equal weights)."""
    from safetensors.torch import load_file

    h = hashlib.sha256()
    for name, t in sorted(load_file(str(path)).items()):
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _hashes(folder) -> dict[str, str]:
    return {p.name: _weights_hash(p) for p in sorted(folder.glob("*.safetensors"))}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One uninterrupted run, and one that stops after the VAE and is continued by a second call."""
    root = tmp_path_factory.mktemp("toy")
    train.make_toy(root / "a", root / "a" / "out", seed=7, stages=STAGES, pool_size=8, threads=1)
    assert train.make_toy(root / "b", root / "b" / "out", seed=7, stages=STAGES, pool_size=8, only=["vae"]) == []
    assert (root / "b" / "vae.pt").is_file() and not (root / "b" / "base.pt").exists()
    train.make_toy(root / "b", root / "b" / "out", seed=7, stages=STAGES, pool_size=8)
    return root


def test_same_seed_same_weights_across_a_resume(trained):
    a, b = _hashes(trained / "a" / "out"), _hashes(trained / "b" / "out")
    assert set(a) == {"toy-base-flat.safetensors", "toy-pony-outline.safetensors", "luna-toy-vit.safetensors"}
    assert a == b


def test_another_seed_gives_other_weights(trained, tmp_path):
    train.make_toy(tmp_path, tmp_path / "out", seed=8, stages=STAGES, pool_size=8, only=["vae"])
    seed7 = torch.load(trained / "a" / "vae.pt", weights_only=False)["modules"]["vae"]
    seed8 = torch.load(tmp_path / "vae.pt", weights_only=False)["modules"]["vae"]
    assert any(not torch.equal(seed7[k], seed8[k]) for k in seed7)


def test_outputs_are_sdxl_in_two_families(trained):
    from factory.inventory import merge, scan_folders
    from luna.models.sdxl import detect_architecture

    out = trained / "a" / "out"
    for name in ("toy-base-flat", "toy-pony-outline"):
        info = detect_architecture(out / f"{name}.safetensors")
        assert info.is_sdxl and info.size == "toy", info
    inv = merge([scan_folders([str(out)], node="pc1")])
    fams = {c.name: c.family for c in inv.checkpoints}
    # pony from the file name; a freshly trained base has no evidence of its own (its fingerprint is new, not in
    # conf/families.yaml, which names the committed toy weights' encoders), so the inventory says unknown
    assert fams == {"toy-base-flat": "unknown", "toy-pony-outline": "pony"}
    assert len({c.te_fingerprint for c in inv.checkpoints}) == 2


def test_export_loads_back_identically(trained):
    from safetensors.torch import load_file

    from luna.models.convert import pipeline_to_original
    from luna.models.toy import models

    out = trained / "a" / "out"
    pipe = models.load_pipeline("toy-base-flat", folder=out)
    assert pipe.vae.config.scaling_factor == train.SCALING_FACTOR
    stored = load_file(str(out / "toy-base-flat.safetensors"))
    again = pipeline_to_original(pipe)
    assert set(stored) == set(again)
    assert all(torch.equal(stored[k].float(), again[k].float()) for k in stored)
    tower = models.load_vision(weights=out / "luna-toy-vit.safetensors")
    assert tower.dim == 32 and tower.image_size == 32


def test_cli_rejects_an_unknown_stage(tmp_path, capsys):
    assert main([f"work={tmp_path}", "only=[unet]", CLI_STAGES]) == 2
    assert "only=['unet']" in capsys.readouterr().err


def test_make_toy_refuses_a_cuda_device_it_does_not_have(tmp_path, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match="device='cuda'"):
        train.make_toy(tmp_path, tmp_path / "out", seed=8, stages=STAGES, pool_size=8, only=["vae"], device="cuda")
    assert not (tmp_path / "vae.pt").exists()


def test_make_toy_takes_auto_and_names_a_bad_device(tmp_path, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match="device='gpu0'"):
        train.make_toy(tmp_path / "a", tmp_path / "a" / "out", seed=8, stages=STAGES, pool_size=8, only=["vae"], device="gpu0")
    train.make_toy(tmp_path / "b", tmp_path / "b" / "out", seed=8, stages=STAGES, pool_size=8, only=["vae"], device="auto")
    assert train.DEVICE == torch.device("cpu") and (tmp_path / "b" / "vae.pt").is_file()


def test_render_workers_draw_the_same_batches_so_the_same_weights(trained, tmp_path):
    """Batches rendered ahead by worker processes are the ones the step would draw itself: the vae and
    vision stages (the ones that render per step) give the same files as the run without workers."""
    root = trained
    out = tmp_path / "w" / "out"
    train.make_toy(tmp_path / "w", out, seed=7, stages=STAGES, pool_size=8, threads=1, render_workers=2)
    assert train.RENDER_WORKERS == 2
    assert _hashes(out) == _hashes(root / "a" / "out")


def test_prefetch_serves_steps_in_order_and_after_a_jump():
    import functools

    p = train.Prefetch(functools.partial(pow, exp=2), workers=1, ahead=3)  # picklable: it runs in a worker
    try:
        assert [p(i) for i in range(5)] == [0, 1, 4, 9, 16]
        assert p(10) == 100 and p(2) == 4  # a resumed stage asks from elsewhere
    finally:
        p.close()
    assert p.pool is None
