"""`luna train` end to end: every experiment config, resume, W&B run ids, export, DDP, Optuna."""
from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from luna import CONF_DIR, REPO_ROOT
from projector.cli import main
from projector.export import load_projector
from projector.module import ProjectorModule

EXPERIMENTS = sorted(p.stem for p in (CONF_DIR / "experiment").glob("*.yaml"))


def test_every_experiment_config_composes_and_runs(tiny_pairs, tmp_path, fast):
    """`-m experiment=glob(*)`: each experiment config in conf/experiment/ trains one batch (fast_dev_run)
    and exports a projector that loads and answers in the data's shapes."""
    out = tmp_path / "sweep"
    code = main(["-m", "experiment=glob(*)", f"pairs={tiny_pairs}", f"out={out}", "logger=none",
                 "++trainer.fast_dev_run=true", *fast])
    assert code == 0
    ran = {}
    for job in sorted(p for p in (out / "multirun").iterdir() if p.is_dir()):
        overrides = yaml.safe_load((job / ".hydra" / "overrides.yaml").read_text())
        name = next(o.split("=", 1)[1] for o in overrides if o.startswith("experiment="))
        ran[name] = load_projector(job)
    assert sorted(ran) == EXPERIMENTS and len(EXPERIMENTS) >= 4
    for name, projector in ran.items():
        tokens = projector.dims["input"] == "tokens"
        x = torch.randn(3, 5, 16) if tokens else torch.randn(3, 32)
        cond, pooled = projector(x)
        assert cond.shape == (3, 77, 48) and pooled.shape == (3, 16), name
        assert torch.isfinite(cond).all() and torch.isfinite(pooled).all(), name


def _trained(out: Path) -> dict:
    return json.loads((out / "projector.json").read_text())["trained"]


