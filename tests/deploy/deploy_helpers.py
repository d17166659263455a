"""Shared helpers of the deploy checks: rendering the kustomizations and finding `vllm serve`
argument lists in manifests, compose files and Dockerfiles. No cluster, no Docker engine."""
from __future__ import annotations

import functools
import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
KUSTOMIZATIONS = sorted(p.parent.relative_to(K8S).as_posix() for p in K8S.rglob("kustomization.yaml"))
COMPOSE_FILES = sorted((DEPLOY / "compose").glob("compose*.yaml"))
ENTRYPOINT = "/usr/local/bin/kimi-entrypoint"
SERVE_ROLES = ("serve", "leader")


@functools.lru_cache(maxsize=None)
def render(kustomization: str) -> tuple[dict, ...]:
    """`kubectl kustomize deploy/k8s/<kustomization>` as parsed documents."""
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.fail("kubectl not found: run deploy/ci/install-tools.sh (Debian's kubernetes-client)")
    out = subprocess.run([kubectl, "kustomize", str(K8S / kustomization)], capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, f"kubectl kustomize {kustomization} failed:\n{out.stderr}"
    return tuple(d for d in yaml.safe_load_all(out.stdout) if d)


def pod_templates(doc: dict) -> list[tuple[str, dict]]:
    """(label, PodTemplateSpec) of a workload object."""
    if doc["kind"] in ("Deployment", "StatefulSet", "DaemonSet", "Job"):
        return [("template", doc["spec"]["template"])]
    if doc["kind"] == "LeaderWorkerSet":
        lwt = doc["spec"]["leaderWorkerTemplate"]
        return [(k, lwt[k]) for k in ("leaderTemplate", "workerTemplate") if k in lwt]
    return []


def containers(doc: dict) -> list[tuple[str, dict]]:
    return [(f"{label}/{c['name']}", c) for label, t in pod_templates(doc)
            for c in t["spec"].get("containers", []) + t["spec"].get("initContainers", [])]


def serve_args_of_container(c: dict) -> list[str] | None:
    """The `vllm serve` arguments a container runs through the entrypoint, or None."""
    cmd, args = c.get("command") or [], c.get("args") or []
    if cmd and cmd[-1].endswith("kimi-entrypoint") and args and args[0] in SERVE_ROLES:
        return list(args[1:])
    return None


def all_serve_arg_lists() -> dict[str, list]:
    """Every `vllm serve` argument list shipped in deploy/: rendered manifests, compose, Dockerfiles."""
    lists: dict[str, list] = {}
    for k in KUSTOMIZATIONS:
        for doc in render(k):
            for label, c in containers(doc):
                args = serve_args_of_container(c)
                if args is not None:
                    lists[f"k8s/{k}:{doc['kind']}/{doc['metadata']['name']}/{label}"] = args
    for f in COMPOSE_FILES:
        for name, svc in yaml.safe_load(f.read_text())["services"].items():
            cmd = svc.get("command")
            if isinstance(cmd, list) and cmd and cmd[0] in SERVE_ROLES:
                lists[f"compose/{f.name}:{name}"] = list(cmd[1:])
    for f in sorted((DEPLOY / "docker").glob("Dockerfile*")):
        m = re.search(r"^CMD\s+(\[.*?\])\s*$", f.read_text().replace("\\\n", " "), re.M | re.S)
        if m:
            cmd = json.loads(m.group(1))
            if cmd and cmd[0] in SERVE_ROLES and cmd[1:] != ["--help"]:
                lists[f"docker/{f.name}:CMD"] = cmd[1:]
    return lists


def option(args: list[str], flag: str) -> str | None:
    """Value of `--flag V` / `--flag=V` in an argument list (last one wins, as in argparse)."""
    value = None
    for i, a in enumerate(args):
        if a == flag and i + 1 < len(args):
            value = args[i + 1]
        elif a.startswith(flag + "="):
            value = a.split("=", 1)[1]
    return value
