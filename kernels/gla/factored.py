"""Gated linear attention for inference on CPU: each chunk's decay factored through its midpoint.

Within a chunk, token s reaches token t >= s with weight exp(b_t - b_s), b the cumulative log decay (chunk.py).
Here the weight is split as exp(b_t - b_mid) exp(b_mid - b_s), with b_mid half the chunk's total log decay, so a
chunk's own contribution is one product of decayed queries and decayed keys (the usual chunked form) instead of
chunk.py's recursive halving: 0.4-0.7x the time of `chunk_gla` from 512 to 8K tokens on a 2-core CPU
(docs/inference-speed.md, "GLA for inference").

The split is exact, but each factor reaches exp(|total| / 2), which fp32 holds only for moderate decay: the
dispatcher uses this path when `factorable` says every chunk's total log decay stays within 2 * MAX_EXPONENT
(factors within exp(+-40) = 2.4e17, far from fp32's overflow at 3.4e38 and its subnormals below 1.2e-38), and
`chunk_gla`, whose every exponent is <= 0, otherwise. It has no custom backward and is meant for inference:
gradients, whose rounding under strong decay chunk.py handles with care, stay on `chunk_gla`.
"""

import torch
import torch.nn.functional as F

from .chunk import by_segments

MAX_EXPONENT = 40.0
CHUNK = 64
SEGMENT = 1024


def factorable(g: torch.Tensor, chunk_size: int = CHUNK) -> bool:
    """Whether every `chunk_size`-token chunk of `g` `[B, T, Hkv, K]` decays by at most exp(-2 * MAX_EXPONENT)."""
    B, T, Hkv, K = g.shape
    pad = -T % chunk_size
    totals = F.pad(g, (0, 0, 0, 0, 0, pad)).view(B, -1, chunk_size, Hkv, K).sum(2, dtype=torch.float32)
    return bool(totals.amin() >= -2 * MAX_EXPONENT) if totals.numel() else True


def _segment(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, S: torch.Tensor, C: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """One segment: fp32 q (scaled) `[B, T, H, K]`, k, g `[B, T, Hkv, K]`, v `[B, T, Hkv, V]`, state S `[B, Hkv, K,
    V]` entering it. Returns o `[B, T, H, V]` (fp32) and the state after the segment."""
    B, T, H, K = q.shape
    Hkv, V = v.shape[2], v.shape[3]
    G, N = H // Hkv, -(-T // C)
    pad = N * C - T  # zero padding keeps the final state exact: g = 0 does not decay it, k = v = 0 adds nothing

    def chunks(x: torch.Tensor) -> torch.Tensor:  # [B, T, Hkv, ...] -> [B, Hkv, N, C, ...], contiguous
        x = F.pad(x, (0, 0) * (x.dim() - 2) + (0, pad)) if pad else x
        return x.unflatten(1, (N, C)).movedim(3, 1).contiguous()

    q = chunks(q.unflatten(2, (Hkv, G)))  # [B, Hkv, N, C, G, K]: a key head's G query heads side by side
    k, v, g = chunks(k), chunks(v), chunks(g)  # [B, Hkv, N, C, K|V]
    b = g.cumsum(-2)  # [B, Hkv, N, C, K], non-increasing along C
    b_last = b[..., -1:, :]  # [B, Hkv, N, 1, K]
    b_mid = b_last / 2

    # within the chunk: (q_t exp(b_t - b_mid)) . (k_s exp(b_mid - b_s)) for s <= t
    q_mid = (q * (b - b_mid).exp()[..., None, :]).flatten(3, 4)  # [B, Hkv, N, C * G, K]
    k_mid = k * (b_mid - b).exp()
    A = q_mid @ k_mid.mT  # [B, Hkv, N, C * G, C]; entries above the diagonal may be huge, and are dropped
    causal = torch.ones(C, C, dtype=torch.bool, device=q.device).tril().repeat_interleave(G, dim=0)  # [C * G, C]
    o = A.masked_fill_(~causal, 0.0) @ v  # [B, Hkv, N, C * G, V]

    # across chunks: the state entering each chunk, read by the queries decayed from the chunk's start
    kv = (k * (b_last - b).exp()).mT @ v  # [B, Hkv, N, K, V]: each chunk's keys as seen from its end
    decay = b_last.mT.exp()  # [B, Hkv, N, K, 1]
    states = torch.empty_like(kv)
    for n in range(N):
        states[:, :, n] = S
        S = torch.addcmul(kv[:, :, n], S, decay[:, :, n])
    o += (q * b.exp()[..., None, :]).flatten(3, 4) @ states  # exp(b_t) <= 1: decay since the chunk's start
    return o.view(B, Hkv, N, C, G, V).permute(0, 2, 3, 1, 4, 5).reshape(B, N * C, H, V)[:, :T], S


def factored_chunk_gla(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    scale: float = 1.0,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    chunk_size: int = CHUNK,
    segment_size: int = SEGMENT,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Gated linear attention over chunks with factored decay; arguments and returns as in `chunk_gla` (no
    cu_seqlens). Exact only where `factorable(g, chunk_size)` holds, which the caller checks. Segments of
    `segment_size` tokens (a multiple of `chunk_size`) bound the memory: a segment's chunk products hold
    `segment_size * chunk_size` numbers per query head."""
    return by_segments(_segment, q, k, v, g, scale, initial_state, output_final_state, chunk_size, segment_size)
