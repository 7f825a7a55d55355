"""flash-linear-attention's `chunk_gla` behind our GLA interface: an optional backend, for comparison.

fla keeps one state per query head and takes k, v and g with as many heads as q; ours shares k, v, g and the
state across the query heads of a group. Repeating them is exact (every query head of a group holds the same
state), and costs the memory our own paths avoid.
"""

import torch


def fla_chunk_gla(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    scale: float = 1.0,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    cu_seqlens: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Same arguments and returns as `linearize.kernels.gated_linear_attention` (state `[B or N, Hkv, K, V]`)."""
    try:
        from fla.ops.gla import chunk_gla
    except ImportError:
        raise ImportError(
            "backend 'fla' needs flash-linear-attention: pip install flash-linear-attention fla-core"
        ) from None
    group = q.shape[2] // k.shape[2]
    k, v, g = (x.repeat_interleave(group, dim=2) for x in (k, v, g))
    if initial_state is not None:
        initial_state = initial_state.float().repeat_interleave(group, dim=1)
    o, final_state = chunk_gla(
        q,
        k,
        v,
        g,
        scale=scale,
        initial_state=initial_state,
        output_final_state=output_final_state,
        cu_seqlens=None if cu_seqlens is None else cu_seqlens.long(),
    )
    if final_state is not None:
        final_state = final_state[:, ::group]  # every query head of a group holds its key head's state
    return o, final_state
