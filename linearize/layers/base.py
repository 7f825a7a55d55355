"""What every converted attention layer shares: the source projections, RoPE, the padding mask, and documents
packed into one row kept apart."""

from __future__ import annotations

import dataclasses
import functools
from typing import TYPE_CHECKING, NamedTuple

import torch
from torch import nn

from ..families import Family
from ..methods import MethodSettings

if TYPE_CHECKING:  # an annotation only: when linearize.cache_layers is what first imports transformers, this
    # module is imported (linearize.registration -> linearize.models) before cache_layers has defined its names
    from ..cache_layers import StateCacheLayer


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate q [B, T, H, D] and k [B, T, Hkv, D] with the model's rotary tables `cos`, `sin` [B, T, R]. Tables
    narrower than the head (R < D: partial rotary embeddings, as in Phi-3) rotate the first R channels only."""
    # one rotation over both: at decode, per-op overhead is most of the cost
    qk = torch.cat([q, k], dim=2)
    rotary = cos.shape[-1]
    partial = rotary < qk.shape[-1]
    if partial:
        qk, passed = qk[..., :rotary], qk[..., rotary:]
    qk = qk * cos.unsqueeze(2) + rotate_half(qk) * sin.unsqueeze(2)
    if partial:
        qk = torch.cat([qk, passed], dim=-1)
    return qk.split([q.shape[2], k.shape[2]], dim=2)


def source_linear(linear: nn.Module) -> nn.Module:
    """The original linear layer under any LoRA adapter peft put around it."""
    return getattr(linear, "base_layer", linear)


class LinearizedAttention(nn.Module):
    """Base class of converted attention layers.

    It owns the source attention's parameters under their original names (`q_proj`, `k_proj`, `v_proj` or a fused
    `qkv_proj`, `o_proj` and, for qk-norm families, `q_norm`/`k_norm`), so a converted checkpoint has the source's
    state-dict keys and conversion is a plain `load_state_dict`. The modules are taken from an instance of the
    family's own attention class, which keeps each family's bias and norm details in one place: transformers.
    """

    def __init__(self, config, layer_idx: int, family: Family):
        super().__init__()
        source = family.attention_class(config.family_config(), layer_idx)  # as the source built this layer
        self.layer_idx = layer_idx
        self.head_dim = source.head_dim
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.scaling = source.scaling
        # Gemma 2's logit cap; what every softmax of the layer applies (docs/methods.md §0.5)
        self.softcap = source.attn_logit_softcapping if family.logit_softcap else None
        self.use_rope = bool(getattr(source, "use_rope", True))  # SmolLM3 leaves RoPE out of some layers
        self.source_window = config.source_window(layer_idx)
        if family.fused_qkv:
            self.qkv_proj = source.qkv_proj
        else:
            self.q_proj, self.k_proj, self.v_proj = source.q_proj, source.k_proj, source.v_proj
        self.o_proj = source.o_proj
        self.qk_norm = family.qk_norm
        self.q_norm = source.q_norm if family.qk_norm else None
        self.k_norm = source.k_norm if family.qk_norm else None
        # the kernels this layer's ops run on, a runtime choice (not saved): None follows LINEARIZE_BACKEND, then the
        # device (Triton on CUDA); "torch", "triton" or "reference" force one (see linearize.kernels.backend)
        self.backend: str | None = None

    def project(
        self, hidden_states: torch.Tensor, frozen: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Return q [B, T, H, D], k [B, T, Hkv, D], v [B, T, Hkv, D] as the source computes them before RoPE,
        and the raw key (before any qk-norm). `frozen` leaves out any LoRA adapter on the projections."""
        batch, length, _ = hidden_states.shape
        linear = source_linear if frozen else (lambda module: module)
        q_size, kv_size = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        if hasattr(self, "qkv_proj"):
            q, k, v = linear(self.qkv_proj)(hidden_states).split([q_size, kv_size, kv_size], dim=-1)
        else:
            q, k, v = (linear(m)(hidden_states) for m in (self.q_proj, self.k_proj, self.v_proj))
        k_raw = k.view(batch, length, self.num_kv_heads, self.head_dim)
        if self.qk_norm == "projection":
            q, k = self.q_norm(q), self.k_norm(k)
        q = q.view(batch, length, self.num_heads, self.head_dim)
        k = k.view(batch, length, self.num_kv_heads, self.head_dim)
        v = v.view(batch, length, self.num_kv_heads, self.head_dim)
        if self.qk_norm == "head":
            q, k = self.q_norm(q), self.k_norm(k)
        if q.dtype != v.dtype:  # under autocast the norms return fp32: the ops take one dtype, the projections'
            q, k = q.to(v.dtype), k.to(v.dtype)
        return q, k, v, k_raw

    def rotate(
        self, q: torch.Tensor, k: torch.Tensor, position_embeddings: tuple[torch.Tensor, torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """q and k with the layer's rotary embedding (`apply_rope`), or as they are in a layer without one; in their
        own dtype, which fp32 tables would promote under autocast (the ops take the projections' dtype)."""
        if not self.use_rope:
            return q, k
        q_rotated, k_rotated = apply_rope(q, k, *position_embeddings)
        if q_rotated.dtype != q.dtype:
            return q_rotated.to(q.dtype), k_rotated.to(k.dtype)
        return q_rotated, k_rotated

    def forward(
        self,
        hidden_states,
        position_embeddings=None,
        attention_mask=None,
        cache=None,
        past_key_values=None,
        padding_mask=None,
        document_ids=None,
        **kwargs,
    ):
        """The layer's output `[B, T, hidden]` (and no attention weights), as transformers' attention modules return.

        `document_ids` `[B, T]` (set by the decoder's `DecoderInputs` for packed rows: position ids that restart, no
        attention mask, no cache) numbers the documents of each row; every document then attends as if it were
        alone: its own window, sinks, salient tokens and a linear state that starts empty."""
        state = self.layer_cache(cache if cache is not None else past_key_values, self.layer_idx)
        if document_ids is not None and state is None:
            o = DocumentBatch.of(document_ids).run(
                lambda x, rotary, valid: self.attend(x, rotary, None, valid), hidden_states, *position_embeddings
            )
        else:
            o = self.attend(
                hidden_states, position_embeddings, state, self.token_validity(padding_mask, hidden_states.shape[1])
            )
        if state is not None:  # counted for every method here: without a mask, transformers takes the next token's
            # position from it, and a kept softmax layer its mask's past length
            state.seen_tokens += hidden_states.shape[1]
        return self.o_proj(o), None

    # What a method's layer implements: `attend`, and the two static methods below for its cache; a method whose
    # layer adds parameters gives them their conversion values in `init_new_parameters`. A layer reads its settings
    # as `config.layer_settings(layer_idx)` (the method's, after `layer_settings` below), as its cache and the plan do.
    # `forward` counts the tokens its cache has seen (`seen_tokens`): `attend` keeps only the method's own state.

    @staticmethod
    def layer_settings(settings: MethodSettings, source_window: int | None) -> MethodSettings:
        """The settings of one converted layer whose source layer has `source_window` (None: no window). A method
        with a `window` keeps the source's where it is narrower (Mistral 7B v0.1, Phi-3-mini-4k, Gemma's local
        layers): the layer then reads no further back than its source was trained to, and caches no more. Where
        the source's window could not hold the method's sinks, the method's window stays."""
        if source_window is None or "window" not in {field.name for field in dataclasses.fields(settings)}:
            return settings
        if settings.window is not None and settings.window <= source_window:
            return settings
        if source_window <= getattr(settings, "sinks", 0):
            return settings
        return dataclasses.replace(settings, window=source_window)

    @staticmethod
    def cache_layer(settings: MethodSettings) -> StateCacheLayer:
        """A new, empty cache for one converted layer (what `LinearizeCache` holds for it)."""
        raise NotImplementedError

    @staticmethod
    def state_bytes(
        settings: MethodSettings, heads: int, kv_heads: int, head_dim: int, dtype_bytes: int, tokens: int
    ) -> int:
        """Cache bytes of one converted layer for one sequence after `tokens` tokens (what `--dry-run` plans)."""
        raise NotImplementedError

    def init_new_parameters(self, device: torch.device, dtype: torch.dtype) -> None:
        """Give the parameters the method adds, which no source checkpoint holds, their values at conversion."""

    def attend(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        state,
        valid: torch.Tensor | None,
    ) -> torch.Tensor:
        """The method's attention before `o_proj`, `[B, T, H * D]`, from the layer input `[B, T, hidden]`, the
        rotary tables (cos, sin) `[B, T, R]` (R <= D: see `apply_rope`), the layer's cache (None without one; updated
        in place) and which tokens are real (`[B, T]` bool, or None when all are)."""
        raise NotImplementedError

    @staticmethod
    def token_validity(padding_mask: torch.Tensor | None, length: int) -> torch.Tensor | None:
        """Which of the last `length` tokens are real (not padding), as a bool [B, T], from the 2-D mask."""
        if padding_mask is None:
            return None
        if padding_mask.ndim != 2:
            raise ValueError(
                "converted attention layers need the 2-D padding mask [batch, tokens]; got shape "
                f"{tuple(padding_mask.shape)}. Pass the tokenizer's attention_mask unchanged."
            )
        return padding_mask[:, -length:].bool()

    @staticmethod
    def layer_cache(cache, layer_idx: int):
        return None if cache is None else cache.layers[layer_idx]


def packed_document_ids(position_ids: torch.Tensor) -> torch.Tensor | None:
    """For rows packing several documents, the document of each token `[B, T]` (0, 1, ... within each row): a
    document starts wherever the position does not follow the previous one (transformers' convention for packed
    rows). None when no row has a second document."""
    follows = position_ids[:, 1:] == position_ids[:, :-1] + 1  # [B, T - 1]
    if bool(follows.all()):
        return None
    return torch.nn.functional.pad((~follows).long().cumsum(1), (1, 0))


class _DocumentGroup(NamedTuple):
    tokens: torch.Tensor  # [n]: the flat indices (over B * T) of the group's tokens
    slots: torch.Tensor  # [n]: where each sits in the group's flattened left-padded batch
    shape: tuple[int, int]  # [N, L]: its documents, the longest's length
    valid: torch.Tensor | None  # [N, L] bool: which slots are real tokens; None when all are

    def split(self, x: torch.Tensor) -> torch.Tensor:
        """`[B, T, ...]` -> `[N, L, ...]`, zeros at padding."""
        flat = x.reshape(-1, *x.shape[2:])[self.tokens]
        batched = flat.new_zeros(self.shape[0] * self.shape[1], *x.shape[2:])
        return batched.index_copy(0, self.slots, flat).view(*self.shape, *x.shape[2:])


class DocumentBatch:
    """The documents of packed rows `[B, T]` as left-padded batches `[N, L]`, which every method already runs
    exactly as it runs each row alone, and back.

    One batch of all documents would pad each to the longest (a 2048-token pack of documents of 1500, 300 and 248
    tokens would run 4500 tokens), so documents are grouped by length such that the padding plus `group_cost` tokens
    a group (its extra launches) is least: here {1500} and {300, 248}, 2100 tokens in two groups."""

    group_cost = 128  # tokens

    @staticmethod
    @functools.lru_cache(maxsize=1)
    def of(document_ids: torch.Tensor) -> DocumentBatch:
        """The batches of `document_ids`, built once per forward pass: the model hands every layer the same tensor,
        and building them syncs with the device."""
        return DocumentBatch(document_ids)

    def __init__(self, document_ids: torch.Tensor):
        device = document_ids.device
        self.shape = document_ids.shape
        starts = torch.ones_like(document_ids, dtype=torch.bool)
        starts[:, 1:] = document_ids[:, 1:] != document_ids[:, :-1]
        document = starts.flatten().long().cumsum(0) - 1  # [B * T]: each token's document, over all rows
        lengths = torch.bincount(document)  # [N]
        first = torch.nonzero(starts.flatten()).squeeze(1)  # [N]: the flat index of each document's first token
        offset = torch.arange(document.numel(), device=device) - first[document]  # [B * T]: index within its document
        self.groups = []
        for members in length_groups(lengths.tolist(), self.group_cost):
            rank = torch.full_like(lengths, -1)
            rank[members] = torch.arange(len(members), device=device)
            tokens = torch.nonzero(rank[document] >= 0).squeeze(1)
            docs = document[tokens]
            longest = int(lengths[members[0]])
            slots = rank[docs] * longest + (longest - lengths[docs]) + offset[tokens]
            shape = (len(members), longest)
            valid = None  # documents of one length: no padding, and the methods' unmasked paths
            if len(tokens) < shape[0] * shape[1]:
                valid = torch.zeros(shape[0] * shape[1], dtype=torch.bool, device=device)
                valid[slots] = True
                valid = valid.view(shape)
            self.groups.append(_DocumentGroup(tokens, slots, shape, valid))

    def run(self, attend, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """`attend(x, (cos, sin), valid)` over each group of documents: `x` `[B, T, F]` -> `[B, T, F']`. `valid`
        is `[N, L]` bool, or None when no document of the group is padded."""
        out = None
        for group in self.groups:
            y = attend(group.split(x), (group.split(cos), group.split(sin)), group.valid)  # [N, L, F']
            y = y.reshape(-1, *y.shape[2:])[group.slots]
            out = y.new_zeros(self.shape.numel(), *y.shape[1:]) if out is None else out
            out = out.index_copy(0, group.tokens, y)
        return out.view(*self.shape, *out.shape[1:])


def length_groups(lengths: list[int], group_cost: int) -> list[list[int]]:
    """Documents (indices into `lengths`) in groups, longest first, that minimise the tokens run: each group's
    documents padded to its longest, plus `group_cost` a group. Sorted by length, the best grouping is contiguous,
    so a dynamic programme over the sorted order finds it."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    best, cut = [0] + [None] * len(order), [0] * (len(order) + 1)  # best[j]: least cost of the first j documents
    for j in range(1, len(order) + 1):
        for i in range(j):
            cost = best[i] + (j - i) * lengths[order[i]] + group_cost
            if best[j] is None or cost < best[j]:
                best[j], cut[j] = cost, i
    groups, j = [], len(order)
    while j:
        groups.append(order[cut[j] : j])
        j = cut[j]
    return groups[::-1]
