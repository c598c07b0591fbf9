"""The trained projector as the runtime sees it: `projector.safetensors` + `projector.json`.

`Projector` is a plain nn.Module (network + pooled head + normalisation statistics); calling it
on raw image embeddings `[B, D]` (or vision tokens `[B, T, W]`) returns the conditioning
`[B, 77, C]` and pooled `[B, P]` in the original SDXL space. This module imports neither
Lightning nor Hydra, and loading never unpickles anything.

projector.json:
  format_version, architecture {net, pooled_head} (class + constructor args), dims
  {in_dim, vision_dim, cond_dim, text_dims, pooled_dim, seq_len, num_tokens, input, targets},
  targets: "sdxl" (SDXL conditioning, the default when absent) or "clip_l" (SD 1.x-style CLIP-L, see
  projector/targets.py), also at the top level of projector.json;
  vision_model, te_fingerprints, normalisation (per-channel statistics, as lists), metrics.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from torch import nn

from luna.files import atomic_path, write_json_atomic
from projector import models
from projector.targets import TARGET_SHAPES  # noqa: F401 (the nodes read it here: export is the contract module)

FORMAT_VERSION = 1
WEIGHTS_NAME = "projector.safetensors"
CONFIG_NAME = "projector.json"
# normalisation buffers: name -> which dim of `dims` sizes it
STAT_SHAPES = {
    "input_mean": "in_dim", "input_std": "in_dim",
    "cond_mean": "cond_dim", "cond_std": "cond_dim", "bos": "cond_dim",
    "pooled_mean": "pooled_dim", "pooled_std": "pooled_dim",
}


class ProjectorLoadError(ValueError):
    """A projector folder that cannot be loaded (missing file, bad format, wrong tensors)."""


class ProjectorMismatchError(ProjectorLoadError):
    """A projector trained for another vision model or embedding dimension than the caller's."""


class ProjectorTargetsError(ProjectorMismatchError):
    """A projector that predicts other targets than the caller needs (a CLIP-L head for an SDXL model)."""


