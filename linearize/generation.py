"""Loading a model folder for inference and generating text from a prompt."""

from __future__ import annotations

import contextlib
import random
from collections.abc import Iterator

import numpy as np
import torch
from transformers import TextStreamer

from . import sources
from .errors import LinearizeError


class PromptError(LinearizeError, ValueError):
    """A prompt that cannot be built as asked; a ValueError as it was before."""


def load_for_inference(model: str | None, device: str = "auto", dtype: str = "auto", needs_tokenizer: bool = True):
    """Load a converted (or any causal LM) folder or hub id. On CPU, "auto" means float32: bf16 matmuls are slow
    there. Returns (model, tokenizer); without `needs_tokenizer` the weights alone, and None for the tokenizer (a
    caller that read it before, or needs none)."""
    device = sources.pick_device(device)
    if dtype == "auto":
        dtype = "float32" if device == "cpu" else "auto"
    if not needs_tokenizer:
        return sources.load_model(model, dtype, device), None
    return sources.load(model, dtype=dtype, device=device)


def chat_used(tokenizer, chat: bool | None = None) -> bool:
    """Whether `build_prompt` wraps a prompt in the chat template: by default when the tokenizer has one."""
    return tokenizer.chat_template is not None if chat is None else chat


def build_prompt(tokenizer, prompt: str, chat: bool | None = None) -> torch.Tensor:
    """Token ids for `prompt`, through the chat template when the tokenizer has one (or `chat=True`)."""
    if chat_used(tokenizer, chat):
        if tokenizer.chat_template is None:
            raise PromptError("this tokenizer has no chat template; drop --chat")
        ids = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], add_generation_prompt=True, return_tensors="pt", return_dict=True
        )["input_ids"]
    else:
        ids = tokenizer(prompt, return_tensors="pt").input_ids
    if ids.shape[1] == 0:  # the tokenizer adds no BOS: there is nothing to continue
        chat_hint = (
            " or drop --no-chat to wrap it in the chat template" if chat is False and tokenizer.chat_template else ""
        )
        raise LinearizeError(
            f"the prompt {prompt!r} gives no token for the model to continue: give it some text{chat_hint}"
        )
    return ids


@contextlib.contextmanager
def _seeded(seed: int | None, device: torch.device) -> Iterator[None]:
    """Run the block seeded as after `torch.manual_seed(seed)`, then put torch's generators back as they were (the
    CPU's and those of `device`'s kind); `seed` None: as it is."""
    if seed is None:
        yield
        return
    on_cpu = device.type == "cpu"
    devices = [] if on_cpu else list(range(torch.accelerator.device_count()))
    with torch.random.fork_rng(devices=devices, device_type="cuda" if on_cpu else device.type):
        if on_cpu:  # the CPU's generator alone: a GPU's, which this fork does not keep, is not reseeded either
            torch.random.default_generator.manual_seed(seed)
        else:
            torch.manual_seed(seed)
        yield


@contextlib.contextmanager
def callers_rng_kept() -> Iterator[None]:
    """Put back, when the block ends however it ends, the random states that the block seeds (torch's, the GPUs'
    where CUDA is already initialised, Python's and NumPy's): `finetune` or an lm-eval run called from a script must
    not reseed the script."""
    python, numpy_state = random.getstate(), np.random.get_state()
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_initialized() else []
    try:
        with torch.random.fork_rng(devices=devices):
            yield
    finally:
        random.setstate(python)
        np.random.set_state(numpy_state)


class ReplyStreamer(TextStreamer):
    """transformers' TextStreamer that also keeps the reply's token ids (`ids`), the special tokens it skips too."""

    def __init__(self, tokenizer, **kwargs):
        super().__init__(tokenizer, **kwargs)
        self.ids: list[int] = []

    def put(self, value: torch.Tensor) -> None:
        if not (self.skip_prompt and self.next_tokens_are_prompt):
            self.ids.extend(value.flatten().tolist())
        super().put(value)


@torch.inference_mode()
def generate(
    model,
    tokenizer,
    prompt: str,
    max_new_tokens: int = 64,
    chat: bool | None = None,
    temperature: float = 0.0,
    streamer=None,
    seed: int | None = None,
) -> str:
    """Generate a continuation of `prompt` (greedy when temperature is 0) and return the new text. `seed` samples as
    `torch.manual_seed(seed)` before `model.generate` would, so that a sampled reply can be repeated; the caller's
    random state is left as it was."""
    if temperature < 0:
        raise LinearizeError(f"the temperature must be 0 (greedy) or more, got {temperature:g}")
    input_ids = build_prompt(tokenizer, prompt, chat).to(model.device)
    sampling = {"do_sample": True, "temperature": temperature} if temperature > 0 else {"do_sample": False}
    with _seeded(seed, model.device):
        output = model.generate(
            input_ids,
            attention_mask=torch.ones_like(input_ids),
            max_new_tokens=max_new_tokens,
            pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id,
            streamer=streamer,
            **sampling,
        )
    return tokenizer.decode(output[0, input_ids.shape[1] :], skip_special_tokens=True)
