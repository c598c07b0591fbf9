"""luna inventory: every kind of file a real collection holds is classified, used or skipped with a reason."""
from __future__ import annotations

import json
import shutil

import pytest
import torch

from luna.models import fingerprint
from luna.models import inventory as inv
from tests.luna.model_kinds import BIGG, CLIP_L, META, save, tiny_state, write_kinds


@pytest.fixture(scope="module")
def base_state():
    return tiny_state(0, "base")


@pytest.fixture(scope="module")
def kinds(tmp_path_factory, base_state):
    root = tmp_path_factory.mktemp("collection")
    return root, write_kinds(root, base_state)


@pytest.fixture(scope="module")
def rows(kinds):
    root, paths = kinds
    rows = inv.scan([root], cache=None, dedupe=False)  # most kinds here share the tiny weights
    by_path = {r.path: r for r in rows}
    return {label: by_path[str(p)] for label, p in paths.items()}


EXPECTED = {  # label: (kind, status, prediction)
    "plain": ("sdxl", "used", "epsilon"),
    "vpred_ztsnr": ("sdxl", "used", "v+ztsnr"),
    "vpred_meta": ("sdxl", "used", "v"),
    "edm": ("sdxl", "used", "edm"),
    "v_edm": ("sdxl", "skipped", "v-edm"),
    "few_step": ("sdxl", "used", "epsilon"),
    "refiner": ("sdxl-refiner", "skipped", "epsilon"),
    "inpainting": ("sdxl-inpainting", "skipped", "epsilon"),
    "sd1": ("sd1", "skipped", "n/a"),
    "lora": ("lora", "skipped", "n/a"),
    "vae": ("vae", "skipped", "n/a"),
    "text_encoders": ("text-encoders", "skipped", "n/a"),
    "tpw": ("sdxl", "used", "epsilon"),
    "sd3": ("sd3", "skipped", "n/a"),
    "flux": ("flux", "skipped", "n/a"),
    "truncated": ("unreadable", "skipped", "n/a"),
    "pickle": ("pickle", "skipped", "n/a"),
}


def test_every_kind_is_classified(rows):
    got = {label: (r.kind, r.status, r.prediction) for label, r in rows.items()}
    assert got == EXPECTED
    for label, r in rows.items():
        if r.status == "skipped":
            assert r.reason, f"{label} skipped without a reason"
    assert "truncated" in rows["truncated"].reason
    assert "9 input channels" in rows["inpainting"].reason
    assert "convert it to .safetensors" in rows["pickle"].reason
    assert "no sampler here supports it" in rows["v_edm"].reason


def test_prediction_and_distillation_name_their_evidence(rows):
    assert "marker keys v_pred + ztsnr" in rows["vpred_ztsnr"].prediction_evidence
    assert "modelspec.prediction_type" in rows["vpred_meta"].prediction_evidence
    assert "edm_mean" in rows["edm"].prediction_evidence
    assert rows["few_step"].distillation == "few-step"
    assert "modelspec.title" in rows["few_step"].distillation_evidence
    assert "sampler_overrides" in rows["few_step"].reason
    assert rows["plain"].distillation == "none"
    # the key variant fingerprints like the plain file: text_projection.weight is the same tensor
    assert rows["tpw"].te_fingerprint == rows["plain"].te_fingerprint


def test_family_from_metadata_fingerprint_or_file_name_never_a_folder(tmp_path, base_state):
    families = inv.Families(fingerprints={}, names={"pony": ["pony"], "noobai": ["noobai", "noob"]}, source="t.yaml")
    (tmp_path / "pony_stuff").mkdir()
    save(tmp_path / "pony_stuff" / "someMerge.safetensors", base_state, META)
    save(tmp_path / "ponyDiffusionV6XL.safetensors", base_state, META)
    save(tmp_path / "x.safetensors", base_state, {**META, "modelspec.title": "NoobAI XL 1.1"})
    by_name = {r.name: r for r in inv.scan([tmp_path], families=families, dedupe=False)}
    assert (by_name["someMerge"].family, by_name["someMerge"].family_evidence) == ("unknown", "")
    assert by_name["ponyDiffusionV6XL"].family == "pony" and "file name" in by_name["ponyDiffusionV6XL"].family_evidence
    assert by_name["x"].family == "noobai" and "modelspec.title" in by_name["x"].family_evidence
    # the shipped families.yaml knows the tiny base encoders by fingerprint: that beats the file name
    shipped = {r.name: r for r in inv.scan([tmp_path], dedupe=False)}
    assert shipped["ponyDiffusionV6XL"].family == "base"
    assert "fingerprint" in shipped["ponyDiffusionV6XL"].family_evidence


