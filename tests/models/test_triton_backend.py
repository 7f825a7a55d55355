"""Converted models with every op forced to the Triton kernels (the interpreter on CPU) behave as on the torch
path: same logits for a left-padded batch, and cached decoding still equals the full forward. Liger's prefill runs
its Triton op (the GLA and window kernels) and its one-token steps the fused decode kernel; STILL's prefill runs its
fused attention kernel."""

import importlib

import pytest
import torch

from tests.models.test_modeling import decode_incrementally
from tests.tiny import METHODS, converted_model

pytestmark = pytest.mark.triton
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # on CPU the interpreter runs the kernels


# The Triton kernels each method's model calls in the test below, in its 2 layers: prefills are the full forward and
# the chunks of 13 and 5 tokens, then 6 one-token steps. Liger's prefills run its Triton op (the GLA and window
# kernels inside, not counted) and its steps the fused decode kernel (with sinks, two ops at every call: window, GLA);
# STILL's prefills run its fused attention kernel (the chunk of 5 and later tokens decode in the layer); Parallax's
# steps run its decode kernel.
KERNELS = {
    "gla.triton": "triton_chunk_gla",
    "window.triton": "triton_sliding_window_attention",
    "liger.attention_triton": "triton_liger_attention",
    "liger.triton": "triton_liger_decode",
    "still.attention_triton": "still_fwd",
    "parallax.triton": "triton_parallax_attention",
    "parallax.decode_triton": "triton_parallax_decode",
}
KERNEL_CALLS = {
    "liger": {"triton_liger_attention": 6, "triton_liger_decode": 12},
    "liger-sinks": {"triton_sliding_window_attention": 18, "triton_chunk_gla": 18},
    "liger-gla": {"triton_chunk_gla": 18},
    "still": {"still_fwd": 4},
    "swa": {"triton_sliding_window_attention": 18},
    "parallax": {"triton_parallax_attention": 6, "triton_parallax_decode": 12},
    "parallax-window": {"triton_parallax_attention": 6, "triton_parallax_decode": 12},
}


def counting(calls: dict, name: str, kernel):
    """`kernel`, counting its calls in `calls[name]`."""

    def counted(*args, **kwargs):
        calls[name] = calls.get(name, 0) + 1
        return kernel(*args, **kwargs)

    return counted


@pytest.mark.parametrize("method", METHODS)
def test_model_on_triton_kernels_matches_torch_path(method, monkeypatch):
    calls = {}
    # every module imported before any is patched: Liger's op binds the GLA and window kernels it calls on import
    modules = {name: importlib.import_module(f"linearize.kernels.{module}") for module, name in KERNELS.items()}
    for name, module in modules.items():
        monkeypatch.setattr(module, name, counting(calls, name, getattr(module, name)))
    model = converted_model("qwen3", method).to(DEVICE)
    ids = torch.randint(3, 128, (2, 24), device=DEVICE)
    # row 1 left-padded: the torch path gives each row what it gives the row alone (tests/models/test_modeling.py)
    mask = torch.ones_like(ids)
    mask[1, :7] = ids[1, :7] = 0
    real = mask.bool()
    with torch.no_grad():
        monkeypatch.setenv("LINEARIZE_BACKEND", "torch")  # CUDA tensors would run Triton by default
        expected = model(ids, attention_mask=mask, use_cache=False).logits
        assert calls == {}
        monkeypatch.setenv("LINEARIZE_BACKEND", "triton")
        full = model(ids, attention_mask=mask, use_cache=False).logits
        incremental, _ = decode_incrementally(model, ids, mask, chunks=(13, 5))
    torch.testing.assert_close(full[real], expected[real], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(incremental[real], full[real], rtol=1e-4, atol=1e-4)
    # every method's model ran on Triton: a layer that ignored the backend would pass the comparisons above
    assert calls == KERNEL_CALLS[method]


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
