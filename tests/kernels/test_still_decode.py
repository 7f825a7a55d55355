"""The STILL decode step (`still_decode`): the torch path against the fp32 reference, output and every cache tensor,
at steps that fold a chunk out of the ring and steps that do not; and decoding from an empty cache against the
sequence oracle, whose last row each step must be."""

import linearize.kernels.still as still_mod
import pytest
import torch
from linearize.kernels.still import (
    StillDecodeState,
    naive_self_saliency,
    naive_still_attention,
    naive_still_decode,
    select_salient,
    still_decode,
    torch_still_decode,
)

from tests.kernels._close import BF16_RATIO, assert_close
from tests.kernels._devices import TRITON_DEVICE, needs_triton_device

# (B, H, Hkv, D, chunk_size, topk)
SHAPES = {
    "H4-Hkv2-D64-C4-k2": (3, 4, 2, 64, 4, 2),
    "H3-Hkv1-D128-C3-k1": (3, 3, 1, 128, 3, 1),  # a group of 3 query heads, nothing a power of two but D
    "H2-Hkv2-D64-C5-k5": (2, 2, 2, 64, 5, 5),  # topk = C: every folded token stays exact, the state stays empty
}


def k_features(x: torch.Tensor) -> torch.Tensor:
    """Positive NP-Map-like features [softmax(x / 4), softmax(-x / 4)], token by token: `[..., D]` -> `[..., 2D]`."""
    return torch.cat([(x.float() / 4).softmax(-1), (-x.float() / 4).softmax(-1)], dim=-1).to(x.dtype)


def _empty_cache(shape_id: str, dtype: torch.dtype) -> StillDecodeState:
    B, H, Hkv, D, C, _ = SHAPES[shape_id]
    return StillDecodeState(
        ring_k=torch.zeros(B, 2 * C, Hkv, D, dtype=dtype),
        ring_v=torch.zeros(B, 2 * C, Hkv, D, dtype=dtype),
        ring_score=torch.zeros(B, 2 * C, H),
        ring_valid=torch.zeros(B, 2 * C, dtype=torch.bool),
        chunk_q=torch.zeros(B, C, H, D, dtype=dtype),
        salient_k=torch.zeros(B, H, 0, D, dtype=dtype),
        salient_v=torch.zeros(B, H, 0, D, dtype=dtype),
        salient_valid=torch.zeros(B, 0, dtype=torch.bool),
        state=torch.zeros(B, H, 2 * D, D),
        normalizer=torch.zeros(B, H, 2 * D),
        real_tokens=torch.zeros(B, dtype=torch.long),
    )


def _tokens(shape_id: str, T: int, dtype: torch.dtype = torch.float32, pad: bool = True) -> dict:
    """T decode steps of inputs `[B, T, ...]`. With `pad`, row 1 starts with 2 padding tokens and row 2 has 3 in
    the middle, where its next real token would complete a chunk and fold the oldest (a padding step there must do
    neither), so rows fold their chunks at different steps."""
    B, H, Hkv, D, C, _ = SHAPES[shape_id]
    gen = torch.Generator().manual_seed(0)

    def randn(*shape):
        return torch.randn(shape, generator=gen).to(dtype)

    valid = torch.ones(B, T, dtype=torch.bool)
    if pad:
        valid[1, :2] = False
        valid[2:, 2 * C : 2 * C + 3] = False
    q = randn(B, T, H, D)
    return {
        "q": q,
        "k": randn(B, T, Hkv, D),
        "v": randn(B, T, Hkv, D),
        "q_feat": k_features(q),
        "gate": torch.rand(B, T, H, D, generator=gen).to(dtype),
        "valid": valid,
    }


def _step(fn, tokens: dict, t: int, cache: StillDecodeState, shape_id: str, **kwargs):
    """One step of `fn` on a copy of `cache` (the torch path updates its cache in place)."""
    *_, C, topk = SHAPES[shape_id]
    x = {name: tensor[:, t] for name, tensor in tokens.items()}
    cache = StillDecodeState(*(tensor.clone() for tensor in cache))
    return fn(**x, cache=cache, k_features=k_features, chunk_size=C, topk=topk, **kwargs)


def _check(ref: tuple, out: tuple, ratio: float) -> None:
    """Output and every cache tensor; salient slots a row has not filled hold anything."""
    assert_close("o", ref[0].float(), out[0].float(), ratio)
    assert out[0].dtype == ref[0].dtype
    filled = ref[1].salient_valid[:, None, :, None]
    for name, a, b in zip(StillDecodeState._fields, ref[1], out[1], strict=True):
        assert a.dtype == b.dtype, name
        if name in ("salient_k", "salient_v"):
            a, b = a * filled, b * filled
        if a.dtype == torch.bool or name == "real_tokens":
            assert torch.equal(a, b), name
        else:
            assert_close(name, a.float(), b.float(), ratio)


