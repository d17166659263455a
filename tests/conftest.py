"""Test-session setup that must happen before anything imports triton.

Without a GPU, our Triton kernels run under Triton's interpreter (TRITON_INTERPRET=1), which
reads the variable when triton is first imported.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
