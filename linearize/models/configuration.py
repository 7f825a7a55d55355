"""`LinearizeConfig`: the source model's config, flat, plus which layers were converted and how.

The source config's fields stay at the top level (so `config.hidden_size`, `config.vocab_size` and
`config.tie_word_embeddings` mean what they meant), `base_model_type` names the family, `layer_types`
follows transformers' convention (one entry per layer, e.g. "hybrid_sliding" for Liger, "full_attention" for a
layer kept as softmax attention) and `linearize` holds the method and its parameters.
"""

from __future__ import annotations

import logging
import os
from contextlib import contextmanager
from typing import Any

from transformers import AutoConfig, PreTrainedConfig

from ..errors import LinearizeError
from ..methods import MethodSettings, get_method
from .remote_code import AUTO_MAP, write_remote_code

# Fields that belong to LinearizeConfig itself, never to the family config (nor taken from the source's).
OWN_FIELDS = (
    "model_type",
    "base_model_type",
    "source_model",
    "source_weights",
    "source_license",
    "linearize",
    "layer_types",
    "source_layer_types",
    "architectures",
    "auto_map",
    "transformers_version",
)
SOFTMAX_TYPES = ("full_attention", "sliding_attention")  # what a layer kept as softmax attention may be


class LinearizeConfig(PreTrainedConfig):
    r"""
    Configuration of a model converted by `linearize`.

    Args:
        base_model_type (`str`): `model_type` of the source model (a key of `linearize.families.FAMILIES`).
        layer_types (`list[str]`): one transformers layer type per layer. Converted layers carry the type of their
            method (see `linearize.methods`); kept layers keep the source's "full_attention"/"sliding_attention".
        source_layer_types (`list[str]`, *optional*): the source's type of every layer, which the family's own code
            reads for converted layers too (Gemma 3 gives sliding and global layers different rotary tables); None
            in folders converted before it was recorded, where every converted layer reads as "full_attention".
        linearize (`dict`): the method, its parameters and the layers kept as softmax attention, e.g.
            `{"method": "liger", "window": 64, "softmax_layers": [0, 8], ...}`.
        source_model (`str`, *optional*): the Hub id the model was converted from (model cards use it as
            `base_model`); None when it was converted from a local folder or by an older linearize.
        source_weights (`str`, *optional*): where the weights came from: "hub", "local" (a folder) or "embedded"
            (linearize's offline default, the Q4_1 GGUF of `source_model` dequantised: other weights than the
            Hub's); None in folders converted before it was recorded.
        source_license (`dict`, *optional*): the source's licence as its model card gives it (`license`, and
            `license_name` / `license_link` with `license: other`), which model cards copy; None where none was
            found or in folders converted before it was recorded.
        **kwargs: every field of the source model's config.
    """

    model_type = "linearize"

    base_model_type: str = "llama"
    source_model: str | None = None
    source_weights: str | None = None
    source_license: dict[str, str] | None = None
    layer_types: list[str] | None = None
    source_layer_types: list[str] | None = None
    linearize: dict[str, Any] | None = None
    use_cache: bool = True  # every source family's default

    @property
    def _rope_type_labels(self) -> list[str]:
        """The keys of `rope_parameters` nested per layer type (Gemma 3's): the source's types, which transformers
        reads from `layer_types` unless this names them. Ours are the methods' types, so transformers took the nested
        dict for one global one: it warned of unrecognized keys and added a "rope_type" beside the per-type dicts."""
        return [t for t in SOFTMAX_TYPES if t in (getattr(self, "rope_parameters", None) or {})]

    def __post_init__(self, **kwargs):
        # transformers drops `use_cache` (a generation parameter too) from the fields of a config that does not
        # declare it as a dataclass field, as the families' configs do: `config.use_cache` raised AttributeError,
        # and a value set on the model's config (as Trainer does) was saved but never loaded
        use_cache = kwargs.pop("use_cache", None)
        super().__post_init__(**kwargs)
        if use_cache is not None:
            self.use_cache = use_cache

    def save_pretrained(self, save_directory: str | os.PathLike, push_to_hub: bool = False, **kwargs) -> None:
        """Save as transformers does, with the remote-code stubs beside config.json and `auto_map` pointing at them
        (`linearize.models.remote_code`): however the folder is saved (`save_pretrained`, a Trainer checkpoint,
        `push_to_hub`), it loads with `trust_remote_code=True` where linearize is installed. (A config pushed on
        its own, `config.save_pretrained(push_to_hub=True)`, uploads the files it changes and the stubs are not among
        them; a model's push, which saves its config, has them.)"""
        if not os.path.isfile(save_directory):  # a file is transformers' error to report
            os.makedirs(save_directory, exist_ok=True)
            write_remote_code(save_directory)
        self.auto_map = dict(AUTO_MAP)
        super().save_pretrained(save_directory, push_to_hub=push_to_hub, **kwargs)

    @classmethod
    def register_for_auto_class(cls, auto_class: str = "AutoConfig") -> None:
        """Nothing to register. Loading with remote code calls this so that saving copies the class's source file
        next to the weights, which for a class of an installed package fails (its relative imports are not
        files); `save_pretrained` writes the stubs that import the package instead."""

    def check(self) -> None:
        """Refuse a config that no conversion writes, naming the field and the fix: a converted folder's config.json
        edited by hand failed deep inside the model (a TypeError, an IndexError, a negative tensor size), or loaded
        a model other than the one its layer types describe (a layer listed as kept but typed as converted). What the
        model is built from is checked: the `linearize` block, the method's settings and every layer's type."""
        fix = (
            "the config of a converted model (its folder's config.json) was edited or damaged: undo the edit, or "
            "re-run the conversion (or fine-tuning) that made it"
        )

        def refuse(problem: str) -> None:
            raise LinearizeError(f"{problem}; {fix}")

        block, layers = self.linearize, self.num_hidden_layers
        if not isinstance(block, dict):
            refuse("the config has no linearize block (the method, its settings and the layers kept as softmax)")
        if "method" not in block:
            refuse("the config's linearize block names no method")
        try:
            method = get_method(block["method"])
            self.settings  # noqa: B018 (read to check every value)
        except LinearizeError as error:
            refuse(str(error))
        for name in ("layer_types", "source_layer_types"):
            types = getattr(self, name)
            if (types is not None or name == "layer_types") and len(types or ()) != layers:
                refuse(f"the config lists {len(types or ())} {name} for its {layers} layers")
        kept = block.get("softmax_layers")
        if not isinstance(kept, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in kept):
            refuse(f"linearize.softmax_layers must list the layers kept as softmax attention, got {kept!r}")
        if not all(0 <= i < layers for i in kept):
            refuse(f"linearize.softmax_layers {kept} names layers outside 0-{layers - 1}")
        for i, layer_type in enumerate(self.layer_types):
            if self.is_converted(i):
                expected, role = method.layer_type, f"a layer converted by {method.name} is"
            elif self.source_layer_types is not None:
                expected, role = self.source_layer_types[i], "a layer kept as softmax attention has its source's type"
            else:  # folders converted before source_layer_types was recorded: a kept layer is one of the two
                expected = layer_type if layer_type in SOFTMAX_TYPES else SOFTMAX_TYPES[0]
                role = "a layer kept as softmax attention is one of " + " or ".join(map(repr, SOFTMAX_TYPES)) + ", as"
            if layer_type != expected:
                refuse(
                    f"layer_types disagree with linearize.softmax_layers: layer {i} is {layer_type!r}, and "
                    f"{role} {expected!r}"
                )

    @property
    def method(self) -> str:
        return self.linearize["method"]

    @property
    def settings(self) -> MethodSettings:
        """The method's typed settings, read from the `linearize` block."""
        return get_method(self.method).settings.from_saved(self.linearize, self.method)

    @property
    def source_types(self) -> list[str]:
        """`source_layer_types`, or every layer "full_attention" in folders converted before it was recorded."""
        return self.source_layer_types or ["full_attention"] * self.num_hidden_layers

    def source_window(self, layer_idx: int) -> int | None:
        """The window of the source's layer `layer_idx`: Gemma's local layers, every layer of Mistral 7B v0.1 and
        Phi-3-mini-4k; None for a layer that sees every earlier token."""
        return self.sliding_window if self.source_types[layer_idx] == "sliding_attention" else None

    def layer_settings(self, layer_idx: int) -> MethodSettings:
        """The settings converted layer `layer_idx` runs with, given its source layer's window (the method's
        `layer_settings`): what the layer, its cache and the plan's cache bytes read."""
        layer_class = get_method(self.method).layer_class
        return layer_class.layer_settings(self.settings, self.source_window(layer_idx))

    def is_converted(self, layer_idx: int) -> bool:
        return layer_idx not in self.linearize["softmax_layers"]

    def converted_layers(self) -> list[int]:
        return [i for i in range(self.num_hidden_layers) if self.is_converted(i)]

    def family_config(self) -> PreTrainedConfig:
        """The source family's own config (e.g. a LlamaConfig), used to build the unchanged parts of the model."""
        fields = {k: v for k, v in self.to_dict().items() if k not in OWN_FIELDS}
        if labels := self._rope_type_labels:  # transformers 5.17 still adds that key when it validates (on save)
            fields["rope_parameters"] = {label: fields["rope_parameters"][label] for label in labels}
        fields["layer_types"] = [
            self.source_types[i] if self.is_converted(i) else t for i, t in enumerate(self.layer_types)
        ]
        with _without_layer_types_advice(self.base_model_type):
            config = AutoConfig.for_model(self.base_model_type, **fields)
        config._attn_implementation = self._attn_implementation
        if getattr(config, "attn_logit_softcapping", None) and config._attn_implementation == "sdpa":
            config._attn_implementation = "eager"  # SDPA cannot cap logits: Gemma 2's kept layers would not be exact
        return config


@contextmanager
def _without_layer_types_advice(model_type: str):
    """Mistral's config warns that a config with `layer_types` should be a Ministral one; a converted model's family
    config always carries them (the kept softmax layers' masks are keyed by them), so the advice is not for our
    users, who saw it at every conversion and load of a Mistral model. Only that message is held back."""
    logger = logging.getLogger(f"transformers.models.{model_type}.configuration_{model_type}")

    class Advice(logging.Filter):
        def filter(self, record: logging.LogRecord) -> bool:
            return "with layer_types" not in record.getMessage()

    advice = Advice()
    logger.addFilter(advice)
    try:
        yield
    finally:
        logger.removeFilter(advice)
