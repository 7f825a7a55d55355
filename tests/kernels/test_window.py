import functools

import linearize.kernels.window as window_mod
import pytest
import torch
from linearize.kernels.window import (
    chunk_sliding_window_attention,
    decode_sliding_window_attention,
    naive_sliding_window_attention,
    sliding_window_attention,
)

from tests.kernels._close import BF16_RATIO, assert_close

# (B, T, S, H, Hkv, D, window)
SHAPES = {
    "T1-S1-w4": (2, 1, 1, 4, 2, 64, 4),
    "T1-S50-w16-decode": (2, 1, 50, 4, 2, 64, 16),
    "T37-w16-H4-Hkv2": (2, 37, 37, 4, 2, 64, 16),
    "T100-S130-w64-H2-Hkv2": (2, 100, 130, 2, 2, 64, 64),
    "T130-w1": (1, 130, 130, 4, 2, 64, 1),
    "T130-w200-H2-Hkv1-D128": (1, 130, 130, 2, 1, 128, 200),
    "T1-S70-w24-H4-Hkv1-D128-decode": (2, 1, 70, 4, 1, 128, 24),
}
PATHS = {
    "chunk64": chunk_sliding_window_attention,
    "chunk16": functools.partial(chunk_sliding_window_attention, block_size=16),
}
E = 3  # sink keys


