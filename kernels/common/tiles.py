"""Tile helpers the Triton kernels share (`@triton.jit`, inlined into their callers): loading rows of a
`[B, L, heads, D]` tensor, which keys exist and are valid, the causal band of a sliding window, and the online
softmax in the log2 domain (scores carry log2(e) in their scale, so every exponential is an exp2).

The online softmax keeps, per query, the running max m and sum l of 2^(s - m) over the visible keys seen so far.
Both start finite (m = -1e30, l = 0), so a tile, or a whole row, without a visible key leaves them unchanged and
never makes a NaN; a query that saw no key ends with l == 0.
"""

import triton
import triton.language as tl

# the running max before any key: finite (see the module docstring); a constexpr so that kernels can read it
NEG_INIT = tl.constexpr(-1e30)


@triton.jit
def row_offsets(b64, rows, L, NH, i_h, W):
    """Offsets (int64) of the rows `rows` of head i_h in batch row b of a contiguous `[B, L, NH, W]` tensor."""
    return ((b64 * L + rows.to(tl.int64)) * NH + i_h) * W


@triton.jit
def load_rows(x, b64, rows, ok, L, NH, i_h, cols, m_cols, W):
    """x[b, rows, i_h, cols] of a contiguous `[B, L, NH, W]` tensor in x's dtype, `[len(rows), len(cols)]`; rows
    where ~ok and columns where ~m_cols are never read (they may hold anything, NaN included) and come back 0."""
    p = x + row_offsets(b64, rows, L, NH, i_h, W)[:, None] + cols[None, :]
    return tl.load(p, mask=ok[:, None] & m_cols[None, :], other=0.0)


@triton.jit
def store_rows(x, value, b64, rows, ok, L, NH, i_h, cols, m_cols, W):
    """Store `value` `[len(rows), len(cols)]` (cast to x's dtype) at x[b, rows, i_h, cols], where ok and m_cols."""
    p = x + row_offsets(b64, rows, L, NH, i_h, W)[:, None] + cols[None, :]
    tl.store(p, value.to(x.dtype.element_ty), mask=ok[:, None] & m_cols[None, :])


@triton.jit
def valid_rows(key_valid, b64, rows, L, HAS_KEY_VALID: tl.constexpr):
    """Which positions `rows` exist (0 <= row < L) and, with a `[B, L]` uint8 `key_valid`, are not padding."""
    ok = (rows >= 0) & (rows < L)
    if HAS_KEY_VALID:
        ok = ok & (tl.load(key_valid + b64 * L + rows, mask=ok, other=0) != 0)
    return ok


@triton.jit
def band(q_pos, k_pos, window):
    """`[queries, keys]`: key position k_pos lies in the window of the query at q_pos (q_pos - window < k_pos <=
    q_pos)."""
    return (k_pos[None, :] <= q_pos[:, None]) & (k_pos[None, :] > q_pos[:, None] - window)


@triton.jit
def online_softmax(s, visible, m_i, l_i):
    """One key tile of the online softmax. s `[queries, keys]` are scores in the log2 domain, `visible` which keys
    each query sees. Returns p = 2^(s - m_new) (0 where not visible), alpha = 2^(m_i - m_new) (the factor that
    rescales what was accumulated against the old max), m_new and l_new."""
    m_new = tl.maximum(m_i, tl.max(tl.where(visible, s, float("-inf")), 1))
    p = tl.exp2(tl.where(visible, s - m_new[:, None], float("-inf")))
    alpha = tl.exp2(m_i - m_new)
    return p, alpha, m_new, l_i * alpha + tl.sum(p, 1)


@triton.jit
def probabilities(s, visible, lse):
    """The backward's p = 2^(s - lse) from the saved log2-sum-exp of each query; 0 where not visible."""
    return tl.exp2(tl.where(visible, s - lse[:, None], float("-inf")))


@triton.jit
def log2_sum_exp(m_i, l_i):
    """The log2-sum-exp a query's backward recomputes p from; any finite value (0) for a query that saw no key,
    all of whose probabilities the backward masks to zero."""
    seen = l_i > 0
    return tl.where(seen, m_i + tl.log2(tl.where(seen, l_i, 1.0)), 0.0)
