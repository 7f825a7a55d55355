"""Model families that `linearize` can convert.

A family is the small adapter between a transformers architecture and our attention layers: where its
classes live and what its attention module does beyond the standard `q_proj/k_proj/v_proj/o_proj` with
rotary embeddings. Adding a family is one `Family(...)` entry below, provided its attention module has
those four projections (and, optionally, per-head `q_norm`/`k_norm` applied before RoPE, as in Qwen3).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import TYPE_CHECKING

from .errors import LinearizeError

if TYPE_CHECKING:  # the CLI lists the families without importing torch
    from torch import nn


class UnsupportedModelError(LinearizeError, ValueError):
    """The source model's architecture has no family adapter."""


@dataclass(frozen=True)
class Family:
    model_type: str  # `config.model_type` of the source checkpoint
    module: str  # transformers module holding the classes
    prefix: str  # class-name prefix, e.g. "Llama" -> LlamaModel, LlamaAttention
    qk_norm: bool = False  # attention applies RMSNorm per head to q and k before RoPE

    def _class(self, suffix: str) -> type[nn.Module]:
        return getattr(importlib.import_module(self.module), self.prefix + suffix)

    @property
    def base_model_class(self) -> type[nn.Module]:
        return self._class("Model")

    @property
    def attention_class(self) -> type[nn.Module]:
        return self._class("Attention")


FAMILIES: dict[str, Family] = {
    family.model_type: family
    for family in (
        Family("llama", "transformers.models.llama.modeling_llama", "Llama"),
        Family("mistral", "transformers.models.mistral.modeling_mistral", "Mistral"),
        Family("qwen2", "transformers.models.qwen2.modeling_qwen2", "Qwen2"),
        Family("qwen3", "transformers.models.qwen3.modeling_qwen3", "Qwen3", qk_norm=True),
    )
}


def get_family(model_type: str) -> Family:
    """Return the adapter for `model_type`, or raise an error that lists what is supported."""
    try:
        return FAMILIES[model_type]
    except KeyError:
        supported = ", ".join(sorted(FAMILIES))
        raise UnsupportedModelError(
            f"model_type '{model_type}' is not supported; linearize converts: {supported}. "
            "A new family needs one adapter entry in linearize/families.py."
        ) from None
