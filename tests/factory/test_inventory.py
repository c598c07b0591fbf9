"""The cluster inventory's merge across nodes, without Ray: scan_folders per node, then merge."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from factory.inventory import merge, scan_folders


@pytest.fixture(scope="module")
def one_model(tmp_path_factory):
    """tiny-base-0 written twice by the same code: a single file and a diffusers folder of one model."""
    from luna.models import tiny

    out = tmp_path_factory.mktemp("one_model")
    tiny.write_checkpoints(out, n=1)
    return out


def test_file_on_one_node_and_folder_on_another_is_one_checkpoint(one_model):
    pc1 = scan_folders([one_model / "single"], "pc1", cache=False)
    pc2 = scan_folders([one_model / "diffusers"], "pc2", cache=False)
    (a,), (b,) = pc1["found"], pc2["found"]
    assert a["fingerprint"] != b["fingerprint"]  # other bytes on disk ...
    assert a["model_id"] == b["model_id"]  # ... the same model
    for results in ([pc1, pc2], [pc2, pc1]):
        inv = merge(results)
        (c,) = inv.checkpoints
        assert c.name == "tiny-base-0" and c.nodes == ["pc1", "pc2"]
        assert c.paths == {"pc1": a["path"], "pc2": b["path"]}
        assert Path(c.paths["pc1"]).is_file() and Path(c.paths["pc2"]).is_dir()
        assert c.formats == {"pc1": "single_file", "pc2": "diffusers"}
        # the single file's facts, whichever node holds it: a stable identity for the plan
        assert c.fingerprint == a["fingerprint"] and c.format == "single_file" and c.model_id == a["model_id"]
        assert not inv.rejected


def test_folder_on_the_first_node_still_takes_the_single_files_facts(one_model):
    inv = merge([scan_folders([one_model / "diffusers"], "pc1", cache=False),
                 scan_folders([one_model / "single"], "pc2", cache=False)])
    (c,) = inv.checkpoints
    assert c.formats == {"pc1": "diffusers", "pc2": "single_file"} and c.format == "single_file"


def test_both_formats_on_each_node_is_still_one_checkpoint(one_model):
    inv = merge([scan_folders([one_model], node, cache=False) for node in ("pc1", "pc2")])
    (c,) = inv.checkpoints
    # on each node the single file is kept and the folder skipped as its duplicate
    assert c.formats == {"pc1": "single_file", "pc2": "single_file"}
    assert sorted(r.node for r in inv.rejected) == ["pc1", "pc2"]
    assert all("same model as" in r.reason for r in inv.rejected)


def test_different_models_across_nodes_stay_apart(tiny_dir):
    pc1 = scan_folders([tiny_dir / "single"], "pc1", cache=False)
    pc2 = scan_folders([tiny_dir / "diffusers"], "pc2", cache=False)
    assert len(pc1["found"]) == len(pc2["found"]) == 2
    assert len({x["model_id"] for x in pc1["found"]}) == 2
    inv = merge([pc1, pc2])
    assert sorted(c.name for c in inv.checkpoints) == ["tiny-base-0", "tiny-pony-1"]
    for c in inv.checkpoints:
        assert c.nodes == ["pc1", "pc2"]
        assert Path(c.paths["pc1"]).stem == Path(c.paths["pc2"]).name == c.name
    # one model per node, different models: two checkpoints, each on its own node only
    base = dict(pc1, found=[x for x in pc1["found"] if x["name"] == "tiny-base-0"])
    pony = dict(pc2, found=[x for x in pc2["found"] if x["name"] == "tiny-pony-1"])
    inv = merge([base, pony])
    assert {(c.name, tuple(c.nodes)) for c in inv.checkpoints} == {("tiny-base-0", ("pc1",)), ("tiny-pony-1", ("pc2",))}


def test_a_merged_unet_lora_is_another_model(one_model, tmp_path):
    """Same text encoders, norms and biases; every row of one UNet weight changed (as a merged LoRA does)."""
    from safetensors.torch import load_file, save_file

    src = one_model / "single" / "tiny-base-0.safetensors"
    state = load_file(str(src))
    key = next(k for k, v in state.items() if k.startswith("model.diffusion_model.") and v.ndim == 2)
    state[key] = state[key] + 0.01 * torch.ones_like(state[key])
    (tmp_path / "pc2").mkdir()
    save_file(state, str(tmp_path / "pc2" / "tiny-base-0.safetensors"))
    pc1 = scan_folders([one_model / "single"], "pc1", cache=False)
    pc2 = scan_folders([tmp_path / "pc2"], "pc2", cache=False)
    assert pc1["found"][0]["te_fingerprint"] == pc2["found"][0]["te_fingerprint"]
    assert pc1["found"][0]["model_id"] != pc2["found"][0]["model_id"]
    inv = merge([pc1, pc2])
    assert sorted(tuple(c.nodes) for c in inv.checkpoints) == [("pc1",), ("pc2",)]
