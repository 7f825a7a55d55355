"""`LinearizeForCausalLM`: the source family's model with some attention layers converted.

The decoder stack is the family's own `*Model` (embeddings, norms, MLPs, rotary tables and the decoder loop
stay transformers' code); only `self_attn` of converted layers is replaced. State-dict keys are the
source's, so converting is loading the source weights into this class.
"""

from __future__ import annotations

import inspect

import torch
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast
from transformers.utils.generic import can_return_tuple

# module, not names: when linearize.compat is what first imports transformers, this module is imported (to
# register the classes, see linearize.registration) before compat has defined them
from .. import compat
from ..families import get_family
from ..layers.base import packed_document_ids
from ..methods import get_method
from .cache import LinearizeCache
from .configuration import LinearizeConfig


class LinearizePreTrainedModel(PreTrainedModel):
    config_class = LinearizeConfig
    config: LinearizeConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_flex_attn = True
    _supports_attention_backend = True

    @classmethod
    def register_for_auto_class(cls, auto_class: str = "AutoModel") -> None:
        """Nothing to register: as `LinearizeConfig.register_for_auto_class`, whose `save_pretrained` writes the
        remote-code stubs every saved folder gets."""

    @torch.no_grad()
    def initialize_weights(self) -> None:
        """transformers' initialisation (of what a checkpoint lacks, or of everything in `from_config`), then the
        modules of linearize's layers that own parameters transformers does not know (STILL's NP-Maps) run their
        `reset_parameters`, written with transformers' initialisation functions, which leave loaded tensors alone.
        (`_init_weights` would not do: the decoder is the family's own model, whose `_init_weights` transformers
        applies to every module inside it.) Without it, maps missing from a folder were uninitialised memory."""
        super().initialize_weights()
        layers = f"{__package__.rpartition('.')[0]}.layers."
        for module in self.modules():
            if type(module).__module__.startswith(layers) and hasattr(module, "reset_parameters"):
                module.reset_parameters()


