"""Conversion: plan which layers become what, build the converted model from the source weights, save it.

`plan_conversion` needs only the source config (it is what `--dry-run` prints); `convert_model` swaps
attention in a loaded model; `save_model` writes a folder that loads with `AutoModelForCausalLM`, both after
`import linearize` and with `trust_remote_code=True`, and appears only once it is complete. `convert_and_save`
runs them all from a model id or folder, then optionally compares and pushes: what `linearize convert` does.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from . import sources
from .errors import LinearizeError
from .families import CONVERT_LAYERS, FAMILIES, UnsupportedModelError, get_family
from .generation import load_for_inference
from .hub import check_can_push, check_repo_id
from .layers.base import LinearizedAttention
from .methods import LAYOUT_KEYS, MethodSettings, cli_flag, get_method, method_settings
from .models import LinearizeConfig, LinearizeForCausalLM
from .models.configuration import OWN_FIELDS
from .outputs import atomic_folder, check_output_folder
from .selection import DEFAULT_SCORER, LayerSelection, check_calibration_source, parse_auto, select_layers
from .softmax_layers import parse_softmax_layers

PLAN_CONTEXT = 8192  # context length at which the plan compares cache sizes
PASS_TOKENIZER = "pass --tokenizer PATH_OR_ID (a folder or hub id with the same model's tokenizer)"
VERIFY_PROMPT = "Explain in one sentence why the sky is blue."


def source_layer_types(source_config) -> list[str]:
    """The source's attention type of every layer: its `layer_types`, or one type for all from `sliding_window`."""
    num_layers = source_config.num_hidden_layers
    return list(
        getattr(source_config, "layer_types", None)
        or ["sliding_attention" if getattr(source_config, "sliding_window", None) else "full_attention"] * num_layers
    )


def unconverted_sliding_layers(
    source_config, convert_layers: str | None, spell: Callable[[str], str] = cli_flag
) -> list[int]:
    """The source's sliding-window layers that `--convert-layers` leaves as they are: with "global" (the default of
    families that interleave sliding-window and global layers, Gemma 2/3) every one of them, since their cache is
    already constant-size; with "all" (every other family's default) none. `spell` names the option in messages."""
    family, option = get_family(source_config.model_type), spell("convert_layers")
    choice = convert_layers or ("global" if family.sliding_layers else "all")
    if choice not in CONVERT_LAYERS:
        raise LinearizeError(f"{option} '{choice}' is not a choice: use 'global' or 'all'")
    if choice == "all":
        return []
    types = source_layer_types(source_config)
    sliding = [i for i, t in enumerate(types) if t == "sliding_attention"]
    if len(sliding) == len(types):
        raise LinearizeError(
            f"{option} global converts the layers with global attention, and every layer of this model "
            f"attends within a sliding window: nothing would be converted; use {option} all"
        )
    return sliding


def source_hub_id(source: str) -> str | None:
    """The Hub id that `source` (a Hub id, a local folder or the embedded default's name) names, or None for a
    local folder: a model card's `base_model` must be a Hub id, and a local path must not leak into one."""
    if _is_embedded(source):
        return sources.EMBEDDED_ID
    if Path(source).expanduser().exists() or source.startswith((".", "/", "~")) or source.count("/") != 1:
        return None
    return source


def source_weights(source: str) -> str:
    """Where `source`'s weights come from: "embedded" (the embedded default's name), "hub" or "local"."""
    if _is_embedded(source):
        return "embedded"
    return "hub" if source_hub_id(source) is not None else "local"


def _is_embedded(source: str) -> bool:
    # the embedded default's name, unless a folder of that name is what the user gave
    return source == sources.EMBEDDED_NAME and not Path(source).exists()


