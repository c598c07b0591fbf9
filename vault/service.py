"""The vault service: one vault and its vision tower hosted once, as a named detached Ray actor.

`serve(folder)` starts it; `VaultClient(name)` talks to it with the same `query` / `search` /
`query_images` API as `Vault`; `open_vault(path_or_address)` returns whichever the string names:
a vault folder -> `Vault`, `ray:NAME` -> client of actor NAME on the connected (or local) Ray
cluster, `ray://HOST:PORT/NAME` -> client through Ray Client. In prompts-only mode the service
returns neighbours and weights and the client encodes with its own text encoders.
"""
from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np

from vault.manifest import VaultError
from vault.query import QueryResult, Retrieval, Vault, encode_and_blend

log = logging.getLogger(__name__)

DEFAULT_NAME = "luna-vault"
NAMESPACE = "luna"


class VaultServer:
    """The actor's body: an open vault plus its vision tower, loaded once."""

    def __init__(self, folder: str, device: str = "cpu", vision_weights: str | None = None, load_vision: bool = True):
        self.vault = Vault.open(folder, vision_weights=vision_weights, device=device)
        self.vision_error = None
        if load_vision:
            try:
                self.vault.vision  # noqa: B018 - load now, not on the first query
            except Exception as e:  # a vault of embeddings without a loadable tower still serves embeddings
                self.vision_error = f"{type(e).__name__}: {e}"
                log.warning("vault service: vision tower not loaded (%s); image queries will fail", self.vision_error)

    def info(self) -> dict:
        return {**self.vault.info(), "folder": str(self.vault.folder), "vision_error": self.vision_error}

    def search(self, embeds, k=10, category=None, filters=None, weighting="mean", temperature=0.05, model=None) -> Retrieval:
        return self.vault.search(embeds, k, category, filters, weighting, temperature, model)

    def query(self, embeds, k=10, category=None, filters=None, weighting="mean", temperature=0.05, model=None) -> QueryResult:
        return self.vault.query(embeds, k, category, filters, weighting, temperature, model=model)

    def embed_images(self, images) -> np.ndarray:
        if self.vision_error:
            raise VaultError(f"the vault service has no vision tower ({self.vision_error})")
        return self.vault.embed_images(images)


class VaultClient:
    """A running vault service, used like a `Vault`."""

    def __init__(self, name: str = DEFAULT_NAME, address: str | None = None, namespace: str = NAMESPACE):
        import ray

        if not ray.is_initialized():
            ray.init(address=address or "auto", namespace=namespace, log_to_driver=False)
        try:
            self.actor = ray.get_actor(name, namespace=namespace)
        except ValueError as e:
            raise VaultError(f"no vault service named {name!r} in Ray namespace {namespace!r} "
                             f"(start one with `luna vault serve vault=DIR name={name}`)") from e
        self.name = name
        self._info = ray.get(self.actor.info.remote())

    def _get(self, ref):
        import ray

        try:
            return ray.get(ref)
        except ray.exceptions.RayTaskError as e:
            cause = e.as_instanceof_cause()
            if isinstance(cause, VaultError):
                raise VaultError(str(cause).splitlines()[-1]) from e
            raise

    @property
    def mode(self) -> str:
        return self._info["mode"]

    def __len__(self) -> int:
        return int(self._info["count"])

    def info(self) -> dict:
        return dict(self._info)

    def search(self, embeds, k=10, category=None, filters=None, weighting="mean", temperature=0.05, model=None) -> Retrieval:
        return self._get(self.actor.search.remote(np.asarray(embeds, np.float32), k, category, filters, weighting,
                                                  temperature, model))

    def query(self, embeds, k=10, category=None, filters=None, weighting="mean", temperature=0.05, encode=None,
              model=None) -> QueryResult:
        if hasattr(embeds, "detach"):
            embeds = embeds.detach().float().cpu().numpy()
        embeds = np.asarray(embeds, np.float32)
        if encode is None:
            if self.mode != "stored":
                raise VaultError(f"vault service {self.name!r} is prompts-only: query needs encode= "
                                 "(the caller's text encoders)")
            return self._get(self.actor.query.remote(embeds, k, category, filters, weighting, temperature, model))
        return encode_and_blend(self.search(embeds, k, category, filters, weighting, temperature, model), encode)

    def embed_images(self, images) -> np.ndarray:
        return self._get(self.actor.embed_images.remote([im.convert("RGB") for im in images]))

    def query_images(self, images, k: int = 10, **kw) -> QueryResult:
        return self.query(self.embed_images(images), k, **kw)


def serve(folder, name: str = DEFAULT_NAME, namespace: str = NAMESPACE, device: str = "cpu",
          vision_weights: str | None = None, load_vision: bool = True, num_cpus: float = 1,
          resources: dict | None = None, replace: bool = False, max_concurrency: int = 4):
    """Start the named, detached vault actor on the connected Ray cluster; returns (actor, info)."""
    import ray

    folder = str(Path(folder).resolve())
    Vault.open(folder)  # fail here, with the vault's own error, rather than inside the actor
    try:
        old = ray.get_actor(name, namespace=namespace)
    except ValueError:
        old = None
    if old is not None:
        if not replace:
            raise VaultError(f"a vault service named {name!r} is already running (use replace=true or another name)")
        ray.kill(old)
        for _ in range(50):  # the name is freed asynchronously
            try:
                ray.get_actor(name, namespace=namespace)
                time.sleep(0.1)
            except ValueError:
                break
    actor = (
        ray.remote(VaultServer)
        .options(name=name, namespace=namespace, lifetime="detached", num_cpus=num_cpus,
                 resources=resources or None, max_concurrency=max_concurrency, max_restarts=3)
        .remote(folder, device, vision_weights, load_vision)
    )
    info = ray.get(actor.info.remote())
    return actor, info


def stop(name: str = DEFAULT_NAME, namespace: str = NAMESPACE) -> bool:
    import ray

    try:
        ray.kill(ray.get_actor(name, namespace=namespace))
        return True
    except ValueError:
        return False


def open_vault(path_or_address, **kw):
    """A `Vault` for a folder, a `VaultClient` for `ray:NAME` or `ray://HOST:PORT/NAME`."""
    if isinstance(path_or_address, (Vault, VaultClient)):
        return path_or_address
    s = str(path_or_address)
    if s.startswith("ray://"):
        host, _, name = s[len("ray://"):].partition("/")
        return VaultClient(name or DEFAULT_NAME, address=f"ray://{host}", **kw)
    if s.startswith("ray:"):
        return VaultClient(s[len("ray:"):] or DEFAULT_NAME, **kw)
    if Path(s).is_dir():
        return Vault.open(s, **kw)
    raise VaultError(f"vault {s!r}: neither a vault folder nor a service address (ray:NAME, ray://HOST:PORT/NAME)")
