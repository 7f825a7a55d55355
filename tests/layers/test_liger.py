"""The Liger layer against a plain per-token transcription of docs/methods.md §1.1."""

import pytest
import torch
import torch.nn.functional as F
from transformers.models.phi3.modeling_phi3 import apply_rotary_pos_emb  # also rotates part of a head

from tests.tiny import FAMILIES, cache_of, converted_model, rotary_tables


def naive_liger(layer, hidden, cos, sin, window, gate_source="normed", sinks=0, mix=0.5):
    """o = o_proj(mix * SWA(RoPE'd q, k; last `window - sinks` keys and the first `sinks`) + (1 - mix) * GLA(softmax
    q, softmax k; gate from key)). The family's projections and norms come from `layer.project`, which
    tests/test_families.py checks; its scale and logit cap from the layer."""
    batch, length, _ = hidden.shape
    heads, kv_heads, dim = layer.num_heads, layer.num_kv_heads, layer.head_dim
    group = heads // kv_heads
    q, k, v, k_raw = layer.project(hidden)
    gate = F.logsigmoid((k_raw if gate_source == "raw" else k).double()) / 16
    q_feat, k_feat = q.double().softmax(-1), k.double().softmax(-1)
    q_rot, k_rot = (
        (q, k)
        if not layer.use_rope
        else (x.transpose(1, 2) for x in apply_rotary_pos_emb(q.transpose(1, 2), k.transpose(1, 2), cos, sin))
    )
    q_rot, k_rot = q_rot.double(), k_rot.double()
    out = torch.zeros(batch, length, heads, dim, dtype=torch.float64)
    for b in range(batch):
        for h in range(heads):
            g = h // group
            state = torch.zeros(dim, dim, dtype=torch.float64)
            for t in range(length):
                state = gate[b, t, g].exp()[:, None] * state + torch.outer(k_feat[b, t, g], v[b, t, g].double())
                linear = state.T @ q_feat[b, t, h]
                lo = max(0, t - (window - sinks) + 1)
                seen = list(range(min(sinks, lo))) + list(range(lo, t + 1))
                scores = k_rot[b, seen, g] @ q_rot[b, t, h] * layer.scaling
                if layer.softcap is not None:
                    scores = layer.softcap * torch.tanh(scores / layer.softcap)
                windowed = scores.softmax(0) @ v[b, seen, g].double()
                out[b, t, h] = mix * windowed + (1 - mix) * linear
    return layer.o_proj(out.to(hidden.dtype).flatten(2))


# Only qk-norm families (qwen3) distinguish the raw key from the normed one.
CASES = [(family, "normed") for family in FAMILIES] + [("qwen3", "raw")]


@pytest.mark.parametrize("family,gate_source", CASES, ids=[f"{f}-{g}" for f, g in CASES])
def test_liger_layer_matches_the_formula(family, gate_source):
    model = converted_model(family, "liger")
    layer = model.model.layers[model.config.converted_layers()[0]].self_attn
    layer.gate_source = gate_source
    hidden = torch.randn(2, 21, model.config.hidden_size)
    positions = torch.arange(21)[None].expand(2, -1)
    cos, sin = rotary_tables(model, hidden, positions, layer.layer_idx)
    with torch.no_grad():
        expected = naive_liger(layer, hidden, cos, sin, window=8, gate_source=gate_source)
        actual, _ = layer(hidden, position_embeddings=(cos, sin))
    torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_liger_with_sinks_matches_the_formula(family):
    model = converted_model(family, "liger-sinks")
    layer = model.model.layers[0].self_attn
    hidden = torch.randn(2, 21, model.config.hidden_size)
    cos, sin = model.model.rotary_emb(hidden, torch.arange(21)[None].expand(2, -1))
    with torch.no_grad():
        expected = naive_liger(layer, hidden, cos, sin, window=8, sinks=2, mix=0.7)
        actual, _ = layer(hidden, position_embeddings=(cos, sin))
    torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-5)


def test_liger_with_sinks_mixes_the_linear_branch_before_rounding():
    """The gated linear branch has no normaliser: without decay it sums every earlier value, and in float16 it can
    pass 65504 where the mix does not. On the torch path the sinks layer mixes it unrounded, as the sink-free op
    (`torch_liger_attention`) and the oracle do, instead of overflowing it to inf in the model dtype first."""
    layer = converted_model("llama", "liger-sinks").model.layers[0].self_attn.half()
    layer.mix = 0.9
    B, T, H, Hkv, D = 1, 32, layer.num_heads, layer.num_kv_heads, layer.head_dim
    one_hot = torch.zeros(B, T, H, D, dtype=torch.float16)
    one_hot[..., 0] = 1  # q_lin . k_lin = 1: each token reads every earlier value in full
    v = torch.full((B, T, Hkv, D), 4096.0, dtype=torch.float16)
    linear = (one_hot, one_hot[:, :, :Hkv], v, torch.zeros(B, T, Hkv, D))  # no decay: 131072 at the last token
    q, k = torch.randn(B, T, H, D).half(), torch.randn(B, T, Hkv, D).half()
    cos, sin = torch.ones(B, T, D, dtype=torch.float16), torch.zeros(B, T, D, dtype=torch.float16)
    with torch.no_grad():
        o, _ = layer._attend_with_sinks(q, k, v, None, linear, None, None, (cos, sin))
    assert torch.isfinite(o).all()
    assert o[0, -1, 0, 0].item() == pytest.approx(0.9 * 4096 + 0.1 * 131072, rel=1e-3)


