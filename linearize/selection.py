"""Keeping softmax attention where linearizing hurts most: `--softmax-layers auto:K` (docs/methods.md §6).

Every layer gets a score, how much converting that layer alone hurts on calibration text, and the K layers with
the highest scores stay softmax attention; or, with `spread`, the highest-scoring layer of each of K equal stretches
of the depth (the kept layers spread over the model as `every:N` spreads them, at the places the scores choose), or
of S < K stretches and then the K - S highest-scoring others.
Three scorers:

- `output`: the converted layer's attention output against the original's, on the original model's inputs: the
  mean squared error that attention transfer minimises (`training.transfer.AttentionTransfer`), divided by the
  mean square of the original output, so that layers whose outputs differ in scale compare on one scale. One
  forward pass over the calibration text scores every layer.
- `loss`: the increase of the model's mean next-token loss (nats) when that layer alone is converted and every
  other layer computes the original attention. One forward pass per layer, plus one for the original.
- `restore`: the decrease of the mean next-token loss when that layer alone computes the original attention and
  every other layer stays converted: what keeping the layer gains the model it will be kept in. One forward pass
  per layer, plus one for the converted model.

All run the converted model itself: a layer computes the original attention from the source projections it
owns (`training.transfer.original_model`), so scoring needs no second copy of the model, only a forward pass and
the parameters the method adds.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

from .errors import LinearizeError
from .methods import cli_flag, get_method

if TYPE_CHECKING:  # torch loads inside the functions: the CLI reads this module's names before any command runs
    import torch

    from .methods import MethodSettings

SCORERS = {
    "output": "relative error of the layer's attention output against the original's (one forward pass)",
    "loss": "increase of the next-token loss when the layer alone is converted (one forward pass per layer)",
    "restore": "decrease of the next-token loss when the layer alone is restored in the converted model (one "
    "forward pass per layer)",
}
DEFAULT_SCORER = "loss"
AUTO_PREFIX = "auto:"
CALIBRATION_TEXT = "builtin"  # the training split of the built-in English corpus: never the held-out split
CALIBRATION_WINDOWS = 4
CALIBRATION_CONTEXT = 512


@dataclass(frozen=True)
class SelectionRequest:
    """What `auto:K` asks for: keep the `k` layers that `scorer` ranks worst on `windows` x `context` tokens of
    `calibration` (a text source as `linearize eval --text` takes it), or with `spread` the worst of each of `k`
    equal stretches of the depth (an integer S: of S stretches, then the k - S worst others)."""

    k: int
    scorer: str = DEFAULT_SCORER
    calibration: str = CALIBRATION_TEXT
    windows: int = CALIBRATION_WINDOWS
    context: int = CALIBRATION_CONTEXT
    spread: bool | int = False

    @property
    def rule(self) -> str:
        return _kept_rule(self.k, self.spread)

    def check_method(
        self, method: str, settings: MethodSettings, spell: Callable[[str], str] = cli_flag, after: str = "conversion"
    ) -> None:
        """Refuse a method whose converted layers compute the original attention exactly until trained (with these
        `settings`), or over the whole of each calibration window when scored `after` "conversion" or (whatever
        they learn) "attention_transfer": every layer would score 0, and the K kept would be chosen by rounding
        errors. `spell` names the option in the message (the CLI's flag)."""
        option = spell("softmax_layers")
        if get_method(method).exact_with(settings):
            raise LinearizeError(
                f"{option} auto:K scores layers by what converting them changes, and method '{method}' without a "
                "window computes the original attention exactly until trained, so every layer would score 0; name "
                "the layers instead (e.g. '0,8,16' or 'every:8')"
            )
        exact = get_method(method).exact_span(settings, trained=after == "attention_transfer")
        if self.context <= exact:
            knob = spell("window" if hasattr(settings, "window") else "chunk_size")
            raise LinearizeError(
                f"{option} auto:K scores layers on windows of {self.context} tokens, and method '{method}' with these "
                f"settings computes the original attention exactly over the first {exact} tokens of a sequence, so "
                "every layer would score 0 and rounding errors would choose; name the layers instead (e.g. '0,8,16' "
                f"or 'every:8'), or convert with a smaller {knob}"
            )


@dataclass(frozen=True)
class LayerSelection:
    """The outcome of `auto:K`: one score per layer (higher hurts more) and the K layers kept."""

    k: int
    scorer: str
    scores: list[float]
    calibration: str  # what the scores were measured on, in words
    after: str = "conversion"  # or "attention_transfer": scored with the trained converted layers
    spread: bool | int = False  # one layer from each of k (or of `spread`) equal stretches of the depth

    @property
    def layers(self) -> list[int]:
        """The kept layers, in layer order: the highest-scoring of each of the `spread` stretches of
        `depth_stretches` (none without `spread`), then the highest-scoring others up to `k` (ties go to the
        earlier layer)."""
        stretches = stretch_count(self.k, self.spread)
        chosen = [
            max(stretch, key=lambda i: (self.scores[i], -i)) for stretch in depth_stretches(len(self.scores), stretches)
        ]
        others = sorted((i for i in range(len(self.scores)) if i not in chosen), key=lambda i: (-self.scores[i], i))
        return sorted(chosen + others[: self.k - stretches])

    @property
    def rule(self) -> str:
        return _kept_rule(self.k, self.spread)

    def to_dict(self) -> dict:
        return asdict(self)


def stretch_count(k: int, spread: bool | int) -> int:
    """Stretches of the depth that `spread` asks for: `k` for True, none for False, else the number given."""
    if isinstance(spread, bool):
        return k if spread else 0
    return spread


def spread_flag(spread: bool | int) -> str:
    """The `linearize convert` flag that asks for `spread`, with a leading space ("" for none)."""
    if isinstance(spread, bool):
        return " --spread-layers" if spread else ""
    return f" --spread-over {spread}"


def _kept_rule(k: int, spread: bool | int) -> str:
    """Which layers `auto:K` keeps, in words."""
    stretches = stretch_count(k, spread)
    if not stretches:
        return f"the {k} highest-scoring layers" if k != 1 else "the highest-scoring layer"
    rule = f"the highest-scoring layer of each of {stretches} equal stretches of the depth"
    others = k - stretches
    if others:
        rule += f", then the {others} highest-scoring others" if others != 1 else ", then the highest-scoring other"
    return rule


def depth_stretches(num_layers: int, k: int) -> list[range]:
    """`num_layers` layers cut into `k` contiguous stretches whose sizes differ by at most one."""
    return [range(j * num_layers // k, (j + 1) * num_layers // k) for j in range(k)]


def parse_auto(
    spec: str | None,
    scorer: str = DEFAULT_SCORER,
    spread: bool | int = False,
    spell: Callable[[str], str] = cli_flag,
    spread_option: str = "--spread-over",
    **calibration,
) -> SelectionRequest | None:
    """The request that a `--softmax-layers` value 'auto:K' makes, or None for any other value.

    Args:
        spec: the `--softmax-layers` value.
        scorer: a key of `SCORERS`.
        spread: keep the highest-scoring layer of each of K equal stretches of the depth; an integer S (1 to K):
            of each of S stretches, then the K - S highest-scoring others.
        spell: names the option in messages (a recipe's `conversion.softmax_layers`).
        spread_option: names where `spread` was given, in messages (a recipe's `conversion.selection.spread`).
        calibration: `calibration`, `windows` and `context` of `SelectionRequest` (None: the default).
    """
    if not spec or not spec.startswith(AUTO_PREFIX):
        return None
    count = spec.removeprefix(AUTO_PREFIX)
    if not count.isdecimal():  # isdigit() would pass '²', which int() refuses
        raise LinearizeError(
            f"{spell('softmax_layers')} '{spec}' is malformed: K in 'auto:K' is the number of layers to keep as "
            "softmax attention, a whole number from 0 (e.g. 'auto:4')"
        )
    if scorer not in SCORERS:
        raise LinearizeError(f"unknown layer scorer '{scorer}'; choose one of: {', '.join(SCORERS)}")
    if not isinstance(spread, bool) and not 1 <= spread <= int(count):
        raise LinearizeError(
            f"{spread_option} {spread} spreads auto:{count} over {spread} stretches of the depth; the number of "
            f"stretches must be from 1 to K = {count} (each keeps one layer; the rest are the highest-scoring others)"
        )
    settings = {k: v for k, v in calibration.items() if v is not None}
    return SelectionRequest(int(count), scorer, spread=spread, **settings)


def check_calibration_source(request: SelectionRequest, option: str = "--calibration") -> None:
    """Refuse what the calibration text's spec alone shows cannot be read (a malformed hf: spec, a file or glob that
    names no file), before the weights load: `calibration_windows` finds it only once the model is there to score."""
    from .data import DataError, data_files
    from .evaluation import text_source

    source = text_source(request.calibration, default_split="train", option=option)
    if source.path is not None:
        try:
            data_files(source.path)
        except DataError as error:
            raise LinearizeError(f"{option}: {error}") from None


def calibration_windows(request: SelectionRequest, tokenizer, option: str = "--calibration") -> torch.Tensor:
    """The calibration tokens, `[N, context]`, read as `linearize eval --text` reads text, except that "builtin" and
    a Hugging Face dataset named without a split mean their training split: held-out text must stay unseen by
    every choice made before evaluation. `option` names where the text was given (a recipe's key)."""
    from .data import TooFewTokens
    from .evaluation import text_windows

    try:
        return text_windows(
            request.calibration, tokenizer, request.context, request.windows, default_split="train", option=option
        )
    except TooFewTokens as error:
        raise LinearizeError(
            f"calibration text '{request.calibration}' is too short to score layers on: {error.tokens} tokens, "
            f"fewer than one window of {request.context}; give {option} a longer text"
            + (f" (its default, {CALIBRATION_TEXT}, is long enough)" if request.calibration != CALIBRATION_TEXT else "")
        ) from None


def describe_calibration(request: SelectionRequest, windows: torch.Tensor) -> str:
    text = "built-in English (train split)" if request.calibration == CALIBRATION_TEXT else request.calibration
    return f"{text}, {windows.shape[0]} x {windows.shape[1]} tokens"


def scoring_passes(scorer: str, num_layers: int) -> int:
    """Forward passes over the calibration text that `scorer` makes: the length of its progress."""
    return 1 if scorer == "output" else num_layers + 1


def score_layers(model, windows: torch.Tensor, scorer: str, step: Callable[[], None] | None = None) -> list[float]:
    """One score per converted layer of `model`, in layer order: how much converting that layer alone hurts
    (`restore`: how much restoring it alone helps).

    Args:
        model: a converted model (LinearizeForCausalLM, or a peft model around one) whose layers to score.
        windows: calibration tokens `[N, C]`, each window read from an empty state.
        scorer: a key of `SCORERS`, "output", "loss" or "restore" (see the module docstring).
        step: called after each window of each forward pass (`scoring_passes(scorer, layers) * N` calls).
    """
    import torch

    from .evaluation import eval_mode
    from .layers.base import LinearizedAttention
    from .training.transfer import AttentionTransfer, original_model

    layers = [m for m in model.modules() if isinstance(m, LinearizedAttention)]
    with eval_mode(model), torch.no_grad():  # each module's mode put back after
        if scorer == "output":
            totals = torch.zeros(len(layers), dtype=torch.float64)
            with AttentionTransfer(model, relative=True) as transfer:
                for row in windows.to(model.device):
                    model(input_ids=row[None], use_cache=False, logits_to_keep=1)
                    totals += torch.stack(transfer.layer_losses).double().cpu()
                    transfer.layer_losses = []
                    _call(step)
            return (totals / windows.shape[0]).tolist()
        if scorer == "restore":
            converted = _mean_loss(model, windows, step)
            scores = []
            for attn in layers:
                with _restored(attn):
                    scores.append(converted - _mean_loss(model, windows, step))
            return scores
        with original_model(model) as original:
            baseline = _mean_loss(original, windows, step)
            scores = []
            for attn in layers:
                with _converted(attn):
                    scores.append(_mean_loss(original, windows, step) - baseline)
            return scores


def select_layers(
    model,
    tokenizer,
    request: SelectionRequest,
    progress: Callable[[int], Callable[[], None]] | None = None,
    after: str = "conversion",
) -> LayerSelection:
    """Score every layer of `model`, a converted model with every layer converted, and choose `request.k`.

    Args:
        progress: called once the calibration text is read with the number of steps scoring takes; returns the
            callback that scoring calls after each.
        after: when this happens, "conversion" or "attention_transfer" (recorded with the choice).
    """
    from .layers.base import LinearizedAttention

    windows = calibration_windows(request, tokenizer)
    layers = sum(isinstance(m, LinearizedAttention) for m in model.modules())
    step = progress(scoring_passes(request.scorer, layers) * windows.shape[0]) if progress else None
    scores = score_layers(model, windows, request.scorer, step)
    if broken := [i for i, score in enumerate(scores) if not math.isfinite(score)]:
        # a NaN would sort anywhere and mis-rank the finite scores too
        raise LinearizeError(
            f"auto:K scored layer(s) {', '.join(map(str, broken))} as {scores[broken[0]]}: the model's forward "
            "overflowed or gave NaN on the calibration text (float16 is the usual cause); run in bfloat16 or "
            "float32, or name the layers to keep instead"
        )
    calibration = describe_calibration(request, windows)
    return LayerSelection(request.k, request.scorer, scores, calibration, after, request.spread)


@contextmanager
def _converted(attn):
    """Inside `training.transfer.original_model`: this layer alone runs its converted attention, with its own LoRA
    adapters on (the context turned every adapter off)."""
    from .training.transfer import lora_layers

    as_original = attn.__dict__.pop("forward")
    adapters = lora_layers(attn)
    for module in adapters:
        module.enable_adapters(True)
    try:
        yield
    finally:
        for module in adapters:
            module.enable_adapters(False)
        attn.forward = as_original


@contextmanager
def _restored(attn):
    """In the converted model: this layer alone computes the original attention, as `keep_softmax_layers` would
    keep it (its source projections, LoRA left out)."""
    from .training.transfer import original_attention_forward

    attn.forward = original_attention_forward(attn)
    try:
        yield
    finally:
        del attn.forward


def _mean_loss(model, windows: torch.Tensor, step: Callable[[], None] | None) -> float:
    from .evaluation import perplexity_of_windows

    return math.log(perplexity_of_windows(model, windows, step))


def _call(step: Callable[[], None] | None) -> None:
    if step is not None:
        step()
