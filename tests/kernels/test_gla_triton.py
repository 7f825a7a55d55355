"""Triton chunked GLA (`linearize.kernels.gla.triton`) against the token-by-token oracle, forward and backward.

On CPU the kernels run under Triton's interpreter (slow), so shapes stay tiny; T is never a multiple of the 64-token
chunk or its 16-token sub-blocks except through T = 1. On CUDA the same cases also run with bf16 and fp16 inputs at a
looser ratio; on CPU two shapes do, under the interpreter, so the half-precision operands of the matmuls are
checked without a GPU.
"""

import functools

import pytest
import torch
import torch.nn.functional as F
from linearize.kernels.gla import naive_recurrent_gla
from linearize.kernels.gla.triton import triton_chunk_gla

from tests.kernels._close import assert_close
from tests.kernels._devices import CUDA, INTERPRET, TRITON_DEVICE, needs_triton_device

pytestmark = pytest.mark.triton

# (B, T, H, Hkv, K, V)
SHAPES = {
    "T1-H4-Hkv2-D32": (2, 1, 4, 2, 32, 32),
    "T19-H4-Hkv2-D32": (2, 19, 4, 2, 32, 32),
    "T37-H2-Hkv2-K16-V32": (1, 37, 2, 2, 16, 32),
    # V = 80 spans two V blocks of 64, the second partly masked: dq, dk, dg are summed over blocks
    "T19-H2-Hkv1-K24-V80": (1, 19, 2, 1, 24, 80),
    "T37-H4-Hkv2-D64": (1, 37, 4, 2, 64, 64),
    # past one 64-token chunk: the state carried between chunks and its gradient, then a short last chunk
    "T70-H2-Hkv1-D16": (1, 70, 2, 1, 16, 16),
    "T5-H2-Hkv1-D128": (1, 5, 2, 1, 128, 128),
    # head dim 128 over three 16-token sub-blocks: the earlier sub-blocks' keys reached in two K tiles of 64
    "T37-H2-Hkv1-D128": (1, 37, 2, 1, 128, 128),
}
# (device, dtype, ratio of assert_close)
CONFIGS = {"cpu-fp32": ("cpu", torch.float32, 1e-4)} if INTERPRET else {}
if CUDA:
    CONFIGS |= {
        # dg, a reverse cumulative sum, adds up in another fp32 order than the reference: 1.02e-4 measured on an H200
        "cuda-fp32": ("cuda", torch.float32, 3e-4),
        "cuda-bf16": ("cuda", torch.bfloat16, 2e-2),
        "cuda-fp16": ("cuda", torch.float16, 2e-2),
    }


def _gates(shape: tuple[int, ...], kind: str) -> torch.Tensor:
    if kind == "logsigmoid":
        return F.logsigmoid(torch.randn(shape) * 8) / 16
    # about -8 per step: exp(-b) over a 16-token chunk would be exp(128), far beyond fp32
    return -8 + 0.1 * torch.randn(shape)


