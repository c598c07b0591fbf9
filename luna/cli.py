"""The `luna` console command: one subcommand per stage, each a Hydra app over `conf/`.

`luna SUB [hydra overrides...]` imports the module named in SUBCOMMANDS and calls its
`main(argv)`, which hands its task to `run_stage`: Hydra start-up, one-line user errors and the
exit codes below are the same for every subcommand.
"""
from __future__ import annotations

import importlib
import re
import sys
from typing import Any, Callable, Mapping, Sequence

from luna import CONF_DIR

EXIT_OK = 0
EXIT_FAILED = 1  # the stage ran and could not finish (finished work is kept), or a bug (traceback)
EXIT_USER_ERROR = 2  # a setting, input file or override the user can fix: one line on stderr
EXIT_INTERRUPTED = 130  # Ctrl-C

# subcommand -> (module, one-line help). Each module has `main(argv: list[str]) -> int`.
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "make-tiny": ("luna.models.make_tiny", "write tiny-preset SDXL checkpoints (single-file and diffusers)"),
    "make-toy": ("luna.models.toy.make_toy", "train the toy preset's checkpoints on the procedural world (resumable)"),
    "inventory": ("luna.models.inventory_cli", "what every model file is (kind, family, prediction) and whether it is used"),
    "factory": ("factory.cli", "generate WebDataset shards from a campaign on Ray"),
    "extract": ("extraction.cli", "extract paired image embeddings and SDXL conditionings (HDF5)"),
    "pairs-info": ("extraction.cli_info", "print statistics of a pairs folder"),
    "vault": ("vault.cli", "build | query | serve FAISS vaults"),
    "train": ("projector.cli", "train an image-embedding -> conditioning projector"),
    "refine": ("lsd_runtime.cli", "the Luna Semantic Detailer: refine an image at 4K"),
    "ab": ("lsd_runtime.ab", "compare conditioning arms (none/generic/vault/projector/hybrid/IP-Adapter) on the same crops"),
    "demo": ("demo.run", "the whole loop on the toy preset (preset=tiny: random weights), with report.html"),
}


class StageFailed(Exception):
    """The stage ran but could not finish (e.g. units failed on every retry); `run_stage` prints the
    message on one line and exits with `code`."""

    def __init__(self, message: str, code: int = EXIT_FAILED):
        super().__init__(message)
        self.code = code


class _StageExit(SystemExit):
    """Raised inside the Hydra app to leave it with a code `run_stage` already reported (Hydra lets
    SystemExit through; an Exception would be printed as a traceback)."""


def _register_resolvers() -> None:
    """`${luna:models/toy/x.safetensors}`: a file shipped inside the luna package (checkout or install),
    so a preset can name weights committed with the code."""
    from omegaconf import OmegaConf

    from luna import PACKAGE_DIR

    if not OmegaConf.has_resolver("luna"):
        OmegaConf.register_new_resolver("luna", lambda rel: str(PACKAGE_DIR / str(rel)))


