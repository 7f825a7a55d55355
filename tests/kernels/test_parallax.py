"""Parallax attention (`linearize.kernels.parallax`) without Triton: the blockwise torch path against the float64
oracle (output and the gradients of q, r, k, v and the history), r = 0 against softmax attention (SDPA), the decode
steps against the last row of the full forward, the oracle against fla's `naive_parallax`, the dispatchers and the
input checks. torch.empty is NaN-filled (tests/kernels/conftest.py), so a read of unwritten scratch fails.
"""

import functools

import pytest
import torch
import torch.nn.functional as F
from linearize.kernels.parallax import (
    chunk_parallax_attention,
    naive_parallax_attention,
    naive_parallax_decode,
    parallax_attention,
    parallax_decode,
    rowwise_parallax_attention,
    torch_parallax_decode,
)

from tests.kernels._close import BF16_RATIO, assert_close, head_major

# (B, T, H, Hkv, D, P history keys, window, block_size, padding)
SHAPES = {
    "T37-H4-Hkv2-D16-C16": (2, 37, 4, 2, 16, 0, None, 16, None),
    "T37-H4-Hkv2-D16-C16-left": (2, 37, 4, 2, 16, 0, None, 16, "left"),
    "T45-H4-Hkv2-D64-w20-C16-middle": (2, 45, 4, 2, 64, 0, 20, 16, "middle"),
    "T30-H2-Hkv1-D128-C64": (1, 30, 2, 1, 128, 0, None, 64, None),
    "T37-P23-H4-Hkv2-D32-w30-C16-left": (2, 37, 4, 2, 32, 23, 30, 16, "left"),
    "T70-P9-H2-Hkv2-D8-C32-middle": (2, 70, 2, 2, 8, 9, None, 32, "middle"),
    "T1-P12-H4-Hkv2-D16-w5-C16-left": (2, 1, 4, 2, 16, 12, 5, 16, "left"),
    "T20-H3-Hkv1-D5-w1-C8": (1, 20, 3, 1, 5, 0, 1, 8, None),
}
FLOAT_INPUTS = ("q", "r", "k", "v", "past_k", "past_v")


def _key_valid(B: int, S: int, padding: str | None) -> torch.Tensor | None:
    """`[B, S]`: "left" puts b * S // 3 invalid keys first in row b; "middle" drops a third of the keys at random
    (the first two always, so some queries see no key at all)."""
    if padding == "left":
        return torch.arange(S) >= torch.arange(B)[:, None] * S // 3
    if padding == "middle":
        valid = torch.rand(B, S, generator=torch.Generator().manual_seed(2)) > 1 / 3
        valid[:, :2] = False
        return valid
    return None


@functools.cache
def _inputs(shape_id: str, probe: float = 0.3) -> dict:
    """float64 inputs; r scaled by `probe` (0 gives softmax attention)."""
    B, T, H, Hkv, D, P, window, _, padding = SHAPES[shape_id]
    gen = torch.Generator().manual_seed(0)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen, dtype=torch.float64)

    x = {"q": randn(B, T, H, D), "r": probe * randn(B, T, H, D), "k": randn(B, T, Hkv, D), "v": randn(B, T, Hkv, D)}
    if P:
        x |= {"past_k": randn(B, P, Hkv, D), "past_v": randn(B, P, Hkv, D)}
    return x | {"window": window, "key_valid": _key_valid(B, P + T, padding)}


def _cast(x: dict, dtype: torch.dtype) -> dict:
    return {name: t.to(dtype) if torch.is_tensor(t) and t.is_floating_point() else t for name, t in x.items()}


