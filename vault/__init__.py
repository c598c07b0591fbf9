"""Luna-Vault: FAISS retrieval from image embeddings to SDXL conditioning (DESIGN.md §2 vault/).

Public API (imported lazily, so `import vault.manifest` stays light):
  Vault.open(dir).query(embeds, k, category, filters, weighting, temperature, encode) -> QueryResult
  open_vault(path_or_address) -> Vault | VaultClient;  serve(dir, name) starts the Ray service
  build_vault(pairs, out, ...), add_pairs(vault_dir, pairs), drop_conditionings(vault_dir)
  blend_linear(user, retrieved, w), blend_concat(user, retrieved, user_pooled=None)
  VaultError (a ValueError)
"""
from __future__ import annotations

import importlib

_EXPORTS = {
    "Vault": "vault.query", "QueryResult": "vault.query", "Retrieval": "vault.query",
    "VaultClient": "vault.service", "open_vault": "vault.service", "serve": "vault.service",
    "build_vault": "vault.build", "add_pairs": "vault.build", "drop_conditionings": "vault.build",
    "blend_linear": "vault.blend", "blend_concat": "vault.blend",
    "VaultError": "vault.manifest", "Manifest": "vault.manifest",
}
__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'vault' has no attribute {name!r}")
