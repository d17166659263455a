"""The layers of Kimi Linear: KDA (linear attention), NoPE MLA, and the MoE / dense MLP."""
