"""linearize: convert pretrained Hugging Face LLMs from softmax attention to linear or hybrid attention.

Importing the package registers the converted-model classes with transformers, so
`AutoModelForCausalLM.from_pretrained(folder)` loads a converted model.
"""

__version__ = "0.1.0"

from .models import LinearizeCache, LinearizeConfig, LinearizeForCausalLM  # noqa: E402

__all__ = ["LinearizeCache", "LinearizeConfig", "LinearizeForCausalLM", "__version__"]
