"""Render an example workflow with ComfyUI's own frontend in headless Chromium (the README's picture).

    .venv/bin/python scripts/render_comfyui_workflow.py comfyui/workflows/luna_4k_detail.json \
        --out comfyui/docs/luna_4k_detail.png

Starts the vendored ComfyUI (../shared/vendor/ComfyUI, copied into a temporary folder with this
project's comfyui/ linked into custom_nodes/) on CPU with its frontend (comfyui-frontend-package),
opens it in headless Chromium (Debian's `chromium`), loads the API-format workflow through the
frontend's own `app.loadApiJson`, fits the view and saves a screenshot over the DevTools protocol.
Names the workflow refers to (checkpoint, vault, projector, images) get empty placeholder files so
the dropdowns show them.
"""
from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "comfyui"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_http(url: str, timeout: float, proc: subprocess.Popen, what: str) -> bytes:
    end = time.time() + timeout
    while time.time() < end:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=5) as r:
                return r.read()
        except OSError:
            time.sleep(1)
    raise RuntimeError(f"{what} did not answer {url} within {timeout:.0f} s")


def _placeholders(base: Path, workflow: dict) -> None:
    """Empty files / folders for the names the workflow's widgets use, so the dropdowns list them."""
    for node in workflow.values():
        inp = node["inputs"]
        kind = node["class_type"]
        if kind == "CheckpointLoaderSimple":
            (base / "models" / "checkpoints" / inp["ckpt_name"]).touch()
        if kind == "CLIPVisionLoader":
            (base / "models" / "clip_vision" / inp["clip_name"]).touch()
        if kind == "LoadImage":
            from PIL import Image

            Image.new("RGB", (64, 64), (128, 128, 128)).save(base / "input" / inp["image"])
        if kind == "LunaVaultQuery" or (kind.startswith("Luna") and inp.get("vault", "none") != "none"):
            d = base / "models" / "luna_vaults" / inp["vault"]
            d.mkdir(parents=True, exist_ok=True)
            (d / "manifest.json").write_text("{}")
        if kind == "LunaVisionTranslator":
            d = base / "models" / "luna_projectors" / inp["projector"]
            d.mkdir(parents=True, exist_ok=True)
            (d / "projector.json").write_text("{}")


async def _shoot(ws_url: str, page_url: str, workflow: dict, name: str, out: Path, width: int, height: int) -> None:
    import aiohttp

    async with aiohttp.ClientSession() as session:
        async with session.ws_connect(ws_url, max_msg_size=0) as ws:
            counter = [0]

            async def call(method: str, **params):
                counter[0] += 1
                mid = counter[0]
                await ws.send_json({"id": mid, "method": method, "params": params})
                while True:
                    msg = await ws.receive_json(timeout=120)
                    if msg.get("id") == mid:
                        if "error" in msg:
                            raise RuntimeError(f"{method}: {msg['error']}")
                        return msg.get("result", {})

            async def js(expr: str):
                r = await call("Runtime.evaluate", expression=expr, awaitPromise=True, returnByValue=True)
                if r.get("exceptionDetails"):
                    raise RuntimeError(f"in the page: {r['exceptionDetails']}")
                return r.get("result", {}).get("value")

            await call("Emulation.setDeviceMetricsOverride", width=width, height=height, deviceScaleFactor=1,
                       mobile=False)
            await call("Page.enable")
            await call("Page.navigate", url=page_url)
            end = time.time() + 180
            while not await js("!!(window.app && window.app.graph && window.app.canvas)"):
                if time.time() > end:
                    raise RuntimeError("the ComfyUI frontend did not start in the page")
                await asyncio.sleep(1)
            await asyncio.sleep(3)
            await js("document.querySelectorAll('.p-dialog-mask').forEach(e => e.remove())")
            await js(f"window.app.loadApiJson({json.dumps(workflow)}, {json.dumps(name)})")
            await asyncio.sleep(3)
            await js("""(async () => {
                try { await window.app.extensionManager.command.execute('Comfy.Canvas.FitView'); }
                catch (e) { window.app.canvas.ds.scale = 0.6; }
                window.app.canvas.setDirty(true, true); return true; })()""")
            await js("document.querySelectorAll('.p-dialog-mask, .p-toast').forEach(e => e.remove())")
            await asyncio.sleep(2)
            shot = await call("Page.captureScreenshot", format="png")
            out.write_bytes(base64.b64decode(shot["data"]))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("workflow")
    ap.add_argument("--out", required=True)
    ap.add_argument("--width", type=int, default=2200)
    ap.add_argument("--height", type=int, default=1100)
    ap.add_argument("--keep", action="store_true", help="keep the temporary ComfyUI folder")
    args = ap.parse_args(argv)

    import comfy_env

    if comfy_env.VENDOR is None:
        print(comfy_env.SKIP_REASON, file=sys.stderr)
        return 2
    chromium = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    if chromium is None:
        print("no chromium on PATH (apt-get install chromium)", file=sys.stderr)
        return 2
    wf_path = Path(args.workflow)
    workflow = json.loads(wf_path.read_text())
    work = Path(tempfile.mkdtemp(prefix="luna-render-"))
    base = work / "ComfyUI"
    shutil.copytree(comfy_env.VENDOR, base, ignore=shutil.ignore_patterns("__pycache__"))
    os.chmod(base, 0o755)
    for sub in ("custom_nodes", "models", "output", "input", "temp", "user", "models/checkpoints",
                "models/clip_vision"):
        (base / sub).mkdir(parents=True, exist_ok=True)
        os.chmod(base / sub, 0o755)
    (base / "custom_nodes" / comfy_env.PACKAGE_NAME).symlink_to(ROOT / "comfyui", target_is_directory=True)
    _placeholders(base, workflow)
    # first-run dialogs (templates, tutorial) would cover the graph
    settings = base / "user" / "default"
    settings.mkdir(parents=True, exist_ok=True)
    (settings / "comfy.settings.json").write_text(json.dumps({
        "Comfy.TutorialCompleted": True, "Comfy.Workflow.ShowMissingModelsWarning": False,
        "Comfy.Workflow.ShowMissingNodesWarning": False, "Comfy.Minimap.Visible": False}))
    port, dport = _free_port(), _free_port()
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    server = subprocess.Popen([sys.executable, "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(port),
                               "--disable-auto-launch"], cwd=base, env=env, stdout=subprocess.DEVNULL,
                              stderr=open(work / "server.log", "w"))
    browser = None
    try:
        _wait_http(f"http://127.0.0.1:{port}/system_stats", 300, server, "ComfyUI")
        profile = work / "chromium-profile"
        browser = subprocess.Popen([chromium, "--headless=new", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                                    f"--remote-debugging-port={dport}", f"--user-data-dir={profile}",
                                    f"--window-size={args.width},{args.height}", "about:blank"],
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        pages = json.loads(_wait_http(f"http://127.0.0.1:{dport}/json/list", 60, browser, "chromium"))
        page = next(p for p in pages if p.get("type") == "page")
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        asyncio.run(_shoot(page["webSocketDebuggerUrl"], f"http://127.0.0.1:{port}/", workflow, wf_path.name, out,
                           args.width, args.height))
        print(f"wrote {out}")
    finally:
        for proc in (browser, server):
            if proc is not None and proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    proc.kill()
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
        else:
            print(f"kept {work}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
