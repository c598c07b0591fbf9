"""Ray start/join shared by every stage (factory, extraction, vault service): the ground floor's cluster connection.

A node is named by a custom resource `luna_node:<name>` that `ray start --resources` gives it
(`cluster=lan`), or that `connect` gives the in-process node (`cluster=local`). Work meant for a
node asks for a tiny amount of that resource, so it can only run there. A node started without
such a resource is still usable: it is named by its hostname and reached through
NodeAffinitySchedulingStrategy.
"""
from __future__ import annotations

import logging
import os
import socket
from dataclasses import dataclass, field
from typing import Any

from luna.settings import get

log = logging.getLogger(__name__)

NODE_RESOURCE_PREFIX = "luna_node:"
# What one task/actor asks of its node's resource: small enough for thousands per node even when
# the node was started with `{"luna_node:pc1": 1}`.
NODE_RESOURCE_SHARE = 0.001


class ClusterError(ValueError):
    """Ray could not be started or joined (names the address or setting at fault)."""


@dataclass
class NodeInfo:
    name: str
    node_id: str
    hostname: str
    num_cpus: float
    num_gpus: float
    via_resource: bool  # True: placed by its `luna_node:<name>` resource; False: by node affinity


@dataclass
class Cluster:
    """The Ray cluster this process is connected to, with its nodes by Luna name."""

    nodes: dict[str, NodeInfo] = field(default_factory=dict)
    owned: bool = False  # this process started Ray (local mode) and shuts it down on close()
    address: str | None = None

    def placement(self, node: str) -> dict[str, Any]:
        """`.options(**...)` that pin a Ray task or actor to `node`."""
        info = self.nodes.get(node)
        if info is None:
            raise ClusterError(f"no Ray node named {node!r} (nodes: {sorted(self.nodes)})")
        if info.via_resource:
            return {"resources": {NODE_RESOURCE_PREFIX + node: NODE_RESOURCE_SHARE}}
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        return {"scheduling_strategy": NodeAffinitySchedulingStrategy(node_id=info.node_id, soft=False)}

    def refresh(self) -> "Cluster":
        self.nodes = list_nodes()
        return self

    def close(self) -> None:
        import ray

        if self.owned and ray.is_initialized():
            ray.shutdown()


def list_nodes() -> dict[str, NodeInfo]:
    """Alive nodes of the connected cluster by Luna name (resource name, else hostname)."""
    import ray

    nodes: dict[str, NodeInfo] = {}
    for n in ray.nodes():
        if not n.get("Alive", n.get("alive", False)):
            continue
        res = n.get("Resources", {})
        names = [k[len(NODE_RESOURCE_PREFIX):] for k in res if k.startswith(NODE_RESOURCE_PREFIX)]
        host = n.get("NodeManagerHostname") or n.get("NodeManagerAddress") or "node"
        common = dict(node_id=n["NodeID"], hostname=host, num_cpus=float(res.get("CPU", 0)),
                      num_gpus=float(res.get("GPU", 0)))
        if names:
            for name in names:
                nodes[name] = NodeInfo(name=name, via_resource=True, **common)
        else:
            name = host if host not in nodes else f"{host}-{n['NodeID'][:6]}"
            nodes[name] = NodeInfo(name=name, via_resource=False, **common)
    return nodes


def connect(cfg: Any = None) -> Cluster:
    """Start or join Ray as `cfg` says, or reuse the connection this process already has.

    cfg (the `cluster` config group): mode=local|lan, address (lan; default "auto"),
    node_name (local), num_cpus, num_gpus, include_dashboard, dashboard_host,
    object_store_memory.
    """
    import ray

    if ray.is_initialized():
        return Cluster(nodes=list_nodes(), owned=False, address=None)
    mode = str(get(cfg, "mode", "local"))
    dashboard = bool(get(cfg, "include_dashboard", False))
    common: dict[str, Any] = dict(include_dashboard=dashboard, log_to_driver=bool(get(cfg, "log_to_driver", True)),
                                  configure_logging=True, logging_level=logging.WARNING)
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    if mode == "local":
        name = get(cfg, "node_name") or "local"
        kw: dict[str, Any] = dict(resources={NODE_RESOURCE_PREFIX + str(name): 1000})
        for key in ("num_cpus", "num_gpus", "object_store_memory"):
            if get(cfg, key) is not None:
                kw[key] = get(cfg, key)
        if dashboard:  # only ever on the loopback unless the user names another host
            kw["dashboard_host"] = str(get(cfg, "dashboard_host") or "127.0.0.1")
        try:
            ray.init(address="local", **kw, **common)  # "local": never join a cluster found on this machine
        except Exception as e:  # noqa: BLE001 - Ray raises many kinds; the user needs one line
            raise ClusterError(f"could not start a local Ray instance: {e}") from e
        return Cluster(nodes=list_nodes(), owned=True, address=None)
    if mode == "lan":
        address = str(get(cfg, "address") or "auto")
        try:
            ray.init(address=address, **common)
        except Exception as e:  # noqa: BLE001
            raise ClusterError(
                f"could not join the Ray cluster at cluster.address={address!r}: {e}. Start it first with "
                "`ray start --head --resources='{\"luna_node:pc1\": 1}'` (see docs/factory.md)"
            ) from e
        nodes = list_nodes()
        if not nodes:
            raise ClusterError(f"the Ray cluster at {address!r} has no alive nodes")
        return Cluster(nodes=nodes, owned=False, address=address)
    raise ClusterError(f"cluster.mode must be 'local' or 'lan', not {mode!r}")


def this_host() -> str:
    return socket.gethostname()
