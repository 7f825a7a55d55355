"""Converted models with every op forced to the Triton kernels (the interpreter on CPU) behave as on the torch
path: same logits for a left-padded batch, and cached decoding still equals the full forward. Liger's prefill runs
its Triton op (the GLA and window kernels) and its one-token steps the fused decode kernel; STILL's prefill runs its
fused attention kernel."""

import pytest
import torch

from tests.models.test_modeling import decode_incrementally
from tests.tiny import METHODS, converted_model

pytestmark = pytest.mark.triton
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # on CPU the interpreter runs the kernels


@pytest.mark.parametrize("method", METHODS)
def test_model_on_triton_kernels_matches_torch_path(method, monkeypatch):
    import linearize.kernels.liger.attention_triton as liger_prefill
    import linearize.kernels.liger.triton as fused
    import linearize.kernels.still.attention_triton as still_prefill

    decode_kernel_calls, prefill_kernel_calls, still_kernel_calls = [], [], []
    kernel = fused.triton_liger_decode
    monkeypatch.setattr(
        fused, "triton_liger_decode", lambda *a, **kw: decode_kernel_calls.append(1) or kernel(*a, **kw)
    )
    prefill = liger_prefill.triton_liger_attention
    monkeypatch.setattr(
        liger_prefill, "triton_liger_attention", lambda *a, **kw: prefill_kernel_calls.append(1) or prefill(*a, **kw)
    )
    still = still_prefill.still_fwd
    monkeypatch.setattr(still_prefill, "still_fwd", lambda *a, **kw: still_kernel_calls.append(1) or still(*a, **kw))
    model = converted_model("qwen3", method).to(DEVICE)
    ids = torch.randint(3, 128, (2, 24), device=DEVICE)
    # row 1 left-padded: the torch path gives each row what it gives the row alone (tests/models/test_modeling.py)
    mask = torch.ones_like(ids)
    mask[1, :7] = ids[1, :7] = 0
    real = mask.bool()
    with torch.no_grad():
        expected = model(ids, attention_mask=mask, use_cache=False).logits
        monkeypatch.setenv("LINEARIZE_BACKEND", "triton")
        full = model(ids, attention_mask=mask, use_cache=False).logits
        incremental, _ = decode_incrementally(model, ids, mask, chunks=(13, 5))
    torch.testing.assert_close(full[real], expected[real], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(incremental[real], full[real], rtol=1e-4, atol=1e-4)
    # Liger's one-token steps go through the fused decode kernel: 6 steps in each of the 2 layers; its prefills
    # (the full forward and the chunks of 13 and 5 tokens) through its Triton op
    assert len(decode_kernel_calls) == (12 if method == "liger" else 0)  # with sinks, two unfused ops
    assert len(prefill_kernel_calls) == (6 if method == "liger" else 0)
    # STILL's prefills (the full forward and the chunk of 13 tokens; later tokens decode in the layer) in 2 layers
    assert len(still_kernel_calls) == (4 if method == "still" else 0)


def test_layer_option_selects_the_backend(monkeypatch):
    import linearize.kernels.window.triton as window_kernels

    calls = []
    kernel = window_kernels.triton_sliding_window_attention
    monkeypatch.setattr(
        window_kernels, "triton_sliding_window_attention", lambda *a, **kw: calls.append(1) or kernel(*a, **kw)
    )
    monkeypatch.delenv("LINEARIZE_BACKEND", raising=False)
    model = converted_model("llama", "swa").to(DEVICE)
    ids = torch.randint(3, 128, (1, 20), device=DEVICE)
    with torch.no_grad():
        outputs = {}
        for backend in ("torch", "triton"):
            for layer in model.model.layers:
                layer.self_attn.backend = backend  # the layer's runtime option
            outputs[backend] = model(ids, use_cache=False).logits
    expected, actual = outputs["torch"], outputs["triton"]
    torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-4)
    assert len(calls) == model.config.num_hidden_layers
