#!/usr/bin/env bash
# Creates or updates .venv with the whole stack and ComfyUI's extra requirements for the node tests
# (uv; falls back to pip). Idempotent: a second run only checks that pyproject.toml's dependencies are
# satisfied.
set -euo pipefail
cd "$(dirname "$0")/.."
command -v uv >/dev/null 2>&1 || python3 -m pip install -q uv >/dev/null 2>&1 || true
if command -v uv >/dev/null 2>&1; then
  [ -x .venv/bin/python ] || uv venv -q .venv
  uv pip install -q -p .venv/bin/python -e ".[dev,comfyui]"
else
  [ -x .venv/bin/python ] || python3 -m venv .venv
  .venv/bin/pip install -q -e ".[dev,comfyui]"
fi
