"""Triton Parallax attention (`linearize.kernels.parallax.triton`) and decode step (`decode_triton`) against the
float64 oracles: output and the gradients of q, r, k, v and the history keys and values.

On CPU the kernels run under Triton's interpreter (slow), so shapes stay tiny and tiles small (16 or 32; T is never a
multiple of the query tile): every case in fp32, two shapes and the decode step also in half precision at the
looser ratio of the CUDA bf16 and fp16 configs, which run every case on a GPU. torch.empty is NaN-filled
(tests/kernels/conftest.py), so a read of unwritten scratch fails.
"""

import functools

import pytest
import torch
from linearize.kernels.parallax import (
    naive_parallax_attention,
    naive_parallax_decode,
    parallax_attention,
    parallax_decode,
)
from linearize.kernels.parallax.decode_triton import triton_parallax_decode
from linearize.kernels.parallax.triton import triton_parallax_attention

from tests.kernels._close import assert_close, head_major
from tests.kernels._devices import CUDA, INTERPRET, TRITON_DEVICE, needs_triton_device

pytestmark = pytest.mark.triton

# (B, T, H, Hkv, D, P history keys, window, block_m, block_n, padding)
SHAPES = {
    "T37-H4-Hkv2-D16-m16-n16": (2, 37, 4, 2, 16, 0, None, 16, 16, None),
    "T37-P9-H4-Hkv2-D16-w12-m32-n16-left": (2, 37, 4, 2, 16, 9, 12, 32, 16, "left"),
    "T29-P40-H2-Hkv1-D24-m16-n32-middle": (1, 29, 2, 1, 24, 40, None, 16, 32, "middle"),
    "T70-H2-Hkv1-D64-w20-m32-n32": (1, 70, 2, 1, 64, 0, 20, 32, 32, None),
    "T50-H4-Hkv1-D32-w40-m16-n16-middle": (1, 50, 4, 1, 32, 0, 40, 16, 16, "middle"),
    "T1-P20-H4-Hkv2-D16-w8-m16-n16-left": (2, 1, 4, 2, 16, 20, 8, 16, 16, "left"),
    "T5-P4-H2-Hkv1-D128-m16-n16": (1, 5, 2, 1, 128, 4, None, 16, 16, None),
}
# (device, dtype, ratio of assert_close)
CONFIGS = {"cpu-fp32": ("cpu", torch.float32, 1e-4)} if INTERPRET else {}
if CUDA:
    CONFIGS |= {
        "cuda-fp32": ("cuda", torch.float32, 1e-4),
        "cuda-bf16": ("cuda", torch.bfloat16, 2e-2),
        "cuda-fp16": ("cuda", torch.float16, 2e-2),
    }
# the decode step is cheap enough on the interpreter to run in half precision there too
DECODE_CONFIGS = CONFIGS | ({"cpu-bf16": ("cpu", torch.bfloat16, 2e-2)} if INTERPRET and not CUDA else {})
FLOAT_INPUTS = ("q", "r", "k", "v", "past_k", "past_v")


def _key_valid(B: int, S: int, padding: str | None) -> torch.Tensor | None:
    """`[B, S]`: "left" puts b * S // 3 invalid keys first in row b; "middle" drops a third at random (the first
    two always, so some queries see no key)."""
    if padding == "left":
        return torch.arange(S) >= torch.arange(B)[:, None] * S // 3
    if padding == "middle":
        valid = torch.rand(B, S, generator=torch.Generator().manual_seed(2)) > 1 / 3
        valid[:, :2] = False
        return valid
    return None


