"""Liger attention over a sequence (`linearize.kernels.liger.liger_attention`): the Triton composition (the GLA and
sliding-window Triton ops, then the mix) and the torch composition against the fp32 oracle, outputs, final state
and every gradient, the history keys' included.

On CPU the kernels run under Triton's interpreter (slow), so shapes stay tiny (T is never a multiple of the 64-token
GLA chunk); torch.empty is NaN-filled (tests/kernels/conftest.py), so a read of unwritten scratch fails. On CUDA
the same cases also run with bf16 and fp16 inputs at a looser ratio; on CPU a couple of them in bf16.
"""

import functools

import pytest
import torch
import torch.nn.functional as F
from linearize.kernels.liger import liger_attention, naive_liger_attention, torch_liger_attention
from linearize.kernels.liger.attention_triton import triton_liger_attention

from tests.kernels._close import BF16_RATIO, assert_close
from tests.kernels._devices import CUDA, INTERPRET, TRITON_DEVICE, needs_triton_device

# (B, T, H, Hkv, D, P history keys, window, left padding)
SHAPES = {
    "T37-H4-Hkv2-D16-w16": (2, 37, 4, 2, 16, 0, 16, False),
    "T70-H2-Hkv1-D32-w20": (1, 70, 2, 1, 32, 0, 20, False),
    # a window wider than the new tokens, reaching back into the history
    "T37-P40-H2-Hkv1-D32-w50-pad": (2, 37, 2, 1, 32, 40, 50, True),
    "T37-P9-H4-Hkv2-D16-w12-pad": (2, 37, 4, 2, 16, 9, 12, True),
    # Liger's window of 64 over more than one GLA chunk
    "T70-H4-Hkv2-D64-w64": (1, 70, 4, 2, 64, 0, 64, False),
    "T1-P5-H4-Hkv2-D16-w4-pad": (2, 1, 4, 2, 16, 5, 4, True),
    "T5-P4-H2-Hkv1-D128-w6-pad": (2, 5, 2, 1, 128, 4, 6, True),
}
SHAPES_DEFAULT = "T37-P9-H4-Hkv2-D16-w12-pad"
# (device, dtype, ratio of assert_close)
CONFIGS = {"cpu-fp32": ("cpu", torch.float32, 1e-4)} if INTERPRET else {}
if CUDA:
    CONFIGS |= {
        "cuda-fp32": ("cuda", torch.float32, 1e-4),
        "cuda-bf16": ("cuda", torch.bfloat16, 2e-2),
        "cuda-fp16": ("cuda", torch.float16, 2e-2),
    }
# half precision under the interpreter too, on a couple of shapes (the interpreter is slow); CUDA runs every shape
CPU_HALF = ["T37-P9-H4-Hkv2-D16-w12-pad", "T70-H4-Hkv2-D64-w64"] if INTERPRET and not CUDA else []
DIFFERENTIABLE = ("q_lin", "k_lin", "v", "g", "q_rot", "k_rot", "initial_state")


