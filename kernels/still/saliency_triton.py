"""STILL self-saliency scores in Triton (forward only: the score feeds a discrete selection and is detached).

One program per (block of BQ queries, batch row * query head) reads the keys the block's windows reach, in tiles of
BQ, twice (query head h reads key head h // (H // Hkv); K is never repeated):
1. online sums, in the log2 domain, of the window softmax with the self key (max m, sum l) and without it (m', l'),
   each with its own max, so a dominant self logit cannot underflow the sum of the others;
2. with a^diag_tj = 2^(z_tj - m) / l and a^nodiag_tj = 2^(z_tj - m') / l', the smoothed KL of `smoothed_self_kl`
   (docs/methods.md §3.2, quirk Q1 fixed): ad = (a^diag + eps) / (1 + l eps), and = (a^nodiag + eps) /
   (1 + l eps + 1/l) with the true self slot set to 1/l + eps, S_t = sum over the window of ad log(ad / (and + eps)).
Scores are fp32, -inf at invalid queries; the window counts only valid keys, but l stays the nominal window. The
logits multiply q and k in their (the model's) dtype into fp32; the running sums are the shared online softmax's
(`common.tiles`).
"""

import torch
import triton
import triton.language as tl

from ..common.launch import LOG2E, as_bytes, autotune, dot_precision, element_size, pow2
from ..common.tiles import NEG_INIT, band, load_rows, online_softmax, valid_rows
from .reference import SALIENCY_EPS, check_saliency_inputs


@triton.jit
def _window_logits(b_q, k, key_valid, b64, o_t, s0, o_s, T, reach, HKV: tl.constexpr, i_hk, o_d, m_d, qk_scale,
                   D: tl.constexpr, HAS_KEY_VALID: tl.constexpr, DOT_PREC: tl.constexpr):  # fmt: skip
    """Logits `[BQ, BQ]` (log2 domain, fp32) of the queries against key rows s0 + o_s, which keys lie in each
    query's window, and which key is the query itself."""
    rows = s0 + o_s
    ok = valid_rows(key_valid, b64, rows, T, HAS_KEY_VALID)
    b_k = load_rows(k, b64, rows, ok, T, HKV, i_hk, o_d, m_d, D)  # [BQ, BD]
    b_z = tl.dot(b_q, tl.trans(b_k), input_precision=DOT_PREC) * qk_scale
    return b_z, ok[None, :] & band(o_t, rows, reach), rows[None, :] == o_t[:, None]


def _saliency_shared(args: dict) -> int:
    # the key tile streamed per stage, the query tile, the fp32 logits' layout conversion
    e, BQ, BD = element_size(args["q"]), args["BQ"], args["BD"]
    return args["num_stages"] * BQ * BD * e + BQ * BD * e + BQ * BQ * 4


