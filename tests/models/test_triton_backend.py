"""The converted model with its gated-linear op forced to the Triton kernels (interpreter on CPU) behaves as
with the torch path: same logits, and cached decoding still equals the full forward."""

import pytest
import torch

from tests.models.test_modeling import decode_incrementally
from tests.tiny import cache_of, converted_model

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


def test_liger_decode_steps_on_the_fused_triton_kernel(monkeypatch):
    import linearize.kernels.liger.triton as fused

    calls = []
    kernel = fused.triton_liger_decode
    monkeypatch.setattr(fused, "triton_liger_decode", lambda *a, **kw: calls.append(1) or kernel(*a, **kw))
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = converted_model("llama", "liger").to(device)
    ids = torch.randint(3, 128, (2, 20), device=device)
    with torch.no_grad():
        full = model(ids, use_cache=False).logits
        prefill = model(ids[:, :12], use_cache=True)  # prefill on the torch path (the window op has no Triton yet)
        cache, logits = cache_of(prefill), [prefill.logits]
        monkeypatch.setenv("LINEARIZE_BACKEND", "triton")  # every decode step: the fused Triton decode kernel
        for t in range(12, 20):
            out = model(ids[:, t : t + 1], cache=cache, use_cache=True)
            cache, logits = cache_of(out), logits + [out.logits]
    torch.testing.assert_close(torch.cat(logits, 1), full, rtol=1e-4, atol=1e-4)
    assert len(calls) == 8 * model.config.num_hidden_layers