def test_same_model_as_file_and_folder_is_one_checkpoint(tiny_dir, tmp_path):
    for sub in ("single/tiny-base-0.safetensors", "diffusers/tiny-base-0", "single/tiny-pony-1.safetensors"):
        src, dst = tiny_dir / sub, tmp_path / sub
        dst.parent.mkdir(parents=True, exist_ok=True)
        (shutil.copytree if src.is_dir() else shutil.copy)(src, dst)
    rows = {(r.name, r.format): r for r in inv.scan([tmp_path])}
    single, folder = rows[("tiny-base-0", "single_file")], rows[("tiny-base-0", "diffusers")]
    assert single.used and not folder.used
    assert folder.duplicate_of == single.path and "same model" in folder.reason
    assert rows[("tiny-pony-1", "single_file")].used
    assert single.family == "base" and rows[("tiny-pony-1", "single_file")].family == "pony"


def test_same_encoders_different_unet_are_two_checkpoints(tmp_path, base_state):
    other = dict(base_state)
    key = "model.diffusion_model.out.2.bias"
    other[key] = other[key] + 1
    save(tmp_path / "a.safetensors", base_state, META)
    save(tmp_path / "b.safetensors", other, META)
    rows = inv.scan([tmp_path])
    assert [r.status for r in rows] == ["used", "used"]
    assert rows[0].te_fingerprint == rows[1].te_fingerprint


def test_cache_makes_a_rescan_read_no_weights(tmp_path, base_state, monkeypatch):
    save(tmp_path / "m" / "a.safetensors", base_state, META)
    cache = inv.FactsCache(tmp_path / "cache.json")
    first = inv.scan([tmp_path / "m"], cache=cache)
    assert (tmp_path / "cache.json").is_file()

    def boom(path):
        raise AssertionError(f"{path} read again")

    monkeypatch.setattr(inv, "read_facts", boom)
    monkeypatch.setattr(fingerprint, "model_probe", boom)
    again = inv.scan([tmp_path / "m"], cache=inv.FactsCache(tmp_path / "cache.json"))
    assert [r.to_dict() for r in again] == [r.to_dict() for r in first]
    assert first[0].model_id and first[0].model_id.startswith(f"epsilon/{first[0].te_fingerprint}/")
    # a changed file (size or mtime) is read again
    monkeypatch.undo()
    changed = dict(base_state)
    changed[CLIP_L + "text_model.final_layer_norm.bias"] = changed[CLIP_L + "text_model.final_layer_norm.bias"] + 1
    save(tmp_path / "m" / "a.safetensors", changed, META)
    third = inv.scan([tmp_path / "m"], cache=inv.FactsCache(tmp_path / "cache.json"))
    assert third[0].te_fingerprint != first[0].te_fingerprint


def test_a_cache_without_probes_gains_them_without_reading_the_rest(tmp_path, base_state, monkeypatch):
    save(tmp_path / "m" / "a.safetensors", base_state, META)
    first = inv.scan([tmp_path / "m"], cache=inv.FactsCache(tmp_path / "cache.json"))
    raw = json.loads((tmp_path / "cache.json").read_text())
    for e in raw["entries"].values():  # as written before the probe existed
        del e["facts"]["probe"]
    (tmp_path / "cache.json").write_text(json.dumps(raw))

    def boom(path):
        raise AssertionError(f"{path} read again")

    monkeypatch.setattr(inv, "read_facts", boom)
    again = inv.scan([tmp_path / "m"], cache=inv.FactsCache(tmp_path / "cache.json"))
    assert again[0].model_id == first[0].model_id
    raw = json.loads((tmp_path / "cache.json").read_text())
    assert [e["facts"]["probe"] for e in raw["entries"].values()] == [first[0].model_id.rsplit("/", 1)[1]]


def test_model_id_is_the_same_for_file_and_folder_only(tiny_dir):
    rows = {(r.name, r.format): r for r in inv.scan([tiny_dir], dedupe=False)}
    assert rows[("tiny-base-0", "single_file")].model_id == rows[("tiny-base-0", "diffusers")].model_id
    assert rows[("tiny-pony-1", "single_file")].model_id == rows[("tiny-pony-1", "diffusers")].model_id
    assert rows[("tiny-base-0", "single_file")].model_id != rows[("tiny-pony-1", "single_file")].model_id


def test_missing_folder_is_an_error(tmp_path):
    with pytest.raises(inv.InventoryError, match="does not exist"):
        inv.scan([tmp_path / "nope"])


def test_luna_inventory_command(kinds, tmp_path, capsys):
    from luna.cli import main

    root, _ = kinds
    assert main(["inventory", f"dirs=[{root}]", "format=json", f"cache={tmp_path / 'c.json'}", "progress=false"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert {r["kind"] for r in out} >= {"sdxl", "lora", "vae", "pickle", "unreadable"}
    assert all(set(r) >= {"name", "kind", "family", "prediction", "distillation", "te_fingerprint", "status", "reason"}
               for r in out)
    assert main(["inventory", f"dirs=[{root}]", "cache=false", "progress=false"]) == 0
    table = capsys.readouterr().out
    assert "usable SDXL checkpoint(s)" in table and "skipped:" in table and "halfDownloaded" in table
    assert main(["inventory", f"dirs=[{tmp_path / 'nope'}]"]) == 2
    assert "does not exist" in capsys.readouterr().err