@functools.cache
def _inputs(shape_id: str, gate: str, dtype: torch.dtype) -> dict:
    """CPU inputs as the layer passes them: the activations rounded to `dtype`, the log decay and the initial state
    in fp32."""
    B, T, H, Hkv, D, P, window, pad = SHAPES[shape_id]
    torch.manual_seed(0)
    x = {
        "q_lin": torch.randn(B, T, H, D).softmax(-1),
        "k_lin": torch.randn(B, T, Hkv, D).softmax(-1),
        "v": torch.randn(B, T, Hkv, D),
        # Liger's gates, or about -8 per step (exp(-b) over a chunk would overflow fp32)
        "g": F.logsigmoid(torch.randn(B, T, Hkv, D) * 4) / 16
        if gate == "logsigmoid"
        else -8 + 0.1 * torch.randn(B, T, Hkv, D),
        "q_rot": torch.randn(B, T, H, D),
        "k_rot": torch.randn(B, T, Hkv, D),
    }
    if P:
        x |= {"past_k": torch.randn(B, P, Hkv, D), "past_v": torch.randn(B, P, Hkv, D)}
    x = {name: t if name == "g" else t.to(dtype) for name, t in x.items()}
    x |= {"initial_state": torch.randn(B, Hkv, D, D), "window": window}
    if pad:
        # batch row b starts with b * (P + T) // 3 padding keys
        x["key_valid"] = torch.arange(P + T) >= (torch.arange(B)[:, None] * (P + T) // 3)
    return x


def _run(fn, inputs: dict, device: str = "cpu", seed: int = 1) -> dict[str, torch.Tensor]:
    """Outputs and the gradient of (o * do).sum() + (ht * dht).sum() for every differentiable input, the history
    keys and values included (fp32 do, dht)."""
    # fresh leaves: the cached inputs must not collect gradients shared between runs
    x = {name: t.to(device, copy=True) if torch.is_tensor(t) else t for name, t in inputs.items()}
    differentiable = [name for name in (*DIFFERENTIABLE, "past_k", "past_v") if name in x]
    for name in differentiable:
        x[name].requires_grad_()
    o, ht = fn(**x, output_final_state=True)
    gen = torch.Generator().manual_seed(seed)
    do, dht = torch.randn(o.shape, generator=gen), torch.randn(ht.shape, generator=gen)
    ((o.float() * do.to(device)).sum() + (ht * dht.to(device)).sum()).backward()
    return {"o": o, "ht": ht} | {f"d{name}": x[name].grad for name in differentiable}


def _fp32(inputs: dict) -> dict:
    return {name: t.float() if torch.is_tensor(t) and t.is_floating_point() else t for name, t in inputs.items()}


@functools.cache
def _reference(shape_id: str, gate: str, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    # the oracle in fp32 on the same (rounded) inputs
    return _run(naive_liger_attention, _fp32(_inputs(shape_id, gate, dtype)))


def _check(ref: dict, out: dict, dtype: torch.dtype, ratio: float) -> None:
    assert out.keys() == ref.keys()
    for name in ref:
        assert out[name].dtype == (torch.float32 if name in ("ht", "dg", "dinitial_state") else dtype), name
        assert_close(name, ref[name], out[name].float().cpu(), ratio=ratio)


@pytest.mark.triton
@pytest.mark.parametrize("gate", ["logsigmoid", "decay-8"])
@pytest.mark.parametrize("shape_id", SHAPES)
@pytest.mark.parametrize("config", CONFIGS)
def test_triton_matches_reference(config, shape_id, gate):
    device, dtype, ratio = CONFIGS[config]
    out = _run(triton_liger_attention, _inputs(shape_id, gate, dtype), device)
    _check(_reference(shape_id, gate, dtype), out, dtype, ratio)


@pytest.mark.triton
@pytest.mark.parametrize("shape_id", CPU_HALF)
def test_triton_bf16_on_cpu(shape_id):
    out = _run(triton_liger_attention, _inputs(shape_id, "logsigmoid", torch.bfloat16))
    _check(_reference(shape_id, "logsigmoid", torch.bfloat16), out, torch.bfloat16, 2e-2)


# fp32, and bf16 on the interpreter too (CUDA runs it in its bf16 config)
BIASED_CONFIGS = CONFIGS | ({"cpu-bf16": ("cpu", torch.bfloat16, 2e-2)} if INTERPRET and not CUDA else {})


@pytest.mark.triton
@pytest.mark.parametrize("config", BIASED_CONFIGS)
def test_triton_keys_with_a_large_shared_component(config):
    """Window keys (history included) sharing a large component, as a k_proj bias makes them (|k| in the hundreds in
    some channels of Qwen2.5): outputs and every gradient within the config's bound. The window op's dq pass rounds
    the score gradients, which sum to zero per query, before dq = ds k: bf16 dq_rot was 0.5 off before the window
    op's wrapper centred the keys."""
    device, dtype, ratio = BIASED_CONFIGS[config]
    x = dict(_inputs(SHAPES_DEFAULT, "logsigmoid", dtype))
    bias = torch.zeros(x["k_rot"].shape[-1])
    bias[:4] = torch.tensor([200.0, -200.0, 300.0, -150.0])
    x |= {name: (x[name].float() + bias).to(dtype) for name in ("k_rot", "past_k")}
    out = _run(triton_liger_attention, x, device)
    _check(_run(naive_liger_attention, _fp32(x)), out, dtype, ratio)


@pytest.mark.parametrize("gate", ["logsigmoid", "decay-8"])
@pytest.mark.parametrize("shape_id", SHAPES)
def test_torch_matches_reference(shape_id, gate):
    out = _run(torch_liger_attention, _inputs(shape_id, gate, torch.float32))
    _check(_reference(shape_id, gate, torch.float32), out, torch.float32, 1e-4)


@pytest.mark.parametrize("shape_id", ["T37-P9-H4-Hkv2-D16-w12-pad", "T70-H4-Hkv2-D64-w64"])
def test_torch_bf16(shape_id):
    """bf16 activations (the log decay and the state fp32): outputs and every gradient within `BF16_RATIO` of the
    oracle on the same inputs in fp32."""
    ref = _reference(shape_id, "logsigmoid", torch.bfloat16)
    out = _run(torch_liger_attention, _inputs(shape_id, "logsigmoid", torch.bfloat16))
    _check(ref, out, torch.bfloat16, BF16_RATIO)


def test_torch_fp16_mixes_the_linear_branch_before_rounding():
    """The linear branch has no normaliser: without decay its output sums the values of every earlier token, and in
    float16 it can pass 65504 where the mix (0.1 of it here) does not. The torch path mixes it in fp32 unrounded,
    as the oracle and the decode step do, rather than overflowing it to inf in the model dtype first."""
    B, T, H, D = 1, 32, 2, 16
    one_hot = torch.zeros(B, T, H, D, dtype=torch.float16)
    one_hot[..., 0] = 1  # q_lin . k_lin = 1: each token reads every earlier value in full
    x = {
        "q_lin": one_hot,
        "k_lin": one_hot[:, :, :1],
        "v": torch.full((B, T, 1, D), 4096.0, dtype=torch.float16),
        "g": torch.zeros(B, T, 1, D),  # no decay
        "q_rot": torch.randn(B, T, H, D).half(),
        "k_rot": torch.randn(B, T, 1, D).half(),
    }
    ref, _ = naive_liger_attention(**x, window=8, mix=0.9)  # linear 131072 at the last token, the mix 16793.6
    out, _ = torch_liger_attention(**x, window=8, mix=0.9)
    assert torch.isfinite(ref).all()
    torch.testing.assert_close(out, ref, rtol=1e-3, atol=0.0)


@pytest.mark.triton
@pytest.mark.parametrize("config", CONFIGS)
def test_triton_without_grad_or_final_state(config):
    """Inference (nothing saved for the backward), no final state, default scale and mix; 0.3 / custom scale."""
    device, dtype, ratio = CONFIGS[config]
    x = {
        name: t.to(device) if torch.is_tensor(t) else t
        for name, t in _inputs(SHAPES_DEFAULT, "logsigmoid", dtype).items()
    }
    ref_x = _fp32({name: t.cpu() if torch.is_tensor(t) else t for name, t in x.items()})
    for kwargs in ({}, {"mix": 0.3, "scale": 0.2}):
        with torch.no_grad():
            o, ht = triton_liger_attention(**x, **kwargs)
        assert ht is None
        assert_close("o", naive_liger_attention(**ref_x, **kwargs)[0], o.float().cpu(), ratio=ratio)


@pytest.mark.triton
@pytest.mark.parametrize("backend", ["reference", "torch", pytest.param("triton", marks=needs_triton_device)])
def test_dispatcher(backend, monkeypatch):
    x = _inputs(SHAPES_DEFAULT, "logsigmoid", torch.float32)
    ref_o, ref_ht = naive_liger_attention(**x, output_final_state=True)
    device = TRITON_DEVICE if backend == "triton" else "cpu"
    on_device = {name: t.to(device) if torch.is_tensor(t) else t for name, t in x.items()}
    monkeypatch.setenv("LINEARIZE_BACKEND", backend)
    o, ht = liger_attention(**on_device, output_final_state=True)
    assert_close("o", ref_o, o.cpu())
    assert_close("ht", ref_ht, ht.cpu())


def test_rejects_bad_shapes():
    x = dict(_inputs(SHAPES_DEFAULT, "logsigmoid", torch.float32))
    with pytest.raises(ValueError, match="H % Hkv"):
        liger_attention(**x | {"k_lin": torch.randn(2, 37, 3, 16)})
    with pytest.raises(ValueError, match="both or neither"):
        liger_attention(**x | {"past_v": None})
    with pytest.raises(ValueError, match="key_valid"):
        liger_attention(**x | {"key_valid": x["key_valid"][:, 1:]})
    with pytest.raises(ValueError, match="window"):
        liger_attention(**x | {"window": 0})


# Gemma 2's logit soft-capping of the window branch: with scale 1 the D = 16..32 scores reach well beyond the cap
SOFTCAP = {"softcap": 2.0, "scale": 1.0}


@pytest.mark.parametrize("shape_id", ["T37-P9-H4-Hkv2-D16-w12-pad", "T70-H2-Hkv1-D32-w20", "T1-P5-H4-Hkv2-D16-w4-pad"])
def test_torch_matches_reference_with_softcap(shape_id):
    """Capped window logits: output, final state and every gradient of the torch path equal the oracle's."""
    x = _inputs(shape_id, "logsigmoid", torch.float32)
    ref = _run(functools.partial(naive_liger_attention, **SOFTCAP), x)
    _check(ref, _run(functools.partial(torch_liger_attention, **SOFTCAP), x), torch.float32, 1e-4)
    uncapped, _ = naive_liger_attention(**x, scale=SOFTCAP["scale"])
    assert (uncapped - ref["o"]).abs().amax() > 0.05  # the cap matters


def test_softcap_dispatch(monkeypatch):
    monkeypatch.delenv("LINEARIZE_BACKEND", raising=False)
    x = _inputs(SHAPES_DEFAULT, "logsigmoid", torch.float32)
    ref_o, ref_ht = naive_liger_attention(**x, **SOFTCAP, output_final_state=True)
    for backend in ("reference", "torch", None):
        o, ht = liger_attention(**x, **SOFTCAP, output_final_state=True, backend=backend)
        assert_close("o", ref_o, o)
        assert_close("ht", ref_ht, ht)
    with pytest.raises(NotImplementedError, match="soft-capping .* use backend 'torch'"):
        liger_attention(**x, **SOFTCAP, backend="triton")
