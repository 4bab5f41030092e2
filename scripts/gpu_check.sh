#!/usr/bin/env bash
# GPU check of the CUDA fast path. Stages (all by default; name some to run only those):
#   check       scripts/gpu_fast_path_check.py: fast path = plain path on greedy tokens (first 256,
#               full size, random weights, bf16, two page sizes), batched = alone, no recompiles,
#               no CUDA-graph skips                                                   (~4 min)
#   bench       scripts/bench_pipeline.py --random-full-size --baseline --new-tokens 1000, letter page  (~5 min)
#   throughput  scripts/bench_throughput.py --random-full-size, bf16, a letter page at 200 dpi,
#               1000 output tokens a page, 16 pages at batch sizes 1, 2, 4, 8, 16 (~9 min)
# e.g. `bash scripts/gpu_check.sh check bench` then `bash scripts/gpu_check.sh throughput` (each call
# inside 10 minutes). Logs and JSON go to $OUT when set, else ./gpu_check_logs. Installs nothing
# that is already there.
#
# This project needs a newer transformers than some GPU images hold (5.17 cannot read the model's
# config). Where the installed one cannot, the check installs the wheels carried in .whl/ into
# /tmp/site (no network needed). Prepare them here, on the development machine, once:
#     bash scripts/gpu_check.sh --fetch-wheels     # transformers (this venv's version) + regex, into .whl/
# and name .whl in the device tool's `carry`.
set -uo pipefail
cd "$(dirname "$0")/.."

if [ "${1:-}" = "--fetch-wheels" ]; then
    PY=${PYTHON:-.venv/bin/python}
    grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
    mkdir -p .whl
    for pkg in transformers regex; do
        version=$($PY -c "import importlib.metadata as m; print(m.version('$pkg'))")
        $PY -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
            --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
            --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl "$pkg==$version" || exit 1
    done
    ls -l .whl
    exit 0
fi

STAGES=${*:-check bench throughput}
wants() { case " $STAGES " in *" $1 "*) return 0 ;; *) return 1 ;; esac; }

LOG=${OUT:-./gpu_check_logs}
mkdir -p "$LOG"
PY=${PYTHON:-}
if [ -z "$PY" ]; then
    if [ -x .venv/bin/python ] && .venv/bin/python -c "import torch; assert torch.cuda.is_available()" 2>/dev/null; then
        PY=.venv/bin/python
    else
        PY=python3
    fi
fi
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
START=$(date +%s)
say() { echo "[gpu_check +$(( $(date +%s) - START ))s] $*" | tee -a "$LOG/gpu_check.log"; }

nvidia-smi > "$LOG/nvidia-smi.txt" 2>&1 || true
say "python: $PY"

# The project's model code must import and read its config with the transformers found here.
can_run() {
    "$PY" - <<'EOF' 2>>"$LOG/gpu_check.log"
import json, torch
from model_runner.modeling_dots_ocr import DotsOCRConfig
from model_runner.tiny import OFFICIAL_CONFIG
DotsOCRConfig.from_dict(json.loads(json.dumps(OFFICIAL_CONFIG)))
EOF
}
if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>>"$LOG/gpu_check.log"; then
    say "no CUDA device visible to $PY: this check needs a GPU"
    exit 2
fi
if ! can_run; then
    if ls .whl/*.whl >/dev/null 2>&1; then
        say "installed packages cannot run the model code; installing the carried wheels: $(ls .whl | tr '\n' ' ')"
        for wheel in .whl/*.whl; do  # one by one: a wheel for another Python is reported and skipped
            "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
                "$wheel" >>"$LOG/gpu_check.log" 2>&1 || say "could not install $(basename "$wheel") (see log)"
        done
        export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
        can_run || { say "still cannot run the model code (see $LOG/gpu_check.log)"; exit 3; }
    else
        say "the installed packages cannot run the model code and no wheels are carried in .whl/"
        say "run 'bash scripts/gpu_check.sh --fetch-wheels' on the development machine and carry .whl"
        exit 3
    fi
fi
"$PY" -c "import torch, transformers; print('torch', torch.__version__, '| transformers', transformers.__version__, '|', torch.cuda.get_device_name())" 2>&1 | tee -a "$LOG/gpu_check.log"

status=0
if wants check; then
    say "check: fast path = plain path, batched = alone (greedy, 256 tokens, full size, two page sizes)"
    timeout 280 "$PY" scripts/gpu_fast_path_check.py --tokens 256 --json-out "$LOG/fast_path_check.json" \
        > "$LOG/fast_path_check.log" 2>&1
    rc=$?
    tail -n 6 "$LOG/fast_path_check.log"
    [ $rc -eq 0 ] || { say "fast path check: exit $rc (124 = timed out)"; status=1; }
fi

if wants bench; then
    say "bench: --random-full-size --baseline --new-tokens 1000, letter page"
    timeout 290 "$PY" scripts/bench_pipeline.py --random-full-size --baseline --new-tokens 1000 --runs 3 \
        --json-out "$LOG/bench.json" > "$LOG/bench.log" 2>&1
    rc=$?
    grep -v '^{' "$LOG/bench.log" | tail -n 30
    [ $rc -eq 0 ] || { say "benchmark: exit $rc (124 = timed out)"; status=1; }
fi

if wants throughput; then
    say "throughput: real server, bf16, full size random weights, letter page, 1000 tokens, batch 1..16"
    timeout 560 "$PY" scripts/bench_throughput.py --random-full-size --device cuda --dtype bfloat16 \
        --page-size 1700x2200 --new-tokens 1000 --pages 16 --batch-sizes 1,2,4,8,16 \
        --prompt-type prompt_layout_all_en --json-out "$LOG/throughput.json" > "$LOG/throughput.log" 2>&1
    rc=$?
    grep -v '^{' "$LOG/throughput.log" | tail -n 20
    [ $rc -eq 0 ] || { say "throughput: exit $rc (124 = timed out)"; status=1; }
fi

say "done, status $status; logs in $LOG"
exit $status
