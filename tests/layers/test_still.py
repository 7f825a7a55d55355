"""The STILL layer: its wiring against the plain ops and an independent NP-Map, its conversion values, save/reload."""

import pytest
import torch
import torch.nn.functional as F
from linearize.kernels.still import naive_self_saliency, naive_still_attention, select_salient
from transformers import AutoModelForCausalLM

import linearize.layers.still as still_layer
from linearize.convert import save_model
from tests.tiny import FAMILIES, cache_of, converted_model, rotary_tables


def np_map(feature_map, x):
    """docs/methods.md §3.5, head by head: u = |x| W (I - 2 h h^T) x / |...|, phi = [softmax(u), softmax(-u)]."""
    out = []
    for head in range(x.shape[2]):
        h = feature_map.householder[head].double()
        h = h / h.norm()
        reflection = torch.eye(h.numel(), dtype=torch.float64) - 2 * torch.outer(h, h)
        f = x[:, :, head].double() @ (feature_map.linear[head].double() @ reflection).T
        u = x[:, :, head].double().norm(dim=-1, keepdim=True) * f / f.norm(dim=-1, keepdim=True)
        out.append(torch.cat([u.softmax(-1), (-u).softmax(-1)], -1).clamp_min(1e-12))
    return torch.stack(out, dim=2)


def random_np_map() -> still_layer.NPMap:
    """An NP-Map of 2 heads of 16 with random (trained-looking) parameters."""
    feature_map = still_layer.NPMap(heads=2, dim=16)
    torch.nn.init.normal_(feature_map.householder)
    torch.nn.init.normal_(feature_map.linear)
    return feature_map


def test_np_map_in_blocks_without_autograd(monkeypatch):
    """Without autograd a long input is mapped in blocks of tokens (the last one partial here): the features of
    the whole input at once, and of the formula."""
    monkeypatch.setattr(still_layer.NPMap, "BLOCK_ELEMENTS", 512)  # blocks of 8 tokens of 2 x 2 x 16 numbers
    monkeypatch.setattr(still_layer.NPMap, "WHOLE_ELEMENTS", 2048)  # the input below has 2368
    feature_map, x = random_np_map(), torch.randn(2, 37, 2, 16)
    with torch.no_grad():
        blocked = feature_map(x)
    whole = feature_map(x)  # autograd on: one pass
    assert whole.requires_grad
    assert torch.equal(blocked, whole.detach())
    torch.testing.assert_close(blocked.double(), np_map(feature_map, x), rtol=1e-5, atol=1e-7)


def test_np_map_without_autograd_follows_every_change_of_its_parameters():
    """Without autograd the map keeps its matrix W (I - 2 h h^T) between one-token calls (decode steps); an in-place
    update (an optimizer step, a loaded checkpoint) or a new parameter must give the new features, never the kept
    matrix's."""
    feature_map, x = random_np_map(), torch.randn(2, 1, 2, 16)
    changes = [
        lambda: None,
        lambda: feature_map.linear.mul_(-0.5),  # in place, as an optimizer step
        lambda: feature_map.householder.copy_(torch.randn(2, 16)),  # in place, as load_state_dict
        lambda: setattr(feature_map, "householder", torch.nn.Parameter(torch.randn(2, 16))),  # a new tensor
    ]
    with torch.no_grad():
        before = feature_map(x)
        assert feature_map._kept_matrix is not None
        for change in changes:
            change()
            torch.testing.assert_close(feature_map(x).double(), np_map(feature_map, x), rtol=1e-5, atol=1e-7)
    assert not torch.equal(feature_map(x).detach(), before)


def test_np_map_does_not_keep_its_matrix_across_a_fused_optimizer_step():
    """Fused AdamW (transformers Trainer's default optimizer) updates the parameters in place without counting a
    version, so the version key cannot see the step: decode steps after training (a sample generated between
    training steps) read the maps of the decode steps before it."""
    feature_map, x = random_np_map(), torch.randn(2, 1, 2, 16)
    optimizer = torch.optim.AdamW(feature_map.parameters(), lr=0.1, fused=True)
    with torch.no_grad():
        feature_map(x)  # a decode step: the matrix is kept
    (feature_map(torch.randn(2, 8, 2, 16)) * torch.randn(2, 8, 2, 32)).sum().backward()  # a training step
    optimizer.step()
    with torch.no_grad():
        torch.testing.assert_close(feature_map(x).double(), np_map(feature_map, x), rtol=1e-5, atol=1e-7)


