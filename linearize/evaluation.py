"""Quality measurements shared by the CLI, the demo and the benchmarks: perplexity on a text source, passkey
retrieval (`linearize.passkey`), optionally lm-evaluation-harness tasks, and the side-by-side report of
`linearize eval`."""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import torch

from .comparison import counted
from .data import DataSource, TooFewTokens, pack_documents, read_documents, require_eos
from .errors import LinearizeError

HF_PREFIX = "hf:"


@torch.inference_mode()
def _position_losses(model, windows: torch.Tensor, step: Callable[[], None] | None = None) -> torch.Tensor:
    """Mean next-token loss at each position over windows [N, C], each scored from an empty state: [C - 1] float64,
    entry p the loss of predicting token p + 1. `step` is called after each window."""
    nll = torch.zeros(windows.shape[1] - 1, dtype=torch.float64)
    for row in windows.to(model.device):
        logits = model(input_ids=row[None], use_cache=False).logits[0, :-1].float()  # [C-1, V]
        nll += torch.nn.functional.cross_entropy(logits, row[1:], reduction="none").double().cpu()
        if step is not None:
            step()
    return nll / windows.shape[0]


def perplexity_of_windows(model, windows: torch.Tensor, step: Callable[[], None] | None = None) -> float:
    """Perplexity over token windows [N, C], each scored from an empty state (the first token of a window is not
    predicted). `step` is called after each window. A mean loss beyond what a float can exponentiate (above 709: a
    model whose logits blew up) gives inf, not an OverflowError after the whole measurement."""
    return _perplexity(_position_losses(model, windows, step))


def perplexity_by_position(model, windows: torch.Tensor, block: int) -> list[float]:
    """Perplexity of each stretch of `block` positions over windows [N, C] scored from an empty state, first
    stretch first: how quality holds up deeper into the context. A model that does not generalise past the length
    it was trained on gets worse stretch by stretch, where the original gets better.

    The first stretch has one target fewer (position 0 is not predicted); the stretches combined give
    `perplexity_of_windows`."""
    context = windows.shape[1]
    if block < 2 or context % block:
        raise ValueError(f"the window length {context} must be a multiple of the block {block} (at least 2)")
    nll = _position_losses(model, windows)
    # target token p is predicted at index p - 1, so stretch [s, s + block) of targets is nll[s - 1 : s + block - 1]
    return [_perplexity(nll[max(start - 1, 0) : start + block - 1]) for start in range(0, context, block)]


def _perplexity(nll: torch.Tensor) -> float:
    """exp of the mean of the losses [N] (float64), inf where that overflows."""
    return nll.mean().exp().item()


def compare(
    models: dict, tokenizer, prompt: str, context: int = 512, windows: int = 4, max_new_tokens: int = 32
) -> list[dict]:
    """Perplexity on the built-in text (as `linearize eval` reads it) and a greedy sample for each named model, side
    by side."""
    from .generation import generate

    ids = text_windows("builtin", tokenizer, context, windows)
    return [
        {
            "model": name,
            "perplexity": perplexity_of_windows(model, ids),
            "sample": generate(model, tokenizer, prompt, max_new_tokens=max_new_tokens),
        }
        for name, model in models.items()
    ]


def text_source(spec: str, default_split: str = "test", option: str = "--text") -> DataSource:
    """The data source that a `--text` value names.

    Args:
        spec: "builtin" (the built-in English corpus, offline), "hf:NAME[:CONFIG][:SPLIT]" (a Hugging Face
            dataset), or a local file or glob (.txt/.md/.jsonl/.json/.parquet).
        default_split: the split of the built-in corpus, and of a dataset named without one: "test" to measure,
            "train" to fit.
        option: where the user gave `spec`, for messages (`convert --calibration`, a recipe's key).

    Returns:
        A `linearize.data.DataSource` (text format: every token is scored).
    """
    if spec == "builtin":
        return DataSource(builtin="english", split=default_split, format="text")
    if spec.startswith(HF_PREFIX):
        parts = spec[len(HF_PREFIX) :].split(":")
        if not parts[0] or len(parts) > 3:
            raise LinearizeError(f"{option} {spec!r}: write hf:NAME, hf:NAME:CONFIG or hf:NAME:CONFIG:SPLIT")
        name, config, split = (parts + [None, None])[:3]
        return DataSource(dataset=name, subset=config or None, split=split or default_split, format="text")
    return DataSource(path=spec, format="text")


