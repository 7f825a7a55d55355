"""`LinearizeForCausalLM`: the source family's model with some attention layers converted.

The decoder stack is the family's own `*Model` (embeddings, norms, MLPs, rotary tables and the decoder loop
stay transformers' code); only `self_attn` of converted layers is replaced. State-dict keys are the
source's, so converting is loading the source weights into this class.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

# module, not names: when linearize.compat is what first imports transformers, this module is imported (to
# register the classes, see linearize.registration) before compat has defined them
from .. import compat
from ..families import get_family
from ..layers.base import packed_document_ids
from ..methods import get_method
from .cache import LinearizeCache
from .configuration import LinearizeConfig


class LinearizePreTrainedModel(PreTrainedModel):
    config_class = LinearizeConfig
    config: LinearizeConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_flex_attn = True
    _supports_attention_backend = True


class LinearizeForCausalLM(LinearizePreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}
    # Converted layers keep a recurrent state that cannot be rolled back (no assisted decoding).
    _is_stateful = True

    def __init__(self, config: LinearizeConfig):
        super().__init__(config)
        family = get_family(config.base_model_type)
        layer_class = get_method(config.method).layer_class
        self.model = family.base_model_class(config.family_config())
        for layer_idx, decoder_layer in enumerate(self.model.layers):
            if config.is_converted(layer_idx):
                decoder_layer.self_attn = layer_class(config, layer_idx, family)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def family_logits(self, logits: torch.Tensor) -> torch.Tensor:
        """What the family's own head does after `lm_head`: Granite divides by `logits_scaling`, Gemma 2/3 cap the
        logits at `final_logit_softcapping`."""
        scaling = getattr(self.config, "logits_scaling", None)
        if scaling is not None:
            logits = logits / scaling
        cap = getattr(self.config, "final_logit_softcapping", None)
        if cap is not None:
            logits = cap * torch.tanh(logits / cap)
        return logits

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        return False  # `forward` creates a LinearizeCache, which `generate` then carries from step to step

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: LinearizeCache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        past_key_values: LinearizeCache | None = None,
        **kwargs,
    ):
        cache = cache if cache is not None else past_key_values
        use_cache = getattr(self.config, "use_cache", True) if use_cache is None else use_cache
        if use_cache and not isinstance(cache, LinearizeCache):
            if cache is not None and cache.get_seq_length() > 0:
                raise TypeError(
                    f"{type(self).__name__} needs a LinearizeCache, got a filled {type(cache).__name__}; pass "
                    "cache=None (one is created) or a LinearizeCache(model.config)"
                )
            cache = LinearizeCache(self.config)
        if not use_cache:
            cache = None

        if position_ids is not None and attention_mask is None and cache is None:
            # packed rows (transformers' convention: positions restart at each document): converted layers keep the
            # documents apart, as transformers' causal mask does for the softmax layers
            document_ids = packed_document_ids(position_ids.view(-1, position_ids.shape[-1]))
            if document_ids is not None:
                batch = (input_ids if input_ids is not None else inputs_embeds).shape[0]
                kwargs["document_ids"] = document_ids.expand(batch, -1)
        if attention_mask is not None:
            if attention_mask.ndim != 2:
                raise ValueError("LinearizeForCausalLM takes the 2-D attention mask [batch, tokens] (1 = real token)")
            kwargs["padding_mask"] = attention_mask
            if position_ids is None:
                # Positions count real tokens only, so a left-padded row gets the positions it has unpadded.
                length = (input_ids if input_ids is not None else inputs_embeds).shape[1]
                position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, -length:]

        outputs = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            **{compat.CACHE_ARG: cache},
            **kwargs,
        )
        hidden_states = outputs.last_hidden_state
        if isinstance(logits_to_keep, int) and logits_to_keep:
            hidden_states = hidden_states[:, -logits_to_keep:]
        elif isinstance(logits_to_keep, torch.Tensor):
            hidden_states = hidden_states[:, logits_to_keep]
        logits = self.family_logits(self.lm_head(hidden_states))

        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs)
        return CausalLMOutputWithPast(loss=loss, logits=logits, **{compat.OUTPUT_CACHE_FIELD: cache})
