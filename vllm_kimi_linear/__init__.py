"""vllm-kimi-linear: serves Kimi Linear models through vLLM as a general plugin."""
