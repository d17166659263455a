#!/usr/bin/env bash
# loadtests/side_by_side.py on the lent H200, after ../shared/gpu-vllm/README.md's install step.
#   loadtests/side_by_side_on_device.sh IMPL [ROWS] [more `side_by_side run` flags...]
# IMPL: plugin or intree; ROWS: a comma list of side_by_side.ROWS ("" or all: every row).
# Flags: --profile ROWS (after the rows, each of ROWS again with 32 of its steps profiled: a kernel
# table per row; the server must start with it), --keep-server (the
# server stays up for the next call of the same IMPL, which then starts no other: e.g. the rows
# in one call and the 1M row in the next, each inside a call's 10 minutes).
# The device returns at most 8 files from $OUT, so the run writes under /tmp/sbs and $OUT gets the
# summary, the server log, the decode profile (table and raw traces) and one tarball of every
# `vllm bench serve` JSON and log.
set -uo pipefail
impl="${1:?plugin or intree}"; rows="${2:-}"; shift $(( $# < 2 ? $# : 2 ))
[ "$rows" = all ] && rows=""
out="${OUT:-$PWD/sbs-results}"; mkdir -p "$out" /tmp/sbs
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1
source "$(dirname "$0")/../tests/gpu/device.sh"
if [ "$impl" = plugin ]; then
  # (a kept server keeps the install it started with)
  [ -f /tmp/sbs/server-plugin.url ] || install_plugin || exit 1
  export PYTHONPATH=/tmp/site:/tmp/plugin
fi
# A server another call left holds the GPU: keep it only if it is this IMPL's kept server.
[ -f "/tmp/sbs/server-$impl.url" ] || stop_servers
nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv,noheader
start=$(date +%s)
# stop before the device call's own limit, so the rows measured so far still come back
timeout -k 15 "${KIMI_SBS_TIME_LIMIT:-570}" python3 -m loadtests.side_by_side run --impl "$impl" \
  --out /tmp/sbs ${rows:+--rows "$rows"} "$@" 2>&1 | tee -a "$out/sbs-$impl.log"
rc=${PIPESTATUS[0]}
echo "side_by_side exit $rc after $(( $(date +%s) - start )) s" | tee -a "$out/sbs-$impl.log"
# how big the compile caches a start-up fills are (a fresh machine's first start pays ~100 s more
# than a warm one's): whether carrying them to the next machine would fit a device transfer
du -sh ~/.cache/vllm ~/.triton/cache ~/.cache/flashinfer 2>/dev/null | sed 's/^/compile cache: /' | tee -a "$out/sbs-$impl.log"
cp /tmp/sbs/summary-"$impl".json "$out/" 2>/dev/null
cp /tmp/sbs/server-"$impl".log "$out/" 2>/dev/null
# the profiles' kernel tables and raw traces (host gaps, per-step timelines), where they fit a returned file
traces=$(cd /tmp/sbs && ls -d traces-* profile-"$impl"-*.json 2>/dev/null)
if [ -n "$traces" ]; then
  tar czf "$out/profile-$impl.tgz" -C /tmp/sbs $traces 2>/dev/null
  [ "$(stat -c %s "$out/profile-$impl.tgz" 2>/dev/null || echo 0)" -lt 15000000 ] || \
    tar czf "$out/profile-$impl.tgz" -C /tmp/sbs $(cd /tmp/sbs && ls profile-"$impl"-*.json)  # the tables alone
fi
tar czf "$out/bench-$impl.tgz" -C /tmp/sbs --exclude published-config --exclude profile --exclude 'traces-*' \
  --exclude 'server-*' . 2>/dev/null
case " $* " in *" --keep-server "*) [ "$rc" = 0 ] || stop_servers ;; *) stop_servers ;; esac
exit $rc
