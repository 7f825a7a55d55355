"""The conversion methods: what each one turns an attention layer into, and its typed settings.

A new method is one `Method` entry here, its settings class (a `MethodSettings` dataclass whose fields are declared
with `setting`), and its layer file in `linearize/layers/` (a `LinearizedAttention` subclass, named here as
'module.Class' under `linearize.layers`). Everything users see of a method's parameters derives from its settings
class: `linearize convert`'s options and their --help, the recipe's `conversion` section and its errors,
`recipe init`'s template, the `linearize` block of a converted config and the `--dry-run` plan. Adding a parameter
is one field here, read by the layer.

This module imports neither torch nor pydantic: the CLI builds its options from it before any command runs.
"""

from __future__ import annotations

import dataclasses
import importlib
import math
import typing
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from .errors import LinearizeError

# The keys of a converted config's `linearize` block that are not method parameters: the method and which layers
# stay softmax attention (with `auto:K`, how they were chosen: `linearize.selection.LayerSelection`).
LAYOUT_KEYS = ("method", "softmax_layers", "layer_selection")

_META = "linearize"  # the key of a settings field's `Setting` in its dataclass metadata


@dataclass(frozen=True)
class Setting:
    """What a settings field declares beyond its name, type and default: what it is and which values are valid."""

    help: str  # a noun phrase: "--window is {help}" reads as a sentence
    low: float | None = None
    high: float | None = None
    exclusive: bool = False  # the bounds themselves are invalid
    choices: tuple[str, ...] = ()
    tokens: bool = False  # a count of tokens: more than the model reads is an error

    def describe_range(self) -> str:
        if self.choices:
            return "one of " + ", ".join(self.choices)
        if self.low is not None and self.high is not None:
            return f"{'strictly ' if self.exclusive else ''}between {self.low:g} and {self.high:g}"
        if self.low is not None:
            return f"{'above' if self.exclusive else 'at least'} {self.low:g}"
        if self.high is not None:
            return f"{'below' if self.exclusive else 'at most'} {self.high:g}"
        return ""

    def admits(self, value: Any) -> bool:
        if self.choices:
            return value in self.choices
        below = self.low is not None and (value <= self.low if self.exclusive else value < self.low)
        above = self.high is not None and (value >= self.high if self.exclusive else value > self.high)
        return not (below or above)


def setting(
    default: Any,
    help: str,
    *,
    low: float | None = None,
    high: float | None = None,
    exclusive: bool = False,
    choices: tuple[str, ...] = (),
    tokens: bool = False,
) -> Any:
    """Declare a field of a `MethodSettings` class: its default, help text and valid values."""
    return field(default=default, metadata={_META: Setting(help, low, high, exclusive, choices, tokens)})


@dataclass(frozen=True)
class Parameter:
    """One field of a settings class, as the CLI, recipes and configs see it."""

    name: str
    annotation: Any  # as declared: int, float, str, `int | None`, `int | float` (a count or a ratio)
    type: type  # int, float or str: the type a user writes on the command line
    default: Any
    spec: Setting

    @property
    def flag(self) -> str:
        return cli_flag(self.name)


def cli_flag(name: str) -> str:
    return "--" + name.replace("_", "-")


