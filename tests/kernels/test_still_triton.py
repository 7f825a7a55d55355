"""STILL ops on the Triton backend (`linearize.kernels.still`): the self-saliency kernel against the float64 oracle,
the top-k selection kernel against the torch.topk path (exact equality on tie-free scores), and the fused attention
against the float64 oracle, output and every gradient (q, k, v, q_feat, k_feat, gate).

On CPU the kernels run under Triton's interpreter (slow), so shapes stay tiny: T is never a multiple of the chunk,
most cases have GQA, and padded rows have key_valid False at the left of one row and in the middle of the other,
with NaN in every padded input, which must reach no output or gradient; some chunk always holds fewer valid tokens
than topk. torch.empty is NaN-filled (tests/kernels/conftest.py), so a read of unwritten scratch fails. Salient
masks are random (any count per chunk and head, padding included) and the salient keys are read in tiles of 16, so
a query chunk crosses tiles and unused slots. The kernels multiply in the inputs' dtype: bf16 runs on CPU too for
one shape of each op (the interpreter is slower still in bf16); on CUDA every case also runs with bf16 and fp16
inputs, at a looser ratio.
"""

import functools

import linearize.kernels.still as still_mod
import linearize.kernels.still.attention_triton as attention_triton
import linearize.kernels.still.saliency_triton as saliency_triton
import linearize.kernels.still.selection_triton as selection_triton
import pytest
import torch
from linearize.kernels.still import (
    naive_self_saliency,
    naive_still_attention,
    select_salient,
    self_saliency,
    still_attention,
    torch_select_salient,
)
from linearize.kernels.still.attention_triton import triton_still_attention
from linearize.kernels.still.saliency_triton import triton_self_saliency
from linearize.kernels.still.selection_triton import triton_select_salient

from tests.kernels._close import assert_close
from tests.kernels._devices import CUDA, INTERPRET, TRITON_DEVICE, needs_triton_device

pytestmark = pytest.mark.triton

# (B, T, H, Hkv, D, chunk_size, topk, padded)
SHAPES = {
    "T37-H4-Hkv2-D16-c16-pad": (2, 37, 4, 2, 16, 16, 4, True),
    "T34-H4-Hkv2-D32-c16": (1, 34, 4, 2, 32, 16, 4, False),  # the last chunk holds 2 < topk tokens
    "T70-H2-Hkv1-D32-c32-pad": (2, 70, 2, 1, 32, 32, 4, True),
    "T50-H4-Hkv2-D16-c8": (1, 50, 4, 2, 16, 8, 2, False),  # a chunk smaller than a tile, many salient tiles
    "T40-H2-Hkv2-D64-c16": (1, 40, 2, 2, 64, 16, 4, False),
    "T20-H2-Hkv1-D16-c16": (1, 20, 2, 1, 16, 16, 4, False),  # two chunks: no query reads a salient list
    "T20-H2-Hkv1-D128-c8": (1, 20, 2, 1, 128, 8, 2, False),
}
SHAPE_DEFAULT = "T37-H4-Hkv2-D16-c16-pad"
# (device, dtype, ratio of assert_close)
CONFIGS = {"cpu-fp32": ("cpu", torch.float32, 1e-4), "cpu-bf16": ("cpu", torch.bfloat16, 2e-2)} if INTERPRET else {}
CPU_BF16_SHAPES = ("T34-H4-Hkv2-D32-c16", "T37-H4-Hkv2-D16-c16-pad")  # of the attention, of the saliency
if CUDA:
    CONFIGS |= {
        "cuda-fp32": ("cuda", torch.float32, 1e-4),
        "cuda-bf16": ("cuda", torch.bfloat16, 2e-2),
        "cuda-fp16": ("cuda", torch.float16, 2e-2),
    }
FLOAT_INPUTS = ("q", "k", "v", "q_feat", "k_feat", "gate")
SALIENT_BLOCK = 16


def _cases(cpu_bf16_shape: str) -> list[tuple[str, str]]:
    """(config, shape) pairs: every shape in every config but cpu-bf16, which runs `cpu_bf16_shape` only."""
    return [(c, s) for c in CONFIGS for s in SHAPES if c != "cpu-bf16" or s == cpu_bf16_shape]


