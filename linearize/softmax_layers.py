"""The `--softmax-layers` value (a recipe's `conversion.softmax_layers`): which layers stay softmax attention.

'' keeps none, '0,8,16' those layers, 'every:8' layers 0, 8, 16, ...; 'auto:K' is measured, not parsed
(`linearize.selection`). Torch-free: recipes check the value before any model config is read.
"""

from __future__ import annotations

from collections.abc import Callable

from .errors import LinearizeError
from .methods import cli_flag
from .selection import parse_auto


def check_softmax_layers(
    spec: str | None, spell: Callable[[str], str] = cli_flag, num_layers: int | None = None
) -> None:
    """Refuse a `--softmax-layers` value that is malformed whatever the model: a recipe's check calls it before any
    config is read, and `parse_softmax_layers` before it checks the indices against `num_layers`."""
    if not spec or parse_auto(spec, spell=spell) is not None:
        return
    option = spell("softmax_layers")
    if spec.startswith("every:"):
        step = spec.removeprefix("every:")
        if not step.isdecimal() or int(step) < 1:
            raise LinearizeError(f"{option} '{spec}' is malformed: N in 'every:N' must be a positive integer")
        return
    for item in spec.split(","):
        if not item.strip().isdecimal():  # isdigit() would pass '²', which int() refuses
            raise LinearizeError(
                f"{option} '{spec}' is malformed: '{item}' is not a layer index; {_layers_usage(num_layers)}"
            )


def _layers_usage(num_layers: int | None) -> str:
    below = "" if num_layers is None else f" below {num_layers}"
    return (
        f"use a comma-separated list of layer indices{below} (e.g. '0,8,16'), 'every:N' (e.g. 'every:8') "
        "or 'auto:K' (the K layers that converting hurts most)"
    )


def parse_softmax_layers(spec: str | None, num_layers: int, spell: Callable[[str], str] = cli_flag) -> list[int]:
    """Parse `--softmax-layers`: '' (none), '0,8,16' (those layers) or 'every:8' (layers 0, 8, 16, ...). 'auto:K'
    is measured, not parsed: `plan_conversion` plans it with no kept layers until `convert_and_save` scores.
    `spell` names the option in messages (a recipe's `conversion.softmax_layers`)."""
    if not spec:
        return []
    check_softmax_layers(spec, spell, num_layers)
    option = spell("softmax_layers")
    request = parse_auto(spec, spell=spell)
    if request is not None:
        if request.k > num_layers:
            raise LinearizeError(
                f"{option} '{spec}' keeps more layers than the model has ({num_layers}): choose K from 0 "
                f"to {num_layers}"
            )
        return []
    if spec.startswith("every:"):
        return list(range(0, num_layers, int(spec.removeprefix("every:"))))
    layers = [int(item) for item in spec.split(",")]
    out_of_range = [i for i in layers if i >= num_layers]
    if out_of_range:
        raise LinearizeError(
            f"{option} '{spec}': the model has {num_layers} layers (0-{num_layers - 1}); {_layers_usage(num_layers)}"
        )
    return sorted(set(layers))
