"""`luna train pairs=DIR out=DIR experiment=NAME [hydra overrides]`: train and export a projector.

The Hydra app over conf/train.yaml (groups data, model, trainer, logger, callbacks, experiment,
hparams_search). A run writes into `out`; job N of a `-m` sweep writes into `out/multirun/N`:
checkpoints/ (last.ckpt + best), wandb/ (offline run files unless WANDB_MODE=online),
wandb_run_id, projector.safetensors + projector.json. `ckpt_path=last` resumes the run in
that folder: same step count, same W&B run.
"""
from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

from luna.settings import plain

log = logging.getLogger("luna.train")
RUN_ID_FILE = "wandb_run_id"


def run_dir(cfg) -> Path:
    """`out` for a single run, Hydra's per-job folder (out/multirun/N) inside a sweep."""
    try:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        hc = HydraConfig.get()
        if hc.mode == RunMode.MULTIRUN:
            return Path(hc.runtime.output_dir)
    except ValueError:  # composed without the Hydra app (tests, notebooks)
        pass
    return Path(cfg.out)


def resolve_ckpt(ckpt_path, workdir: Path) -> str | None:
    if ckpt_path in (None, "", "null"):
        return None
    if str(ckpt_path) == "last":
        last = workdir / "checkpoints" / "last.ckpt"
        if not last.is_file():
            raise FileNotFoundError(f"ckpt_path=last: no {last} (nothing to resume in {workdir})")
        return str(last)
    if not Path(ckpt_path).is_file():
        raise FileNotFoundError(f"ckpt_path={ckpt_path}: no such checkpoint")
    return str(ckpt_path)


def wandb_offline(setting) -> bool:
    """Offline unless asked: `logger.wandb.offline` when set, else WANDB_MODE (default offline)."""
    if setting is not None:
        return bool(setting)
    return os.environ.get("WANDB_MODE", "offline").lower() in {"offline", "dryrun", "disabled"}


def make_loggers(cfg, workdir: Path, resuming: bool) -> list:
    from hydra.utils import instantiate

    loggers = []
    for name, node in (cfg.get("logger") or {}).items():
        if not node or "_target_" not in node:
            continue
        extra = {}
        if node._target_.endswith("WandbLogger"):
            extra = _wandb_kwargs(node, workdir, resuming)
        loggers.append(instantiate(node, **extra))
    return loggers


def _wandb_kwargs(node, workdir: Path, resuming: bool) -> dict:
    """Offline resolution and a run id kept in the run folder, so a resumed run continues its W&B run."""
    import secrets
    import string

    from lightning.pytorch.utilities import rank_zero_only

    id_file = workdir / RUN_ID_FILE
    if (resuming or rank_zero_only.rank != 0) and id_file.is_file():
        run_id = id_file.read_text().strip()
    else:
        run_id = "".join(secrets.choice(string.ascii_lowercase + string.digits) for _ in range(8))
        if rank_zero_only.rank == 0:  # other DDP ranks log nothing to W&B
            workdir.mkdir(parents=True, exist_ok=True)
            id_file.write_text(run_id)
    (workdir / "wandb").mkdir(parents=True, exist_ok=True)
    return {"offline": wandb_offline(node.get("offline")), "id": run_id, "resume": "allow"}


