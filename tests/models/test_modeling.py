import dataclasses
import math
import sys
import types

import pytest
import torch
from linearize.kernels.common.buffers import GROWTH
from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig, Phi3Config

from linearize import compat, methods
from linearize.convert import convert_model, plan_conversion
from linearize.families import UnsupportedModelError
from linearize.layers.swa import SinkWindowAttention, sink_window_attention
from linearize.models import LinearizeCache
from tests.tiny import _COMMON, FAMILIES, METHODS, VARIANTS, cache_of, converted_model, model_from_config, source_model

CASES = [(f, m) for f in FAMILIES for m in METHODS]


def decode_incrementally(model, ids, mask=None, chunks=(13, 5)):
    """Prefill, then a multi-token chunk, then one token at a time, returning all logits."""
    logits, cache, start = [], None, 0
    steps = list(chunks) + [1] * (ids.shape[1] - sum(chunks))
    for step in steps:
        end = start + step
        out = model(
            ids[:, start:end], attention_mask=None if mask is None else mask[:, :end], cache=cache, use_cache=True
        )
        cache = cache_of(out)
        logits.append(out.logits)
        start = end
    return torch.cat(logits, 1), cache


@pytest.mark.parametrize("family,method", CASES, ids=[f"{f}-{m}" for f, m in CASES])
def test_cached_decode_equals_full_forward(family, method):
    model = converted_model(family, method)
    ids = torch.randint(3, 128, (2, 40))
    full = model(ids, use_cache=False).logits
    incremental, cache = decode_incrementally(model, ids)
    torch.testing.assert_close(incremental, full, rtol=1e-4, atol=1e-4)
    assert isinstance(cache, LinearizeCache)
    assert cache.get_seq_length() == 40


class UncountingAttention(SinkWindowAttention):
    """swa's layer written as docs/architecture.md describes a new method's: its `attend` reads and updates its own
    state and nothing else (it does not count the tokens the cache has seen)."""

    def attend(self, hidden_states, position_embeddings, state, valid):
        q, k, v, _ = self.project(hidden_states)
        q, k = self.rotate(q, k, position_embeddings)
        options = {"recent": self.recent, "sinks": self.sinks, "scale": self.scaling, "softcap": self.softcap}
        return sink_window_attention(q, k, v, valid, state, backend=self.backend, **options).flatten(2)


def test_the_cache_counts_the_tokens_of_a_layer_that_does_not(monkeypatch):
    """The tokens a converted layer's cache has seen are counted by the forward every method shares: transformers
    reads the count as the position of the next token (without a mask) and as the kept softmax layers' past length.
    A new method's layer that did not count them itself decoded every step at position 0, with nothing said."""
    module = types.ModuleType("linearize.layers.uncounting")
    module.UncountingAttention = UncountingAttention
    monkeypatch.setitem(sys.modules, module.__name__, module)
    monkeypatch.setitem(
        methods.METHODS,
        "uncounting",
        dataclasses.replace(methods.METHODS["swa"], name="uncounting", layer="uncounting.UncountingAttention"),
    )
    source = source_model("llama")
    for softmax_layers in ("", "1"):
        plan = plan_conversion(source.config, "llama", "uncounting", softmax_layers, window=8, sinks=2)
        model = convert_model(source, plan.config)
        ids = torch.randint(3, 128, (2, 30))
        with torch.no_grad():
            incremental, cache = decode_incrementally(model, ids)
            torch.testing.assert_close(incremental, model(ids, use_cache=False).logits, rtol=1e-4, atol=1e-4)
        assert cache.get_seq_length() == 30


