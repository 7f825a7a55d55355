"""Top-k routing of STILL in PyTorch: which tokens of each chunk stay exact keys (the "reference" and "torch" path
of `select_salient`; the Triton kernel is in selection_triton)."""

import torch
import torch.nn.functional as F


def check_selection_inputs(scores: torch.Tensor, chunk_size: int, topk: int) -> None:
    """Raise a ValueError naming the problem when the arguments do not fit `select_salient`."""
    if scores.dim() != 3:
        raise ValueError(f"expected scores [B, T, H], got {tuple(scores.shape)}")
    if chunk_size < 1 or topk < 0:
        raise ValueError(f"expected chunk_size >= 1 and topk >= 0, got chunk_size {chunk_size}, topk {topk}")


@torch.no_grad()
def torch_select_salient(scores: torch.Tensor, chunk_size: int = 64, topk: int = 4) -> torch.Tensor:
    """Mark the `topk` highest-scored valid tokens of every chunk, per batch row and head.

    The highest scores are kept, as torch.topk's default does (quirk Q3: the official comments say "lowest",
    the code and so the trained models keep the highest). A chunk with fewer valid tokens keeps all of them.

    Args:
        scores: `[B, T, H]` saliency scores, -inf at invalid positions.
        chunk_size: C; chunk(j) = j // C, every chunk selected, the last one possibly short.
        topk: tokens kept per chunk and head.

    Returns:
        salient `[B, T, H]` bool, False at invalid positions.
    """
    check_selection_inputs(scores, chunk_size, topk)
    B, T, H = scores.shape
    N = -(-T // chunk_size)
    pad = N * chunk_size - T
    chunks = F.pad(scores, (0, 0, 0, pad), value=float("-inf")).view(B, N, chunk_size, H)
    top = chunks.topk(min(topk, chunk_size), dim=2).indices  # [B, N, topk, H]
    picked = torch.zeros_like(chunks, dtype=torch.bool).scatter_(2, top, True)
    # topk fills a chunk short of valid tokens with -inf ones, which must stay unselected
    return (picked & chunks.isfinite()).view(B, N * chunk_size, H)[:, :T]
