#!/usr/bin/env bash
# The serve command for a CPU machine: sets itself up on first use, builds the embedded tiny
# Kimi Linear if no checkpoint is given, and runs vLLM's OpenAI server in the foreground.
#   KIMI_MODEL  checkpoint directory (default: the embedded tiny model, built on first use)
#   KIMI_TP     tensor-parallel size (default 1)
#   KIMI_HOST / KIMI_PORT (default 127.0.0.1:8000); extra arguments go to `vllm serve`.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
"$root/deploy/setup-cpu.sh"
venv="${KIMI_VENV:-$root/.venv}"
model="${KIMI_MODEL:-$root/.models/kimi-linear-tiny}"
if [ -z "${KIMI_MODEL:-}" ] && [ ! -f "$model/config.json" ]; then
  "$venv/bin/python" -m vllm_kimi_linear.tools.builder "$model"
fi
tp="${KIMI_TP:-1}"
export VLLM_CPU_KVCACHE_SPACE="${VLLM_CPU_KVCACHE_SPACE:-1}"
# endpoint plugins (our /kimi-linear/state route and /metrics gauges) load only when named here
export VLLM_PLUGINS="${VLLM_PLUGINS:-kimi_linear}"
if [ "$tp" -gt 1 ] && [ -z "${VLLM_CPU_OMP_THREADS_BIND:-}" ]; then
  # one core per rank: vLLM CPU refuses to start TP>1 without an explicit binding here
  export VLLM_CPU_OMP_THREADS_BIND="$(seq -s '|' 0 $((tp - 1)))"
fi
exec "$venv/bin/vllm" serve "$model" --host "${KIMI_HOST:-127.0.0.1}" --port "${KIMI_PORT:-8000}" \
  --tensor-parallel-size "$tp" --dtype float32 "$@"
