"""projector.safetensors + projector.json: round trip, no Lightning at load, clear mismatch errors."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from luna import REPO_ROOT
from projector.data import PairsDataModule
from projector.export import ProjectorLoadError, ProjectorMismatchError, load_projector, save_projector
from projector.module import ProjectorModule

QUERIES = {"_target_": "projector.models.LearnedQueryDecoder", "width": 16, "depth": 1, "heads": 2}
HEAD = {"_target_": "projector.models.PooledHead", "hidden": 16}


@pytest.fixture(scope="module")
def exported(tiny_pairs, tmp_path_factory):
    dm = PairsDataModule(str(tiny_pairs), batch_size=8)
    dm.setup()
    module = ProjectorModule(net=QUERIES, dims=dm.dims, pooled_head=HEAD)
    module.projector.set_stats(dm.stats)
    with torch.no_grad():  # perturb every weight: the round trip must carry all of them
        for p in module.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    folder = tmp_path_factory.mktemp("exported")
    save_projector(module.projector, folder, meta={"te_fingerprints": dm.te_fingerprints, "metrics": {"val/cos_content": 0.5}})
    return module.eval(), folder, dm


def test_round_trip_gives_the_modules_outputs(exported):
    module, folder, dm = exported
    loaded = load_projector(folder / "projector.json", expect_vision_model="synthetic-closed-loop", expect_dim=32)
    x = torch.from_numpy(dm.pairs.embed[:6].astype("float32"))
    with torch.no_grad():
        want, got = module(x), loaded(x)
    torch.testing.assert_close(got[0], want[0], rtol=0, atol=0)
    torch.testing.assert_close(got[1], want[1], rtol=0, atol=0)
    # BOS is copied from the data, never predicted
    assert torch.allclose(got[0][:, 0], torch.as_tensor(dm.stats["bos"]).expand(6, -1))
    config = json.loads((folder / "projector.json").read_text())
    assert config["architecture"]["net"] == QUERIES and config["dims"]["text_dims"] == [16, 32]
    assert config["parameters"] == sum(p.numel() for p in loaded.parameters())


def test_loading_needs_no_lightning_and_no_pickle(exported):
    _, folder, _ = exported
    code = (
        "import sys, torch\n"
        "from projector.export import load_projector\n"
        f"p = load_projector({str(folder)!r})\n"
        "cond, pooled = p(torch.zeros(2, 32))\n"
        "assert cond.shape == (2, 77, 48) and pooled.shape == (2, 16)\n"
        "assert not any(m.split('.')[0] in ('lightning', 'pytorch_lightning', 'hydra') for m in sys.modules), 'imported'\n"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert sorted(p.name for p in folder.iterdir()) == ["projector.json", "projector.safetensors"]


def test_another_vision_model_or_dimension_is_a_clear_error(exported):
    _, folder, _ = exported
    with pytest.raises(ProjectorMismatchError, match="trained on vision model 'synthetic-closed-loop'"):
        load_projector(folder, expect_vision_model="open_clip:ViT-H-14")
    with pytest.raises(ProjectorMismatchError, match="32-d"):
        load_projector(folder, expect_dim=1024)
    with pytest.raises(ProjectorMismatchError, match="width 32"):
        load_projector(folder)(torch.zeros(1, 1024))


def test_a_broken_folder_is_a_clear_error(exported, tmp_path):
    _, folder, _ = exported
    with pytest.raises(ProjectorLoadError, match="not a projector folder"):
        load_projector(tmp_path)
    config = json.loads((folder / "projector.json").read_text())
    (tmp_path / "projector.safetensors").write_bytes((folder / "projector.safetensors").read_bytes())
    (tmp_path / "projector.json").write_text(json.dumps({**config, "format_version": 99}))
    with pytest.raises(ProjectorLoadError, match="format_version 99"):
        load_projector(tmp_path)
    wrong = {**config, "architecture": {**config["architecture"], "net": {**QUERIES, "width": 32}}}
    (tmp_path / "projector.json").write_text(json.dumps(wrong))
    with pytest.raises(ProjectorLoadError, match="do not match"):
        load_projector(tmp_path)