def _inputs(shape_id: str, left_pad: bool, sinks: bool) -> dict:
    B, T, S, H, Hkv, D, window = SHAPES[shape_id]
    torch.manual_seed(0)
    inputs = {
        "q": torch.randn(B, T, H, D),
        "k": torch.randn(B, S, Hkv, D),
        "v": torch.randn(B, S, Hkv, D),
        "window": window,
    }
    if left_pad:
        # batch row b starts with b * S // 3 padding keys
        inputs["key_valid"] = torch.arange(S) >= (torch.arange(B)[:, None] * S // 3)
    if sinks:
        inputs["sink_k"] = torch.randn(B, E, Hkv, D)
        inputs["sink_v"] = torch.randn(B, E, Hkv, D)
        inputs["sink_mask"] = torch.rand(B, T, E) < 0.5
    return inputs


def _run(fn, inputs: dict, seed: int = 1) -> dict[str, torch.Tensor]:
    """Output and the gradient of (o * do).sum() for every float input, do random."""
    leaves = {
        name: x.clone().requires_grad_() if torch.is_tensor(x) and x.is_floating_point() else x
        for name, x in inputs.items()
    }
    o = fn(**leaves)
    do = torch.randn(o.shape, generator=torch.Generator().manual_seed(seed))
    (o * do).sum().backward()
    return {"o": o} | {f"d{name}": x.grad for name, x in leaves.items() if torch.is_tensor(x) and x.requires_grad}


@functools.cache
def _reference(shape_id: str, left_pad: bool, sinks: bool) -> dict[str, torch.Tensor]:
    return _run(naive_sliding_window_attention, _inputs(shape_id, left_pad, sinks))


@pytest.mark.parametrize("sinks", [False, True], ids=["no-sinks", "sinks"])
@pytest.mark.parametrize("left_pad", [False, True], ids=["all-valid", "left-pad"])
@pytest.mark.parametrize("shape_id", SHAPES)
@pytest.mark.parametrize("path", PATHS)
def test_matches_reference(path, shape_id, left_pad, sinks):
    ref = _reference(shape_id, left_pad, sinks)
    out = _run(PATHS[path], _inputs(shape_id, left_pad, sinks))
    assert out.keys() == ref.keys()
    for name in ref:
        assert_close(name, ref[name], out[name])


def test_reference_semantics():
    """One query at absolute position 5 with window 3 attends to keys 3, 4, 5 only."""
    q = torch.randn(1, 1, 1, 8)
    k, v = torch.randn(1, 6, 1, 8), torch.randn(1, 6, 1, 8)
    p = torch.softmax((q[0, 0, 0] @ k[0, 3:, 0].T) * 8**-0.5, dim=-1)
    assert_close("o", p @ v[0, 3:, 0], naive_sliding_window_attention(q, k, v, 3)[0, 0, 0])


@pytest.mark.parametrize("path", ["reference", *PATHS])
def test_query_without_keys_is_zero(path):
    fn = naive_sliding_window_attention if path == "reference" else PATHS[path]
    x = _inputs("T37-w16-H4-Hkv2", left_pad=True, sinks=False)
    x["key_valid"][1] = False  # batch row 1 sees nothing
    _check_blind_row(fn, x, naive_sliding_window_attention)


def _check_blind_row(fn, x: dict, reference) -> None:
    """Batch row 1 sees no key: zero output and zero gradients there (no NaN), the other row as the reference's."""
    out = _run(fn, x)
    for name, value in out.items():
        assert (value[1] == 0).all(), name
    if fn is not reference:
        ref = _run(reference, x)
        for name in ref:
            assert_close(name, ref[name], out[name])


@pytest.mark.parametrize("backend", ["reference", "torch"])
def test_no_queries(backend):
    """T = 0 new tokens over a cache of S keys gives an empty output on every CPU backend."""
    x = _inputs("T1-S50-w16-decode", left_pad=True, sinks=False)
    out = sliding_window_attention(**x | {"q": x["q"][:, :0]}, backend=backend)
    assert out.shape == (2, 0, 4, 64)


@pytest.mark.parametrize("path", ["reference", *PATHS])
def test_history_equals_last_rows(path):
    """Queries over the last T of S tokens, with the first S - T cached, match the full computation."""
    fn = naive_sliding_window_attention if path == "reference" else PATHS[path]
    x = _inputs("T130-w1", left_pad=True, sinks=True) | {"window": 20}
    full = fn(**x)
    last = fn(**x | {"q": x["q"][:, -30:], "sink_mask": x["sink_mask"][:, -30:]})
    assert_close("o", full[:, -30:], last)


def _cast(inputs: dict, dtype: torch.dtype) -> dict:
    return {name: x.to(dtype) if torch.is_tensor(x) and x.is_floating_point() else x for name, x in inputs.items()}


@pytest.mark.parametrize(
    ("path", "shape_id", "softcap"),
    [
        ("chunk64", "T100-S130-w64-H2-Hkv2", None),
        ("chunk16", "T100-S130-w64-H2-Hkv2", None),
        ("chunk64", "T100-S130-w64-H2-Hkv2", 2.0),
        ("decode", "T1-S50-w16-decode", None),
    ],
    ids=["chunk64", "chunk16", "chunk64-softcap", "decode"],
)
def test_bf16_inputs(path, shape_id, softcap):
    """bf16 inputs: the output and every gradient within `BF16_RATIO` of the oracle on the same inputs in fp32."""
    x = _cast(_inputs(shape_id, left_pad=True, sinks=True), torch.bfloat16) | {"softcap": softcap}
    fn = decode_sliding_window_attention if path == "decode" else PATHS[path]
    ref, out = _run(naive_sliding_window_attention, _cast(x, torch.float32)), _run(fn, x)
    assert out.keys() == ref.keys()
    for name in ref:
        assert out[name].dtype == torch.bfloat16, name
        assert_close(name, ref[name], out[name].float(), ratio=BF16_RATIO)


@pytest.mark.parametrize("path", ["chunk64", "decode"])
def test_bf16_gradients_with_biased_keys(path):
    """Keys sharing a large component, as a k_proj bias makes them (|k| in the hundreds in some channels of
    Qwen2.5), and a key aligned with the last query (a peaked row): every gradient of bf16 inputs within
    `BF16_RATIO` of the oracle on the same inputs in fp32. dq sums the score gradients times the keys, and the
    shared component cancels in that sum (the score gradients of a query sum to zero): a backward that rounds
    them to bf16 first (SDPA's) left dq 10-20% off."""
    shape_id = "T1-S50-w16-decode" if path == "decode" else "T100-S130-w64-H2-Hkv2"
    x = _inputs(shape_id, left_pad=False, sinks=False)
    bias = torch.zeros(x["k"].shape[-1])
    bias[:4] = torch.tensor([200.0, -200.0, 150.0, -150.0])
    x["k"] = x["k"] + bias
    x["k"][:, -1] = x["q"][:, -1, :1] * 5  # the last query's own key: a logit of about 40
    x = _cast(x, torch.bfloat16)
    fn = decode_sliding_window_attention if path == "decode" else PATHS[path]
    ref, out = _run(naive_sliding_window_attention, _cast(x, torch.float32)), _run(fn, x)
    for name in ref:
        assert_close(name, ref[name], out[name].float(), ratio=BF16_RATIO)


def _spy(fn, calls: list[str]):
    def spy(*args, **kwargs):
        calls.append(fn.__name__)
        return fn(*args, **kwargs)

    return spy


@pytest.mark.parametrize(
    ("backend", "expected"),
    [("reference", "naive_sliding_window_attention"), ("torch", "chunk_sliding_window_attention")],
)
def test_dispatch(monkeypatch, backend, expected):
    called = []
    for name in ("naive_sliding_window_attention", "chunk_sliding_window_attention"):
        monkeypatch.setattr(window_mod, name, _spy(getattr(window_mod, name), called))
    x = _inputs("T37-w16-H4-Hkv2", left_pad=True, sinks=True)
    o = sliding_window_attention(**x, backend=backend)
    assert called == [expected]
    assert_close("o", naive_sliding_window_attention(**x), o)


def test_dispatch_reads_env(monkeypatch):
    monkeypatch.setenv("LINEARIZE_BACKEND", "reference")
    monkeypatch.setattr(window_mod, "naive_sliding_window_attention", lambda *a, **kw: "reference called")
    assert sliding_window_attention(**_inputs("T37-w16-H4-Hkv2", False, False)) == "reference called"


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"window": 0}, "window"),
        ({"window": 2.5}, "window must be an int"),
        ({"q": torch.randn(2, 40, 4, 64)}, "S >= T"),
        ({"q": torch.randn(2, 37, 256)}, "expected 4-D q, k and v"),
        ({"key_valid": torch.ones(2, 37, dtype=torch.long)}, r"bool, got \(2, 37\) torch.int64"),
        ({"sink_v": None}, "sink"),
    ],
    ids=["window-0", "window-float", "T>S", "q-3d", "key_valid-int", "sink_k-without-sink_v"],
)
def test_rejects_bad_arguments(change, match):
    with pytest.raises(ValueError, match=match):
        sliding_window_attention(**_inputs("T37-w16-H4-Hkv2", False, True) | change)