def test_np_map_made_under_inference_mode_follows_in_place_changes():
    """Parameters made under `torch.inference_mode` have no version counter: the map must neither fail on them nor
    keep a matrix it could not tell stale."""
    with torch.inference_mode():
        feature_map, x = random_np_map(), torch.randn(2, 1, 2, 16)
        before = feature_map(x)
        feature_map.linear.mul_(-0.5)
        torch.testing.assert_close(feature_map(x).double(), np_map(feature_map, x), rtol=1e-5, atol=1e-7)
        assert not torch.equal(feature_map(x), before)


@pytest.mark.parametrize("family", FAMILIES)
def test_still_layer_is_the_plain_ops_on_its_projections(family):
    model = converted_model(family, "still")
    layer = model.model.layers[model.config.converted_layers()[0]].self_attn
    with torch.no_grad():  # a trained-looking map, so that a layer ignoring W_h would be caught
        layer.k_map.linear.add_(torch.randn_like(layer.k_map.linear) * 0.3)
    hidden = torch.randn(2, 29, model.config.hidden_size)
    cos, sin = rotary_tables(model, hidden, torch.arange(29)[None].expand(2, -1), layer.layer_idx)
    with torch.no_grad():
        actual, _ = layer(hidden, position_embeddings=(cos, sin))
        q, k, v, _ = layer.project(hidden)
        q, k = layer.rotate(q, k, (cos, sin))
        gate = torch.sigmoid(layer.g_proj(hidden)).view(*q.shape)
        salient = select_salient(naive_self_saliency(q, k, window=8, scale=layer.scaling), chunk_size=8, topk=2)
        k_heads = k.repeat_interleave(layer.num_heads // layer.num_kv_heads, dim=2)
        o = naive_still_attention(
            q, k, v, np_map(layer.q_map, q), np_map(layer.k_map, k_heads), gate, salient, chunk_size=8,
            scale=layer.scaling, softcap=layer.softcap,
        )  # fmt: skip
        expected = layer.o_proj(o.float().flatten(2))
    torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-5)


def test_conversion_values_of_the_new_parameters():
    model, again = converted_model("llama", "still"), converted_model("llama", "still", seed=1)
    layers = [layer.self_attn for layer in model.model.layers]
    for layer, other in zip(layers, [layer.self_attn for layer in again.model.layers], strict=True):
        # seeded by the layer index: the same source gives the same conversion
        assert torch.equal(layer.q_map.householder, other.q_map.householder)
        assert torch.equal(layer.g_proj.weight, other.g_proj.weight)
        identity = torch.eye(layer.head_dim).expand(layer.num_heads, -1, -1)
        for feature_map in (layer.q_map, layer.k_map):
            assert torch.equal(feature_map.linear, identity)
        assert torch.equal(layer.q_map.householder, layer.k_map.householder)
        assert layer.q_map.householder.data_ptr() != layer.k_map.householder.data_ptr()  # copies, trained apart
        assert abs(layer.g_proj.weight.std().item() - 0.02) < 0.004  # initializer_range: the gate starts near 0.5
    assert not torch.equal(layers[0].q_map.householder, layers[1].q_map.householder)


def test_np_map_keeps_the_norm_and_gives_two_distributions():
    layer = converted_model("llama", "still").model.layers[0].self_attn
    x = torch.randn(2, 5, layer.num_heads, layer.head_dim) * 3
    h = F.normalize(layer.q_map.householder, dim=-1)
    reflected = x - 2 * (x * h).sum(-1, keepdim=True) * h
    torch.testing.assert_close(reflected.norm(dim=-1), x.norm(dim=-1))  # identity W: u is a reflection of x
    features = layer.q_map(x)
    assert features.shape == (2, 5, layer.num_heads, 2 * layer.head_dim) and (features > 0).all()
    torch.testing.assert_close(features.sum(-1), torch.full((2, 5, layer.num_heads), 2.0))
    torch.testing.assert_close(features, np_map(layer.q_map, x).float())


