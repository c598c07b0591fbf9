"""`luna make-tiny out=DIR n=N`: write tiny-preset SDXL checkpoints in both on-disk formats."""
from __future__ import annotations

import sys
from pathlib import Path


def task(cfg) -> int:
    from luna.models import tiny
    from luna.models.fingerprint import te_fingerprint

    out = Path(cfg.out).expanduser().resolve()
    written = tiny.write_checkpoints(out, n=int(cfg.n), families=tuple(cfg.families))
    for ck in written:
        print(f"{ck.name}: family={ck.family} te={te_fingerprint(ck.single_file)}")
        print(f"  single file: {ck.single_file}")
        print(f"  diffusers:   {ck.diffusers_dir}")
    if cfg.vision:
        print(f"vision (open_clip:{tiny.TINY_VISION}): {tiny.write_vision(out / 'vision')}")
    return 0


def main(argv: list[str] | None = None) -> int:
    from luna.cli import run_hydra

    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        return run_hydra(task, "make_tiny", argv, prog="luna make-tiny") or 0
    except ValueError as exc:
        print(f"luna make-tiny: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
