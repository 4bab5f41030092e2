#!/usr/bin/env bash
# Install everything and start the server on http://127.0.0.1:5000.
# Serves ./weights/DotsOCR when it holds a checkpoint, else the tiny random --demo model.
# Extra arguments go to server.py (e.g. --port 8000 --device cuda).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
if [ -z "${VIRTUAL_ENV:-}" ] && [ -z "${CONDA_PREFIX:-}" ]; then . .venv/bin/activate; fi
model_path="${DOTS_OCR_MODEL_PATH:-./weights/DotsOCR}"
if [ -f "$model_path/config.json" ]; then
    exec python server.py --model-path "$model_path" "$@"
fi
cat >&2 <<MSG
**********************************************************************************
  No checkpoint at $model_path: starting in DEMO mode (tiny RANDOM weights).
  The API works end to end, but the text it returns is meaningless.
  For real OCR: python scripts/download_weights.py ./weights/DotsOCR (see README).
**********************************************************************************
MSG
exec python server.py --demo "$@"
