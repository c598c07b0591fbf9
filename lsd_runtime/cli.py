"""`luna refine`: the Luna Semantic Detailer as a Hydra app over conf/refine.yaml.

    luna refine image=portrait.png prompt="..." out=DIR checkpoint=/models/x.safetensors \
        vault=/data/vaults/faces detect.prompts=[face,hand]
    luna refine image=astronaut.png prompt="an astronaut" out=DIR preset=tiny

Errors a user can fix (unreadable image, not an SDXL checkpoint, a vault or projector of another
vision model, ...) print one line on stderr and exit 2.
"""
from __future__ import annotations

import logging
import sys
from pathlib import Path

EXIT_USER_ERROR = 2
USAGE = """usage: luna refine image=PATH prompt=TEXT out=DIR [checkpoint=PATH | preset=tiny]
                   [vault=DIR | vault.address=ray:NAME] [projector=DIR] [detect.prompts=[face,hand]]
                   [from_draft=true] [seed=0] [detail.working_size=1024] [refine.tile=1024] ...
See docs/runtime.md."""

# preset=tiny: small sizes so a whole run takes seconds on CPU (any of these can still be overridden)
TINY_OVERRIDES = {
    "detail.working_size": "128", "detail.min_crop": "32", "detail.feather": "8.0", "detail.steps": "3",
    "detail.strength": "0.5", "detail.cfg": "3.0", "refine.tile": "256", "refine.steps": "3",
    "refine.strength": "0.4", "refine.cfg": "3.0", "draft.canvas": "512", "draft.draft": "128",
    "draft.smooth": "192", "draft.steps": "3",
}
ALIASES = {"vault.address": "vault", "vault.path": "vault"}
TEXT_KEYS = ("prompt", "negative")  # free text: commas and brackets are not Hydra syntax here


def _rewrite(argv: list[str]) -> list[str]:
    """vault.address=X -> vault=X; prompts quoted for Hydra; preset=tiny adds the tiny sizes the user did not set."""
    out = []
    for a in argv:
        key, eq, val = a.partition("=")
        if eq and key in ALIASES:
            a = f"{ALIASES[key]}={val}"
        elif eq and key.lstrip("+") in TEXT_KEYS and val and val[0] not in "'\"":
            a = key + "='" + val.replace("'", "\\'") + "'"
        out.append(a)
    if any(a in ("preset=tiny", "+preset=tiny") for a in out):
        given = {a.partition("=")[0].lstrip("+~") for a in out}
        out = [f"{k}={v}" for k, v in TINY_OVERRIDES.items() if k not in given] + out
    return out


def _batch(value, sampler, working: int, cfg: float) -> int:
    from lsd_runtime.sampler import auto_batch_size

    if value in (None, "auto"):
        return auto_batch_size(sampler, working, cfg > 1.0)
    return int(value)


def settings_from(c: dict, components):
    from lsd_runtime.detailer import DetailSettings
    from lsd_runtime.refiner import RefineTileSettings
    from lsd_runtime.sampler import SamplerSettings
    from lsd_runtime.workflow import DraftSettings, RefineSettings

    d, r = c["detail"], c["refine"]
    sampler = components.sampler
    return RefineSettings(
        seed=int(c["seed"]),
        detect_prompts=list(c["detect"].get("prompts") or []),
        detail_sampler=SamplerSettings(int(d["steps"]), float(d["strength"]), float(d["cfg"]), str(d["sampler"])),
        refine_sampler=SamplerSettings(int(r["steps"]), float(r["strength"]), float(r["cfg"]), str(r["sampler"])),
        detail=DetailSettings(working_size=int(d["working_size"]), pad=float(d["pad"]), min_crop=int(d["min_crop"]),
                              skip_below=int(d["skip_below"]), feather=float(d["feather"]), grow=float(d["grow"]),
                              batch_size=_batch(d["batch_size"], sampler, int(d["working_size"]), float(d["cfg"]))),
        tiles=RefineTileSettings(tile=int(r["tile"]), overlap=r["overlap"], passes=str(r.get("passes", "chessboard")),
                                 batch_size=_batch(r["batch_size"], sampler, int(r["tile"]), float(r["cfg"]))),
        global_refine=bool(r["enabled"]),
        refine_conditioning=str(r["conditioning"]),
        from_draft=bool(c["from_draft"]),
        draft=DraftSettings(**{k: c["draft"][k] for k in ("canvas", "draft", "smooth", "draft_strength",
                                                           "smooth_strength", "steps")}),
        final_size=c["final_size"],
    )