def train(cfg) -> float | None:
    """Fit, then export; returns `cfg.optimized_metric` (the objective of Optuna sweeps)."""
    import lightning as L
    import torch
    from hydra.utils import instantiate
    from omegaconf import open_dict

    from projector.export import save_projector
    from projector.models import count_parameters
    from projector.module import ProjectorModule
    from projector.targets import targets_of

    workdir = run_dir(cfg)
    workdir.mkdir(parents=True, exist_ok=True)
    with open_dict(cfg):
        cfg.paths.output_dir = str(workdir)
    L.seed_everything(cfg.seed, workers=True)

    net = plain(cfg.model)
    heads = net.pop("heads") if isinstance(net.get("heads"), list) else cfg.get("heads")  # model.heads=[clip_l] too
    datamodule = instantiate(cfg.data, targets=targets_of(heads))
    datamodule.setup("fit")
    module = ProjectorModule(
        net=net, dims=datamodule.dims, pooled_head=plain(cfg.get("pooled_head")),
        optim=plain(cfg.optim), loss=plain(cfg.loss),
    )
    module.projector.set_stats(datamodule.stats)
    log.info("projector %s: %d parameters", cfg.model._target_, count_parameters(module.projector))

    ckpt = resolve_ckpt(cfg.get("ckpt_path"), workdir)
    callbacks = [instantiate(node) for node in (cfg.get("callbacks") or {}).values() if node and "_target_" in node]
    loggers = make_loggers(cfg, workdir, resuming=ckpt is not None)
    trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False, default_root_dir=str(workdir))
    for logger in loggers:
        logger.log_hyperparams({"parameters": count_parameters(module.projector), "dims": datamodule.dims})
    _argv_for_ddp_children()
    trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt, weights_only=True)

    found = {name: float(value) for name, value in trainer.callback_metrics.items()
             if isinstance(value, (torch.Tensor, float)) and name.startswith("val")}
    if cfg.get("export", True) and trainer.is_global_zero:
        save_projector(module.projector, workdir, meta={
            "te_fingerprints": datamodule.te_fingerprints,
            "metrics": found,
            "trained": {"pairs": str(cfg.pairs), "global_step": int(trainer.global_step), "epochs": int(trainer.current_epoch),
                        # how the pairs were split (`luna ab crops.pairs=...` samples the same held-out images)
                        "data": {k: plain(cfg.data.get(k)) for k in ("te_fingerprint", "val_prompts", "val_checkpoints",
                                                                       "val_combinations", "seed")}},
        })
        log.info("exported %s", workdir / "projector.json")
        _log_artifact(loggers, workdir, found)
    for logger in loggers:
        if hasattr(logger, "experiment") and type(logger).__name__ == "WandbLogger":
            logger.experiment.finish()
    return found.get(cfg.optimized_metric)


_LAUNCHED_AS: list[str] = []  # sys.argv[0] of the process, before run_stage replaced it


def _argv_for_ddp_children() -> None:
    """Lightning's DDP launcher starts ranks 1.. as `python -m <__main__ module> sys.argv[1:]` (or
    `python sys.argv[0] ...`); make that command this same `luna train` run."""
    import __main__
    from hydra.core.hydra_config import HydraConfig

    try:
        overrides = list(HydraConfig.get().overrides.task)
    except ValueError:  # not inside the Hydra app: nothing to relaunch
        return
    spec = getattr(__main__, "__spec__", None)
    if spec is not None and spec.name == "projector.cli":
        sys.argv = ["projector.cli", *overrides]
    elif spec is not None:  # python -m luna.cli train ...
        sys.argv = [spec.name, "train", *overrides]
    else:  # the `luna` console script
        sys.argv = [_LAUNCHED_AS[0] if _LAUNCHED_AS else "luna", "train", *overrides]


def _log_artifact(loggers: list, workdir: Path, metrics: dict) -> None:
    """Online W&B runs also get the export as a `projector` artifact (load it as `wandb:ENTITY/PROJECT/NAME:latest`)."""
    for logger in loggers:
        if type(logger).__name__ != "WandbLogger" or getattr(logger, "_offline", True):
            continue
        import wandb

        artifact = wandb.Artifact(f"projector-{logger.experiment.id}", type="projector", metadata=metrics)
        artifact.add_file(str(workdir / "projector.json"))
        artifact.add_file(str(workdir / "projector.safetensors"))
        logger.experiment.log_artifact(artifact)


def _make_out_dir(argv: list[str]) -> None:
    """The Optuna sweeper opens sqlite:///${out}/optuna.db before any job creates `out`."""
    from luna.cli import override_value

    out = override_value(argv, "out")
    if out:
        Path(out).expanduser().mkdir(parents=True, exist_ok=True)


def main(argv: list[str] | None = None) -> int:
    from luna.cli import run_stage

    argv = list(sys.argv[1:] if argv is None else argv)
    _LAUNCHED_AS[:] = sys.argv[:1]
    # W&B shares its service with child processes through WANDB_SERVICE; a run killed while
    # attached to a parent's service would leave its run id "in use" there and block the resume
    os.environ.pop("WANDB_SERVICE", None)
    _make_out_dir(argv)
    return run_stage("luna train", "train", train, argv)


if __name__ == "__main__":
    sys.exit(main())
