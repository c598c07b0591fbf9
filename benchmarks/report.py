"""What every benchmark does with its finished table: print it, and write it to `--out` when given."""
from __future__ import annotations

from pathlib import Path


def emit(text: str, out: Path | None) -> None:
    print(text)
    if out:
        out = Path(out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text + "\n")
