"""Services and secrets: the vault service answers concurrent clients exactly like the in-process
vault; Ray's dashboard and the service stay on the loopback unless configured; no API key reaches
a log or a record; training killed mid-epoch resumes the same run from `last`."""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[2]
SECRET = "luna-fake-wandb-key-7f3c9a1e5b2d4c6f8a0b1c2d3e4f5a6b"  # 40+ chars, like a real W&B key


def _files_holding(root: Path, needle: str) -> list[str]:
    """Every file under root (hidden folders included) whose bytes contain `needle`."""
    hits = []
    for p in sorted(root.rglob("*")):
        if p.is_file() and not p.is_symlink():
            try:
                if needle.encode() in p.read_bytes():
                    hits.append(str(p.relative_to(root)))
            except OSError:
                pass
    return hits


# ------------------------------------------------------------------------------ vault service load

def test_vault_service_under_concurrent_clients_answers_like_the_vault(ray_cluster, tmp_path):
    from extraction.synthetic import synthetic_encode, write_synthetic_pairs
    from vault.build import build_vault
    from vault.query import Vault
    from vault.service import VaultClient, serve, stop

    dim = 16
    pairs = write_synthetic_pairs(tmp_path / "p", 600, 60, dim, parts=2)
    build_vault(pairs, tmp_path / "v", index="HNSW16")
    build_vault(pairs, tmp_path / "vp", index="HNSW16", mode="prompts")
    local, local_p = Vault.open(tmp_path / "v"), Vault.open(tmp_path / "vp")
    kwargs = [{}, {"category": "auto", "weighting": "softmax"}, {"filters": {"checkpoint": "ckpt_b"}},
              {"category": "eyes"}]
    n_threads, per_thread = 4, 6
    rng = np.random.default_rng(0)
    queries = [[rng.standard_normal((1 + (t + i) % 3, dim)).astype(np.float32) for i in range(per_thread)]
               for t in range(n_threads)]
    expected = {}
    for t in range(n_threads):
        for i, q in enumerate(queries[t]):
            kw = kwargs[(t + i) % len(kwargs)]
            expected[t, i] = (local_p if i % 3 == 2 else local).query(
                q, k=5, **kw, **({"encode": synthetic_encode} if i % 3 == 2 else {}))
    got, errors = {}, []
    try:
        serve(tmp_path / "v", name="rel-vault", num_cpus=0, load_vision=False, max_concurrency=4)
        serve(tmp_path / "vp", name="rel-vault-p", num_cpus=0, load_vision=False, max_concurrency=4)

        def client(t: int) -> None:
            try:
                stored, prompts = VaultClient("rel-vault"), VaultClient("rel-vault-p")
                for i, q in enumerate(queries[t]):
                    kw = kwargs[(t + i) % len(kwargs)]
                    if i % 3 == 2:  # prompts-only service: the client re-encodes with its own encoder
                        got[t, i] = prompts.query(q, k=5, encode=synthetic_encode, **kw)
                    else:
                        got[t, i] = stored.query(q, k=5, **kw)
            except Exception as e:  # noqa: BLE001 - reported below with the thread number
                errors.append((t, repr(e)))

        threads = [threading.Thread(target=client, args=(t,)) for t in range(n_threads)]
        for th in threads:
            th.start()
        for th in threads:
            th.join(timeout=240)
        assert not any(th.is_alive() for th in threads), "a client thread hung"
    finally:
        stop("rel-vault")
        stop("rel-vault-p")
    assert not errors, errors
    assert set(got) == set(expected)  # every query answered
    for key, want in expected.items():
        have = got[key]
        assert have.neighbours == want.neighbours, key
        np.testing.assert_allclose(have.cond.numpy(), want.cond.numpy(), rtol=0, atol=1e-6, err_msg=str(key))
        np.testing.assert_allclose(have.pooled.numpy(), want.pooled.numpy(), rtol=0, atol=1e-6, err_msg=str(key))


# ------------------------------------------------------------------------------ loopback binding