@pytest.mark.parametrize("method", ["liger", "parallax"])
def test_a_cache_passed_in_is_filled_and_read_or_refused(method):
    """A cache the caller holds on to must be the one the model fills: a LinearizeCache is read and extended, with
    use_cache=False too (as transformers' models do); transformers' DynamicCache, empty or not, is refused by name
    (an empty one was replaced by a new cache, so the caller's stayed empty and the next step started over)."""
    from transformers import DynamicCache

    model = converted_model("llama", method)
    ids = torch.randint(3, 128, (1, 21))
    with torch.no_grad():
        full = model(ids, use_cache=False).logits[:, -1]
        cache = LinearizeCache(model.config)
        model(ids[:, :20], past_key_values=cache)
        step = model(ids[:, 20:], past_key_values=cache, use_cache=False).logits[:, -1]
        torch.testing.assert_close(step, full, rtol=1e-5, atol=1e-5)
        assert cache.get_seq_length() == 21
        with pytest.raises(TypeError, match="needs a LinearizeCache, got a DynamicCache") as refusal:
            model(ids[:, :20], past_key_values=DynamicCache())
    # the names it gives are the installed transformers' (`cache` since 5.24, `past_key_values` before)
    assert f"pass {compat.CACHE_ARG}=None" in str(refusal.value)
    assert f"the output's {compat.OUTPUT_CACHE_FIELD} is the cache" in str(refusal.value)
    assert "prefix tuning" not in str(refusal.value)


def test_peft_prefix_tuning_is_refused_with_the_reason_and_prompt_tuning_trains():
    from peft import PrefixTuningConfig, PromptTuningConfig, get_peft_model

    ids = torch.randint(3, 128, (2, 12))
    prefix = get_peft_model(
        converted_model("llama", "liger"), PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4)
    )
    with pytest.raises(TypeError, match="peft's prefix tuning .* fine-tune with LoRA or prompt tuning instead"):
        prefix(input_ids=ids, labels=ids)
    prompt = get_peft_model(
        converted_model("llama", "liger"), PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4)
    )
    loss = prompt(input_ids=ids, labels=ids).loss
    loss.backward()
    assert torch.isfinite(loss) and prompt.prompt_encoder.default.embedding.weight.grad.abs().sum() > 0


