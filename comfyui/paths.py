"""Model folders of the Luna nodes, registered with ComfyUI's folder_paths.

    models/luna_vaults/<name>/manifest.json        (`luna vault build` output)
    models/luna_projectors/<name>/projector.json   (`luna train` export)
    models/luna_detectors/<name>/config.json       (a transformers OWLv2 / Grounding DINO / SAM 3 folder)
    models/ipadapter/<file>.safetensors            (a plain IP-Adapter; the folder ComfyUI IP-Adapter nodes use)

Folders named in extra_model_paths.yaml under these keys are listed too. Dropdowns list the
folder names; a widget `*_path` (an absolute folder, or `ray:NAME` for vaults) still wins.
Without ComfyUI (tests of the pure parts) nothing is registered and only paths resolve.
"""
from __future__ import annotations

from pathlib import Path

NONE = "none"
KINDS = {"luna_vaults": "manifest.json", "luna_projectors": "projector.json", "luna_detectors": "config.json"}
FILE_KINDS = ("ipadapter",)  # folders of single files (listed by file name)


def register() -> bool:
    """Add models/<kind> as a default folder of every kind (extra paths already registered are kept)."""
    try:
        import folder_paths
    except ImportError:
        return False
    for kind in (*KINDS, *FILE_KINDS):
        folder_paths.add_model_folder_path(kind, str(Path(folder_paths.models_dir) / kind), is_default=True)
    return True


def folders(kind: str) -> list[Path]:
    try:
        import folder_paths

        return [Path(p) for p in folder_paths.get_folder_paths(kind)]
    except (ImportError, KeyError):
        return []


def choices(kind: str, with_none: bool = True) -> list[str]:
    """Names of the sub-folders (one level, or two: `group/name`) holding the kind's marker file."""
    marker = KINDS[kind]
    names: set[str] = set()
    for root in folders(kind):
        if not root.is_dir():
            continue
        for sub in root.iterdir():
            if (sub / marker).is_file():
                names.add(sub.name)
            elif sub.is_dir():
                names.update(f"{sub.name}/{s.name}" for s in sub.iterdir() if (s / marker).is_file())
    return ([NONE] if with_none else []) + sorted(names)


def file_choices(kind: str, suffix: str, with_none: bool = True) -> list[str]:
    """Files ending in `suffix` in the kind's folders (sub-folders as `sub/name`)."""
    names: set[str] = set()
    for root in folders(kind):
        if root.is_dir():
            names.update(str(f.relative_to(root)) for f in root.rglob(f"*{suffix}") if f.is_file())
    return ([NONE] if with_none else []) + sorted(names)


def resolve(kind: str, name: str, path: str = "", what: str = "") -> str | None:
    """The folder (or ray: address) chosen by a dropdown `name` or a typed `path` (path wins); None for none."""
    label = what or kind
    if path and str(path).strip():
        p = str(path).strip()
        if p.startswith("ray:"):
            return p
        folder = Path(p).expanduser()
        if not folder.exists():
            raise ValueError(f"input '{label}_path': {folder} does not exist")
        return str(folder)
    if not name or name == NONE:
        return None
    for root in folders(kind):
        cand = root / name
        if cand.exists():
            return str(cand)
    raise ValueError(f"input '{label}': {name!r} is not in any {kind} folder ({', '.join(map(str, folders(kind))) or 'none registered'})")


def require(kind: str, name: str, path: str, what: str, node: str, hint: str) -> str:
    """`resolve` for an input the node cannot run without: every error names the node, and no choice
    at all says `hint` (what to choose or set)."""
    try:
        resolved = resolve(kind, name, path, what)
    except ValueError as exc:
        raise ValueError(f"{node}: {exc}") from exc
    if resolved is None:
        raise ValueError(f"{node}: input '{what or kind}': {hint}")
    return resolved


def fingerprint_of(kind: str, name: str, path: str = "", what: str = "", missing: str = "missing") -> str:
    """IS_CHANGED of a dropdown + `*_path` pair: the chosen folder's file fingerprint ("" for none,
    `missing` when the choice does not resolve), so a rebuilt vault or projector re-runs the node."""
    from .host import fingerprint

    try:
        resolved = resolve(kind, name, path, what)
    except ValueError:
        return missing
    return fingerprint(resolved) if resolved else ""
