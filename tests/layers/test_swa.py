"""The sinks + sliding-window baseline equals the unchanged source model under the explicit mask of
docs/methods.md §5."""

import pytest
import torch

from linearize.convert import convert_model, plan_conversion
from tests.tiny import FAMILIES, VARIANTS, converted_model, source_model


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
