"""Render an example workflow with ComfyUI's own frontend in headless Chromium (the README's picture).

    .venv/bin/python scripts/render_comfyui_workflow.py comfyui/workflows/luna_4k_detail.json \
        --out comfyui/docs/luna_4k_detail.png

Starts the vendored ComfyUI (../shared/vendor/ComfyUI, copied into a temporary folder with this
project's comfyui/ linked into custom_nodes/) on CPU with its frontend (comfyui-frontend-package),
opens it in headless Chromium (Debian's `chromium`), loads the API-format workflow through the
frontend's own `app.loadApiJson`, fits the view and saves a screenshot over the DevTools protocol.
Names the workflow refers to (checkpoint, vault, projector, images) get empty placeholder files so
the dropdowns show them. `--matplotlib` draws the graph from the JSON instead (no browser needed).
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
                // LiteGraph hides titles and widgets below 0.6 zoom ("low quality"): draw them anyway
                window.app.canvas.low_quality_zoom_threshold = 0;
                window.app.canvas.setDirty(true, true); return true; })()""")
            await js("document.querySelectorAll('.p-dialog-mask, .p-toast').forEach(e => e.remove())")
            await asyncio.sleep(2)
            shot = await call("Page.captureScreenshot", format="png")
            out.write_bytes(base64.b64decode(shot["data"]))


def draw_graph(workflow: dict, out: Path) -> None:
    """The workflow as a left-to-right graph (columns by longest path from the sources), with matplotlib."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import FancyArrowPatch, FancyBboxPatch

    links = [(src[0], nid, name) for nid, node in workflow.items() for name, src in node["inputs"].items()
             if isinstance(src, list) and len(src) == 2 and str(src[0]) in workflow]
    depth = {nid: 0 for nid in workflow}
    for _ in workflow:
        for a, b, _n in links:
            depth[b] = max(depth[b], depth[a] + 1)
    cols: dict[int, list[str]] = {}
    for nid in sorted(workflow, key=int):
        cols.setdefault(depth[nid], []).append(nid)
    w, h, gx, gy = 3.2, 1.25, 1.0, 0.45
    pos = {nid: (c * (w + gx), -r * (h + gy)) for c, ids in cols.items() for r, nid in enumerate(ids)}
    fig, ax = plt.subplots(figsize=(2.2 + len(cols) * (w + gx) * 0.9, 1.5 + max(map(len, cols.values())) * 1.3))
    for nid, node in workflow.items():
        x, y = pos[nid]
        luna = node["class_type"].startswith("Luna")
        ax.add_patch(FancyBboxPatch((x, y - h), w, h, boxstyle="round,pad=0.04", lw=1.2,
                                    fc="#2b2540" if luna else "#353535", ec="#b48cff" if luna else "#777"))
        title = node.get("_meta", {}).get("title") or node["class_type"]
        ax.text(x + 0.1, y - 0.22, title, color="white", fontsize=8.5, weight="bold", va="center")
        widgets = [f"{k}: {v}" for k, v in node["inputs"].items() if not isinstance(v, list)][:5]
        ax.text(x + 0.1, y - 0.42, "\n".join(widgets), color="#cfcfcf", fontsize=6.2, va="top", family="monospace")
    for a, b, name in links:
        (xa, ya), (xb, yb) = pos[str(a)], pos[b]
        ax.add_patch(FancyArrowPatch((xa + w, ya - 0.3), (xb, yb - 0.3), arrowstyle="-|>", mutation_scale=8,
                                     color="#8fb3ff", lw=0.9, connectionstyle="arc3,rad=0.08"))
    xs = [p[0] for p in pos.values()]
    ys = [p[1] for p in pos.values()]
    ax.set_xlim(min(xs) - 0.3, max(xs) + w + 0.3)
    ax.set_ylim(min(ys) - h - 0.3, max(ys) + 0.3)
    ax.set_aspect("equal")
    ax.axis("off")
    fig.patch.set_facecolor("#202020")
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=130, bbox_inches="tight", facecolor=fig.get_facecolor())
    plt.close(fig)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("workflow")
    ap.add_argument("--out", required=True)
    ap.add_argument("--width", type=int, default=2600)
    ap.add_argument("--height", type=int, default=1000)
    ap.add_argument("--keep", action="store_true", help="keep the temporary ComfyUI folder")
    ap.add_argument("--matplotlib", action="store_true", help="draw the graph from the JSON (no ComfyUI, no browser)")
    args = ap.parse_args(argv)
    if args.matplotlib:
        draw_graph(json.loads(Path(args.workflow).read_text()), Path(args.out))
        print(f"wrote {args.out}")
        return 0

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
        "Comfy.Workflow.ShowMissingNodesWarning": False, "Comfy.Minimap.Visible": False,
        "LiteGraph.Canvas.LowQualityRenderingZoomThreshold": 0.0}))
    port, dport = _free_port(), _free_port()
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    server = subprocess.Popen([sys.executable, "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(port),
                               "--disable-auto-launch"], cwd=base, env=env, stdout=subprocess.DEVNULL,
                              stderr=open(work / "server.log", "w"))
    browser = None
    try:
        _wait_http(f"http://127.0.0.1:{port}/system_stats", 900, server, "ComfyUI")  # minutes on a busy machine
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
