"""Model families that `linearize` can convert.

A family is the small adapter between a transformers architecture and our attention layers: where its
classes live and what its attention module does beyond `q_proj/k_proj/v_proj/o_proj` with rotary embeddings.
Adding a family is one `Family(...)` entry below. What an entry can say:

- `qk_norm`: the attention normalises q and k before RoPE, per head ("head": Qwen3, Gemma 3) or over the whole
  projection ("projection": OLMo 2);
- `fused_qkv`: one `qkv_proj` module computes q, k and v (Phi-3);
- `logit_softcap`: the attention caps its logits at the source attention's `attn_logit_softcapping` (Gemma 2);
- `sliding_layers`: the family interleaves sliding-window layers with global ones (Gemma 2/3), which already keep
  a constant-size cache and so stay as they are unless `--convert-layers all`.

What needs no entry, because the family's own code or the layer reads it from the source attention: the softmax
scale (`scaling`: Gemma's `query_pre_attn_scalar`, Granite's `attention_multiplier`), partial rotary embeddings
(the rotary tables are narrower than the head, Phi-3), layers without RoPE (`use_rope`, SmolLM3), per-layer-type
rotary tables (Gemma 3) and multipliers on embeddings, residuals and logits (Granite; logits also in
`LinearizeForCausalLM`).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import TYPE_CHECKING

from .errors import LinearizeError

if TYPE_CHECKING:  # the CLI lists the families without importing torch
    from torch import nn


# `--convert-layers`: which layers of a family with `sliding_layers` are converted
CONVERT_LAYERS = ("global", "all")


class UnsupportedModelError(LinearizeError, ValueError):
    """The source model's architecture has no family adapter."""


@dataclass(frozen=True)
class Family:
    model_type: str  # `config.model_type` of the source checkpoint
    module: str  # transformers module holding the classes
    prefix: str  # class-name prefix, e.g. "Llama" -> LlamaModel, LlamaAttention
    qk_norm: str | None = None  # "head" or "projection": where the attention's q_norm/k_norm apply, before RoPE
    fused_qkv: bool = False  # one `qkv_proj` (q, then k, then v along its output) instead of three projections
    logit_softcap: bool = False  # the attention caps its logits at `attn_logit_softcapping`
    sliding_layers: bool = False  # `layer_types` interleaves "sliding_attention" layers with global ones
    model_suffix: str = "Model"  # the decoder stack's class: prefix + suffix (Gemma 3's text model: "TextModel")

    def _class(self, suffix: str) -> type[nn.Module]:
        return getattr(importlib.import_module(self.module), self.prefix + suffix)

    def specifics(self, config) -> list[str]:
        """What a converted layer of this family reproduces beyond Llama's attention, in words, for `config` (the
        source config or a converted one): what `--dry-run` shows next to the family."""
        found = []
        if self.fused_qkv:
            found.append("fused qkv_proj")
        if self.qk_norm:
            found.append(f"q/k norm {'per head' if self.qk_norm == 'head' else 'over the whole projection'}")
        rope = getattr(config, "rope_parameters", None) or {}
        partial = rope.get("partial_rotary_factor", getattr(config, "partial_rotary_factor", None) or 1.0)
        if partial < 1:
            found.append(f"RoPE on {partial:.0%} of each head")
        without_rope = [i for i, uses in enumerate(getattr(config, "no_rope_layers", None) or []) if not uses]
        if without_rope:
            found.append(f"no RoPE in layers {', '.join(map(str, without_rope))}")
        if getattr(config, "query_pre_attn_scalar", None):
            found.append(f"softmax scale 1/sqrt({config.query_pre_attn_scalar:g})")
        if getattr(config, "attention_multiplier", None):
            found.append(f"softmax scale {config.attention_multiplier:g}")
        if self.logit_softcap and getattr(config, "attn_logit_softcapping", None):
            found.append(f"attention logits capped at {config.attn_logit_softcapping:g}")
        if getattr(config, "final_logit_softcapping", None):
            found.append(f"output logits capped at {config.final_logit_softcapping:g}")
        if getattr(config, "logits_scaling", None) not in (None, 1, 1.0):
            found.append(f"output logits divided by {config.logits_scaling:g}")
        window = getattr(config, "sliding_window", None)
        types = getattr(config, "source_layer_types", None) or getattr(config, "layer_types", None)
        if window and self.sliding_layers:
            found.append(f"sliding-window layers of {window} tokens")
        elif window and (types is None or set(types) == {"sliding_attention"}):  # Mistral 7B v0.1, Phi-3-mini-4k
            found.append(f"a sliding window of {window} tokens in every layer")
        elif window and "sliding_attention" in types:  # Qwen2/3's `max_window_layers`, SmolLM3's layers without RoPE
            sliding = [str(i) for i, t in enumerate(types) if t == "sliding_attention"]
            found.append(f"a sliding window of {window} tokens in layer{'s' * (len(sliding) > 1)} {', '.join(sliding)}")
        return found

    @property
    def input_projections(self) -> tuple[str, ...]:
        """The attention's projections of its input (LoRA targets that attention transfer trains)."""
        return ("qkv_proj",) if self.fused_qkv else ("q_proj", "k_proj", "v_proj")

    @property
    def base_model_class(self) -> type[nn.Module]:
        return self._class(self.model_suffix)

    @property
    def attention_class(self) -> type[nn.Module]:
        return self._class("Attention")


