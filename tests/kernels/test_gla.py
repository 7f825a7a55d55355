import functools

import linearize.kernels.gla as gla
import pytest
import torch
import torch.nn.functional as F
from linearize.kernels.gla import (
    chunk_gla,
    factored_chunk_gla,
    fused_recurrent_gla,
    gated_linear_attention,
    naive_recurrent_gla,
)
from linearize.kernels.gla.factored import MAX_EXPONENT, factorable

from tests.kernels._close import BF16_RATIO, assert_close

# (B, T, H, Hkv, K, V)
SHAPES = {
    "T1-H4-Hkv2-D64": (2, 1, 4, 2, 64, 64),
    "T37-H2-Hkv2-D64": (2, 37, 2, 2, 64, 64),
    "T100-H4-Hkv2-D64": (1, 100, 4, 2, 64, 64),
    "T130-H2-Hkv1-D128": (1, 130, 2, 1, 128, 128),
}
PATHS = {
    "recurrent": fused_recurrent_gla,
    "chunk64": chunk_gla,
    "chunk16": functools.partial(chunk_gla, chunk_size=16),
}


def _gates(shape: tuple[int, ...], kind: str) -> torch.Tensor:
    if kind == "logsigmoid":
        return F.logsigmoid(torch.randn(shape) * 8) / 16
    # about -8 per step: exp(-b) over a 64-token chunk would be exp(512), far beyond fp32
    return -8 + 0.1 * torch.randn(shape)


def _inputs(shape_id: str, gate: str, with_state: bool) -> dict[str, torch.Tensor]:
    B, T, H, Hkv, K, V = SHAPES[shape_id]
    torch.manual_seed(0)
    inputs = {
        "q": torch.randn(B, T, H, K),
        "k": torch.randn(B, T, Hkv, K),
        "v": torch.randn(B, T, Hkv, V),
        "g": _gates((B, T, Hkv, K), gate),
    }
    if with_state:
        inputs["initial_state"] = torch.randn(B, Hkv, K, V)
    return inputs


def _run(fn, inputs: dict[str, torch.Tensor], seed: int = 1) -> dict[str, torch.Tensor]:
    """Outputs and the gradient of (o * do).sum() + (ht * dht).sum() for every input, do and dht random."""
    leaves = {name: x.clone().requires_grad_() for name, x in inputs.items()}
    o, ht = fn(**leaves, scale=leaves["q"].shape[-1] ** -0.5, output_final_state=True)
    gen = torch.Generator().manual_seed(seed)
    do, dht = torch.randn(o.shape, generator=gen), torch.randn(ht.shape, generator=gen)
    ((o * do).sum() + (ht * dht).sum()).backward()
    return {"o": o, "ht": ht} | {f"d{name}": x.grad for name, x in leaves.items()}


@functools.cache
def _reference(shape_id: str, gate: str, with_state: bool) -> dict[str, torch.Tensor]:
    return _run(naive_recurrent_gla, _inputs(shape_id, gate, with_state))


@pytest.mark.parametrize("with_state", [False, True], ids=["h0-none", "h0"])
@pytest.mark.parametrize("gate", ["logsigmoid", "decay-8"])
@pytest.mark.parametrize("shape_id", SHAPES)
@pytest.mark.parametrize("path", PATHS)
def test_matches_reference(path, shape_id, gate, with_state):
    ref = _reference(shape_id, gate, with_state)
    out = _run(PATHS[path], _inputs(shape_id, gate, with_state))
    assert out.keys() == ref.keys()
    assert out["o"].dtype == torch.float32 and out["ht"].dtype == torch.float32
    for name in ref:
        assert_close(name, ref[name], out[name])


FACTORED = {
    "chunk64": factored_chunk_gla,
    "chunk16-segment32": functools.partial(factored_chunk_gla, chunk_size=16, segment_size=32),
}


