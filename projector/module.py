"""The LightningModule that trains a `Projector` (losses, metrics, optimiser); no model code here.

Metrics, per validation split (`val/` held-out prompts, `val_ckpt/` held-out checkpoints),
all cosines in the original SDXL space, BOS excluded:
  cos_content   mean token cosine over the prompt's tokens and its EOS
  cos_pad       mean token cosine over the padding positions
  cos_pooled    cosine of the pooled vector
  cos_shuffled  the same predictions scored against *another* prompt's targets (the batch rolled
                by one): what a prediction that ignores the image gets; cos_content must beat it
  r_at_1        how often a sample's own prompt is the nearest among the split's prompts
                (summaries: mean standardised token + standardised pooled, see metrics.summary)
  knn_cos       the vault's k-NN answer scored like cos_content (computed once by the datamodule)
"""
from __future__ import annotations

import math

import lightning as L
import torch
import torch.nn.functional as F

from projector import metrics
from projector.export import Projector

DEFAULT_OPTIM = {"lr": 3e-4, "weight_decay": 0.01, "betas": (0.9, 0.99), "warmup_steps": 100, "min_lr_ratio": 0.1}
DEFAULT_LOSS = {"mse": 1.0, "cos": 1.0, "pad_weight": 0.3, "pooled": 1.0, "clip_l_weight": 1.0}


class WarmupCosine:
    """Linear warm-up then cosine decay to `min_ratio`; a plain object so its state is plain numbers."""

    def __init__(self, warmup: int, total: int, min_ratio: float):
        self.warmup, self.total, self.min_ratio = max(1, int(warmup)), max(1, int(total)), float(min_ratio)

    def __call__(self, step: int) -> float:
        if step < self.warmup:
            return (step + 1) / self.warmup
        t = min(1.0, (step - self.warmup) / max(1, self.total - self.warmup))
        return self.min_ratio + (1 - self.min_ratio) * 0.5 * (1 + math.cos(math.pi * t))


