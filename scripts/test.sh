#!/usr/bin/env bash
# Install everything, check the code with ruff, and run the whole test suite (CPU, tiny random
# checkpoint). Arguments go to pytest, e.g. `bash scripts/test.sh -m "not slow"` for the fast tier.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
if [ -z "${VIRTUAL_ENV:-}" ] && [ -z "${CONDA_PREFIX:-}" ]; then . .venv/bin/activate; fi
python -m ruff check .
python -m pytest -q "$@"