@autotune(
    [
        triton.Config({}, num_warps=4, num_stages=2),
        triton.Config({}, num_warps=4, num_stages=3),
        triton.Config({}, num_warps=8, num_stages=2),
    ],
    key=["D", "BQ"],
    shared_estimate=_saliency_shared,
)
@triton.jit(do_not_specialize=["T", "reach"])
def still_saliency_kernel(
    q,  # [B, T, H, D]
    k,  # [B, T, HKV, D]
    key_valid,  # [B, T] uint8
    scores,  # [B, T, H] fp32
    qk_scale,  # scale * log2(e)
    window,  # l as a float: the smoothing constant
    eps,
    T,
    reach,  # min(window, T): keys a query reaches back, itself included
    H: tl.constexpr,
    HKV: tl.constexpr,
    G: tl.constexpr,
    D: tl.constexpr,
    BQ: tl.constexpr,
    BD: tl.constexpr,
    HAS_KEY_VALID: tl.constexpr,
    DOT_PREC: tl.constexpr,
):
    i_m, i_bh = tl.program_id(0), tl.program_id(1)
    i_b, i_h = i_bh // H, i_bh % H
    i_hk = i_h // G
    b64 = i_b.to(tl.int64)
    t0 = i_m * BQ
    o_s = tl.arange(0, BQ)
    o_t = t0 + o_s
    t_ok = valid_rows(key_valid, b64, o_t, T, HAS_KEY_VALID)
    o_d = tl.arange(0, BD)
    m_d = o_d < D
    b_q = load_rows(q, b64, o_t, t_ok, T, H, i_h, o_d, m_d, D)  # [BQ, BD]
    first = tl.maximum(t0 - reach + 1, 0)
    last = tl.minimum(t0 + BQ, T)

    # pass 1: max and sum of the window softmax with the query's own key (m_self, l_self) and without (m_rest, l_rest)
    m_self = tl.full([BQ], NEG_INIT, dtype=tl.float32)
    l_self = tl.zeros([BQ], dtype=tl.float32)
    m_rest = tl.full([BQ], NEG_INIT, dtype=tl.float32)
    l_rest = tl.zeros([BQ], dtype=tl.float32)
    for s0 in range(first, last, BQ):
        b_z, win, is_self = _window_logits(
            b_q, k, key_valid, b64, o_t, s0, o_s, T, reach, HKV, i_hk, o_d, m_d, qk_scale, D, HAS_KEY_VALID, DOT_PREC
        )
        _, _, m_self, l_self = online_softmax(b_z, win, m_self, l_self)
        _, _, m_rest, l_rest = online_softmax(b_z, win & ~is_self, m_rest, l_rest)

    # pass 2: the smoothed KL; a window holding only the query itself has l_rest == 0 and no other key
    l_self = tl.where(l_self > 0, l_self, 1.0)
    l_rest = tl.where(l_rest > 0, l_rest, 1.0)
    norm_diag = 1.0 + window * eps
    norm_nodiag = norm_diag + 1.0 / window
    b_s = tl.zeros([BQ], dtype=tl.float32)
    for s0 in range(first, last, BQ):
        b_z, win, is_self = _window_logits(
            b_q, k, key_valid, b64, o_t, s0, o_s, T, reach, HKV, i_hk, o_d, m_d, qk_scale, D, HAS_KEY_VALID, DOT_PREC
        )
        ad = (tl.exp2(tl.where(win, b_z - m_self[:, None], float("-inf"))) / l_self[:, None] + eps) / norm_diag
        rest = win & ~is_self
        an = (tl.exp2(tl.where(rest, b_z - m_rest[:, None], float("-inf"))) / l_rest[:, None] + eps) / norm_nodiag
        an = tl.where(is_self, 1.0 / window + eps, an)
        b_s += tl.sum(tl.where(win, ad * tl.log(ad / (an + eps)), 0.0), 1)
    tl.store(scores + (b64 * T + o_t) * H + i_h, tl.where(t_ok, b_s, float("-inf")), mask=o_t < T)


@torch.no_grad()
def triton_self_saliency(
    q: torch.Tensor,
    k: torch.Tensor,
    window: int = 64,
    scale: float | None = None,
    key_valid: torch.Tensor | None = None,
    block_size: int = 64,
) -> torch.Tensor:
    """`naive_self_saliency` as a Triton kernel; arguments and returns as there. `block_size` (a power of two >= 16)
    sets the query block and key tile."""
    check_saliency_inputs(q, k, window, key_valid)
    if block_size < 16 or block_size & (block_size - 1):
        raise ValueError(f"block_size must be a power of two >= 16, got {block_size}")
    B, T, H, D = q.shape
    Hkv = k.shape[2]
    scale = D**-0.5 if scale is None else float(scale)
    scores = torch.empty(B, T, H, dtype=torch.float32, device=q.device)
    if scores.numel() == 0:
        return scores
    key_valid = as_bytes(key_valid)
    still_saliency_kernel[(triton.cdiv(T, block_size), B * H)](
        q.contiguous(), k.to(q.dtype).contiguous(), key_valid, scores, scale * LOG2E, float(window), SALIENCY_EPS,
        T, min(window, T), H=H, HKV=Hkv, G=H // Hkv, D=D, BQ=block_size, BD=pow2(D),
        HAS_KEY_VALID=key_valid is not None, DOT_PREC=dot_precision(q.dtype),
    )  # fmt: skip
    return scores
