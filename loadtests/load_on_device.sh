#!/usr/bin/env bash
# A load-test scenario against the plugin serving the dummy 48B model on the lent H200 (issue 15
# item 4), after ../shared/gpu-vllm/README.md's install step.
#   loadtests/load_on_device.sh SCENARIO [more `python -m loadtests` flags...]
# e.g.  loadtests/load_on_device.sh 1m-context --concurrency 3 --num-requests 3
# Uses the server a `side_by_side_on_device.sh plugin ... --keep-server` call left running (the
# same published config, `--load-format dummy`, vLLM's defaults, --max-model-len 1048576), else
# starts one the same way (no rows, kept). $OUT gets result.json and the PNGs, the run's log, the
# capacity planner's prediction for this GPU and vLLM's own "Maximum concurrency" line, to compare.
set -uo pipefail
scenario="${1:?a loadtests scenario, e.g. 1m-context}"; shift
out="${OUT:-$PWD/load-results}"; mkdir -p "$out" /tmp/sbs /tmp/load
export PYTHONPATH=/tmp/site:/tmp/plugin PYTHONUNBUFFERED=1
start=$(date +%s)
source "$(dirname "$0")/../tests/gpu/device.sh"
if [ ! -f /tmp/sbs/server-plugin.url ]; then
  stop_servers
  install_plugin || exit 1
  python3 -m loadtests.side_by_side run --impl plugin --out /tmp/sbs --rows "" --keep-server 2>&1 | tee -a "$out/load.log" \
    || { echo "the server did not start: see server-plugin.log" | tee -a "$out/load.log"; cp /tmp/sbs/server-plugin.log "$out/"; exit 1; }
fi
base="$(cat /tmp/sbs/server-plugin.url)"
python3 -m vllm_kimi_linear.tools.planner --tp 1 --gpu h200 --max-model-len 1048576 > "$out/planner.txt" 2>&1
grep -h "Maximum concurrency\|KV cache size\|Available KV cache" /tmp/sbs/server-plugin.log > "$out/vllm-capacity.txt"
# stop before the device call's own limit (570 s from this script's start, a server start
# included), so what the run wrote still comes back
limit="${KIMI_LOAD_TIME_LIMIT:-$(( 570 - ($(date +%s) - start) ))}"; [ "$limit" -ge 30 ] || limit=30
timeout -k 15 "$limit" python3 -m loadtests "$scenario" \
  --base-url "$base/v1" --tokenizer /tmp/sbs/published-config --out "/tmp/load/$scenario" --no-progress "$@" \
  2>&1 | tee -a "$out/load.log"
rc=${PIPESTATUS[0]}
echo "load test exit $rc after $(( $(date +%s) - start )) s" | tee -a "$out/load.log"
cp /tmp/load/"$scenario"/result.json /tmp/load/"$scenario"/*.png "$out/" 2>/dev/null
exit $rc