class LinearizeForCausalLM(LinearizePreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}
    # Converted layers keep a recurrent state that cannot be rolled back (no assisted decoding).
    _is_stateful = True

    def __init__(self, config: LinearizeConfig):
        config.check()  # a hand-edited config.json is named here, before it fails inside the layers
        super().__init__(config)
        family = get_family(config.base_model_type)
        layer_class = get_method(config.method).layer_class
        self.model = family.base_model_class(config.family_config())
        for layer_idx, decoder_layer in enumerate(self.model.layers):
            if config.is_converted(layer_idx):
                decoder_layer.self_attn = layer_class(config, layer_idx, family)
        self.model.register_forward_pre_hook(DecoderInputs(config, self.model), with_kwargs=True)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def family_logits(self, logits: torch.Tensor) -> torch.Tensor:
        """What the family's own head does after `lm_head`: Granite divides by `logits_scaling`, Gemma 2/3 cap the
        logits at `final_logit_softcapping`."""
        scaling = getattr(self.config, "logits_scaling", None)
        if scaling is not None:
            logits = logits / scaling
        cap = getattr(self.config, "final_logit_softcapping", None)
        if cap is not None:
            logits = cap * torch.tanh(logits / cap)
        return logits

    def generate(self, *args, **kwargs):
        """transformers' `generate`, refusing assisted (speculative) decoding by name, with this model as the target
        or as the draft: it rolls the cache back over rejected tokens, which `LinearizeCache` cannot do
        (transformers 5 says only "requires a cache", or fails at the draft's first rejected token)."""
        config = kwargs.get("generation_config") or self.generation_config
        if getattr(config, "is_assistant", False):  # set by transformers on what it hands its assistant_model
            raise ValueError(
                "a model converted by linearize cannot draft for assisted decoding (here it is another model's "
                "assistant_model): the target rolls the draft's cache back over the tokens it rejects, which a "
                "converted model's cache cannot do (a linear state is not rolled back); generate without it"
            )
        assisted = [
            name
            for name in ("assistant_model", "prompt_lookup_num_tokens", "assistant_early_exit")
            if kwargs.get(name) is not None or getattr(config, name, None) is not None
        ]
        if assisted:
            raise ValueError(
                f"{', '.join(assisted)}: assisted decoding rolls the cache back over rejected tokens, which a "
                "converted model's cache cannot do (a linear state is not rolled back); generate without it"
            )
        return super().generate(*args, **kwargs)

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        return False  # transformers' caches (DynamicCache, `cache_implementation`) cannot hold a converted layer's

    def _prepare_cache_for_generation(self, generation_config, model_kwargs, *args, **kwargs) -> None:
        """`generate` makes the cache it would make for transformers' models, a LinearizeCache: chunked prefill
        (`prefill_chunk_size`) needs one before the first forward, where `DecoderInputs` would make it.

        A `cache_implementation` other than "dynamic" (what a LinearizeCache is) is refused: transformers would
        ignore it behind a warning that this model supports no `Cache`, and generate with what was not asked for."""
        implementation = generation_config.cache_implementation
        if implementation not in (None, "dynamic"):
            raise ValueError(
                f"cache_implementation={implementation!r}: a model converted by linearize generates with its own "
                "cache, a LinearizeCache (a constant-size state in converted layers), which transformers' "
                f"{implementation} cache cannot stand in for; generate without cache_implementation"
            )
        generation_config.cache_implementation = None  # this call's copy: "dynamic" is the LinearizeCache below
        super()._prepare_cache_for_generation(generation_config, model_kwargs, *args, **kwargs)
        if generation_config.use_cache is not False and model_kwargs.get(compat.CACHE_ARG) is None:
            model_kwargs[compat.CACHE_ARG] = LinearizeCache(self.config)

    def prepare_inputs_for_generation(self, input_ids, next_sequence_length=None, inputs_embeds=None, **kwargs):
        """transformers' inputs for one forward of `generate`, reading the whole sequence again, into the emptied
        cache, at the step whose positions pass a point where the rotary tables change: longrope's (Phi-3.5,
        Phi-4-mini) switch from the short factors to the long ones for every position, and the cached tokens were
        read with the short ones, so that every step after it would differ from a full forward (and a zero Parallax
        probe from the source, whose `Phi3ForCausalLM` reads the sequence again there too). docs/methods.md §0.2."""
        cache, mask = kwargs.get(compat.CACHE_ARG), kwargs.get("attention_mask")
        if cache is not None and passes_rotary_switch(self.model.config, input_ids, cache, mask):
            cache.reset()
            next_sequence_length = None  # the whole sequence
        # `inputs_embeds` named: generate refuses a prompt given as embeddings to a model whose signature lacks it
        return super().prepare_inputs_for_generation(
            input_ids, next_sequence_length=next_sequence_length, inputs_embeds=inputs_embeds, **kwargs
        )

    def init_continuous_batching(self, *args, **kwargs):
        """Refused: continuous batching (`generate_batch`, `cache_implementation="paged"`) keeps every layer's keys
        and values in transformers' paged cache, which has no place for a converted layer's state (it failed with
        "Invalid layer type")."""
        raise ValueError(
            "continuous batching (generate_batch, init_continuous_batching, cache_implementation='paged') keeps "
            "keys and values in transformers' paged cache, which cannot hold a converted layer's state; a model "
            "converted by linearize generates with a LinearizeCache: call generate on a left-padded batch"
        )

    @can_return_tuple  # return_dict=False (the argument or the config's) gives a tuple, as transformers' models
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: LinearizeCache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        past_key_values: LinearizeCache | None = None,
        **kwargs,
    ):
        outputs = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            return_dict=True,  # whatever the config says: `can_return_tuple` makes the tuple, of this model's outputs
            **{compat.CACHE_ARG: cache if cache is not None else past_key_values},
            **kwargs,
        )
        hidden_states = outputs.last_hidden_state
        if isinstance(logits_to_keep, int) and logits_to_keep:
            hidden_states = hidden_states[:, -logits_to_keep:]
        elif isinstance(logits_to_keep, torch.Tensor):
            hidden_states = hidden_states[:, logits_to_keep]
        logits = self.family_logits(self.lm_head(hidden_states))

        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs)
        return CausalLMOutputWithPast(
            loss=loss,
            logits=logits,
            hidden_states=outputs.hidden_states,  # with output_hidden_states=True
            attentions=outputs.attentions,  # with output_attentions=True: softmax layers only, as linear ones have none
            **{compat.OUTPUT_CACHE_FIELD: getattr(outputs, compat.OUTPUT_CACHE_FIELD)},
        )


