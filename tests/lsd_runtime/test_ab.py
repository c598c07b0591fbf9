"""`luna ab` on the tiny preset: every file, every available arm, missing arms named, identical arms
identical, the oracle plug-in, crops from shards, per-category tuning, and the bootstrap statistics."""
from __future__ import annotations

import io
import json

import numpy as np
import pytest
import torch
from PIL import Image

from lsd_runtime import abstats
from lsd_runtime.ab import main, render_section, run_ab

TINY_VISION = "open_clip:luna-tiny-vit"
ALL_ARMS = ["none", "generic", "vault", "projector", "hybrid", "ip_adapter", "vault+ip_adapter"]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """Two photos, a categorised tiny vault, a tiny projector and a tiny IP-Adapter file."""
    from skimage import data

    from extraction.synthetic import write_synthetic_pairs
    from lsd_runtime.ip_adapter import write_tiny_ip_adapter
    from lsd_runtime.workflow import tiny_components
    from projector.export import Projector, save_projector
    from vault.build import build_vault

    root = tmp_path_factory.mktemp("ab")
    (root / "imgs").mkdir()
    Image.fromarray(data.astronaut()).save(root / "imgs" / "astronaut.png")
    Image.fromarray(data.chelsea()).save(root / "imgs" / "chelsea.png")
    pairs = write_synthetic_pairs(root / "pairs", 150, 30, 32, text_dims=(32, 64), pooled_dim=64,
                                  vision_model=TINY_VISION)
    build_vault(pairs, root / "vault", index="Flat", categories=True)
    dims = {"input": "embed", "in_dim": 32, "vision_dim": 32, "vision_model": TINY_VISION, "cond_dim": 96,
            "text_dims": [32, 64], "pooled_dim": 64, "seq_len": 77, "num_tokens": None}
    proj = Projector({"net": {"_target_": "projector.models.RidgeProjector"}, "pooled_head": None}, dims)
    with torch.no_grad():
        proj.net.weight.normal_(0, 0.1)
    save_projector(proj, root / "proj")
    ip = write_tiny_ip_adapter(tiny_components().pipe.unet, 32, root / "ip" / "ip-adapter_tiny.safetensors")
    return {"imgs": root / "imgs", "vault": root / "vault", "proj": root / "proj", "ip": ip}


# the synthetic vault holds another text-encoder fingerprint than the tiny checkpoint: any family
FAST = ["preset=tiny", "detail.steps=2", "crops.size=64", "detail.working_size=64", "retrieval.family=any"]
SMALL = {"detail__steps": 2, "detail__working_size": 64, "crops__size": 64, "retrieval__family": "any"}


@pytest.mark.timeout(1800)  # 7 arms: past the 600 s default only on the shared 2 cores under heavy load
def test_every_available_arm_writes_every_file(inputs, tmp_path, capsys):
    out = tmp_path / "ab"
    rc = main([*FAST, f"crops.images={inputs['imgs']}", "crops.n=1", f"vault={inputs['vault']}",
               f"projector={inputs['proj']}", f"ip_adapter.weights={inputs['ip']}", "prompt='a portrait, detailed'",
               "crops.label=face", "retrieval.category=route", f"out={out}"])
    assert rc == 0, capsys.readouterr().err
    rec = json.loads((out / "ab.json").read_text())
    assert rec["arms"] == ALL_ARMS and rec["missing"] == {}
    assert len(rec["crops"]) == 1 and len(rec["results"]) == len(ALL_ARMS)
    for r in rec["results"]:
        assert (out / r["image"]).is_file() and Image.open(out / r["image"]).size == (64, 64)
        assert -1 <= r["cos_in"] <= 1 and r["psnr"] > 0 and -1 <= r["ssim"] <= 1 and r["seconds"] > 0
        assert r["clip_text"] is not None  # the tiny tower has a text side and the prompt is known
    routed = [r for r in rec["results"] if r["arm"] in ("vault", "vault+ip_adapter")]
    assert all(r["conditioning"]["route"]["category"] == "faces" for r in routed)  # label face -> faces
    hybrid = [r["conditioning"]["hybrid"] for r in rec["results"] if r["arm"] == "hybrid"]
    assert all(h["chosen"] == ("vault" if h["top_similarity"] >= 0.8 else "projector") for h in hybrid)
    s = rec["summary"]
    for arm in ALL_ARMS:
        e = s[arm]["cos_in"]
        assert e["low"] <= e["mean"] <= e["high"] and e["n"] == 1
        assert ("diff" in e) == (arm != "none")
    assert (out / "summary.md").read_text().count("\n| ") >= len(ALL_ARMS)
    page = (out / "ab.html").read_text()
    assert all(f"<th>{a}</th>" in page for a in ALL_ARMS) and page.count("data:image/png;base64") == 1 + 7
    assert "7 arms" in capsys.readouterr().out


