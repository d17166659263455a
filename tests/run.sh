#!/usr/bin/env bash
# The test command: sets up the CPU environment on first use, then runs the pytest suite.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
"$root/deploy/setup-cpu.sh"
cd "$root"
exec "${KIMI_VENV:-$root/.venv}/bin/python" -m pytest tests "$@"