class _FakeRay:
    """Records ray.init calls instead of starting Ray."""

    def __init__(self, monkeypatch, fail_auto: bool = False):
        import ray

        self.calls: list[dict] = []
        self.fail_auto = fail_auto
        monkeypatch.setattr(ray, "is_initialized", lambda: False)
        monkeypatch.setattr(ray, "init", self.init)
        monkeypatch.setattr(ray, "nodes", lambda: [{"Alive": True, "NodeID": "n0", "NodeManagerHostname": "h",
                                                    "Resources": {"CPU": 1.0, "luna_node:pc1": 1.0}}])

    def init(self, address=None, **kw):
        self.calls.append({"address": address, **kw})
        if self.fail_auto and address == "auto":
            raise ConnectionError("no cluster")


def test_ray_dashboard_is_off_or_on_the_loopback_unless_configured(monkeypatch):
    from omegaconf import OmegaConf

    from luna.cluster import connect
    from luna import CONF_DIR

    local = OmegaConf.to_container(OmegaConf.load(CONF_DIR / "cluster" / "local.yaml"))
    lan = OmegaConf.to_container(OmegaConf.load(CONF_DIR / "cluster" / "lan.yaml"))
    assert local["include_dashboard"] is False and local["dashboard_host"] == "127.0.0.1"
    assert lan["include_dashboard"] is False
    fake = _FakeRay(monkeypatch)
    connect(local)  # the default of `luna factory` and `luna extract cluster=local`
    connect(None)
    connect({**local, "include_dashboard": True})
    connect({**local, "include_dashboard": True, "dashboard_host": None})
    connect({**local, "include_dashboard": True, "dashboard_host": "0.0.0.0"})  # the user's explicit choice
    connect(lan)
    c = fake.calls
    assert c[0]["include_dashboard"] is False and "dashboard_host" not in c[0] and c[0]["address"] == "local"
    assert c[1]["include_dashboard"] is False and "dashboard_host" not in c[1]
    assert c[2]["include_dashboard"] is True and c[2]["dashboard_host"] == "127.0.0.1"
    assert c[3]["dashboard_host"] == "127.0.0.1"
    assert c[4]["dashboard_host"] == "0.0.0.0"
    assert c[5]["include_dashboard"] is False and c[5]["address"] == "auto"


def test_vault_serve_starts_ray_without_a_dashboard_and_opens_no_port(monkeypatch, tmp_path):
    import time
    import types

    import vault.cli as vault_cli
    import vault.service as service

    fake = _FakeRay(monkeypatch, fail_auto=True)
    monkeypatch.setattr(service, "serve", lambda *a, **kw: (None, {"count": 1, "mode": "stored", "vision_model": "m",
                                                                   "vision_error": None}))
    stopped = []
    monkeypatch.setattr(service, "stop", lambda *a, **kw: stopped.append(a) or True)

    def interrupt(_s):
        raise KeyboardInterrupt

    # only the CLI's own clock: Ray's threads in this process keep the real time.sleep
    monkeypatch.setattr(vault_cli, "time", types.SimpleNamespace(sleep=interrupt, perf_counter=time.perf_counter,
                                                                 time=time.time))
    assert vault_cli.main(["serve", f"vault={tmp_path}"]) == 0
    assert [c["address"] for c in fake.calls] == ["auto", None]
    assert fake.calls[1].get("include_dashboard") is False and "dashboard_host" not in fake.calls[1]
    assert stopped  # Ctrl-C stops the service it started
    # the service is a Ray actor: it is reached through Ray only and binds no socket of its own
    src = Path(service.__file__).read_text()
    assert "socket" not in src and "bind(" not in src and "HTTPServer" not in src


# ------------------------------------------------------------------------------ secrets in logs

FACTORY_CAMPAIGN = """\
campaign: secrettest
wildcards:
  color: [blue eyes, green eyes]
jobs:
  eyes: {quota: 2, templates: ["closeup of __color__"]}
sampler: {steps: 1, cfg: 2.0, scheduler: euler, width: 64, height: 64, batch_size: 2}
seed: 7
"""


