#!/usr/bin/env bash
# The test command: sets up the CPU environment on first use, then runs the pytest suite.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
"$root/deploy/setup-cpu.sh"
"$root/deploy/ci/install-tools.sh"   # kubectl, for rendering the deploy manifests
cd "$root"
exec "${KIMI_VENV:-$root/.venv}/bin/python" -m pytest tests "$@"