DECODE_SHAPES = {k: v for k, v in SHAPES.items() if v[1] == 1}


@pytest.mark.parametrize("sinks", [False, True], ids=["no-sinks", "sinks"])
@pytest.mark.parametrize("left_pad", [False, True], ids=["all-valid", "left-pad"])
@pytest.mark.parametrize("shape_id", DECODE_SHAPES)
def test_decode_path_matches_reference(shape_id, left_pad, sinks):
    ref = _reference(shape_id, left_pad, sinks)
    out = _run(decode_sliding_window_attention, _inputs(shape_id, left_pad, sinks))
    assert out.keys() == ref.keys()
    for name in ref:
        assert_close(name, ref[name], out[name])


def test_decode_query_without_keys_is_zero():
    x = _inputs("T1-S50-w16-decode", left_pad=True, sinks=True)
    x["key_valid"][1] = False  # batch row 1 sees no window key ...
    x["sink_mask"][1] = False  # ... and no sink
    _check_blind_row(decode_sliding_window_attention, x, naive_sliding_window_attention)


def test_decode_reads_nothing_back_from_the_device():
    """The decode path runs once per layer and token (on a GPU too: Gemma 2's capped layers, a Liger window past the
    fused kernel's): a value read back there, whether every key is valid, would make the host wait for the device
    each time. Meta tensors, whose values cannot be read, stand in for a GPU's."""
    for all_valid in (True, False):
        x = _inputs("T1-S50-w16-decode", left_pad=not all_valid, sinks=True)
        x["key_valid"] = torch.ones(2, 50, dtype=torch.bool) if all_valid else x["key_valid"]
        on_meta = {name: t.to("meta") if torch.is_tensor(t) else t for name, t in x.items()}
        o = decode_sliding_window_attention(**on_meta, softcap=2.0)
        assert o.device.type == "meta" and o.shape == x["q"].shape


