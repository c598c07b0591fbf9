"""Campaign texts and helpers shared by the campaign, template and campaign-file tests."""
from __future__ import annotations

import json
import math
import textwrap
from pathlib import Path

from factory.campaign_file import load_campaign

# The issue's example, verbatim ("this exact file must work").
ISSUE_YAML = """\
campaign: facial_features
wildcards:
  eyes:
    color: [blue eyes, green eyes, "{amber|hazel} eyes", "{3::grey|violet} eyes"]
    detail: [detailed iris, macro photo of an eye, glowing cyberpunk eyes]
  lighting: [soft studio lighting, dramatic rim light, golden hour]
jobs:
  eyes:
    quota: 24
    templates: ["closeup of __eyes/color__, __eyes/detail__, __lighting__"]
  faces:
    quota: 12
    templates: ["portrait of a person with __eyes/color__, __lighting__"]
negative_prompt: "blurry, lowres"
sampler: {steps: 4, cfg: 5.0, scheduler: euler, width: 64, height: 64, batch_size: 4}
checkpoints: {include: ["*"]}
seed: 1234
"""

EYE_COLORS = {"blue eyes", "green eyes", "amber eyes", "hazel eyes", "grey eyes", "violet eyes"}


def write(tmp_path: Path, text: str, name: str = "c.yaml") -> Path:
    p = tmp_path / name
    p.write_text(textwrap.dedent(text))
    return p


def campaign_with(tmp_path: Path, wildcards: str = "", template: str = "x", quota: int = 10, extra: str = ""):
    body = "campaign: t\n"
    if wildcards:
        body += "wildcards:\n" + textwrap.indent(textwrap.dedent(wildcards), "  ")
    body += f"jobs:\n  j:\n    quota: {quota}\n    templates: [{json.dumps(template)}]\n" + extra
    return load_campaign(write(tmp_path, body))


def binomial_ok(k: int, n: int, p: float, z: float = 5.0) -> bool:
    return abs(k - n * p) <= z * math.sqrt(n * p * (1 - p))
