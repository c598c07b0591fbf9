"""The factory end to end on the two-node test cluster: inventory, placement, resume, failures, CLI."""
from __future__ import annotations

import errno
import functools
import json
import os
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest

from factory import inventory, shards
from factory.errors import FactoryError
from factory.run import ShardSink, run
from luna.cluster import connect

REPO = Path(__file__).resolve().parents[2]

CAMPAIGN = """\
campaign: tinytest
wildcards:
  eyes:
    color: [blue eyes, green eyes, "{amber|hazel} eyes", "{3::grey|violet} eyes"]
  lighting: [soft studio lighting, dramatic rim light, golden hour]
jobs:
  eyes:
    quota: 6
    templates: ["closeup of __eyes/color__, __lighting__"]
  faces:
    quota: 4
    templates: ["portrait of a person with __eyes/color__"]
negative_prompt: "blurry, lowres"
sampler: {steps: 2, cfg: 5.0, scheduler: euler, width: 64, height: 64, batch_size: 2}
checkpoints: {include: ["*"]}
seed: 1234
"""
QUOTA = 10


@pytest.fixture(scope="module")
def node_models(tiny_dir, tmp_path_factory):
    """pc1 holds tiny-base-0 (single file), pc2 holds tiny-pony-1 (diffusers folder), each in its own folder."""
    root = tmp_path_factory.mktemp("node_models")
    pc1, pc2 = root / "pc1", root / "pc2"
    pc1.mkdir()
    pc2.mkdir()
    (pc1 / "tiny-base-0.safetensors").symlink_to(tiny_dir / "single" / "tiny-base-0.safetensors")
    (pc2 / "tiny-pony-1").symlink_to(tiny_dir / "diffusers" / "tiny-pony-1", target_is_directory=True)
    return {"pc1": pc1, "pc2": pc2}


def _cfg(tmp_path, node_models, **over) -> dict:
    camp = tmp_path / "tinytest.yaml"
    camp.write_text(CAMPAIGN)
    cfg = {
        "campaign_file": str(camp), "out": str(tmp_path / "out"), "dry_run": False, "progress": False,
        "checkpoints": {"dirs": [], "node_dirs": {k: [str(v)] for k, v in node_models.items()}},
        "workers": {"device": "cpu", "cpus_per_actor": 1, "inflight_per_actor": 2, "max_retries": 3},
        "image": {"format": "png"}, "quality": {"max_attempts": 2}, "units_per_shard": 1,
    }
    cfg.update(over)
    return cfg


def _dataset(out: Path) -> tuple[list[dict], list[Path]]:
    """(metadata of every sample in complete shards, every file in the shards folder)."""
    d = out / "shards"
    metas = []
    for tar in shards.complete_shards(d, "tinytest"):
        metas += [json.loads(s["json"]) for s in shards.read_shard(tar)]
    return metas, sorted(d.iterdir())


def _assert_exact_quota(out: Path) -> list[dict]:
    metas, files = _dataset(out)
    keys = [m["key"] for m in metas]
    assert len(keys) == QUOTA and len(set(keys)) == QUOTA
    tars = [f for f in files if f.suffix == ".tar"]
    assert all(shards.stats_path(t).exists() for t in tars), "a tar without its stats marker"
    assert not [f for f in files if f.name.startswith(".")], "temporary files left"
    return metas


