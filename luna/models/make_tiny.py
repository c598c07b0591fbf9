"""`luna make-tiny out=DIR n=N`: write tiny-preset SDXL checkpoints in both on-disk formats."""
from __future__ import annotations

import sys
from pathlib import Path

EXIT_USER_ERROR = 2


def _task(cfg, outcome: dict) -> None:
    from luna.models import tiny
    from luna.models.fingerprint import te_fingerprint

    out = Path(cfg.out).expanduser().resolve()
    try:
        written = tiny.write_checkpoints(out, n=int(cfg.n), families=tuple(cfg.families))
    except (ValueError, OSError) as exc:  # bad n / families, unwritable folder: the user's to fix
        outcome["error"] = str(exc)
        return
    for ck in written:
        print(f"{ck.name}: family={ck.family} te_fingerprint={te_fingerprint(ck.single_file)}")
        print(f"  single file: {ck.single_file}")
        print(f"  diffusers:   {ck.diffusers_dir}")
    if cfg.write_vision:
        print(f"vision open_clip:{tiny.TINY_VISION}: {tiny.write_vision(out / 'vision')}")


def main(argv: list[str] | None = None) -> int:
    from luna.cli import run_hydra

    argv = list(sys.argv[1:] if argv is None else argv)
    outcome: dict = {}
    try:
        run_hydra(lambda cfg: _task(cfg, outcome), "make_tiny", argv, prog="luna make-tiny")
    except SystemExit as exc:  # Hydra printed what was wrong with the overrides
        return EXIT_USER_ERROR if exc.code not in (0, None) else 0
    if "error" in outcome:
        print(f"luna make-tiny: error: {outcome['error']}", file=sys.stderr)
        return EXIT_USER_ERROR
    return 0


if __name__ == "__main__":
    sys.exit(main())
