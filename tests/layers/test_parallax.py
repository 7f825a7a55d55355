"""The Parallax layer: exact at conversion, its wiring against the plain op, the probe's first gradient, the window
against the swa baseline, save/reload. Cached decoding, padding and generation run for every method in
tests/models (the `parallax` and `parallax-window` variants, with a random probe)."""

import pytest
import torch
from linearize.kernels.parallax import naive_parallax_attention
from transformers import AutoModelForCausalLM

from linearize.compat import CACHE_ARG
from linearize.convert import convert_model, plan_conversion, save_model
from tests.tiny import (
    FAMILIES,
    assert_computes_the_source,
    cache_of,
    converted_model,
    model_from_config,
    rotary_tables,
    source_model,
)


@pytest.mark.parametrize("family", FAMILIES)
def test_converted_model_computes_the_source_exactly(family):
    """A zero probe is softmax attention: the converted logits equal the source's, padded rows too."""
    model, source = converted_model(family, "parallax", trained=False), source_model(family)
    ids = torch.randint(3, 128, (2, 37))
    mask = torch.ones_like(ids)
    mask[1, :9] = 0
    with torch.no_grad():
        actual = model(ids, attention_mask=mask, use_cache=False).logits
        position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
        expected = source(ids, attention_mask=mask, position_ids=position_ids).logits
    torch.testing.assert_close(actual[mask.bool()], expected[mask.bool()], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_parallax_layer_is_the_plain_op_on_its_projections(family):
    model = converted_model(family, "parallax")
    layer = model.model.layers[model.config.converted_layers()[0]].self_attn
    hidden = torch.randn(2, 29, model.config.hidden_size)
    cos, sin = rotary_tables(model, hidden, torch.arange(29)[None].expand(2, -1), layer.layer_idx)
    with torch.no_grad():
        actual, _ = layer(hidden, position_embeddings=(cos, sin))
        q, k, v, _ = layer.project(hidden)
        r = layer.r_proj(hidden if layer.r_down is None else layer.r_down(hidden)).view(*q.shape)
        q, k = layer.rotate(q, k, (cos, sin))
        r, _ = layer.rotate(r, k, (cos, sin))  # the probe rotates like the query
        o = naive_parallax_attention(
            q.double(), r.double(), k.double(), v.double(), scale=layer.scaling, softcap=layer.softcap
        )
        expected = layer.o_proj(o.float().flatten(2))
    torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-5)


def test_the_probe_starts_at_zero_and_gets_a_gradient():
    model = converted_model("llama", "parallax", trained=False)
    probes = [layer.self_attn.r_proj.weight for layer in model.model.layers]
    assert all(torch.equal(w, torch.zeros_like(w)) for w in probes)
    ids = torch.randint(3, 128, (2, 20))
    model(ids, labels=ids, use_cache=False).loss.backward()
    assert all(w.grad is not None and w.grad.abs().max() > 0 for w in probes)


def test_a_windowed_zero_probe_is_the_swa_baseline_without_sinks():
    source = source_model("qwen2")
    ids = torch.randint(3, 128, (2, 30))
    logits = []
    for method, options in (("parallax", {"window": 8}), ("swa", {"window": 8, "sinks": 0})):
        plan = plan_conversion(source.config, "qwen2", method, **options)
        logits.append(convert_model(source_model("qwen2"), plan.config)(ids, use_cache=False).logits)
    torch.testing.assert_close(logits[0], logits[1], rtol=1e-5, atol=1e-5)


def test_save_and_reload_reproduces_logits_exactly(tmp_path):
    model = converted_model("qwen3", "parallax-window")
    save_model(model, None, tmp_path / "out")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    ids = torch.randint(3, 128, (2, 30))
    assert torch.equal(reloaded(ids, use_cache=False).logits, model(ids, use_cache=False).logits)
    assert reloaded.config.linearize["method"] == "parallax" and reloaded.config.linearize["window"] == 8
    assert reloaded.model.layers[0].self_attn.r_proj.weight.abs().max() > 0  # the trained probe, not zeros