def rotary_switches(config) -> list[int]:
    """The sequence lengths past which the family's rotary tables change for every position: longrope's
    `original_max_position_embeddings` (one per layer type where `rope_parameters` are nested per type)."""
    rope = getattr(config, "rope_parameters", None) or {}
    tables = [value for value in rope.values() if isinstance(value, dict)] or [rope]
    return [table["original_max_position_embeddings"] for table in tables if table.get("rope_type") == "longrope"]


def passes_rotary_switch(config, input_ids: torch.Tensor, cache: LinearizeCache, attention_mask) -> bool:
    """Whether this step's positions pass a rotary switch (`rotary_switches`) that the cache's tokens were all read
    before, with `input_ids` the whole sequence to read again: as long as the 2-D mask, which `generate` always
    passes (not a chunk of a chunked prefill, the tokens generated after a prompt given as embeddings, or new tokens
    alone after a cache passed in). The tables switch on a forward's largest position, counted from the mask (left
    padding takes none)."""
    switches, length = rotary_switches(config), input_ids.shape[1]
    if not any(switch < length for switch in switches):
        return False
    if attention_mask is None or attention_mask.ndim != 2 or attention_mask.shape[1] != length:
        return False
    cached = cache.get_seq_length()
    if not cached:
        return False
    seen, reach = (int(attention_mask[:, :n].sum(-1).max()) for n in (cached, length))
    return any(seen <= switch < reach for switch in switches)


class NoHeadlessModel:
    """What `AutoModel` finds for a converted model, which has no headless class: a refusal that names the class that
    loads it and its decoder, where transformers would list every config it knows."""

    config_class = LinearizeConfig
    MESSAGE = (
        "a model converted by linearize has no AutoModel class: load it with AutoModelForCausalLM; its decoder, what "
        "AutoModel gives for other models, is model.get_decoder() (or pass output_hidden_states=True)"
    )

    @classmethod
    def from_pretrained(cls, *args, **kwargs):
        raise ValueError(cls.MESSAGE)

    @classmethod
    def _from_config(cls, config, **kwargs):  # what AutoModel.from_config calls
        raise ValueError(cls.MESSAGE)


class NoOtherHead(NoHeadlessModel):
    """What the Auto classes of the other heads that transformers gives the source families find (sequence and token
    classification, question answering: a reward model, a text-classification pipeline): a refusal by name."""

    MESSAGE = (
        "a model converted by linearize is a causal LM only, with no class for another head (sequence or token "
        "classification, question answering): load it with AutoModelForCausalLM and put your head on its hidden "
        "states (model.get_decoder(), or pass output_hidden_states=True)"
    )


