#!/usr/bin/env bash
# Tools the deploy checks (tests/deploy) need beyond the Python environment: kubectl, for
# `kubectl kustomize`. Idempotent: exits 0 at once when kubectl is already on PATH; otherwise
# installs Debian's kubernetes-client (kubectl 1.20, whose built-in kustomize renders every
# kustomization in deploy/k8s; the manifests stick to fields it understands). Run as root in CI.
set -euo pipefail
if command -v kubectl >/dev/null 2>&1; then
  exit 0
fi
if [ "$(id -u)" -ne 0 ]; then
  if command -v sudo >/dev/null 2>&1; then
    exec sudo -n "$0" "$@"
  fi
  echo "install-tools.sh: kubectl missing and not root; install kubernetes-client (or kubectl)" >&2
  exit 1
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends kubernetes-client >/dev/null
command -v kubectl >/dev/null
