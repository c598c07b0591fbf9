"""Quality on a closed loop: the conditioning is a known nonlinear function of the image embedding
plus noise; on held-out prompts the learned-query decoder beats ridge and the seed MLP, and all
three beat the shuffled-target baseline."""
from __future__ import annotations

import json

import pytest
from hydra import compose, initialize_config_dir

from luna import CONF_DIR
from projector.cli import train
from projector.synthetic import write_closed_loop_pairs

COMMON = [
    "logger=none", "callbacks=none", "data.num_workers=0", "data.val_checkpoints=0",
    "data.val_prompts=0.25", "data.batch_size=16", "data.knn_max_queries=64", "trainer.accelerator=cpu",
    "trainer.enable_progress_bar=false", "+trainer.enable_model_summary=false", "pooled_head.hidden=64",
    "optim.warmup_steps=20", "seed=0",
]
MODELS = {
    "ridge": ["experiment=projector_ridge"],
    "seed_mlp": ["experiment=projector_seed_mlp", "model.hidden=[64,128]", "trainer.max_epochs=20", "optim.lr=1e-3"],
    "queries": ["experiment=projector_queries", "model.width=48", "model.depth=1", "model.heads=4",
                "trainer.max_epochs=20", "optim.lr=2e-3"],
}


@pytest.fixture(scope="module")
def closed_loop(tmp_path_factory):
    # 160 prompts x 2 checkpoints; 32-d embeddings; conditioning 77 x (32 + 64) of rank 8, strong target noise
    return write_closed_loop_pairs(tmp_path_factory.mktemp("quality") / "pairs", n_prompts=160, checkpoints=("a", "b"),
                                   dim=32, text_dims=(32, 64), pooled_dim=16, rank=8, cond_noise=1.0, seed=1)


def test_learned_queries_beat_ridge_and_seed_mlp_on_held_out_prompts(closed_loop, tmp_path):
    found = {}
    for name, overrides in MODELS.items():
        with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
            cfg = compose("train", overrides=[f"pairs={closed_loop}", f"out={tmp_path / name}", *COMMON, *overrides])
        objective = train(cfg)
        found[name] = json.loads((tmp_path / name / "projector.json").read_text())["metrics"]
        assert objective == found[name]["val/cos_content"]
    cos = {k: v["val/cos_content"] for k, v in found.items()}
    assert cos["queries"] > cos["seed_mlp"] and cos["queries"] > cos["ridge"], cos
    for name, m in found.items():
        assert m["val/cos_content"] > m["val/cos_shuffled"] + 0.1, (name, m)
    assert found["queries"]["val/r_at_1"] >= found["seed_mlp"]["val/r_at_1"]
