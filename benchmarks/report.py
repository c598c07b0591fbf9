"""What every benchmark does with its finished table: print it, and write it to `--out` when given."""
from __future__ import annotations

import sys
from pathlib import Path


def command(script: str, argv=None) -> list[str]:
    """The first lines of a result file: the command that made it, as a code block."""
    args = argv if argv is not None else sys.argv[1:]
    return ["```", f"python benchmarks/{script} {' '.join(args)}", "```", ""]


def emit(text: str, out: Path | None) -> None:
    print(text)
    if out:
        out = Path(out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text + "\n")
