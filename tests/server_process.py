"""The server runner every test that starts `vllm serve` uses (through deploy/serve-cpu.sh or the
images' entrypoint): loadtests/serve.py's, so the benchmarks and the tests start and stop servers
the same way. A server that exits or is not ready in time fails the test with its log's tail."""
from loadtests.serve import free_port, server_env  # noqa: F401  (re-exported for the tests)
from loadtests.serve import running_process as running_server  # noqa: F401
