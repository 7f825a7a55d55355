"""Top-k routing of STILL in Triton: one program per (chunk, batch row * head) ranks the chunk's scores.

The rank of token i is the number of finite scores above it in its chunk (equal scores count the lower index as
higher), so exactly min(topk, finite count) tokens get a rank below topk: no loop over k, no sort. -inf (invalid)
scores are never selected. Ties are broken by index, which torch.topk does not promise, so the two paths agree
whenever a chunk's finite scores are distinct.
"""

import torch
import triton
import triton.language as tl

from .selection import check_selection_inputs


@triton.jit(do_not_specialize=["T", "C", "topk"])
def still_select_kernel(
    scores,  # [B, T, H]
    salient,  # [B, T, H] uint8
    T,
    C,
    topk,
    H: tl.constexpr,
    BC: tl.constexpr,
):
    i_n, i_bh = tl.program_id(0), tl.program_id(1)
    i_b, i_h = i_bh // H, i_bh % H
    o_c = tl.arange(0, BC)
    rows = i_n * C + o_c
    m_c = (o_c < C) & (rows < T)
    offset = (i_b.to(tl.int64) * T + rows.to(tl.int64)) * H + i_h
    b_x = tl.load(scores + offset, mask=m_c, other=float("-inf")).to(tl.float32)
    finite = m_c & (tl.abs(b_x) < float("inf"))  # NaN fails the comparison too
    # above[i, j]: token j ranks above token i
    above = (b_x[None, :] > b_x[:, None]) | ((b_x[None, :] == b_x[:, None]) & (o_c[None, :] < o_c[:, None]))
    rank = tl.sum((above & finite[None, :]).to(tl.int32), axis=1)
    tl.store(salient + offset, (finite & (rank < topk)).to(tl.uint8), mask=m_c)


@torch.no_grad()
def triton_select_salient(scores: torch.Tensor, chunk_size: int = 64, topk: int = 4) -> torch.Tensor:
    """`torch_select_salient` as a Triton kernel; arguments and returns as there."""
    check_selection_inputs(scores, chunk_size, topk)
    B, T, H = scores.shape
    salient = torch.empty(B, T, H, dtype=torch.bool, device=scores.device)
    if salient.numel():
        still_select_kernel[(triton.cdiv(T, chunk_size), B * H)](
            scores.contiguous(), salient.view(torch.uint8), T, chunk_size, topk,
            H=H, BC=max(16, triton.next_power_of_2(chunk_size)), num_warps=4,
        )  # fmt: skip
    return salient