def text_windows(
    spec: str, tokenizer, context: int, max_windows: int, default_split: str = "test", option: str = "--text"
) -> torch.Tensor:
    """Up to `max_windows` windows [N, context] of token ids from the text source `spec` (see `text_source`; `option`
    names where it was given).

    Documents are read in order, joined with EOS (each opened with BOS, for tokenizers that put one before a text)
    and cut into windows, as fine-tuning packs them; unlike fine-tuning's held-out loss, perplexity then scores
    every token of a window, a document's first and its BOS included (as perplexity over a text stream does). A
    source whose records are instructions or chats is refused (use plain text for perplexity)."""
    if max_windows < 1 or context < 2:  # a window of one token predicts nothing: its perplexity would be nan
        raise LinearizeError(
            f"perplexity needs at least one window (got {max_windows}) of at least 2 tokens (a context of {context})"
        )
    source = text_source(spec, default_split, option)
    # read no more documents than the windows can use: first as many as documents of 16 tokens would fill
    source.max_documents = max(256, max_windows * context // 16)
    require_eos(tokenizer)
    while True:
        documents, _ = read_documents(source, tokenizer)
        complete = len(documents) < source.max_documents  # the source holds no more
        try:
            ids = pack_documents(documents, tokenizer, context, "text").input_ids
        except TooFewTokens as error:
            if complete:
                raise TooFewTokens(
                    f"the text {spec} has {error.tokens} tokens, fewer than one window of {context}: give a longer "
                    "text or a shorter context (--context)",
                    error.tokens,
                ) from None
        else:
            if complete or len(ids) >= max_windows:
                return ids[:max_windows]
        # shorter documents than assumed leave windows unfilled that the rest of the source would fill
        source.max_documents *= 2


@contextmanager
def eval_mode(model) -> Iterator[None]:
    """`model` in eval mode while the block runs (no dropout: a measurement draws no masks, and two agree), then
    each of its modules in the mode it had: a caller's training loop that evaluates between steps goes on training."""
    modes = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for module, training in modes:
            module.training = training


def evaluate_model(
    model,
    tokenizer,
    text: str = "builtin",
    context: int = 512,
    windows: int = 8,
    passkey_contexts: Sequence[int] = (),
    passkey_options: dict | None = None,
    lm_eval_tasks: Sequence[str] = (),
    lm_eval_options: dict | None = None,
    step: Callable[[], None] | None = None,
    text_ids: torch.Tensor | None = None,
) -> dict:
    """Everything `linearize eval` measures on one model, in eval mode (`eval_mode`: the model's modes are put back
    after).

    Args:
        model, tokenizer: the model to evaluate.
        text, context, windows: perplexity source (see `text_source`), window length and number of windows.
        passkey_contexts: prompt lengths for passkey retrieval (empty: skipped).
        passkey_options: more arguments of `passkey.passkey_retrieval` (depths, trials, seed, distractors).
        lm_eval_tasks: lm-evaluation-harness task names (empty: skipped).
        lm_eval_options: more arguments of `run_lm_eval` (include_path, limit, batch_size).
        step: called after each unit of work (a perplexity window, a passkey trial, the lm-eval run).
        text_ids: the windows of `text` as `text_windows` reads them with `tokenizer`, if already read (a caller
            that checks the text before loading the model); None: read here.

    Returns:
        {"perplexity": {"value", "text", "context", "windows"}, "passkey": {...}, "lm_eval": {task: {metric: v}}}.
    """
    from .passkey import passkey_retrieval

    ids = text_windows(text, tokenizer, context, windows) if text_ids is None else text_ids
    with eval_mode(model):
        result = {
            "perplexity": {
                "value": perplexity_of_windows(model, ids, step),
                "text": text,
                "context": context,
                "windows": ids.shape[0],
            }
        }
        if passkey_contexts:
            result["passkey"] = passkey_retrieval(
                model, tokenizer, list(passkey_contexts), **(passkey_options or {}), step=step
            )
        if lm_eval_tasks:
            result["lm_eval"] = run_lm_eval(model, tokenizer, list(lm_eval_tasks), **(lm_eval_options or {}))
            if step is not None:
                step()
    return result


def evaluate_models(models: dict, tokenizer, *args, **kwargs) -> dict[str, dict]:
    """`evaluate_model(model, tokenizer, *args, **kwargs)` for each labelled model in turn: label -> result."""
    return {label: evaluate_model(model, tokenizer, *args, **kwargs) for label, model in models.items()}


def eval_steps(windows: int, passkey_contexts: list[int], depths: int, trials: int, lm_eval: bool) -> int:
    """How many times `evaluate_model` calls `step` (at most: a short text gives fewer windows)."""
    return windows + len(passkey_contexts) * depths * trials + int(lm_eval)


def run_lm_eval(
    model, tokenizer, tasks: list[str], include_path: str | None = None, limit: int | None = None, batch_size: int = 1
) -> dict:
    """Run lm-evaluation-harness tasks on an already-loaded model through its Hugging Face model class (HFLM).

    Args:
        model, tokenizer: the model to evaluate (converted models work: they are ordinary causal LMs).
        tasks: task names (or groups) known to lm-eval, or defined by YAML files under `include_path`.
        include_path: a folder of extra task YAML files.
        limit: at most this many documents per task.
        batch_size: requests per forward.

    Returns:
        {task: {metric: value}} with lm-eval's metric names ("acc,none", ...); stderr entries are dropped.
    """
    manager = check_lm_eval_tasks(tasks, include_path)
    import lm_eval
    from lm_eval.models.huggingface import HFLM

    from .generation import callers_rng_kept

    # lm-eval seeds Python's, NumPy's and torch's generators for its run, and puts the model in eval mode
    with callers_rng_kept(), eval_mode(model), _lm_eval_notes_hidden():
        # a converted model's type is not in transformers' causal-LM registry: say what it is, or lm-eval warns
        lm = HFLM(
            pretrained=model, backend="causal", tokenizer=tokenizer, batch_size=batch_size, device=str(model.device)
        )
        output = lm_eval.simple_evaluate(model=lm, tasks=tasks, task_manager=manager, limit=limit)
    return {
        task: {k: v for k, v in metrics.items() if "_stderr" not in k and isinstance(v, int | float)}
        for task, metrics in output["results"].items()
    }


# what lm-eval's HFLM says of being handed a loaded model, which is how `run_lm_eval` runs every model: nothing a
# user can act on
_LM_EVAL_NOTES = (
    "`pretrained` model kwarg is not of type `str`",
    "Passed an already-initialized model through `pretrained`",
)


@contextmanager
def _lm_eval_notes_hidden() -> Iterator[None]:
    """lm-eval without `_LM_EVAL_NOTES`, and without the git commit it records of the folder it runs from (not
    lm-eval's, nor the model's), whose `git describe` printed 'fatal: not a git repository' outside one."""
    import lm_eval.evaluator

    logger = logging.getLogger("lm_eval.models.huggingface")

    def not_a_note(record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(_LM_EVAL_NOTES)

    git_hash = getattr(lm_eval.evaluator, "get_git_commit_hash", None)
    logger.addFilter(not_a_note)
    if git_hash is not None:
        lm_eval.evaluator.get_git_commit_hash = lambda: None
    try:
        yield
    finally:
        logger.removeFilter(not_a_note)
        if git_hash is not None:
            lm_eval.evaluator.get_git_commit_hash = git_hash


def same_vocabulary(tokenizers: Sequence) -> bool:
    """Whether the tokenizers share one vocabulary, so that they cut a text into the same tokens: perplexity is per
    token, and the perplexities of models with different tokenizers do not compare."""
    vocabularies = [tokenizer.get_vocab() for tokenizer in tokenizers]
    return all(vocabulary == vocabularies[0] for vocabulary in vocabularies[1:])


def eval_rows(results: dict[str, dict], same_tokens: bool = True) -> tuple[list[str], list[list[str]]]:
    """The side-by-side table of `linearize eval`: a header and rows of text, one column per model.

    Args:
        results: model label -> the dict `evaluate_model` returned, in column order (all run with the same options).
        same_tokens: whether the models share a tokenizer (`same_vocabulary`); if not, the perplexity row says that
            its numbers are per token of each model's own tokenizer and do not compare.
    """
    labels = list(results)
    first = results[labels[0]]
    ppl = first["perplexity"]
    own_tokens = "" if same_tokens else "; per token of each model's own tokenizer: not comparable"
    rows = [
        [f"perplexity ({ppl['text']}, {ppl['windows']} x {ppl['context']} tokens{own_tokens})"]
        + [f"{r['perplexity']['value']:.2f}" for r in results.values()]
    ]
    for context, scores in first.get("passkey", {}).get("contexts", {}).items():
        chance = 1 / (first["passkey"]["distractors"] + 1)
        for field, what in (("greedy", "greedy"), ("ranked", f"ranked vs {first['passkey']['distractors']}")):
            label = f"passkey @{context} tokens, {what} ({counted(scores['trials'], 'trial')})"
            if field == "ranked":
                label += f", chance {chance:.0%}"
            rows.append([label] + [f"{r['passkey']['contexts'][context][field]:.0%}" for r in results.values()])
    for task, metrics in first.get("lm_eval", {}).items():
        items = metrics.get("sample_len")  # not a metric (a metric's name is "metric,filter"): the items scored
        for metric in (name for name in metrics if "," in name):
            label = f"lm-eval {task} {metric}" + (f" ({counted(items, 'item')})" if items is not None else "")
            rows.append([label] + [f"{r['lm_eval'][task][metric]:.4g}" for r in results.values()])
    return ["metric", *labels], rows


def check_lm_eval_tasks(tasks: list[str], include_path: str | None = None):
    """lm-eval's task manager, once lm_eval is known to be installed, to know every task in `tasks`, and to read
    each task's data (a LinearizeError says what is missing otherwise). Call it before loading models to fail early:
    a dataset that cannot be downloaded or a local data file that does not exist is found before, not after."""
    try:
        import lm_eval  # noqa: F401
    except ImportError:
        raise LinearizeError("--lm-eval needs lm-evaluation-harness: pip install lm_eval") from None
    if include_path is not None and not Path(include_path).is_dir():
        raise LinearizeError(
            f"--lm-eval-include '{include_path}' is not a folder; give the folder that holds your task YAML files "
            "(recipes/lm-eval in a checkout of linearize holds the local ARC-Easy and HellaSwag tasks)"
        )
    from .generation import callers_rng_kept

    with callers_rng_kept():  # building a task draws from Python's generator
        manager = _task_manager(include_path, tuple(tasks))
        _check_task_data(manager, tuple(tasks))
    return manager


@functools.cache
def _task_manager(include_path: str | None, tasks: tuple[str, ...]):
    """lm-eval's task index, built once per process: indexing lm-eval's own tasks takes seconds to tens of seconds,
    so it is skipped when every task is defined under `include_path`."""
    from lm_eval.tasks import TaskManager

    if include_path is not None:
        local = TaskManager(include_path=include_path, include_defaults=False)
        if all(t in local.all_tasks for t in tasks):
            return local
    manager = TaskManager(include_path=include_path)
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        raise LinearizeError(
            f"lm-eval does not know the task(s) {', '.join(unknown)}; check the names "
            "(`lm_eval ls tasks`) or pass the folder of your task YAML files with --lm-eval-include"
        )
    return manager


@functools.cache
def _check_task_data(manager, tasks: tuple[str, ...]) -> None:
    """Build each task once, which reads its dataset (into the datasets cache, where the evaluation reads it again)."""
    # lm-eval 0.4.12 builds tasks with `load` and deprecates `load_task_or_group`, the only loader before it
    load = getattr(manager, "load", None) or manager.load_task_or_group
    for task in tasks:
        try:
            load([task])
        except ConnectionError as error:  # the datasets library's, offline or with the Hub unreachable
            raise LinearizeError(
                f"lm-eval task {task}: its dataset could not be downloaded ({error}). Run it once with network access "
                "so that the datasets cache holds it, or run the task from local files (README: zero-shot tasks "
                "from local JSONL files)"
            ) from None
        except FileNotFoundError as error:
            raise LinearizeError(
                f"lm-eval task {task}: {error}. A task YAML's `data_files` are read relative to the folder you run "
                "from: run from the folder they are relative to, or edit them to point at your files"
            ) from None
