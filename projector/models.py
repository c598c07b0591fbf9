"""Projector networks as plain nn.Modules, smallest first (DESIGN.md §2 projector).

Every network maps a *standardised* image input (embedding `[B, D]` or vision tokens
`[B, T, W]`) to a standardised conditioning `[B, seq_len, cond_dim]` and, when it predicts
one, a standardised pooled vector; it returns `(cond, pooled_or_None)`. Position 0 (BOS) is
constant in SDXL conditionings: networks may output anything there, `Projector` replaces it
with the stored BOS state. Standardisation and the BOS copy live in `projector.export`.
"""
from __future__ import annotations

import inspect

import torch
from torch import nn


class RidgeProjector(nn.Module):
    """Closed-form ridge regression from the embedding to the flattened conditioning + pooled.

    Baseline, in the spirit of SD-IPC. Trained by `accumulate` over the data then `solve`
    (no gradient steps). Parameters: (D + 1) x ((seq_len - 1) * C + P).
    """

    closed_form = True
    predicts_pooled = True
    input_kind = "embed"

    def __init__(self, in_dim: int, cond_dim: int, pooled_dim: int, seq_len: int = 77, lam: float = 1.0):
        super().__init__()
        self.in_dim, self.cond_dim, self.pooled_dim, self.seq_len, self.lam = in_dim, cond_dim, pooled_dim, seq_len, lam
        out = (seq_len - 1) * cond_dim + pooled_dim
        self.weight = nn.Parameter(torch.zeros(in_dim + 1, out), requires_grad=False)
        self.reset_statistics()

    def reset_statistics(self) -> None:
        out = self.weight.shape[1]
        self._xtx = torch.zeros(self.in_dim + 1, self.in_dim + 1, dtype=torch.float64)
        self._xty = torch.zeros(self.in_dim + 1, out, dtype=torch.float64)

    @staticmethod
    def _design(x: torch.Tensor) -> torch.Tensor:
        return torch.cat([x, torch.ones_like(x[:, :1])], dim=1)

    def targets(self, cond: torch.Tensor, pooled: torch.Tensor) -> torch.Tensor:
        """The regression target row of a sample: tokens 1.. flattened, then pooled."""
        return torch.cat([cond[:, 1:].flatten(1), pooled], dim=1)

    @torch.no_grad()
    def accumulate(self, x: torch.Tensor, cond: torch.Tensor, pooled: torch.Tensor) -> None:
        a = self._design(x).double()
        y = self.targets(cond, pooled).double()
        self._xtx = self._xtx.to(a.device) + a.T @ a
        self._xty = self._xty.to(a.device) + a.T @ y

    @torch.no_grad()
    def solve(self, xtx: torch.Tensor | None = None, xty: torch.Tensor | None = None) -> None:
        """Set the weight to (X'X + lam I)^-1 X'Y (the bias column is not penalised)."""
        xtx = self._xtx if xtx is None else xtx
        xty = self._xty if xty is None else xty
        reg = torch.eye(xtx.shape[0], dtype=xtx.dtype, device=xtx.device) * self.lam
        reg[-1, -1] = 0.0
        w = torch.linalg.solve(xtx + reg, xty)
        self.weight.copy_(w.to(self.weight.dtype))

    def forward(self, x: torch.Tensor):
        y = self._design(x) @ self.weight
        n = (self.seq_len - 1) * self.cond_dim
        cond = y[:, :n].reshape(-1, self.seq_len - 1, self.cond_dim)
        cond = torch.cat([torch.zeros_like(cond[:, :1]), cond], dim=1)
        return cond, y[:, n:]


class SeedMLP(nn.Module):
    """The seed's `LunaVisionProjector`, as the seed wrote it (seeds/002), dimensions configurable.

    Linear(D, h1) -> LayerNorm -> GELU -> Linear(h1, h2) -> LayerNorm -> GELU -> Linear(h2, 77*C).
    At D=1024, h=(2048, 4096), C=2048 the last layer alone is 646M parameters (DESIGN.md §4).
    """

    closed_form = False
    predicts_pooled = False
    input_kind = "embed"

    def __init__(self, in_dim: int, cond_dim: int, seq_len: int = 77, hidden: tuple[int, int] = (2048, 4096)):
        super().__init__()
        h1, h2 = (int(h) for h in hidden)
        self.seq_len, self.cond_dim = seq_len, cond_dim
        self.encoder = nn.Sequential(
            nn.Linear(in_dim, h1), nn.LayerNorm(h1), nn.GELU(),
            nn.Linear(h1, h2), nn.LayerNorm(h2), nn.GELU(),
        )
        self.decoder = nn.Sequential(nn.Linear(h2, seq_len * cond_dim), nn.Unflatten(1, (seq_len, cond_dim)))

    def forward(self, x: torch.Tensor):
        return self.decoder(self.encoder(x)), None


