"""`luna factory`: a Hydra app over conf/factory.yaml that runs (or with dry_run=true plans) a campaign.

Errors the user can fix (campaign, checkpoints, output folder, overrides) print one line and exit 2;
a unit failing on every retry prints one line and exits 1; Ctrl-C kills the actors, keeps every
finished shard and exits 130.
"""
from __future__ import annotations

import sys
from pathlib import Path

EXIT_RUN_FAILED = 1
EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130


def _task(cfg, outcome: dict) -> None:
    from omegaconf import OmegaConf

    from factory.errors import FactoryRunError
    from factory.run import run

    plain = OmegaConf.to_container(cfg, resolve=True)  # `campaign` is a name or a path: read once, by run
    try:
        outcome["report"] = run(plain)
    except ValueError as e:  # campaign, inventory, planner, output folder: the user's to fix
        outcome["error"] = str(e)
    except FactoryRunError as e:  # units failed on every retry: shards so far are kept
        outcome["failure"] = str(e)


def main(argv: list[str] | None = None) -> int:
    from factory.errors import FactoryError
    from factory.run import check_writable
    from luna.cli import override_value, run_hydra

    argv = list(sys.argv[1:] if argv is None else argv)
    out = override_value(argv, "out")
    if out and not any(a in ("--help", "-h", "--cfg", "-c") for a in argv):
        try:  # before Hydra, which creates its own folder inside `out`
            check_writable(Path(out).expanduser())
        except FactoryError as e:
            print(f"luna factory: error: {e}", file=sys.stderr)
            return EXIT_USER_ERROR
    outcome: dict = {}
    try:
        run_hydra(lambda cfg: _task(cfg, outcome), "factory", argv, prog="luna factory")
    except KeyboardInterrupt:
        print("\nluna factory: interrupted; finished shards are kept, rerun the same command to resume",
              file=sys.stderr)
        return EXIT_INTERRUPTED
    except SystemExit as e:  # Hydra printed what was wrong with the overrides or the config
        return EXIT_USER_ERROR if e.code not in (0, None) else 0
    if "error" in outcome:
        print(f"luna factory: error: {outcome['error']}", file=sys.stderr)
        return EXIT_USER_ERROR
    if "failure" in outcome:
        print(f"luna factory: run failed: {outcome['failure']}; finished shards are kept, rerun to resume",
              file=sys.stderr)
        return EXIT_RUN_FAILED
    return 0


if __name__ == "__main__":
    sys.exit(main())
