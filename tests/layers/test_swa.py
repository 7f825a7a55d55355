"""The sinks + sliding-window baseline equals the unchanged source model under the explicit mask of
docs/methods.md §5."""

import pytest
import torch

from linearize.convert import convert_model, plan_conversion
from linearize.layers.swa import SinkWindowCacheLayer, sink_window_attention
from tests.tiny import FAMILIES, VARIANTS, assert_computes_the_source, converted_model, source_model


def sink_window_mask(length: int, window: int, sinks: int) -> torch.Tensor:
    i = torch.arange(length)[:, None]
    j = torch.arange(length)[None, :]
    return (j <= i) & ((j < sinks) | (i - j < window - sinks))  # [T, T], True = attend


@pytest.mark.parametrize("family", FAMILIES)
def test_swa_equals_source_with_sink_window_mask(family):
    window, sinks = VARIANTS["swa"][1]["window"], VARIANTS["swa"][1]["sinks"]
    source = source_model(family)
    converted = converted_model(family, "swa", convert_layers="all")  # the mask below is every layer's
    ids = torch.randint(3, 128, (2, 37))
    mask = sink_window_mask(37, window, sinks)[None, None].expand(2, 1, -1, -1)
    mask = torch.zeros(mask.shape).masked_fill(~mask, float("-inf"))  # additive: eager attention (Gemma 2) adds it
    with torch.no_grad():
        expected = source(ids, attention_mask=mask, use_cache=False).logits
        actual = converted(ids, use_cache=False).logits
    torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("family", FAMILIES)
def test_swa_with_a_window_longer_than_the_text_is_the_source(family):
    source = source_model(family)
    plan = plan_conversion(source.config, family, "swa", window=64, sinks=4)
    model = convert_model(source, plan.config)
    ids = torch.randint(3, 128, (2, 37))
    with torch.no_grad():
        torch.testing.assert_close(model(ids, use_cache=False).logits, source(ids).logits, rtol=1e-5, atol=1e-5)


def test_decode_steps_keep_the_sinks_that_leave_the_window_and_then_stop_checking():
    """Prefill, one-token steps (which attend to the sink slots and the ring in one storage), a multi-token chunk
    and more steps, with left padding so that each row's sinks leave the window at a different step: every query
    sees exactly its row's sinks and window, and the cache stops its sink bookkeeping only once no row can evict a
    sink any more."""
    recent, sinks, heads, kv_heads, dim = 5, 2, 4, 2, 8
    pads, length = (0, 6, 17), 32
    q = torch.randn(3, length, heads, dim)
    k, v = torch.randn(3, length, kv_heads, dim), torch.randn(3, length, kv_heads, dim)
    valid = torch.arange(length)[None] >= torch.tensor(pads)[:, None]  # [B, T]
    state = SinkWindowCacheLayer(recent, sinks)
    outputs, start = [], 0
    for step in [4] + [1] * 12 + [3] + [1] * 13:
        end = start + step
        outputs.append(
            sink_window_attention(
                q[:, start:end], k[:, start:end], v[:, start:end], valid[:, start:end], state,
                recent=recent, sinks=sinks, scale=dim**-0.5, backend="torch",
            )
        )  # fmt: skip
        start = end
        if step == 1:  # settled once every row has seen sinks + recent - 1 real tokens (the ring keeps recent - 1)
            assert state.sinks_settled == bool(valid[:, :end].sum(1).min() >= sinks + recent - 1)
    actual = torch.cat(outputs, 1)
    for row, pad in enumerate(pads):
        mask = sink_window_mask(length - pad, recent + sinks, sinks)
        qr, kr, vr = (x[row, pad:].double().transpose(0, 1) for x in (q, k, v))  # [heads, T, dim]
        kr, vr = (x.repeat_interleave(heads // kv_heads, 0) for x in (kr, vr))
        z = (qr @ kr.mT * dim**-0.5).masked_fill(~mask, float("-inf"))
        expected = (z.softmax(-1) @ vr).transpose(0, 1)  # [T, heads, dim]
        torch.testing.assert_close(actual[row, pad:].double(), expected, rtol=1e-5, atol=1e-5)


def _windowed_mistral():
    config = source_model("mistral").config
    config.sliding_window = 8  # the tiny Mistral has none
    return type(source_model("mistral"))(config).eval()


def test_a_window_wider_than_the_source_layers_is_narrowed_to_it():
    """A source with a window in every layer (Mistral 7B v0.1): a wider window would read further back than the
    source was trained to and cache more; narrowed, swa without sinks is the source exactly, cached decoding too."""
    source = _windowed_mistral()
    model = convert_model(source, plan_conversion(source.config, "mistral", "swa", window=32, sinks=0).config).eval()
    assert_computes_the_source(model, source, torch.randint(3, 128, (1, 40)), prefill=30)
    assert model.model.layers[0].self_attn.recent == 8
    with_sinks = plan_conversion(source.config, "mistral", "swa", window=32, sinks=2).config
    assert with_sinks.layer_settings(0).window == 8 and with_sinks.settings.window == 32  # the sinks count in it


def test_liger_narrows_its_window_branch_to_the_source_layers():
    source = _windowed_mistral()
    model = convert_model(source, plan_conversion(source.config, "mistral", "liger", window=32).config)
    assert [layer.self_attn.window for layer in model.model.layers] == [8, 8]