def test_resume_continues_steps_and_wandb_run_and_export_matches_checkpoint(tiny_pairs, tmp_path, fast, small_queries):
    out = tmp_path / "run"
    args = [f"pairs={tiny_pairs}", f"out={out}", "experiment=projector_queries", "logger=wandb", *fast, *small_queries]
    assert main([*args, "trainer.max_epochs=1"]) == 0
    first_steps, run_id = _trained(out)["global_step"], (out / "wandb_run_id").read_text()
    assert first_steps > 0 and (out / "checkpoints" / "last.ckpt").is_file()

    assert main([*args, "trainer.max_epochs=2", "ckpt_path=last"]) == 0
    assert _trained(out)["global_step"] == 2 * first_steps  # resumed: one more epoch, not two
    assert (out / "wandb_run_id").read_text() == run_id
    runs = sorted(p.name for p in (out / "wandb").glob("offline-run-*"))
    assert runs and all(re.search(rf"-{run_id}(-\d+)?$", r) for r in runs)  # offline run files of one W&B run

    # the exported projector computes what the Lightning module restored from last.ckpt computes
    ckpt = torch.load(out / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    module = ProjectorModule(**ckpt["hyper_parameters"])
    module.load_state_dict(ckpt["state_dict"])
    module.eval()
    exported = load_projector(out)
    x = torch.randn(4, 32) * 2
    with torch.no_grad():
        want, got = module(x), exported(x)
    torch.testing.assert_close(got[0], want[0])
    torch.testing.assert_close(got[1], want[1])
    config = json.loads((out / "projector.json").read_text())
    assert config["vision_model"] == "synthetic-closed-loop" and config["te_fingerprints"] == ["te-synthetic"]
    assert {"val/cos_content", "val/cos_pad", "val/cos_pooled", "val/cos_shuffled", "val/r_at_1",
            "val/knn_cos", "val_ckpt/cos_content"} <= set(config["metrics"])
    assert len(config["normalisation"]["cond_std"]) == 48


def test_user_errors_are_one_line_without_traceback(tiny_pairs, tmp_path, fast, capsys):
    code = main([f"pairs={tiny_pairs}", f"out={tmp_path / 'empty'}", "ckpt_path=last", "logger=none", *fast])
    err = capsys.readouterr().err
    assert code == 2 and "ckpt_path=last: no " in err and "Traceback" not in err
    code = main([f"pairs={tmp_path / 'nowhere'}", f"out={tmp_path / 'o'}", "logger=none", *fast])
    err = capsys.readouterr().err
    assert code == 2 and "nowhere" in err and "Traceback" not in err


def _ddp_train(pairs, out, *overrides) -> None:
    """`luna train` as conf/trainer/ddp_lan.yaml on one machine: two CPU processes over gloo, one epoch."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO_ROOT), "WANDB_MODE": "offline"}
    cmd = [sys.executable, "-m", "projector.cli", f"pairs={pairs}", f"out={out}", "experiment=projector_queries",
           "logger=csv", "trainer=ddp_lan", "trainer.accelerator=cpu", "trainer.devices=2", "trainer.num_nodes=1",
           "trainer.strategy.process_group_backend=gloo", "trainer.max_epochs=1", *overrides]
    proc = subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_two_process_ddp_on_cpu_with_gloo(tiny_pairs, tmp_path, fast, small_queries):
    """conf/trainer/ddp_lan.yaml on one machine, two CPU processes over gloo: each rank takes half the data."""
    from projector.data import PairsDataModule

    out = tmp_path / "ddp"
    _ddp_train(tiny_pairs, out, *fast, *small_queries)
    dm = PairsDataModule(str(tiny_pairs))
    dm.setup()
    per_rank = math.ceil(len(dm.splits["train"]) / 2)
    assert _trained(out)["global_step"] == math.ceil(per_rank / 16)
    assert "val/cos_content" in json.loads((out / "projector.json").read_text())["metrics"]


def test_two_process_ddp_from_disk_shares_the_chunk_shuffled_epoch(tiny_pairs, tmp_path, fast, small_queries):
    """Conditionings read per batch (ChunkShuffleSampler) under two DDP processes: each rank takes half
    the epoch's batches, in lock-step (Lightning re-created the sampler as ChunkShuffleSampler(DistributedSampler)
    and ran one batch of one row a rank); the export records how the pairs were split."""
    from projector.data import PairsDataModule

    out = tmp_path / "ddp_disk"
    _ddp_train(tiny_pairs, out, "data.in_memory=false", "data.chunk_rows=4", "data.te_fingerprint=te-synthetic",
               *fast, *small_queries)
    dm = PairsDataModule(str(tiny_pairs))
    dm.setup()
    batches = math.ceil(len(dm.splits["train"]) / 16)
    assert _trained(out)["global_step"] == math.ceil(batches / 2)
    assert _trained(out)["data"] == {"te_fingerprint": "te-synthetic", "val_prompts": 0.1, "val_checkpoints": 1,
                                     "val_combinations": [], "seed": 0}


def test_optuna_sweep_persists_its_study(tiny_pairs, tmp_path, fast):
    import optuna

    out = tmp_path / "optuna"
    args = [f"pairs={tiny_pairs}", f"out={out}", "experiment=projector_queries", "hparams_search=projector_optuna",
            "logger=none", "callbacks=none", "export=false", "++trainer.fast_dev_run=true", *fast]
    assert main([*args, "hydra.sweeper.n_trials=2"]) == 0
    assert main([*args, "hydra.sweeper.n_trials=1"]) == 0  # the same study, one more trial
    study = optuna.load_study(study_name="projector", storage=f"sqlite:///{out}/optuna.db")
    values = [t.value for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert len(values) == 3 and all(np.isfinite(v) for v in values)


@pytest.mark.parametrize("debug", ["default", "fdr"])
def test_debug_group_runs_quickly_and_writes_no_export(tiny_pairs, tmp_path, fast, small_queries, debug):
    from luna.cli import compose

    cfg = compose("train", [f"debug={debug}"], {"pairs": str(tiny_pairs), "out": str(tmp_path)})
    assert cfg.trainer.accelerator == "cpu" and not cfg.logger and cfg.export is False
    assert cfg.trainer.get("fast_dev_run", False) == (debug == "fdr")
    out = tmp_path / debug
    assert main([f"pairs={tiny_pairs}", f"out={out}", f"debug={debug}", *small_queries, "pooled_head.hidden=16"]) == 0
    assert not (out / "projector.safetensors").exists() and not (out / "wandb").exists()
