"""The plugin is found through its `vllm.general_plugins` entry point, in a fresh process, exactly
as vLLM's own processes load it; and it stays out when VLLM_PLUGINS leaves it out."""
from __future__ import annotations

import json
import os
import subprocess
import sys

PROBE = r"""
import json, sys
import vllm_kimi_linear
assert "vllm" not in sys.modules, "importing the package must not import vLLM"
from vllm.plugins import load_general_plugins
load_general_plugins()
from vllm import ModelRegistry
entry = ModelRegistry.models["KimiLinearForCausalLM"]
print(json.dumps({"module": entry.module_name, "cls": entry.class_name}))
"""


def _probe(env_update):
    env = {k: v for k, v in os.environ.items() if k != "VLLM_PLUGINS"}
    env.update(env_update)
    out = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_entry_point_registers_our_model():
    got = _probe({})
    assert got == {"module": "vllm_kimi_linear.model", "cls": "KimiLinearForCausalLM"}


def test_named_in_vllm_plugins_loads():
    assert _probe({"VLLM_PLUGINS": "kimi_linear"})["module"] == "vllm_kimi_linear.model"


def test_left_out_of_vllm_plugins_is_not_loaded():
    got = _probe({"VLLM_PLUGINS": "lora_filesystem_resolver"})
    assert not got["module"].startswith("vllm_kimi_linear"), got


def test_register_is_reentrant():
    code = ("import vllm_kimi_linear as p; p.register(); p.register()\n"
            "from vllm import ModelRegistry\n"
            "print(ModelRegistry.models['KimiLinearForCausalLM'].module_name)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().splitlines()[-1] == "vllm_kimi_linear.model"


def test_the_wheel_installs_two_import_names_and_no_generic_kernels(tmp_path):
    """`pip install` puts vllm_kimi_linear and kimi_kda on sys.path, nothing named `kernels`
    (Hugging Face publishes a package of that name; transformers probes for it)."""
    import zipfile
    from pathlib import Path
    root = Path(__file__).resolve().parents[1]
    out = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                          "-w", str(tmp_path), str(root)], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    names = zipfile.ZipFile(next(tmp_path.glob("*.whl"))).namelist()
    top = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert top == {"vllm_kimi_linear", "kimi_kda"}, top
    assert "kimi_kda/conv/triton_conv.py" in names and "kimi_kda/kda/triton_chunk.py" in names


def test_kimi_kda_imports_without_vllm(tmp_path):
    probe = ("import sys; sys.modules['vllm'] = None\n"
             "import kimi_kda, kimi_kda.kda.triton_chunk, kimi_kda.conv.triton_conv\n"
             "print(kimi_kda.chunk_kda.__module__)")
    out = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "kimi_kda.kda", out.stderr[-3000:]


def test_every_patch_is_in_the_table_and_checks_the_vllm_release():
    import warnings

    import pytest

    from vllm_kimi_linear import patches
    from pathlib import Path
    doc = patches.__doc__
    modules = {f.stem for f in Path(patches.__file__).parent.glob("*.py")} - {"__init__"}
    assert set(patches.ALL + patches.CPU_ONLY) <= modules
    for name in modules:
        assert f"| `{name}` |" in doc, f"patches/{name}.py is missing from the table in patches/__init__.py"
        assert "written_for(__name__)" in (Path(patches.__file__).parent / f"{name}.py").read_text() \
            or name == "kv_cache_manager", name  # applied by engine_core, which checks
    assert patches.written_for("probe", "0.32.0+cpu") and patches.written_for("probe", "0.32.3")
    with pytest.warns(RuntimeWarning, match=r"probe2 changes a vLLM object as vLLM 0.32 has it; this is vLLM 0.33.0"):
        assert not patches.written_for("probe2", "0.33.0")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert not patches.written_for("probe2", "0.33.0")  # once per module


def test_register_changes_no_class_for_other_models_and_imports_no_tool():
    """After register(): vLLM's KVCacheManager class is its own (the totals go on a Kimi Linear
    engine's instance), and nothing from the offline tools is imported by the runtime."""
    code = ("import sys, vllm_kimi_linear as p; p.register()\n"
            "import vllm_kimi_linear.model, vllm_kimi_linear.endpoints\n"
            "from vllm.v1.core.kv_cache_manager import KVCacheManager as K\n"
            "print(K.make_prefix_cache_stats.__module__)\n"
            "print(sorted(m for m in sys.modules if m.startswith('vllm_kimi_linear.tools')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    module, tools = out.stdout.strip().splitlines()[-2:]
    assert module == "vllm.v1.core.kv_cache_manager" and tools == "[]", out.stdout


def test_kimi_k3_language_model_stays_vllms(monkeypatch):
    """vLLM builds Kimi-K3's language model through the registry name KimiLinearForCausalLM as a
    submodel (`with_hf_config`): the plugin's class hands that construction to vLLM's own class
    (here a recorder standing in for it: the real one needs CUDA), and builds Kimi Linear itself."""
    from types import SimpleNamespace

    import vllm.models.kimi_k3 as k3

    from vllm_kimi_linear.model import KimiLinearForCausalLM

    made = []

    class VllmOwn:
        def __init__(self, *, vllm_config, prefix=""):
            made.append((vllm_config, prefix))

    monkeypatch.setattr(k3, "KimiLinearForCausalLM", VllmOwn)
    sub = SimpleNamespace(model_config=SimpleNamespace(is_submodel_config=True))
    m = KimiLinearForCausalLM(vllm_config=sub, prefix="language_model")
    assert isinstance(m, VllmOwn) and made == [(sub, "language_model")]
    # not a submodel: the plugin's own class (its constructor then reads the config)
    top = SimpleNamespace(model_config=SimpleNamespace(is_submodel_config=False))
    assert isinstance(KimiLinearForCausalLM.__new__(KimiLinearForCausalLM, vllm_config=top),
                      KimiLinearForCausalLM)
