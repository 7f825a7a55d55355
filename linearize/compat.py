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
