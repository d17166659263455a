"""Every rendered manifest validates offline: core objects against Kubernetes' own schemas
(kubernetes-validate, strict: unknown fields rejected), the LeaderWorkerSet against the vendored
LWS v1 schema (deploy/schemas/) with its pod templates against core/v1 PodTemplate; plus the
conventions an operator expects (pinned images, non-root, GPU requests == limits, probes, secrets,
group restart) and the consistency of TP/PP/GPU counts and memory settings with the capacity planner."""
from __future__ import annotations

import copy
import json

import jsonschema
import kubernetes_validate
import pytest
import yaml

from vllm_kimi_linear.tools import planner

from deploy_helpers import (DEPLOY, ENTRYPOINT, KUSTOMIZATIONS, containers, option, pod_templates,
                            render, serve_args_of_container)

K8S_VERSION = "1.30.0"  # oldest Kubernetes the manifests target (LWS needs >= 1.26)
LWS_SCHEMA = json.loads((DEPLOY / "schemas" / "leaderworkerset.x-k8s.io_v1.json").read_text())


def all_docs():
    return [(k, d) for k in KUSTOMIZATIONS for d in render(k)]


def workloads():
    return [(k, d) for k, d in all_docs() if pod_templates(d)]


def _id(kd):
    return f"{kd[0]}:{kd[1]['kind']}/{kd[1]['metadata']['name']}"


def validate_core(doc: dict) -> None:
    kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


def validate_lws(doc: dict) -> None:
    jsonschema.Draft202012Validator(LWS_SCHEMA).validate(doc)
    for label, template in pod_templates(doc):
        validate_core({"apiVersion": "v1", "kind": "PodTemplate",
                       "metadata": {"name": f"{doc['metadata']['name']}-{label.lower()}"},
                       "template": template})


def test_expected_kustomizations_exist():
    assert {"single-node", "multi-node", "overlays/tp4", "overlays/nodes-4", "overlays/context-256k",
            "overlays/model-path"} <= set(KUSTOMIZATIONS)


@pytest.mark.parametrize("kustomization", KUSTOMIZATIONS)
def test_every_rendered_object_validates(kustomization):
    docs = render(kustomization)
    assert docs, "rendered nothing"
    for doc in docs:
        if doc["apiVersion"] == "leaderworkerset.x-k8s.io/v1":
            validate_lws(doc)
        else:
            validate_core(doc)


def test_lws_schema_is_a_valid_schema():
    jsonschema.Draft202012Validator.check_schema(LWS_SCHEMA)


def _lws():
    return next(d for d in render("multi-node") if d["kind"] == "LeaderWorkerSet")


@pytest.mark.parametrize("path,value", [
    (("spec", "leaderWorkerTemplate", "restartPolicy"), "RecreateGroupOnRestart"),  # misspelt enum
    (("spec", "leaderWorkerTemplate", "size"), 0),
    (("spec", "startupPolicy"), "LeaderStarted"),
    (("spec", "leaderWorkerTemplate", "workerTemplte"), {}),  # unknown field
    (("spec", "rolloutStrategy", "type"), "Recreate"),
])
def test_lws_schema_rejects_broken_lws(path, value):
    doc = copy.deepcopy(_lws())
    node = doc
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    with pytest.raises(jsonschema.ValidationError):
        validate_lws(doc)


def test_pod_template_inside_lws_is_checked_deeply():
    doc = copy.deepcopy(_lws())
    doc["spec"]["leaderWorkerTemplate"]["workerTemplate"]["spec"]["containers"][0]["resource"] = {}
    with pytest.raises(jsonschema.ValidationError):
        validate_lws(doc)


def test_core_validation_is_strict():
    dep = copy.deepcopy(next(d for d in render("single-node") if d["kind"] == "Deployment"))
    dep["spec"]["template"]["spec"]["containers"][0]["livenesProbe"] = {}
    with pytest.raises(jsonschema.ValidationError):
        validate_core(dep)


@pytest.mark.parametrize("kd", workloads(), ids=_id)
def test_pod_security_and_resources(kd):
    _, doc = kd
    for label, template in pod_templates(doc):
        pod = template["spec"]
        sc = pod["securityContext"]
        assert sc["runAsNonRoot"] is True and sc["runAsUser"] != 0, label
        assert sc["seccompProfile"]["type"] == "RuntimeDefault"
        assert pod.get("automountServiceAccountToken") is False
        assert template["metadata"]["labels"]["app.kubernetes.io/name"]
        volumes = {v["name"]: v for v in pod["volumes"]}
        for cname, c in containers({"kind": "Deployment", "spec": {"template": template}}):
            image = c["image"]
            assert ":" in image.rsplit("/", 1)[-1] and not image.endswith(":latest"), image
            csc = c["securityContext"]
            assert csc["allowPrivilegeEscalation"] is False and csc["readOnlyRootFilesystem"] is True
            assert csc["capabilities"]["drop"] == ["ALL"]
            res = c["resources"]
            assert res["requests"] == res["limits"], f"{cname}: requests != limits"
            assert int(res["limits"]["nvidia.com/gpu"]) >= 1
            mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
            assert volumes[mounts["/dev/shm"]]["emptyDir"]["medium"] == "Memory"
            assert "persistentVolumeClaim" in volumes[mounts["/models"]]
            assert "emptyDir" in volumes[mounts["/tmp"]]  # writable scratch, root fs is read-only