@pytest.mark.parametrize("with_state", [False, True], ids=["h0-none", "h0"])
@pytest.mark.parametrize("shape_id", SHAPES)
@pytest.mark.parametrize("path", FACTORED)
def test_factored_matches_reference(path, shape_id, with_state):
    """The inference path, where its decay is factorable: output and final state (it takes no gradients)."""
    inputs = _inputs(shape_id, "logsigmoid", with_state)
    assert factorable(inputs["g"])  # at the default chunk, so at every smaller one
    ref = _reference(shape_id, "logsigmoid", with_state)
    with torch.no_grad():
        o, ht = FACTORED[path](**inputs, scale=inputs["q"].shape[-1] ** -0.5, output_final_state=True)
    assert o.dtype == torch.float32 and ht.dtype == torch.float32
    assert_close("o", ref["o"], o)
    assert_close("ht", ref["ht"], ht)


def test_factorable_bounds_each_chunk():
    g = torch.zeros(1, 130, 1, 4)
    assert factorable(g, 64)
    g[0, 64:128, 0, 2] = -2 * MAX_EXPONENT / 64  # the second chunk decays by exactly the limit in one dimension
    assert factorable(g, 64)
    g[0, 100, 0, 2] -= 0.01
    assert not factorable(g, 64)
    assert factorable(g, 32)  # that decay spread over two chunks of 32 is within the limit in each
    assert not factorable(_gates((1, 64, 1, 4), "decay-8"), 64)


