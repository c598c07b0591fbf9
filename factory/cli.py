"""`luna factory`: a Hydra app over conf/factory.yaml that runs (or with dry_run=true plans) a campaign.

Errors the user can fix (campaign, checkpoints, output folder, overrides) print one line and exit 2;
a unit failing on every retry prints one line and exits 1; Ctrl-C kills the actors, keeps every
finished shard and exits 130 (exit codes and messages: `luna.cli.run_stage`).
"""
from __future__ import annotations

import sys
from pathlib import Path

PROG = "luna factory"


def _task(cfg) -> None:
    from factory.errors import FactoryRunError
    from factory.run import run
    from luna.cli import StageFailed

    try:
        run(cfg)  # `campaign` is a name or a path: the campaign file is read once, by factory.campaign_file
    except FactoryRunError as e:  # units failed on every retry: the shards so far are kept
        raise StageFailed(f"run failed: {e}; finished shards are kept, rerun to resume") from None


def main(argv: list[str] | None = None) -> int:
    from factory.errors import FactoryError
    from factory.run import check_writable
    from luna.cli import EXIT_USER_ERROR, override_value, run_stage

    argv = list(sys.argv[1:] if argv is None else argv)
    out = override_value(argv, "out")
    if out and not any(a in ("--help", "-h", "--cfg", "-c") for a in argv):
        try:  # before Hydra, which creates its own folder inside `out`
            check_writable(Path(out).expanduser())
        except FactoryError as e:
            print(f"{PROG}: error: {e}", file=sys.stderr)
            return EXIT_USER_ERROR
    return run_stage(PROG, "factory", _task, argv,
                     interrupted="finished shards are kept, rerun the same command to resume")


if __name__ == "__main__":
    sys.exit(main())
