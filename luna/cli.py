"""The `luna` console command: one subcommand per stage, each a Hydra app over `conf/`.

`luna SUB [hydra overrides...]` imports the stage module named in SUBCOMMANDS and calls
its `main(argv)`; stage modules use `luna.cli.run_hydra` so every subcommand takes the
usual Hydra overrides (`key=value`, `+key=value`, `-m` sweeps).
"""
from __future__ import annotations

import importlib
import sys
from typing import Callable

from luna import CONF_DIR

# subcommand -> (module, one-line help). Each module has `main(argv: list[str]) -> int | None`.
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "make-tiny": ("luna.models.make_tiny", "write tiny-preset SDXL checkpoints (single-file and diffusers)"),
    "inventory": ("luna.models.inventory_cli", "what every model file is (kind, family, prediction) and whether it is used"),
    "factory": ("factory.cli", "generate WebDataset shards from a campaign on Ray"),
    "extract": ("extraction.cli", "extract paired image embeddings and SDXL conditionings (HDF5)"),
    "pairs-info": ("extraction.cli_info", "print statistics of a pairs folder"),
    "vault": ("vault.cli", "build | query | serve FAISS vaults"),
    "train": ("projector.cli", "train an image-embedding -> conditioning projector"),
    "refine": ("lsd_runtime.cli", "the Luna Semantic Detailer: refine an image at 4K"),
    "demo": ("luna.demo", "the whole loop on the tiny preset, with report.html"),
}


def run_hydra(task: Callable, config_name: str, argv: list[str], prog: str):
    """Run `task(cfg)` as a Hydra app over conf/`config_name`.yaml with `argv` as overrides."""
    import hydra

    app = hydra.main(config_path=str(CONF_DIR), config_name=config_name, version_base="1.3")(task)
    saved = sys.argv
    sys.argv = [prog, *argv]
    try:
        return app()
    finally:
        sys.argv = saved


def override_value(argv: list[str], key: str) -> str | None:
    """The value the last `key=...` override in `argv` gives, unquoted as Hydra parses it
    (`out='/a b/c'` -> `/a b/c`); None when absent or not a plain string."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    found = [a for a in argv if a.split("=", 1)[0].lstrip("+") == key and "=" in a]
    if not found:
        return None
    try:
        value = OverridesParser.create().parse_override(found[-1]).value()
    except Exception:  # noqa: BLE001 - a malformed override: Hydra itself reports it
        return None
    return value if isinstance(value, str) else None


def usage() -> str:
    lines = ["usage: luna SUBCOMMAND [key=value ...]", "", "subcommands:"]
    lines += [f"  {name:<11} {text}" for name, (_, text) in SUBCOMMANDS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in {"-h", "--help", "help"}:
        print(usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in SUBCOMMANDS:
        print(f"luna: unknown subcommand {name!r}\n\n{usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(SUBCOMMANDS[name][0])
    code = module.main(rest)
    return int(code or 0)


if __name__ == "__main__":
    sys.exit(main())