def build_config(
    source_config,
    method: str,
    settings: MethodSettings,
    softmax_layers: list[int],
    source: str | None = None,
    selection: LayerSelection | None = None,
) -> LinearizeConfig:
    """The converted model's config; `source` (the embedded default's name, a Hub id or a folder) is recorded as
    `source_model`, `source_weights` and `source_license`."""
    family = get_family(source_config.model_type)
    num_layers = source_config.num_hidden_layers
    source_types = source_layer_types(source_config)
    converted_type = get_method(method).layer_type
    fields = {k: v for k, v in source_config.to_dict().items() if k not in OWN_FIELDS}
    return LinearizeConfig(
        base_model_type=family.model_type,
        source_model=source_hub_id(source) if source is not None else None,
        source_weights=source_weights(source) if source is not None else None,
        source_license=(sources.source_license(source) or None) if source is not None else None,
        layer_types=[source_types[i] if i in softmax_layers else converted_type for i in range(num_layers)],
        source_layer_types=source_types,
        linearize={
            "method": method,
            **settings.to_dict(),
            "softmax_layers": softmax_layers,
            **({"layer_selection": selection.to_dict()} if selection is not None else {}),
        },
        **fields,
    )


def layer_groups(method: str, layer_types: list[str], softmax_layers: list[int]) -> list[tuple[str, str]]:
    """Runs of consecutive layers with the same fate, as ('0-7', 'liger') or ('8', 'softmax (full_attention)')
    pairs.

    Args:
        method: the conversion method, the fate of every converted layer.
        layer_types: one transformers layer type per layer (a converted config's `layer_types`).
        softmax_layers: indices of the layers kept as softmax attention.

    Returns:
        (layer range, fate) pairs in layer order.
    """
    fates = [f"softmax ({t})" if i in softmax_layers else method for i, t in enumerate(layer_types)]
    groups, start = [], 0
    for i in range(1, len(fates) + 1):
        if i == len(fates) or fates[i] != fates[start]:
            groups.append((f"{start}" if i - 1 == start else f"{start}-{i - 1}", fates[start]))
            start = i
    return groups


@dataclass
class ConversionPlan:
    source: str
    config: LinearizeConfig
    source_parameters: int
    converted_parameters: int
    dtype_bytes: int
    unconverted_sliding: list[int] = field(default_factory=list)  # the sliding-window layers --convert-layers left

    @property
    def settings(self) -> dict[str, Any]:
        return self.config.linearize

    @property
    def selection(self) -> LayerSelection | None:
        """How 'auto:K' chose the kept layers, once scored."""
        saved = self.settings.get("layer_selection")
        return LayerSelection(**saved) if saved else None

    def method_text(self) -> str:
        """The method and its settings, as the plans print them: "parallax  {'window': None, 'probe_rank': 8}"."""
        params = {k: v for k, v in self.settings.items() if k not in LAYOUT_KEYS}
        return f"{self.settings['method']}  {params}"

    def layer_groups(self) -> list[tuple[str, str]]:
        """Runs of consecutive layers with the same fate, as ('0-7', 'liger') pairs."""
        return layer_groups(self.settings["method"], self.config.layer_types, self.settings["softmax_layers"])

    def _head_shape(self) -> tuple[int, int, int]:
        c = self.config
        head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
        return c.num_attention_heads, c.num_key_value_heads, head_dim

    def kv_cache_bytes(self, tokens: int, layers: list[int] | None = None) -> int:
        """Bytes of the softmax KV cache of `layers` (default all: the source model's cache) for one sequence of
        `tokens` tokens. A sliding-window layer holds its last window - 1 tokens, as transformers' cache does."""
        _, kv_heads, head_dim = self._head_shape()
        types = self.config.source_types
        window = getattr(self.config, "sliding_window", None)
        held = sum(
            min(tokens, window - 1) if window and types[i] == "sliding_attention" else tokens
            for i in (range(len(types)) if layers is None else layers)
        )
        return 2 * kv_heads * head_dim * held * self.dtype_bytes

    def converted_cache_bytes(self, tokens: int) -> int:
        """Cache bytes of the converted model for one sequence of `tokens` tokens."""
        heads, kv_heads, head_dim = self._head_shape()
        layer_class, config = get_method(self.settings["method"]).layer_class, self.config
        state = sum(
            layer_class.state_bytes(config.layer_settings(i), heads, kv_heads, head_dim, self.dtype_bytes, tokens)
            for i in config.converted_layers()
        )
        return state + self.kv_cache_bytes(tokens, self.settings["softmax_layers"])


