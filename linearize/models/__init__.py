"""Converted-model classes, registered with transformers' Auto classes on import."""

from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForQuestionAnswering,
    AutoModelForSequenceClassification,
    AutoModelForTokenClassification,
)

from .cache import LinearizeCache
from .configuration import LinearizeConfig
from .modeling import LinearizeForCausalLM, NoHeadlessModel, NoOtherHead

AutoConfig.register(LinearizeConfig.model_type, LinearizeConfig, exist_ok=True)
AutoModelForCausalLM.register(LinearizeConfig, LinearizeForCausalLM, exist_ok=True)
AutoModel.register(LinearizeConfig, NoHeadlessModel, exist_ok=True)  # to refuse by name
for head in (AutoModelForSequenceClassification, AutoModelForTokenClassification, AutoModelForQuestionAnswering):
    head.register(LinearizeConfig, NoOtherHead, exist_ok=True)

__all__ = ["LinearizeCache", "LinearizeConfig", "LinearizeForCausalLM"]