def _run(fn, x: dict, seed: int = 1, **kwargs) -> dict[str, torch.Tensor]:
    """Output and the gradient of (o * do).sum() for every float input, do random."""
    # fresh leaves: the cached inputs must not collect gradients shared between runs
    x = {name: t.detach().clone().requires_grad_() if name in FLOAT_INPUTS else t for name, t in x.items()}
    o = fn(**x, **kwargs)
    do = torch.randn(o.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    (o * do.to(o.dtype)).sum().backward()
    return {"o": o} | {f"d{name}": t.grad for name, t in x.items() if name in FLOAT_INPUTS}


@functools.cache
def _reference(shape_id: str, probe: float = 0.3) -> dict[str, torch.Tensor]:
    return _run(naive_parallax_attention, _inputs(shape_id, probe))


@pytest.mark.parametrize("dtype, ratio", [(torch.float32, 1e-4), (torch.float64, 1e-12)], ids=["fp32", "fp64"])
@pytest.mark.parametrize("shape_id", SHAPES)
def test_torch_matches_reference(shape_id, dtype, ratio):
    ref = _reference(shape_id)
    out = _run(chunk_parallax_attention, _cast(_inputs(shape_id), dtype), block_size=SHAPES[shape_id][7])
    assert out.keys() == ref.keys()
    for name in ref:
        assert out[name].dtype == dtype, name
        assert_close(name, ref[name], out[name], ratio=ratio)


@pytest.mark.parametrize(
    "shape_id", ["T30-H2-Hkv1-D128-C64", "T45-H4-Hkv2-D64-w20-C16-middle", "T37-P23-H4-Hkv2-D32-w30-C16-left"]
)
def test_keys_with_a_large_shared_component(shape_id):
    """Keys sharing a large component, as a k_proj bias makes them (|k| in the hundreds in some channels of
    Qwen2.5): fp32 output and gradients within 1e-4 of the float64 oracle. The score gradients of a query sum to
    zero, so dq = sum_j gl_j k_j cancels the shared component, and the rounding of the forward's o (which cancels
    t_bar in o = v_bar (1 + t_bar) - O2 / d1) leaves a residual in that sum: dq was 1e-3 off, the output 2e-5."""
    x = dict(_inputs(shape_id))
    bias = torch.zeros(x["k"].shape[-1], dtype=torch.float64)
    bias[:4] = torch.tensor([300.0, -300.0, 200.0, 200.0])
    x |= {name: x[name] + bias for name in ("k", "past_k") if name in x}
    ref = _run(naive_parallax_attention, x)
    out = _run(chunk_parallax_attention, _cast(x, torch.float32), block_size=SHAPES[shape_id][7])
    for name in ref:
        assert_close(name, ref[name], out[name])


@pytest.mark.parametrize("dtype, ratio", [(torch.float32, 1e-4), (torch.float64, 1e-12)], ids=["fp32", "fp64"])
@pytest.mark.parametrize("shape_id", SHAPES)
def test_rowwise_inference_path_matches_reference(shape_id, dtype, ratio):
    """The no-autograd form (whole rows of scores per query block), with blocks of a few queries so that a row
    block ends mid-window and mid-history, and NaN at every invalid key and value."""
    x = _cast(_inputs(shape_id), dtype)
    if x["key_valid"] is not None:
        P = x.get("past_k", x["k"][:, :0]).shape[1]
        invalid = ~x["key_valid"][:, :, None, None]
        x = x | {name: x[name].masked_fill(invalid[:, P:], float("nan")) for name in ("k", "v")}
        if P:
            x = x | {name: x[name].masked_fill(invalid[:, :P], float("nan")) for name in ("past_k", "past_v")}
    B, T, H, _, _, P, window, _, _ = SHAPES[shape_id]
    out = rowwise_parallax_attention(**x, block_logits=B * 2 * H * (window or P + T) * 3)  # 3 queries per block
    assert out.dtype == dtype
    assert_close("o", _reference(shape_id)["o"], out, ratio=ratio)


@pytest.mark.parametrize("path", ["blockwise", "rowwise", "decode"])
def test_bf16_inputs(path):
    """bf16 inputs: the output (and on the blockwise path every gradient) within `BF16_RATIO` of the oracle on the
    same inputs in float64. Peaked scores (q 4x, k 2x: logits of standard deviation 8) at D = 128, where the scale
    D ** -0.5 is not a power of two: a bf16 query scaled before its upcast was rounded again, which cost the rowwise
    path 5x the bf16 error."""
    shape_id = "T30-H2-Hkv1-D128-C64"
    x = _inputs(shape_id)
    x = _cast(x | {"q": 4 * x["q"], "k": 2 * x["k"]}, torch.bfloat16)
    ref = _run(naive_parallax_attention, _cast(x, torch.float64))
    if path == "blockwise":
        out = _run(chunk_parallax_attention, x, block_size=SHAPES[shape_id][7])
    elif path == "rowwise":
        out = {"o": rowwise_parallax_attention(**x)}
    else:
        o = torch_parallax_decode(x["q"][:, -1], x["r"][:, -1], x["k"], x["v"])
        out, ref = {"o": o}, {"o": ref["o"][:, -1]}
    for name in out:
        assert out[name].dtype == torch.bfloat16, name
        assert_close(name, ref[name], out[name].float(), ratio=BF16_RATIO)


def test_torch_backend_takes_the_rowwise_form_without_autograd(monkeypatch):
    """Same output either way; the rowwise form serves inference, the blockwise one anything that needs grads."""
    calls = []
    monkeypatch.setattr(
        "linearize.kernels.parallax.rowwise_parallax_attention",
        lambda *a, **kw: calls.append("rowwise") or rowwise_parallax_attention(*a, **kw),
    )
    x = _cast(_inputs("T37-P23-H4-Hkv2-D32-w30-C16-left"), torch.float32)
    with torch.no_grad():
        inference = parallax_attention(**x, backend="torch")
    training = _run(functools.partial(parallax_attention, backend="torch"), x)["o"]
    assert calls == ["rowwise"]
    assert_close("o", training, inference, ratio=1e-5)


def _softmax_attention(q, k, v, window=None, key_valid=None, past_k=None, past_v=None, **_) -> torch.Tensor:
    """Causal (windowed) softmax attention with SDPA, the history before the new keys."""
    if past_k is not None:
        k, v = torch.cat([past_k, k], 1), torch.cat([past_v, v], 1)
    T, S = q.shape[1], k.shape[1]
    lag = torch.arange(S - T, S)[:, None] - torch.arange(S)[None, :]  # query position minus key position
    mask = (lag >= 0) & (lag < (S if window is None else window))
    mask = mask if key_valid is None else mask & key_valid[:, None, None, :]
    o = F.scaled_dot_product_attention(*(x.transpose(1, 2) for x in (q, k, v)), attn_mask=mask, enable_gqa=True)
    return o.transpose(1, 2)  # zeros for a query that sees no key


@pytest.mark.parametrize("shape_id", SHAPES)
def test_zero_probe_is_softmax_attention(shape_id):
    """r = 0: output and dq, dk, dv of every path equal softmax attention's, and dr is its dq times -1 / scale
    (docs/methods.md §4.5): a zero probe learns what a query update would."""
    x = _inputs(shape_id, probe=0.0)
    ref = _run(_softmax_attention, {name: t for name, t in x.items() if name != "r"})
    scale = x["q"].shape[-1] ** -0.5
    chunk = functools.partial(chunk_parallax_attention, block_size=SHAPES[shape_id][7])
    paths = {
        "reference": (naive_parallax_attention, torch.float64, 1e-12),
        "torch-fp64": (chunk, torch.float64, 1e-12),
        "torch-fp32": (chunk, torch.float32, 1e-5),
    }
    for path, (fn, dtype, ratio) in paths.items():
        out = _run(fn, _cast(x, dtype))
        for name in ref:
            assert_close(f"{path} {name}", ref[name], out[name], ratio=ratio)
        assert_close(f"{path} dr", -ref["dq"] / scale, out["dr"], ratio=ratio)
    if x["window"] != 1:  # with one visible key there is no covariance to probe
        # the probe can grow from zero (docs/methods.md §4.5)
        assert _reference(shape_id, probe=0.0)["dr"].abs().amax() > 0


@pytest.mark.parametrize("shape_id", ["T37-H4-Hkv2-D16-C16", "T45-H4-Hkv2-D64-w20-C16-middle"])
def test_small_probe_is_a_query_shift(shape_id):
    """To first order in s, Parallax is softmax attention with the query q - r / scale (docs/methods.md §4.2): the
    gap to that shifted softmax shrinks with the square of the probe, the gap to plain softmax with the probe."""
    x = _inputs(shape_id, probe=0.0)
    q, scale = x["q"], x["q"].shape[-1] ** -0.5
    direction = torch.randn(q.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    options = {name: x[name] for name in ("window", "key_valid")}
    plain = _softmax_attention(q, x["k"], x["v"], **options)
    to_shift, to_plain = [], []
    for size in (1e-2, 1e-3):
        r = size * direction
        o = naive_parallax_attention(q, r, x["k"], x["v"], **options)
        to_shift.append((o - _softmax_attention(q - r / scale, x["k"], x["v"], **options)).norm())
        to_plain.append((o - plain).norm())
    assert 8 < to_plain[0] / to_plain[1] < 12.5
    assert 80 < to_shift[0] / to_shift[1] < 125
    assert to_shift[0] < 0.1 * to_plain[0]


@pytest.mark.parametrize("shape_id", ["T37-P23-H4-Hkv2-D32-w30-C16-left", "T70-P9-H2-Hkv2-D8-C32-middle"])
def test_padding_values_never_leak(shape_id):
    """NaN in invalid keys and values changes nothing on the torch path (they are never multiplied)."""
    x = _cast(_inputs(shape_id), torch.float32)
    P = x["past_k"].shape[1]
    invalid = ~x["key_valid"][:, :, None, None]
    poisoned = x | {name: x[name].masked_fill(invalid[:, :P], float("nan")) for name in ("past_k", "past_v")}
    poisoned |= {name: x[name].masked_fill(invalid[:, P:], float("nan")) for name in ("k", "v")}
    out = chunk_parallax_attention(**poisoned, block_size=16)
    assert_close("o", _reference(shape_id)["o"], out)


@pytest.mark.parametrize("path", ["reference", "blockwise", "rowwise"])
@pytest.mark.parametrize("shape_id", ["T37-H4-Hkv2-D16-C16-left", "T37-P23-H4-Hkv2-D32-w30-C16-left"])
def test_padded_rows_equal_unpadded_rows(shape_id, path):
    """Left padding (of the history, or of the history and new tokens) whose keys and values hold NaN: each row's
    output (and, where differentiated, gradients) at its real tokens equal those of the row run alone, its padded
    queries output zeros and the padding's keys and values get zero gradients, on every path."""
    fn = {
        "reference": naive_parallax_attention,
        "blockwise": functools.partial(chunk_parallax_attention, block_size=16),
        "rowwise": rowwise_parallax_attention,
    }[path]
    x = _cast(_inputs(shape_id), torch.float32)
    B, T = x["q"].shape[:2]
    P = x["past_k"].shape[1] if "past_k" in x else 0
    invalid = ~x["key_valid"][:, :, None, None]
    x |= {name: x[name].masked_fill(invalid[:, :P], float("nan")) for name in ("past_k", "past_v") if name in x}
    x |= {name: x[name].masked_fill(invalid[:, P:], float("nan")) for name in ("k", "v")}
    do = torch.randn(x["q"].shape, generator=torch.Generator().manual_seed(1))
    out = _outputs(fn, x, do, grads=path != "rowwise")
    for b in range(B):
        pad = int((~x["key_valid"][b]).sum())
        assert x["key_valid"][b, pad:].all()  # left padding
        new, past = max(pad - P, 0), min(pad, P)  # the padding among the new tokens and among the history
        alone = _outputs(fn, _row_alone(x, b, pad), do[b : b + 1, new:], grads=path != "rowwise")
        assert_close(f"o[{b}]", alone["o"][0], out["o"][b, new:])
        assert (out["o"][b, :new] == 0).all()
        for name, grad in alone.items():
            start = {"dq": new, "dr": new, "dk": new, "dv": new, "dpast_k": past, "dpast_v": past}.get(name)
            if start is not None:
                assert_close(f"{name}[{b}]", grad[0], out[name][b, start:])
                assert (out[name][b, :start] == 0).all(), name


def _row_alone(x: dict, b: int, pad: int) -> dict:
    """Batch row b of `x` without its `pad` leading padding positions (history first), as run alone."""
    P = x["past_k"].shape[1] if "past_k" in x else 0
    row = {name: x[name][b : b + 1] for name in FLOAT_INPUTS if name in x}
    row |= {name: row[name][:, pad:] for name in ("past_k", "past_v") if name in row}
    row |= {name: row[name][:, max(pad - P, 0) :] for name in ("q", "r", "k", "v")}
    return row | {"window": x["window"]}


def _outputs(fn, x: dict, do: torch.Tensor, grads: bool) -> dict[str, torch.Tensor]:
    """Output and, with `grads`, the gradient of (o * do).sum() for every float input; else the output alone
    (without autograd)."""
    if not grads:
        with torch.no_grad():
            return {"o": fn(**x)}
    x = {name: t.detach().clone().requires_grad_() if name in FLOAT_INPUTS else t for name, t in x.items()}
    o = fn(**x)
    (o * do.to(o.dtype)).sum().backward()
    return {"o": o} | {f"d{name}": t.grad for name, t in x.items() if name in FLOAT_INPUTS}


def _decode_case(shape_id: str) -> tuple[dict, torch.Tensor]:
    """Decode arguments for the last token of a shape, with the cache holding history and all T tokens."""
    x = _inputs(shape_id)
    keys, values = x["k"], x["v"]
    if "past_k" in x:
        keys, values = torch.cat([x["past_k"], keys], 1), torch.cat([x["past_v"], values], 1)
    args = {"q": x["q"][:, -1], "r": x["r"][:, -1], "k_cache": keys, "v_cache": values}
    return args | {"cache_valid": x["key_valid"], "window": x["window"]}, _reference(shape_id)["o"][:, -1]


@pytest.mark.parametrize("dtype, ratio", [(torch.float32, 1e-5), (torch.float64, 1e-12)], ids=["fp32", "fp64"])
@pytest.mark.parametrize("shape_id", SHAPES)
def test_decode_is_last_row(shape_id, dtype, ratio):
    args, last_row = _decode_case(shape_id)
    for step in (naive_parallax_decode, torch_parallax_decode):
        o = step(**_cast(args, dtype))
        assert o.dtype == dtype
        assert_close(step.__name__, last_row, o, ratio=ratio)


@pytest.mark.parametrize("shape_id", ["T30-H2-Hkv1-D128-C64", "T45-H4-Hkv2-D64-w20-C16-middle"])
def test_decode_reads_a_head_major_cache_in_place(shape_id):
    """Parallax's growing cache is a head-major buffer with room after each head: the decode step reads the
    strided view and never the room (NaN there), with every slot valid or some hidden."""
    args, last_row = _decode_case(shape_id)
    args |= {name: head_major(args[name], room=7) for name in ("k_cache", "v_cache")}
    assert args["k_cache"].stride(1) == args["k_cache"].shape[-1]  # consecutive tokens of a head: adjacent rows
    assert_close("o", last_row, torch_parallax_decode(**args))


def test_decode_ignores_unfilled_slots():
    """Invalid cache slots holding NaN (never written) leave the torch decode step finite and unchanged."""
    args, last_row = _decode_case("T70-P9-H2-Hkv2-D8-C32-middle")
    invalid = ~args["cache_valid"][:, :, None, None]
    args |= {name: args[name].masked_fill(invalid, float("nan")) for name in ("k_cache", "v_cache")}
    assert_close("o", last_row, torch_parallax_decode(**args), ratio=1e-12)


def test_decode_reads_nothing_back_from_the_device():
    """The torch decode step runs once per layer and token (on a GPU too: Gemma 2's capped layers): a value read
    back there, whether every slot is valid, would make the host wait for the device each time. Meta tensors, whose
    values cannot be read, stand in for a GPU's."""
    args, last_row = _decode_case("T30-H2-Hkv1-D128-C64")
    args["cache_valid"] = torch.ones(args["k_cache"].shape[:2], dtype=torch.bool)  # a full cache: the one-op form
    o = torch_parallax_decode(**{name: t.to("meta") if torch.is_tensor(t) else t for name, t in args.items()})
    assert o.device.type == "meta" and o.shape == last_row.shape


@pytest.mark.parametrize("shape_id", ["T1-P12-H4-Hkv2-D16-w5-C16-left", "T70-P9-H2-Hkv2-D8-C32-middle"])
def test_decode_row_that_sees_no_key_is_zero(shape_id):
    """A row whose visible slots are all invalid gets zeros (NaN in those slots); the other row is unchanged."""
    args, last_row = _decode_case(shape_id)
    args["cache_valid"] = args["cache_valid"].clone()
    args["cache_valid"][1] = False
    invalid = ~args["cache_valid"][:, :, None, None]
    unfilled = {name: args[name].masked_fill(invalid, float("nan")) for name in ("k_cache", "v_cache")}
    for step in (naive_parallax_decode, torch_parallax_decode):
        o = step(**args | unfilled)
        assert torch.equal(o[1], torch.zeros_like(o[1])), step.__name__
        assert_close(step.__name__, last_row[:1], o[:1], ratio=1e-12)


@pytest.mark.parametrize("window", [None, 9])
def test_reference_matches_fla(window):
    """Our oracle against fla's naive_parallax (same [B, T, H, D] layout, GQA grouping and scale convention)."""
    naive_parallax = pytest.importorskip("fla.ops.parallax.naive").naive_parallax
    gen = torch.Generator().manual_seed(3)
    q, r = torch.randn(2, 41, 4, 32, generator=gen), 0.5 * torch.randn(2, 41, 4, 32, generator=gen)
    k, v = torch.randn(2, 41, 2, 32, generator=gen), torch.randn(2, 41, 2, 32, generator=gen)
    for scale in (None, 0.3):
        ref = naive_parallax(q, r, k, v, scale=scale, window_size=window)
        assert_close("o", ref, naive_parallax_attention(q, r, k, v, scale=scale, window=window), ratio=1e-5)


@pytest.mark.parametrize("backend", ["reference", "torch"])
def test_dispatchers(backend, monkeypatch):
    shape_id = "T37-P23-H4-Hkv2-D32-w30-C16-left"
    x = _cast(_inputs(shape_id), torch.float32)
    window, key_valid = x.pop("window"), x.pop("key_valid")
    monkeypatch.setenv("LINEARIZE_BACKEND", backend)
    o = parallax_attention(**x, window=window, key_valid=key_valid, scale=0.2)
    ref = naive_parallax_attention(**_inputs(shape_id) | {"scale": 0.2})
    assert_close("o", ref, o)
    args, last_row = _decode_case(shape_id)
    cache_valid = args.pop("cache_valid")
    assert_close("decode", last_row, parallax_decode(**args, cache_valid=cache_valid, backend=backend))


def test_rejects_bad_inputs():
    x = _inputs("T37-P23-H4-Hkv2-D32-w30-C16-left")
    with pytest.raises(ValueError, match="H % Hkv"):
        parallax_attention(**x | {"k": torch.randn(2, 37, 3, 32), "v": torch.randn(2, 37, 3, 32)})
    with pytest.raises(ValueError, match="r \\(2, 37, 4, 16\\)"):
        parallax_attention(**x | {"r": torch.randn(2, 37, 4, 16)})
    with pytest.raises(ValueError, match="both or neither"):
        parallax_attention(**x | {"past_v": None})
    with pytest.raises(ValueError, match="key_valid"):
        parallax_attention(**x | {"key_valid": x["key_valid"][:, 1:]})
    with pytest.raises(ValueError, match="key_valid"):
        parallax_attention(**x | {"key_valid": x["key_valid"].float()})
    with pytest.raises(ValueError, match="window"):
        parallax_attention(**x | {"window": 0})
    args, _ = _decode_case("T37-P23-H4-Hkv2-D32-w30-C16-left")
    with pytest.raises(ValueError, match="k_cache"):
        parallax_decode(**args | {"k_cache": args["k_cache"][:, :, :1]})
    with pytest.raises(ValueError, match="cache_valid"):
        parallax_decode(**args | {"cache_valid": args["cache_valid"][:, 1:]})


# Gemma 2's logit soft-capping: with scale 1 the scores q . k (D = 5..128) reach well beyond the cap
SOFTCAP = {"softcap": 2.0, "scale": 1.0}


@functools.cache
def _capped_reference(shape_id: str, probe: float = 0.3) -> dict[str, torch.Tensor]:
    return _run(naive_parallax_attention, _inputs(shape_id, probe), **SOFTCAP)


@pytest.mark.parametrize("dtype, ratio", [(torch.float32, 1e-4), (torch.float64, 1e-12)], ids=["fp32", "fp64"])
@pytest.mark.parametrize("shape_id", SHAPES)
def test_softcap_torch_matches_reference(shape_id, dtype, ratio):
    """Capped logits z (the probe term r . k uncapped): output and every gradient of the blockwise path with its
    hand-written backward, the rowwise inference form and the decode step equal the oracle's."""
    ref = _capped_reference(shape_id)
    x = _cast(_inputs(shape_id), dtype)
    out = _run(chunk_parallax_attention, x, block_size=SHAPES[shape_id][7], **SOFTCAP)
    assert out.keys() == ref.keys()
    for name in ref:
        assert_close(name, ref[name], out[name], ratio=ratio)
    B, T, H, _, _, P, window, _, _ = SHAPES[shape_id]
    rowwise = rowwise_parallax_attention(**x, block_logits=B * 2 * H * (window or P + T) * 3, **SOFTCAP)
    assert_close("rowwise o", ref["o"], rowwise, ratio=ratio)
    args, _ = _decode_case(shape_id)
    for step in (naive_parallax_decode, torch_parallax_decode):
        assert_close(step.__name__, ref["o"][:, -1], step(**_cast(args, dtype), **SOFTCAP), ratio=ratio)
    if window != 1:  # the cap matters (not to a softmax over one key)
        uncapped = naive_parallax_attention(**_inputs(shape_id), scale=SOFTCAP["scale"])
        assert (uncapped - ref["o"]).abs().amax() > 0.1


@pytest.mark.parametrize("shape_id", ["T37-P23-H4-Hkv2-D32-w30-C16-left", "T70-P9-H2-Hkv2-D8-C32-middle"])
def test_softcap_zero_probe_is_capped_softmax_attention(shape_id):
    """r = 0 with a cap: Parallax is the capped softmax attention of the window op (a converted Gemma 2 with a zero
    probe is the original), output and the gradients of q and the keys and values."""
    from linearize.kernels.window import naive_sliding_window_attention

    x = _inputs(shape_id, probe=0.0)

    def softmax_attention(q, k, v, past_k, past_v, window, key_valid, **_):
        k, v = torch.cat([past_k, k], 1), torch.cat([past_v, v], 1)
        return naive_sliding_window_attention(q, k, v, window or k.shape[1], key_valid, **SOFTCAP)

    ref = _run(softmax_attention, x)
    out = _run(chunk_parallax_attention, x, block_size=SHAPES[shape_id][7], **SOFTCAP)
    for name in ("o", "dq", "dk", "dv", "dpast_k", "dpast_v"):
        assert_close(name, ref[name], out[name], ratio=1e-5)


def test_softcap_dispatchers(monkeypatch):
    monkeypatch.delenv("LINEARIZE_BACKEND", raising=False)
    shape_id = "T37-P23-H4-Hkv2-D32-w30-C16-left"
    x = _cast(_inputs(shape_id), torch.float32)
    args, _ = _decode_case(shape_id)
    ref = _capped_reference(shape_id)["o"]
    for backend in ("reference", "torch", None):
        assert_close("o", ref, parallax_attention(**x, **SOFTCAP, backend=backend))
        assert_close("decode", ref[:, -1], parallax_decode(**_cast(args, torch.float32), **SOFTCAP, backend=backend))
    with pytest.raises(NotImplementedError, match="soft-capping .* use backend 'torch'"):
        parallax_attention(**x, **SOFTCAP, backend="triton")
    with pytest.raises(NotImplementedError, match="soft-capping .* use backend 'torch'"):
        parallax_decode(**args, **SOFTCAP, backend="triton")
