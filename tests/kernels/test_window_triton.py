"""Triton sliding-window attention (`linearize.kernels.window.triton`) against the naive oracle, forward and backward.

On CPU the kernels run under Triton's interpreter (slow), so shapes stay tiny; T is a multiple of the 64-query
block only through T = 1. On CUDA the same cases also run with bf16 and fp16 inputs at a looser ratio; on CPU a few
of them.
"""

import functools

import linearize.kernels.window.triton as window_triton
import pytest
import torch
import triton
from linearize.kernels.window import naive_sliding_window_attention
from linearize.kernels.window.triton import triton_sliding_window_attention

from tests.kernels._close import assert_close
from tests.kernels._devices import CUDA, INTERPRET

pytestmark = pytest.mark.triton

# (B, T, S, H, Hkv, D, window)
SHAPES = {
    "T1-S1-w4": (2, 1, 1, 4, 2, 16, 4),
    "T1-S50-w16-decode": (1, 1, 50, 4, 2, 16, 16),
    "T37-w16-H4-Hkv2": (2, 37, 37, 4, 2, 16, 16),
    "T70-S100-w20-H2-Hkv2-D64": (1, 70, 100, 2, 2, 64, 20),
    "T40-w1-H2-Hkv1": (1, 40, 40, 2, 1, 16, 1),
    "T40-S50-w200-H2-Hkv1-D64": (1, 40, 50, 2, 1, 64, 200),
    "T5-S9-w4-H2-Hkv1-D128": (1, 5, 9, 2, 1, 128, 4),
}
E = 3  # sink keys
# (device, dtype, ratio of assert_close)
CONFIGS = {"cpu-fp32": ("cpu", torch.float32, 1e-4)} if INTERPRET else {}
if CUDA:
    CONFIGS |= {
        "cuda-fp32": ("cuda", torch.float32, 1e-4),
        "cuda-bf16": ("cuda", torch.bfloat16, 2e-2),
        "cuda-fp16": ("cuda", torch.float16, 2e-2),
    }
# half precision under the interpreter too, on a few cases (the interpreter is slow); CUDA runs every case
CPU_HALF = [
    pytest.param(dtype, shape_id, id=f"cpu-{name}-{shape_id}")
    for dtype, name, shape_id in [
        (torch.bfloat16, "bf16", "T37-w16-H4-Hkv2"),
        (torch.bfloat16, "bf16", "T70-S100-w20-H2-Hkv2-D64"),
        (torch.float16, "fp16", "T70-S100-w20-H2-Hkv2-D64"),
    ]
    if INTERPRET and not CUDA
]


