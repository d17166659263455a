"""Every `vllm serve` argument list shipped in deploy/ (rendered Kubernetes manifests, compose files,
the CPU image's CMD) parses with the pinned vLLM's own `serve` parser, so a renamed or removed
vLLM flag fails CI. One subprocess parses them all (deploy/ci/check_vllm_args.py): vLLM stays out
of the test process."""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import pytest

from deploy_helpers import DEPLOY, ROOT, all_serve_arg_lists

CHECKER = DEPLOY / "ci" / "check_vllm_args.py"


def run_checker(lists: dict, *flags: str) -> tuple[int, dict]:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, str(CHECKER), *flags, "-"], input=json.dumps(lists),
                         capture_output=True, text=True, timeout=300, cwd=ROOT, env=env)
    assert out.stdout.strip(), f"checker crashed (rc {out.returncode}):\n{out.stderr[-3000:]}"
    return out.returncode, json.loads(out.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def shipped():
    return all_serve_arg_lists()


@pytest.fixture(scope="module")
def report(shipped):
    # the shipped lists and the negative cases in one vLLM start-up (~15 s)
    lists = dict(shipped)
    lists["NEGATIVE bogus flag"] = ["some/model", "--tensor-parallel-size", "8", "--bogus-flag", "1"]
    lists["NEGATIVE renamed flag (abbreviation)"] = ["some/model", "--tensor-parallel", "8"]
    lists["NEGATIVE bad value"] = ["some/model", "--tensor-parallel-size", "eight"]
    lists["NEGATIVE unquoted YAML number"] = ["some/model", "--port", 8000]
    rc, rep = run_checker(lists)
    assert rc == 1  # the negative cases fail
    return rep


def test_every_place_that_starts_vllm_is_covered(shipped):
    names = " ".join(shipped)
    for where in ("k8s/single-node:Deployment", "k8s/multi-node:LeaderWorkerSet", "k8s/overlays/tp4",
                  "k8s/overlays/nodes-4", "k8s/overlays/context-256k", "k8s/overlays/model-path",
                  "compose/compose.gpu.yaml", "compose/compose.cpu.yaml", "docker/Dockerfile.cpu:CMD"):
        assert where in names, f"no vllm serve argument list found for {where}"


def test_shipped_argument_lists_parse_with_vllm(shipped, report):
    bad = {name: report[name]["error"] for name in shipped if not report[name]["ok"]}
    assert not bad, json.dumps(bad, indent=1)


def test_a_bogus_flag_fails(report):
    assert not report["NEGATIVE bogus flag"]["ok"]
    assert "--bogus-flag" in report["NEGATIVE bogus flag"]["error"]


def test_an_abbreviated_or_renamed_flag_fails(report):
    assert not report["NEGATIVE renamed flag (abbreviation)"]["ok"]


def test_bad_values_fail(report):
    assert "invalid int value" in report["NEGATIVE bad value"]["error"]
    assert not report["NEGATIVE unquoted YAML number"]["ok"]


def test_vllm_parser_itself_rejects_a_bogus_flag():
    """Not just our spelling check: argparse of vLLM's serve subcommand refuses it too."""
    rc, rep = run_checker({"bogus": ["some/model", "--bogus-flag", "1"],
                           "fine": ["some/model", "--max-model-len", "1048576"]}, "--argparse-only")
    assert rc == 1
    assert not rep["bogus"]["ok"] and "unrecognized arguments: --bogus-flag" in rep["bogus"]["error"]
    assert rep["fine"]["ok"]


@pytest.fixture(scope="module")
def engine_report(shipped, tmp_path_factory):
    """Every shipped list turned into vLLM's engine config on the published Kimi-Linear-48B-A3B
    config (the builder's --published-config: no weights, --load-format dummy), with the plugin's
    start-up checks: TP 8 x PP 2, PP 4, 1M context, as the manifests say. Two negative lists
    show the plugin's config hook runs in this check."""
    from vllm_kimi_linear.tools.builder import build_published_config
    published = build_published_config(tmp_path_factory.mktemp("published") / "kimi-linear-48b")
    lists = {name: ray_as_mp(args) for name, args in shipped.items()}
    base = ["some/model", "--tensor-parallel-size", "8"]
    lists["NEGATIVE speculative decoding"] = base + ["--speculative-config",
                                                     '{"method": "ngram", "num_speculative_tokens": 2}']
    lists["NEGATIVE TP that does not divide the heads"] = ["some/model", "--tensor-parallel-size", "3"]
    rc, rep = run_checker(lists, "--engine-config", str(published))
    assert rc == 1
    return rep


def ray_as_mp(args: list[str]) -> list[str]:
    """The list with the Ray executor replaced by vLLM's multiprocessing one where Ray is not
    installed (vLLM validates the executor when it builds the config; the CPU test machine has no
    Ray, and vLLM on CPU does not run on Ray). Everything else is the manifest's own."""
    if importlib.util.find_spec("ray") is not None:
        return args
    return [("mp" if a == "ray" and args[i - 1] == "--distributed-executor-backend" else a)
            for i, a in enumerate(args)]


def test_shipped_flag_sets_build_an_engine_config_with_the_plugin(shipped, engine_report):
    assert any("--pipeline-parallel-size" in args for args in shipped.values())
    bad = {name: engine_report[name]["error"][:600] for name in shipped if not engine_report[name]["ok"]}
    assert not bad, json.dumps(bad, indent=1)


def test_the_engine_config_check_runs_the_plugins_start_up_checks(engine_report):
    assert "does not support speculative decoding" in engine_report["NEGATIVE speculative decoding"]["error"]
    assert "is not divisible by the tensor-parallel size 3" in \
        engine_report["NEGATIVE TP that does not divide the heads"]["error"]
