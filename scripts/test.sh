#!/usr/bin/env bash
# Install everything and run the whole test suite (CPU, tiny random checkpoint).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
if [ -z "${VIRTUAL_ENV:-}" ] && [ -z "${CONDA_PREFIX:-}" ]; then . .venv/bin/activate; fi
python -m pytest -q "$@"