@functools.cache
def _inputs(shape_id: str, gate: str, with_state: bool, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """CPU inputs, q, k, v, g rounded to `dtype` (the initial state stays fp32)."""
    B, T, H, Hkv, K, V = SHAPES[shape_id]
    torch.manual_seed(0)
    inputs = {
        "q": torch.randn(B, T, H, K).to(dtype),
        "k": torch.randn(B, T, Hkv, K).to(dtype),
        "v": torch.randn(B, T, Hkv, V).to(dtype),
        "g": _gates((B, T, Hkv, K), gate).to(dtype),
    }
    if with_state:
        inputs["initial_state"] = torch.randn(B, Hkv, K, V)
    return inputs


def _run(fn, inputs: dict[str, torch.Tensor], device: str, seed: int = 1) -> dict[str, torch.Tensor]:
    """Outputs and the gradient of (o * do).sum() + (ht * dht).sum() for every input, do and dht random (fp32)."""
    # fresh leaves: the cached inputs must not collect gradients shared between runs
    leaves = {name: x.detach().to(device, copy=True).requires_grad_() for name, x in inputs.items()}
    o, ht = fn(**leaves, scale=leaves["q"].shape[-1] ** -0.5, output_final_state=True)
    gen = torch.Generator().manual_seed(seed)
    do, dht = torch.randn(o.shape, generator=gen), torch.randn(ht.shape, generator=gen)
    ((o.float() * do.to(device)).sum() + (ht * dht.to(device)).sum()).backward()
    return {"o": o, "ht": ht} | {f"d{name}": x.grad for name, x in leaves.items()}


@functools.cache
def _reference(shape_id: str, gate: str, with_state: bool, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    # the oracle in fp32 on the same (rounded) inputs
    x = {name: t.float() for name, t in _inputs(shape_id, gate, with_state, dtype).items()}
    return _run(naive_recurrent_gla, x, "cpu")


@pytest.mark.parametrize("with_state", [False, True], ids=["h0-none", "h0"])
@pytest.mark.parametrize("gate", ["logsigmoid", "decay-8"])
@pytest.mark.parametrize("shape_id", SHAPES)
@pytest.mark.parametrize("config", CONFIGS)
def test_matches_reference(config, shape_id, gate, with_state):
    device, dtype, ratio = CONFIGS[config]
    ref = _reference(shape_id, gate, with_state, dtype)
    out = _run(triton_chunk_gla, _inputs(shape_id, gate, with_state, dtype), device)
    assert out.keys() == ref.keys()
    assert out["o"].dtype == dtype and out["ht"].dtype == torch.float32
    for name in ref:
        assert out[name].dtype == (torch.float32 if name in ("ht", "dinitial_state") else dtype), name
        assert_close(name, ref[name], out[name].float().cpu(), ratio=ratio)


@pytest.mark.skipif(not INTERPRET, reason="needs the interpreter; on a GPU the cuda-bf16/fp16 configs cover this")
@pytest.mark.parametrize("gate", ["logsigmoid", "decay-8"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("shape_id", ["T37-H4-Hkv2-D64", "T19-H2-Hkv1-K24-V80"])
def test_half_precision_on_the_interpreter(shape_id, dtype, gate):
    """Model-dtype operands, fp32 decays and states: within the bound the CUDA bf16 configs use."""
    ref = _reference(shape_id, gate, True, dtype)
    out = _run(triton_chunk_gla, _inputs(shape_id, gate, True, dtype), "cpu")
    for name in ref:
        assert out[name].dtype == (torch.float32 if name in ("ht", "dinitial_state") else dtype), name
        assert_close(name, ref[name], out[name].float(), ratio=2e-2)


@pytest.mark.parametrize("config", CONFIGS)
def test_no_final_state(config):
    """Without the final state: ht is None, and the backward runs without dht."""
    device, dtype, ratio = CONFIGS[config]
    x = _inputs("T19-H4-Hkv2-D32", "logsigmoid", True, dtype)
    leaves = {name: t.detach().to(device, copy=True).requires_grad_() for name, t in x.items()}
    o, ht = triton_chunk_gla(**leaves, scale=0.5)
    assert ht is None and o.shape == (2, 19, 4, 32)
    do = torch.randn(o.shape, generator=torch.Generator().manual_seed(2))
    (o.float() * do.to(device)).sum().backward()

    ref_leaves = {name: t.detach().float().clone().requires_grad_() for name, t in x.items()}
    ref_o, _ = naive_recurrent_gla(**ref_leaves, scale=0.5)
    (ref_o * do).sum().backward()
    assert_close("o", ref_o, o.float().cpu(), ratio=ratio)
    for name in x:
        assert_close(f"d{name}", ref_leaves[name].grad, leaves[name].grad.float().cpu(), ratio=ratio)


@pytest.mark.parametrize("config", CONFIGS)
def test_inference_and_split(config):
    """Without gradients (no states saved); two calls carrying the state equal one call."""
    device, dtype, ratio = CONFIGS[config]
    x = {name: t.to(device) for name, t in _inputs("T37-H2-Hkv2-K16-V32", "logsigmoid", True, dtype).items()}
    with torch.no_grad():
        o, ht = triton_chunk_gla(**x, output_final_state=True)
        first = {name: t[:, :21] for name, t in x.items() if name != "initial_state"}
        second = {name: t[:, 21:] for name, t in x.items() if name != "initial_state"}
        o1, h1 = triton_chunk_gla(**first, initial_state=x["initial_state"], output_final_state=True)
        o2, h2 = triton_chunk_gla(**second, initial_state=h1, output_final_state=True)
    ref_o, ref_ht = naive_recurrent_gla(**{name: t.float().cpu() for name, t in x.items()}, output_final_state=True)
    assert_close("o", ref_o, o.float().cpu(), ratio=ratio)
    assert_close("ht", ref_ht, ht.cpu(), ratio=ratio)
    assert_close("o split", o.float(), torch.cat([o1, o2], dim=1).float(), ratio=ratio)
    assert_close("ht split", ht, h2, ratio=ratio)


def test_rejects_bad_shapes():
    x = dict(_inputs("T19-H4-Hkv2-D32", "logsigmoid", False, torch.float32))
    x["k"] = torch.randn(2, 19, 3, 32)
    with pytest.raises(ValueError, match="H % Hkv"):
        triton_chunk_gla(**x)


@needs_triton_device
def test_dispatcher_runs_triton_when_asked(monkeypatch):
    from linearize.kernels import gated_linear_attention

    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 19, h, 16, device=TRITON_DEVICE) for h in (4, 2, 2))
    g = F.logsigmoid(torch.randn(1, 19, 2, 16, device=TRITON_DEVICE)) / 16
    ref_o, ref_state = naive_recurrent_gla(q, k, v, g, output_final_state=True)
    monkeypatch.setenv("LINEARIZE_BACKEND", "triton")
    o, state = gated_linear_attention(q, k, v, g, output_final_state=True)
    assert_close("o", ref_o, o)
    assert_close("state", ref_state, state)
