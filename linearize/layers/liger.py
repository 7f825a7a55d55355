"""Liger attention: gated linear attention whose gates come from the pretrained key projection, mixed
with a sliding-window softmax branch (Lan et al., ICML 2025, https://arxiv.org/abs/2503.01496).

Follows the reference code, not the paper, where they differ (docs/methods.md §1.8): the gate is
`log α = logsigmoid(k) / 16` taken from the pre-RoPE key of each KV head (shared across its GQA group);
q and k go through a softmax over the head dim; scale 1; no denominator, no output norm. The window branch
is ordinary softmax attention over RoPE'd q/k and the last `window` keys (current token included), and the
output is `mix * window + (1 - mix) * gated_linear` before `o_proj`, with the paper's `mix = 0.5` by default.
Unlike the reference, decoding keeps a real window cache, so cached decoding equals the full forward.

`mix` (ours; the reference hard-codes 0.5 in every modeling file) is a config value because the right weight
depends on the model: the gated branch reads un-normalised softmax features, so at conversion its output is
unrelated to the teacher's, and on a small model even half of it ruins the converted model. Larger models
tolerate the paper's 0.5 (Liger's "no LoRA" ablation, docs/methods.md §1.8). Dividing the gated branch by its
own normaliser (`S_t^T φ(q_t) / (z_t · φ(q_t))`, z the gated sum of φ(k)) was measured and left out: it starts
far better but ends no better after fine-tuning, as LoRA on k and v learns the scale either way. The
SmolLM2-135M measurements behind both choices are in docs/methods.md §1.9.

`sinks` (ours, default 0 = the paper) lets the window branch also see each row's first `sinks` real tokens,
as the `swa` baseline does (`window` then counts the sinks). Pretrained heads park attention on the first
tokens; a window without them forces that mass onto recent tokens (measured: docs/methods.md §1.9). With sinks
the two branches run as two ops (the sink window and gated linear attention) rather than the Liger op.

`liger-gla` is the same layer without the window branch (the paper's "no SWA" ablation). For qk-norm families
(Qwen3) both branches see the normed q/k, as the teacher does; the gate reads the normed key by default
(`gate_source="normed"`) or the raw one (`"raw"`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..cache_layers import RecentTokens, StateCacheLayer
from ..kernels import gated_linear_attention, resolve_backend
from ..kernels.gla import GLA_BACKENDS
from ..kernels.liger import liger_attention, liger_decode
from ..methods import LigerGlaSettings, LigerSettings
from .base import LinearizedAttention
from .swa import SinkWindowAttention, SinkWindowCacheLayer, sink_window_attention


class LigerCacheLayer(StateCacheLayer):
    """Gated linear state [B, Hkv, D, D] (fp32) plus the previous `window - 1` RoPE'd keys and values."""

    _tensor_fields = ("recurrent_state", "window")

    def __init__(self, window: int | None):
        super().__init__()
        self.recurrent_state: torch.Tensor | None = None
        self.window = RecentTokens(window - 1) if window else None


class LigerSinkCacheLayer(SinkWindowCacheLayer):
    """With sinks: the gated linear state plus the sink and recent tokens of the window branch."""

    _tensor_fields = (*SinkWindowCacheLayer._tensor_fields, "recurrent_state")

    def __init__(self, recent: int, sinks: int):
        super().__init__(recent, sinks)
        self.recurrent_state: torch.Tensor | None = None


