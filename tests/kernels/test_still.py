import functools
import math

import linearize.kernels.still as still_mod
import linearize.kernels.still.chunk as still_chunk
import pytest
import torch
from linearize.kernels.still import (
    chunk_self_saliency,
    chunk_still_attention,
    naive_self_saliency,
    naive_still_attention,
    select_salient,
    self_saliency,
    still_attention,
)

from tests.kernels._close import BF16_RATIO, assert_close

# (B, T, H, Hkv, D, chunk_size)
SHAPES = {
    "T37-C8-H4-Hkv2": (2, 37, 4, 2, 64, 8),
    "T70-C16-H2-Hkv2": (1, 70, 2, 2, 64, 16),
    "T40-C8-H2-Hkv1-D128": (1, 40, 2, 1, 128, 8),
}
ATTENTION = {"reference": naive_still_attention, "torch": chunk_still_attention}
FLOAT_INPUTS = ("q", "k", "v", "q_feat", "k_feat", "gate")


def _lengths(B: int, T: int) -> list[int]:
    """Valid length of each batch row under trailing padding."""
    return [T - (1 + b) * T // 5 for b in range(B)]


def _features(*shape: int) -> torch.Tensor:
    """Positive NP-Map-like features [softmax(u), softmax(-u)]."""
    u = torch.randn(*shape[:-1], shape[-1] // 2)
    return torch.cat([u.softmax(-1), (-u).softmax(-1)], dim=-1)


def _inputs(shape_id: str, pad: bool) -> dict:
    B, T, H, Hkv, D, C = SHAPES[shape_id]
    torch.manual_seed(0)
    x = {
        "q": torch.randn(B, T, H, D),
        "k": torch.randn(B, T, Hkv, D),
        "v": torch.randn(B, T, Hkv, D),
        "q_feat": _features(B, T, H, 2 * D),
        "k_feat": _features(B, T, H, 2 * D),
        "gate": torch.rand(B, T, H, D),
        "salient": torch.rand(B, T, H) < 0.25,
        "chunk_size": C,
    }
    if pad:
        x["key_valid"] = torch.arange(T) < torch.tensor(_lengths(B, T))[:, None]
    return x


def _run(fn, inputs: dict, do: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """Output and the gradient of (o * do).sum() for every float input; do random by default, zero at invalid
    queries."""
    leaves = {name: x.clone().requires_grad_() if name in FLOAT_INPUTS else x for name, x in inputs.items()}
    o = fn(**leaves)
    if do is None:
        do = torch.randn(o.shape, generator=torch.Generator().manual_seed(1))
    if inputs.get("key_valid") is not None:
        do = do * inputs["key_valid"][..., None, None]
    (o * do).sum().backward()
    return {"o": o} | {f"d{name}": leaves[name].grad for name in FLOAT_INPUTS}


@functools.cache
def _reference(shape_id: str, pad: bool) -> dict[str, torch.Tensor]:
    return _run(naive_still_attention, _inputs(shape_id, pad))


@pytest.mark.parametrize("pad", [False, True], ids=["all-valid", "trailing-pad"])
@pytest.mark.parametrize("shape_id", SHAPES)
def test_chunk_attention_matches_reference(shape_id, pad):
    ref = _reference(shape_id, pad)
    out = _run(chunk_still_attention, _inputs(shape_id, pad))
    for name in ref:
        assert_close(name, ref[name], out[name])


@pytest.mark.parametrize("chunks_per_block", [1, 3])
def test_chunk_attention_in_blocks_of_chunks_matches_reference(chunks_per_block):
    """A smaller logit budget takes the query chunks in several blocks: results and gradients do not change."""
    shape_id = "T37-C8-H4-Hkv2"
    B, T, H, Hkv, D, C = SHAPES[shape_id]
    # a chunk holds H * C * (2C + salient keys) logits: blocks of at most `chunks_per_block` of the 5 chunks
    blocked = functools.partial(chunk_still_attention, block_logits=chunks_per_block * H * C * 2 * C)
    ref = _reference(shape_id, True)
    out = _run(blocked, _inputs(shape_id, True))
    for name in ref:
        assert_close(name, ref[name], out[name])


def test_chunk_attention_saves_each_logit_once_for_backward():
    """Of the softmax logits (`[B, N, H, C, keys]`, window and salient apart) backward keeps the exponentials alone:
    the max that shifts them needs only where it lies. amax kept the masked logits too, a second copy of a layer's
    largest tensors, which grows with T^2 for the salient keys (52 of 379 MiB a layer for SmolLM2 at 4K tokens)."""
    shape_id = "T70-C16-H2-Hkv2"
    B, T, H, Hkv, D, C = SHAPES[shape_id]
    N = -(-T // C)
    x = {name: t.requires_grad_() if name in FLOAT_INPUTS else t for name, t in _inputs(shape_id, False).items()}
    logits = set()

    def keep(t: torch.Tensor) -> torch.Tensor:
        if t.is_floating_point() and t.shape[:4] == (B, N, H, C) and t.shape[-1] > 1:  # not the maxima
            logits.add(t.untyped_storage().data_ptr())
        return t

    with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t):
        chunk_still_attention(**x)
    assert len(logits) == 2  # the window's and the salient keys' exponentials


@pytest.mark.parametrize("pad", [False, True], ids=["all-valid", "trailing-pad"])
@pytest.mark.parametrize("shape_id", SHAPES)
def test_chunk_attention_without_autograd_matches_reference(shape_id, pad):
    """Without autograd the linear state is carried from chunk to chunk in place instead of prefix-summed: the
    same outputs, and padding (NaN in every input here) is never read."""
    x = _inputs(shape_id, pad)
    B, T = x["q"].shape[:2]
    valid = x.get("key_valid", torch.ones(B, T, dtype=torch.bool))
    for name in FLOAT_INPUTS:
        x[name] = x[name].masked_fill(~valid.view(B, T, 1, 1), float("nan"))
    with torch.no_grad():
        o = chunk_still_attention(**x)
    assert_close("o", _reference(shape_id, pad)["o"][valid], o[valid])


@pytest.mark.parametrize("shape_id", SHAPES)
def test_recurrent_linear_part_matches_the_prefix_sum(shape_id):
    """The inference form of the linear part against the differentiable one: numerators and normalizers."""
    B, T, H, Hkv, D, C = SHAPES[shape_id]
    x = _inputs(shape_id, pad=False)
    N = T // C
    args = [x[name][:, : N * C] for name in ("q_feat", "k_feat", "v", "gate")]
    linear_keys = ~x["salient"][:, : N * C]
    expected = still_chunk._linear_part(*args, linear_keys, C)
    got = still_chunk._linear_part_recurrent(*args, linear_keys, C)
    for name, ref, out in zip(("num", "den"), expected, got, strict=True):
        assert_close(name, ref, out)


@pytest.mark.parametrize("path", ATTENTION)
def test_padding_is_never_read(path):
    """NaN at padded positions of every input: outputs and gradients at valid positions equal the unpadded run's."""
    x = _inputs("T37-C8-H4-Hkv2", pad=True)
    valid = x["key_valid"]
    for name in FLOAT_INPUTS:
        x[name] = x[name].masked_fill(~valid.view(*valid.shape, 1, 1), float("nan"))
    do = torch.randn(x["gate"].shape)  # o is [B, T, H, Dv] like the gate
    out = _run(ATTENTION[path], x, do)
    assert out["o"].isfinite().all()
    for b, L in enumerate(_lengths(*valid.shape)):
        row = {name: t[b : b + 1, :L] if torch.is_tensor(t) else t for name, t in x.items() if name != "key_valid"}
        ref = _run(ATTENTION[path], row, do[b : b + 1, :L])
        for name, grad in out.items():
            assert_close(f"{name}[{b}]", ref[name][0], grad[b, :L])
            if name != "o":
                assert (grad[b, L:] == 0).all(), name


def _causal_softmax(q, k, v, key_valid=None):
    k, v = (t.repeat_interleave(q.shape[2] // k.shape[2], dim=2) for t in (k, v))
    z = torch.einsum("bthd,bjhd->bhtj", q, k) * q.shape[-1] ** -0.5
    T = q.shape[1]
    mask = torch.ones(T, T, dtype=torch.bool).tril()
    if key_valid is not None:
        mask = mask & key_valid[:, None, None, :]
    return torch.einsum("bhtj,bjhd->bthd", z.masked_fill(~mask, float("-inf")).softmax(-1), v)


@pytest.mark.parametrize("path", ATTENTION)
@pytest.mark.parametrize("case", ["all-salient", "one-chunk"])
def test_exact_cases_are_causal_softmax(path, case):
    """Every key in S_t (all salient, or one chunk holding the sequence): plain causal softmax attention."""
    x = _inputs("T37-C8-H4-Hkv2", pad=True)
    if case == "all-salient":
        x["salient"] = torch.ones_like(x["salient"])
    else:
        x["chunk_size"] = 64
    o = ATTENTION[path](**x)
    valid = x["key_valid"]
    assert_close("o", _causal_softmax(x["q"], x["k"], x["v"], valid)[valid], o[valid])


@pytest.mark.parametrize("path", ATTENTION)
def test_every_valid_key_counted_once(path):
    """With z = 0 (so e^(z - m) = 1), q_feat . k_feat = 1 and gate = 1, every key read weighs 1: o_t is the mean
    of the valid v_j, j <= t, whichever way each key is read."""
    x = _inputs("T70-C16-H2-Hkv2", pad=True)
    B, T, H, D = x["q"].shape
    x["q"] = torch.zeros_like(x["q"])
    x["q_feat"] = x["k_feat"] = torch.nn.functional.one_hot(torch.zeros(B, T, H, dtype=torch.long), 2 * D).float()
    x["gate"] = torch.ones_like(x["gate"])
    o = ATTENTION[path](**x, eps=0.0)
    valid = x["key_valid"]
    assert_close("o", _causal_softmax(x["q"], x["k"], x["v"], valid)[valid], o[valid])


def test_reference_attention_one_token_by_hand():
    """Query t = 17 of chunk 4 (C = 4) and head 1 (kv head 0), with the sets S_t and N_t listed explicitly."""
    x = _inputs("T37-C8-H4-Hkv2", pad=False)
    x = {name: t[:1, :20].double() if name in FLOAT_INPUTS else t for name, t in x.items()}
    x["salient"] = x["salient"][:1, :20]
    b, t, h, g, C = 0, 17, 1, 0, 4
    soft = [j for j in range(20) if (j // C <= 2 and x["salient"][b, j, h]) or j // C == 3 or 16 <= j <= t]
    lin = [j for j in range(20) if j // C <= 2 and not x["salient"][b, j, h]]
    assert sorted(soft + lin) == list(range(t + 1))
    q, k, v = x["q"][b, t, h], x["k"][b, :, g], x["v"][b, :, g]
    z = {j: float(q @ k[j]) / 8 for j in soft}
    m = max(z.values())
    w = {j: float(x["q_feat"][b, t, h] @ x["k_feat"][b, j, h]) for j in lin}
    num = sum(math.exp(z[j] - m) * v[j] for j in soft) + x["gate"][b, t, h] * sum(w[j] * v[j] for j in lin)
    den = sum(math.exp(z[j] - m) for j in soft) + sum(w.values()) + 1e-6
    o = naive_still_attention(**x | {"chunk_size": C})
    assert_close("o", num / den, o[b, t, h])


def _saliency_inputs(shape_id: str, pad: bool) -> dict:
    return {name: t for name, t in _inputs(shape_id, pad).items() if name in ("q", "k", "key_valid")}


@pytest.mark.parametrize(("window", "block_size"), [(8, 8), (16, 4), (64, 64)])
@pytest.mark.parametrize("pad", [False, True], ids=["all-valid", "trailing-pad"])
@pytest.mark.parametrize("shape_id", SHAPES)
def test_chunk_saliency_matches_reference(shape_id, pad, window, block_size):
    x = _saliency_inputs(shape_id, pad)
    ref = naive_self_saliency(**x, window=window)
    out = chunk_self_saliency(**x, window=window, block_size=block_size)
    assert out.dtype == torch.float32
    finite = ref.isfinite()
    assert torch.equal(finite, out.isfinite())
    assert (ref[~finite] == float("-inf")).all() and (out[~finite] == float("-inf")).all()
    torch.testing.assert_close(out[finite], ref[finite], rtol=1e-5, atol=1e-6)
    one_block_at_a_time = chunk_self_saliency(**x, window=window, block_size=block_size, block_logits=1)
    torch.testing.assert_close(one_block_at_a_time, out, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("backend", ["reference", "torch"])
def test_saliency_ignores_padding_and_is_detached(backend):
    x = _saliency_inputs("T37-C8-H4-Hkv2", pad=True)
    valid = x["key_valid"]
    nan = {name: x[name].masked_fill(~valid[..., None, None], float("nan")).requires_grad_() for name in ("q", "k")}
    scores = self_saliency(**nan, key_valid=valid, window=8, backend=backend)
    assert not scores.requires_grad
    assert (scores[~valid] == float("-inf")).all()
    for b, L in enumerate(_lengths(*valid.shape)):
        ref = self_saliency(x["q"][b : b + 1, :L], x["k"][b : b + 1, :L], window=8, backend=backend)
        torch.testing.assert_close(scores[b, :L], ref[0], rtol=1e-5, atol=1e-6)


def _smoothed_kl_by_hand(z: list[float], self_slot: int, window: int) -> float:
    """docs/methods.md §3.2 for one token, in plain Python: z are the logits of its window."""
    eps = 1e-8
    diag = [math.exp(zj) / sum(math.exp(zi) for zi in z) for zj in z]
    others = sum(math.exp(zi) for i, zi in enumerate(z) if i != self_slot)
    nodiag = [0.0 if i == self_slot or others == 0 else math.exp(zi) / others for i, zi in enumerate(z)]
    ad = [(a + eps) / (1 + window * eps) for a in diag]
    an = [(a + eps) / (1 + window * eps + 1 / window) for a in nodiag]
    an[self_slot] = 1 / window + eps
    return sum(d * math.log(d / (n + eps)) for d, n in zip(ad, an, strict=True))


@pytest.mark.parametrize("t", [0, 2, 9])
@pytest.mark.parametrize("backend", ["reference", "torch"])
def test_saliency_equals_formula_by_hand(backend, t):
    """Window 5 over 12 tokens with key 7 invalid: t = 9 sees 5, 6, 8, 9 and t = 2 a window shorter than l."""
    torch.manual_seed(0)
    q, k = torch.randn(1, 12, 2, 16, dtype=torch.float64), torch.randn(1, 12, 1, 16, dtype=torch.float64)
    valid = torch.arange(12)[None] != 7
    scores = self_saliency(q, k, window=5, key_valid=valid, backend=backend)
    keys = [j for j in range(t - 4, t + 1) if j >= 0 and j != 7]
    for h in range(2):
        z = [float(q[0, t, h] @ k[0, j, 0]) / 4 for j in keys]
        assert scores[0, t, h].item() == pytest.approx(_smoothed_kl_by_hand(z, keys.index(t), 5), rel=1e-5)


@pytest.mark.parametrize(("alpha", "expected"), [(1 / 64, 0.0), (0.2, 0.34), (0.5, 1.39), (0.9, 3.42)])
@pytest.mark.parametrize("backend", ["reference", "torch"])
def test_saliency_is_a_function_of_self_weight(backend, alpha, expected):
    """Last token of a full 64-window whose self weight a^diag_tt is alpha, the other 63 logits equal (§3.2)."""
    T, D = 64, 64
    q, k = torch.zeros(1, T, 1, D), torch.zeros(1, T, 1, D)
    k[0, :, 0, 1] = 1.0  # z = 0 against every other key
    k[0, -1, 0, 0] = 1.0
    q[0, -1, 0, 0] = math.log(alpha * (T - 1) / (1 - alpha))  # self logit, with scale 1
    score = self_saliency(q, k, window=64, scale=1.0, backend=backend)[0, -1, 0].item()
    assert score == pytest.approx(expected, rel=0.02, abs=1e-3)


@pytest.mark.parametrize("gap", [30.0, 200.0])
def test_saliency_holds_when_the_self_logit_dominates(gap):
    """The torch path's one exponential shifts by the other keys' max: a self logit 200 above them (where e^(z - m)
    over the whole window underflows in fp32 for every other key) still gives the float64 reference's score."""
    T, D = 64, 64
    q, k = torch.zeros(1, T, 1, D), torch.randn(1, T, 1, D) * 0.1
    k[0, -1, 0, 0] = 1.0
    q[0, -1, 0, 0] = gap  # self logit about `gap` above the others', with scale 1
    ref = naive_self_saliency(q.double(), k.double(), window=64, scale=1.0)[0, -1, 0].item()
    score = self_saliency(q, k, window=64, scale=1.0, backend="torch")[0, -1, 0].item()
    assert score == pytest.approx(ref, rel=1e-5) and score == pytest.approx(math.log(64), rel=1e-3)


def test_select_salient_keeps_highest_valid_per_chunk_and_head():
    scores = torch.tensor(
        [
            [3.0, 0.0],
            [1.0, 5.0],
            [2.0, float("-inf")],
            [0.5, 4.0],  # chunk 0 (rows 0..3): head 0 keeps 3 and 2, head 1 keeps 5 and 4
            [9.0, 1.0],
            [float("-inf"), 2.0],
            [-1.0, 3.0],
            [float("-inf"), float("-inf")],  # chunk 1: head 0 keeps 9 and -1, head 1 keeps 3 and 2
            [float("-inf"), 7.0],  # chunk 2 (short): head 0 has no valid token, head 1 keeps its only one
        ]
    )[None]
    expected = torch.tensor([[1, 0], [0, 1], [1, 0], [0, 1], [1, 0], [0, 1], [1, 1], [0, 0], [0, 1]], dtype=torch.bool)[
        None
    ]
    assert torch.equal(select_salient(scores, chunk_size=4, topk=2), expected)
    assert torch.equal(select_salient(scores, chunk_size=4, topk=4), scores.isfinite())


def _spy(fn, calls: list[str]):
    def spy(*args, **kwargs):
        calls.append(fn.__name__)
        return fn(*args, **kwargs)

    return spy


@pytest.mark.parametrize("backend", ["reference", "torch"])
def test_dispatch(monkeypatch, backend):
    """Saliency, selection and attention chained through each backend; both backends agree."""
    names = ["naive_self_saliency", "naive_still_attention"]
    if backend == "torch":
        names = ["chunk_self_saliency", "chunk_still_attention"]
    called = []
    for name in names:
        monkeypatch.setattr(still_mod, name, _spy(getattr(still_mod, name), called))
    x = _inputs("T37-C8-H4-Hkv2", pad=True)
    C = x["chunk_size"]
    scores = self_saliency(x["q"], x["k"], window=C, key_valid=x["key_valid"], backend=backend)
    x["salient"] = select_salient(scores, chunk_size=C, topk=2)
    o = still_attention(**x, backend=backend)
    assert called == names
    assert_close("o", naive_still_attention(**x), o)


@pytest.mark.parametrize(("backend", "error"), [("cuda-magic", ValueError), ("fla", NotImplementedError)])
def test_dispatch_rejects_unavailable_backend(backend, error):
    x = _inputs("T37-C8-H4-Hkv2", pad=False)
    with pytest.raises(error):
        still_attention(**x, backend=backend)
    with pytest.raises(error):
        self_saliency(x["q"], x["k"], backend=backend)


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"k": torch.randn(2, 37, 3, 64)}, "multiple of Hkv"),
        ({"v": torch.randn(2, 36, 2, 64)}, "expected v"),
        ({"k_feat": torch.randn(2, 37, 2, 128)}, "expected k_feat"),
        ({"gate": torch.randn(2, 37, 4, 32)}, "expected gate"),
        ({"salient": torch.ones(2, 37, 4)}, "salient of dtype"),
        ({"key_valid": torch.ones(2, 36, dtype=torch.bool)}, "expected key_valid"),
        ({"chunk_size": 0}, "chunk_size"),
    ],
    ids=["heads", "v", "k_feat", "gate", "salient-dtype", "key_valid", "chunk_size"],
)
def test_rejects_bad_arguments(change, match):
    with pytest.raises(ValueError, match=match):
        still_attention(**_inputs("T37-C8-H4-Hkv2", pad=False) | change)


def test_saliency_rejects_bad_window():
    x = _saliency_inputs("T37-C8-H4-Hkv2", pad=False)
    with pytest.raises(ValueError, match="window"):
        self_saliency(**x, window=0)


@pytest.mark.parametrize("grad", [True, False], ids=["autograd", "inference"])
@pytest.mark.parametrize("shape_id", ["T37-C8-H4-Hkv2", "T40-C8-H2-Hkv1-D128"])
def test_bf16_inputs(shape_id, grad):
    """bf16 inputs: the output and every gradient (or, without autograd, where the linear state is carried in
    place, the output) within `BF16_RATIO` of the oracle on the same inputs in float64; the saliency scores, fp32
    from bf16 inputs, within fp32 rounding."""
    x = _inputs(shape_id, pad=True)
    bf16 = {name: t.bfloat16() if name in FLOAT_INPUTS else t for name, t in x.items()}
    upcast = {name: t.double() if name in FLOAT_INPUTS else t for name, t in bf16.items()}
    ref = _run(naive_still_attention, upcast)
    if grad:
        out = _run(chunk_still_attention, bf16)
    else:
        with torch.no_grad():
            out = {"o": chunk_still_attention(**bf16)}
    valid = x["key_valid"]
    for name in out:
        assert out[name].dtype == torch.bfloat16, name
        rows = valid if name == "o" else slice(None)  # the output at padding is unspecified
        assert_close(name, ref[name][rows], out[name][rows].float(), ratio=BF16_RATIO)
    scores = chunk_self_saliency(bf16["q"], bf16["k"], window=8, key_valid=valid)
    expected = naive_self_saliency(upcast["q"], upcast["k"], window=8, key_valid=valid)
    assert_close("scores", expected[valid], scores[valid])


# Gemma 2's logit soft-capping: scale 0.5 puts the D = 64..128 scores at 4 standard deviations, beyond the cap
SOFTCAP = {"softcap": 2.0, "scale": 0.5}


@pytest.mark.parametrize("pad", [False, True], ids=["all-valid", "trailing-pad"])
@pytest.mark.parametrize("shape_id", SHAPES)
def test_softcap_chunk_attention_matches_reference(shape_id, pad):
    """Capped softmax logits (the linear part has none): output and every gradient equal the oracle's."""
    x = _inputs(shape_id, pad)
    ref = _run(functools.partial(naive_still_attention, **SOFTCAP), x)
    out = _run(functools.partial(chunk_still_attention, **SOFTCAP), x)
    for name in ref:
        assert_close(name, ref[name], out[name])
    uncapped = naive_still_attention(**x, scale=SOFTCAP["scale"])
    assert (uncapped - ref["o"]).abs().amax() > 0.1  # the cap matters


def test_softcap_padding_is_never_read():
    """NaN at padded positions: the capped torch path stays finite, and equals the oracle on the valid rows."""
    x = _inputs("T37-C8-H4-Hkv2", pad=True)
    valid = x["key_valid"]
    ref = _run(functools.partial(naive_still_attention, **SOFTCAP), x)
    for name in FLOAT_INPUTS:
        x[name] = x[name].masked_fill(~valid.view(*valid.shape, 1, 1), float("nan"))
    out = _run(functools.partial(chunk_still_attention, **SOFTCAP), x)
    for name, grad in out.items():
        assert grad.isfinite().all(), name
        assert_close(name, ref[name][valid], grad[valid])


def test_softcap_dispatch(monkeypatch):
    monkeypatch.delenv("LINEARIZE_BACKEND", raising=False)
    x = _inputs("T37-C8-H4-Hkv2", pad=True)
    ref = naive_still_attention(**x, **SOFTCAP)
    for backend in ("reference", "torch", None):
        assert_close("o", ref, still_attention(**x, **SOFTCAP, backend=backend))
    with pytest.raises(NotImplementedError, match="soft-capping .* use backend 'torch'"):
        still_attention(**x, **SOFTCAP, backend="triton")