def _count_parameters(config: LinearizeConfig) -> int:
    with torch.device("meta"):
        return sum(p.numel() for p in LinearizeForCausalLM(config).parameters())


def _check_token_counts_fit(settings: MethodSettings, max_positions: int | None, spell: Callable[[str], str]) -> None:
    """A window (or chunk, ...) longer than any sequence the model can read is a typo, and a costly one: its cache
    is sized for that many tokens."""
    if max_positions is None:
        return
    for p in settings.parameters():
        value = getattr(settings, p.name)
        if p.spec.tokens and value is not None and value > max_positions:
            raise LinearizeError(
                f"{spell(p.name)} {value} is more tokens than the model reads ({max_positions}, its "
                f"config's max_position_embeddings): choose at most {max_positions}"
            )


def plan_conversion(
    source_config,
    source: str,
    method: str,
    softmax_layers: str | list[int] | LayerSelection | None = None,
    dtype: str | torch.dtype = "auto",
    convert_layers: str | None = None,
    spell: Callable[[str], str] = cli_flag,
    **options: int | float | None,
) -> ConversionPlan:
    """Everything `convert` will do, from the source config alone (no weights are read). `options` are the
    method's parameters (None: the default; see `linearize.methods`).

    `softmax_layers` is a `--softmax-layers` value (see `parse_softmax_layers`), a list of layer indices or a scored
    `LayerSelection`. An 'auto:K' value plans every layer converted: scoring needs the weights. `convert_layers`
    ("global", "all" or None for the family's default, see `unconverted_sliding_layers`) says whether the source's
    sliding-window layers are converted too; those it leaves are kept, as softmax layers. `dtype` is the dtype the
    weights will load in ("auto": the config's), for the cache sizes. `spell` names an option in messages: the CLI
    flag by default, a recipe passes its keys."""
    _check_text_only(source_config, source)
    get_family(source_config.model_type)
    _check_causal(source_config, source)
    _check_not_quantized(source_config, source)
    if isinstance(softmax_layers, list | tuple):
        softmax_layers = ",".join(map(str, softmax_layers))
    settings = method_settings(method, spell, **options)
    _check_token_counts_fit(settings, getattr(source_config, "max_position_embeddings", None), spell)
    selection = softmax_layers if isinstance(softmax_layers, LayerSelection) else None
    sliding = unconverted_sliding_layers(source_config, convert_layers, spell)
    if sliding and (selection or parse_auto(softmax_layers if isinstance(softmax_layers, str) else None)):
        layers_option, scope_option = spell("softmax_layers"), spell("convert_layers")
        raise LinearizeError(
            f"{layers_option} auto:K scores every layer, and this model's sliding-window layers are left as they "
            f"are ({scope_option} global, its family's default): add {scope_option} all, or name the layers"
        )
    num_layers = source_config.num_hidden_layers
    named = selection.layers if selection else parse_softmax_layers(softmax_layers, num_layers, spell)
    config = build_config(
        source_config,
        method,
        settings,
        sorted(set(named) | set(sliding)),
        source=source,
        selection=selection,
    )
    unconverted = build_config(source_config, method, settings, list(range(source_config.num_hidden_layers)))
    torch_dtype = getattr(source_config, "dtype", None) if dtype == "auto" else sources.torch_dtype(dtype)
    if isinstance(torch_dtype, str):
        torch_dtype = getattr(torch, torch_dtype)
    # without a dtype (a Hub checkpoint whose config names none, its weights unread): float32, as such older
    # checkpoints mostly are
    dtype_bytes = torch.finfo(torch_dtype).bits // 8 if isinstance(torch_dtype, torch.dtype) else 4
    return ConversionPlan(
        source, config, _count_parameters(unconverted), _count_parameters(config), dtype_bytes, sliding
    )


