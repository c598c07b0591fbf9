"""`luna vault build | query | serve`: Hydra apps over conf/vault_build.yaml, vault_query.yaml, vault_serve.yaml.

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


def _build(config: dict) -> None:
    from vault.build import build_vault

    if not config["pairs"] or not config["out"]:
        raise ValueError("build needs pairs=DIR and out=DIR")
    t0 = time.perf_counter()
    options = ("index", "mode", "memory_budget", "categories", "tune_recall", "tune_latency_ms", "tune_queries",
               "shards", "rebuild")
    manifest = build_vault(config["pairs"], config["out"], **{key: config[key] for key in options if key in config})
    size = sum(path.stat().st_size for path in Path(config["out"]).rglob("*") if path.is_file())
    tuning = manifest.tuning or {}
    missed = "" if tuning.get("met", True) else f", TARGET {tuning.get('target')} NOT MET"
    if tuning.get("stale"):
        missed += ", STALE: tuned before the last add (rebuild=true to re-tune)"
    print(f"vault {config['out']}: {manifest.count} images, {manifest.num_prompts} prompts, mode {manifest.mode}, "
          f"index {manifest.index_spec} ({manifest.search_params or 'exact'}, recall@10 {manifest.tuned_recall:.4f} on "
          f"{tuning.get('method', 'held-in')} queries{missed}), "
          f"categories {sorted(manifest.categories) or '-'}, {size / max(1, manifest.count):.0f} B/image, "
          f"{time.perf_counter() - t0:.1f} s")


def _table(neighbours: list[dict]) -> str:
    rows = [("#", "score", "key", "category", "checkpoint", "prompt")]
    rows += [(str(rank + 1), f"{found['score']:.4f}", found["key"], found["category"], found["checkpoint"],
              found["prompt"][:70]) for rank, found in enumerate(neighbours)]
    widths = [max(len(row[col]) for row in rows) for col in range(5)]
    return "\n".join("  ".join(row[col].ljust(widths[col]) for col in range(5)) + "  " + row[5] for row in rows)


def _query(config: dict) -> str:
    from PIL import Image, UnidentifiedImageError

    from vault.contact_sheet import contact_sheet
    from vault.service import open_vault

    if not config["vault"] or not config["image"]:
        raise ValueError("query needs vault=DIR (or ray:NAME) and image=PATH")
    if config["format"] not in ("text", "json"):
        raise ValueError(f"format={config['format']!r}: expected text or json")
    path = Path(config["image"])
    try:
        image = Image.open(path).convert("RGB")
    except (OSError, UnidentifiedImageError) as error:
        raise ValueError(f"image={path}: not a readable image ({error})") from error
    is_dir = Path(str(config["vault"])).is_dir()
    local = {"vision_weights": config["vision_weights"], "device": config["device"]} if is_dir else {}
    vault = open_vault(config["vault"], **local)
    filters = {key: value for key, value in (config["filters"] or {}).items() if value is not None}
    found = vault.search(vault.embed_images([image]), k=config["k"], category=config["category"],
                         filters=filters or None, weighting=config["weighting"], temperature=config["temperature"])
    neighbours = found.neighbours[0]
    if config["sheet"] != "":
        sheet = Path(config["sheet"]) if config["sheet"] else path.with_name(f"{path.stem}_vault.png")
        shards = vault.info().get("shard_folders", [])
        sheet, n_real = contact_sheet(image, neighbours, shards, sheet)
        print(f"contact sheet: {sheet} ({n_real}/{len(neighbours)} images found in the shards)", file=sys.stderr)
    if config["format"] == "json":
        return json.dumps({"neighbours": [{field: found[field] for field in JSON_FIELDS} for found in neighbours]})
    return _table(neighbours)


def _serve(config: dict) -> None:
    import ray

    from vault.service import serve, stop

    if not config["vault"]:
        raise ValueError("serve needs vault=DIR")
    started_here = False
    if not ray.is_initialized():
        if config["ray_address"]:
            ray.init(address=config["ray_address"], namespace=config["namespace"])
        else:
            try:
                ray.init(address="auto", namespace=config["namespace"])
            except ConnectionError:
                # no dashboard; the service opens no port of its own, it is reached through Ray only
                ray.init(namespace=config["namespace"], include_dashboard=False)
                started_here = True
    _, info = serve(config["vault"], name=config["name"], namespace=config["namespace"], device=config["device"],
                    vision_weights=config["vision_weights"], num_cpus=config["num_cpus"],
                    resources=config["resources"] or None, replace=config["replace"])
    print(f"vault service {config['name']!r} ready: {info['count']} images, mode {info['mode']}, "
          f"vision {info['vision_model']}{' (not loaded: ' + info['vision_error'] + ')' if info['vision_error'] else ''}; "
          f"use vault=ray:{config['name']}", flush=True)
    if not (config["block"] or started_here):
        return
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        stop(config["name"], config["namespace"])
        print(f"vault service {config['name']!r} stopped", file=sys.stderr)


def run(cfg) -> None:
    """One action (`cfg.action`, conf/vault_<action>.yaml); `query format=json` prints only its JSON on stdout."""
    from luna.settings import plain

    config = plain(cfg)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(levelname)s %(name)s: %(message)s")
    if config["action"] == "build":
        _build(config)
    elif config["action"] == "query":
        with contextlib.redirect_stdout(sys.stderr):  # model and Ray chatter must not mix with the answer
            answer = _query(config)
        print(answer)
    else:
        _serve(config)


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
