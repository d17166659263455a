# Shell helpers for the wrappers that run on the lent H200 (tests/gpu/run_on_device.sh,
# loadtests/side_by_side_on_device.sh, loadtests/load_on_device.sh); source it from the repo root.

# The plugin as pip installs it (entry points, package data) into /tmp/plugin, from this call's
# working tree: an install an earlier call left there may be of older code.
install_plugin() {
  rm -rf /tmp/plugin && python3 -m pip install -q --no-deps --no-build-isolation --no-index --target /tmp/plugin . \
    || { echo "plugin install failed" >&2; return 1; }
}

# Stop every vLLM server on the machine (a kept one, or one whose run was killed outright: the
# harness stops its servers on SIGTERM, which `timeout` sends, not on SIGKILL), forget kept ones,
# and wait until the GPU's memory is free.
stop_servers() {
  pkill -9 -f "[v]llm.entrypoints.cli.main serve"; pkill -9 -f "[E]ngineCore"
  rm -f /tmp/sbs/server-*.url
  for _ in $(seq 30); do
    [ "$(nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits)" -lt 2000 ] && return
    sleep 2
  done
}