def _check_text_only(source_config, source: str) -> None:
    """A multimodal checkpoint (LLaVA, Mistral 3, Gemma 3 from 4B) wraps a language model of a supported family, and
    its own model_type is not one: name the language model, where `get_family` would ask for a new adapter."""
    text_type = getattr(getattr(source_config, "text_config", None), "model_type", None)
    if source_config.model_type in FAMILIES or text_type not in FAMILIES:
        return
    raise UnsupportedModelError(
        f"'{source}' is a multimodal model ({source_config.model_type}) around a {text_type} language model, and "
        f"linearize converts text-only causal LMs: convert a text-only {text_type} checkpoint (its language model "
        "saved alone as a *ForCausalLM, with its lm_head)"
    )


def _check_causal(source_config, source: str) -> None:
    """An embedding model of a supported family (EmbeddingGemma: gemma3_text) attends both ways, and transformers
    still loads it as a causal LM: every converted layer is causal, so the conversion would change what it computes
    (Parallax and `swa` would not be the source), and nothing would say so."""
    if getattr(source_config, "use_bidirectional_attention", False):
        raise UnsupportedModelError(
            f"'{source}' attends bidirectionally (its config's use_bidirectional_attention: an embedding model such "
            f"as EmbeddingGemma), and linearize converts causal LMs, whose tokens see only earlier ones: convert a "
            f"causal {source_config.model_type} checkpoint"
        )


def _check_not_quantized(source_config, source: str) -> None:
    """The converted layers are built as plain `nn.Linear`s around the source's weights, which a quantized
    checkpoint (bitsandbytes, GPTQ, AWQ, FP8, ...) stores packed: refuse it before anything loads."""
    quantization = getattr(source_config, "quantization_config", None)  # a dict, or a loaded model's object
    if quantization:
        method = quantization.get("quant_method") if isinstance(quantization, dict) else quantization.quant_method
        raise LinearizeError(
            f"'{source}' is a quantized checkpoint ({method}), and linearize converts full-precision weights: "
            "convert the unquantized model it was made from, then quantize the converted model if you need to"
        )


def convert_model(source_model, config: LinearizeConfig) -> LinearizeForCausalLM:
    """Build the converted model around the source model's own tensors (no copy) and return it."""
    if getattr(config, "tie_word_embeddings", False) and not _shares_embeddings(source_model):
        # transformers loads a checkpoint that stores its own lm_head untied whatever its config says (it warns):
        # tied here, the converted model would replace that head by the embeddings
        config = copy.deepcopy(config)
        config.tie_word_embeddings = False
    with torch.device("meta"):
        model = LinearizeForCausalLM(config)
    missing, unexpected = model.load_state_dict(source_model.state_dict(), strict=False, assign=True)
    added = set()
    for name, module in model.named_modules():
        if isinstance(module, LinearizedAttention):  # parameters the method adds: not in the source checkpoint
            module.init_new_parameters(source_model.device, source_model.dtype)
            added |= {f"{name}.{p}" for p, _ in module.named_parameters() if f"{name}.{p}" in missing}
    missing = [k for k in missing if k not in added]
    if unexpected or [k for k in missing if k != "lm_head.weight"]:
        raise LinearizeError(
            f"the source weights do not fit the converted model: missing {missing}, unexpected {unexpected}"
        )
    model.to(source_model.dtype)  # the parameters; the buffers are the source's, below
    # Non-persistent buffers (rotary tables) are not in the state dict: take them from the source, after the cast
    # and as they are. transformers keeps the rotary `inv_freq` in float32 in a bfloat16 model (and so does a
    # converted folder as it loads): cast to bfloat16, RoPE's angles are up to 0.9 rad off at 2K tokens.
    for name, buffer in source_model.named_buffers():
        module_name, _, buffer_name = name.rpartition(".")
        model.get_submodule(module_name)._buffers[buffer_name] = buffer
    model.tie_weights()
    model.generation_config = copy.deepcopy(source_model.generation_config)
    # Gemma asks generate for its static "hybrid" cache; a converted model brings its own (LinearizeCache)
    model.generation_config.cache_implementation = None
    return model.eval()


def _shares_embeddings(model) -> bool:
    head = model.get_output_embeddings()
    return head is None or head.weight is model.get_input_embeddings().weight


