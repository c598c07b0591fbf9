"""`luna make-toy work=DIR`: train (or continue training) the toy checkpoints, then export them."""
from __future__ import annotations

import sys
from pathlib import Path

EXIT_USER_ERROR = 2


def _task(cfg, outcome: dict) -> None:
    from luna.models.fingerprint import te_fingerprint
    from luna.models.toy import train

    stages = {}
    for name in train.STAGES:
        s = cfg.stages.get(name)
        if s is None:
            outcome["error"] = f"stages.{name} is missing (steps, batch, lr)"
            return
        try:
            stages[name] = train.StageConfig(steps=int(s.steps), batch=int(s.batch), lr=float(s.lr))
        except Exception as exc:  # noqa: BLE001 - a missing or malformed key of the user's config
            outcome["error"] = f"stages.{name}: {exc}"
            return
        if stages[name].steps < 1 or stages[name].batch < 2:
            outcome["error"] = f"stages.{name}: steps must be >= 1 and batch >= 2, got {dict(s)}"
            return
    work = Path(cfg.work).expanduser().resolve()
    out = Path(cfg.out).expanduser().resolve()
    try:
        written = train.make_toy(work, out, seed=int(cfg.seed), stages=stages,
                                 checkpoint_every_s=float(cfg.checkpoint_every_s), threads=cfg.get("threads"),
                                 only=list(cfg.get("only") or []), pool_size=int(cfg.pool_size))
    except (OSError, ValueError) as exc:  # unwritable folder, unknown stage: the user's to fix
        outcome["error"] = str(exc)
        return
    if not written:
        print(f"stages {list(cfg.only)} done in {work}; rerun without only= to export")
    for path in written:
        extra = f" te_fingerprint={te_fingerprint(path)}" if not path.stem.startswith(train.VISION_NAME) else ""
        print(f"{path} ({path.stat().st_size / 1e6:.2f} MB){extra}")


def main(argv: list[str] | None = None) -> int:
    from luna.cli import run_hydra

    argv = list(sys.argv[1:] if argv is None else argv)
    outcome: dict = {}
    try:
        run_hydra(lambda cfg: _task(cfg, outcome), "make_toy", argv, prog="luna make-toy")
    except SystemExit as exc:  # Hydra printed what was wrong with the overrides
        return EXIT_USER_ERROR if exc.code not in (0, None) else 0
    if "error" in outcome:
        print(f"luna make-toy: error: {outcome['error']}", file=sys.stderr)
        return EXIT_USER_ERROR
    return 0


if __name__ == "__main__":
    sys.exit(main())
