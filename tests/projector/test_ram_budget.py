"""`data.max_ram_gb: auto`: conditionings go in RAM when half the machine's available memory holds them."""
from __future__ import annotations

import pytest

from extraction.synthetic import write_synthetic_pairs
from projector import data as pdata
from projector.data import PairsDataError, PairsDataModule, ram_budget_gb


def test_auto_is_half_the_available_memory_shared_by_the_local_processes(monkeypatch):
    monkeypatch.setattr(pdata, "available_ram_gb", lambda: 40.0)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    assert ram_budget_gb("auto") == 20.0
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    assert ram_budget_gb("AUTO") == 5.0
    assert ram_budget_gb(8) == 8.0 and ram_budget_gb("2.5") == 2.5


@pytest.mark.parametrize("bad", ["lots", -1, None])
def test_bad_values_name_the_key(bad):
    with pytest.raises(PairsDataError, match="data.max_ram_gb="):
        ram_budget_gb(bad)


def test_available_memory_is_read():
    assert ram_budget_gb("auto") > 0


@pytest.mark.parametrize("available, in_ram", [(64.0, True), (1e-6, False)])
def test_the_auto_budget_decides_where_conditionings_live(tmp_path, monkeypatch, available, in_ram):
    monkeypatch.setattr(pdata, "available_ram_gb", lambda: available)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    folder = write_synthetic_pairs(tmp_path / "pairs", 64, 32, 16, text_dims=(8, 8), pooled_dim=8)
    dm = PairsDataModule(str(folder), batch_size=8, val_checkpoints=0, stats_prompts=16, knn_max_queries=8)
    dm.setup()
    assert dm.source.in_memory is in_ram
    assert len(next(iter(dm.train_dataloader()))["x"]) == 8
    dm.teardown()


@pytest.mark.parametrize("available, cuda, cores, expected", [
    (64.0, True, 16, 0),     # in RAM: a worker would only copy between processes
    (1e-6, False, 16, 0),    # from disk on the CPU: the step needs the cores
    (1e-6, True, 16, 8),     # from disk for a GPU: reading overlaps the step
    (1e-6, True, 4, 2),
])
def test_auto_loader_workers(tmp_path, monkeypatch, available, cuda, cores, expected):
    import os

    import torch

    monkeypatch.setattr(pdata, "available_ram_gb", lambda: available)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    folder = write_synthetic_pairs(tmp_path / "pairs", 64, 32, 16, text_dims=(8, 8), pooled_dim=8)
    dm = PairsDataModule(str(folder), batch_size=8, val_checkpoints=0, stats_prompts=16, knn_max_queries=8,
                         num_workers="auto")
    dm.setup()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(cores)), raising=False)
    assert dm.loader_workers() == expected
    dm.num_workers = 3
    assert dm.loader_workers() == 3


def test_bad_num_workers_names_the_key(tmp_path):
    with pytest.raises(PairsDataError, match="data.num_workers="):
        PairsDataModule(str(tmp_path), num_workers="many")