def keep_softmax_layers(model, config: LinearizeConfig):
    """Turn the layers that `config` keeps as softmax attention, converted in `model`, back into the source's
    attention, in place, and give `model` that config; returns `model`.

    A kept layer gets the family's own attention around the converted layer's projections (the same modules:
    nothing is copied); what the method added to it is dropped, and LoRA adapters on its projections start again
    from zero (what they learned served the converted attention). `model` is a LinearizeForCausalLM or a peft model
    around one, and `config` must differ from its config only in the kept layers."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    family = get_family(config.base_model_type)
    family_config = config.family_config()
    for layer_idx in config.linearize["softmax_layers"]:
        decoder_layer = base.model.layers[layer_idx]
        converted = decoder_layer.self_attn
        if not isinstance(converted, LinearizedAttention):
            continue
        with torch.device("meta"):
            kept = family.attention_class(family_config, layer_idx)
        for name, _ in list(kept.named_children()):
            setattr(kept, name, getattr(converted, name))
        left = [name for name, p in kept.named_parameters() if p.is_meta]
        if left:
            raise LinearizeError(f"the {family.model_type} attention has parameters a converted layer lacks: {left}")
        for module in kept.modules():
            for lora_b in getattr(module, "lora_B", {}).values():
                torch.nn.init.zeros_(lora_b.weight)
        decoder_layer.self_attn = kept.train(converted.training)
    base.config.layer_types = config.layer_types
    base.config.linearize = config.linearize
    base.model.config.layer_types = family_config.layer_types
    if hasattr(base.model, "has_sliding_layers"):  # Qwen2/3 read it at construction
        base.model.has_sliding_layers = "sliding_attention" in family_config.layer_types
    return model


def save_model(
    model: LinearizeForCausalLM, tokenizer, out: Path, force: bool = False, texts: dict[str, str] | None = None
) -> Path:
    """Write the model folder atomically: built in a temporary sibling folder, moved into place when complete (see
    `linearize.outputs`). `texts`: more files of the folder (name -> text), such as a fine-tuning run's recipe."""
    out = Path(out)
    check_output_folder(out, force)
    with atomic_folder(out, force) as staging:
        model.save_pretrained(staging)  # with the remote-code stubs (`LinearizeConfig.save_pretrained`)
        if tokenizer is not None:
            tokenizer.save_pretrained(staging)
        for name, text in (texts or {}).items():
            (staging / name).write_text(text)
    return out


@dataclass
class Conversion:
    """What `convert_and_save` did."""

    plan: ConversionPlan
    output: Path | None = None  # None: planned only
    tokenizer_saved: bool = False
    comparison: list[dict] = field(default_factory=list)  # with verify: one row per model, see `evaluation.compare`
    url: str | None = None  # with push_to_hub: the pushed repo


class ConvertReport:
    """What `convert_and_save` tells its caller as it runs. Every method here does nothing: pass a subclass, or any
    object with these methods, to show them."""

    def step(self, text: str) -> None:
        """A step begins: reading the config, loading, converting and saving, comparing."""

    def scoring(self, total: int) -> Callable[[], None]:
        """Layer scoring for 'auto:K' begins; the returned callback is called `total` times as it advances."""
        return lambda: None

    def planned(self, plan: ConversionPlan) -> None:
        """The plan is made: from the config alone, or with 'auto:K' once the layers are scored."""

    def saved(self, conversion: Conversion) -> None:
        """The output folder is complete; the comparison and the push, when asked for, follow."""

    def compared(self, rows: list[dict]) -> None:
        """The source and the converted model side by side (`verify`)."""

    def pushing(self, text: str) -> None:
        """A step of the push begins (`publish.push`'s `on_step`)."""


