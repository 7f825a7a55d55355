"""Tiny random models of every supported family, built from configs (nothing is downloaded)."""

from __future__ import annotations

import torch
from transformers import AutoModelForCausalLM, LlamaConfig, MistralConfig, Qwen2Config, Qwen3Config

from linearize.convert import convert_model, plan_conversion

_COMMON = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=128,
    max_position_embeddings=512,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,
)

CONFIGS = {
    "llama": lambda: LlamaConfig(**_COMMON, tie_word_embeddings=True),
    "mistral": lambda: MistralConfig(**_COMMON, sliding_window=None, tie_word_embeddings=False),
    "qwen2": lambda: Qwen2Config(**_COMMON, tie_word_embeddings=True),
    "qwen3": lambda: Qwen3Config(**_COMMON, head_dim=32, tie_word_embeddings=False),
}
FAMILIES = list(CONFIGS)
# Each tested variant: its method and conversion options. Small windows, so that short test sequences exercise them.
VARIANTS = {
    "liger": ("liger", {"window": 8}),
    "liger-sinks": ("liger", {"window": 8, "sinks": 2, "mix": 0.7}),
    "liger-gla": ("liger-gla", {}),
    "still": ("still", {"chunk_size": 8, "topk": 2}),
    "swa": ("swa", {"window": 8, "sinks": 2}),
    "parallax": ("parallax", {}),
    "parallax-window": ("parallax", {"window": 8}),
}
METHODS = list(VARIANTS)


def source_model(family: str, seed: int = 0):
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(CONFIGS[family]())
    # Random biases and norm weights, so that a layer that ignored them would be caught.
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                param.add_(torch.randn_like(param) * 0.5)
    return model.eval()


def converted_model(family: str, variant: str, softmax_layers: str | None = None, seed: int = 0, trained: bool = True):
    """A tiny converted model. `trained` gives parameters that convert to an exact identity (Parallax's zero probe)
    random values, so that tests of the method's paths see them act."""
    source = source_model(family, seed)
    method, options = VARIANTS[variant]
    plan = plan_conversion(source.config, family, method, softmax_layers=softmax_layers, **options)
    model = convert_model(source, plan.config)
    if trained and method == "parallax":
        with torch.no_grad():
            for layer in model.model.layers:
                if hasattr(layer.self_attn, "r_proj"):
                    layer.self_attn.r_proj.weight.normal_(0, 0.1)
    return model


def cache_of(output):
    return output.cache if "cache" in output else output.past_key_values


def tiny_tokenizer():
    """A word-level tokenizer over 128 ids with a chat template, built in memory."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<pad>", "<s>", "</s>", "<unk>"] + [f"w{i}" for i in range(124)]
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )
    tokenizer.chat_template = "{% for m in messages %}{{ m['content'] }} {% endfor %}"
    return tokenizer


def source_folder(path, family: str = "llama"):
    """Save a tiny random source model with its tokenizer to `path`, like a downloaded checkpoint."""
    source_model(family).save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return path