@dataclass(frozen=True)
class MethodSettings:
    """Base of every method's settings: a frozen dataclass whose fields (declared with `setting`) are the method's
    parameters. `build` validates user input into one; `to_dict` is what a converted config's `linearize` block
    stores beside the method name."""

    @classmethod
    def parameters(cls) -> list[Parameter]:
        hints = typing.get_type_hints(cls)
        params = []
        for f in dataclasses.fields(cls):
            kinds = [t for t in typing.get_args(hints[f.name]) or (hints[f.name],) if t is not type(None)]
            # the widest kind a user may write: `int | float` (a count or a ratio) is a float on the command line
            kind = float if float in kinds else kinds[0]
            params.append(Parameter(f.name, hints[f.name], kind, f.default, f.metadata[_META]))
        return params

    @classmethod
    def build(cls, options: Mapping[str, Any], method: str, spell: Callable[[str], str] = cli_flag):
        """Validated settings from user options (None: the default). `spell` names a parameter in messages: the
        CLI flag by default, `conversion.window` in a recipe."""
        params = {p.name: p for p in cls.parameters()}
        for name, value in options.items():
            if value is not None and name not in params:
                raise LinearizeError(f"{spell(name)} does not apply to method '{method}'")
        values = {}
        for name, p in params.items():
            value = options.get(name)
            if value is None:
                values[name] = p.default
                continue
            values[name] = _checked(p, value, spell)
        return cls(**values).checked(spell)

    @classmethod
    def from_saved(cls, saved: Mapping[str, Any], method: str):
        """The settings a converted config's `linearize` block stores. Parameters added since the folder was saved
        take their defaults (which are what the older code did), and keys this version does not know are ignored
        with a warning. Each value is checked as a user's option is (a config.json may have been edited by hand:
        a window of -3 failed later as a negative tensor size), named `linearize.window in the config`."""
        params = {p.name: p for p in cls.parameters()}
        unknown = sorted(set(saved) - set(params) - set(LAYOUT_KEYS))
        if unknown:
            warnings.warn(
                f"the config's linearize block has settings that method '{method}' no longer takes "
                f"({', '.join(unknown)}); they are ignored",
                stacklevel=2,
            )

        def spell(name: str) -> str:
            return f"linearize.{name} in the config"

        values = {
            name: p.default if saved[name] is None else _checked(p, saved[name], spell)
            for name, p in params.items()
            if name in saved
        }
        return cls(**values).checked(spell)

    def checked(self, spell: Callable[[str], str]):
        """Checks across fields and normalisations, after each field was checked alone: override to add them."""
        return self

    def exact_prefix(self) -> int:
        """How many tokens at the start of a document converted layers attend to exactly as softmax attention does,
        whatever they learn: there attention transfer has nothing to teach them."""
        return 0

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _checked(p: Parameter, value: Any, spell: Callable[[str], str]) -> Any:
    name = spell(p.name)
    if p.type is str:
        if not isinstance(value, str):
            raise LinearizeError(f"{name} is {p.spec.help}: it must be {p.spec.describe_range()}, got {value!r}")
    else:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise LinearizeError(f"{name} is {p.spec.help}: it must be a number, got {value!r}")
        if not math.isfinite(value):
            raise LinearizeError(f"{name} is {p.spec.help}: it must be a finite number, got {value}")
        if p.type is int:
            if value != int(value):
                raise LinearizeError(f"{name} is {p.spec.help}: it must be a whole number, got {value:g}")
            value = int(value)
    if not p.spec.admits(value):
        shown = f"{value:g}" if isinstance(value, (int, float)) else repr(value)
        raise LinearizeError(f"{name} is {p.spec.help}: it must be {p.spec.describe_range()}, got {shown}")
    return value


def _sinks_inside_window(settings, spell: Callable[[str], str]) -> None:
    if not settings.sinks < settings.window:
        raise LinearizeError(
            f"{spell('sinks')} must be between 0 and window - 1 ({settings.window - 1}), got {settings.sinks}"
        )


def _gate_normalizer() -> Any:
    return setting(
        16.0, "the divisor of the gate's log-sigmoid, log a = logsigmoid(k) / normalizer", low=0, exclusive=True
    )


def _gate_source() -> Any:
    return setting(
        "normed",
        "the key the gate reads in qk-norm families, normed (as attention sees it) or raw",
        choices=("normed", "raw"),
    )


@dataclass(frozen=True)
class LigerSettings(MethodSettings):
    window: int = setting(
        64, "the number of keys each query sees in the window branch, itself included", low=1, tokens=True
    )
    sinks: int = setting(
        0, "the number of first tokens the window branch also sees (the window counts them)", low=0, tokens=True
    )
    mix: float = setting(
        0.5, "the window branch's weight (the gated linear branch gets 1 - mix)", low=0, high=1, exclusive=True
    )
    gate_normalizer: float = _gate_normalizer()
    gate_source: str = _gate_source()

    def checked(self, spell):
        _sinks_inside_window(self, spell)
        return self


@dataclass(frozen=True)
class LigerGlaSettings(MethodSettings):
    gate_normalizer: float = _gate_normalizer()
    gate_source: str = _gate_source()


@dataclass(frozen=True)
class StillSettings(MethodSettings):
    chunk_size: int = setting(64, "the number of tokens per chunk, the unit of selection", low=2, tokens=True)
    topk: int | float = setting(
        4,
        "the number of salient tokens per chunk and head, a count (4) or a ratio of the chunk (0.0625)",
        low=0,
        exclusive=True,
        tokens=True,
    )

    def checked(self, spell):
        topk = self.topk
        if 0 < topk < 1:
            topk = max(1, round(topk * self.chunk_size))
        if topk != int(topk) or not 1 <= topk <= self.chunk_size:
            raise LinearizeError(
                f"{spell('topk')} must be a whole number of tokens between 1 and the chunk size ({self.chunk_size}) "
                f"or a ratio between 0 and 1, got {self.topk:g}"
            )
        return dataclasses.replace(self, topk=int(topk))

    def exact_prefix(self) -> int:
        return 2 * self.chunk_size  # the first two chunks' queries see no linear state (docs/methods.md §3)


@dataclass(frozen=True)
class ParallaxSettings(MethodSettings):
    window: int | None = setting(
        None,
        "the number of keys each query sees, itself included (default: unset, every earlier key)",
        low=1,
        tokens=True,
    )
    probe_rank: int | None = setting(
        None,
        "the rank of the probe's projection, hidden -> rank -> heads x head_dim, as LoRA factors a weight (default: "
        "unset, a full projection of q_proj's shape)",
        low=1,
    )