class LearnedQueryDecoder(nn.Module):
    """`seq_len` learned queries cross-attending to the image, one output layer shared by all tokens.

    The image is either the embedding `[B, D]` (expanded to `memory_tokens` memory tokens by one
    Linear) or the vision tokens `[B, T, W]` (give `num_tokens`; each token is projected to the
    width). Each layer is a pre-norm transformer decoder layer: self-attention among the queries,
    cross-attention to the memory, MLP. Full size (D=1024 -> 77x2048, width 512, depth 4) is
    20.0M parameters (see `count_parameters`), under the 30M budget.
    """

    closed_form = False
    predicts_pooled = False

    def __init__(
        self,
        in_dim: int,
        cond_dim: int,
        seq_len: int = 77,
        width: int = 512,
        depth: int = 4,
        heads: int = 8,
        memory_tokens: int = 4,
        num_tokens: int | None = None,
        mlp_ratio: float = 4.0,
        dropout: float = 0.0,
    ):
        super().__init__()
        self.input_kind = "tokens" if num_tokens else "embed"
        self.seq_len, self.width, self.memory_tokens = seq_len, width, memory_tokens
        if num_tokens:
            self.memory = nn.Linear(in_dim, width)
            self.memory_pos = nn.Parameter(torch.randn(num_tokens, width) * 0.02)
        else:
            self.memory = nn.Linear(in_dim, memory_tokens * width)
            self.memory_pos = nn.Parameter(torch.randn(memory_tokens, width) * 0.02)
        self.memory_norm = nn.LayerNorm(width)
        self.queries = nn.Parameter(torch.randn(seq_len, width) * 0.02)
        self.layers = nn.ModuleList(
            nn.TransformerDecoderLayer(
                width, heads, int(width * mlp_ratio), dropout, activation="gelu", batch_first=True, norm_first=True
            )
            for _ in range(depth)
        )
        self.out_norm = nn.LayerNorm(width)
        self.out = nn.Linear(width, cond_dim)  # shared by all 77 positions

    def forward(self, x: torch.Tensor):
        if self.input_kind == "tokens":
            if x.ndim != 3:
                raise ValueError(f"LearnedQueryDecoder(num_tokens=...) takes vision tokens [B, T, W], got {tuple(x.shape)}")
            mem = self.memory(x) + self.memory_pos[: x.shape[1]]
        else:
            if x.ndim != 2:
                raise ValueError(f"LearnedQueryDecoder takes image embeddings [B, D], got {tuple(x.shape)}")
            mem = self.memory(x).view(x.shape[0], self.memory_tokens, self.width) + self.memory_pos
        mem = self.memory_norm(mem)
        h = self.queries.expand(x.shape[0], -1, -1)
        for layer in self.layers:
            h = layer(h, mem)
        return self.out(self.out_norm(h)), None


class PooledHead(nn.Module):
    """Image -> pooled text embedding (bigG's projected pooled output): a two-layer MLP.

    Takes the embedding `[B, D]`, or vision tokens `[B, T, W]` averaged over T.
    """

    closed_form = False

    def __init__(self, in_dim: int, pooled_dim: int, hidden: int = 1024):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(in_dim, hidden), nn.LayerNorm(hidden), nn.GELU(), nn.Linear(hidden, pooled_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim == 3:
            x = x.mean(dim=1)
        return self.net(x)


# Architectures a projector.json may name. Loading never imports anything outside this table.
ARCHITECTURES: dict[str, type[nn.Module]] = {
    cls.__name__: cls for cls in (RidgeProjector, SeedMLP, LearnedQueryDecoder, PooledHead)
}


class ArchitectureError(ValueError):
    """An architecture spec that names an unknown class or an argument it does not take."""


def architecture_name(spec: dict) -> str:
    """`RidgeProjector` from {"_target_": "projector.models.RidgeProjector", ...} or {"name": ...}."""
    target = spec.get("_target_") or spec.get("name")
    if not target:
        raise ArchitectureError(f"architecture spec {spec!r} has no _target_")
    name = str(target).rsplit(".", 1)[-1]
    if name not in ARCHITECTURES or (str(target).count(".") and not str(target).startswith("projector.models.")):
        raise ArchitectureError(f"unknown projector architecture {target!r}; known: {sorted(ARCHITECTURES)}")
    return name


def build(spec: dict, **dims) -> nn.Module:
    """Instantiate an architecture spec with the data's dimensions filled in.

    `spec` holds the constructor arguments chosen by the user (`_target_` names the class);
    `dims` (in_dim, cond_dim, pooled_dim, seq_len, num_tokens) are passed where the class takes them.
    """
    name = architecture_name(spec)
    cls = ARCHITECTURES[name]
    params = inspect.signature(cls.__init__).parameters
    kwargs = {k: v for k, v in spec.items() if k not in {"_target_", "name", "_partial_"}}
    unknown = [k for k in kwargs if k not in params]
    if unknown:
        raise ArchitectureError(f"{name} takes no argument(s) {unknown}; it takes {[p for p in params if p != 'self']}")
    for k, v in dims.items():
        if k in params and kwargs.get(k) is None and v is not None:
            kwargs[k] = v
    if isinstance(kwargs.get("hidden"), list):
        kwargs["hidden"] = tuple(kwargs["hidden"])
    return cls(**kwargs)


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