def convert_and_save(
    model: str | None,
    output: Path | str | None,
    method: str = "liger",
    *,
    softmax_layers: str | None = None,
    convert_layers: str | None = None,
    layer_scorer: str | None = None,
    calibration: str | None = None,
    calibration_windows: int | None = None,
    spread_layers: bool | int = False,
    dtype: str = "auto",
    device: str = "auto",
    force: bool = False,
    tokenizer: str | None = None,
    verify: bool = False,
    push_to_hub: str | None = None,
    private: bool = False,
    report: ConvertReport | None = None,
    **options: int | float | None,
) -> Conversion:
    """Convert `model` and save it as a folder that loads with `AutoModelForCausalLM`: `linearize convert`.

    Args:
        model: a Hub id, a local folder, or None for the embedded SmolLM2-135M-Instruct.
        output: the folder to write (it appears only once complete); None makes the plan alone, as `--dry-run`
            does: no weights are read and nothing is checked or written.
        method: a name in `methods.METHODS`; `options` are its parameters (window, sinks, ...; see
            `method_settings`).
        softmax_layers: the layers kept as softmax attention (see `parse_softmax_layers`); 'auto:K' scores every
            layer on calibration text first and keeps the K worst (`linearize.selection`), which loads the weights
            even when `output` is None.
        convert_layers: "global" or "all": whether the source's sliding-window layers are converted too (None:
            the family's default, "global" for Gemma 2/3; see `unconverted_sliding_layers`).
        layer_scorer, calibration, calibration_windows: with 'auto:K' only, the scorer (a key of
            `selection.SCORERS`), the text source scored on (as `linearize eval --text` takes it; default the
            built-in corpus's training split) and how many 512-token windows of it (None: the defaults).
        spread_layers: with 'auto:K' only, keep the highest-scoring layer of each of K equal stretches of the depth
            instead of the K highest-scoring layers; a number S (1 to K): of each of S stretches, then the K - S
            highest-scoring others.
        dtype: of the saved weights: "auto" (the source's), "float32", "bfloat16" or "float16".
        device: where to load and compare: "auto", "cpu", "cuda", "cuda:1", ...
        force: replace an existing output.
        tokenizer: a folder or Hub id to take the tokenizer from instead of `model`.
        verify: after saving, compare perplexity and a greedy sample, source vs the folder as it loads back.
        push_to_hub: after saving, publish the folder to this repo (ORG/NAME) as `publish.push` does; the repo id
            and the token are checked before anything loads.
        private: create that repo private.
        report: told of each step as it happens (default: nothing is said).

    Returns:
        The plan and, with an output, what was written, compared and pushed.

    Raises:
        LinearizeError: a bad input, named before any weights load where the config alone shows it; after saving,
            a failed push says that the folder is saved.
        KeyboardInterrupt: on Ctrl-C; during the push, with a message that says the folder is saved and the push
            is not done.
    """
    report = report or ConvertReport()
    request = parse_auto(
        softmax_layers,
        layer_scorer or DEFAULT_SCORER,
        spread_layers,
        calibration=calibration,
        windows=calibration_windows,
    )
    if request is None and ((layer_scorer, calibration, calibration_windows) != (None, None, None) or spread_layers):
        raise LinearizeError(
            "--layer-scorer, --calibration, --calibration-windows, --spread-layers and --spread-over say how "
            "--softmax-layers auto:K chooses layers; add --softmax-layers auto:K or drop them"
        )
    if request is not None:
        check_calibration_source(request)
    if private and not push_to_hub:
        raise LinearizeError("--private makes the repo that --push-to-hub creates private; add --push-to-hub ORG/NAME")
    if output is not None:
        output = Path(output).expanduser()  # a quoted '~' reaches here as it is
        _check_targets(output, force, model, push_to_hub)
    elif push_to_hub:  # a plan alone still checks the name it would push to (not the credentials)
        check_repo_id(push_to_hub)
    report.step("Reading the source config")
    source = model or sources.EMBEDDED_NAME
    source_config = sources.load_config(model)
    plan = plan_conversion(source_config, source, method, softmax_layers, dtype, convert_layers, **options)
    if request is not None:
        request.check_method(method, plan.config.settings)
    else:
        report.planned(plan)
        if output is None:
            return Conversion(plan)
    device = sources.pick_device(device)
    report.step(f"Loading {source}")
    source_model, tokens = _load_source(
        model, dtype, device, tokenizer, verify, scoring=request is not None, pushing=bool(push_to_hub)
    )
    converted = None
    if request is not None:  # every layer converted: score them, then keep the worst as softmax
        report.step(f"Scoring {source_config.num_hidden_layers} layers ({request.scorer})")
        converted = convert_model(source_model, plan.config)
        selection = select_layers(converted, tokens, request, report.scoring)
        plan = plan_conversion(source_config, source, method, selection, dtype, convert_layers, **options)
        converted = keep_softmax_layers(converted, plan.config)
        report.planned(plan)
    conversion = Conversion(plan)
    if output is None:
        return conversion
    report.step("Converting and saving")
    if converted is None:
        converted = convert_model(source_model, plan.config)
    conversion.output = save_model(converted, tokens, output, force=force)
    conversion.tokenizer_saved = tokens is not None
    del converted  # it holds the source's tensors, which would outlive the comparison's cast or release of them
    try:
        report.saved(conversion)
        if verify:
            conversion.comparison = _compare_with_source(source_model, conversion.output, tokens, device, report)
    except KeyboardInterrupt:
        raise KeyboardInterrupt(f"interrupted after saving: {conversion.output} is complete") from None
    if push_to_hub:
        _release(source_model)  # the push's load check loads the folder in a fresh process, not beside the source
        conversion.url = _push(conversion.output, push_to_hub, private, report)
    return conversion