@dataclass(frozen=True)
class SinkWindowSettings(MethodSettings):
    window: int = setting(64, "the number of keys each query sees, itself and the sinks included", low=1, tokens=True)
    sinks: int = setting(4, "the number of first tokens every query also sees", low=0, tokens=True)

    def checked(self, spell):
        _sinks_inside_window(self, spell)
        return self

    def exact_prefix(self) -> int:
        return self.window  # a query among the first `window` tokens sees every key before it


@dataclass(frozen=True)
class Method:
    name: str
    layer: str  # 'module.Class' in linearize.layers: named, not imported, so the CLI lists methods without torch
    layer_type: str  # transformers' `layer_types` value for a converted layer
    summary: str
    settings: type[MethodSettings]
    adds_parameters: bool = False  # whether converted layers own parameters the source model lacks
    exact_at_conversion: bool = False  # converted layers compute the source's outputs until trained
    cache_growth: str = ""  # what makes the converted layers' cache grow with the context, if anything does

    @property
    def layer_class(self) -> type:
        module, _, name = self.layer.rpartition(".")
        return getattr(importlib.import_module(f"{__package__}.layers.{module}"), name)

    def exact_with(self, settings: MethodSettings) -> bool:
        """Whether layers converted with `settings` compute the source's outputs until trained: a method exact at
        conversion is not once a `window` cuts off the keys its source layers see (Parallax's `--window`)."""
        return self.exact_span(settings) == math.inf

    def exact_span(self, settings: MethodSettings, trained: bool = False) -> float:
        """How many tokens from a sequence's start layers converted with `settings` compute the source's attention
        over exactly, as converted or (`trained`) whatever they learn (`MethodSettings.exact_prefix`); `math.inf`:
        every token. A method exact at conversion is so up to its `window` until trained."""
        if self.exact_at_conversion and not trained:
            return getattr(settings, "window", None) or math.inf
        return settings.exact_prefix()


METHODS: dict[str, Method] = {
    m.name: m
    for m in (
        Method(
            "liger",
            "liger.LigerAttention",
            "hybrid_sliding",
            "gated linear attention with gates from the pretrained keys, mixed (0.5/0.5 by default) with a sliding"
            " window (optionally with attention sinks; window counts them)",
            LigerSettings,
        ),
        Method(
            "liger-gla",
            "liger.LigerAttention",
            "linear_attention",
            "Liger's gated linear attention alone, without the window branch",
            LigerGlaSettings,
        ),
        Method(
            "still",
            "still.StillAttention",
            "hybrid",
            "exact softmax for the top-k self-salient tokens of every chunk (and the last two chunks), NP-Map gated "
            "linear attention for the rest, one shared normalizer",
            StillSettings,
            adds_parameters=True,
            cache_growth="salient tokens",
        ),
        Method(
            "parallax",
            "parallax.ParallaxAttention",
            "full_attention",  # transformers validates layer_types; the probe changes no cache or mask
            "softmax attention corrected by a learned probe r (o = softmax average - covariance(v, k) r); exactly "
            "the source at conversion (r = 0), optionally over a sliding window",
            ParallaxSettings,
            adds_parameters=True,
            exact_at_conversion=True,
            cache_growth="every token's keys and values, as softmax attention; set a window to cap it",
        ),
        Method(
            "swa",
            "swa.SinkWindowAttention",
            "sliding_attention",
            "training-free baseline: attention sinks plus a sliding window (window counts the sinks)",
            SinkWindowSettings,
        ),
    )
}


def get_method(name: str) -> Method:
    try:
        return METHODS[name]
    except KeyError:
        raise LinearizeError(f"unknown method '{name}'; choose one of: {', '.join(METHODS)}") from None


def method_settings(method: str, spell: Callable[[str], str] = cli_flag, **options: Any) -> MethodSettings:
    """`method`'s settings from user options (None: the default), validated; see `MethodSettings.build`."""
    return get_method(method).settings.build(options, method, spell)


def all_parameters() -> dict[str, list[tuple[str, Parameter]]]:
    """Every parameter name any method takes, in declaration order, with the (method, parameter) pairs that take
    it: what the CLI's options and the recipe's `conversion` fields are built from."""
    out: dict[str, list[tuple[str, Parameter]]] = {}
    for method in METHODS.values():
        for p in method.settings.parameters():
            out.setdefault(p.name, []).append((method.name, p))
    return out


def describe_parameter(takers: list[tuple[str, Parameter]], named: bool = True) -> str:
    """One help text for a parameter several methods take: each method's meaning and default, merged where equal,
    after the methods' names (unless `named` is False)."""
    parts: dict[str, list[str]] = {}
    for method, p in takers:
        if p.default is None:  # the help says what unset means
            text = p.spec.help
        else:
            text = (
                f"{p.spec.help} (default {p.default:g})"
                if isinstance(p.default, float)
                else f"{p.spec.help} (default {p.default})"
            )
        parts.setdefault(text, []).append(method)
    if not named:
        return "; ".join(parts)
    return "; ".join(f"{', '.join(methods)}: {text}" for text, methods in parts.items())
