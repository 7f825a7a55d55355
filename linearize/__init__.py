"""linearize: convert pretrained Hugging Face LLMs from softmax attention to linear or hybrid attention.

Importing the package registers the converted-model classes with transformers, so
`AutoModelForCausalLM.from_pretrained(folder)` loads a converted model. The registration waits for transformers
to be imported (see `registration`), so that the command line starts without loading torch.
"""

__version__ = "0.1.0"

import importlib

from .errors import LinearizeError  # no imports of its own: the package stays light
from .registration import register_with_transformers

_MODEL_CLASSES = ("LinearizeCache", "LinearizeConfig", "LinearizeForCausalLM")
__all__ = [*_MODEL_CLASSES, "LinearizeError", "__version__"]

register_with_transformers()


def __getattr__(name: str):
    if name in _MODEL_CLASSES:  # they import torch and transformers: only when asked for
        return getattr(importlib.import_module(f"{__name__}.models"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