class DecoderInputs:
    """Forward pre-hook of the decoder stack (`model.model`): what converted layers need from a call, whether it
    comes through `LinearizeForCausalLM` or straight to the decoder (`get_decoder()`: embeddings, value heads).

    - a `LinearizeCache` where transformers' decoder would create a `DynamicCache`, which converted layers cannot
      hold their state in;
    - the 2-D attention mask as `padding_mask`, which converted layers read (transformers turns the mask it passes
      on into the softmax layers' 4-D one), and positions that count real tokens only, so that a left-padded row
      gets the positions it has unpadded;
    - for packed rows (transformers' convention: positions that restart at each document, no mask, no cache) the
      `document_ids` that keep converted layers' documents apart, as the causal mask does for softmax layers, and
      no cache (there is no one sequence to continue).

    It is attached to the decoder the model builds: a decoder set in its place (`set_decoder`) has none."""

    def __init__(self, config: LinearizeConfig, decoder: nn.Module):
        self.config = config
        parameters = list(inspect.signature(type(decoder).forward).parameters.values())[1:]  # after self
        self.argument_names = [p.name for p in parameters if p.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD]

    def __call__(self, decoder: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        kwargs = {**dict(zip(self.argument_names, args, strict=False)), **kwargs}  # positional arguments by name
        given = [kwargs.pop(name, None) for name in ("cache", "past_key_values")]
        cache = given[0] if given[0] is not None else given[1]
        tokens = kwargs.get("input_ids")
        tokens = kwargs.get("inputs_embeds") if tokens is None else tokens
        attention_mask, position_ids = kwargs.get("attention_mask"), kwargs.get("position_ids")
        document_ids = None
        if position_ids is not None and attention_mask is None and cache is None:
            document_ids = packed_document_ids(position_ids.view(-1, position_ids.shape[-1]))
        use_cache = kwargs.get("use_cache")
        use_cache = getattr(self.config, "use_cache", True) if use_cache is None else use_cache
        # transformers' decoder reads these from its own config, here a copy made when the model was built: the
        # model's config, which users set, decides (as it does in transformers' models, whose decoder shares it)
        for flag, default in (("output_attentions", False), ("output_hidden_states", False), ("return_dict", True)):
            if kwargs.get(flag) is None:
                kwargs[flag] = getattr(self.config, flag, default)
        if document_ids is not None:  # rows of packed documents (Trainer's padding-free batches): nothing to continue
            kwargs["document_ids"], use_cache = document_ids.expand(tokens.shape[0], -1), False
        if cache is not None and not isinstance(cache, LinearizeCache):  # it would never be filled: say so
            raise TypeError(_foreign_cache_message(cache))
        if cache is not None and tokens is not None:
            check_cache_rows(cache, tokens.shape[0])
        if use_cache and cache is None:
            cache = LinearizeCache(self.config)
        # a cache that is given is read and extended whatever use_cache says, as transformers' models do
        kwargs[compat.CACHE_ARG], kwargs["use_cache"] = cache, use_cache or cache is not None
        if attention_mask is not None:
            if attention_mask.ndim != 2:
                raise ValueError(
                    "a model converted by linearize takes the 2-D attention mask [batch, tokens] (1 = real token)"
                )
            kwargs["padding_mask"] = attention_mask
            if position_ids is None:
                check_mask_covers_cache(attention_mask, cache, tokens.shape[1])
                kwargs["position_ids"] = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, -tokens.shape[1] :]
        return (), kwargs


def _foreign_cache_message(cache) -> str:
    message = (
        f"a model converted by linearize needs a LinearizeCache, got a {type(cache).__name__}; pass "
        f"{compat.CACHE_ARG}=None with use_cache=True (the output's {compat.OUTPUT_CACHE_FIELD} is the cache to pass "
        "back) or a LinearizeCache(model.config)"
    )
    holds_tokens = getattr(cache, "get_seq_length", None)
    if callable(holds_tokens) and holds_tokens() > 0:  # what peft's prefix tuning passes with every batch
        message += (
            ". A cache that already holds keys and values is what peft's prefix tuning (and P-tuning v2) passes: "
            "converted layers keep no per-token keys and values to prepend them to, so fine-tune with LoRA or "
            "prompt tuning instead"
        )
    return message


def check_cache_rows(cache: LinearizeCache, rows: int) -> None:
    """Refuse a cache filled for other rows than the input's, naming the repeat that fits it: generate's
    `num_return_sequences` and `num_beams` repeat the input rows, not a cache passed in (the layers would fail on
    mismatched shapes)."""
    held = cache.batch_size()
    if held is None or held == rows:
        return
    times = rows // held if rows % held == 0 else "n"
    raise ValueError(
        f"the cache holds {held} row(s), the input {rows}: a cache continues the rows it was filled with; to "
        "continue each row n times (num_return_sequences, num_beams), repeat its rows first: "
        f"cache.batch_repeat_interleave({times})"
    )


def check_mask_covers_cache(attention_mask: torch.Tensor, cache: LinearizeCache | None, length: int) -> None:
    """Refuse a 2-D mask that leaves out cached tokens: the positions of the new `length` tokens are counted from it
    (transformers' convention: the mask covers the cached tokens and the new ones), and would restart at 0."""
    cached = cache.get_seq_length() if cache is not None else 0
    if cached and attention_mask.shape[1] < cached + length:
        raise ValueError(
            f"attention_mask covers {attention_mask.shape[1]} tokens: with a cache it covers the whole sequence so "
            f"far, here {cached} cached and {length} new, as generate passes it (the new tokens' positions are "
            "counted from it)"
        )
