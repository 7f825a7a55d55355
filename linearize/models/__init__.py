"""Converted-model classes, registered with transformers' Auto classes on import."""

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from .cache import LinearizeCache
from .configuration import LinearizeConfig
from .modeling import LinearizeForCausalLM, NoHeadlessModel

AutoConfig.register(LinearizeConfig.model_type, LinearizeConfig, exist_ok=True)
AutoModelForCausalLM.register(LinearizeConfig, LinearizeForCausalLM, exist_ok=True)
AutoModel.register(LinearizeConfig, NoHeadlessModel, exist_ok=True)  # to refuse by name

__all__ = ["LinearizeCache", "LinearizeConfig", "LinearizeForCausalLM"]