def test_a_mask_that_leaves_out_the_cached_tokens_is_refused():
    """With a cache, the 2-D mask covers the cached tokens and the new ones (transformers' convention), and the
    positions are counted from it: a mask of the new tokens alone restarted them at 0 and gave other logits."""
    model = converted_model("llama", "liger")
    ids = torch.randint(3, 128, (1, 12))
    with torch.no_grad():
        cache = cache_of(model(ids[:, :10], use_cache=True))
        with pytest.raises(ValueError, match="attention_mask covers 2 tokens: .* 10 cached and 2 new"):
            model(ids[:, 10:], attention_mask=torch.ones(1, 2, dtype=torch.long), cache=cache)
        assert cache.get_seq_length() == 10  # refused before a layer read or extended it
        step = model(ids[:, 10:], attention_mask=torch.ones(1, 12, dtype=torch.long), cache=cache).logits
        torch.testing.assert_close(step, model(ids).logits[:, 10:], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("method", ["liger", "still"])
def test_a_cache_of_other_rows_is_refused_naming_the_repeat(method):
    """A cache continues the rows it was filled with: generate's `num_return_sequences` (or `num_beams`) on a cache
    filled for one prompt failed deep in a layer ("Sizes of tensors must match"); the refusal names the repeat that
    makes one cache row per sequence, and with it the sequences are what a fresh generate gives."""
    model = converted_model("llama", method)
    ids = torch.randint(3, 128, (1, 14))
    with torch.no_grad():
        cache = cache_of(model(ids[:, :10], use_cache=True))
    options = dict(max_new_tokens=4, do_sample=True, pad_token_id=0, num_return_sequences=2)
    with pytest.raises(ValueError, match=r"the cache holds 1 row\(s\), the input 2: .*batch_repeat_interleave\(2\)"):
        model.generate(ids, **{compat.CACHE_ARG: cache}, **options)
    cache.batch_repeat_interleave(2)
    torch.manual_seed(1)
    continued = model.generate(ids, **{compat.CACHE_ARG: cache}, **options)
    torch.manual_seed(1)
    assert torch.equal(continued, model.generate(ids, **options))


@pytest.mark.parametrize("method", METHODS)
def test_beam_search_reorders_the_cache_with_its_beams(method):
    """Beam search keeps the cache row of each beam it continues (`reorder_cache`): with the cache it finds the
    sequences it finds without one, where every step reads the whole sequence again."""
    model = converted_model("llama", method)
    ids = torch.randint(3, 128, (2, 12))
    options = dict(max_new_tokens=8, num_beams=3, num_return_sequences=2, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        assert torch.equal(model.generate(ids, **options), model.generate(ids, use_cache=False, **options))


@pytest.mark.parametrize("softmax_layers", [None, "0"], ids=["converted", "hybrid"])
@pytest.mark.parametrize("method", METHODS)
def test_a_reset_cache_reads_a_new_sequence_as_a_new_cache_does(method, softmax_layers):
    """`reset` empties every layer (a ring's position, the sinks kept so far, the count of tokens seen, which gives
    the next tokens their positions): a cache reset after one sequence decodes the next as a fresh cache does. In a
    hybrid, transformers 5.17 zeroed the kept softmax layer's keys and values in place and kept counting them."""
    model = converted_model("llama", method, softmax_layers=softmax_layers)
    first, second = torch.randint(3, 128, (2, 2, 30)).unbind(0)

    def decoded(ids, cache):
        with torch.no_grad():
            logits = [model(ids[:, :4], past_key_values=cache).logits]
            logits += [model(ids[:, t : t + 1], past_key_values=cache).logits for t in range(4, ids.shape[1])]
        return torch.cat(logits, 1)

    cache = LinearizeCache(model.config)
    decoded(first, cache)
    cache.reset()
    torch.testing.assert_close(decoded(second, cache), decoded(second, LinearizeCache(model.config)), rtol=0, atol=0)


@pytest.mark.parametrize("method", METHODS)
def test_inter_layer_hybrid_decode_equals_full_forward(method):
    model = converted_model("llama", method, softmax_layers="1")
    assert [type(layer.self_attn).__name__ for layer in model.model.layers][1] == "LlamaAttention"
    ids = torch.randint(3, 128, (2, 30))
    incremental, _ = decode_incrementally(model, ids)
    torch.testing.assert_close(incremental, model(ids, use_cache=False).logits, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("family", ["llama", "qwen3"])  # qwen3 norms q and k
@pytest.mark.parametrize("method", METHODS)
def test_bfloat16_autocast_decodes_as_its_full_forward(family, method):
    """Under CPU autocast (`training.autocast: bfloat16`, or a user's region) RoPE's fp32 tables and the qk-norms
    return fp32 q and k beside a bfloat16 v: the layers hand their ops the projections' dtype, and STILL's linear
    state stays fp32."""
    model = converted_model(family, method)
    ids = torch.randint(3, 128, (2, 30))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        full = model(ids, use_cache=False).logits
        incremental, cache = decode_incrementally(model, ids)
    torch.testing.assert_close(incremental, full, rtol=0.05, atol=0.05)  # bfloat16 products, summed in other orders
    states = [layer.state for layer in cache.layers if getattr(layer, "state", None) is not None]
    assert all(state.dtype == torch.float32 for state in states) and (states or method != "still")


@pytest.mark.parametrize("family,method", CASES, ids=[f"{f}-{m}" for f, m in CASES])
def test_padded_batch_equals_unpadded_rows(family, method):
    model = converted_model(family, method)
    ids = torch.randint(3, 128, (3, 30))
    pads = [0, 7, 19]  # left padding per row
    mask = torch.ones_like(ids)
    for row, pad in enumerate(pads):
        mask[row, :pad] = 0
        ids[row, :pad] = 0
    batched, _ = decode_incrementally(model, ids, mask)
    for row, pad in enumerate(pads):
        alone = model(ids[row : row + 1, pad:], use_cache=False).logits[0]
        torch.testing.assert_close(batched[row, pad:], alone, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("method", METHODS)
def test_padded_generation_equals_unpadded(method):
    model = converted_model("qwen2", method)
    prompts = [torch.randint(3, 128, (n,)) for n in (12, 5)]
    batch = torch.zeros(2, 12, dtype=torch.long)
    mask = torch.zeros(2, 12, dtype=torch.long)
    for row, prompt in enumerate(prompts):
        batch[row, 12 - len(prompt) :], mask[row, 12 - len(prompt) :] = prompt, 1
    together = model.generate(batch, attention_mask=mask, max_new_tokens=10, do_sample=False, pad_token_id=0)
    for row, prompt in enumerate(prompts):
        alone = model.generate(prompt[None], max_new_tokens=10, do_sample=False, pad_token_id=0)
        assert together[row, 12:].tolist() == alone[0, len(prompt) :].tolist()


@pytest.mark.parametrize("method", METHODS)
def test_chunked_prefill_generates_what_one_prefill_does(method):
    """`generate(prefill_chunk_size=...)` (long prompts in bounded memory) needs a cache before the first forward;
    the decoder made one only then, and generate refused with "Cannot use prefill chunking without a cache"."""
    model = converted_model("llama", method)
    ids = torch.randint(3, 128, (2, 30))
    mask = torch.ones_like(ids)
    mask[1, :9] = 0
    options = dict(attention_mask=mask, max_new_tokens=5, do_sample=False, return_dict_in_generate=True)
    whole = model.generate(ids, **options, output_logits=True)
    chunked = model.generate(ids, **options, output_logits=True, prefill_chunk_size=7)
    assert torch.equal(chunked.sequences, whole.sequences)
    torch.testing.assert_close(torch.stack(chunked.logits), torch.stack(whole.logits), rtol=1e-4, atol=1e-4)
    assert isinstance(cache_of(chunked), LinearizeCache)


def longrope_models(variant: str, switch: int):
    """A tiny Phi-3 whose longrope tables switch every position from the short factors to the long ones past
    `switch` tokens (Phi-3.5 and Phi-4-mini at 4096), and its conversion by `variant` (a zero Parallax probe)."""
    rotary_pairs = _COMMON["hidden_size"] // _COMMON["num_attention_heads"] // 4  # partial_rotary_factor 0.5
    rope = {"rope_type": "longrope", "rope_theta": 10000.0, "original_max_position_embeddings": switch}
    rope |= {"short_factor": [1.0] * rotary_pairs, "long_factor": [4.0 + 4 * i for i in range(rotary_pairs)]}
    config = Phi3Config(
        **_COMMON, partial_rotary_factor=0.5, original_max_position_embeddings=switch, rope_parameters=rope
    )
    torch.manual_seed(0)
    source = model_from_config(config).eval()
    method, options = VARIANTS[variant]
    return source, convert_model(source, plan_conversion(source.config, "phi3", method, **options).config)


@pytest.mark.parametrize("variant", METHODS)
def test_generation_past_a_longrope_switch_equals_full_forwards(variant):
    """Once a sequence passes the switch, a full forward reads every position with the long factors; generate kept
    the tokens it had cached, read with the short ones, so every step after the switch differed from a full
    forward, and a zero Parallax probe from the source (whose Phi3ForCausalLM reads the sequence again there). It
    now reads it again at that step too; with left padding, at the step where the longest row passes it."""
    source, model = longrope_models(variant, switch=12)
    ids = torch.randint(3, 128, (2, 10))
    mask = torch.ones_like(ids)
    mask[1, :4] = 0
    options = dict(max_new_tokens=6, do_sample=False, pad_token_id=0, return_dict_in_generate=True)
    out = model.generate(ids, attention_mask=mask, output_logits=True, **options)
    sequences, mask = out.sequences, torch.cat([mask, torch.ones(2, 6, dtype=mask.dtype)], 1)
    with torch.no_grad():
        for step, logits in enumerate(out.logits):
            end = 10 + step
            full = model(sequences[:, :end], attention_mask=mask[:, :end], use_cache=False).logits[:, -1]
            torch.testing.assert_close(logits, full, rtol=1e-4, atol=1e-4, msg=f"step {step}")
            if variant == "parallax":
                original = source(sequences[:, :end], attention_mask=mask[:, :end], use_cache=False).logits[:, -1]
                torch.testing.assert_close(logits, original, rtol=1e-5, atol=1e-5, msg=f"step {step}")


@pytest.mark.parametrize("family", ["llama", "phi3"])
def test_generate_takes_a_prompt_given_as_embeddings(family):
    """A prompt given as embeddings generates what its ids do."""
    model = converted_model(family, "liger")
    ids = torch.randint(3, 128, (1, 6))
    options = dict(attention_mask=torch.ones_like(ids), max_new_tokens=4, do_sample=False, pad_token_id=0)
    from_embeddings = model.generate(inputs_embeds=model.get_input_embeddings()(ids), **options)
    assert torch.equal(from_embeddings, model.generate(ids, **options)[:, 6:])


def test_past_a_dynamic_ntk_length_a_zero_probe_gives_the_source_logits_cached_or_not():
    """Dynamic NTK rescales every position at every step past max_position_embeddings, which cached tokens do not
    follow: there cached decoding departs from a full forward in the source too (docs/methods.md §0.2), and a
    converted model computes what the source does either way."""
    rope = {"rope_type": "dynamic", "factor": 4.0, "rope_theta": 10000.0}
    config = LlamaConfig(**{**_COMMON, "max_position_embeddings": 16}, rope_parameters=rope)
    torch.manual_seed(0)
    source = model_from_config(config).eval()
    model = convert_model(source, plan_conversion(source.config, "llama", "parallax").config)
    ids = torch.randint(3, 128, (1, 28))

    def full_and_cached(network):
        with torch.no_grad():
            out = network(ids[:, :10], use_cache=True)
            cache, steps = cache_of(out), [out.logits]
            for t in range(10, 28):
                steps.append(network(ids[:, t : t + 1], **{compat.CACHE_ARG: cache}, use_cache=True).logits)
            return network(ids, use_cache=False).logits, torch.cat(steps, 1)

    (full, cached), (source_full, source_cached) = full_and_cached(model), full_and_cached(source)
    torch.testing.assert_close(full, source_full, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(cached, source_cached, rtol=1e-5, atol=1e-5)
    with torch.no_grad():  # below max_position_embeddings a forward reads the pretrained frequencies again
        torch.testing.assert_close(cached[:, :15], model(ids[:, :15]).logits, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(cached[:, 16:], full[:, 16:], atol=1e-4)  # the departure the documentation states


@pytest.mark.parametrize("method", METHODS)
def test_every_layer_hands_its_backend_option_to_its_ops(method, monkeypatch):
    """A layer's `backend` (the runtime choice of kernels) reaches the ops of its prefill and of its decode steps:
    a name no op knows makes each of them fail."""
    from linearize.kernels.backend import BackendChoiceError

    monkeypatch.delenv("LINEARIZE_BACKEND", raising=False)
    model = converted_model("llama", method)
    ids = torch.randint(3, 128, (1, 12))
    with torch.no_grad():
        cache = cache_of(model(ids[:, :-1], use_cache=True))
        for layer in model.model.layers:
            layer.self_attn.backend = "no-such-backend"
        with pytest.raises(BackendChoiceError, match="no-such-backend"):
            model(ids, use_cache=False)
        with pytest.raises(BackendChoiceError, match="no-such-backend"):
            model(ids[:, -1:], cache=cache, use_cache=True)


def test_assisted_decoding_is_refused_by_name():
    model = converted_model("llama", "liger")
    prompt = torch.randint(3, 128, (1, 8))
    for option in ({"prompt_lookup_num_tokens": 3}, {"assistant_model": converted_model("llama", "liger")}):
        with pytest.raises(ValueError, match=f"{next(iter(option))}: assisted decoding rolls the cache back"):
            model.generate(prompt, max_new_tokens=4, do_sample=False, pad_token_id=0, **option)


def test_a_converted_model_is_refused_as_the_draft_of_assisted_decoding():
    """Assisted decoding crops the draft model's cache over the tokens its target rejects: a converted model as
    another model's `assistant_model` drafted until the first rejection, then failed deep in transformers with
    "a converted layer's state cannot be rolled back"; its first draft is now refused, naming the option."""
    target = source_model("llama", seed=3)
    draft = converted_model("qwen2", "liger", seed=1)
    draft.generation_config.assistant_confidence_threshold = 0.0  # draft several tokens a round, so some are rejected
    draft.generation_config.num_assistant_tokens_schedule = "constant"
    prompt = torch.randint(3, 128, (1, 10))
    with pytest.raises(ValueError, match="cannot draft for assisted decoding .*assistant_model"):
        target.generate(prompt, assistant_model=draft, max_new_tokens=8, do_sample=False, pad_token_id=0)


def test_cropping_is_refused_before_any_layer_is_cropped():
    """`cache.crop(-n)` (what assisted decoding calls) cannot roll a converted layer's state back: in a hybrid whose
    first layer is softmax, that layer was cropped before the converted one refused, so that the cache (and its
    `get_seq_length`) no longer matched the state it kept."""
    model = converted_model("llama", "liger", softmax_layers="0")
    with torch.no_grad():
        cache = cache_of(model(torch.randint(3, 128, (1, 10)), use_cache=True))
    cache.crop(0)  # nothing to roll back: what generate calls on every step on some devices
    with pytest.raises(NotImplementedError, match="LinearizeCache cannot be cropped.*copy.deepcopy"):
        cache.crop(-2)
    assert [layer.get_seq_length() for layer in cache.layers] == [10, 10]


@pytest.mark.parametrize("implementation", ["static", "offloaded", "quantized", "paged"])
def test_transformers_cache_implementations_are_refused_by_name(implementation):
    """`cache_implementation` asks generate for one of transformers' caches, which cannot hold a converted layer's
    state: static, offloaded and quantized were ignored (behind a warning that this model does not support `Cache`
    instances), and paged (continuous batching) failed with "Invalid layer type: hybrid_sliding"."""
    model = converted_model("llama", "liger")
    prompt = torch.randint(3, 128, (1, 8))
    with pytest.raises(ValueError, match=f"cache_implementation='{implementation}'.* LinearizeCache"):
        model.generate(prompt, max_new_tokens=4, do_sample=False, pad_token_id=0, cache_implementation=implementation)


def test_dynamic_cache_implementation_generates_with_the_model_cache():
    """'dynamic', transformers' default, is what a LinearizeCache is: accepted, and the same tokens."""
    model = converted_model("llama", "liger")
    prompt = torch.randint(3, 128, (1, 8))
    options = dict(max_new_tokens=4, do_sample=False, pad_token_id=0, return_dict_in_generate=True)
    dynamic = model.generate(prompt, cache_implementation="dynamic", **options)
    assert torch.equal(dynamic.sequences, model.generate(prompt, **options).sequences)
    assert isinstance(cache_of(dynamic), LinearizeCache)


def test_continuous_batching_is_refused_by_name():
    model = converted_model("llama", "liger")
    with pytest.raises(ValueError, match="continuous batching .* LinearizeCache"):
        model.generate_batch([[5, 6, 7]], max_new_tokens=4)


@pytest.mark.parametrize("variant", METHODS)
def test_cache_size_is_what_the_plan_says(variant):
    """Constant for every method but STILL, whose salient cache grows by topk tokens per chunk and head, and Parallax
    without a window, which keeps softmax attention's cache. Those two grow their storage geometrically while
    decoding, so they may hold up to GROWTH times what they use."""
    model = converted_model("llama", variant)
    method, options = VARIANTS[variant]
    plan = plan_conversion(source_model("llama").config, "llama", method, dtype="float32", **options)
    ids = torch.randint(3, 128, (1, 200))
    cache = cache_of(model(ids[:, :20], use_cache=True))
    sizes = [cache.nbytes()]
    for t in range(20, 200):
        cache = cache_of(model(ids[:, t : t + 1], cache=cache, use_cache=True))
    sizes.append(cache.nbytes())
    grows = method == "still" or (method == "parallax" and not options.get("window"))
    assert sizes[0] == plan.converted_cache_bytes(20) > 0
    if grows:
        assert plan.converted_cache_bytes(200) <= sizes[1] <= GROWTH * plan.converted_cache_bytes(200)
        assert sizes[0] < sizes[1]
    else:
        assert sizes[1] == sizes[0] == plan.converted_cache_bytes(200)


@pytest.mark.parametrize("variant", METHODS)
def test_a_prefill_of_whole_chunks_or_windows_holds_what_the_plan_says(variant):
    """Right after a prefill of a whole number of STILL's 8-token chunks (its ring holds the last two; the third is
    the first folded) or of a window, and one token past: exactly the bytes the plan says, as at other lengths."""
    model = converted_model("llama", variant)
    method, options = VARIANTS[variant]
    plan = plan_conversion(source_model("llama").config, "llama", method, dtype="float32", **options)
    for length in (8, 16, 17, 24):
        with torch.no_grad():
            cache = cache_of(model(torch.randint(3, 128, (1, length)), use_cache=True))
        assert cache.nbytes() == plan.converted_cache_bytes(length), length


def _cache_tensors(layer):
    """(field name, tensor) for every tensor a cache layer holds, in a fixed order."""
    for name in layer._tensor_fields:
        value = getattr(layer, name)
        value = value.tensors if hasattr(value, "tensors") else value
        yield from ((name, t) for t in (value if isinstance(value, tuple) else (value,)) if t is not None)


# Per-sequence recurrent state and counters the ops return anew each step, at a constant size (the state is
# [B, Hkv, D, D], not per token); every cached tensor with a token dimension must stay where it is.


REPLACED_EACH_STEP = {"recurrent_state", "real_tokens"}


@pytest.mark.parametrize("variant", [v for v in METHODS if v != "liger-gla"])  # liger-gla keeps no tokens
def test_decode_writes_tokens_in_place(variant):
    """Prefill, then many decode steps: windows, rings and sink slots keep the storage the prefill allocated (a
    step writes its slot in place, it does not concatenate), and caches that grow (STILL's salient tokens,
    Parallax without a window) move their storage a logarithmic number of times, not at every step."""
    model = converted_model("llama", variant)
    ids = torch.randint(3, 128, (2, 300))
    cache = cache_of(model(ids[:, :20], use_cache=True))
    layers = [layer for layer in cache.layers if hasattr(layer, "_tensor_fields")]

    def storages():
        return {
            (index, position): tensor.untyped_storage().data_ptr()
            for index, layer in enumerate(layers)
            for position, (name, tensor) in enumerate(_cache_tensors(layer))
            if name not in REPLACED_EACH_STEP
        }

    before, moves = storages(), 0
    assert before
    for t in range(20, 300):
        cache = cache_of(model(ids[:, t : t + 1], cache=cache, use_cache=True))
        after = storages()
        moves += sum(after[key] != before[key] for key in before)
        before = after
    method, options = VARIANTS[variant]
    if method == "still" or (method == "parallax" and not options.get("window")):
        # from 20 to 300 tokens by factors of GROWTH: about 12 moves per tensor
        assert 0 < moves <= len(before) * 2 * math.log(300 / 20, GROWTH)
    else:
        assert moves == 0


@pytest.mark.parametrize("variant", METHODS)
def test_prefilled_cache_keeps_only_its_own_bytes(variant):
    """A cached tensor that is a view of a larger activation (keys split from a rotated [q, k] block) would keep
    the whole block alive, unseen by `nbytes`: every cached tensor must own exactly its storage."""
    model = converted_model("llama", variant)
    cache = cache_of(model(torch.randint(3, 128, (2, 20)), use_cache=True))
    tensors = [t for layer in cache.layers if hasattr(layer, "_tensor_fields") for _, t in _cache_tensors(layer)]
    assert tensors
    for tensor in tensors:
        storage, own = tensor.untyped_storage().nbytes(), tensor.numel() * tensor.element_size()
        assert storage == own, f"a cached {tuple(tensor.shape)} tensor keeps {storage} bytes alive for its {own}"


@pytest.mark.parametrize("method", METHODS)
def test_the_decoder_called_alone_computes_what_the_model_gives_its_head(method):
    """`get_decoder()` / `model.model` called alone (embeddings, value heads) gets what the causal LM gives it: a
    LinearizeCache, not the DynamicCache transformers' decoder would make, the padding mask and positions that
    count real tokens."""
    model = converted_model("llama", method)
    ids = torch.randint(3, 128, (2, 20))
    mask = torch.ones_like(ids)
    mask[1, :8] = 0
    out = model.get_decoder()(ids, mask)  # positional arguments, the default use_cache
    assert isinstance(getattr(out, compat.OUTPUT_CACHE_FIELD), LinearizeCache)
    full = model(ids, attention_mask=mask, output_hidden_states=True).hidden_states[-1]
    torch.testing.assert_close(out.last_hidden_state, full)
    alone = model.model(ids[1:, 8:], use_cache=False).last_hidden_state
    torch.testing.assert_close(out.last_hidden_state[1, 8:], alone[0], rtol=1e-4, atol=1e-4)


def test_outputs_carry_hidden_states_and_come_as_tuples_on_request():
    model = converted_model("llama", "liger")
    ids = torch.randint(3, 128, (1, 12))
    out = model(ids, output_hidden_states=True, use_cache=False)
    assert len(out.hidden_states) == model.config.num_hidden_layers + 1  # the embeddings, then every layer's
    torch.testing.assert_close(model.lm_head(out.hidden_states[-1]), out.logits)
    as_tuple = model(ids, return_dict=False, use_cache=False)
    assert isinstance(as_tuple, tuple) and torch.equal(as_tuple[0], out.logits)
    model.config.return_dict = False
    assert isinstance(model(ids, use_cache=False), tuple)
    built = type(model)(model.config)  # the decoder's config says return_dict False too
    assert isinstance(built(ids, use_cache=False), tuple)
    assert isinstance(built(ids, return_dict=True).logits, torch.Tensor)


def test_output_flags_set_on_the_model_config_are_followed():
    """`model.config.output_hidden_states` / `output_attentions` / `return_dict` set after the model is built act as
    on transformers' models, where the decoder shares the model's config; here the decoder has its own copy, made when
    the model was built, and the flags set since were ignored."""
    model = converted_model("gemma2", "liger")
    model.set_attn_implementation("eager")  # which returns the attention weights of the kept softmax layer
    ids = torch.randint(3, 128, (1, 12))
    model.config.output_hidden_states = model.config.output_attentions = True
    out = model(ids, use_cache=False)
    assert len(out.hidden_states) == model.config.num_hidden_layers + 1
    assert len(out.attentions) == len(model.config.linearize["softmax_layers"])
    model.config.output_hidden_states = model.config.output_attentions = False
    out = model(ids, use_cache=False)
    assert out.hidden_states is None and out.attentions is None
    model.config.return_dict = False
    assert isinstance(model.get_decoder()(ids, use_cache=False), tuple)


@pytest.mark.parametrize("method", METHODS)
def test_a_model_built_from_its_config_computes_finite_logits(method):
    """`from_config` initialises every parameter a method adds (uninitialised memory would give NaN or 1e30)."""
    model = AutoModelForCausalLM.from_config(converted_model("llama", method).config)
    assert all(torch.isfinite(p).all() and p.abs().max() < 100 for p in model.parameters())
    assert torch.isfinite(model(torch.randint(3, 128, (1, 20))).logits).all()


def test_converted_layers_keep_source_weights():
    source = source_model("qwen3")
    model = converted_model("qwen3", "liger")
    for name, tensor in source.state_dict().items():
        assert torch.equal(model.state_dict()[name], tensor), name


def test_unsupported_family_is_refused():
    config = GPT2Config(n_layer=2, n_embd=32, n_head=2)
    with pytest.raises(
        UnsupportedModelError, match="gemma2, gemma3_text, granite, llama, mistral, olmo2, phi3, qwen2, qwen3"
    ):
        plan_conversion(config, "gpt2", "liger")


@pytest.mark.parametrize("method", METHODS)
def test_decoding_from_the_first_token_equals_full_forward(method):
    model = converted_model("mistral", method)
    ids = torch.randint(3, 128, (2, 20))
    incremental, _ = decode_incrementally(model, ids, chunks=())
    torch.testing.assert_close(incremental, model(ids, use_cache=False).logits, rtol=1e-4, atol=1e-4)


def test_a_converted_mistral_model_is_built_without_transformers_advice_to_use_ministral(caplog):
    import logging

    logging.Logger.warning_once.cache_clear()  # transformers says it once per process: an earlier test may have
    converted_model("mistral", "liger")
    assert "with layer_types" not in caplog.text
