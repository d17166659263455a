"""Load tests for an OpenAI-compatible server (vLLM serving Kimi Linear): exact-length prompts,
shared prefixes, arrival processes, latency/throughput/goodput reports. See loadtests/README.md."""