def test_no_secret_in_any_factory_log_or_record(ray_cluster, tiny_dir, tmp_path, monkeypatch, capsys):
    """`luna factory` with WANDB_API_KEY (and a secret-looking variable) in its environment: the secret is in
    no file of the output folder (shards, stats, Hydra's .hydra records) and nowhere in its output."""
    from factory.cli import main
    from factory.shards import complete_shards

    monkeypatch.setenv("WANDB_API_KEY", SECRET)
    monkeypatch.setenv("LUNA_TEST_TOKEN", SECRET)
    camp = tmp_path / "secrettest.yaml"
    camp.write_text(FACTORY_CAMPAIGN)
    out = tmp_path / "out"
    code = main([f"campaign_file={camp}", f"out={out}", f"checkpoints.node_dirs={{pc1:[{tiny_dir / 'single'}]}}",
                 "workers.device=cpu", "progress=false", "quality.max_attempts=1"])
    captured = capsys.readouterr()
    assert code == 0, captured.err[-2000:]
    from factory.shards import read_shard

    assert sum(1 for t in complete_shards(out / "shards", "secrettest") for _ in read_shard(t)) == 2
    assert (out / ".hydra").is_dir() and list((out / ".hydra").rglob("config.yaml"))
    assert _files_holding(out, SECRET) == []
    assert SECRET not in captured.out and SECRET not in captured.err


KILL_CHILD = textwrap.dedent(
    """
    import os, signal, sys
    import torch
    torch.set_num_threads(1)
    from projector.module import ProjectorModule

    real = ProjectorModule.training_step

    def step_then_die(self, batch, batch_idx):
        # epoch 0 ended (last.ckpt saved on its validation); die in the middle of epoch 1
        if self.current_epoch == 1 and batch_idx == 1:
            os.kill(os.getpid(), signal.SIGKILL)
        return real(self, batch, batch_idx)

    ProjectorModule.training_step = step_then_die
    from projector.cli import main
    sys.exit(main(sys.argv[1:]))
    """
)


def test_training_killed_mid_epoch_resumes_the_same_run_and_logs_no_secret(tmp_path):
    """SIGKILL in epoch 2 of `luna train` (W&B offline, WANDB_API_KEY set), then `ckpt_path=last`: the
    step count continues to what an uninterrupted run reaches, the W&B run id is the same, and the
    key is in no file of the run folder (Hydra records, W&B run files, checkpoints, export)."""
    import json

    from projector.synthetic import write_closed_loop_pairs

    pairs = write_closed_loop_pairs(tmp_path / "pairs", n_prompts=24, checkpoints=("ckpt_a", "ckpt_b"), dim=16,
                                    text_dims=(8, 16), pooled_dim=8, parts=1, seed=1)
    out = tmp_path / "run"
    args = [f"pairs={pairs}", f"out={out}", "experiment=projector_queries", "logger=wandb",
            "model.width=16", "model.depth=1", "model.heads=2", "model.memory_tokens=2", "pooled_head.hidden=16",
            "data.batch_size=8", "data.num_workers=0", "data.knn_max_queries=16", "trainer.accelerator=cpu",
            "trainer.enable_progress_bar=false", "+trainer.enable_model_summary=false",
            "trainer.log_every_n_steps=1", "optim.warmup_steps=2", "trainer.max_epochs=2"]
    env = {**os.environ, "PYTHONPATH": str(REPO), "WANDB_MODE": "offline", "WANDB_API_KEY": SECRET,
           "OMP_NUM_THREADS": "1", "WANDB_SILENT": "true"}
    killed = subprocess.run([sys.executable, "-c", KILL_CHILD, *args], cwd=REPO, env=env, capture_output=True,
                            text=True, timeout=300)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    assert (out / "checkpoints" / "last.ckpt").is_file() and not (out / "projector.json").exists()
    run_id = (out / "wandb_run_id").read_text()
    import torch

    steps_per_epoch = torch.load(out / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)["global_step"]
    assert steps_per_epoch > 1

    resumed = subprocess.run([sys.executable, "-m", "luna.cli", "train", *args, "ckpt_path=last"], cwd=REPO, env=env,
                             capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    trained = json.loads((out / "projector.json").read_text())["trained"]
    assert trained["global_step"] == 2 * steps_per_epoch  # continued, not restarted, not double-counted
    assert (out / "wandb_run_id").read_text() == run_id
    runs = sorted(p.name for p in (out / "wandb").glob("offline-run-*"))
    assert len(runs) == 2 and all(re.search(rf"-{run_id}(-\d+)?$", r) for r in runs)  # both processes log to one W&B run
    assert (out / ".hydra").is_dir()
    assert _files_holding(out, SECRET) == []
    for proc in (killed, resumed):
        assert SECRET not in proc.stdout and SECRET not in proc.stderr
