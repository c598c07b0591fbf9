#!/usr/bin/env bash
# Creates .venv with the whole stack (uv; falls back to pip). Idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/python ] || ! .venv/bin/python -c "import luna, faiss, ray, open_clip, diffusers" 2>/dev/null; then
  python3 -m pip install -q uv || true
  if command -v uv >/dev/null 2>&1 || python3 -m uv --version >/dev/null 2>&1; then
    UV="uv"; command -v uv >/dev/null 2>&1 || UV="python3 -m uv"
    $UV venv -q --allow-existing .venv
    $UV pip install -q -p .venv/bin/python -e ".[dev]"
  else
    python3 -m venv .venv
    .venv/bin/pip install -q -e ".[dev]"
  fi
fi
