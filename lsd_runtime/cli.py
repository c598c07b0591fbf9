"""`luna refine`: the Luna Semantic Detailer as a Hydra app over conf/refine.yaml.

    luna refine image=portrait.png prompt="..." out=DIR checkpoint=/models/x.safetensors \
        vault=/data/vaults/faces detect=owlv2 detect.weights=/models/owlv2 detect.prompts=[face,hand]
    luna refine image=astronaut.png prompt="an astronaut" out=DIR preset=tiny

Settings come from the composed config: `RefineSettings` is built from its keys by OmegaConf
(`settings_from_config`), the detector by `_target_` instantiation of `detect` (conf/detect/),
the preset sizes (and, for toy, the checkpoint and vision tower files) from conf/preset/. Errors a user can fix (unreadable image, not an SDXL
checkpoint, a vault or projector of another vision model, ...) print one line and exit 2.
"""
from __future__ import annotations

import logging
import sys
from pathlib import Path

USAGE = """usage: luna refine image=PATH prompt=TEXT out=DIR [checkpoint=PATH | preset=toy | preset=tiny]
                   [vault=DIR|ray:NAME] [projector=DIR] [detect=cascade|file|owlv2|sam3 detect.prompts=[face,hand]]
                   [from_draft=true] [seed=0] [detail.working_size=1024] [refine.tile=1024] ...
See docs/runtime.md."""
FREE_TEXT = ("prompt", "negative")  # taken verbatim: commas and brackets in a prompt are not Hydra syntax


def make_detector_from(detect_cfg):
    """The detector a `detect` config node describes (`_target_` + constructor keys; `prompts` is
    what to look for, not a constructor key)."""
    from hydra.errors import InstantiationException
    from hydra.utils import instantiate

    from luna.settings import plain

    node = {key: value for key, value in plain(detect_cfg).items() if key != "prompts"}
    try:
        return instantiate(node)
    except InstantiationException as error:
        cause = error.__cause__
        if isinstance(cause, ValueError):  # the detector's own user error (missing weights, bad file)
            raise cause from None
        raise ValueError(f"detect={node.get('_target_')}: {str(error).splitlines()[-1]}") from error


def build_conditioning(config: dict, components, prompt: str, negative):
    """The crops' conditioning source from the config: text, text + vault, or text + projector."""
    from lsd_runtime.conditioning import TextSource, WithImageEmbeds, open_projector

    text = TextSource(components.encoders, prompt, negative,
                      force_zeros_for_empty_prompt=components.sampler.force_zeros_for_empty_prompt)
    source, embedder = text, None
    vault = projector = None
    if config["vault"]:
        from vault.service import open_vault

        vault = open_vault(str(config["vault"]))
        embedder = _embedder(config, components, vault.info().get("vision_model"))
    if config["projector"]:
        import json

        path = Path(str(config["projector"]))
        cfg_file = (path if path.is_dir() else path.parent) / "projector.json"
        model = json.loads(cfg_file.read_text()).get("vision_model") if cfg_file.is_file() else None
        embedder = embedder or _embedder(config, components, model)
        projector = open_projector(path, embedder, device=str(components.sampler.device))
    if vault is not None or projector is not None:  # both: hybrid (hybrid.policy); routed per category on request
        from lsd_runtime.categories import memory_source

        family = str(config["retrieval"].get("family") or "same")
        source = memory_source(config["retrieval"], text, embedder, vault=vault, projector=projector,
                               hybrid=config.get("hybrid"), family=family,
                               te_fingerprint=components.te_fingerprint if family in ("same", "any") else None)
    if config["ip_adapter"]["weights"]:
        from lsd_runtime.ip_adapter import IPAdapterError, load_ip_adapter

        embedder = embedder or _embedder(config, components, None)
        dim = load_ip_adapter(components.pipe, config["ip_adapter"]["weights"], float(config["ip_adapter"]["scale"]))
        if dim != embedder.dim:
            raise IPAdapterError(f"{config['ip_adapter']['weights']}: the IP-Adapter takes {dim}-d image embeddings, "
                                 f"the vision tower {embedder.model_id!r} gives {embedder.dim}-d (set vision.name)")
        source = WithImageEmbeds(source, embedder)
    return source


def _embedder(config: dict, components, model_id):
    from lsd_runtime.conditioning import CropEmbedder, same_vision_model
    from luna.models.vision import load_vision

    name = config["vision"]["name"] or (str(model_id).removeprefix("open_clip:") if model_id else None)
    if name is None:
        name = "tiny" if config["preset"] == "tiny" else None
    if name is None:
        raise ValueError("set vision.name (and vision.weights) to the tower that embeds the crops")
    tower = components.vision
    if tower is None or not same_vision_model(tower.model_id, name):
        tower = load_vision(name, config["vision"]["weights"], device=str(components.sampler.device))
    return CropEmbedder(tower)


def run(cfg) -> dict:
    """Refine as the composed refine config says; returns the written files."""
    from lsd_runtime.record import write_outputs
    from lsd_runtime.scaffold import NoiseScaffold
    from lsd_runtime.workflow import load_components, read_image, refine, settings_from_config
    from luna.settings import plain

    config = plain(cfg)
    if not config["out"]:
        raise ValueError("give out=DIR")
    image = None
    if config["image"]:
        image = read_image(config["image"])
    elif not config["from_draft"]:
        raise ValueError("give image=PATH (or from_draft=true)")
    settings = settings_from_config(config, detect_prompts=list(config["detect"].get("prompts") or []))
    detector = make_detector_from(config["detect"])
    components = load_components(config["checkpoint"], config["preset"], config["device"], config["dtype"])
    prompt, negative = str(config["prompt"] or ""), config["negative"]
    scaffold = NoiseScaffold.load(config["scaffold"]) if config["scaffold"] else None
    try:
        source = build_conditioning(config, components, prompt, negative)
        result = refine(image, prompt, components=components, detector=detector, conditioning=source,
                        settings=settings, negative=negative, scaffold=scaffold)
    finally:
        if getattr(components.sampler, "has_ip_adapter", False):
            components.pipe.unload_ip_adapter()
    result.record["input"] = {"image": config["image"], "checkpoint": config["checkpoint"], "preset": config["preset"],
                              "vault": config["vault"], "projector": config["projector"]}
    inner = getattr(source, "source", source)
    if hasattr(inner, "describe"):  # vault, hybrid or routed: the family filter, the warning of retrieval.family=any
        result.record["retrieval"] = inner.describe()
    return write_outputs(result, config["out"])


def _task(cfg) -> None:
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr, format="%(levelname)s %(name)s: %(message)s")
    files = run(cfg)
    print(f"luna refine: wrote {files.get('image')} and {files.get('record')}")


def main(argv: list[str] | None = None) -> int:
    from luna.cli import quote_free_text, run_stage

    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in ("-h", "--help", "help"):
        print(USAGE)
        return 0
    return run_stage("luna refine", "refine", _task, quote_free_text(argv, FREE_TEXT))


if __name__ == "__main__":
    sys.exit(main())