@pytest.mark.parametrize("kd", workloads(), ids=_id)
def test_serving_containers_probes_and_secrets(kd):
    _, doc = kd
    serving = [(n, c) for n, c in containers(doc) if serve_args_of_container(c) is not None]
    assert serving, "no container runs vllm serve"
    for name, c in serving:
        assert c["command"] == [ENTRYPOINT]
        startup = c["startupProbe"]
        assert startup["httpGet"]["path"] == "/health"
        # a 48B load (plus a first ~98 GB download) must not be killed by the kubelet
        assert startup["periodSeconds"] * startup["failureThreshold"] >= 1800, name
        assert c["livenessProbe"]["httpGet"]["path"] == "/health"
        assert c["readinessProbe"]["exec"]["command"] == [ENTRYPOINT, "ready"]  # GET /v1/models + key
        env = {e["name"]: e for e in c["env"]}
        for var, key in (("HF_TOKEN", "hf-token"), ("VLLM_API_KEY", "api-key")):
            assert "value" not in env[var], f"{var} must come from a Secret"
            assert env[var]["valueFrom"]["secretKeyRef"]["key"] == key
        port = option(serve_args_of_container(c), "--port")
        assert env["KIMI_PORT"]["value"] == port == str(c["ports"][0]["containerPort"])


@pytest.mark.parametrize("kd", workloads(), ids=_id)
def test_parallelism_matches_gpus_and_capacity_plan(kd):
    k, doc = kd
    leader = next(c for _, c in containers(doc) if serve_args_of_container(c) is not None)
    args = serve_args_of_container(leader)
    tp = int(option(args, "--tensor-parallel-size"))
    pp = int(option(args, "--pipeline-parallel-size") or 1)
    nodes = doc["spec"]["leaderWorkerTemplate"]["size"] if doc["kind"] == "LeaderWorkerSet" else 1
    assert pp == nodes, "pipeline stages must equal pods per group"
    for _, c in containers(doc):
        assert int(c["resources"]["limits"]["nvidia.com/gpu"]) == tp, "one TP rank per GPU"
    if nodes > 1:
        assert option(args, "--distributed-executor-backend") == "ray"
        assert args[0:0] == [] and leader["args"][0] == "leader"
    plan = planner.deploy_plan("h100", tp=tp, pp=pp, max_model_len=int(option(args, "--max-model-len")))
    assert float(option(args, "--gpu-memory-utilization")) == plan.gpu_memory_utilization
    assert int(option(args, "--max-num-seqs")) == plan.max_num_seqs, k
    assert int(option(args, "--max-num-batched-tokens")) == plan.max_num_batched_tokens
    assert plan.full_context_requests >= 1, "not even one full-length request fits on an H100"


def test_lws_group_restart_and_worker_role():
    lws = _lws()
    lwt = lws["spec"]["leaderWorkerTemplate"]
    assert lwt["restartPolicy"] == "RecreateGroupOnPodRestart"
    assert lwt["size"] == 2 and lws["spec"]["startupPolicy"] == "LeaderCreated"
    worker = lwt["workerTemplate"]["spec"]["containers"][0]
    assert worker["command"] == [ENTRYPOINT] and worker["args"] == ["worker"]
    for _, c in containers(lws):
        env = {e["name"]: e for e in c["env"]}
        assert env["NCCL_IB_HCA"]["value"] and env["NCCL_SOCKET_IFNAME"]["value"]
        assert env["VLLM_HOST_IP"]["valueFrom"]["fieldRef"]["fieldPath"] == "status.podIP"
        assert "IPC_LOCK" in c["securityContext"]["capabilities"]["add"]


@pytest.mark.parametrize("kustomization", ["single-node", "multi-node"])
def test_service_and_networkpolicy_select_the_api_pods(kustomization):
    docs = render(kustomization)
    api_labels = []
    for d in docs:
        for _, c in containers(d):
            if serve_args_of_container(c) is not None:
                tmpl = (d["spec"]["template"] if d["kind"] == "Deployment"
                        else d["spec"]["leaderWorkerTemplate"]["leaderTemplate"])
                api_labels.append(tmpl["metadata"]["labels"])
    assert len(api_labels) == 1
    labels = api_labels[0]
    svc = next(d for d in docs if d["kind"] == "Service")
    assert svc["spec"]["selector"].items() <= labels.items()
    assert svc["spec"]["ports"][0]["port"] == 8000
    policies = [d for d in docs if d["kind"] == "NetworkPolicy"]
    assert any(p["spec"]["podSelector"]["matchLabels"].items() <= labels.items()
               and p["spec"]["ingress"][0]["ports"][0]["port"] == 8000 for p in policies)


def _serve_args(kustomization):
    for d in render(kustomization):
        for _, c in containers(d):
            args = serve_args_of_container(c)
            if args is not None:
                return d, c, args
    raise AssertionError("no serve container")