def _release(model) -> None:
    """Free `model`'s weights, leaving it on the meta device, and the GPU memory torch's allocator keeps cached
    after them, for the next model to load, in this process or another."""
    model.to("meta")
    torch.cuda.empty_cache()  # nothing where CUDA was not used


def _check_targets(output: Path, force: bool, model: str | None, push_to_hub: str | None) -> None:
    """Refuse a bad output folder or push target before minutes of loading, not after."""
    check_output_folder(output, force, source=model)
    if push_to_hub:
        check_repo_id(push_to_hub)
        check_can_push()


def _load_source(
    model: str | None, dtype: str, device: str, tokenizer: str | None, verify: bool, scoring: bool, pushing: bool
):
    # A source without a tokenizer still converts (the caller is told); a comparison, layer scoring or a push (whose
    # model card loads one) needs one.
    tokenizer_fix = None
    if scoring:
        tokenizer_fix = f"{PASS_TOKENIZER}: --softmax-layers auto:K scores layers on text"
    elif verify:
        tokenizer_fix = f"{PASS_TOKENIZER}, or drop --verify"
    elif pushing:
        tokenizer_fix = f"{PASS_TOKENIZER}: a pushed model needs one"
    return sources.load(model, dtype=dtype, device=device, tokenizer=tokenizer, tokenizer_fix=tokenizer_fix)


def _compare_with_source(source_model, output: Path, tokenizer, device: str, report: ConvertReport) -> list[dict]:
    """Perplexity on the built-in text and a greedy sample, of the source and then of the saved folder as it loads,
    both in the dtype that `load_for_inference` gives the folder on `device` (float32 on a CPU, the saved dtype
    elsewhere). One model is in memory at a time: the source's weights are released (to the meta device) once it is
    measured, before the folder loads, so that verifying needs the memory of one model, not of two."""
    from .evaluation import compare

    report.step("Measuring perplexity and sampling")
    original = source_model.float() if device == "cpu" else source_model
    rows = compare({"original": original}, tokenizer, prompt=VERIFY_PROMPT)
    _release(source_model)
    converted, _ = load_for_inference(str(output), device=device)
    rows += compare({"converted": converted}, tokenizer, prompt=VERIFY_PROMPT)
    report.compared(rows)
    return rows


def _push(output: Path, repo_id: str, private: bool, report: ConvertReport) -> str:
    from .publish import push, push_command

    again = push_command(output, repo_id, private)
    saved = f"The converted folder {output} is saved: push it with `{again}`."
    try:
        return push(output, repo_id, private=private, on_step=report.pushing, retry=f"push it with `{again}`")
    except LinearizeError as error:
        raise LinearizeError(str(error) if again in str(error) else f"{str(error).rstrip('.')}. {saved}") from None
    except KeyboardInterrupt:
        # Its message tells the caller what is done and what is not (the CLI prints it).
        raise KeyboardInterrupt(
            f"interrupted before the Hub confirmed the commit: the push is not done. {saved}"
        ) from None
