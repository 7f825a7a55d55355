"""Chunk-parallel GLA in plain PyTorch: time and memory linear in T, every exponent <= 0.

Within a chunk, b_t = g_1 + ... + g_t (cumulative log decay, non-increasing because g <= 0), so token s
reaches token t >= s with weight exp(b_t - b_s). The output of token t is
    o_t = (q_t * exp(b_t)) S_prev + sum_{s <= t in the chunk} (q_t * exp(b_t - b_s)) . k_s v_s.
The first term and the state update only use exp(b_t) and exp(b_last - b_s), both <= 1. The intra-chunk
term never splits exp(b_t - b_s) into exp(b_t) exp(-b_s), which overflows under strong decay. Instead the
chunk is halved recursively down to blocks of BASE tokens:
 - inside a base block the decay is computed pairwise, with future pairs masked before the exp;
 - a pair whose smallest common block is 2h long has its key s in the first half and its query t in the
   second; it factorises through r, the first token of the second half: exp(b_t - b_r) exp(b_r - b_s),
   and s < r <= t makes both exponents <= 0. Each level costs O(T h) and there are log2(C / BASE) levels.
"""

import functools

import torch
import torch.nn.functional as F

from .reference import check_cu_seqlens, varlen_loop

BASE = 4


def _intra_chunk(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, b: torch.Tensor, chunk: int) -> torch.Tensor:
    """Contribution of each chunk's tokens to its own outputs: sum_{s <= t} (q_t * exp(b_t - b_s)) . k_s v_s.

    Args:
        q: scaled queries `[B, Hkv, L, G, K]`, L a multiple of `chunk`; G query heads share each key head.
        k: keys `[B, Hkv, L, K]`.
        v: values `[B, Hkv, L, V]`.
        b: cumulative log decay, restarting at every chunk `[B, Hkv, L, K]`.
        chunk: chunk length, a power of two >= BASE.

    Returns:
        `[B, Hkv, L, G, V]`.
    """
    B, Hkv, L, G, K = q.shape
    qb = q.unflatten(2, (L // BASE, BASE))  # [B, Hkv, L / BASE, t, G, K]
    kb, vb, bb = (x.unflatten(2, (L // BASE, BASE)) for x in (k, v, b))  # [B, Hkv, L / BASE, BASE, K|V]
    # the diagonal gets a constant exponent 0: b_t - b_t would add and subtract the same O(1) gradient to
    # g, losing the tiny true gradient of strongly decayed tokens to rounding; future pairs get -inf
    past = torch.ones(BASE, BASE, dtype=torch.bool, device=q.device).tril(-1)[..., None]
    fill = torch.full((BASE, BASE), float("-inf"), device=q.device).triu(1)[..., None]
    decay = torch.where(past, bb[..., :, None, :] - bb[..., None, :, :], fill).exp()  # [.., t, s, K]
    A = qb @ (decay * kb[..., None, :, :]).transpose(-1, -2)  # [B, Hkv, L / BASE, t, G, s]
    o = (A.flatten(3, 4) @ vb).view(B, Hkv, L, G, -1)

    h = BASE
    while h < chunk:
        # second halves hold the queries, first halves the keys; r is the first token of the second half
        qh = q.unflatten(2, (L // (2 * h), 2, h))[:, :, :, 1]  # [B, Hkv, M, h, G, K]
        kh, vh, bh = (x.unflatten(2, (L // (2 * h), 2, h)) for x in (k, v, b))  # [B, Hkv, M, 2, h, K|V]
        b_r = bh[:, :, :, 1, :1]  # [B, Hkv, M, 1, K]
        q_r = qh * (bh[:, :, :, 1] - b_r).exp()[..., None, :]
        k_r = kh[:, :, :, 0] * (b_r - bh[:, :, :, 0]).exp()
        A = q_r.flatten(3, 4) @ k_r.transpose(-1, -2)  # [B, Hkv, M, h * G, h]
        o.unflatten(2, (L // (2 * h), 2, h))[:, :, :, 1] += (A @ vh[:, :, :, 0]).unflatten(3, (h, G))
        h *= 2
    return o


class _ChunkStates(torch.autograd.Function):
    """The state entering every chunk, S_{n+1} = decay_n * S_n + kv_n, and the state after the last one.

    Backward walks the chunks back reading the states this returns, which the queries' product keeps anyway: the
    recurrence under autograd kept every state a second time (each update saves the state it decays), as much memory
    as the states themselves (6 MiB a layer for SmolLM2 at 2K tokens, fp32)."""

    @staticmethod
    def forward(ctx, kv: torch.Tensor, decay: torch.Tensor, S: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """kv `[B, Hkv, N, K, V]`, decay `[B, Hkv, N, K, 1]`, S `[B, Hkv, K, V]` entering the first chunk."""
        states = torch.empty_like(kv)
        for n in range(kv.shape[2]):
            states[:, :, n] = S
            S = torch.addcmul(kv[:, :, n], S, decay[:, :, n])
        ctx.save_for_backward(states, decay)
        return states, S

    @staticmethod
    def backward(ctx, d_states: torch.Tensor, dS: torch.Tensor) -> tuple[torch.Tensor, ...]:
        states, decay = ctx.saved_tensors
        d_kv, d_decay = torch.empty_like(states), torch.empty_like(decay)
        for n in reversed(range(states.shape[2])):  # dS: the gradient of the state leaving chunk n
            d_kv[:, :, n] = dS
            d_decay[:, :, n] = (dS * states[:, :, n]).sum(-1, keepdim=True)
            dS = torch.addcmul(d_states[:, :, n], dS, decay[:, :, n])
        return d_kv, d_decay, dS


def _segment(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, S: torch.Tensor, chunk_size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """One segment of `chunk_gla`: fp32 inputs already scaled, state S `[B, Hkv, K, V]` entering it.

    Returns o `[B, T, H, V]` (fp32) and the state after the segment.
    """
    B, T, H, K = q.shape
    Hkv, V = v.shape[2], v.shape[3]
    G = H // Hkv
    # a short input only pays for the next power of two, not a whole chunk of padding
    C = min(chunk_size, max(BASE, 1 << (T - 1).bit_length()))
    N = -(-T // C)
    L = N * C
    # zero padding keeps the final state exact: g = 0 does not decay it, k = v = 0 adds nothing
    q = F.pad(q, (0, 0, 0, 0, 0, L - T)).unflatten(2, (Hkv, G)).transpose(1, 2).contiguous()
    # q [B, Hkv, L, G, K]: the G heads sharing a key head sit next to each other, so they share matmuls below
    k, v, g = (F.pad(x, (0, 0, 0, 0, 0, L - T)).transpose(1, 2).contiguous() for x in (k, v, g))

    b = g.unflatten(2, (N, C)).cumsum(-2)  # [B, Hkv, N, C, K]
    b_last = b[..., -1:, :]  # [B, Hkv, N, 1, K]
    # each key as seen from the end of its chunk: exp(sum of the later g of the chunk), summed directly
    # rather than as b_last - b, whose O(1) gradient terms would cancel for the last (unpadded) key
    to_end = F.pad(g.unflatten(2, (N, C)).flip(-2).cumsum(-2)[..., :-1, :], (0, 0, 1, 0)).flip(-2)
    k_last = to_end.exp() * k.unflatten(2, (N, C))
    kv = k_last.transpose(-1, -2) @ v.unflatten(2, (N, C))  # [B, Hkv, N, K, V]
    decay = b_last.transpose(-1, -2).exp()  # [B, Hkv, N, K, 1]
    states, S = _ChunkStates.apply(kv, decay, S)  # [B, Hkv, N, K, V]: state entering each chunk

    q_first = (q.unflatten(2, (N, C)) * b.exp()[..., None, :]).flatten(3, 4)  # queries as seen from chunk start
    o = (q_first @ states).view(B, Hkv, L, G, V) + _intra_chunk(q, k, v, b.flatten(2, 3), C)
    return o.transpose(1, 2).reshape(B, L, H, V)[:, :T], S


def chunk_gla(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    scale: float = 1.0,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    chunk_size: int = 16,
    segment_size: int = 256,
    cu_seqlens: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Gated linear attention computed chunk by chunk (see the module docstring for the algorithm).

    Args:
        q: queries `[B, T, H, K]`.
        k: keys `[B, T, Hkv, K]`, shared by H // Hkv query heads.
        v: values `[B, T, Hkv, V]`.
        g: per-key-dimension log decay `[B, T, Hkv, K]`, <= 0.
        scale: multiplier of the output.
        initial_state: `[B, Hkv, K, V]` state before the first token, or None for zeros. The state depends only
            on k, v and g, so the query heads of a group share it.
        output_final_state: whether to return the state after the last token.
        chunk_size: tokens per chunk, a power of two >= BASE (4).
        segment_size: tokens processed at once, the state carried between segments; a multiple of chunk_size.
            Segments keep the working set in cache. The defaults were the fastest of chunks 16-64 and segments
            128-1024 on a 2-core CPU (9 heads of 64, 3 KV heads): against 64/512, 0.68x the time at T = 512 and
            0.85x at 8192 in inference, 0.81x for a forward and backward at 512.
        cu_seqlens: optional `[N + 1]` boundaries of N sequences packed along T (B must be 1); the state restarts
            at each one, initial_state and the final state are then `[N, Hkv, K, V]`.

    Returns:
        o `[B, T, H, V]` in q.dtype, and the final state `[B, Hkv, K, V]` in fp32 or None.
    """
    if cu_seqlens is not None:
        check_cu_seqlens(cu_seqlens, q.shape[0], q.shape[1])
        fn = functools.partial(chunk_gla, chunk_size=chunk_size, segment_size=segment_size)
        return varlen_loop(fn, q, k, v, g, scale, initial_state, output_final_state, cu_seqlens)
    if chunk_size < BASE or chunk_size & (chunk_size - 1):
        raise ValueError(f"chunk_size must be a power of two >= {BASE}, got {chunk_size}")
    return by_segments(_segment, q, k, v, g, scale, initial_state, output_final_state, chunk_size, segment_size)


def by_segments(segment, q, k, v, g, scale, initial_state, output_final_state, chunk_size, segment_size):
    """Run `segment(q, k, v, g, S, chunk_size) -> (o, S)` over `segment_size` tokens at a time, carrying the state;
    inputs and returns as in `chunk_gla`. Segments keep the working set in cache."""
    if segment_size % chunk_size:
        raise ValueError(f"segment_size must be a multiple of chunk_size, got {segment_size} and {chunk_size}")
    B, T, H, K = q.shape
    Hkv, V = v.shape[2], v.shape[3]
    dtype = q.dtype
    S = q.new_zeros(B, Hkv, K, V, dtype=torch.float32) if initial_state is None else initial_state.float()
    q, k, v, g = q.float() * scale, k.float(), v.float(), g.float()
    outputs = []
    for start in range(0, T, segment_size):
        part = slice(start, start + segment_size)
        o, S = segment(q[:, part], k[:, part], v[:, part], g[:, part], S, chunk_size)
        outputs.append(o)
    o = outputs[0] if len(outputs) == 1 else torch.cat(outputs, dim=1)
    return o.to(dtype), S if output_final_state else None
