"""Where Triton kernels can run in this test process.

tests/conftest.py turns on Triton's interpreter (TRITON_INTERPRET=1, before triton is imported) only without CUDA:
the interpreter runs kernels on CPU tensors, while compiled kernels need CUDA tensors.
"""

import os

import pytest
import torch

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
CUDA = torch.cuda.is_available()
# the device of a Triton kernel's tensors here; None without CUDA and without the interpreter
TRITON_DEVICE = "cpu" if INTERPRET else "cuda" if CUDA else None
needs_triton_device = pytest.mark.skipif(
    TRITON_DEVICE is None, reason="Triton kernels need CUDA tensors, or CPU tensors under TRITON_INTERPRET=1"
)
