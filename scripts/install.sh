#!/usr/bin/env bash
# Create ./.venv (unless a Python environment is already active, e.g. conda) and install the
# project with its test extras and the batch extra (Ray, for dots-ocr-batch and its tests). torch/torchvision are pinned to a pair known to work together
# (qwen-vl-utils and the fast image processor need torchvision); on a CUDA workstation this pair
# is PyPI's CUDA build. constraints.txt pins the rest to the versions tested together.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -z "${VIRTUAL_ENV:-}" ] && [ -z "${CONDA_PREFIX:-}" ]; then
    [ -x .venv/bin/python ] || python3 -m venv .venv
    # shellcheck disable=SC1091
    . .venv/bin/activate
fi
python -m pip install -q --upgrade pip
python -m pip install -q "torch==${DOTS_OCR_TORCH_VERSION:-2.14.1}" "torchvision==${DOTS_OCR_TORCHVISION_VERSION:-0.29.1}"
python -m pip install -q -c constraints.txt -e ".[server,test,batch,eval]"
# The browser tests of GET /ui (tests/test_ui_browser.py) drive Debian's Chromium with Playwright.
# Installed here where this script can (root with apt-get, as in CI); elsewhere install it yourself
# (or point DOTS_OCR_CHROMIUM at a Chrome/Chromium binary): without it those tests fail.
if [ -z "${DOTS_OCR_CHROMIUM:-}" ] && ! command -v chromium >/dev/null 2>&1 \
        && ! command -v chromium-browser >/dev/null 2>&1; then
    if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1; then
        apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium >/dev/null
    else
        echo "note: no Chromium; the /ui browser tests need it: sudo apt-get install chromium" >&2
    fi
fi
