"""STILL attention: in every chunk of `chunk_size` tokens the `topk` tokens with the highest self-saliency keep
exact softmax attention; every other token older than the previous chunk folds into a gated linear state through
the NP-Map feature map, and both share one normalizer (Meng et al. 2026, https://arxiv.org/abs/2602.02180;
docs/methods.md §3). The formulas are in `linearize.kernels.still`. The official code's quirks (docs/methods.md
§3.8), each decided on purpose:

- Q1 fixed: the saliency's "without self" distribution gives the uniform mass to the token's own slot, in prefill
  and decode alike (the official prefill overwrites another slot for all but the last token of a chunk).
- Q2 fixed: logits are scaled by 1/sqrt(d) in every path (the official decode scores are unscaled).
- Q3 kept: the highest scores are selected (the official comments say lowest; the code and models use highest).
- Q4 fixed: the first chunk has no phantom zero-logit keys; a key that does not exist is never attended.
- Q5 kept: the max shift applies to the softmax terms only and the gate to the linear numerator only, as trained.
- Q6, Q8, Q9 (conversion values, recorded here): `g_proj` (no bias) normal(0, `initializer_range`), so the gate
  starts near 0.5; NP-Maps per head for q and k with `W_h` = identity (the map then only reflects the pretrained
  vector, keeping its norm) and a random Householder vector; the k map starts as a copy of the q map and trains
  separately. Seeded by the layer index, so a conversion is reproducible. (How close this starts to the original
  attention on SmolLM2-135M: docs/methods.md §3.9.)
- Q7 fixed: the normalizer's epsilon is the same in prefill and decode.
- Q10 kept: K and V are GQA-expanded before the feature map and the selection, so scores, top-k and the salient
  cache are per query head (selection depends on the query); the salient cache is H/Hkv times larger for it.
- Q11: chunk size and top-k are settings (defaults 64 and 4); the saliency window equals the chunk, so a token's
  window always lies in the raw cache.
- Q12: no legacy mixing factor. Q13 fixed: padding is left out of scoring, selection, the state and the normalizer;
  rows are packed so chunks count each row's real tokens from its first one, so a padded row equals the unpadded
  one. Q14: the score, the selection and the attention run as fused Triton kernels on CUDA and as chunked
  PyTorch on CPU, both tested against float64 references; the decode step is an op in PyTorch (`still_decode`).
- Q15 fixed: at decode, a chunk leaving the ring is ranked by its own scores (the official decode ranks it with
  the scores of the chunk after it, so the tokens it keeps exact are not those its prefill would keep).

Decoding keeps the raw last two chunks (keys, values, scores) in a ring, the queries of the newest chunk (to score
it once it is complete), the salient keys/values of older chunks and the linear state. Selection is delayed to chunk
granularity: when a token opens chunk c, chunk c - 2 leaves the ring, its top-k tokens join the salient cache and
the rest fold into the state, so cached decoding computes exactly what the chunk-parallel forward does. The salient
cache grows by `topk` tokens per chunk and head: STILL's cache is not constant-size. A multi-token call on a
non-empty cache runs token by token.

The linear state does not decay: its share of the shared normalizer grows with the number of folded tokens, so a
model fine-tuned on short sequences gets worse past that length (measured on SmolLM2-135M: docs/methods.md
§3.9). Fine-tune on sequences as long as the ones the model will read.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn
from transformers import initialization as init

from ..cache_layers import StateCacheLayer, own
from ..kernels.backend import outside_autocast
from ..kernels.still import StillDecodeState, select_salient, self_saliency, still_attention, still_decode
from ..methods import StillSettings
from .base import LinearizedAttention

STILL_EPS = 1e-6  # the shared normalizer's epsilon, in prefill and decode alike (quirk Q7)


class NPMap(nn.Module):
    """Norm-preserving feature map, one per head (docs/methods.md §3.5): f(x) = W_h (I - 2 h h^T) x with unit h,
    u = |x| f(x) / |f(x)|, phi(x) = [softmax(u), softmax(-u)] (2 D features, clamped at 1e-12).

    On a CPU without autograd an input of more than `WHOLE_ELEMENTS` numbers is mapped in blocks of about
    `BLOCK_ELEMENTS`: the map makes a dozen passes over tensors the size of its input and output, which at 8K tokens
    (19 MB in, 38 MB out for SmolLM2) run from main memory and in blocks from cache, 2.5x faster on a 2-core CPU
    (docs/inference-speed.md)."""

    BLOCK_ELEMENTS = 1 << 17
    WHOLE_ELEMENTS = 4 * BLOCK_ELEMENTS  # up to here one pass stays in cache and a loop only adds calls

    def __init__(self, heads: int, dim: int):
        super().__init__()
        self.householder = nn.Parameter(torch.empty(heads, dim))
        self.linear = nn.Parameter(torch.empty(heads, dim, dim))
        self._kept_matrix: tuple[tuple, torch.Tensor] | None = None  # (the parameters' versions, their matrix)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """A random reflection and W_h = identity, so that a model built from its config (`from_config`) starts
        from finite, norm-preserving maps; conversion sets its own values (`StillAttention.init_new_parameters`:
        seeded, the k map a copy of the q map). `from_pretrained` calls it too, through the model's
        `initialize_weights`, for maps the checkpoint lacks: transformers' initialisation functions leave the tensors
        it loaded alone."""
        init.normal_(self.householder)
        init.copy_(self.linear, torch.eye(self.linear.shape[-1]).expand_as(self.linear))

    @outside_autocast  # fp32 also under autocast, which would run the map's product in bfloat16
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """`x` [B, T, H, D] -> features [B, T, H, 2D] in fp32."""
        matrix = self.matrix(keep=x.shape[1] == 1)
        if x.numel() <= self.WHOLE_ELEMENTS or torch.is_grad_enabled() or x.device.type != "cpu":
            return self._map(x, matrix)
        out = x.new_empty(*x.shape[:-1], 2 * x.shape[-1], dtype=torch.float32)
        step = max(1, self.BLOCK_ELEMENTS // x[:, :1].numel())
        for t0 in range(0, x.shape[1], step):
            out[:, t0 : t0 + step] = self._map(x[:, t0 : t0 + step], matrix)
        return out

    def matrix(self, keep: bool = False) -> torch.Tensor:
        """W_h (I - 2 h h^T) per head, `[H, D, D]` in fp32: the reflection and W_h as one product. With `keep` and
        without autograd it is kept until the parameters change: a decode step maps one token, and the dozen small
        ops that make the matrix cost as much as the map. (A prefill makes its own and frees it, so that its peak
        memory holds no layer's matrix but the one it maps with.) Parameters made under `torch.inference_mode` keep
        no version counter, so their matrix is made at every call. A call that makes its own drops the kept one: a
        fused optimizer step (transformers Trainer's default AdamW) updates the parameters in place without counting
        a version, and the forward under autograd before it is such a call."""
        parameters = (self.householder, self.linear)
        if not keep or torch.is_grad_enabled() or any(p.is_inference() for p in parameters):
            self._kept_matrix = None
            return self._fold()
        key = tuple((p._version, p.data_ptr(), p.device, p.dtype) for p in parameters)
        if self._kept_matrix is None or self._kept_matrix[0] != key:
            self._kept_matrix = (key, self._fold())
        return self._kept_matrix[1]

    def _fold(self) -> torch.Tensor:
        h = F.normalize(self.householder.float(), dim=-1)  # [H, D]
        linear = self.linear.float()  # [H, D, D]
        return linear - 2 * (linear @ h[..., None]) * h[:, None]  # W - 2 (W h) h^T

    @staticmethod
    def _map(x: torch.Tensor, matrix: torch.Tensor) -> torch.Tensor:
        x = x.float()  # [B, T, H, D]
        mapped = torch.einsum("bthd,hed->bthe", x, matrix)
        u = mapped * (x.norm(dim=-1, keepdim=True) / mapped.norm(dim=-1, keepdim=True).clamp_min(1e-12))
        # [softmax(u), softmax(-u)] as one softmax over a [2, D] view
        return torch.stack([u, -u], dim=-2).softmax(-1).flatten(-2).clamp_min(1e-12)  # [B, T, H, 2D]


class StillCacheLayer(StateCacheLayer):
    """Ring of the last two chunks (RoPE'd keys and values per KV head, scores per query head, validity), the
    RoPE'd queries of the newest chunk, the salient keys/values of older chunks per query head, the fp32 linear
    state and normalizer, and each row's count of real tokens."""

    _tensor_fields = StillDecodeState._fields

    def __init__(self):
        super().__init__()
        self.ring_k = self.ring_v = self.ring_score = self.ring_valid = None  # [B, 2C, ...]
        self.chunk_q = None  # [B, C, H, D]
        self.salient_k = self.salient_v = None  # [B, H, S, D]
        self.salient_valid = None  # [B, S]
        self.state = self.normalizer = None  # [B, H, F, Dv], [B, H, F]
        self.real_tokens = None  # [B]


class StillAttention(LinearizedAttention):
    def __init__(self, config, layer_idx, family):
        super().__init__(config, layer_idx, family)
        settings = config.layer_settings(layer_idx)
        self.chunk_size, self.topk = settings.chunk_size, settings.topk
        self.initializer_range = getattr(config, "initializer_range", 0.02)
        self.groups = self.num_heads // self.num_kv_heads
        self.g_proj = nn.Linear(config.hidden_size, self.num_heads * self.head_dim, bias=False)
        self.q_map = NPMap(self.num_heads, self.head_dim)
        self.k_map = NPMap(self.num_heads, self.head_dim)

    @staticmethod
    def cache_layer(settings: StillSettings) -> StillCacheLayer:
        return StillCacheLayer()  # filled by the prefill (`_fill_cache`); chunk size and top-k are the layer's

    @torch.no_grad()
    def init_new_parameters(self, device: torch.device, dtype: torch.dtype) -> None:
        """Give the parameters STILL adds their conversion values (see the module docstring)."""
        generator = torch.Generator().manual_seed(self.layer_idx)

        def parameter(value: torch.Tensor) -> nn.Parameter:
            return nn.Parameter(value.to(device=device, dtype=dtype))

        gate = torch.randn(self.g_proj.weight.shape, generator=generator) * self.initializer_range
        self.g_proj.weight = parameter(gate)
        householder = torch.randn(self.num_heads, self.head_dim, generator=generator)
        identity = torch.eye(self.head_dim).expand(self.num_heads, -1, -1)
        for feature_map in (self.q_map, self.k_map):  # the k map starts as a copy of the q map (its own tensors)
            feature_map.householder = parameter(householder.clone())
            feature_map.linear = parameter(identity.clone())

    def attend(self, hidden_states, position_embeddings, state, valid):
        batch, length, _ = hidden_states.shape
        q, k, v, _ = self.project(hidden_states)
        q, k = self.rotate(q, k, position_embeddings)  # [B, T, H, D], [B, T, Hkv, D]
        gate = torch.sigmoid(self.g_proj(hidden_states)).view(batch, length, self.num_heads, self.head_dim)
        if state is None or state.real_tokens is None:
            o = self._prefill(q, k, v, gate, valid, state)
        else:  # continuing a cached sequence: token by token, each exactly as the chunk-parallel form sees it
            valid = torch.ones(batch, length, dtype=torch.bool, device=q.device) if valid is None else valid
            steps = [self._decode_step(q[:, t], k[:, t], v[:, t], gate[:, t], valid[:, t], state) for t in
                     range(length)]  # fmt: skip
            o = steps[0] if length == 1 else torch.cat(steps, dim=1)
        return o.to(hidden_states.dtype).flatten(2)

    @staticmethod
    def _features(feature_map: NPMap, x: torch.Tensor) -> torch.Tensor:
        """The NP-Map features of x in x's dtype (the model's): the map computes in fp32, the attention multiplies
        the features in the model dtype (tensor cores on GPUs). Prefill and decoding round them alike, so cached
        decoding computes what the full forward does."""
        return feature_map(x).to(x.dtype)

    # -- prefill and training ------------------------------------------------------------------------------------
    def _prefill(self, q, k, v, gate, valid, state):
        """The chunk-parallel form over rows packed to start at their first real token; fills `state` if given.
        Without padding (`valid` None or all True) the rows are used as they are, with the ops' unmasked paths."""
        if valid is not None and bool(valid.all()):
            valid = None
        if valid is not None:
            order = torch.argsort((~valid).to(torch.uint8), dim=1, stable=True)  # [B, T]: real tokens first

            def pack(x):
                return x.gather(1, order.view(*order.shape, *[1] * (x.dim() - 2)).expand_as(x))

            q, k, v, gate, valid = (pack(x) for x in (q, k, v, gate, valid))
        scores = self_saliency(q, k, window=self.chunk_size, scale=self.scaling, key_valid=valid, backend=self.backend)
        salient = select_salient(scores, chunk_size=self.chunk_size, topk=self.topk, backend=self.backend)  # [B, T, H]
        k_feat = self._features(self.k_map, k.repeat_interleave(self.groups, dim=2))
        o = still_attention(
            q, k, v, self._features(self.q_map, q), k_feat, gate, salient, chunk_size=self.chunk_size,
            scale=self.scaling, softcap=self.softcap, key_valid=valid, eps=STILL_EPS, backend=self.backend,
        )  # fmt: skip
        if state is not None:
            self._fill_cache(state, q, k, v, k_feat, scores, salient, valid)
        if valid is None:
            return o
        return o.new_empty(o.shape).scatter(1, order.view(*order.shape, 1, 1).expand_as(o), o)  # input order

    @outside_autocast  # the linear state is fp32 also under autocast
    def _fill_cache(self, state, q, k, v, k_feat, scores, salient, valid):
        """Cache after a prefill of packed rows: chunks before the last two are folded, the last two are raw, and the
        queries of the last chunk wait for it to complete. Only the tokens that land in the cache are copied (no
        key or value repeated per query head): at 8K tokens the whole sequence's copies were most of the fill."""
        batch, length = k.shape[:2]
        valid = torch.ones(batch, length, dtype=torch.bool, device=k.device) if valid is None else valid
        C = self.chunk_size
        real = valid.sum(1)  # [B]
        position = torch.arange(length, device=k.device)
        last_chunk = (real - 1).clamp_min(0) // C
        ring_start = ((last_chunk - 1) * C).clamp_min(0)  # [B]: the first token of the last two chunks
        folded = (position[None] < ring_start[:, None]) & valid  # [B, T]: older than the ring
        in_ring = valid & ~folded

        def placed(x, kept, slots, start):
            """x [B, T, ...] into `slots` slots by position % slots where `kept` (never before `start`); the rest go
            to a dropped spare."""
            x, kept, at = x[:, start:], kept[:, start:], position[start:]
            slot = torch.where(kept, at[None] % slots, slots)  # [B, T - start]
            spare = x.new_zeros(batch, slots + 1, *x.shape[2:])
            return own(spare.scatter(1, slot.view(*slot.shape, *[1] * (x.dim() - 2)).expand_as(x), x)[:, :slots])

        ring = int(ring_start.min())
        state.ring_k, state.ring_v = placed(k, in_ring, 2 * C, ring), placed(v, in_ring, 2 * C, ring)
        state.ring_score = placed(scores.float(), in_ring, 2 * C, ring)
        state.ring_valid = placed(in_ring, in_ring, 2 * C, ring)
        in_last_chunk = valid & (position[None] // C == last_chunk[:, None])
        state.chunk_q = placed(q, in_last_chunk, C, int((last_chunk * C).min()))

        # salient keys of folded chunks, per query head: topk per complete chunk, so the same count in every head
        keep = (salient & folded[..., None]).transpose(1, 2)  # [B, H, T]
        count = keep.sum(-1)[:, 0]  # [B]
        most = int(count.max())
        first = torch.argsort((~keep).to(torch.uint8), dim=-1, stable=True)[..., :most]  # [B, H, S]
        kv_head = torch.arange(self.num_heads, device=k.device)[:, None] // self.groups  # [H, 1]
        rows = (first * self.num_kv_heads + kv_head).reshape(batch, -1, 1)  # [B, H * S, 1]: rows of [B, T * Hkv, D]

        def salient_of(x):  # [B, T, Hkv, D] -> [B, H, S, D]
            picked = x.flatten(1, 2).gather(1, rows.expand(-1, -1, x.shape[-1]))
            return picked.view(batch, self.num_heads, most, x.shape[-1])

        state.salient_k, state.salient_v = salient_of(k), salient_of(v)
        state.salient_valid = torch.arange(most, device=k.device)[None] < count[:, None]  # [B, S]

        linear = (~salient & folded[..., None]).float()  # [B, T, H]
        weighted = (k_feat.float() * linear[..., None]).reshape(batch, length, self.num_kv_heads, self.groups, -1)
        state.state = torch.einsum("btkgf,btkd->bkgfd", weighted, v.float()).flatten(1, 2)  # [B, H, F, Dv]
        state.normalizer = weighted.sum(1).flatten(1, 2)  # [B, H, F]
        state.real_tokens = real

    # -- decoding ------------------------------------------------------------------------------------------------
    def _decode_step(self, q, k, v, gate, valid, state):
        """One token per row (`q` [B, H, D], `k`/`v` [B, Hkv, D], `gate` [B, H, D], `valid` [B]) -> [B, 1, H, D]:
        the `still_decode` op on the cache's tensors, which it then replaces."""
        cache = StillDecodeState(*(getattr(state, name) for name in StillDecodeState._fields))
        o, cache = still_decode(
            q, k, v, self._features(self.q_map, q[:, None])[:, 0], gate, valid, cache,
            functools.partial(self._features, self.k_map), chunk_size=self.chunk_size, topk=self.topk,
            scale=self.scaling, softcap=self.softcap, eps=STILL_EPS, backend=self.backend,
        )  # fmt: skip
        for name, value in cache._asdict().items():
            setattr(state, name, value)
        return o[:, None]

    @staticmethod
    def state_bytes(settings, heads: int, kv_heads: int, head_dim: int, dtype_bytes: int, tokens: int) -> int:
        """Cache bytes of one sequence after `tokens` tokens: the ring of two chunks, the newest chunk's queries and
        the linear state (constant), plus `topk` salient keys and values per head for every chunk older than the
        ring (growing)."""
        chunk = settings.chunk_size
        ring = 2 * chunk * (2 * kv_heads * head_dim * dtype_bytes + heads * 4 + 1)
        ring += chunk * heads * head_dim * dtype_bytes  # the newest chunk's queries
        linear = heads * 2 * head_dim * (head_dim + 1) * 4  # 2D features: state and normalizer, fp32
        folded_chunks = max(0, (tokens - 1) // chunk - 1)
        salient = folded_chunks * settings.topk * (2 * heads * head_dim * dtype_bytes + 1)
        return ring + linear + salient + 8