@functools.cache
def _inputs(shape_id: str, dtype: torch.dtype) -> dict:
    """CPU inputs rounded to `dtype`, then held in float64 (the oracle's precision)."""
    B, T, H, Hkv, D, P, window, _, _, padding = SHAPES[shape_id]
    gen = torch.Generator().manual_seed(0)

    def randn(*shape: int, std: float = 1.0) -> torch.Tensor:
        return (std * torch.randn(*shape, generator=gen)).to(dtype).double()

    x = {"q": randn(B, T, H, D), "r": randn(B, T, H, D, std=0.3), "k": randn(B, T, Hkv, D), "v": randn(B, T, Hkv, D)}
    if P:
        x |= {"past_k": randn(B, P, Hkv, D), "past_v": randn(B, P, Hkv, D)}
    return x | {"window": window, "key_valid": _key_valid(B, P + T, padding)}


def _run(fn, x: dict, device: str = "cpu", dtype: torch.dtype = torch.float64, **kwargs) -> dict[str, torch.Tensor]:
    """Output and the gradient of (o * do).sum() for every float input (fresh leaves on `device` in `dtype`)."""
    x = {name: t.to(device, dtype, copy=True).requires_grad_() if name in FLOAT_INPUTS else t for name, t in x.items()}
    if x["key_valid"] is not None:
        x["key_valid"] = x["key_valid"].to(device)
    o = fn(**x, **kwargs)
    do = torch.randn(o.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    (o.double() * do.to(device)).sum().backward()
    return {"o": o} | {f"d{name}": t.grad for name, t in x.items() if name in FLOAT_INPUTS}


def _fp32(x: dict) -> dict:
    return {name: t.float() if torch.is_tensor(t) and t.is_floating_point() else t for name, t in x.items()}


def _on_triton_device(x: dict) -> dict:
    return {name: t.to(TRITON_DEVICE) if torch.is_tensor(t) else t for name, t in _fp32(x).items()}


@functools.cache
def _reference(shape_id: str, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    return _run(naive_parallax_attention, _inputs(shape_id, dtype))


@pytest.mark.parametrize("shape_id", SHAPES)
@pytest.mark.parametrize("config", CONFIGS)
def test_triton_matches_reference(config, shape_id):
    device, dtype, ratio = CONFIGS[config]
    block_m, block_n = SHAPES[shape_id][7:9]
    ref = _reference(shape_id, dtype)
    out = _run(triton_parallax_attention, _inputs(shape_id, dtype), device, dtype, block_m=block_m, block_n=block_n)
    assert out.keys() == ref.keys()
    for name in ref:
        assert out[name].dtype == dtype, name
        assert_close(name, ref[name], out[name].cpu(), ratio=ratio)


@pytest.mark.parametrize("config", CONFIGS)
def test_padding_holding_nan_is_never_read(config):
    """NaN in the padding's keys and values (history and new tokens, left padding in row 1): the output and every
    gradient equal the oracle's on the same inputs, zero gradients at the padding included."""
    device, dtype, ratio = CONFIGS[config]
    shape_id = "T37-P9-H4-Hkv2-D16-w12-m32-n16-left"
    x = _inputs(shape_id, dtype)
    P, invalid = x["past_k"].shape[1], ~x["key_valid"][:, :, None, None]
    x |= {name: x[name].masked_fill(invalid[:, :P], float("nan")) for name in ("past_k", "past_v")}
    x |= {name: x[name].masked_fill(invalid[:, P:], float("nan")) for name in ("k", "v")}
    ref = _run(naive_parallax_attention, x)
    out = _run(triton_parallax_attention, x, device, dtype, block_m=32, block_n=16)
    for name in ref:
        assert_close(name, ref[name], out[name].cpu(), ratio=ratio)


@pytest.mark.skipif(not INTERPRET or CUDA, reason="needs the interpreter; the CUDA configs run half precision on a GPU")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize(
    ("shape_id", "tiles"),
    [("T29-P40-H2-Hkv1-D24-m16-n32-middle", "tuned"), ("T1-P20-H4-Hkv2-D16-w8-m16-n16-left", "fixed")],
)
def test_half_precision_on_the_interpreter(shape_id, tiles, dtype):
    """Model-dtype operands (probabilities and score gradients cast to it), fp32 accumulators: within the bound the
    CUDA bf16 configs use; with the shape's tiles, or the tuned configurations of half precision (the first of
    each list, which the interpreter's autotuner picks)."""
    block_m, block_n = SHAPES[shape_id][7:9] if tiles == "fixed" else (None, None)
    ref = _reference(shape_id, dtype)
    out = _run(triton_parallax_attention, _inputs(shape_id, dtype), "cpu", dtype, block_m=block_m, block_n=block_n)
    for name in ref:
        assert out[name].dtype == dtype, name
        assert_close(name, ref[name], out[name], ratio=2e-2)


# fp32 everywhere, and bf16 on the interpreter too (CUDA runs it in its bf16 config)
BIASED_CONFIGS = DECODE_CONFIGS


@pytest.mark.parametrize("config", BIASED_CONFIGS)
def test_keys_with_a_large_shared_component(config):
    """Keys sharing a large component, as a k_proj bias makes them (|k| in the hundreds in some channels of
    Qwen2.5), history and padding included: the output and every gradient within the config's bound. dq sums the
    score gradients (which sum to zero per query) times the keys, so rounding them leaves a residual times that
    component, and s = r . k is large: before the wrapper centred the keys, fp32 dq was 1.3e-3 off, bf16 o 0.3 and
    dq 30x its size."""
    device, dtype, ratio = BIASED_CONFIGS[config]
    shape_id = "T29-P40-H2-Hkv1-D24-m16-n32-middle"
    x = dict(_inputs(shape_id, dtype))
    bias = torch.zeros(x["k"].shape[-1], dtype=torch.float64)
    bias[:4] = torch.tensor([300.0, -300.0, 200.0, 200.0])
    x |= {name: (x[name] + bias).to(dtype).double() for name in ("k", "past_k")}
    block_m, block_n = SHAPES[shape_id][7:9]
    ref = _run(naive_parallax_attention, x)
    out = _run(triton_parallax_attention, x, device, dtype, block_m=block_m, block_n=block_n)
    for name in ref:
        assert_close(name, ref[name], out[name].cpu(), ratio=ratio)


@pytest.mark.parametrize("layout", ["token-major", "head-major"])
@pytest.mark.parametrize("split", [None, 16])
@pytest.mark.parametrize("window", [None, 7])
@pytest.mark.parametrize("config", DECODE_CONFIGS)
def test_decode_matches_reference(config, window, split, layout):
    """GQA, a window, invalid slots holding NaN (never loaded), a row that sees no key; two key blocks of 16, in
    one program or (split = 16) one part per program, merged by the combine kernel; the cache contiguous or a
    view of a head-major buffer with NaN room after each head (what Parallax's growing cache holds), read in place."""
    device, dtype, ratio = DECODE_CONFIGS[config]
    gen = torch.Generator().manual_seed(4)
    B, H, Hkv, D, L = 3, 4, 2, 16, 29
    q, r = torch.randn(B, H, D, generator=gen).to(dtype), (0.3 * torch.randn(B, H, D, generator=gen)).to(dtype)
    k_cache, v_cache = (torch.randn(B, L, Hkv, D, generator=gen).to(dtype) for _ in range(2))
    cache_valid = torch.rand(B, L, generator=gen) > 0.3
    cache_valid[2] = False  # a row whose every slot is invalid: zeros
    ref = naive_parallax_decode(q.double(), r.double(), k_cache.double(), v_cache.double(), cache_valid, window=window)
    k_cache, v_cache = (x.masked_fill(~cache_valid[:, :, None, None], float("nan")) for x in (k_cache, v_cache))
    if layout == "head-major":
        k_cache, v_cache = head_major(k_cache, room=5), head_major(v_cache, room=5)
    args = (x.to(device) for x in (q, r, k_cache, v_cache, cache_valid))
    o = triton_parallax_decode(*args, window=window, block_n=16, split=split)
    assert o.dtype == dtype
    assert_close("o", ref, o.cpu(), ratio=ratio)
    assert (o[2] == 0).all()


@pytest.mark.parametrize("config", DECODE_CONFIGS)
def test_decode_without_validity(config):
    """Every slot valid (no mask tensor), a head dim that is not a power of two, H = 3 heads on one key head, three
    parts of 16 keys (a part count that is not a power of two)."""
    device, dtype, ratio = DECODE_CONFIGS[config]
    gen = torch.Generator().manual_seed(5)
    q, r = (torch.randn(2, 3, 40, generator=gen).to(dtype) for _ in range(2))
    k_cache, v_cache = (torch.randn(2, 37, 1, 40, generator=gen).to(dtype) for _ in range(2))
    ref = naive_parallax_decode(*(x.double() for x in (q, r, k_cache, v_cache)))
    o = triton_parallax_decode(*(x.to(device) for x in (q, r, k_cache, v_cache)), block_n=16, split=16)
    assert_close("o", ref, o.cpu(), ratio=ratio)


@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.parametrize("config", CONFIGS)
def test_decode_at_model_head_dims(config, D):
    """The head dims of real models (one tile of the whole head): GQA, a window starting mid-block, invalid slots
    holding NaN, and parts of 16 keys merged by the combine kernel."""
    device, dtype, ratio = CONFIGS[config]
    gen = torch.Generator().manual_seed(6)
    B, H, Hkv, L = 2, 4, 2, 37
    q, r = torch.randn(B, H, D, generator=gen).to(dtype), (0.3 * torch.randn(B, H, D, generator=gen)).to(dtype)
    k_cache, v_cache = (torch.randn(B, L, Hkv, D, generator=gen).to(dtype) for _ in range(2))
    cache_valid = torch.rand(B, L, generator=gen) > 0.3
    ref = naive_parallax_decode(*(x.double() for x in (q, r, k_cache, v_cache)), cache_valid, window=30)
    k_cache, v_cache = (x.masked_fill(~cache_valid[:, :, None, None], float("nan")) for x in (k_cache, v_cache))
    args = (x.to(device) for x in (q, r, k_cache, v_cache, cache_valid))
    o = triton_parallax_decode(*args, window=30, block_n=16, split=16)
    assert o.dtype == dtype
    assert_close("o", ref, o.cpu(), ratio=ratio)


@needs_triton_device
def test_dispatchers(monkeypatch):
    """The "triton" backend without gradients (nothing saved for the backward) and a custom scale."""
    shape_id = "T37-P9-H4-Hkv2-D16-w12-m32-n16-left"
    x = _inputs(shape_id, torch.float32)
    monkeypatch.setenv("LINEARIZE_BACKEND", "triton")
    o = parallax_attention(**_on_triton_device(x), scale=0.2)
    assert_close("o", naive_parallax_attention(**x, scale=0.2), o.cpu())
    keys, values = torch.cat([x["past_k"], x["k"]], 1), torch.cat([x["past_v"], x["v"]], 1)
    args = {"q": x["q"][:, -1], "r": x["r"][:, -1], "k_cache": keys, "v_cache": values, "cache_valid": x["key_valid"]}
    o = parallax_decode(**_on_triton_device(args), window=12)
    assert_close("decode", naive_parallax_decode(**args, window=12), o.cpu())


def test_rejects_bad_inputs():
    x = _fp32(_inputs("T37-H4-Hkv2-D16-m16-n16", torch.float32))
    with pytest.raises(ValueError, match="Triton path takes"):
        triton_parallax_attention(**x | {"q": x["q"].double()})
    with pytest.raises(ValueError, match="block_m must be a power of two"):
        triton_parallax_attention(**x, block_m=24, block_n=16)
    with pytest.raises(ValueError, match="together"):
        triton_parallax_attention(**x, block_m=16)
    with pytest.raises(ValueError, match="split must be"):
        triton_parallax_decode(x["q"][:, 0], x["r"][:, 0], x["k"], x["v"], block_n=16, split=24)