class LigerAttention(LinearizedAttention):
    def __init__(self, config, layer_idx, family):
        super().__init__(config, layer_idx, family)
        settings = config.layer_settings(layer_idx)
        with_window = isinstance(settings, LigerSettings)  # liger-gla has no window branch
        self.window = settings.window if with_window else None
        self.sinks = settings.sinks if with_window else 0
        self.mix = settings.mix if with_window else 0.0
        self.gate_normalizer = float(settings.gate_normalizer)
        self.gate_source = settings.gate_source

    @staticmethod
    def cache_layer(settings: LigerSettings | LigerGlaSettings) -> LigerCacheLayer | LigerSinkCacheLayer:
        if not isinstance(settings, LigerSettings):
            return LigerCacheLayer(None)
        if settings.sinks:
            return LigerSinkCacheLayer(settings.window - settings.sinks, settings.sinks)
        return LigerCacheLayer(settings.window)

    def attend(self, hidden_states, position_embeddings, state, valid):
        q, k, v, k_raw = self.project(hidden_states)  # [B, T, H, D], [B, T, Hkv, D] x3

        gate_key = k_raw if self.gate_source == "raw" else k
        log_decay = F.logsigmoid(gate_key.float()) / self.gate_normalizer  # [B, T, Hkv, D] fp32, as is the state
        if valid is not None:  # padding does not decay the state, which a padded token after real ones would
            log_decay = log_decay.masked_fill(~valid[:, :, None, None], 0.0)
        # The ops multiply in the projections' dtype (the model's, or bf16 under autocast: tensor cores for half
        # precision) and accumulate in fp32: the feature maps are softmaxes taken in fp32, then rounded. Padding
        # contributes nothing to the state: its values are zero and it does not decay it.
        dtype = v.dtype
        v_linear = (v if valid is None else v * valid[:, :, None, None]).to(dtype)
        q_linear, k_linear = (x.float().softmax(-1).to(dtype) for x in (q, k))
        initial_state = None if state is None else state.recurrent_state
        linear = (q_linear, k_linear, v_linear, log_decay)
        if self.sinks:
            o, recurrent_state = self._attend_with_sinks(
                q, k, v, valid, linear, initial_state, state, position_embeddings
            )
        elif self.window:
            o, recurrent_state = self._attend_liger(q, k, v, valid, linear, initial_state, state, position_embeddings)
        else:
            o, recurrent_state = gated_linear_attention(
                *linear, scale=1.0, initial_state=initial_state, output_final_state=state is not None,
                backend=self.backend,
                )  # fmt: skip

        if state is not None:
            state.recurrent_state = recurrent_state
        return o.to(hidden_states.dtype).flatten(2)  # [B, T, H * D]

    def _attend_liger(self, q, k, v, valid, linear, initial_state, state, position_embeddings):
        """Window and gated linear branches through the Liger ops: `[B, T, H, D]` and the new state."""
        q_linear, k_linear, v_linear, log_decay = linear
        length = q.shape[1]
        q, k = self.rotate(q, k, position_embeddings)
        keys, values, key_valid = k, v, valid
        if state is not None:
            if valid is None:
                valid = torch.ones_like(k[..., 0, 0], dtype=torch.bool)
            (keys, values, key_valid), _ = state.window.update(k, v, valid)

        if state is not None and length == 1:
            # decoding: one fused step updates the state, attends over the window and mixes
            if initial_state is None:
                batch, _, kv_heads, dim = k_linear.shape
                initial_state = log_decay.new_zeros(batch, kv_heads, dim, v.shape[-1])  # fp32
            o, recurrent_state = liger_decode(
                q_linear[:, 0],
                k_linear[:, 0],
                v_linear[:, 0],
                log_decay[:, 0],
                initial_state,
                q[:, 0],
                keys,  # a one-token update returns the whole ring: exactly the window, in ring order
                values,
                key_valid,
                scale=self.scaling,
                softcap=self.softcap,
                mix=self.mix,
                backend=self.backend,
            )
            return o[:, None], recurrent_state  # [B, 1, H, D]
        # prefill and training: one op runs both branches and the mix; v_linear (zero at padding) serves both,
        # as padded keys are masked out of the window anyway
        past = slice(None, keys.shape[1] - length)  # the cached window before the new tokens (empty without one)
        return liger_attention(
            q_linear,
            k_linear,
            v_linear,
            log_decay,
            q,
            k,
            window=self.window,
            key_valid=key_valid,
            past_k=keys[:, past],
            past_v=values[:, past],
            scale=self.scaling,
            softcap=self.softcap,
            mix=self.mix,
            initial_state=initial_state,
            output_final_state=state is not None,
            backend=self.backend,
        )  # [B, T, H, D] in q.dtype

    def _attend_with_sinks(self, q, k, v, valid, linear, initial_state, state, position_embeddings):
        """The sink window and gated linear attention as two ops, mixed: `[B, T, H, D]` and the new state."""
        q, k = self.rotate(q, k, position_embeddings)
        o_window = sink_window_attention(
            q, k, v, valid, state, recent=self.window - self.sinks, sinks=self.sinks, scale=self.scaling,
            softcap=self.softcap, backend=self.backend,
        )  # fmt: skip
        q_linear, *rest = linear
        half = q_linear.dtype in (torch.float16, torch.bfloat16)  # first: the backend lookup costs a decode step
        if half and resolve_backend(self.backend, q.device, available=GLA_BACKENDS) in ("reference", "torch"):
            # these compute in fp32: fp32 queries give the branch back unrounded, mixed as `torch_liger_attention`
            # mixes it (without a normaliser it can pass float16's range where the mix does not)
            q_linear = q_linear.float()
        o_linear, recurrent_state = gated_linear_attention(
            q_linear, *rest, scale=1.0, initial_state=initial_state, output_final_state=state is not None,
            backend=self.backend,
        )  # fmt: skip
        return torch.lerp(o_linear.float(), o_window.float(), self.mix), recurrent_state  # the mix, in one pass

    @staticmethod
    def state_bytes(settings, heads: int, kv_heads: int, head_dim: int, dtype_bytes: int, tokens: int) -> int:
        recurrent = kv_heads * head_dim * head_dim * 4  # fp32, one per key head (its query heads share it)
        if not isinstance(settings, LigerSettings):
            return recurrent
        if settings.sinks:
            return recurrent + SinkWindowAttention.state_bytes(settings, heads, kv_heads, head_dim, dtype_bytes, tokens)
        window = settings.window  # the previous window - 1 tokens and a spare slot: keys, values and a validity flag
        return recurrent + window * (2 * kv_heads * head_dim * dtype_bytes + 1)