def _key_valid(B: int, T: int) -> torch.Tensor:
    """Row 0 starts with 14 padding tokens (its first chunk keeps < topk valid ones), row 1 has 6 in the middle."""
    valid = torch.ones(B, T, dtype=torch.bool)
    valid[0, :14] = False
    if B > 1:
        valid[1, T // 2 : T // 2 + 6] = False
    return valid


def _features(*shape: int) -> torch.Tensor:
    """Positive NP-Map-like features [softmax(u), softmax(-u)]."""
    u = torch.randn(*shape[:-1], shape[-1] // 2)
    return torch.cat([u.softmax(-1), (-u).softmax(-1)], dim=-1)


@functools.cache
def _inputs(shape_id: str, dtype: torch.dtype) -> dict:
    """CPU inputs rounded to `dtype`, NaN at padded positions."""
    B, T, H, Hkv, D, C, _, padded = SHAPES[shape_id]
    torch.manual_seed(0)
    x = {
        "q": torch.randn(B, T, H, D),
        "k": torch.randn(B, T, Hkv, D),
        "v": torch.randn(B, T, Hkv, D),
        "q_feat": _features(B, T, H, 2 * D),
        "k_feat": _features(B, T, H, 2 * D),
        "gate": torch.rand(B, T, H, D),
    }
    x = {name: t.to(dtype) for name, t in x.items()}
    x |= {"salient": torch.rand(B, T, H) < 0.3, "chunk_size": C}
    if padded:
        valid = x["key_valid"] = _key_valid(B, T)
        for name in FLOAT_INPUTS:
            x[name] = x[name].masked_fill(~valid[..., None, None], float("nan"))
    return x


def _run(fn, inputs: dict, device: str = "cpu", **kwargs) -> dict[str, torch.Tensor]:
    """Output and the gradient of (o * do).sum() for every float input (fp32 do, also at invalid queries)."""
    x = {name: t.to(device, copy=True) if torch.is_tensor(t) else t for name, t in inputs.items()}
    for name in FLOAT_INPUTS:
        x[name].requires_grad_()
    o = fn(**x, **kwargs)
    do = torch.randn(o.shape, generator=torch.Generator().manual_seed(1))
    (o.float() * do.to(device)).sum().backward()
    return {"o": o} | {f"d{name}": x[name].grad for name in FLOAT_INPUTS}


@functools.cache
def _reference(shape_id: str, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    # the float64 oracle on the same (rounded) inputs, returning fp32
    x = {
        name: t.float() if torch.is_tensor(t) and t.is_floating_point() else t
        for name, t in _inputs(shape_id, dtype).items()
    }
    return _run(naive_still_attention, x)


def _on_triton_device(x: dict) -> dict:
    return {name: t.to(TRITON_DEVICE) if torch.is_tensor(t) else t for name, t in x.items()}


@pytest.mark.parametrize(("config", "shape_id"), _cases(CPU_BF16_SHAPES[0]))
def test_attention_matches_reference(config, shape_id):
    device, dtype, ratio = CONFIGS[config]
    out = _run(triton_still_attention, _inputs(shape_id, dtype), device, salient_block=SALIENT_BLOCK)
    ref = _reference(shape_id, dtype)
    assert out.keys() == ref.keys()
    for name in ref:
        assert out[name].dtype == dtype, name
        assert_close(name, ref[name], out[name].float().cpu(), ratio=ratio)


@pytest.mark.parametrize("config", CONFIGS)
def test_attention_with_keys_sharing_a_large_component(config):
    """Keys sharing a large component, as a k_proj bias makes them (|k| in the hundreds in some channels of
    Qwen2.5), padding (NaN) included: the output and every gradient within the config's bound. The query-side
    kernel rounds the logit gradients dz (which sum to zero per query, the max's share included) before dq = dz k
    sums them, which cancels that component: before the wrapper centred the keys, bf16 dq was 0.6 to 1.0 off."""
    device, dtype, ratio = CONFIGS[config]
    x = dict(_inputs(SHAPE_DEFAULT, dtype))
    bias = torch.zeros(x["k"].shape[-1])
    bias[:4] = torch.tensor([300.0, -300.0, 200.0, 200.0])
    x["k"] = (x["k"].float() + bias).to(dtype)
    ref = _run(naive_still_attention, {name: t.float() if name in FLOAT_INPUTS else t for name, t in x.items()})
    out = _run(triton_still_attention, x, device, salient_block=SALIENT_BLOCK)
    for name in ref:
        assert_close(name, ref[name], out[name].float().cpu(), ratio=ratio)


class _ClaimsCuda(torch.Tensor):
    @property
    def is_cuda(self):
        return True


def test_training_on_cuda_warns_that_the_fused_backward_is_unverified():
    """Until a GPU run verifies a fix of dq (docs/gpu-runs.md), a CUDA call that needs gradients says so."""
    x = _inputs(SHAPE_DEFAULT, torch.float32)
    q = torch.Tensor._make_subclass(_ClaimsCuda, x["q"].clone(), True)
    with pytest.warns(UserWarning, match="LINEARIZE_BACKEND=torch"), pytest.raises(ValueError, match="salient_block"):
        triton_still_attention(**(x | {"q": q}), salient_block=3)  # stops after the warning, before any kernel


@needs_triton_device
def test_attention_without_grad():
    """Inference (nothing saved for the backward) with the default salient tile, a custom scale and eps."""
    x = _inputs(SHAPE_DEFAULT, torch.float32)
    kwargs = {"scale": 0.2, "eps": 1e-3}
    with torch.no_grad():
        o = triton_still_attention(**_on_triton_device(x), **kwargs)
    assert_close("o", naive_still_attention(**x, **kwargs), o.cpu())


@pytest.mark.parametrize("window", [5, "chunk", 64])
@pytest.mark.parametrize(("config", "shape_id"), _cases(CPU_BF16_SHAPES[1]))
def test_saliency_matches_reference(config, shape_id, window):
    """Windows shorter than a tile, equal to the chunk (as the layer uses it) and longer than T."""
    device, dtype, ratio = CONFIGS[config]
    x = _inputs(shape_id, dtype)
    window = x["chunk_size"] if window == "chunk" else window
    key_valid = x.get("key_valid")
    ref = naive_self_saliency(x["q"].float(), x["k"].float(), window=window, key_valid=key_valid)
    dev = {name: x[name].to(device) for name in ("q", "k")}
    out = triton_self_saliency(**dev, window=window, key_valid=None if key_valid is None else key_valid.to(device),
                               block_size=16).cpu()  # fmt: skip
    assert out.dtype == torch.float32
    finite = ref.isfinite()
    assert torch.equal(out.isfinite(), finite)
    assert (out[~finite] == float("-inf")).all()
    assert_close("scores", ref[finite], out[finite], ratio=ratio)


@pytest.mark.parametrize(("chunk_size", "topk"), [(16, 4), (8, 2), (12, 20), (16, 0)])
@pytest.mark.parametrize("config", [c for c in CONFIGS if c != "cpu-bf16"])  # fp32 scores whatever the model's
def test_selection_matches_torch(config, chunk_size, topk):
    """Tie-free scores, -inf at padding and at random places: a chunk of 12 (not a power of two) with topk > C
    keeps every finite score; the last chunk is short."""
    device = CONFIGS[config][0]
    torch.manual_seed(0)
    B, T, H = 2, 37, 4
    scores = torch.randn(B, T, H)
    scores = scores.masked_fill(~_key_valid(B, T)[..., None] | (torch.rand(B, T, H) < 0.2), float("-inf"))
    out = triton_select_salient(scores.to(device), chunk_size=chunk_size, topk=topk).cpu()
    assert out.dtype == torch.bool
    assert torch.equal(out, torch_select_salient(scores, chunk_size=chunk_size, topk=topk))


def _spy(module, name: str, calls: list[str], monkeypatch) -> None:
    fn = getattr(module, name)
    monkeypatch.setattr(module, name, lambda *args, **kwargs: calls.append(name) or fn(*args, **kwargs))


@needs_triton_device
@pytest.mark.parametrize("choice", ["argument", "environment"])
def test_dispatch(choice, monkeypatch):
    """Saliency, selection and attention chained through the "triton" backend (as an argument or through
    LINEARIZE_BACKEND) run the kernels and match the reference chain."""
    calls = []
    _spy(saliency_triton, "triton_self_saliency", calls, monkeypatch)
    _spy(selection_triton, "triton_select_salient", calls, monkeypatch)
    _spy(attention_triton, "triton_still_attention", calls, monkeypatch)
    backend = "triton" if choice == "argument" else None
    if choice == "environment":
        monkeypatch.setenv("LINEARIZE_BACKEND", "triton")
    x = dict(_inputs(SHAPE_DEFAULT, torch.float32))
    C, topk = x["chunk_size"], SHAPES[SHAPE_DEFAULT][6]
    on_device = _on_triton_device(x)
    scores = self_saliency(on_device["q"], on_device["k"], window=C, key_valid=on_device["key_valid"], backend=backend)
    on_device["salient"] = select_salient(scores, chunk_size=C, topk=topk, backend=backend)
    o = still_attention(**on_device, backend=backend)
    assert calls == ["triton_self_saliency", "triton_select_salient", "triton_still_attention"]
    scores, x["salient"], o = scores.cpu(), on_device["salient"].cpu(), o.cpu()

    ref_scores = naive_self_saliency(x["q"], x["k"], window=C, key_valid=x["key_valid"])
    assert_close("scores", ref_scores[ref_scores.isfinite()], scores[scores.isfinite()])
    assert torch.equal(x["salient"], select_salient(ref_scores, chunk_size=C, topk=topk, backend="torch"))
    assert_close("o", naive_still_attention(**x), o)


def test_select_salient_default_backend_on_cpu(monkeypatch):
    """Without a backend and LINEARIZE_BACKEND, CPU scores take the torch path (callers that pass none keep it)."""
    monkeypatch.delenv("LINEARIZE_BACKEND", raising=False)
    monkeypatch.setattr(still_mod, "torch_select_salient", lambda *args: "torch")
    assert select_salient(torch.zeros(1, 4, 1), chunk_size=2, topk=1) == "torch"
