#!/usr/bin/env bash
# The container entrypoint of both images (deploy/docker/): one script for every role, so the
# Kubernetes manifests, the compose files and a bare host all start vLLM the same way.
#
#   entrypoint.sh serve  [vllm serve args...]   one node: exec `vllm serve ARGS` (the default role)
#   entrypoint.sh leader [vllm serve args...]   multi-node (LeaderWorkerSet pod 0): start the Ray head,
#                                               wait for $LWS_GROUP_SIZE Ray nodes, then exec
#                                               `vllm serve ARGS` (ARGS should hold
#                                               --distributed-executor-backend ray)
#   entrypoint.sh worker                        multi-node (pods 1..N-1): join the Ray head at
#                                               $LWS_LEADER_ADDRESS and block
#   entrypoint.sh ready                         readiness check: GET /v1/models with the API key
#                                               (exit 0 when it answers 200)
#
# Everything after the role goes to `vllm serve` verbatim, so CI can parse the manifests' argument
# lists with vLLM's own parser (tests/deploy/test_vllm_args.py).
# Environment:
#   VLLM_API_KEY          read by vLLM itself (protects /v1/*); also used by `ready`
#   KIMI_PORT             port `ready` probes (default 8000; keep it equal to --port)
#   KIMI_TINY_MODEL_DIR   if set and holding no config.json, build the embedded tiny Kimi Linear
#                         there first (CPU image / local runs)
#   RAY_PORT              Ray GCS port (default 6379)
#   KIMI_RAY_TIMEOUT      seconds the leader waits for all workers / a worker retries (default 900)
#   LWS_GROUP_SIZE, LWS_LEADER_ADDRESS   injected by the LeaderWorkerSet controller
#   VLLM_PLUGINS          default kimi_linear: vLLM loads endpoint plugins only when named, and
#                         that name also enables our /kimi-linear/state route and /metrics gauges
set -euo pipefail
export VLLM_PLUGINS="${VLLM_PLUGINS:-kimi_linear}"

role="${1:-serve}"
[ $# -gt 0 ] && shift
python="${KIMI_PYTHON:-python3}"
ray_port="${RAY_PORT:-6379}"
timeout="${KIMI_RAY_TIMEOUT:-900}"

log() { echo "[kimi-entrypoint] $*" >&2; }

build_tiny_model() {
  local dir="${KIMI_TINY_MODEL_DIR:-}"
  if [ -n "$dir" ] && [ ! -f "$dir/config.json" ]; then
    log "building the embedded tiny Kimi Linear in $dir"
    "$python" -m vllm_kimi_linear.tools.builder "$dir"
  fi
}

case "$role" in
  serve)
    build_tiny_model
    log "vllm serve $*"
    exec vllm serve "$@"
    ;;
  leader)
    : "${LWS_GROUP_SIZE:?leader needs LWS_GROUP_SIZE (set by the LeaderWorkerSet controller)}"
    # Ray's GCS on this pod; vLLM's Ray executor places one worker per GPU across the group.
    # The dashboard stays on loopback: nothing outside the pod needs it.
    ray start --head --port="$ray_port" --dashboard-host=127.0.0.1 --disable-usage-stats
    log "waiting up to ${timeout}s for $LWS_GROUP_SIZE Ray nodes"
    "$python" - "$LWS_GROUP_SIZE" "$timeout" <<'EOF'
import sys, time
import ray
want, deadline = int(sys.argv[1]), time.time() + float(sys.argv[2])
ray.init(address="auto", logging_level="ERROR")
while True:
    alive = sum(1 for n in ray.nodes() if n["Alive"])
    if alive >= want:
        print(f"[kimi-entrypoint] Ray cluster has {alive} nodes", file=sys.stderr)
        break
    if time.time() > deadline:
        sys.exit(f"[kimi-entrypoint] only {alive}/{want} Ray nodes joined in time")
    time.sleep(5)
EOF
    log "vllm serve $*"
    exec vllm serve "$@"
    ;;
  worker)
    : "${LWS_LEADER_ADDRESS:?worker needs LWS_LEADER_ADDRESS (set by the LeaderWorkerSet controller)}"
    # The leader's Ray head may not be up yet: retry until it is, then block for the pod's life.
    # If the leader goes away `ray start --block` exits non-zero, the container restarts, and
    # restartPolicy RecreateGroupOnPodRestart recreates the whole group.
    deadline=$(( $(date +%s) + timeout ))
    until ray start --address="$LWS_LEADER_ADDRESS:$ray_port" --disable-usage-stats --block; do
      if [ "$(date +%s)" -ge "$deadline" ]; then
        log "could not join the Ray head at $LWS_LEADER_ADDRESS:$ray_port"
        exit 1
      fi
      log "Ray head not reachable yet; retrying in 5s"
      sleep 5
    done
    ;;
  ready)
    exec "$python" - "${KIMI_PORT:-8000}" <<'EOF'
import os, sys, urllib.request
req = urllib.request.Request(f"http://127.0.0.1:{sys.argv[1]}/v1/models")
if os.environ.get("VLLM_API_KEY"):
    req.add_header("Authorization", "Bearer " + os.environ["VLLM_API_KEY"])
try:
    with urllib.request.urlopen(req, timeout=5) as r:
        sys.exit(0 if r.status == 200 else 1)
except Exception as e:
    sys.exit(f"not ready: {e}")
EOF
    ;;
  *)
    log "unknown role '$role' (serve | leader | worker | ready)"
    exit 64
    ;;
esac