def test_inventory_both_formats_and_rejects(ray_cluster, tiny_dir, tmp_path):
    odd = tmp_path / "odd"
    odd.mkdir()
    from safetensors.torch import save_file
    import torch

    save_file({"weight": torch.zeros(2, 2)}, str(odd / "lora.safetensors"))
    (odd / "old.ckpt").write_bytes(b"not loaded")
    (odd / "broken.safetensors").write_bytes(b"\x00" * 3)
    cfg = {"dirs": [str(odd)], "node_dirs": {"pc1": [str(tiny_dir / "single")], "pc2": [str(tiny_dir / "diffusers")]}}
    inv = inventory.scan(connect(), cfg)
    # each model is a single file on pc1 and a diffusers folder on pc2: one checkpoint on both nodes
    assert len(inv.checkpoints) == 2 and len({c.name for c in inv.checkpoints}) == 2
    for c in inv.checkpoints:
        assert c.nodes == ["pc1", "pc2"] and c.formats == {"pc1": "single_file", "pc2": "diffusers"}
        assert Path(c.paths["pc1"]).parent == tiny_dir / "single" and Path(c.paths["pc2"]).parent == tiny_dir / "diffusers"
        assert c.fingerprint and c.te_fingerprint and c.model_id
    # base and pony have different text encoders: different families
    fams = {c.family for c in inv.checkpoints}
    assert "pony" in fams and len(fams) >= 2
    for c in inv.checkpoints:
        assert ("pony" in c.name) == (c.family == "pony")
    bad = {(r.node, Path(r.path).name): r.reason for r in inv.rejected}
    for node in ("pc1", "pc2"):  # `dirs` are scanned on every node
        assert "not SDXL" in bad[(node, "lora.safetensors")]
        assert "pickle" in bad[(node, "old.ckpt")]
        assert bad[(node, "broken.safetensors")]
    with pytest.raises(inventory.InventoryError, match="pc9"):
        inventory.scan(connect(), {"node_dirs": {"pc9": [str(odd)]}})
    with pytest.raises(inventory.InventoryError, match="no usable SDXL checkpoint"):
        inventory.scan(connect(), {"dirs": [str(odd)]})


def test_end_to_end_two_nodes_placement_and_resume(ray_cluster, node_models, tmp_path):
    import webdataset as wds

    cfg = _cfg(tmp_path, node_models, units_per_shard=2)
    report = run(cfg)
    assert report.images == QUOTA and report.rejected == 0
    assert report.loads <= report.checkpoints + report.actors
    metas = _assert_exact_quota(Path(cfg["out"]))
    holder = {"tiny-base-0": "pc1", "tiny-pony-1": "pc2"}
    for m in metas:
        assert m["node"] == holder[m["checkpoint"]]  # units ran only where their checkpoint is
        # where the checkpoint was on that node (luna extract finds it there without checkpoints.dirs)
        assert Path(m["checkpoint_path"]).parent == node_models[m["node"]]
        assert m["category"] == f"tinytest/{m['job']}" and m["width"] == 64 and m["steps"] == 2
        assert m["checkpoint_fingerprint"] and m["te_fingerprint"] and m["choices"] and m["unit_id"]
        assert "." not in m["key"]
    assert {m["checkpoint"] for m in metas} == set(holder)
    assert {m["job"] for m in metas} == {"eyes", "faces"}
    tars = shards.complete_shards(Path(cfg["out"]) / "shards", "tinytest")
    assert len(tars) < report.planned_units  # units grouped two to a shard (per actor)
    for t in tars:
        node, worker = t.name.split("-")[1:3]
        assert node in ("pc1", "pc2") and worker.startswith("w")
        stats = json.loads(shards.stats_path(t).read_text())
        assert 1 <= len(stats["unit_ids"]) <= 2 and stats["successes"] == len(list(shards.read_shard(t)))
    # stock webdataset and the tar command read the shards
    ds = list(wds.WebDataset([str(t) for t in tars], shardshuffle=False).decode("rgb"))
    assert len(ds) == QUOTA and all(s["png"].shape == (64, 64, 3) for s in ds)
    listed = subprocess.run(["tar", "tf", str(tars[0])], capture_output=True, text=True, check=True).stdout.split()
    assert len(listed) % 3 == 0 and listed
    # a rerun finds every unit done and loads nothing
    again = run(cfg)
    assert again.skipped_units == report.planned_units and again.images == 0 and again.loads == 0
    _assert_exact_quota(Path(cfg["out"]))


