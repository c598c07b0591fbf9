"""Real ComfyUI in this process, for tests and benchmarks (no fakes).

`start(work)` copies ../shared/vendor/ComfyUI into `work` (it writes output/, temp/, user/ under
its own folder, and shared/ is read-only), links the project's comfyui/ folder into its
custom_nodes/, imports it on CPU, runs its own custom-node loading, and registers the tiny
model config (comfy_tiny.py). `run(prompt)` drives ComfyUI's executor on an API-format prompt
and returns (outputs by node id, error message or None). `VENDOR` is None when ComfyUI is absent.
"""
from __future__ import annotations

import asyncio
import logging
import os
import shutil
import sys
import uuid
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[2]
_vendor = ROOT.parent / "shared" / "vendor" / "ComfyUI"
if not _vendor.is_dir():  # a worktree: shared/ sits next to the main checkout
    _vendor = Path("/work/shared/vendor/ComfyUI") if Path("/work/shared/vendor/ComfyUI").is_dir() else _vendor
VENDOR = _vendor if (_vendor / "comfyui_version.py").is_file() else None
SKIP_REASON = "real ComfyUI is not in ../shared/vendor/ComfyUI (it is only there in the project's own checkout)"
PACKAGE_NAME = "luna-foundry"
TINY_CKPT = "tiny-base-0.safetensors"

_state: dict = {}


def start(work: Path) -> dict:
    """ComfyUI imported from a private copy under `work`; returns its state (idempotent per process)."""
    if _state:
        return _state
    if VENDOR is None:
        raise RuntimeError(SKIP_REASON)
    work = Path(work)
    base = work / "ComfyUI"
    if not base.exists():
        shutil.copytree(VENDOR, base, ignore=shutil.ignore_patterns("__pycache__", ".git"))
        os.chmod(base, 0o755)
        for sub in ("custom_nodes", "models", "output", "input", "temp", "user"):
            (base / sub).mkdir(exist_ok=True)
            os.chmod(base / sub, 0o755)
    link = base / "custom_nodes" / PACKAGE_NAME
    if not link.exists():
        link.symlink_to(ROOT / "comfyui", target_is_directory=True)
    sys.path.insert(0, str(base))
    import utils.install_util  # noqa: F401  ComfyUI's utils package, bound first as main.py does (comfy/utils.py would shadow it)
    # ComfyUI reads its settings on import: CPU only, no argv parsing of the test runner's flags
    import comfy.options

    comfy.options.args_parsing = False
    import comfy.cli_args

    comfy.cli_args.args.cpu = True
    comfy.cli_args.args.disable_all_custom_nodes = False
    logging.getLogger().setLevel(logging.WARNING)
    import folder_paths

    folder_paths.set_output_directory(str(base / "output"))
    folder_paths.set_temp_directory(str(base / "temp"))
    folder_paths.set_input_directory(str(base / "input"))
    folder_paths.set_user_directory(str(base / "user")) if hasattr(folder_paths, "set_user_directory") else None
    import execution
    import nodes

    failed_builtin = asyncio.run(nodes.init_extra_nodes(init_custom_nodes=True, init_api_nodes=False))
    import comfy_tiny

    comfy_tiny.register()

    class Server:  # PromptExecutor's server: only these are used without a web client
        client_id = None
        last_node_id = None
        last_prompt_id = None

        def send_sync(self, *a, **k):
            pass

    _state.update(base=base, nodes=nodes, execution=execution, folder_paths=folder_paths,
                  executor=execution.PromptExecutor(Server(), cache_type=execution.CacheType.CLASSIC,
                                                      cache_args={"lru": 0, "ram": 0}), failed_builtin=failed_builtin)
    return _state


def run(prompt: dict, executor=None) -> tuple[dict, str | None]:
    """Validate and execute an API-format prompt; (outputs {node id: output tuple}, error message or None)."""
    execution = _state["execution"]
    executor = executor or _state["executor"]
    pid = str(uuid.uuid4())
    valid = asyncio.run(execution.validate_prompt(pid, prompt, None))
    if not valid[0] or valid[3]:  # strict: a node error fails the prompt even if other outputs would run
        details = "; ".join(f"{nid}: " + ", ".join(f"{e['message']}: {e.get('details', '')}" for e in err["errors"])
                            for nid, err in valid[3].items())
        head = valid[1] or {}
        return {}, f"invalid prompt: {head.get('message', '')} {head.get('details', '')} {details}"
    executor.execute(prompt, pid, {}, valid[2])
    for event, data in executor.status_messages:
        if event == "execution_error":
            return {}, f"{data['node_type']} ({data['node_id']}): {data['exception_type']}: {data['exception_message']}"
    outputs = {}
    for nid in prompt:
        entry = executor.caches.outputs.get(nid) if hasattr(executor.caches.outputs, "get") else None
        if entry is not None:
            outputs[nid] = getattr(entry, "outputs", entry)
    return outputs, None


def canvas_image(size: int = 128, seed: int = 0) -> torch.Tensor:
    """A ComfyUI IMAGE [1, size, size, 3] of smooth colour blobs on the 1/255 grid."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / size
    img = np.stack([0.5 + 0.4 * np.sin(2 * np.pi * (f * xx + g * yy) + p)
                    for f, g, p in rng.uniform(0.5, 2.0, (3, 3))], -1)
    return torch.from_numpy(np.round(img * 255) / 255).float()[None]
