"""The MoE tuner's plumbing (vllm_kimi_linear/tools/tune_moe.py) with a stand-in timer, as vLLM's
Triton MoE kernel runs on a GPU only: each configuration reaches the kernel through vLLM's
override (the timer reads it there), the fastest per batch size is kept, a batch size where
vLLM's default wins is left to it (the file holds vLLM's default there, and at every other size
of vLLM's tuning list, so no token count borrows a tuned neighbour's tiles), and the file is
vLLM's own name and format for the shape."""
from __future__ import annotations

import json

from vllm_kimi_linear.tools import tune_moe


def test_tuner_keeps_the_fastest_config_and_writes_vllms_file(tmp_path, monkeypatch):
    from vllm.model_executor.layers.fused_moe import get_config
    from vllm.model_executor.layers.fused_moe.fused_moe import get_moe_configs

    def timer(fn):  # ms; what the kernel would see as its config, not the call itself
        cfg = get_config()
        if cfg is None:  # vLLM's default: beaten at M=1 only (below), never at M=64
            return 0.010 if timer.M == 1 else 0.001
        return 0.002 + cfg["BLOCK_SIZE_N"] / 64 * 0.001 + cfg["num_stages"] * 0.0001

    def make_case(M, weights, device="cuda", seed=0):
        timer.M = M
        return ()

    monkeypatch.setattr(tune_moe, "make_weights", lambda N, device="cuda": ())
    monkeypatch.setattr(tune_moe, "make_case", make_case)
    res = tune_moe.tune(2, [1, 64], max_seconds=60, timer=timer, device="cpu")
    best, best_us, default_us = res[1]
    assert (best["BLOCK_SIZE_N"], best["num_stages"], round(best_us, 1), default_us) == (32, 3, 2.8, 10.0)
    assert res[64][0] is None  # the default won there
    path = tune_moe.write_vllm_config(tmp_path, 2, res)
    assert path.name.startswith("E=256,N=512,device_name=") and path.suffix == ".json"
    table = json.loads(path.read_text())
    assert set(table) - {"triton_version"} == {str(M) for M in tune_moe.FILE_BATCHES}
    assert table["1"] == best
    for M in (64, 2, 4096):  # not tuned, or the default won: vLLM's own choice for that size
        assert table[str(M)] == tune_moe.vllm_default(M, 512) and table[str(M)] != best
    # vLLM reads it back from $VLLM_TUNED_CONFIG_FOLDER and picks per token count from it
    monkeypatch.setenv("VLLM_TUNED_CONFIG_FOLDER", str(tmp_path))
    get_moe_configs.cache_clear()
    try:
        from vllm.model_executor.layers.fused_moe.fused_moe import try_get_optimal_moe_config
        configs = get_moe_configs(256, 512, None)
        assert configs[1] == best and configs[4096] == tune_moe.vllm_default(4096, 512)
        w1, w2 = (256, 1024, 2304), (256, 2304, 512)
        assert try_get_optimal_moe_config(w1, w2, 8, None, 1) == best
        assert try_get_optimal_moe_config(w1, w2, 8, None, 5000) == tune_moe.vllm_default(4096, 512)
    finally:
        get_moe_configs.cache_clear()


def test_the_plugin_points_vllm_at_its_tuned_configs(tmp_path, monkeypatch):
    """Only when the folder has a config, and never over the user's own folder."""
    import os

    from vllm_kimi_linear.hooks import use_tuned_moe_configs
    monkeypatch.delenv("VLLM_TUNED_CONFIG_FOLDER", raising=False)
    use_tuned_moe_configs(tmp_path)  # empty: nothing to point at
    assert "VLLM_TUNED_CONFIG_FOLDER" not in os.environ
    (tmp_path / "E=256,N=1024,device_name=NVIDIA_H200.json").write_text("{}")
    monkeypatch.setenv("VLLM_TUNED_CONFIG_FOLDER", "/elsewhere")
    use_tuned_moe_configs(tmp_path)
    assert os.environ["VLLM_TUNED_CONFIG_FOLDER"] == "/elsewhere"
    monkeypatch.delenv("VLLM_TUNED_CONFIG_FOLDER")
    use_tuned_moe_configs(tmp_path)
    assert os.environ["VLLM_TUNED_CONFIG_FOLDER"] == str(tmp_path)


def test_shipped_h200_file_is_the_tuners_output_of_its_recorded_run(tmp_path):
    """The lent GPU returns no file named like vLLM's (`=`, `,`), so the shipped file is written
    from the run's tune_moe.json (`--from-summary`): it must be exactly what the tuner makes of
    that record (moe_configs/README.md quotes its times)."""
    from pathlib import Path
    root = Path(__file__).resolve().parents[1]
    summary = json.loads((root / "kernels/results/tune_moe_h200_2026-12-03.json").read_text())
    assert tune_moe.main(["--out", str(tmp_path), "--from-summary",
                          str(root / "kernels/results/tune_moe_h200_2026-12-03.json")]) == 0
    (written,) = tmp_path.glob("E=*.json")
    shipped = root / "vllm_kimi_linear/moe_configs" / summary["tp1"]["file"]
    assert written.name == shipped.name == "E=256,N=1024,device_name=NVIDIA_H200.json"
    ours, theirs = json.loads(written.read_text()), json.loads(shipped.read_text())
    assert ours.pop("triton_version") == "not recorded" and theirs.pop("triton_version")
    assert ours == theirs
    tuned = {r["M"]: r["config"] for r in summary["tp1"]["rows"] if r["config"]}
    assert {M: theirs[str(M)] for M in tuned} == tuned and "8192" in theirs
