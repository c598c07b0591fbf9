"""Fixtures of the projector tests: one tiny closed-loop pairs set, small model overrides."""
from __future__ import annotations

import pytest
import torch

from projector.synthetic import write_closed_loop_pairs

# small everything: the suite runs on 2 shared CPU cores
SMALL_QUERIES = ["model.width=16", "model.depth=1", "model.heads=2", "model.memory_tokens=2"]
FAST = [
    "pooled_head.hidden=16", "data.batch_size=16", "data.num_workers=0", "data.knn_max_queries=64",
    "trainer.accelerator=cpu", "trainer.enable_progress_bar=false", "+trainer.enable_model_summary=false",
    "trainer.log_every_n_steps=1", "optim.warmup_steps=2",
]


@pytest.fixture
def fast() -> list[str]:
    return list(FAST)


@pytest.fixture
def small_queries() -> list[str]:
    return list(SMALL_QUERIES)


@pytest.fixture(autouse=True)
def one_thread():
    """Two threads on two cores shared with other processes spin far more than they compute."""
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)


@pytest.fixture(scope="session")
def tiny_pairs(tmp_path_factory):
    """40 prompts x 3 checkpoints, 32-d embeddings with 5 vision tokens, conditionings [77, 16+32], 2 parts."""
    folder = tmp_path_factory.mktemp("projector") / "pairs"
    return write_closed_loop_pairs(folder, n_prompts=40, checkpoints=("ckpt_a", "ckpt_b", "ckpt_c"),
                                   dim=32, text_dims=(16, 32), pooled_dim=16, tokens=(5, 16), parts=2, seed=3)