def test_mix_weights_the_liger_op_branches():
    """`mix` (ours; the paper's 0.5 is the default) reaches the Liger op; the sink path's test uses mix 0.7."""
    model = converted_model("llama", "liger")
    layer = model.model.layers[0].self_attn
    hidden = torch.randn(2, 21, model.config.hidden_size)
    cos, sin = model.model.rotary_emb(hidden, torch.arange(21)[None].expand(2, -1))
    with torch.no_grad():
        paper, _ = layer(hidden, position_embeddings=(cos, sin))
        layer.mix = 0.8
        expected = naive_liger(layer, hidden, cos, sin, window=8, mix=0.8)
        actual, _ = layer(hidden, position_embeddings=(cos, sin))
    torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-5)
    assert (actual - paper).abs().max() > 1e-3


def test_gate_source_matters_for_qk_norm_families():
    model = converted_model("qwen3", "liger")
    layer = model.model.layers[0].self_attn
    hidden = torch.randn(1, 12, model.config.hidden_size)
    cos, sin = model.model.rotary_emb(hidden, torch.arange(12)[None])
    with torch.no_grad():
        normed, _ = layer(hidden, position_embeddings=(cos, sin))
        layer.gate_source = "raw"
        raw, _ = layer(hidden, position_embeddings=(cos, sin))
    assert not torch.allclose(normed, raw)


@pytest.mark.parametrize("autocast", [False, True], ids=["bf16-model", "fp32-model-under-bf16-autocast"])
def test_bf16_layer_hands_the_ops_model_dtype_operands(monkeypatch, autocast):
    """A bf16 layer passes q_lin, k_lin and v in bf16 (so GPU kernels multiply on tensor cores), the log decay and
    the recurrent state in fp32, to the sequence op (prefill) and to the decode step. So does an fp32 layer under
    bf16 autocast (`training.autocast`), as STILL's and Parallax's do: its projections are bf16 there, and the
    residual stream's fp32 made the GLA kernels multiply in fp32."""
    import contextlib

    import linearize.layers.liger as liger_layer

    calls = []

    def recording(name, op):
        def run(*args, **kwargs):
            q_lin, k_lin, v, g, *rest = args
            state = rest[0] if name == "decode" else kwargs["initial_state"]
            calls.append((name, q_lin.dtype, k_lin.dtype, v.dtype, g.dtype, None if state is None else state.dtype))
            return op(*args, **kwargs)

        return run

    monkeypatch.setattr(liger_layer, "liger_attention", recording("sequence", liger_layer.liger_attention))
    monkeypatch.setattr(liger_layer, "liger_decode", recording("decode", liger_layer.liger_decode))
    model = converted_model("llama", "liger")
    model = model if autocast else model.to(torch.bfloat16)
    ids = torch.randint(3, 128, (2, 12))
    region = torch.autocast("cpu", dtype=torch.bfloat16) if autocast else contextlib.nullcontext()
    with torch.no_grad(), region:
        cache = cache_of(model(ids[:, :10], use_cache=True))
        cache = cache_of(model(ids[:, 10:11], cache=cache, use_cache=True))  # one token: the decode step
        model(ids[:, 11:], cache=cache, use_cache=True)
    bf16, fp32 = torch.bfloat16, torch.float32
    prefill, decode = ("sequence", bf16, bf16, bf16, fp32, None), ("decode", bf16, bf16, bf16, fp32, fp32)
    assert calls == [prefill] * model.config.num_hidden_layers + [decode] * (2 * model.config.num_hidden_layers)


@pytest.mark.parametrize("variant", ["liger-gla", "liger", "liger-sinks"])
def test_a_padded_token_leaves_the_gated_state_as_it_was(variant):
    """docs/methods.md §0.4 and §1.1: padding never enters the linear state, also after real tokens (a decode step
    whose mask is 0): no value is added and nothing decays."""
    model = converted_model("llama", variant)
    ids = torch.randint(3, 128, (2, 12))
    with torch.no_grad():
        cache = cache_of(model(ids[:, :11], use_cache=True))
        before = [cache.layers[i].recurrent_state.clone() for i in model.config.converted_layers()]
        mask = torch.ones(2, 12, dtype=torch.long)
        mask[0, 11] = 0  # row 0's new token is padding, row 1's is real
        model(ids[:, 11:], attention_mask=mask, cache=cache, use_cache=True)
        after = [cache.layers[i].recurrent_state for i in model.config.converted_layers()]
    for old, new in zip(before, after, strict=True):
        torch.testing.assert_close(new[0], old[0], rtol=0, atol=0)
        assert not torch.equal(new[1], old[1])
