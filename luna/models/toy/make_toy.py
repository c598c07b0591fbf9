"""`luna make-toy work=DIR`: train (or continue training) the toy checkpoints, then export them."""
from __future__ import annotations

import sys
from pathlib import Path


def make_toy(cfg) -> None:
    """Run the stages `cfg` (conf/make_toy.yaml) asks for, export, and print what was written."""
    from luna.models.fingerprint import te_fingerprint
    from luna.models.toy import train
    from luna.settings import names

    stages = {}
    for name in train.STAGES:
        s = cfg.stages.get(name)
        if s is None:
            raise ValueError(f"stages.{name} is missing (steps, batch, lr)")
        stages[name] = train.StageConfig(steps=int(s.steps), batch=int(s.batch), lr=float(s.lr))
        if stages[name].steps < 1 or stages[name].batch < 2:
            raise ValueError(f"stages.{name}: steps must be >= 1 and batch >= 2, got {dict(s)}")
    work = Path(cfg.work).expanduser().resolve()
    out = Path(cfg.out).expanduser().resolve()
    written = train.make_toy(work, out, seed=int(cfg.seed), stages=stages,
                             checkpoint_every_s=float(cfg.checkpoint_every_s), threads=cfg.get("threads"),
                             only=names(cfg.get("only"), "only"), pool_size=int(cfg.pool_size),
                             device=str(cfg.get("device") or "cpu"), render_workers=cfg.get("render_workers", 0))
    if not written:
        print(f"stages {names(cfg.only, 'only')} done in {work}; rerun without only= to export")
    for path in written:
        extra = f" te_fingerprint={te_fingerprint(path)}" if not path.stem.startswith(train.VISION_NAME) else ""
        print(f"{path} ({path.stat().st_size / 1e6:.2f} MB){extra}")


def main(argv: list[str] | None = None) -> int:
    from luna.cli import run_stage

    argv = list(sys.argv[1:] if argv is None else argv)
    # unknown stages, bad step counts (ValueError) and an unwritable folder (OSError) are the user's to fix
    return run_stage("luna make-toy", "make_toy", make_toy, argv, user_errors=(OSError,),
                     interrupted="rerun the same command to continue from the last saved step")


if __name__ == "__main__":
    sys.exit(main())