class ProjectorModule(L.LightningModule):
    """Trains `self.projector` = Projector({"net": net, "pooled_head": pooled_head}, dims).

    `net` / `pooled_head` are architecture specs (`_target_` + constructor args, plain dicts);
    `dims` comes from `PairsDataModule.dims`. Normalisation statistics are buffers of the projector
    (set them with `projector.set_stats(datamodule.stats)`), so they travel in checkpoints.
    """

    def __init__(self, net: dict, dims: dict, pooled_head: dict | None = None, optim: dict | None = None, loss: dict | None = None):
        super().__init__()
        self.save_hyperparameters()
        self.projector = Projector({"net": dict(net), "pooled_head": dict(pooled_head) if pooled_head else None}, dims)
        self.optim = {**DEFAULT_OPTIM, **(optim or {})}
        self.loss_weights = {**DEFAULT_LOSS, **(loss or {})}
        self.split = int(dims["text_dims"][0])
        self.automatic_optimization = not self.projector.closed_form
        self._val: dict[str, list] = {}

    def forward(self, x: torch.Tensor):
        return self.projector(x)

    # --- training --------------------------------------------------------------------------
    def _standardise(self, batch):
        p = self.projector
        return p.normalise_input(batch["x"]), p.normalise_cond(batch["cond"]), p.normalise_pooled(batch["pooled"])

    def _losses(self, cond_s, pooled_s, y, yp, n_content) -> dict[str, torch.Tensor]:
        w = self.loss_weights
        seq = metrics.sequence_loss(cond_s, y, n_content, self.split, w["mse"], w["cos"], w["pad_weight"],
                                    w["clip_l_weight"])
        pooled = metrics.pooled_loss(pooled_s, yp, w["mse"], w["cos"])
        return {"loss": seq["loss"] + w["pooled"] * pooled, "loss_content": seq["content"], "loss_pad": seq["pad"], "loss_pooled": pooled}

    def training_step(self, batch, batch_idx):
        x, y, yp = self._standardise(batch)
        if self.projector.closed_form:
            self.projector.net.accumulate(x, y, yp)
            return None
        cond_s, pooled_s = self.projector.predict_standardised(x)
        losses = self._losses(cond_s, pooled_s, y, yp, batch["n_content"])
        self.log_dict({f"train/{k}": v for k, v in losses.items()}, prog_bar=False, batch_size=len(x))
        self.log("train/lr", self.optimizers().param_groups[0]["lr"], batch_size=len(x))
        return losses["loss"]

    def on_train_epoch_start(self) -> None:
        if self.projector.closed_form:
            self.projector.net.reset_statistics()
            self._unsolved = True

    def _solve(self) -> None:
        """Sum the normal equations over all ranks, then solve (once per training epoch)."""
        if self.projector.closed_form and getattr(self, "_unsolved", False):
            net = self.projector.net
            xtx = self.trainer.strategy.reduce(net._xtx.to(self.device), reduce_op="sum")
            xty = self.trainer.strategy.reduce(net._xty.to(self.device), reduce_op="sum")
            net.solve(xtx, xty)
            self._unsolved = False

    def on_validation_epoch_start(self) -> None:
        self._solve()  # Lightning validates before on_train_epoch_end

    def on_train_epoch_end(self) -> None:
        self._solve()

    def configure_optimizers(self):
        if self.projector.closed_form:
            return None
        o = self.optim
        params = [p for p in self.parameters() if p.requires_grad]
        groups = [
            {"params": [p for p in params if p.ndim >= 2], "weight_decay": float(o["weight_decay"])},
            {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
        ]
        opt = torch.optim.AdamW(groups, lr=float(o["lr"]), betas=tuple(o["betas"]))
        total = int(self.trainer.estimated_stepping_batches) if self.trainer else 1000
        warmup = min(int(o["warmup_steps"]), max(1, total // 10))
        sched = torch.optim.lr_scheduler.LambdaLR(opt, WarmupCosine(warmup, total, o["min_lr_ratio"]))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    # --- validation ------------------------------------------------------------------------
    def _val_name(self, dataloader_idx: int) -> str:
        dm = getattr(self.trainer, "datamodule", None)
        names = getattr(dm, "val_names", None) or ["val", "val_ckpt"]
        return names[dataloader_idx]

    def validation_step(self, batch, batch_idx, dataloader_idx: int = 0):
        name = self._val_name(dataloader_idx)
        x, y, yp = self._standardise(batch)
        cond_s, pooled_s = self.projector.predict_standardised(x)
        n = len(x)
        logs = {f"{name}/loss": self._losses(cond_s, pooled_s, y, yp, batch["n_content"])["loss"]}
        cond, pooled = self.projector.denormalise(cond_s, pooled_s)
        target, n_content = batch["cond"].float(), batch["n_content"]
        content, pad = metrics.content_pad_cosine(cond, target, n_content)
        logs[f"{name}/cos_content"] = content.mean()
        logs[f"{name}/cos_pooled"] = F.cosine_similarity(pooled, batch["pooled"].float(), dim=-1).mean()
        other, differ = metrics.shuffled_pairs(batch["prompt"])
        shuffled, _ = metrics.content_pad_cosine(cond, target[other], n_content)
        if differ.any():
            logs[f"{name}/cos_shuffled"] = shuffled[differ].mean()
        if (~pad.isnan()).any():
            logs[f"{name}/cos_pad"] = pad.nanmean()
        self.log_dict(logs, batch_size=n, sync_dist=True, add_dataloader_idx=False)
        self._val.setdefault(name, []).append(
            (metrics.summary(cond_s, pooled_s), metrics.summary(y, yp), batch["prompt"])
        )

    def on_validation_epoch_end(self) -> None:
        dm = getattr(self.trainer, "datamodule", None)
        for name, rows in self._val.items():
            pred, target, prompt = (torch.cat(col) for col in zip(*rows))
            if self.trainer.world_size > 1:
                pred, target, prompt = (self.all_gather(t).flatten(0, 1) for t in (pred, target, prompt))
            self.log(f"{name}/r_at_1", metrics.recall_at_1(pred, target, prompt), add_dataloader_idx=False)
            knn = getattr(dm, "knn", {}).get(name)
            if knn is not None:
                self.log(f"{name}/knn_cos", float(knn), add_dataloader_idx=False)
        self._val.clear()
