"""`luna make-tiny out=DIR n=N`: write tiny-preset SDXL checkpoints in both on-disk formats."""
from __future__ import annotations

import sys
from pathlib import Path

def make_tiny(cfg) -> None:
    """Write the checkpoints `cfg` (conf/make_tiny.yaml) asks for and print where they are."""
    from luna.models import tiny
    from luna.models.fingerprint import te_fingerprint

    out = Path(cfg.out).expanduser().resolve()
    from luna.settings import names

    written = tiny.write_checkpoints(out, n=int(cfg.n), families=tuple(names(cfg.families, "families")))
    for checkpoint in written:
        print(f"{checkpoint.name}: family={checkpoint.family} te_fingerprint={te_fingerprint(checkpoint.single_file)}")
        print(f"  single file: {checkpoint.single_file}")
        print(f"  diffusers:   {checkpoint.diffusers_dir}")
    if cfg.write_vision:
        print(f"vision open_clip:{tiny.TINY_VISION}: {tiny.write_vision(out / 'vision')}")


def main(argv: list[str] | None = None) -> int:
    from luna.cli import run_stage

    argv = list(sys.argv[1:] if argv is None else argv)
    # bad n / families and an unwritable folder (OSError) are the user's to fix
    return run_stage("luna make-tiny", "make_tiny", make_tiny, argv, user_errors=(OSError,))


if __name__ == "__main__":
    sys.exit(main())