FAMILIES: dict[str, Family] = {
    family.model_type: family
    for family in (
        Family("llama", "transformers.models.llama.modeling_llama", "Llama"),
        Family("mistral", "transformers.models.mistral.modeling_mistral", "Mistral"),
        Family("qwen2", "transformers.models.qwen2.modeling_qwen2", "Qwen2"),
        Family("qwen3", "transformers.models.qwen3.modeling_qwen3", "Qwen3", qk_norm="head"),
        Family(
            "gemma2", "transformers.models.gemma2.modeling_gemma2", "Gemma2", logit_softcap=True, sliding_layers=True
        ),
        Family(
            "gemma3_text",
            "transformers.models.gemma3.modeling_gemma3",
            "Gemma3",
            qk_norm="head",
            sliding_layers=True,
            model_suffix="TextModel",
        ),
        Family("phi3", "transformers.models.phi3.modeling_phi3", "Phi3", fused_qkv=True),
        Family("olmo2", "transformers.models.olmo2.modeling_olmo2", "Olmo2", qk_norm="projection"),
        Family("smollm3", "transformers.models.smollm3.modeling_smollm3", "SmolLM3"),
        Family("granite", "transformers.models.granite.modeling_granite", "Granite"),
    )
}


# Checkpoints that look like a supported family but are not one: what the user can do instead.
_NEAR_MISSES = {
    "gemma3": "Gemma 3 from 4B up is an image-text model; linearize converts text-only models such as Gemma 3 1B "
    "(gemma3_text)",
    "phi4_multimodal": "Phi-4-multimodal is an image-audio-text model; Phi-4-mini (phi3) converts",
    "olmo": "OLMo 1 is not supported; OLMo 2 (olmo2) is",
    "linearize": "This model is already converted by linearize: give the model it came from (its config's "
    "source_model, or the folder it was converted from), which `linearize convert` and `linearize finetune` convert "
    "themselves; a converted folder is what `eval`, `bench`, `generate` and `push` take",
}


def get_family(model_type: str) -> Family:
    """Return the adapter for `model_type`, or raise an error that lists what is supported."""
    try:
        return FAMILIES[model_type]
    except KeyError:
        supported = ", ".join(sorted(FAMILIES))
        # a near miss says what to do instead; anything else may be a family to add
        instead = _NEAR_MISSES.get(model_type, "A new family needs one adapter entry in linearize/families.py")
        raise UnsupportedModelError(
            f"model_type '{model_type}' is not supported; linearize converts: {supported}. {instead}."
        ) from None