def run_stage(prog: str, config_name: str, task: Callable[[Any], Any], argv: Sequence[str], *,
              user_errors: tuple[type[BaseException], ...] = (), interrupted: str = "") -> int:
    """Run `task(cfg)` as the Hydra app over conf/`config_name`.yaml with `argv` as overrides and
    return the exit code:

    - 0: the task returned (its return value goes to Hydra, e.g. a sweeper's objective);
    - 2: a user error: ValueError (every stage's user errors subclass it), FileNotFoundError, an
      OmegaConf error (missing `???` value, wrong type) or one of `user_errors`, printed as
      `PROG: error: MESSAGE`; or an override/config Hydra rejected (Hydra prints why);
    - `StageFailed.code` (1): printed as `PROG: MESSAGE`;
    - 130: Ctrl-C, printed as `PROG: interrupted` plus `interrupted` (what is kept, how to resume);
    - 1: any other exception (a bug): Hydra prints the traceback.
    """
    import hydra
    from omegaconf.errors import OmegaConfBaseException

    _register_resolvers()
    # OmegaConf's errors name the key at fault (a missing `???` value, a wrong type)
    caught = (ValueError, FileNotFoundError, OmegaConfBaseException, *user_errors)
    state: dict[str, Any] = {}

    def app_task(cfg):
        state["started"] = True
        try:
            return task(cfg)
        except StageFailed as e:
            print(f"{prog}: {e}", file=sys.stderr, flush=True)
            raise _StageExit(e.code) from None
        except caught as e:
            print(f"{prog}: error: {e}", file=sys.stderr, flush=True)
            raise _StageExit(EXIT_USER_ERROR) from None

    app = hydra.main(config_path=str(CONF_DIR), config_name=config_name, version_base="1.3")(app_task)
    saved = sys.argv
    sys.argv = [prog, *argv]
    try:
        app()
    except _StageExit as e:
        return int(e.code)
    except KeyboardInterrupt:
        print(f"\n{prog}: interrupted" + (f"; {interrupted}" if interrupted else ""), file=sys.stderr, flush=True)
        return EXIT_INTERRUPTED
    except SystemExit as e:  # Hydra's own exit: --help/--cfg (0), a rejected override (before the task), a crash
        if e.code in (0, None):
            return EXIT_OK
        return EXIT_FAILED if state.get("started") else EXIT_USER_ERROR
    finally:
        sys.argv = saved
    return EXIT_OK


def compose(config_name: str, overrides: Sequence[str] = (), values: Mapping | None = None):
    """conf/`config_name`.yaml composed as `luna SUB overrides...` composes it, without running an
    app; `values` (plain data: paths, numbers, lists, nested dicts) are merged on top as they are, so
    callers never quote data into override strings. Group choices go in `overrides` (`preset=tiny`)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from omegaconf import OmegaConf

    _register_resolvers()
    running = GlobalHydra.instance()
    outer = running.hydra if running.is_initialized() else None  # inside a running app (the demo's stages)
    running.clear()
    try:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3", job_name=config_name):
            cfg = hydra_compose(config_name=config_name, overrides=list(overrides))
    finally:
        if outer is not None:
            GlobalHydra.instance().initialize(outer)
    if values:
        cfg = OmegaConf.merge(cfg, OmegaConf.create(dict(values)))
    return cfg


def quote_free_text(argv: Sequence[str], keys: Sequence[str]) -> list[str]:
    """`argv` with the values of free-text `keys` (prompts) quoted for Hydra, so `prompt=a, b [c]` is
    taken verbatim instead of as a sweep or a list; values already quoted are left as they are."""
    out = []
    for arg in argv:
        key, eq, value = arg.partition("=")
        quoted = len(value) >= 2 and value[0] == value[-1] and value[0] in "'\""
        if eq and key.lstrip("+") in keys and value and not quoted:
            arg = key + "=" + hydra_quote(value)
        out.append(arg)
    return out


def hydra_quote(value: str) -> str:
    """`value` as a single-quoted Hydra override value that parses back to exactly `value`: backslashes
    before a quote, `${` or the end are doubled (elsewhere Hydra keeps them literal), quotes are escaped,
    and `${` is escaped so OmegaConf does not read an interpolation."""
    value = re.sub(r"(\\*)\$\{", lambda m: m.group(1) * 2 + "\\${", value)
    value = re.sub(r"(\\+)(?='|$)", lambda m: m.group(1) * 2, value)
    return "'" + value.replace("'", "\\'") + "'"


def override_value(argv: Sequence[str], key: str) -> str | None:
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
        return EXIT_OK
    name, rest = argv[0], argv[1:]
    if name not in SUBCOMMANDS:
        print(f"luna: unknown subcommand {name!r}\n\n{usage()}", file=sys.stderr)
        return EXIT_USER_ERROR
    module = importlib.import_module(SUBCOMMANDS[name][0])
    return int(module.main(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