def test_missing_arms_are_named_and_identical_arms_give_identical_images(inputs, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    out = tmp_path / "ab"
    res = run_ab(out, images=inputs["imgs"], preset="tiny", vault=str(inputs["vault"]), prompt="a portrait",
                 arms=["none", "generic", "vault", "projector", "hybrid", "ip_adapter"], **SMALL,
                 retrieval__weight=0.0, logger__wandb=True)
    assert res.arms == ["none", "generic", "vault"]
    assert set(res.missing) == {"projector", "hybrid", "ip_adapter"}
    assert "projector=DIR" in res.missing["projector"] and "ip_adapter.weights" in res.missing["ip_adapter"]
    rec = json.loads(res.paths["ab_json"].read_text())
    assert rec["missing"] == res.missing and "projector=DIR" in (out / "ab.html").read_text()
    img = {(r["crop"], r["arm"]): np.asarray(Image.open(out / r["image"])) for r in rec["results"]}
    for i in range(2):
        assert np.array_equal(img[i, "vault"], img[i, "none"])  # strength 0: the text row exactly
        assert not np.array_equal(img[i, "generic"], img[i, "none"])  # another prompt does change the crop
    d = res.summary["vault"]["psnr"]["diff"]
    assert d["mean"] == d["low"] == d["high"] == 0.0
    runs = list((out / "wandb").glob("offline-run-*"))  # the W&B table of the grid, offline
    assert res.paths["wandb"] and len(runs) == 1 and list(runs[0].glob("*.wandb"))
    # the CLI names them too
    rc = main([*FAST, f"crops.images={inputs['imgs']}", "crops.n=1", "arms=[none,vault]", f"out={tmp_path / 'c'}"])
    assert rc == 0 and "arm vault left out: no vault=DIR given" in capsys.readouterr().out


def _oracle(image):
    """A stand-in for the toy world's oracle: brightness and dominant channel."""
    a = np.asarray(image, np.float32)
    return {"bright": str(a.mean() > 110), "channel": "rgb"[int(a.reshape(-1, 3).mean(0).argmax())]}


def _shards(folder):
    from factory.shards import ShardSample, write_shard

    folder.mkdir()
    rng = np.random.default_rng(0)
    samples = []
    for i, (colour, cat) in enumerate([((200, 40, 40), "faces/skin"), ((40, 40, 200), "hands/pose"),
                                       ((40, 200, 40), "eyes/color")]):
        arr = np.clip(np.array(colour) + rng.normal(0, 10, (48, 48, 3)), 0, 255).astype(np.uint8)
        buf = io.BytesIO()
        Image.fromarray(arr).save(buf, format="PNG")
        samples.append(ShardSample(f"k{i:03d}", buf.getvalue(), "png", f"a {cat.split('/')[0]} crop {i}",
                              {"prompt": f"a {cat.split('/')[0]} crop {i}", "category": cat}))
    write_shard(folder / "toy-pc1-w0-000000.tar", samples, {"unit_ids": ["u0"]})
    return folder


def test_shard_crops_keep_their_prompts_and_the_oracle_scores_them(inputs, tmp_path):
    shards = _shards(tmp_path / "shards")
    res = run_ab(tmp_path / "ab", shards=shards, preset="tiny", vault=str(inputs["vault"]), oracle=_oracle,
                 arms=["none", "vault"], **SMALL, crops__n=3, crops__degrade="grey")
    rec = res.record
    assert sorted(c["prompt"] for c in rec["crops"]) == sorted(f"a {c} crop {i}" for i, c in
                                                               enumerate(["faces", "hands", "eyes"]))
    assert {c["label"] for c in rec["crops"]} == {"faces", "hands", "eyes"}
    # truth comes from the original crop (red faces, blue hands, green eyes), the arms refine the grey one
    assert all(c["truth"]["channel"] == {"faces": "r", "hands": "b", "eyes": "g"}[c["label"]] for c in rec["crops"])
    assert all(np.ptp(np.asarray(Image.open(tmp_path / "ab" / c["input"])), axis=2).max() == 0 for c in rec["crops"])
    for r in rec["results"]:
        assert 0 <= r["oracle_acc"] <= 1 and r["oracle_joint"] in (0.0, 1.0)
    assert "oracle_acc" in rec["metrics"] and "oracle acc" in render_section(rec, tmp_path / "ab")


def test_tune_writes_per_category_settings_that_refine_reads(inputs, tmp_path):
    from lsd_runtime.categories import CategoryTable, memory_source
    from lsd_runtime.conditioning import CropEmbedder, TextSource
    from lsd_runtime.workflow import tiny_components

    shards = _shards(tmp_path / "shards")
    res = run_ab(tmp_path / "ab", shards=shards, preset="tiny", vault=str(inputs["vault"]), arms=["none", "vault"],
                 **SMALL, crops__n=3, tune=True, tune_fraction=0.67, tune_metric="cos_in",
                 tune_grid={"weight": [0.0, 1.0], "k": [2], "weighting": ["mean"], "temperature": [0.05]})
    t = res.record["tune"]
    assert res.arms == ["none", "vault", "vault_tuned"] and len(t["eval_indices"]) == 1 and len(t["search_indices"]) == 2
    table = CategoryTable.read(res.paths["settings"])
    assert table.tuned["metric"] == "cos_in" and set(t["categories"]) <= {"faces", "hands", "eyes", "default"}
    for cat, e in t["categories"].items():
        assert e["best_score"] >= e["default_score"] and e["tried"] == 2
        sc = e["search_scores"]  # per search crop, every candidate: the choice can be re-checked from ab.json
        assert len(sc["candidates"]) == 2 and all(len(c["values"]) == len(sc["crops"]) == e["n"] for c in sc["candidates"])
        top = max(sc["candidates"], key=lambda c: np.mean(c["values"]))
        assert np.mean(top["values"]) == pytest.approx(e["search_best"]["score"])
        assert "search_scores" not in table.tuned["categories"][cat]  # the settings file stays small
        got = table.default if cat == "default" else table.categories[cat]
        assert got.weight == e["best"]["weight"]
    assert len(res.record["results"]) == 3  # the evaluation crop under none, vault and vault_tuned
    comps = tiny_components()
    from vault.query import Vault

    src = memory_source({"settings": str(res.paths["settings"])}, TextSource(comps.encoders, "x"),
                        CropEmbedder(comps.vision), vault=Vault.open(inputs["vault"], use_gpu=False),
                        family="any")  # the synthetic vault holds another family's conditionings (checked at build)
    assert src.table.to_json() == table.to_json()


def test_bootstrap_interval_and_paired_difference():
    rng = np.random.default_rng(0)
    base = rng.normal(0, 1, 40)
    rows = [{"crop": i, "arm": "none", "m": float(v)} for i, v in enumerate(base)]
    rows += [{"crop": i, "arm": "up", "m": float(v + 0.5)} for i, v in enumerate(base)]
    rows += [{"crop": i, "arm": "same", "m": float(v)} for i, v in enumerate(base)]
    s = abstats.summarise(rows, ["m"])
    assert s["none"]["m"]["low"] < base.mean() < s["none"]["m"]["high"]
    assert s["up"]["m"]["diff"]["mean"] == pytest.approx(0.5) and s["up"]["m"]["diff"]["low"] == pytest.approx(0.5)
    assert s["same"]["m"]["diff"] == {"mean": 0.0, "low": 0.0, "high": 0.0, "n": 40}
    noisy = [{"crop": i, "arm": "noisy", "m": float(v + rng.normal(0, 1))} for i, v in enumerate(base)]
    d = abstats.summarise(rows + noisy, ["m"])["noisy"]["m"]["diff"]
    assert d["low"] < 0 < d["high"]  # no real difference: the interval straddles 0


def test_demo_stage_samples_the_projectors_validation_split(inputs, tmp_path):
    """The demo's entry point: crops only from the held-out prompts of the pairs split, all files written."""
    from extraction.pairs import PairsPart, write_part
    from lsd_runtime.ab import demo_stage
    from projector.splits import split_keys

    shards = _shards(tmp_path / "shards")
    keys = [f"k{i:03d}" for i in range(3)]
    texts = [f"a {c} crop {i}" for i, c in enumerate(["faces", "hands", "eyes"])]
    write_part(tmp_path / "pairs" / "part-00000.h5", PairsPart(
        {"key": np.array(keys, dtype=object), "embed": np.eye(3, 32, dtype=np.float32),
         "prompt_id": np.arange(3), "checkpoint": np.array(["c"] * 3, dtype=object),
         "category": np.array(["faces", "hands", "eyes"], dtype=object), "campaign": np.array(["t"] * 3, dtype=object),
         "seed": np.arange(3)},
        {"text": np.array(texts, dtype=object), "cond": np.zeros((3, 77, 96)), "pooled": np.zeros((3, 64)),
         "te_fingerprint": np.array(["fp"] * 3, dtype=object)},
        {"vision_model": TINY_VISION, "vision_dim": 32, "text_dims": [32, 64], "pooled_dim": 64}))
    held = split_keys(tmp_path / "pairs", "val", val_prompts=0.34)
    assert len(held) == 1
    d = demo_stage(tmp_path / "ab", shards=shards, vault=inputs["vault"], projector=inputs["proj"],
                   pairs=tmp_path / "pairs", val_prompts=0.34, n=4, detail__steps=2, retrieval__family="any")
    assert d["arms"] == ["none", "generic", "vault", "projector", "hybrid"] and d["crops"] == 1
    rec = json.loads(open(d["paths"]["ab_json"]).read())
    assert [c["key"] for c in rec["crops"]] == held
    json.dumps(d)  # what the demo stores in results.json
    assert "<table>" in render_section(d["paths"]["ab_json"])


def test_tuned_arms_replace_the_plain_vault_and_ip_adapter_arms_stay_last():
    """vault_tuned runs before any IP-Adapter arm (loading the adapter changes the UNet for later calls), and
    the tune run's routed `vault` takes the plain one's place."""
    from lsd_runtime.ab import with_tuned
    from lsd_runtime.arms import Arm

    arms = [Arm("none"), Arm("vault", memory="vault"), Arm("ip_adapter", ip=True), Arm("vault+ip_adapter", ip=True)]
    base, tuned = Arm("vault", memory="vault", ret={"category": "route"}), Arm("vault_tuned", memory="vault")
    got = with_tuned(arms, [base, tuned])
    assert [a.name for a in got] == ["none", "vault", "vault_tuned", "ip_adapter", "vault+ip_adapter"]
    assert got[1] is base
    assert [a.name for a in with_tuned([Arm("ip_adapter", ip=True)], [base, tuned])] == ["vault", "vault_tuned", "ip_adapter"]


def test_bad_settings_are_refused_before_any_model_loads(monkeypatch):
    import lsd_runtime.ab as ab

    def no_load(c):
        raise AssertionError("prepare() ran before the settings were checked")

    monkeypatch.setattr(ab, "prepare", no_load)
    crops = [Image.new("RGB", (64, 64))] * 2
    with pytest.raises(ab.ABError, match="vualt"):
        run_ab("/tmp/unused", crops=crops, preset="tiny", arms=["none", "vualt"])
    with pytest.raises(ab.ABError, match="tune_metric"):
        run_ab("/tmp/unused", crops=crops, preset="tiny", arms=["vault"], tune=True, tune_metric="cosin")
    with pytest.raises(ab.ABError, match="working_size"):
        run_ab("/tmp/unused", crops=crops, preset="tiny", detail__working_size=60)


def test_n_counts_only_the_values_the_interval_uses():
    s = abstats.summarise([{"crop": i, "arm": "none", "psnr": v} for i, v in enumerate([1.0, 2.0, float("nan"), None])],
                          ["psnr"])
    assert s["none"]["psnr"]["n"] == 2 and s["none"]["psnr"]["mean"] == pytest.approx(1.5)


def test_the_text_encoders_are_fingerprinted_once_per_run(monkeypatch):
    """Every vault source of a run gets the checkpoint's cached fingerprint (family=same), instead of hashing
    both text encoders again per batch, prompt, arm and tuning candidate."""
    from types import SimpleNamespace as NS

    import luna.models.fingerprint as fp
    from lsd_runtime.arms import Arm, Context
    from lsd_runtime.conditioning import CropEmbedder
    from lsd_runtime.workflow import tiny_components

    comps = tiny_components()
    real, calls = fp.te_fingerprint_of_encoders, []
    monkeypatch.setattr(fp, "te_fingerprint_of_encoders", lambda *a: calls.append(1) or real(*a))
    mine = real(comps.encoders.text_encoder, comps.encoders.text_encoder_2)
    vault = NS(info=lambda: {"vision_model": comps.vision.model_id, "vision_dim": comps.vision.dim, "categories": [],
                             "te_fingerprints": [mine]})
    ctx = Context(comps, CropEmbedder(comps.vision), vault, None, {"family": "same"}, None, 64, 4, 0, None)
    for _ in range(3):
        for prompt in ("a cat", "a dog"):
            src = ctx.source(Arm("vault", memory="vault"), prompt)
            assert src.te_fingerprint == mine
    assert len(calls) <= 1
