"""Converted-model classes, registered with transformers' Auto classes on import."""

from transformers import AutoConfig, AutoModelForCausalLM

from .cache import LinearizeCache
from .configuration import LinearizeConfig
from .modeling import LinearizeForCausalLM

AutoConfig.register(LinearizeConfig.model_type, LinearizeConfig, exist_ok=True)
AutoModelForCausalLM.register(LinearizeConfig, LinearizeForCausalLM, exist_ok=True)

__all__ = ["LinearizeCache", "LinearizeConfig", "LinearizeForCausalLM"]
