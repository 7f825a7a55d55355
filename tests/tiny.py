"""Tiny random models of every supported family, built from configs (nothing is downloaded)."""

from __future__ import annotations

import inspect

import torch
from transformers import (
    AutoModelForCausalLM,
    Gemma2Config,
    Gemma3TextConfig,
    GraniteConfig,
    LlamaConfig,
    MistralConfig,
    Olmo2Config,
    Phi3Config,
    Qwen2Config,
    Qwen3Config,
    SmolLM3Config,
)

from linearize.compat import CACHE_ARG
from linearize.convert import convert_model, plan_conversion
from linearize.families import get_family

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

# Each family's specifics at values that make them matter in a short sequence: a window of 8, logit caps that the
# random logits reach (Gemma 2's attention cap of 0.05 moves the logits by 3e-3), scales that are not 1/sqrt(d).
_GEMMA = dict(
    head_dim=32, query_pre_attn_scalar=24, sliding_window=8, layer_types=["sliding_attention", "full_attention"]
)
CONFIGS = {
    "llama": lambda: LlamaConfig(**_COMMON, tie_word_embeddings=True),
    "mistral": lambda: MistralConfig(**_COMMON, sliding_window=None, tie_word_embeddings=False),
    "qwen2": lambda: Qwen2Config(**_COMMON, tie_word_embeddings=True),
    "qwen3": lambda: Qwen3Config(**_COMMON, head_dim=32, tie_word_embeddings=False),
    "gemma2": lambda: Gemma2Config(**_COMMON, **_GEMMA, attn_logit_softcapping=0.05, final_logit_softcapping=0.3),
    "gemma3_text": lambda: Gemma3TextConfig(**_COMMON, **_GEMMA, final_logit_softcapping=0.3),
    "phi3": lambda: Phi3Config(**_COMMON, partial_rotary_factor=0.5, tie_word_embeddings=False),
    "olmo2": lambda: Olmo2Config(**_COMMON, tie_word_embeddings=False),
    "smollm3": lambda: SmolLM3Config(**_COMMON, no_rope_layers=[1, 0], tie_word_embeddings=True),
    "granite": lambda: GraniteConfig(
        **_COMMON,
        attention_multiplier=0.2,
        embedding_multiplier=3.0,
        residual_multiplier=0.5,
        logits_scaling=2.0,
        tie_word_embeddings=True,
    ),
}
FAMILIES = list(CONFIGS)


def attention_projections(family: str) -> list[str]:
    """The names of the attention's input projections (LoRA targets), as the family's entry declares them."""
    return list(get_family(family).input_projections)


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


def model_from_config(config):
    """The causal LM of `config`, with eager attention wherever the config caps attention logits: transformers 5.17
    defaults Gemma 2 to SDPA, which drops the cap, so the source would not be the model its config describes
    (converted layers keep the cap)."""
    implementation = "eager" if getattr(config, "attn_logit_softcapping", None) else None
    return AutoModelForCausalLM.from_config(config, attn_implementation=implementation)


def source_model(family: str, seed: int = 0):
    torch.manual_seed(seed)
    model = model_from_config(CONFIGS[family]())
    # Random biases and norm weights, so that a layer that ignored them would be caught.
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                param.add_(torch.randn_like(param) * 0.5)
    return model.eval()


def converted_model(
    family: str,
    variant: str,
    softmax_layers: str | None = None,
    seed: int = 0,
    trained: bool = True,
    convert_layers: str | None = None,
):
    """A tiny converted model. `trained` gives parameters that convert to an exact identity (Parallax's zero probe)
    random values, so that tests of the method's paths see them act. `convert_layers` "all" converts Gemma's
    sliding-window layer too (by default it stays softmax attention)."""
    source = source_model(family, seed)
    method, options = VARIANTS[variant]
    plan = plan_conversion(
        source.config, family, method, softmax_layers=softmax_layers, convert_layers=convert_layers, **options
    )
    model = convert_model(source, plan.config)
    if trained and method == "parallax":
        with torch.no_grad():
            for layer in model.model.layers:
                if hasattr(layer.self_attn, "r_proj"):
                    layer.self_attn.r_proj.weight.normal_(0, 0.1)
    return model


def rotary_tables(model, hidden: torch.Tensor, position_ids: torch.Tensor, layer_idx: int):
    """The rotary tables (cos, sin) that layer `layer_idx` of a converted model reads: Gemma 3 keeps one pair per
    layer type."""
    rotary = model.model.rotary_emb
    if "layer_type" in inspect.signature(rotary.forward).parameters:
        return rotary(hidden, position_ids, model.config.source_layer_types[layer_idx])
    return rotary(hidden, position_ids)


def source_attention_call(source, layer_idx: int, ids: torch.Tensor) -> tuple[dict, torch.Tensor]:
    """The keyword inputs and the output of layer `layer_idx`'s attention module when `source` reads `ids`."""
    seen = {}
    handle = source.model.layers[layer_idx].self_attn.register_forward_hook(
        lambda m, args, kwargs, out: seen.update(out=out[0], inputs=kwargs), with_kwargs=True
    )
    with torch.no_grad():
        source(ids)
    handle.remove()
    return seen["inputs"], seen["out"]


def assert_computes_the_source(model, source, ids: torch.Tensor, prefill: int):
    """`model` gives `source`'s logits for `ids`, in a full forward and decoding token by token after a prefill of
    `prefill` tokens; returns the cache the decoding left."""
    with torch.no_grad():
        expected = source(ids).logits
        torch.testing.assert_close(model(ids, use_cache=False).logits, expected, rtol=1e-5, atol=1e-5)
        out = model(ids[:, :prefill], use_cache=True)
        cache, steps = cache_of(out), [out.logits[:, -1]]
        for t in range(prefill, ids.shape[1] - 1):
            out = model(ids[:, t : t + 1], **{CACHE_ARG: cache}, use_cache=True)
            steps.append(out.logits[:, -1])
    torch.testing.assert_close(torch.stack(steps, 1), expected[:, prefill - 1 : -1], rtol=1e-5, atol=1e-5)
    return cache


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
