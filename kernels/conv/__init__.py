"""Short causal convolution used by KDA's q/k/v paths."""
from .causal_conv1d import causal_conv1d, causal_conv1d_update

__all__ = ["causal_conv1d", "causal_conv1d_update"]
