"""`luna vault build | query | serve`: a Hydra app over conf/vault.yaml.

Errors the user can fix print one line on stderr and exit 2. `query format=json` prints exactly
one JSON object on stdout; everything else (warnings, Ray and model logs) goes to stderr.
"""
from __future__ import annotations

import contextlib
import json
import logging
import sys
import time
from pathlib import Path

ACTIONS = ("build", "query", "serve")
USAGE = """usage: luna vault build pairs=DIR out=DIR [index=FACTORY_STRING] [mode=stored|prompts] [memory_budget=4G]
       luna vault query vault=DIR|ray:NAME image=PATH [k=10] [format=text|json] [category=auto|NAME] [sheet=PATH]
       luna vault serve vault=DIR [name=luna-vault] [ray_address=...]"""
JSON_FIELDS = ("key", "prompt", "score", "category", "checkpoint")


def _build(c: dict) -> None:
    from vault.build import build_vault

    if not c["pairs"] or not c["out"]:
        raise ValueError("build needs pairs=DIR and out=DIR")
    t0 = time.perf_counter()
    m = build_vault(c["pairs"], c["out"], index=c["index"], mode=c["mode"], memory_budget=c["memory_budget"],
                    categories=c["categories"], tune_recall=c["tune_recall"], shards=c["shards"], rebuild=c["rebuild"],
                    tune_latency_ms=c.get("tune_latency_ms"), tune_queries=c.get("tune_queries", 1000))
    size = sum(f.stat().st_size for f in Path(c["out"]).rglob("*") if f.is_file())
    t = m.tuning or {}
    missed = "" if t.get("met", True) else f", TARGET {t.get('target')} NOT MET"
    print(f"vault {c['out']}: {m.count} images, {m.num_prompts} prompts, mode {m.mode}, "
          f"index {m.index_spec} ({m.search_params or 'exact'}, recall@10 {m.tuned_recall:.4f} on "
          f"{t.get('method', 'held-in')} queries{missed}), "
          f"categories {sorted(m.categories) or '-'}, {size / max(1, m.count):.0f} B/image, "
          f"{time.perf_counter() - t0:.1f} s")


def _table(neighbours: list[dict]) -> str:
    rows = [("#", "score", "key", "category", "checkpoint", "prompt")]
    rows += [(str(i + 1), f"{n['score']:.4f}", n["key"], n["category"], n["checkpoint"], n["prompt"][:70])
             for i, n in enumerate(neighbours)]
    widths = [max(len(r[i]) for r in rows) for i in range(5)]
    return "\n".join("  ".join(r[i].ljust(widths[i]) for i in range(5)) + "  " + r[5] for r in rows)


def _query(c: dict) -> str:
    from PIL import Image, UnidentifiedImageError

    from vault.contact_sheet import contact_sheet
    from vault.service import open_vault

    if not c["vault"] or not c["image"]:
        raise ValueError("query needs vault=DIR (or ray:NAME) and image=PATH")
    if c["format"] not in ("text", "json"):
        raise ValueError(f"format={c['format']!r}: expected text or json")
    path = Path(c["image"])
    try:
        image = Image.open(path).convert("RGB")
    except (OSError, UnidentifiedImageError) as e:
        raise ValueError(f"image={path}: not a readable image ({e})") from e
    is_dir = Path(str(c["vault"])).is_dir()
    vault = open_vault(c["vault"], **({"vision_weights": c["vision_weights"], "device": c["device"]} if is_dir else {}))
    filters = {key: v for key, v in (c["filters"] or {}).items() if v is not None}
    found = vault.search(vault.embed_images([image]), k=c["k"], category=c["category"], filters=filters or None,
                         weighting=c["weighting"], temperature=c["temperature"])
    neighbours = found.neighbours[0]
    if c["sheet"] != "":
        sheet = Path(c["sheet"]) if c["sheet"] else path.with_name(f"{path.stem}_vault.png")
        shards = vault.info().get("shard_folders", [])
        sheet, n_real = contact_sheet(image, neighbours, shards, sheet)
        print(f"contact sheet: {sheet} ({n_real}/{len(neighbours)} images found in the shards)", file=sys.stderr)
    if c["format"] == "json":
        return json.dumps({"neighbours": [{k: n[k] for k in JSON_FIELDS} for n in neighbours]})
    return _table(neighbours)


def _serve(c: dict) -> None:
    import ray

    from vault.service import serve, stop

    if not c["vault"]:
        raise ValueError("serve needs vault=DIR")
    started_here = False
    if not ray.is_initialized():
        if c["ray_address"]:
            ray.init(address=c["ray_address"], namespace=c["namespace"])
        else:
            try:
                ray.init(address="auto", namespace=c["namespace"])
            except ConnectionError:
                # no dashboard; the service opens no port of its own, it is reached through Ray only
                ray.init(namespace=c["namespace"], include_dashboard=False)
                started_here = True
    _, info = serve(c["vault"], name=c["name"], namespace=c["namespace"], device=c["device"],
                    vision_weights=c["vision_weights"], num_cpus=c["num_cpus"], resources=c["resources"] or None,
                    replace=c["replace"])
    print(f"vault service {c['name']!r} ready: {info['count']} images, mode {info['mode']}, "
          f"vision {info['vision_model']}{' (not loaded: ' + info['vision_error'] + ')' if info['vision_error'] else ''}; "
          f"use vault.address=ray:{c['name']}", flush=True)
    if not (c["block"] or started_here):
        return
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        stop(c["name"], c["namespace"])
        print(f"vault service {c['name']!r} stopped", file=sys.stderr)


def run(cfg) -> None:
    """One action of conf/vault.yaml (`cfg.action`); `query format=json` prints only its JSON on stdout."""
    from luna.settings import plain

    c = plain(cfg)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(levelname)s %(name)s: %(message)s")
    if c["action"] == "build":
        _build(c)
    elif c["action"] == "query":
        with contextlib.redirect_stdout(sys.stderr):  # model and Ray chatter must not mix with the answer
            answer = _query(c)
        print(answer)
    else:
        _serve(c)


def main(argv: list[str] | None = None) -> int:
    from luna.cli import EXIT_USER_ERROR, run_stage

    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(USAGE)
        return 0
    action = argv[0]
    if action not in ACTIONS:
        print(f"luna vault: unknown action {action!r}\n{USAGE}", file=sys.stderr)
        return EXIT_USER_ERROR
    return run_stage(f"luna vault {action}", f"vault_{action}", run, argv[1:])


if __name__ == "__main__":
    sys.exit(main())