# Gemma 2's attention logit soft-capping: scale 0.4 puts the scores at about 3.2 standard deviations, beyond the cap
SOFTCAP = {"softcap": 2.0, "scale": 0.4}
SOFTCAP_CASES = [
    (path, shape_id)
    for shape_id in ("T1-S50-w16-decode", "T37-w16-H4-Hkv2", "T100-S130-w64-H2-Hkv2", "T130-w200-H2-Hkv1-D128")
    for path in (*PATHS, "decode")
    if path != "decode" or SHAPES[shape_id][1] == 1
]


@pytest.mark.parametrize(("path", "shape_id"), SOFTCAP_CASES)
def test_softcap_matches_reference(path, shape_id):
    """Capped logits: output and every gradient of the torch paths equal the oracle's, and the cap matters."""
    x = _inputs(shape_id, left_pad=True, sinks=True)
    fn = decode_sliding_window_attention if path == "decode" else PATHS[path]
    ref = _run(functools.partial(naive_sliding_window_attention, **SOFTCAP), x)
    out = _run(functools.partial(fn, **SOFTCAP), x)
    assert out.keys() == ref.keys()
    for name in ref:
        assert_close(name, ref[name], out[name])
    uncapped = naive_sliding_window_attention(**x, scale=SOFTCAP["scale"])
    assert (uncapped - ref["o"]).abs().amax() > 0.1


@pytest.mark.parametrize("path", ["reference", *PATHS, "decode"])
def test_softcap_query_without_keys_is_zero(path):
    fn = {"reference": naive_sliding_window_attention, "decode": decode_sliding_window_attention} | PATHS
    x = _inputs("T1-S50-w16-decode" if path == "decode" else "T37-w16-H4-Hkv2", left_pad=True, sinks=False)
    x["key_valid"][1] = False  # batch row 1 sees nothing
    reference = functools.partial(naive_sliding_window_attention, **SOFTCAP)
    _check_blind_row(reference if path == "reference" else functools.partial(fn[path], **SOFTCAP), x, reference)


def test_softcap_dispatch(monkeypatch):
    """The op passes the cap to the reference and torch paths; Triton has no cap and says so."""
    monkeypatch.delenv("LINEARIZE_BACKEND", raising=False)
    for shape_id in ("T37-w16-H4-Hkv2", "T1-S50-w16-decode"):  # the blockwise and the decode path
        x = _inputs(shape_id, left_pad=True, sinks=True)
        ref = naive_sliding_window_attention(**x, **SOFTCAP)
        for backend in ("reference", "torch", None):
            assert_close("o", ref, sliding_window_attention(**x, **SOFTCAP, backend=backend))
    with pytest.raises(NotImplementedError, match="soft-capping .* use backend 'torch'"):
        sliding_window_attention(**x, **SOFTCAP, backend="triton")


@pytest.mark.parametrize("path", ["reference", *PATHS, "decode"])
def test_hidden_keys_may_hold_nan(path):
    """A padded or unfilled key slot may hold anything (scratch memory, NaN included): it changes no output."""
    fn = {"reference": naive_sliding_window_attention, "decode": decode_sliding_window_attention, **PATHS}[path]
    clean = _inputs("T1-S50-w16-decode" if path == "decode" else "T37-w16-H4-Hkv2", left_pad=True, sinks=True)
    clean["key_valid"][:, -3] = False  # and a slot inside every window: a ring slot not yet written
    hidden = ~clean["key_valid"]
    dirty = {**clean, "k": clean["k"].masked_fill(hidden[..., None, None], float("nan"))}
    dirty["v"] = clean["v"].masked_fill(hidden[..., None, None], float("nan"))
    with torch.no_grad():
        assert_close("o", fn(**clean), fn(**dirty))
