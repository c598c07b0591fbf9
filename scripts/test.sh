#!/usr/bin/env bash
# The README's test command: set up the environment, then run the whole test suite.
set -uo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh || exit 1
unset PYTHONDONTWRITEBYTECODE  # cached bytecode saves ~30 s per process on torch/diffusers
export WANDB_MODE=offline HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 RAY_USAGE_STATS_ENABLED=0
.venv/bin/python -m pytest "$@"
code=$?
# pytest exits 5 when it collected nothing: that is a failure of the suite, say so clearly.
if [ "$code" -eq 5 ]; then echo "no tests were collected" >&2; exit 1; fi
exit "$code"
