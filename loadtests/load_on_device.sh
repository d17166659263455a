#!/usr/bin/env bash
# A load-test scenario against the plugin serving the dummy 48B model on the lent H200 (issue 15
# item 4), after ../shared/gpu-vllm/README.md's install step.
#   loadtests/load_on_device.sh SCENARIO [more `python -m loadtests` flags...]
#   loadtests/load_on_device.sh --wait SCENARIO      # the next call, if the run outlasted this one
# e.g.  loadtests/load_on_device.sh 1m-context      # 4 at once: what one H200 holds (planner)
# Uses the server a `side_by_side_on_device.sh plugin ... --keep-server` call left running (the
# same published config, `--load-format dummy`, vLLM's defaults, --max-model-len 1048576), else
# starts one the same way (no rows, kept). The load test runs detached, in its own process
# session, so a run longer than one device call (3 x 1M tokens of prefill plus 8,192 decode
# steps: more than 10 minutes with the server's start) goes on after this call ends; the next
# call, within the machine's idle limit, says --wait to wait for it and collect. $OUT gets
# result.json and the PNGs (once the run has ended), the run's log, the capacity planner's
# prediction for this GPU and vLLM's own "Maximum concurrency" line, to compare.
set -uo pipefail
wait_only=0
if [ "${1:-}" = --wait ]; then wait_only=1; shift; fi
scenario="${1:?a loadtests scenario, e.g. 1m-context}"; shift
out="${OUT:-$PWD/load-results}"; mkdir -p "$out" /tmp/sbs /tmp/load
run="/tmp/load/$scenario"
export PYTHONPATH=/tmp/site:/tmp/plugin PYTHONUNBUFFERED=1
start=$(date +%s)
source "$(dirname "$0")/../tests/gpu/device.sh"
if [ "$wait_only" = 0 ]; then
  if [ ! -f /tmp/sbs/server-plugin.url ]; then
    stop_servers
    install_plugin || exit 1
    python3 -m loadtests.side_by_side run --impl plugin --out /tmp/sbs --rows "" --keep-server 2>&1 | tee -a "$out/load.log" \
      || { echo "the server did not start: see server-plugin.log" | tee -a "$out/load.log"; cp /tmp/sbs/server-plugin.log "$out/"; exit 1; }
  fi
  base="$(cat /tmp/sbs/server-plugin.url)"
  rm -rf "$run" "$run".{log,rc,pid}
  # $1: where its exit status goes; the rest: the load test's arguments
  setsid nohup bash -c 'rc_file=$1; shift; python3 -m loadtests "$@"; echo $? > "$rc_file"' _ "$run.rc" \
    "$scenario" --base-url "$base/v1" --tokenizer /tmp/sbs/published-config --out "$run" --no-progress "$@" \
    > "$run.log" 2>&1 < /dev/null &
  echo $! > "$run.pid"
  echo "load test $scenario started (pid $(cat "$run.pid")) after $(( $(date +%s) - start )) s" | tee -a "$out/load.log"
  # once, in the call that starts the run (its $OUT comes back with them): the planner at the
  # server's max_model_len (vLLM's own "Maximum concurrency" line is for that), and for 1m-context
  # at its requests' length, 1,000,000 + 8,192 tokens, what the run must hold
  python3 -m vllm_kimi_linear.tools.planner --tp 1 --gpu h200 --max-model-len 1048576 > "$out/planner.txt" 2>&1
  [ "$scenario" = 1m-context ] && { echo; echo "# requests of 1,008,192 tokens"
    python3 -m vllm_kimi_linear.tools.planner --tp 1 --gpu h200 --max-model-len 1008192; } >> "$out/planner.txt" 2>&1
  grep -h "Maximum concurrency\|KV cache size\|Available KV cache" /tmp/sbs/server-plugin.log > "$out/vllm-capacity.txt"
elif [ ! -f "$run.pid" ]; then
  echo "no $scenario run to wait for on this machine (a new machine: start it again)" | tee -a "$out/load.log"; exit 1
fi
# wait until the run ends or this call is near the device's limit (570 s from this script's start,
# a server start included), so what is there comes back either way
limit="${KIMI_LOAD_TIME_LIMIT:-570}"
while kill -0 "$(cat "$run.pid")" 2>/dev/null && [ $(( $(date +%s) - start )) -lt "$limit" ]; do sleep 5; done
cp "$run.log" "$out/load.log.run" 2>/dev/null
if [ ! -f "$run.rc" ]; then
  echo "load test still running after $(( $(date +%s) - start )) s: the next call (within the machine's idle limit) is" \
       "loadtests/load_on_device.sh --wait $scenario" | tee -a "$out/load.log"
  exit 124
fi
rc=$(cat "$run.rc")
echo "load test exit $rc after $(( $(date +%s) - start )) s of this call" | tee -a "$out/load.log"
cp "$run"/result.json "$run"/*.png "$out/" 2>/dev/null
exit "$rc"