def test_actor_killed_mid_run_ends_with_exact_quota(ray_cluster, node_models, tmp_path, fakes, monkeypatch):
    import ray

    cfg = _cfg(tmp_path, node_models)
    holder: dict = {}
    real_call = ShardSink.__call__

    def call_then_kill(self, task, result):
        real_call(self, task, result)
        if not holder.get("killed"):
            busy = [a for a in holder["scheduler"].actors if a.inflight]
            if busy:  # kill an actor that still has units in flight: they must be retried
                ray.kill(busy[0].handle, no_restart=True)
                holder["killed"] = True

    monkeypatch.setattr(ShardSink, "__call__", call_then_kill)
    report = run(cfg, make_generator=functools.partial(fakes.FakeGenerator, delay_s=0.05),
                 scheduler_hook=lambda s: holder.__setitem__("scheduler", s))
    assert holder.get("killed") and report.retries >= 1
    _assert_exact_quota(Path(cfg["out"]))
    assert report.images == QUOTA
    # a changed plan over a folder holding every key already: nothing is rendered again, no key twice
    # (a plan whose units only partly overlap the shards is refused: tests/factory/test_poison.py)
    Path(cfg["campaign_file"]).write_text(CAMPAIGN.replace("steps: 2", "steps: 3"))
    monkeypatch.setattr(ShardSink, "__call__", real_call)
    assert run(cfg, make_generator=functools.partial(fakes.FakeGenerator)).images == 0
    _assert_exact_quota(Path(cfg["out"]))


def test_disk_full_mid_shard_keeps_nothing_partial_then_resumes(ray_cluster, node_models, tmp_path, fakes,
                                                                 monkeypatch):
    cfg = _cfg(tmp_path, node_models)
    gen = functools.partial(fakes.FakeGenerator)
    real_add, n = shards._add, {"calls": 0}

    def add_until_full(tar, name, data, mtime):
        n["calls"] += 1
        if n["calls"] > 10:  # the 4th sample's members: mid-shard on some unit
            raise OSError(errno.ENOSPC, "No space left on device")
        real_add(tar, name, data, mtime)

    monkeypatch.setattr(shards, "_add", add_until_full)
    with pytest.raises(FactoryError, match="disk full"):
        run(cfg, make_generator=gen)
    metas, files = _dataset(Path(cfg["out"]))
    assert not [f for f in files if f.name.startswith(".")]
    assert all(shards.stats_path(f).exists() for f in files if f.suffix == ".tar")
    assert 0 < len(metas) < QUOTA
    monkeypatch.setattr(shards, "_add", real_add)
    report = run(cfg, make_generator=gen)
    assert report.skipped_units > 0
    _assert_exact_quota(Path(cfg["out"]))