def test_overlays_change_what_they_say():
    _, c, args = _serve_args("overlays/tp4")
    assert option(args, "--tensor-parallel-size") == "4" and c["resources"]["limits"]["nvidia.com/gpu"] == "4"
    lws, _, args = _serve_args("overlays/nodes-4")
    assert lws["spec"]["leaderWorkerTemplate"]["size"] == 4 and option(args, "--pipeline-parallel-size") == "4"
    _, _, args = _serve_args("overlays/context-256k")
    assert option(args, "--max-model-len") == "262144"
    _, c, args = _serve_args("overlays/model-path")
    assert args[0] == "/models/Kimi-Linear-48B-A3B-Instruct"
    assert {"name": "HF_HUB_OFFLINE", "value": "1"} in c["env"]
    _, _, base = _serve_args("single-node")
    assert option(base, "--max-model-len") == "1048576" and option(base, "--tensor-parallel-size") == "8"


def test_images_pinned_in_dockerfiles_and_compose():
    cuda = (DEPLOY / "docker" / "Dockerfile.cuda").read_text()
    assert "FROM vllm/vllm-openai:v0.32.0" in cuda
    assert '"/opt/kimi-linear[cuda]"' in cuda
    for f in sorted((DEPLOY / "docker").glob("Dockerfile*")):
        text = f.read_text()
        for line in text.splitlines():
            if line.startswith("FROM "):
                image = line.split()[1]
                assert ":" in image and not image.endswith(":latest"), f"{f.name}: {line}"
        assert "\nUSER 2000:2000\n" in text, f"{f.name} must run as the non-root user"
        assert 'ENTRYPOINT ["/usr/local/bin/kimi-entrypoint"]' in text
        assert "COPY deploy/entrypoint.sh /usr/local/bin/kimi-entrypoint" in text
    for f in sorted((DEPLOY / "compose").glob("compose*.yaml")):
        for svc in yaml.safe_load(f.read_text())["services"].values():
            assert ":" in svc["image"] and not svc["image"].endswith(":latest")
            assert svc["user"] == "2000:2000" and svc["read_only"] is True


def test_readme_memory_table_is_what_capacity_computes():
    readme = (DEPLOY / "README.md").read_text()
    assert planner.deploy_table() in readme, ("deploy/README.md table is stale: paste "
                                              "`python -m vllm_kimi_linear.tools.planner --deploy-table`")


# Fields that both Debian's kubectl 1.20 (kustomize v2.0.3) and current kubectl understand.
KUSTOMIZE_V2_KEYS = {"apiVersion", "kind", "resources", "bases", "patchesJson6902",
                     "patchesStrategicMerge", "images", "namePrefix", "nameSuffix", "namespace",
                     "commonLabels", "commonAnnotations", "configMapGenerator", "secretGenerator"}


@pytest.mark.parametrize("kustomization", KUSTOMIZATIONS)
def test_kustomization_is_portable_to_kustomize_v2(kustomization):
    root = DEPLOY / "k8s" / kustomization
    k = yaml.safe_load((root / "kustomization.yaml").read_text())
    assert set(k) <= KUSTOMIZE_V2_KEYS, set(k) - KUSTOMIZE_V2_KEYS
    for r in k.get("resources", []):
        assert (root / r).is_file(), f"kustomize v2 takes only files in resources: ({r}); use bases"
    for b in k.get("bases", []):
        assert (root / b / "kustomization.yaml").is_file()
    for p in k.get("patchesJson6902", []):
        assert set(p) == {"target", "path"} and (root / p["path"]).is_file()


def test_argument_position_guard_fails_the_render(tmp_path):
    """The overlays' JSON patches `test` the flag before replacing its value: a drifted base fails."""
    import shutil
    import subprocess
    shutil.copytree(DEPLOY / "k8s" / "single-node", tmp_path / "base")
    overlay = tmp_path / "overlay"
    overlay.mkdir()
    (overlay / "kustomization.yaml").write_text(yaml.safe_dump({
        "apiVersion": "kustomize.config.k8s.io/v1beta1", "kind": "Kustomization", "bases": ["../base"],
        "patchesJson6902": [{"target": {"group": "apps", "version": "v1", "kind": "Deployment",
                                        "name": "kimi-linear"}, "path": "patch.yaml"}]}))

    def render_with_guard(flag):
        (overlay / "patch.yaml").write_text(yaml.safe_dump([
            {"op": "test", "path": "/spec/template/spec/containers/0/args/8", "value": flag},
            {"op": "replace", "path": "/spec/template/spec/containers/0/args/9", "value": "4"}]))
        return subprocess.run([shutil.which("kubectl"), "kustomize", str(overlay)], capture_output=True,
                              text=True, timeout=120)

    good = render_with_guard("--tensor-parallel-size")
    assert good.returncode == 0, good.stderr
    bad = render_with_guard("--max-model-len")
    assert bad.returncode != 0, "a failing JSON-patch test op must abort the render"
    assert "test" in bad.stderr.lower(), bad.stderr
