"""Every transformers-version difference we depend on, feature-detected in one place.

Supported: transformers 5.17 to 5.x. In 5.24 the cache argument of model forwards is `cache`; 5.17 calls it
`past_key_values` (5.24 still accepts that name with a deprecation warning).
"""

from __future__ import annotations

import inspect

from transformers.modeling_outputs import CausalLMOutputWithPast
from transformers.models.llama.modeling_llama import LlamaModel

CACHE_ARG = "cache" if "cache" in inspect.signature(LlamaModel.forward).parameters else "past_key_values"
OUTPUT_CACHE_FIELD = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"


def set_activation_checkpointing(model, enabled: bool) -> None:
    """Turn recomputation of decoder layers in backward on or off (renamed from `gradient_checkpointing_*` after
    5.17; `model` may be wrapped by peft, which forwards these calls)."""
    prefix = "activation" if hasattr(model, "activation_checkpointing_enable") else "gradient"
    if enabled:
        options = {f"{prefix}_checkpointing_kwargs": {"use_reentrant": False}}
        getattr(model, f"{prefix}_checkpointing_enable")(**options)
    else:
        getattr(model, f"{prefix}_checkpointing_disable")()
