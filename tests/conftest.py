"""Session-wide fixtures: one Ray cluster for the whole test session (two nodes on this machine)."""
from __future__ import annotations

import atexit
import os
import shutil
import tempfile

import pytest

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# the inventory's facts cache: one per test session, never the user's ~/.cache/luna; removed at exit
if "LUNA_CACHE_DIR" not in os.environ:
    os.environ["LUNA_CACHE_DIR"] = tempfile.mkdtemp(prefix="luna-cache-")
    atexit.register(shutil.rmtree, os.environ["LUNA_CACHE_DIR"], ignore_errors=True)

# Two simulated PCs. Each node advertises a custom resource naming it, the way `ray start
# --resources='{"luna_node:pc2": 1}'` does on a real LAN node (see luna/cluster.py).
NODE_NAMES = ("pc1", "pc2")


@pytest.fixture(scope="session")
def ray_cluster():
    """A two-node Ray cluster on this machine, started once per session; the driver is connected."""
    import ray
    from ray.cluster_utils import Cluster

    common = dict(num_cpus=2, object_store_memory=200 * 1024**2)
    cluster = Cluster(
        initialize_head=True,
        head_node_args=dict(**common, resources={f"luna_node:{NODE_NAMES[0]}": 1000}, include_dashboard=False),
    )
    worker = cluster.add_node(**common, resources={f"luna_node:{NODE_NAMES[1]}": 1000})
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, include_dashboard=False, log_to_driver=True)
    cluster.luna_nodes = {NODE_NAMES[0]: cluster.head_node, NODE_NAMES[1]: worker}
    yield cluster
    ray.shutdown()
    cluster.shutdown()


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny models gain nothing from threads, and on a shared 2-core machine OpenMP threads that
    spin-wait make a 4-step 64x64 generation take seconds instead of 0.1 s: one thread. Folders of
    tiny-model tests use it for every test (an autouse fixture in their conftest.py)."""
    import torch

    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    """Tiny-preset SDXL checkpoints written once per session (both on-disk formats)."""
    from luna.models import tiny

    out = tmp_path_factory.mktemp("tiny_models")
    tiny.write_checkpoints(out, n=2)
    return out