def test_cli_dry_run_and_user_errors(ray_cluster, node_models, tmp_path, capsys, monkeypatch):
    from factory.cli import main

    camp = tmp_path / "tinytest.yaml"
    camp.write_text(CAMPAIGN)
    out = tmp_path / "out"
    nd = f"checkpoints.node_dirs={{pc1:[{node_models['pc1']}],pc2:[{node_models['pc2']}]}}"
    assert main([f"campaign_file={camp}", f"out={out}", nd, "dry_run=true"]) == 0
    text = capsys.readouterr().out
    assert "unique prompts" in text and "estimated time" in text and "tiny-pony-1" in text
    assert not (out / "shards").exists()  # planned only: nothing generated, no model loaded
    # campaign=PATH and campaign=NAME (campaigns/NAME.yaml): the file is read once, by the loader, not by Hydra
    reads = []
    real_read_text = Path.read_text

    def counting_read_text(self, *args, **kwargs):
        if self.suffix == ".yaml" and self.stem in ("tinytest", "facial_features"):
            reads.append(self.name)
        return real_read_text(self, *args, **kwargs)

    monkeypatch.setattr(Path, "read_text", counting_read_text)
    assert main([f"campaign={camp}", f"out={out}", nd, "dry_run=true"]) == 0
    assert "campaign tinytest:" in capsys.readouterr().out and reads == ["tinytest.yaml"]
    assert main(["campaign=facial_features", f"out={out}", nd, "dry_run=true"]) == 0
    assert "campaign facial_features:" in capsys.readouterr().out
    assert reads == ["tinytest.yaml", "facial_features.yaml"]
    monkeypatch.undo()
    # user errors: one line, no traceback, exit 2
    bad = tmp_path / "bad.yaml"
    bad.write_text(CAMPAIGN.replace("__lighting__", "__nope__"))
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    cases = [
        ([f"campaign_file={bad}", f"out={out}", nd], "nope"),
        ([f"campaign_file={tmp_path / 'missing.yaml'}", f"out={out}", nd], "missing.yaml"),
        ([f"campaign_file={camp}", f"out={out}", f"checkpoints.dirs=[{tmp_path / 'empty'}]"], "no usable SDXL"),
        ([f"campaign_file={camp}", f"out={out}", nd, "+checkpoints.node_dirs.pc7=[/x]"], "pc7"),
        ([f"campaign_file={camp}", f"out={ro / 'sub'}", nd], "not writable"),
        ([f"out={out}", nd], "no campaign"),
        (["campaign=no_such_campaign", f"out={out}", nd], "named campaigns: backgrounds, demo"),
    ]
    if os.geteuid() == 0:  # root writes anywhere: use a path under a file instead
        (tmp_path / "afile").write_text("x")
        cases[4] = ([f"campaign_file={camp}", f"out={tmp_path / 'afile' / 'sub'}", nd], "not writable")
    for argv, needle in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert needle in err and "Traceback" not in err, (argv, err)
        assert len([l for l in err.splitlines() if l.strip()]) == 1, err
    sel = tmp_path / "sel.yaml"
    sel.write_text(CAMPAIGN.replace('include: ["*"]', 'include: ["juggernaut*"]'))
    assert main([f"campaign_file={sel}", f"out={out}", nd]) == 2
    assert "no checkpoint matched" in capsys.readouterr().err