def test_a_low_rank_probe_is_exact_at_conversion_and_learns_through_its_zero_factor(tmp_path):
    """`probe_rank`: r = r_proj(r_down(x)), r_down random (seeded by the layer), r_proj zero, as LoRA starts."""
    source = source_model("llama")
    plan = plan_conversion(source.config, "llama", "parallax", probe_rank=4)
    model = convert_model(source_model("llama"), plan.config)
    ids = torch.randint(3, 128, (2, 20))
    with torch.no_grad():
        torch.testing.assert_close(model(ids, use_cache=False).logits, source(ids).logits, rtol=1e-5, atol=1e-5)
    layers = [layer.self_attn for layer in model.model.layers]
    hidden, width = source.config.hidden_size, source.config.num_attention_heads * layers[0].head_dim
    assert all(a.r_down.weight.shape == (4, hidden) and a.r_proj.weight.shape == (width, 4) for a in layers)
    assert not torch.equal(layers[0].r_down.weight, layers[1].r_down.weight)  # each layer its own seed
    assert plan.converted_parameters - plan.source_parameters == len(layers) * 4 * (hidden + width)
    model(ids, labels=ids, use_cache=False).loss.backward()
    assert all(a.r_proj.weight.grad.abs().max() > 0 for a in layers)
    assert all(a.r_down.weight.grad.abs().max() == 0 for a in layers)  # no gradient through the zero factor yet

    with torch.no_grad():
        for a in layers:
            a.r_proj.weight.normal_(0, 0.1)
    save_model(model, None, tmp_path / "out")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert reloaded.config.linearize["probe_rank"] == 4
    assert torch.equal(reloaded(ids, use_cache=False).logits, model(ids, use_cache=False).logits)
    assert not torch.equal(reloaded(ids, use_cache=False).logits, source(ids).logits)


def test_the_growing_cache_keeps_each_heads_tokens_as_adjacent_rows():
    """Without a window the cache grows head-major ([B, Hkv, L, D] storage): a decode step reads each head's keys
    and values as contiguous rows, and gets them back as [B, L, Hkv, D] views of that storage."""
    model = converted_model("llama", "parallax")
    ids = torch.randint(3, 128, (2, 12))
    with torch.no_grad():
        cache = cache_of(model(ids[:, :9], use_cache=True))
        for t in range(9, 12):
            cache = cache_of(model(ids[:, t : t + 1], **{CACHE_ARG: cache}, use_cache=True))
    layer = cache.layers[model.config.converted_layers()[0]]
    keys, values, valid = layer.tokens.tensors
    B, Hkv, L, D = keys.shape
    assert (B, L) == (2, 12) and valid.shape == (2, 12)
    for x in (keys, values):
        assert x.stride(2) == D and x.stride(3) == 1


@pytest.mark.parametrize("family", ["mistral", "gemma2"])
def test_a_source_layer_with_a_window_keeps_it(family):
    """Mistral 7B v0.1 and Phi-3-mini-4k window every layer, Gemma its local ones: converted (every layer), each layer
    sees what its source layer saw, in a full forward and in cached decoding, and a windowed layer's cache holds its
    window; the plan counts those caches."""
    config = source_model(family).config
    if family == "mistral":
        config.sliding_window = 8  # the tiny Mistral has none
    source = model_from_config(config).eval()
    plan = plan_conversion(source.config, family, "parallax", convert_layers="all")
    model = convert_model(source, plan.config).eval()
    windows = [layer.self_attn.window for layer in model.model.layers]
    assert windows == ([8, 8] if family == "mistral" else [8, None])
    cache = assert_computes_the_source(model, source, torch.randint(3, 128, (1, 40)), prefill=30)
    assert cache.layers[0].tokens.capacity == 7  # the previous window - 1 tokens
    _, kv_heads, head_dim = plan._head_shape()
    growing = windows.count(None) * (4096 - 64) * (2 * kv_heads * head_dim * plan.dtype_bytes + 1)  # + a valid flag
    assert plan.converted_cache_bytes(4096) - plan.converted_cache_bytes(64) == growing
