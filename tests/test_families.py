"""What each family adapter must reproduce beyond Llama's attention, checked on tiny random models: Gemma's
sliding-window layers (left as they are, or converted with their own window and rotary tables) and logit caps,
Phi-3's fused projection and partial rotary embeddings, SmolLM3's layers without RoPE, Granite's multipliers.
The guarantees every family shares (exact Parallax and swa, cached decoding, padding, save/reload, attention
transfer) run over `tests.tiny.FAMILIES` in the tests of each part."""

from __future__ import annotations

import pytest
import torch

from linearize.convert import convert_model, plan_conversion
from linearize.errors import LinearizeError
from linearize.families import FAMILIES as ADAPTERS
from linearize.families import UnsupportedModelError, get_family
from linearize.layers.base import LinearizedAttention
from linearize.training.transfer import teacher_attention
from tests.tiny import (
    CONFIGS,
    FAMILIES,
    cache_of,
    converted_model,
    model_from_config,
    source_attention_call,
    source_model,
)


def test_every_family_has_a_tiny_model():
    assert set(FAMILIES) == set(ADAPTERS)


def test_a_multimodal_gemma3_says_which_gemma3_converts():
    with pytest.raises(UnsupportedModelError, match=r"image-text model.*Gemma 3 1B \(gemma3_text\)"):
        get_family("gemma3")


@pytest.mark.parametrize("wrapper", ["LlavaConfig", "Mistral3Config", "Gemma3Config"])
def test_a_multimodal_model_names_its_language_model(wrapper):
    import transformers

    config = getattr(transformers, wrapper)()
    text = config.text_config.model_type
    with pytest.raises(UnsupportedModelError, match=rf"multimodal model .* around a {text} language model"):
        plan_conversion(config, "org/vlm", "liger")


@pytest.mark.parametrize("family", ["gemma2", "gemma3_text"])
def test_an_embedding_model_that_attends_both_ways_is_refused(family):
    """EmbeddingGemma is a gemma3_text checkpoint whose attention is bidirectional (`use_bidirectional_attention`),
    which transformers loads as a causal LM: converted, every layer became causal and Parallax was no longer the
    source (logits 0.6 apart), with nothing said."""
    config = CONFIGS[family]()
    config.use_bidirectional_attention = True
    with pytest.raises(UnsupportedModelError, match=r"bidirectional.*converts causal LMs"):
        plan_conversion(config, "google/embeddinggemma-300m", "parallax", convert_layers="all")
    config.use_bidirectional_attention = False
    plan_conversion(config, family, "parallax")


def _logits(model, ids, **kwargs):
    with torch.no_grad():
        return model(ids, use_cache=False, **kwargs).logits


@pytest.mark.parametrize("family", ["gemma2", "gemma3_text"])
def test_gemma_converts_its_global_layers_and_keeps_the_sliding_ones(family):
    config = CONFIGS[family]()
    plan = plan_conversion(config, family, "liger")
    assert plan.config.linearize["softmax_layers"] == [0]  # layer 0 attends within a window of 8
    assert plan.layer_groups() == [("0", "softmax (sliding_attention)"), ("1", "liger")]
    every = plan_conversion(config, family, "liger", convert_layers="all")
    assert every.config.linearize["softmax_layers"] == []


@pytest.mark.parametrize("family", ["gemma2", "gemma3_text"])
def test_converted_sliding_layers_keep_their_window_and_rotary_tables(family):
    """With every layer sliding and converted, Parallax with the source's window (a zero probe) is the source
    exactly: each layer attends over its own window, with Gemma 3's local rotary tables."""
    config = CONFIGS[family]()
    config.layer_types = ["sliding_attention"] * config.num_hidden_layers
    torch.manual_seed(0)
    source = model_from_config(config).eval()
    plan = plan_conversion(config, family, "parallax", window=config.sliding_window, convert_layers="all")
    model = convert_model(source, plan.config)
    ids = torch.randint(3, 128, (2, 30))
    torch.testing.assert_close(_logits(model, ids), _logits(source, ids), rtol=1e-5, atol=1e-5)
    with torch.no_grad():  # cached decoding over the converted sliding layers
        prefix = model(ids[:, :20], use_cache=True)
        cache = cache_of(prefix)
        steps = [model(ids[:, t : t + 1], cache=cache, use_cache=True).logits for t in range(20, 30)]
    torch.testing.assert_close(torch.cat(steps, 1), _logits(source, ids)[:, 20:], rtol=1e-5, atol=1e-5)