def test_driver_killed_mid_run_then_rerun(node_models, tmp_path):
    """The CLI in a subprocess with its own local Ray: SIGKILL after the first shard, rerun, exact quota."""
    camp = tmp_path / "tinytest.yaml"
    camp.write_text(CAMPAIGN)
    out = tmp_path / "out"
    argv = [sys.executable, "-m", "luna.cli", "factory", f"campaign_file={camp}", f"out={out}",
            f"checkpoints.dirs=[{node_models['pc1']}]", "cluster=local",
            "cluster.num_cpus=2", "workers.device=cpu", "progress=false", "units_per_shard=1"]
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_ADDRESS")}
    env["PYTHONPATH"] = str(REPO)
    proc = subprocess.Popen(argv, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            start_new_session=True)
    try:
        deadline = time.time() + 240
        def finished() -> bool:  # a stats file renamed into place (not its hidden temporary)
            return any(not p.name.startswith(".") for p in (out / "shards").glob("*_stats.json"))

        while not finished() and proc.poll() is None and time.time() < deadline:
            time.sleep(0.05)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the driver and the Ray processes it started
        proc.wait()
    first, _ = _dataset(out)
    assert 0 < len(first), proc.stdout.read().decode()[-3000:]
    done = subprocess.run(argv, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    metas = _assert_exact_quota(out)
    assert {m["checkpoint"] for m in metas} == {"tiny-base-0"} and {m["node"] for m in metas} == {"local"}
    if len(first) < QUOTA:  # killed before the end: the rerun resumed rather than starting over
        assert "resuming" in done.stdout
    for t in shards.complete_shards(out / "shards", "tinytest"):
        with tarfile.open(t) as tf:
            assert len(tf.getnames()) % 3 == 0


def test_dry_run_on_local_folders_needs_no_ray(tiny_dir, tmp_path):
    camp = tmp_path / "tinytest.yaml"
    camp.write_text(CAMPAIGN)
    cfg = {"campaign_file": str(camp), "out": str(tmp_path / "out"), "dry_run": True, "progress": False,
           "checkpoints": {"dirs": [str(tiny_dir / "single")]}, "cluster": {"mode": "local", "num_gpus": 2}}
    code = ("import json, sys; from factory.run import run; r = run(json.loads(sys.argv[1])); "
            "print('RAY_IMPORTED', 'ray' in sys.modules, r.planned_units, r.checkpoints)")
    root = Path(__file__).resolve().parents[2]
    proc = subprocess.run([sys.executable, "-c", code, json.dumps(cfg)], cwd=root, capture_output=True, text=True,
                          timeout=300, env=dict(os.environ, PYTHONPATH=str(root)))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "unique prompts" in proc.stdout and "tiny-base-0" in proc.stdout
    last = proc.stdout.strip().splitlines()[-1].split()
    assert last[:2] == ["RAY_IMPORTED", "False"] and int(last[2]) > 0 and int(last[3]) >= 1
    assert not (tmp_path / "out" / "shards").exists()


def test_poison_guard_stops_a_flat_checkpoint_and_the_other_fills_the_quota(ray_cluster, node_models, tmp_path, fakes):
    """tiny-pony-1 (pc2) only makes flat images: stopped after its first 2 units, its samples go to tiny-base-0."""
    cfg = _cfg(tmp_path, node_models, quality={"max_attempts": 2, "poison_rate": 0.2, "poison_window": 2})
    cfg["workers"]["inflight_per_actor"] = 1
    Path(cfg["campaign_file"]).write_text(CAMPAIGN.replace("quota: 6", "quota: 12").replace("quota: 4", "quota: 8"))
    lines: list[str] = []
    gen = functools.partial(fakes.FakeGenerator, flat_paths=["tiny-pony-1"])
    report = run(cfg, make_generator=gen, echo=lines.append)
    out = Path(cfg["out"])
    metas, _ = _dataset(out)
    keys = [m["key"] for m in metas]
    assert len(keys) == 20 and len(set(keys)) == 20  # the whole quota, no duplicate
    assert {m["checkpoint"] for m in metas} == {"tiny-base-0"}  # no flat image was kept
    assert list(report.poisoned) == ["tiny-pony-1"] and "failed the quality gate" in report.poisoned["tiny-pony-1"]
    assert report.moved_samples == 10 and report.unrendered == 0
    text = "\n".join(lines)
    assert "stopped checkpoint tiny-pony-1: 8 of 8 images failed the quality gate (flat 8)" in text, text
    assert "poisoned checkpoint tiny-pony-1 stopped" in text
    # its first two units ran (and are done, their samples all rejected); the other three never did
    pony_stats = [json.loads(shards.stats_path(t).read_text()) for t in shards.complete_shards(out / "shards", "tinytest")]
    pony_stats = [st for st in pony_stats if st["checkpoints"] == ["tiny-pony-1"]]
    assert len([u for st in pony_stats for u in st["unit_ids"]]) == 2 and all(st["successes"] == 0 for st in pony_stats)
    record = json.loads((out / "tinytest_run.json").read_text())
    assert set(record["poisoned"]) == {"tiny-pony-1"} and record["poisoned"]["tiny-pony-1"]["rate"] == 1.0
    assert record["health"]["tiny-base-0"]["failed"] == 0 and not record["health"]["tiny-base-0"]["stopped"]
    assert sum(len(u["samples"]) for u in record["moved_units"]) == 10
    # a rerun keeps the checkpoint stopped and finds everything done
    lines.clear()
    again = run(cfg, make_generator=gen, echo=lines.append)
    assert again.images == 0 and again.loads == 0 and list(again.poisoned) == ["tiny-pony-1"]
    assert "stopped by the poison guard in an earlier run" in "\n".join(lines)
    assert len(_dataset(out)[0]) == 20
