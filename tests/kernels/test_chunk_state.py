"""The shared chunk-state recurrence (`linearize.kernels.common.chunk_state`) against a token-by-token float64
oracle: the states and normalizers entering every chunk, the final state, and the backward's gradients of the state
(and normalizer) leaving every chunk, taken by autograd through zero probes added to those states.

GLA's use (gated, the queries of a chunk read the state entering it) and STILL's (ungated, a key mask, a normalizer,
the queries of a chunk read the state entering the previous one) both run, with GQA, on rows of T tokens and on
packed sequences; the chunk is never a divisor of T.
"""

import pytest
import torch
import torch.nn.functional as F
from linearize.kernels.common.chunk_state import chunk_layout, chunk_local_cumsum, chunk_state_grads, chunk_states

from tests.kernels._close import assert_close
from tests.kernels._devices import TRITON_DEVICE, needs_triton_device

pytestmark = [pytest.mark.triton, needs_triton_device]

C = 16  # chunk size


def _oracle(k, v, g, mask, q, do, w, h0, dht, lag, scale):
    """One sequence (leading dim 1): the states entering each chunk [NC, HS, K, V], normalizers [NC, HS, K], the
    final state, and the gradients of the loss sum_t <scale * (q_t exp(b_t))^T S, do_t> + sum_t w_t q_t . N + <S_T,
    dht> w.r.t. the state and normalizer leaving each chunk, and the initial state."""
    T, HS, K = k.shape[1:]
    HQ, V = q.shape[2], v.shape[3]
    G, Gv = HQ // HS, HS // v.shape[2]
    NC = -(-T // C)
    x = [t.double()[0] for t in (k, v, q, do)]
    k, v, q, do = x
    g = torch.zeros_like(k) if g is None else g.double()[0]
    mask = torch.ones(T, HS, dtype=torch.bool) if mask is None else mask[0]
    w = torch.zeros(T, HQ, dtype=torch.float64) if w is None else w.double()[0]
    probes = torch.zeros(NC, HS, K, V, dtype=torch.float64, requires_grad=True)
    probes_n = torch.zeros(NC, HS, K, dtype=torch.float64, requires_grad=True)
    S0 = torch.zeros(HS, K, V, dtype=torch.float64) if h0 is None else h0.double()[0]
    S0 = S0.clone().requires_grad_()
    S, N = S0, torch.zeros(HS, K, dtype=torch.float64)
    entering, entering_n = [], []
    for c in range(NC):
        entering.append(S)
        entering_n.append(N)
        for t in range(c * C, min(c * C + C, T)):
            kt = k[t] * mask[t, :, None]
            S = torch.exp(g[t])[..., None] * S + kt[..., None] * v[t].repeat_interleave(Gv, 0)[:, None, :]
            N = torch.exp(g[t]) * N + kt
        S, N = S + probes[c], N + probes_n[c]
    loss = (S * (0 if dht is None else dht.double()[0])).sum() + (N * 0).sum()
    for t in range(T):
        c = t // C - lag
        if c < 0:
            continue
        b_t = g[(t // C) * C : t + 1].sum(0)  # cumulative decay within the query's chunk
        qd = q[t] * torch.exp(b_t).repeat_interleave(G, 0)
        state = entering[c].repeat_interleave(G, 0)  # [HQ, K, V]
        loss = loss + scale * torch.einsum("hk,hkv,hv->", qd, state, do[t])
        loss = loss + torch.einsum("h,hk,hk->", w[t], qd, entering_n[c].repeat_interleave(G, 0))
    loss.backward()
    return torch.stack([e.detach() for e in entering]), torch.stack(entering_n), S.detach(), probes.grad, \
        probes_n.grad, S0.grad  # fmt: skip


CASES = {
    # GLA: gated, GQA 4/2, queries read the state entering their chunk
    "gla-T37-H4-HS2": dict(T=37, HQ=4, HS=2, HV=2, K=16, V=32, gate=True, mask=False, lag=0, normalizer=False),
    "gla-T19-K24-V80": dict(T=19, HQ=2, HS=1, HV=1, K=24, V=80, gate=True, mask=False, lag=0, normalizer=False),
    # head dim 128: the state in two K and two V tiles of 64, carried over two chunk boundaries
    "gla-T37-H2-HS1-K128-V128": dict(
        T=37, HQ=2, HS=1, HV=1, K=128, V=128, gate=True, mask=False, lag=0, normalizer=False
    ),
    # STILL: ungated, masked keys, normalizer, state heads per query head over fewer value heads, lag 1
    "still-T50-HS4-HV2": dict(T=50, HQ=4, HS=4, HV=2, K=32, V=16, gate=False, mask=True, lag=1, normalizer=True),
}


def _inputs(case: dict, N: int, seed: int = 0) -> dict:
    torch.manual_seed(seed)
    T, HQ, HS, HV, K, V = (case[n] for n in ("T", "HQ", "HS", "HV", "K", "V"))
    x = {
        "k": torch.randn(N, T, HS, K),
        "v": torch.randn(N, T, HV, V),
        "q": torch.randn(N, T, HQ, K),
        "do": torch.randn(N, T, HQ, V),
        "g": F.logsigmoid(torch.randn(N, T, HS, K) * 4) / 8 if case["gate"] else None,
        "mask": torch.rand(N, T, HS) > 0.3 if case["mask"] else None,
        "w": torch.randn(N, T, HQ) if case["normalizer"] else None,
        "h0": None if case["lag"] else torch.randn(N, HS, K, V),
        "dht": None if case["lag"] else torch.randn(N, HS, K, V),
    }
    return x


def _run(x: dict, case: dict, cu_seqlens=None):
    """The kernels on the Triton device; the states and gradients back on the CPU, with the layout."""
    x = {name: None if t is None else t.to(TRITON_DEVICE) for name, t in x.items()}
    cu_seqlens = None if cu_seqlens is None else cu_seqlens.to(TRITON_DEVICE)
    B, T = x["k"].shape[:2]
    layout = chunk_layout(B, T, C, cu_seqlens, TRITON_DEVICE)
    b = None if x["g"] is None else chunk_local_cumsum(x["g"], layout)
    h, hn, ht = chunk_states(
        x["k"], x["v"], b, layout, key_mask=x["mask"], initial_state=x["h0"], output_final_state=True,
        normalizer=case["normalizer"],
    )  # fmt: skip
    dh, dhn, dh0 = chunk_state_grads(
        x["q"], x["do"], b, layout, state_heads=case["HS"], scale=0.5, lag=case["lag"], query_weight=x["w"],
        final_state_grad=x["dht"], initial_state_grad=x["h0"] is not None,
    )  # fmt: skip
    return *(None if t is None else t.cpu() for t in (h, hn, ht, dh, dhn, dh0)), layout


def _check(out, ref, chunks: slice, sequence: int):
    h, hn, ht, dh, dhn, dh0, _ = out
    r_h, r_hn, r_ht, r_dh, r_dhn, r_dh0 = ref
    assert_close("states", r_h, h[chunks])
    assert_close("final state", r_ht, ht[sequence])
    assert_close("state gradients", r_dh, dh[chunks])
    if hn is not None:
        assert_close("normalizers", r_hn, hn[chunks])
        assert_close("normalizer gradients", r_dhn, dhn[chunks])
    if dh0 is not None:
        assert_close("initial state gradient", r_dh0, dh0[sequence])


def _oracle_row(x: dict, case: dict, n: int, rows: slice = slice(None)):
    one = {name: None if t is None else t[n : n + 1] if name in ("h0", "dht") else t[n : n + 1, rows]
           for name, t in x.items()}  # fmt: skip
    return _oracle(one["k"], one["v"], one["g"], one["mask"], one["q"], one["do"], one["w"], one["h0"], one["dht"],
                   case["lag"], 0.5)  # fmt: skip


@pytest.mark.parametrize("case_id", CASES)
def test_rows_match_the_oracle(case_id):
    case = CASES[case_id]
    x = _inputs(case, N=2)
    out = _run(x, case)
    NC = -(-case["T"] // C)
    for n in range(2):
        _check(out, _oracle_row(x, case, n), slice(n * NC, (n + 1) * NC), n)


@pytest.mark.parametrize("case_id", CASES)
def test_packed_sequences_restart_at_every_boundary(case_id):
    case = CASES[case_id]
    lengths = [case["T"], 5, 2 * C]
    x = _inputs(case | {"T": sum(lengths)}, N=1)
    for name in ("h0", "dht"):
        if x[name] is not None:
            x[name] = torch.randn(len(lengths), *x[name].shape[1:])
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()])
    out = _run(x, case, cu_seqlens=cu)
    chunk = 0
    for n, (start, end) in enumerate(zip(cu[:-1].tolist(), cu[1:].tolist(), strict=True)):
        one = {name: None if t is None else t[n : n + 1] if name in ("h0", "dht") else t[:, start:end]
               for name, t in x.items()}  # fmt: skip
        NC = -(-(end - start) // C)
        ref = _oracle(one["k"], one["v"], one["g"], one["mask"], one["q"], one["do"], one["w"], one["h0"],
                      one["dht"], case["lag"], 0.5)  # fmt: skip
        _check(out, ref, slice(chunk, chunk + NC), n)
        chunk += NC
    assert chunk == out[-1].total_chunks


def test_a_lagged_read_has_no_decay():
    x = {name: t.to(TRITON_DEVICE) for name, t in _inputs(CASES["gla-T37-H4-HS2"], N=1).items() if t is not None}
    layout = chunk_layout(1, 37, C, None, TRITON_DEVICE)
    with pytest.raises(ValueError, match="no decay"):
        chunk_state_grads(x["q"], x["do"], chunk_local_cumsum(x["g"], layout), layout, state_heads=2, lag=1)
