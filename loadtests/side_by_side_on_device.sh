#!/usr/bin/env bash
# loadtests/side_by_side.py on the lent H200, after ../shared/gpu-vllm/README.md's install step.
#   loadtests/side_by_side_on_device.sh IMPL [ROWS]
# IMPL: plugin or intree; ROWS: a comma list of side_by_side.ROWS (default all). The device returns
# at most 8 files from $OUT, so the run writes under /tmp/sbs and $OUT gets the summary, the
# server log and one tarball of every `vllm bench serve` JSON and log.
set -uo pipefail
impl="${1:?plugin or intree}"; rows="${2:-}"
out="${OUT:-$PWD/sbs-results}"; mkdir -p "$out"
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1
[ "$impl" = plugin ] && export PYTHONPATH=/tmp/site:/tmp/plugin
# A server left by an earlier call (the harness starts it in its own process session, which
# outlives a call stopped by its limit) would hold the GPU: stop it, and wait for the memory.
stop_servers() {
  pkill -9 -f "[v]llm.entrypoints.cli.main serve"; pkill -9 -f "[E]ngineCore"
  for _ in $(seq 30); do
    [ "$(nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits)" -lt 2000 ] && return
    sleep 2
  done
}
stop_servers
nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv,noheader
start=$(date +%s)
# stop before the device call's own limit, so the rows measured so far still come back
timeout -k 15 "${KIMI_SBS_TIME_LIMIT:-570}" python3 -m loadtests.side_by_side run --impl "$impl" \
  --out /tmp/sbs ${rows:+--rows "$rows"} 2>&1 | tee "$out/sbs-$impl.log"
rc=${PIPESTATUS[0]}
echo "side_by_side exit $rc after $(( $(date +%s) - start )) s" | tee -a "$out/sbs-$impl.log"
cp /tmp/sbs/summary-"$impl".json "$out/" 2>/dev/null
cp /tmp/sbs/server-"$impl".log "$out/" 2>/dev/null
tar czf "$out/bench-$impl.tgz" -C /tmp/sbs --exclude published-config --exclude 'server-*' . 2>/dev/null
stop_servers
exit $rc
