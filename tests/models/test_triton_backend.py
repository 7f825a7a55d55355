"""The converted model with its gated-linear op forced to the Triton kernels (interpreter on CPU) behaves as
with the torch path: same logits, and cached decoding still equals the full forward."""

import pytest
import torch

from tests.models.test_modeling import decode_incrementally
from tests.tiny import converted_model

pytestmark = pytest.mark.triton


def test_liger_gla_model_on_triton_kernels(monkeypatch):
    device = "cuda" if torch.cuda.is_available() else "cpu"  # on CPU the interpreter runs the kernels
    model = converted_model("qwen3", "liger-gla").to(device)
    ids = torch.randint(3, 128, (2, 24), device=device)
    with torch.no_grad():
        expected = model(ids, use_cache=False).logits
        monkeypatch.setenv("LINEARIZE_BACKEND", "triton")
        full = model(ids, use_cache=False).logits
        incremental, _ = decode_incrementally(model, ids, chunks=(13, 5))
    torch.testing.assert_close(full, expected, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(incremental, full, rtol=1e-4, atol=1e-4)