def test_chunk_saves_each_chunk_state_once_for_backward():
    """Backward keeps the state entering each chunk once (the queries' product reads it): the recurrence under
    autograd kept every state a second time, each update saving the state it decays."""
    B, T, H, Hkv, K, V, C = 1, 64, 2, 1, 32, 12, 16  # K and V unlike any other saved dimension
    x = {"q": torch.randn(B, T, H, K), "k": torch.randn(B, T, Hkv, K), "v": torch.randn(B, T, Hkv, V)}
    x = {name: t.requires_grad_() for name, t in (x | {"g": _gates((B, T, Hkv, K), "logsigmoid")}).items()}
    states = {}

    def keep(t: torch.Tensor) -> torch.Tensor:
        if t.is_floating_point() and t.shape[-2:] == (K, V):
            states[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t):
        chunk_gla(**x, chunk_size=C)
    assert sum(states.values()) == B * Hkv * (T // C) * K * V * 4


@pytest.mark.parametrize("path", ["reference", *PATHS, *FACTORED])
def test_no_final_state(path):
    """Without the final state: ht is None, and the output is the one computed with it."""
    fn = {"reference": naive_recurrent_gla} | PATHS | FACTORED
    x = _inputs("T37-H2-Hkv2-D64", "logsigmoid", True)
    with torch.no_grad():
        o, ht = fn[path](**x, scale=x["q"].shape[-1] ** -0.5)
    assert ht is None
    assert_close("o", _reference("T37-H2-Hkv2-D64", "logsigmoid", True)["o"], o)


def _slice(inputs: dict[str, torch.Tensor], start: int, stop: int) -> dict[str, torch.Tensor]:
    return {name: x[:, start:stop] for name, x in inputs.items() if name != "initial_state"}


@pytest.mark.parametrize("second", ["chunk", "recurrent"])
def test_split_equals_single_call(second):
    """Prefill in two chunked calls, or chunked prefill then token-by-token decoding, carrying the state."""
    x = _inputs("T100-H4-Hkv2-D64", "logsigmoid", True)
    o, ht = chunk_gla(**x, output_final_state=True)
    outs, state = [], x["initial_state"]
    parts = [(0, 37), (37, 100)] if second == "chunk" else [(0, 37)] + [(t, t + 1) for t in range(37, 100)]
    for start, stop in parts:
        step = chunk_gla if start == 0 or second == "chunk" else fused_recurrent_gla
        o_part, state = step(**_slice(x, start, stop), initial_state=state, output_final_state=True)
        outs.append(o_part)
    assert_close("o", o, torch.cat(outs, dim=1))
    assert_close("ht", ht, state)


@pytest.mark.parametrize("path", [*PATHS, "factored"])
def test_bf16_inputs(path):
    """bf16 inputs, the initial state fp32: the output and every gradient (the factored path serves inference only)
    within `BF16_RATIO` of the oracle on the same inputs in fp32, the fp32 final state within fp32 rounding."""
    x = _inputs("T100-H4-Hkv2-D64", "logsigmoid", True)
    x = {name: t if name == "initial_state" else t.bfloat16() for name, t in x.items()}
    ref = _run(naive_recurrent_gla, {name: t.float() for name, t in x.items()})
    if path == "factored":
        o, ht = factored_chunk_gla(**x, scale=x["q"].shape[-1] ** -0.5, output_final_state=True)
        out = {"o": o, "ht": ht}
    else:
        out = _run(PATHS[path], x)
    for name in out:
        assert out[name].dtype == (torch.float32 if name in ("ht", "dinitial_state") else torch.bfloat16), name
        assert_close(name, ref[name], out[name].float(), ratio=1e-4 if name == "ht" else BF16_RATIO)


def _spy(fn, calls: list[str]):
    def spy(*args, **kwargs):
        calls.append(fn.__name__)
        return fn(*args, **kwargs)

    return spy


@pytest.mark.parametrize(
    ("backend", "T", "gate", "grad", "expected"),
    [
        ("reference", 37, "logsigmoid", False, "naive_recurrent_gla"),
        ("torch", 4, "logsigmoid", False, "fused_recurrent_gla"),
        ("torch", 37, "logsigmoid", False, "factored_chunk_gla"),
        ("torch", 37, "decay-8", False, "chunk_gla"),
        ("torch", 37, "logsigmoid", True, "chunk_gla"),
    ],
    ids=["reference", "torch-decode", "torch-prefill", "torch-prefill-strong-decay", "torch-training"],
)
def test_dispatch(monkeypatch, backend, T, gate, grad, expected):
    called = []
    for name in ("naive_recurrent_gla", "fused_recurrent_gla", "chunk_gla", "factored_chunk_gla"):
        monkeypatch.setattr(gla, name, _spy(getattr(gla, name), called))
    x = _slice(_inputs("T37-H2-Hkv2-D64", gate, True), 0, T) | {"initial_state": torch.randn(2, 2, 64, 64)}
    x["v"].requires_grad_(grad)
    o, ht = gated_linear_attention(**x, output_final_state=True, backend=backend)
    assert called == [expected]
    ref_o, ref_ht = naive_recurrent_gla(**x, output_final_state=True)
    assert_close("o", ref_o, o)
    assert_close("ht", ref_ht, ht)


def test_dispatch_reads_env(monkeypatch):
    monkeypatch.setenv("LINEARIZE_BACKEND", "reference")
    monkeypatch.setattr(gla, "naive_recurrent_gla", lambda *a, **kw: "reference called")
    assert gated_linear_attention(**_inputs("T37-H2-Hkv2-D64", "logsigmoid", False)) == "reference called"
    monkeypatch.setenv("LINEARIZE_BACKEND", "cuda")
    with pytest.raises(ValueError, match="'reference', 'torch', 'triton'"):
        gated_linear_attention(**_inputs("T37-H2-Hkv2-D64", "logsigmoid", False))


def test_rejects_bad_shapes():
    x = _inputs("T37-H2-Hkv2-D64", "logsigmoid", False)
    x["k"] = torch.randn(2, 37, 3, 64)
    with pytest.raises(ValueError, match="H % Hkv"):
        gated_linear_attention(**x)
    with pytest.raises(ValueError, match="expected 4-D q, k, v and g"):
        gated_linear_attention(**x | {"q": x["q"].flatten(2)})
    with pytest.raises(ValueError, match="no tokens"):
        gated_linear_attention(**{name: t[:, :0] if name in "qkvg" else t for name, t in x.items()})
    with pytest.raises(ValueError, match="power of two"):
        chunk_gla(**_inputs("T37-H2-Hkv2-D64", "logsigmoid", False), chunk_size=48)
    with pytest.raises(ValueError, match="multiple of chunk_size"):
        factored_chunk_gla(**_inputs("T37-H2-Hkv2-D64", "logsigmoid", False), chunk_size=64, segment_size=96)