@functools.cache
def _inputs(shape_id: str, left_pad: bool, sinks: bool, dtype: torch.dtype = torch.float32) -> dict:
    """CPU inputs, the float ones rounded to `dtype`."""
    B, T, S, H, Hkv, D, window = SHAPES[shape_id]
    torch.manual_seed(0)
    inputs = {
        "q": torch.randn(B, T, H, D).to(dtype),
        "k": torch.randn(B, S, Hkv, D).to(dtype),
        "v": torch.randn(B, S, Hkv, D).to(dtype),
        "window": window,
    }
    if left_pad:
        # batch row b starts with b * S // 3 padding keys
        inputs["key_valid"] = torch.arange(S) >= (torch.arange(B)[:, None] * S // 3)
    if sinks:
        inputs["sink_k"] = torch.randn(B, E, Hkv, D).to(dtype)
        inputs["sink_v"] = torch.randn(B, E, Hkv, D).to(dtype)
        inputs["sink_mask"] = torch.rand(B, T, E) < 0.5
    return inputs


def _run(fn, inputs: dict, device: str = "cpu", seed: int = 1) -> dict[str, torch.Tensor]:
    """Output and the gradient of (o * do).sum() for every float input, do random (fp32)."""
    # fresh leaves: the cached inputs must not collect gradients shared between runs
    leaves = {
        name: x.detach().to(device, copy=True).requires_grad_() if x.is_floating_point() else x.to(device)
        for name, x in inputs.items()
        if torch.is_tensor(x)
    }
    o = fn(**leaves, **{name: x for name, x in inputs.items() if not torch.is_tensor(x)})
    do = torch.randn(o.shape, generator=torch.Generator().manual_seed(seed))
    (o.float() * do.to(device)).sum().backward()
    return {"o": o} | {f"d{name}": x.grad for name, x in leaves.items() if x.requires_grad}


def _fp32(inputs: dict) -> dict:
    return {name: x.float() if torch.is_tensor(x) and x.is_floating_point() else x for name, x in inputs.items()}


@functools.cache
def _reference(shape_id: str, left_pad: bool, sinks: bool, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    # the oracle in fp32 on the same (rounded) inputs
    return _run(naive_sliding_window_attention, _fp32(_inputs(shape_id, left_pad, sinks, dtype)))


def _check(ref: dict, out: dict, dtype: torch.dtype, ratio: float) -> None:
    assert out.keys() == ref.keys()
    for name in ref:
        assert out[name].dtype == dtype, name
        assert_close(name, ref[name], out[name].float().cpu(), ratio=ratio)


@pytest.mark.parametrize("sinks", [False, True], ids=["no-sinks", "sinks"])
@pytest.mark.parametrize("left_pad", [False, True], ids=["all-valid", "left-pad"])
@pytest.mark.parametrize("shape_id", SHAPES)
@pytest.mark.parametrize("config", CONFIGS)
def test_matches_reference(config, shape_id, left_pad, sinks):
    device, dtype, ratio = CONFIGS[config]
    ref = _reference(shape_id, left_pad, sinks, dtype)
    out = _run(triton_sliding_window_attention, _inputs(shape_id, left_pad, sinks, dtype), device)
    _check(ref, out, dtype, ratio)


@pytest.mark.parametrize("dtype,shape_id", CPU_HALF)
def test_half_precision_on_cpu(dtype, shape_id):
    out = _run(triton_sliding_window_attention, _inputs(shape_id, True, True, dtype))
    _check(_reference(shape_id, True, True, dtype), out, dtype, 2e-2)


# fp32, and bf16 on the interpreter too (CUDA runs it in its bf16 config)
BIASED_CONFIGS = CONFIGS | ({"cpu-bf16": ("cpu", torch.bfloat16, 2e-2)} if INTERPRET and not CUDA else {})


@pytest.mark.parametrize("config", BIASED_CONFIGS)
def test_keys_with_a_large_shared_component(config):
    """Keys and sink keys sharing a large component, as a k_proj bias makes them (|k| in the hundreds in some
    channels of Qwen2.5), with padding: the output and every gradient within the config's bound. The dq pass rounds
    the score gradients to the model dtype before dq = ds k sums them, and they sum to zero per query, so that sum
    cancels the shared component: before the wrapper centred the keys, bf16 dq was 0.5 off."""
    device, dtype, ratio = BIASED_CONFIGS[config]
    x = dict(_inputs("T70-S100-w20-H2-Hkv2-D64", True, True, dtype))
    bias = torch.zeros(x["k"].shape[-1])
    bias[:4] = torch.tensor([200.0, -200.0, 300.0, -150.0])
    x |= {name: (x[name].float() + bias).to(dtype) for name in ("k", "sink_k")}
    out = _run(triton_sliding_window_attention, x, device)
    _check(_run(naive_sliding_window_attention, _fp32(x)), out, dtype, ratio)


@pytest.mark.parametrize("config", CONFIGS)
def test_small_blocks(config, monkeypatch):
    """16-query and 16-key blocks: many blocks per window, windows starting mid-block, keys no query reaches."""
    small = [triton.Config({"BM": 16, "BN": 16}, num_warps=1)]
    for kernel in (window_triton.window_attn_fwd_kernel, window_triton.window_attn_bwd_dkdv_kernel):
        monkeypatch.setattr(kernel, "configs", small)
    monkeypatch.setattr(window_triton.window_attn_bwd_dq_kernel, "configs", [triton.Config({"BN": 16}, num_warps=1)])
    monkeypatch.setattr(window_triton, "DQ_BLOCK_M", 16)
    device, dtype, ratio = CONFIGS[config]
    for case in [("T70-S100-w20-H2-Hkv2-D64", True, True), ("T37-w16-H4-Hkv2", True, False)]:
        out = _run(triton_sliding_window_attention, _inputs(*case, dtype), device)
        _check(_reference(*case, dtype), out, dtype, ratio)


@pytest.mark.parametrize("config", CONFIGS)
def test_query_without_keys_is_zero(config):
    """Batch row 1 has no valid key, and its first 10 queries see no sink either: zeros, no NaN, exact gradients."""
    device, dtype, ratio = CONFIGS[config]
    x = dict(_inputs("T37-w16-H4-Hkv2", True, True, dtype))
    x["key_valid"] = x["key_valid"].clone()
    x["key_valid"][1] = False
    x["sink_mask"] = x["sink_mask"].clone()
    x["sink_mask"][1, :10] = False
    out = _run(triton_sliding_window_attention, x, device)
    assert (out["o"][1, :10] == 0).all()
    assert (out["dq"][1, :10] == 0).all()
    for name, grad in out.items():
        assert not grad.isnan().any(), name
    _check(_run(naive_sliding_window_attention, _fp32(x)), out, dtype, ratio)


@pytest.mark.parametrize("config", CONFIGS)
def test_hidden_keys_may_hold_nan(config):
    """NaN in padded keys and values and in a slot inside every window (a ring slot not yet written), with sinks:
    the output and every gradient equal the oracle's on the same inputs, zero gradients at those slots included."""
    device, dtype, ratio = CONFIGS[config]
    x = dict(_inputs("T37-w16-H4-Hkv2", True, True, dtype))
    x["key_valid"] = x["key_valid"].clone()
    x["key_valid"][:, -3] = False
    hidden = ~x["key_valid"][..., None, None]
    x |= {name: x[name].masked_fill(hidden, float("nan")) for name in ("k", "v")}
    out = _run(triton_sliding_window_attention, x, device)
    _check(_run(naive_sliding_window_attention, _fp32(x)), out, dtype, ratio)


@pytest.mark.parametrize("config", CONFIGS)
def test_sinks_without_mask_and_scale(config):
    """sink_mask None means every query sees every sink key; a custom scale."""
    device, dtype, ratio = CONFIGS[config]
    x = dict(_inputs("T37-w16-H4-Hkv2", False, True, dtype))
    del x["sink_mask"]
    x["scale"] = 0.3
    out = _run(triton_sliding_window_attention, x, device)
    _check(_run(naive_sliding_window_attention, _fp32(x)), out, dtype, ratio)


@pytest.mark.parametrize("config", CONFIGS)
def test_history_equals_last_rows(config):
    """Queries over the last T of S tokens, with the first S - T cached, match the full computation."""
    device, dtype, ratio = CONFIGS[config]
    x = _inputs("T70-S100-w20-H2-Hkv2-D64", True, True, dtype)
    x = {name: t.to(device) if torch.is_tensor(t) else t for name, t in x.items()}
    with torch.no_grad():
        full = triton_sliding_window_attention(**x)
        last = triton_sliding_window_attention(**x | {"q": x["q"][:, -30:], "sink_mask": x["sink_mask"][:, -30:]})
    assert_close("o", full[:, -30:].float(), last.float(), ratio=ratio)


def test_rejects_bad_shapes():
    x = dict(_inputs("T37-w16-H4-Hkv2", False, False))
    with pytest.raises(ValueError, match="H % Hkv"):
        triton_sliding_window_attention(**x | {"k": torch.randn(2, 37, 3, 16), "v": torch.randn(2, 37, 3, 16)})
    with pytest.raises(ValueError, match="window"):
        triton_sliding_window_attention(**x | {"window": 0})
    with pytest.raises(ValueError, match="sink"):
        triton_sliding_window_attention(**x | {"sink_k": torch.randn(2, 3, 2, 16)})