@pytest.mark.parametrize(
    "shape_id, dtype, ratio",
    [pytest.param(s, torch.float32, 1e-4, id=s) for s in SHAPES]
    + [pytest.param("H4-Hkv2-D64-C4-k2", torch.bfloat16, BF16_RATIO, id="H4-Hkv2-D64-C4-k2-bf16")],
)
def test_torch_matches_reference(shape_id, dtype, ratio):
    """Steps from an empty cache on the torch path; at every step (those that score a finished chunk or fold one in
    some rows included) the reference from the same cache gives the same output and cache. Padding steps leave
    their row's cache as it is."""
    *_, C, topk = SHAPES[shape_id]
    tokens = _tokens(shape_id, 3 * C + 2, dtype)
    cache, folded = _empty_cache(shape_id, dtype), []
    for t in range(tokens["q"].shape[1]):
        out = _step(torch_still_decode, tokens, t, cache, shape_id)
        folded.append(out[1].salient_k.shape[2] - cache.salient_k.shape[2])
        _check(_step(naive_still_decode, tokens, t, cache, shape_id), out, ratio)
        padding = ~tokens["valid"][:, t]
        for before, after in zip(cache, out[1], strict=True):
            if after.shape == before.shape:
                assert torch.equal(after[padding], before[padding])
        cache = out[1]
    assert set(folded) == {0, topk}  # steps that folded a chunk and steps that did not
    real = tokens["valid"].sum(1)
    assert torch.equal(cache.real_tokens, real)
    # every chunk but the last two left the ring, with topk exact tokens per head each
    assert torch.equal(cache.salient_valid.sum(1), topk * ((real - 1) // C - 1))
    if topk == C:
        assert not cache.state.any()  # every folded token exact: nothing went into the state


@pytest.mark.parametrize("shape_id", SHAPES)
def test_decoding_is_the_last_row_of_the_sequence_op(shape_id):
    """The reference decoding from an empty cache: step t outputs what `still_attention` gives query t over the
    whole sequence, with the salient tokens `select_salient` picks from `self_saliency` over a window of one chunk."""
    _, H, Hkv, D, C, topk = SHAPES[shape_id]
    tokens = {name: x[:1] for name, x in _tokens(shape_id, 3 * C + 2, pad=False).items()}  # one row
    q, k = tokens["q"], tokens["k"]
    salient = select_salient(naive_self_saliency(q, k, window=C), chunk_size=C, topk=topk)
    expected = naive_still_attention(
        q, k, tokens["v"], tokens["q_feat"], k_features(k.repeat_interleave(H // Hkv, dim=2)), tokens["gate"],
        salient, chunk_size=C,
    )  # fmt: skip
    cache = StillDecodeState(*(x[:1] for x in _empty_cache(shape_id, torch.float32)))
    for t in range(q.shape[1]):
        o, cache = _step(naive_still_decode, tokens, t, cache, shape_id)
        assert_close(f"o[{t}]", expected[:, t], o)


def test_dispatch(monkeypatch):
    shape_id = "H4-Hkv2-D64-C4-k2"
    tokens, cache = _tokens(shape_id, 1), _empty_cache(shape_id, torch.float32)
    ref = _step(naive_still_decode, tokens, 0, cache, shape_id, scale=0.3, eps=1e-3)
    for backend in ("reference", "torch"):
        _check(ref, _step(still_decode, tokens, 0, cache, shape_id, scale=0.3, eps=1e-3, backend=backend), 1e-4)

    calls = []
    monkeypatch.setattr(still_mod, "torch_still_decode", lambda *a, **kw: calls.append("torch") or ref)
    monkeypatch.setattr(still_mod, "naive_still_decode", lambda *a, **kw: calls.append("reference") or ref)
    monkeypatch.delenv("LINEARIZE_BACKEND", raising=False)
    _step(still_decode, tokens, 0, cache, shape_id)  # CPU default
    monkeypatch.setenv("LINEARIZE_BACKEND", "reference")
    _step(still_decode, tokens, 0, cache, shape_id)
    _step(still_decode, tokens, 0, cache, shape_id, backend="torch")  # the argument wins over the environment
    assert calls == ["torch", "reference", "torch"]


@pytest.mark.parametrize(
    "name, bad, message",
    [
        ("k", lambda x: x[:, :, :1].repeat(1, 1, 3, 1), "H a multiple of Hkv"),
        ("gate", lambda x: x[..., :8], "expected gate"),
        ("valid", lambda x: x.long(), "valid of dtype torch.bool"),
        ("ring_k", lambda x: x[:, 1:], "expected ring_k"),
        ("chunk_q", lambda x: x[:, 1:], "expected chunk_q"),
        ("state", lambda x: x[..., :8], "expected state"),
    ],
)
def test_bad_inputs_raise(name, bad, message):
    shape_id = "H4-Hkv2-D64-C4-k2"
    tokens, cache = _tokens(shape_id, 1), _empty_cache(shape_id, torch.float32)
    if name in StillDecodeState._fields:
        cache = cache._replace(**{name: bad(getattr(cache, name))})
    else:
        tokens[name] = bad(tokens[name])
    with pytest.raises(ValueError, match=message):
        _step(still_decode, tokens, 0, cache, shape_id, backend="reference")


def test_topk_beyond_the_chunk_raises():
    shape_id = "H4-Hkv2-D64-C4-k2"
    x = {name: tensor[:, 0] for name, tensor in _tokens(shape_id, 1).items()}
    with pytest.raises(ValueError, match="1 <= topk <= chunk_size"):
        still_decode(**x, cache=_empty_cache(shape_id, torch.float32), k_features=k_features, chunk_size=4, topk=5)


@pytest.mark.triton
@needs_triton_device
def test_triton_backend_selects_with_the_kernel():
    """The "triton" backend runs the torch step with the Triton top-k selection: the same steps as the reference."""
    shape_id = "H4-Hkv2-D64-C4-k2"
    C = SHAPES[shape_id][4]
    tokens = _tokens(shape_id, 2 * C + 1)
    cache = _empty_cache(shape_id, torch.float32)
    for t in range(2 * C):
        cache = _step(torch_still_decode, tokens, t, cache, shape_id)[1]
    ref = _step(naive_still_decode, tokens, 2 * C, cache, shape_id)  # row 0 folds its first chunk
    tokens = {name: x.to(TRITON_DEVICE) for name, x in tokens.items()}
    cache = StillDecodeState(*(x.to(TRITON_DEVICE) for x in cache))
    o, new = _step(still_decode, tokens, 2 * C, cache, shape_id, backend="triton")
    _check(ref, (o.cpu(), StillDecodeState(*(x.cpu() for x in new))), 1e-4)
    assert new.salient_valid.any()


# Gemma 2's logit soft-capping: scale 0.5 puts the D = 64..128 scores at 4 standard deviations, beyond the cap
SOFTCAP = {"softcap": 2.0, "scale": 0.5}


@pytest.mark.parametrize("shape_id", SHAPES)
def test_softcap_torch_matches_reference(shape_id):
    """Capped softmax logits: at every step from an empty cache, the torch step's output and cache equal the
    reference's from the same cache (the saliency scores, uncapped, included), and the cap matters."""
    C = SHAPES[shape_id][4]
    tokens = _tokens(shape_id, 3 * C + 2)
    cache, effect = _empty_cache(shape_id, torch.float32), 0.0
    for t in range(tokens["q"].shape[1]):
        out = _step(torch_still_decode, tokens, t, cache, shape_id, **SOFTCAP)
        _check(_step(naive_still_decode, tokens, t, cache, shape_id, **SOFTCAP), out, 1e-4)
        uncapped = _step(naive_still_decode, tokens, t, cache, shape_id, scale=SOFTCAP["scale"])
        effect = max(effect, (uncapped[0] - out[0]).abs().amax().item())
        assert_close("ring_score", uncapped[1].ring_score, out[1].ring_score)  # the score is never capped
        cache = out[1]
    assert cache.salient_valid.any()
    assert effect > 0.1  # the cap matters


@pytest.mark.parametrize("shape_id", ["H4-Hkv2-D64-C4-k2", "H3-Hkv1-D128-C3-k1"])
def test_softcap_decoding_is_the_last_row_of_the_sequence_op(shape_id):
    """Decoding with a cap from an empty cache, torch path: step t outputs what the capped `still_attention` gives
    query t, with the salient tokens of the uncapped `self_saliency` (prefill and decode rank tokens alike)."""
    _, H, Hkv, D, C, topk = SHAPES[shape_id]
    tokens = {name: x[:1] for name, x in _tokens(shape_id, 3 * C + 2, pad=False).items()}  # one row
    q, k = tokens["q"], tokens["k"]
    salient = select_salient(naive_self_saliency(q, k, window=C, scale=SOFTCAP["scale"]), chunk_size=C, topk=topk)
    expected = naive_still_attention(
        q, k, tokens["v"], tokens["q_feat"], k_features(k.repeat_interleave(H // Hkv, dim=2)), tokens["gate"],
        salient, chunk_size=C, **SOFTCAP,
    )  # fmt: skip
    cache = StillDecodeState(*(x[:1] for x in _empty_cache(shape_id, torch.float32)))
    for t in range(q.shape[1]):
        o, cache = _step(torch_still_decode, tokens, t, cache, shape_id, **SOFTCAP)
        assert_close(f"o[{t}]", expected[:, t], o)


def test_softcap_dispatch():
    """Every backend takes a cap: the "triton" step is the torch one (only its top-k selection is a kernel)."""
    shape_id = "H4-Hkv2-D64-C4-k2"
    tokens, cache = _tokens(shape_id, 1), _empty_cache(shape_id, torch.float32)
    ref = _step(naive_still_decode, tokens, 0, cache, shape_id, **SOFTCAP)
    for backend in ("reference", "torch", None):
        _check(ref, _step(still_decode, tokens, 0, cache, shape_id, **SOFTCAP, backend=backend), 1e-4)
    with pytest.raises(ValueError, match="softcap must be None or > 0"):
        _step(still_decode, tokens, 0, cache, shape_id, softcap=0.0)
