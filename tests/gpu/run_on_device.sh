#!/usr/bin/env bash
# The GPU serving tests on the lent H200, after ../shared/gpu-vllm/README.md's install step.
#   tests/gpu/run_on_device.sh IMPL [CONFIGS] [pytest args...]
# IMPL: plugin (this project) or intree (vLLM's own Kimi Linear, the anchor); CONFIGS: a comma
# list of tests/gpu/gpu_util.py CONFIGS (default all). Results under $OUT (or ./gpu-results):
# gpu_checks.jsonl (every comparison, appended as it is made), pytest-IMPL.log, junit-IMPL.xml
# and server-IMPL-CONFIG.log for each server.
set -uo pipefail
source "$(dirname "$0")/device.sh"
impl="${1:-plugin}"; configs="${2:-}"; shift $(( $# < 2 ? $# : 2 ))
out="${OUT:-$PWD/gpu-results}"; mkdir -p "$out"
stop_servers  # a server an earlier call kept (side_by_side --keep-server) holds the GPU's memory
export PYTHONPATH=/tmp/site
if [ "$impl" = plugin ]; then
  install_plugin || exit 1
  export PYTHONPATH=/tmp/site:/tmp/plugin
fi
export KIMI_GPU_IMPL="$impl" KIMI_GPU_CONFIGS="$configs" KIMI_GPU_RESULTS="$out" PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv,noheader
python3 -c "import torch, vllm, transformers; print('torch', torch.__version__, 'vllm', vllm.__version__, 'transformers', transformers.__version__)"
start=$(date +%s)
# stop pytest before the device call's own limit, so what it wrote still comes back
timeout -k 15 "${KIMI_GPU_TIME_LIMIT:-560}" python3 -m pytest tests/gpu -v -rs -p no:cacheprovider \
  --junitxml "$out/junit-$impl.xml" "$@" 2>&1 | tee "$out/pytest-$impl.log"
rc=${PIPESTATUS[0]}
echo "pytest exit $rc after $(( $(date +%s) - start )) s"
exit $rc