def test_converted_gemma3_layers_read_their_own_rotary_tables():
    """Gemma 3 rotates sliding and global layers with different tables; over 8 tokens (inside every window) a
    zero-probe Parallax model with every layer converted is the source only if each layer reads its own."""
    source = source_model("gemma3_text")
    plan = plan_conversion(source.config, "gemma3_text", "parallax", convert_layers="all")
    model = convert_model(source, plan.config)
    ids = torch.randint(3, 128, (2, 8))
    torch.testing.assert_close(_logits(model, ids), _logits(source, ids), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("convert_layers", ["global", "all"])
def test_planned_cache_counts_the_kept_sliding_layer_at_its_window(convert_layers):
    model = converted_model("gemma2", "liger", convert_layers=convert_layers)
    plan = plan_conversion(
        CONFIGS["gemma2"](), "gemma2", "liger", dtype="float32", window=8, convert_layers=convert_layers
    )
    with torch.no_grad():
        cache = cache_of(model(torch.randint(3, 128, (1, 20)), use_cache=True))
    assert cache.nbytes() == plan.converted_cache_bytes(20)
    assert plan.kv_cache_bytes(20) == plan.kv_cache_bytes(20, [0, 1]) == 2 * 2 * 32 * (7 + 20) * 4


def test_teacher_of_a_converted_sliding_layer_is_the_source_sliding_attention():
    """Attention transfer on Gemma 2 with every layer converted: layer 0's teacher is its source's window of 8, with
    the logit cap, not causal attention over the whole text."""
    model = converted_model("gemma2", "liger", convert_layers="all")
    _assert_teacher_is_the_source(source_model("gemma2"), model.model.layers[0].self_attn)


def test_teacher_of_a_model_with_one_window_for_every_layer_is_windowed():
    """Phi-3-mini-4k and Mistral 7B v0.1 give every layer the config's sliding window (no layer_types)."""
    config = CONFIGS["phi3"]()
    config.sliding_window = 8
    torch.manual_seed(0)
    source = type(source_model("phi3"))(config).eval()
    model = convert_model(source, plan_conversion(config, "phi3", "liger").config)
    _assert_teacher_is_the_source(source, model.model.layers[1].self_attn)


@pytest.mark.parametrize("family", ["mistral", "phi3"])
def test_the_plan_names_a_window_in_every_layer(family):
    config = CONFIGS[family]()
    assert "sliding window" not in " ".join(get_family(family).specifics(config))
    config.sliding_window = 8
    shown = "a sliding window of 8 tokens in every layer"
    assert shown in get_family(family).specifics(config)
    assert shown in get_family(family).specifics(plan_conversion(config, family, "swa").config)  # the converted one
    assert shown not in get_family("gemma2").specifics(CONFIGS["gemma2"]())  # sliding-window layers, said so


@pytest.mark.parametrize("family", ["qwen2", "qwen3", "smollm3"])
def test_the_plan_names_the_layers_with_a_window(family):
    """Qwen2/3 (`use_sliding_window`, `max_window_layers`) and SmolLM3 give some layers a window, which their
    converted layers keep (narrowing the method's): the plan said nothing of it, and showed the method's window."""
    config = CONFIGS[family]()  # SmolLM3 slides in its layers without RoPE: layer 1 of the tiny model
    config.use_sliding_window, config.sliding_window = True, 8
    config.layer_types = ["full_attention", "sliding_attention"]
    assert "a sliding window of 8 tokens in layer 1" in get_family(family).specifics(config)
    plan = plan_conversion(config, family, "liger")
    assert [plan.config.layer_settings(i).window for i in (0, 1)] == [64, 8]
    assert "a sliding window of 8 tokens in layer 1" in get_family(family).specifics(plan.config)


def _assert_teacher_is_the_source(source, attn):
    """Over 20 tokens, `attn`'s teacher is its source layer's output, window of 8 and all."""
    inputs, expected = source_attention_call(source, attn.layer_idx, torch.randint(3, 128, (2, 20)))
    with torch.no_grad():
        teacher = teacher_attention(attn, inputs["hidden_states"], inputs["position_embeddings"], None)
    assert attn.source_window == 8
    torch.testing.assert_close(attn.o_proj(teacher), expected, rtol=1e-5, atol=1e-5)


def test_convert_layers_global_needs_a_global_layer():
    config = CONFIGS["gemma2"]()
    config.layer_types = ["sliding_attention"] * config.num_hidden_layers
    with pytest.raises(LinearizeError, match="use --convert-layers all"):
        plan_conversion(config, "gemma2", "liger")
    with pytest.raises(LinearizeError, match="'local' is not a choice"):
        plan_conversion(CONFIGS["gemma2"](), "gemma2", "liger", convert_layers="local")


def test_auto_layers_need_every_layer_convertible():
    with pytest.raises(LinearizeError, match="add --convert-layers all"):
        plan_conversion(CONFIGS["gemma2"](), "gemma2", "liger", softmax_layers="auto:1")
    plan = plan_conversion(CONFIGS["gemma2"](), "gemma2", "liger", softmax_layers="auto:1", convert_layers="all")
    assert plan.config.linearize["softmax_layers"] == []


def test_other_families_convert_every_layer_by_default():
    for family in FAMILIES:
        if not ADAPTERS[family].sliding_layers:
            assert plan_conversion(CONFIGS[family](), family, "liger").config.linearize["softmax_layers"] == []


def test_gemma2_attention_cap_is_applied():
    """Without its logit cap, the converted Gemma 2 layer would not be the source (the tiny config's cap bites)."""
    model, source = converted_model("gemma2", "parallax", trained=False), source_model("gemma2")
    ids = torch.randint(3, 128, (2, 24))
    expected = _logits(source, ids)
    torch.testing.assert_close(_logits(model, ids), expected, rtol=1e-5, atol=1e-5)
    for layer in model.modules():
        if isinstance(layer, LinearizedAttention):
            assert layer.softcap == 0.05
            layer.softcap = None
    assert (_logits(model, ids) - expected).abs().max() > 1e-3


@pytest.mark.parametrize("family,field", [("gemma2", "final_logit_softcapping"), ("granite", "logits_scaling")])
def test_the_family_head_transform_is_applied(family, field):
    model, source = converted_model(family, "parallax", trained=False), source_model(family)
    ids = torch.randint(3, 128, (1, 12))
    torch.testing.assert_close(_logits(model, ids), _logits(source, ids), rtol=1e-5, atol=1e-5)
    setattr(model.config, field, None)
    assert (_logits(model, ids) - _logits(source, ids)).abs().max() > 1e-2


def test_phi3_splits_its_fused_projection_and_rotates_part_of_each_head():
    model = converted_model("phi3", "liger")
    layer = model.model.layers[0].self_attn
    assert hasattr(layer, "qkv_proj") and not hasattr(layer, "q_proj")
    hidden = torch.randn(1, 5, 64)
    cos, sin = model.model.rotary_emb(hidden, torch.arange(5)[None])
    assert cos.shape[-1] == layer.head_dim // 2  # partial_rotary_factor 0.5
    q, k, v, _ = layer.project(hidden)
    fused = layer.qkv_proj(hidden)
    torch.testing.assert_close(q.flatten(2), fused[..., :64])
    torch.testing.assert_close(v.flatten(2), fused[..., 64 + 32 :])
    q_rot, _ = layer.rotate(q, k, (cos, sin))
    torch.testing.assert_close(q_rot[..., 8:], q[..., 8:])  # the channels past the rotary tables pass unrotated
    assert not torch.allclose(q_rot[..., 1:, :, :8], q[..., 1:, :, :8])


def test_smollm3_layers_without_rope_do_not_rotate():
    model = converted_model("smollm3", "liger")
    assert [layer.self_attn.use_rope for layer in model.model.layers] == [True, False]


def test_olmo2_norms_q_and_k_over_the_whole_projection():
    layer = converted_model("olmo2", "liger").model.layers[0].self_attn
    assert layer.qk_norm == "projection" and layer.q_norm.weight.shape == (64,)
    hidden = torch.randn(1, 3, 64)
    q, _, _, _ = layer.project(hidden)
    torch.testing.assert_close(q.flatten(2), layer.q_norm(layer.q_proj(hidden)))


def test_generation_uses_the_converted_cache_whatever_cache_the_source_asks_for():
    source = source_model("gemma2")
    source.generation_config.cache_implementation = "hybrid"  # what Gemma checkpoints ship
    model = convert_model(source, plan_conversion(source.config, "gemma2", "liger").config)
    assert model.generation_config.cache_implementation is None
    assert source.generation_config.cache_implementation == "hybrid"
    ids = torch.randint(3, 128, (1, 10))
    out = model.generate(ids, max_new_tokens=4, do_sample=False, return_dict_in_generate=True)
    assert type(cache_of(out)).__name__ == "LinearizeCache"