def build_conditioning(c: dict, components, prompt: str, negative):
    """The crops' conditioning source from the config: text, text + vault, or text + projector."""
    from lsd_runtime.conditioning import (ConditioningError, ProjectorSource, TextSource,
                                          VaultSource, WithImageEmbeds, open_projector)

    text = TextSource(components.encoders, prompt, negative,
                      force_zeros_for_empty_prompt=components.sampler.force_zeros_for_empty_prompt)
    if c["vault"] and c["projector"]:
        raise ConditioningError("give vault= or projector=, not both")
    source, embedder = text, None
    ret = c["retrieval"]
    if c["vault"]:
        from vault.service import open_vault

        vault = open_vault(str(c["vault"]))
        embedder = _embedder(c, components, vault.info().get("vision_model"))
        family = str(ret.get("family") or "same")
        source = VaultSource(vault, text, embedder, k=int(ret["k"]), weight=float(ret["weight"]),
                             blend=str(ret["blend"]), category=ret["category"], weighting=str(ret["weighting"]),
                             family=family,
                             te_fingerprint=components.te_fingerprint if family in ("same", "any") else None)
    elif c["projector"]:
        import json

        path = Path(str(c["projector"]))
        cfg_file = (path if path.is_dir() else path.parent) / "projector.json"
        model = json.loads(cfg_file.read_text()).get("vision_model") if cfg_file.is_file() else None
        embedder = _embedder(c, components, model)
        proj = open_projector(path, embedder, device=str(components.sampler.device))
        source = ProjectorSource(proj, text, embedder, weight=float(ret["weight"]), blend=str(ret["blend"]))
    if c["ip_adapter"]["weights"]:
        from lsd_runtime.ip_adapter import IPAdapterError, load_ip_adapter

        embedder = embedder or _embedder(c, components, None)
        dim = load_ip_adapter(components.pipe, c["ip_adapter"]["weights"], float(c["ip_adapter"]["scale"]))
        if dim != embedder.dim:
            raise IPAdapterError(f"{c['ip_adapter']['weights']}: the IP-Adapter takes {dim}-d image embeddings, the "
                                 f"vision tower {embedder.model_id!r} gives {embedder.dim}-d (set vision.name)")
        source = WithImageEmbeds(source, embedder)
    return source


def _embedder(c: dict, components, model_id):
    from lsd_runtime.conditioning import CropEmbedder, same_vision_model
    from luna.models.vision import load_vision

    name = c["vision"]["name"] or (str(model_id).removeprefix("open_clip:") if model_id else None)
    if name is None:
        name = "tiny" if c["preset"] == "tiny" else None
    if name is None:
        raise ValueError("set vision.name (and vision.weights) to the tower that embeds the crops")
    tower = components.vision
    if tower is None or not same_vision_model(tower.model_id, name):
        tower = load_vision(name, c["vision"]["weights"], device=str(components.sampler.device))
    return CropEmbedder(tower)


def make_detector_from(c: dict):
    from lsd_runtime.detect import make_detector

    d = dict(c["detect"])
    name = d.pop("name")
    d.pop("prompts", None)
    if name == "cascade":
        return make_detector("cascade")
    if name == "file":
        return make_detector("file", path=d.get("path"))
    kw = {"weights": d.get("weights")}
    if d.get("threshold") is not None:
        kw["threshold"] = float(d["threshold"])
    return make_detector(name, **kw)


def run(c: dict) -> dict:
    """The task body (plain dict config); returns the written files."""
    from lsd_runtime.record import write_outputs
    from lsd_runtime.scaffold import NoiseScaffold
    from lsd_runtime.workflow import load_components, read_image, refine

    if not c["out"]:
        raise ValueError("give out=DIR")
    image = None
    if c["image"]:
        image = read_image(c["image"])
    elif not c["from_draft"]:
        raise ValueError("give image=PATH (or from_draft=true)")
    components = load_components(c["checkpoint"], c["preset"], c["device"], c["dtype"])
    prompt, negative = str(c["prompt"] or ""), c["negative"]
    settings = settings_from(c, components)
    detector = make_detector_from(c)
    scaffold = NoiseScaffold.load(c["scaffold"]) if c["scaffold"] else None
    try:
        source = build_conditioning(c, components, prompt, negative)
        result = refine(image, prompt, components=components, detector=detector, conditioning=source,
                        settings=settings, negative=negative, scaffold=scaffold)
    finally:
        if getattr(components.sampler, "has_ip_adapter", False):
            components.pipe.unload_ip_adapter()
    result.record["input"] = {"image": c["image"], "checkpoint": c["checkpoint"], "preset": c["preset"],
                              "vault": c["vault"], "projector": c["projector"]}
    inner = getattr(source, "source", source)
    if hasattr(inner, "describe"):  # a vault source: its family filter, and the warning of retrieval.family=any
        result.record["retrieval"] = inner.describe()
    return write_outputs(result, c["out"])


def _task(cfg, outcome: dict) -> None:
    from omegaconf import OmegaConf

    c = OmegaConf.to_container(cfg, resolve=True)
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr, format="%(levelname)s %(name)s: %(message)s")
    try:
        outcome["files"] = run(c)
    except (ValueError, FileNotFoundError) as e:  # user errors are ValueError subclasses (CONTRIBUTING.md)
        outcome["error"] = str(e)


def main(argv: list[str] | None = None) -> int:
    from luna.cli import run_hydra

    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in ("-h", "--help", "help"):
        print(USAGE)
        return 0
    outcome: dict = {}
    try:
        run_hydra(lambda cfg: _task(cfg, outcome), "refine", _rewrite(argv), prog="luna refine")
    except SystemExit as e:  # Hydra printed what was wrong with the overrides
        return EXIT_USER_ERROR if e.code not in (0, None) else 0
    if "error" in outcome:
        print(f"luna refine: error: {outcome['error']}", file=sys.stderr)
        return EXIT_USER_ERROR
    files = outcome.get("files", {})
    print(f"luna refine: wrote {files.get('image')} and {files.get('record')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