class Projector(nn.Module):
    """Network + pooled head + normalisation; `forward` works in the original (raw) space.

    Statistics are per channel: inputs by `input_mean/std`; conditionings by `cond_mean/std`
    over tokens 1..76 (the CLIP-L and bigG channels each get their own); pooled by
    `pooled_mean/std`; `bos` is the constant position-0 state, copied, never predicted.
    """

    def __init__(self, architecture: dict, dims: dict):
        super().__init__()
        self.architecture = {k: (dict(v) if v is not None else None) for k, v in architecture.items()}
        self.dims = dict(dims)
        net_dims = dict(
            in_dim=dims["in_dim"], cond_dim=dims["cond_dim"], pooled_dim=dims["pooled_dim"],
            seq_len=dims["seq_len"], num_tokens=dims.get("num_tokens") if dims.get("input") == "tokens" else None,
        )
        self.net = models.build(self.architecture["net"], **net_dims)
        if getattr(self.net, "input_kind", "embed") != dims.get("input", "embed"):
            raise models.ArchitectureError(
                f"{type(self.net).__name__} takes {self.net.input_kind} input but the data gives {dims.get('input')!r}"
                " (set data.input, or model.num_tokens for the learned-query decoder)"
            )
        head = self.architecture.get("pooled_head")
        self.pooled_head = None
        if not getattr(self.net, "predicts_pooled", False):
            if head is None:
                raise models.ArchitectureError(f"{type(self.net).__name__} predicts no pooled output: give a pooled_head")
            self.pooled_head = models.build(head, in_dim=dims["in_dim"], pooled_dim=dims["pooled_dim"])
        else:
            self.architecture["pooled_head"] = None
        for name, dim in STAT_SHAPES.items():
            init = torch.ones if name.endswith("_std") else torch.zeros
            self.register_buffer(name, init(int(dims[dim])))

    # --- shapes and statistics ----------------------------------------------------------
    def _example_shape(self, batch: int) -> tuple[int, ...]:
        if self.dims.get("input") == "tokens":
            return (batch, int(self.dims["num_tokens"]), int(self.dims["in_dim"]))
        return (batch, int(self.dims["in_dim"]))

    @property
    def closed_form(self) -> bool:
        return bool(getattr(self.net, "closed_form", False))

    def set_stats(self, stats: dict) -> None:
        for name in STAT_SHAPES:
            value = torch.as_tensor(stats[name], dtype=torch.float32)
            buf = getattr(self, name)
            if value.shape != buf.shape:
                raise ValueError(f"normalisation statistic {name} has shape {tuple(value.shape)}, expected {tuple(buf.shape)}")
            buf.copy_(value.to(buf.device))

    def stats(self) -> dict[str, list[float]]:
        return {name: getattr(self, name).detach().cpu().tolist() for name in STAT_SHAPES}

    def normalise_input(self, x: torch.Tensor) -> torch.Tensor:
        return (x.float() - self.input_mean) / self.input_std

    def normalise_cond(self, cond: torch.Tensor) -> torch.Tensor:
        return (cond.float() - self.cond_mean) / self.cond_std

    def normalise_pooled(self, pooled: torch.Tensor) -> torch.Tensor:
        return (pooled.float() - self.pooled_mean) / self.pooled_std

    def denormalise(self, cond_std: torch.Tensor, pooled_std: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        cond = cond_std * self.cond_std + self.cond_mean
        cond = torch.cat([self.bos.expand(cond.shape[0], 1, -1).to(cond.dtype), cond[:, 1:]], dim=1)
        return cond, pooled_std * self.pooled_std + self.pooled_mean

    # --- prediction ---------------------------------------------------------------------
    def predict_standardised(self, x_std: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Standardised input -> (standardised cond [B, L, C], standardised pooled [B, P])."""
        cond, pooled = self.net(x_std)
        if pooled is None:
            pooled = self.pooled_head(x_std)
        return cond, pooled

    def check_input(self, x: torch.Tensor) -> None:
        want = self._example_shape(x.shape[0] if x.ndim else 1)
        if x.ndim != len(want) or x.shape[-1] != want[-1]:
            kind = "vision tokens [B, T, W]" if self.dims.get("input") == "tokens" else "image embeddings [B, D]"
            raise ProjectorMismatchError(
                f"projector for {self.dims.get('vision_model', '?')} takes {kind} with width {want[-1]},"
                f" got shape {tuple(x.shape)}"
            )

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Raw embeddings `[B, D]` (or tokens `[B, T, W]`) -> (cond `[B, 77, C]`, pooled `[B, P]`), raw space."""
        self.check_input(x)
        cond_std, pooled_std = self.predict_standardised(self.normalise_input(x.to(self.input_mean.device)))
        return self.denormalise(cond_std, pooled_std)


def save_projector(projector: Projector, folder: str | os.PathLike, meta: dict | None = None) -> Path:
    """Write `folder/projector.safetensors` and `folder/projector.json` (temporary names, then rename)."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    meta = dict(meta or {})
    config = {
        "format_version": FORMAT_VERSION,
        "architecture": projector.architecture,
        "parameters": models.count_parameters(projector),
        "dims": projector.dims,
        "vision_model": projector.dims.get("vision_model"),
        "targets": projector.dims.get("targets", "sdxl"),
        "te_fingerprints": meta.pop("te_fingerprints", []),
        "normalisation": projector.stats(),
        "metrics": meta.pop("metrics", {}),
        **meta,
    }
    tensors = {k: v.detach().cpu().contiguous() for k, v in projector.state_dict().items()}
    weights, cfg = folder / WEIGHTS_NAME, folder / CONFIG_NAME
    with atomic_path(weights) as tmp:
        save_file(tensors, str(tmp), metadata={"format": "luna-projector", "format_version": str(FORMAT_VERSION)})
    write_json_atomic(cfg, config)  # the json last: a folder with a json has its weights
    return folder


def resolve_projector_path(path: str | os.PathLike) -> Path:
    """A local folder/file, or `wandb:ENTITY/PROJECT/NAME:VERSION`: a projector artifact that
    `luna train` logged to W&B (online runs), downloaded with the W&B API."""
    text = str(path)
    if not text.startswith("wandb:"):
        return Path(path)
    import wandb

    try:
        artifact = wandb.Api().artifact(text[len("wandb:"):], type="projector")
        return Path(artifact.download())
    except Exception as e:  # network, login, or a wrong reference: all the user's to fix
        raise ProjectorLoadError(f"{text}: cannot fetch the W&B artifact ({e}); `wandb login` and check the reference") from e


def load_projector(
    path: str | os.PathLike,
    device: str | torch.device = "cpu",
    expect_vision_model: str | None = None,
    expect_dim: int | None = None,
    expect_targets: str | None = None,
) -> Projector:
    """Load a projector folder (or its .json / .safetensors file, or a `wandb:` artifact reference) for inference.

    Raises ProjectorMismatchError when `expect_vision_model` or `expect_dim` (the image
    embedding width of the caller's vision tower) differ from what the projector was trained on,
    and ProjectorTargetsError when `expect_targets` ("sdxl" for the SDXL runtime) is not what it predicts.
    """
    from safetensors.torch import load_file

    path = resolve_projector_path(path)
    folder = path if path.is_dir() else path.parent
    cfg_path, weights = folder / CONFIG_NAME, folder / WEIGHTS_NAME
    if not cfg_path.is_file() or not weights.is_file():
        raise ProjectorLoadError(f"{folder}: not a projector folder (needs {CONFIG_NAME} and {WEIGHTS_NAME})")
    try:
        config = json.loads(cfg_path.read_text())
    except json.JSONDecodeError as e:
        raise ProjectorLoadError(f"{cfg_path}: not valid JSON ({e})") from e
    if config.get("format_version") != FORMAT_VERSION:
        raise ProjectorLoadError(f"{cfg_path}: format_version {config.get('format_version')!r}, this code reads {FORMAT_VERSION}")
    dims = config["dims"]
    model_id = config.get("vision_model")
    if expect_vision_model is not None and model_id != expect_vision_model:
        raise ProjectorMismatchError(
            f"{cfg_path}: projector was trained on vision model {model_id!r}, not {expect_vision_model!r};"
            " train one on pairs extracted with your vision model"
        )
    targets = dims.get("targets", "sdxl")
    if expect_targets is not None and targets != expect_targets:
        from projector.targets import TARGET_SHAPES

        raise ProjectorTargetsError(
            f"{cfg_path}: this projector predicts {targets} targets {TARGET_SHAPES.get(targets, '')}, not the "
            f"{expect_targets} conditioning {TARGET_SHAPES.get(expect_targets, '')} this model needs; "
            + ("use it with an SD 1.x model (docs/projector.md, 'CLIP-L head') or train one without model.heads=[clip_l]"
               if targets == "clip_l" else "train one with model.heads=[" + str(expect_targets) + "]"))
    if expect_dim is not None and int(dims["vision_dim"]) != int(expect_dim):
        raise ProjectorMismatchError(
            f"{cfg_path}: projector takes {dims['vision_dim']}-d embeddings of {model_id!r}, the caller gives {expect_dim}-d"
        )
    try:
        projector = Projector(config["architecture"], dims)
    except (models.ArchitectureError, KeyError, TypeError) as e:
        raise ProjectorLoadError(f"{cfg_path}: bad architecture ({e})") from e
    state = load_file(str(weights))
    try:
        projector.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise ProjectorLoadError(f"{weights}: tensors do not match {cfg_path} ({e})") from e
    projector.config = config
    return projector.to(device).eval()
