#!/usr/bin/env bash
# Every GPU check in one prepared run, for a session that is lent a CUDA machine (15 minutes of
# device time in all, machine start included, so nothing here is discovered on the device):
#   1. the CUDA cases of the engine tests (they skip on CPU),
#   2. bench/lora_switch.py on CUDA in fp16 (our switch vs diffusers fuse/unfuse, SDXL scale),
#   3. bench/gpu_suite.py (memory modes, stream lookahead, fp8, app overhead) at 1024x1024.
# Here first: `make gpu-wheels` (the GPU image lacks diffusers, platformdirs and tomli-w; they travel
# in .whl/). Then, through the device tool, with `.whl` carried and a 590 s limit:
#   bash scripts/gpu_check.sh            # all three stages, each under its own time limit
#   bash scripts/gpu_check.sh lora suite # only these stages
# Logs and JSON land in $OUT (or ./gpu-out); paste the tables into docs/BENCHMARKS.md.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-gpu-out}
mkdir -p "$out"
stages=${*:-tests lora suite}
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 GRADIO_ANALYTICS_ENABLED=False LORA_STUDIO_HOME=/tmp/lora-studio-gpu
PY=${PYTHON:-python3}

if compgen -G ".whl/*.whl" >/dev/null; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        || { echo "installing the carried wheels failed" >&2; exit 1; }
    export PYTHONPATH=/tmp/site:$PWD
else
    export PYTHONPATH=$PWD
fi
{
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1
    "$PY" -c 'import torch, diffusers, transformers; print("torch", torch.__version__, "cuda", torch.version.cuda,
"| diffusers", diffusers.__version__, "| transformers", transformers.__version__)'
} | tee "$out/machine.txt"
"$PY" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else "no CUDA device: nothing to check")' || exit 1

status=0
run() {  # run NAME SECONDS COMMAND...: one stage under its own limit, its log in $out/NAME.log
    local name=$1 seconds=$2
    shift 2
    echo "== $name (at most ${seconds} s) =="
    timeout "$seconds" "$@" 2>&1 | tee "$out/$name.log"
    local rc=${PIPESTATUS[0]}
    [ "$rc" -eq 0 ] || { echo "== $name ended with $rc =="; status=1; }
}
for stage in $stages; do
    case $stage in
        tests) run tests 150 "$PY" -m pytest -q -p no:cacheprovider -rs tests/lora tests/models tests/test_session_memory.py ;;
        lora) run lora_switch 180 "$PY" -m bench.lora_switch --device cuda --dtype fp16 --rounds 3 \
                  --lora-dir /tmp/lora-studio-gpu/bench-loras --out "$out/lora_switch_cuda.json" ;;
        suite) run gpu_suite 240 "$PY" bench/gpu_suite.py --out "$out/gpu_suite.json" ;;
        *) echo "unknown stage $stage (tests, lora, suite)" >&2; exit 2 ;;
    esac
done
exit $status