def test_save_and_reload_reproduces_logits_exactly(tmp_path):
    model = converted_model("qwen3", "still")
    with torch.no_grad():  # trained values must survive the round trip, not the conversion values
        model.model.layers[1].self_attn.q_map.linear.add_(0.1)
    save_model(model, None, tmp_path / "out")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    ids = torch.randint(3, 128, (2, 30))
    assert torch.equal(reloaded(ids, use_cache=False).logits, model(ids, use_cache=False).logits)
    assert reloaded.config.linearize["method"] == "still" and reloaded.config.linearize["topk"] == 2


@pytest.mark.parametrize("prefill", [1, 8, 16, 17, 29, 33])
def test_decode_after_a_prefill_ending_anywhere_equals_the_full_forward(prefill):
    """Chunk 8, top-2: prefills that end on, just after and inside chunks, then decoding across chunk boundaries,
    where delayed selection moves a chunk out of the raw ring."""
    model = converted_model("llama", "still")
    ids = torch.randint(3, 128, (2, 44))
    full = model(ids, use_cache=False).logits
    out = model(ids[:, :prefill], use_cache=True)
    cache, logits = cache_of(out), [out.logits]
    for t in range(prefill, 44):
        out = model(ids[:, t : t + 1], cache=cache, use_cache=True)
        cache = cache_of(out)
        logits.append(out.logits)
    torch.testing.assert_close(torch.cat(logits, 1), full, rtol=1e-4, atol=1e-4)
    # after 44 tokens the ring holds chunks 4-5; chunks 0-3 left it with 2 salient tokens per head each
    layer = cache.layers[0]
    assert layer.salient_k.shape == (2, 4, 8, 16) and layer.salient_valid.all()
    assert layer.ring_valid.sum(1).tolist() == [12, 12]


def test_padded_prefill_of_rows_ending_in_different_chunks_then_decoding_equals_each_row_alone():
    """Prompts of 37 and 23 tokens (chunk 8, top-2), left-padded into one batch: the cache fill takes each row's
    ring, last chunk's queries and salient tokens from its own positions, so each row's next-token logits while
    decoding are those of the row alone."""
    model = converted_model("llama", "still")
    prompts = [torch.randint(3, 128, (n,)) for n in (37, 23)]
    batch = torch.zeros(2, 37, dtype=torch.long)
    mask = torch.zeros(2, 37, dtype=torch.long)
    for row, prompt in enumerate(prompts):
        batch[row, 37 - len(prompt) :], mask[row, 37 - len(prompt) :] = prompt, 1
    options = dict(max_new_tokens=24, do_sample=False, pad_token_id=0, output_logits=True, return_dict_in_generate=True)
    together = model.generate(batch, attention_mask=mask, **options)
    for row, prompt in enumerate(prompts):
        alone = model.generate(prompt[None], **options)
        assert together.sequences[row, 37:].tolist() == alone.sequences[0, len(prompt) :].tolist()
        for step, (both, one) in enumerate(zip(together.logits, alone.logits, strict=True)):
            torch.testing.assert_close(both[row], one[0], rtol=1e-4, atol=1e-4, msg=f"row {row}, step {step}")


def test_bf16_layer_hands_model_dtype_features_to_the_op(monkeypatch):
    """The NP-Map computes in fp32, but the attention gets its features in the model dtype, as q, k and v: the GPU
    kernels multiply every operand on tensor cores."""
    attend, seen = still_layer.still_attention, []

    def spy(*tensors, **kwargs):
        seen.append([x.dtype for x in tensors[:6]])  # q, k, v, q_feat, k_feat, gate
        return attend(*tensors, **kwargs)

    monkeypatch.setattr(still_layer, "still_attention", spy)
    model = converted_model("llama", "still").to(torch.bfloat16)
    with torch.no_grad():
        logits = model(torch.randint(3, 128, (2, 20)), use_cache=False).logits
    assert logits.isfinite().all()
    assert seen == [[torch.bfloat16] * 6] * len(model.model.layers)
