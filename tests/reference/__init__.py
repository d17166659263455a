"""Independent plain-PyTorch references the plugin is checked against (no vLLM, no plugin code)."""
