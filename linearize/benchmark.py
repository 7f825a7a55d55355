"""Speed and memory of models measured in one run: prefill tokens/s, decode ms/token, peak memory and cache bytes
per context length (what `linearize bench` and `benchmarks/speed_vs_original.py` report).

Timing: for each context C every model prefills the same C random tokens `repeats` times, alternating between
the models, and its median run counts; each round of prefills is followed by a decode run of each model from its
prefill's cache, the same `decode_tokens` single-token steps (every run times the steps right after C tokens, not
after the runs before it), again alternating between the models, and the median of its runs' median steps counts. A run
is never interrupted by another model's steps (the original streams its whole KV cache every step, which would slow
the next model's first steps), and alternating the runs spreads each model's steps over the same stretch of time, so a
slow spell of a shared machine falls on every model alike. The fastest run and step are kept beside them (on a
shared machine the fastest is the steadier number; the median is what a user sees). On CUDA each timed call ends
with a synchronize.

Peak memory is measured in one more, untimed prefill at each context: the most memory that prefill's own tensors
(activations and the cache it builds; not the weights, nor the other model) held at once. On CUDA that is
`torch.cuda.max_memory_allocated` above what was allocated before; elsewhere a dispatch mode adds up the bytes of
the tensor storages each op creates and drops those no longer alive, the same count a caching allocator would
see. It does not see scratch memory that a single op allocates and frees inside itself, and it is exact and
repeatable, unlike the process's resident size, which depends on what the C allocator kept from earlier calls.
"""

from __future__ import annotations

import platform
import statistics
import time
from collections.abc import Callable
from contextlib import contextmanager, suppress
from pathlib import Path

import torch
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from .cache_layers import StateCacheLayer
from .compat import CACHE_ARG, OUTPUT_CACHE_FIELD
from .errors import LinearizeError


class BenchError(LinearizeError, ValueError):
    """Arguments that measure nothing (no model, no context, a count below 1); a ValueError as it was before."""


class BenchStopped(LinearizeError):
    """A context ran out of memory: `result` holds the contexts measured before it, as `run_bench` returns them
    (None if there were none)."""

    def __init__(self, message: str, result: dict | None):
        super().__init__(message)
        self.result = result


def cache_bytes(cache) -> int:
    """Bytes a cache holds: `nbytes()` of a converted layer, and the storage of a transformers layer's keys and
    values (each storage once). A sliding-window layer keeps the last window - 1 tokens of a prefill as a view of the
    whole prefill's keys and values, so right after the prefill it holds every prefilled token, not its window."""
    total, storages = 0, {}
    for layer in cache.layers:
        if isinstance(layer, StateCacheLayer):
            total += layer.nbytes()
            continue
        for tensor in (getattr(layer, "keys", None), getattr(layer, "values", None)):
            if isinstance(tensor, torch.Tensor):
                storages[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
    return total + sum(storages.values())


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class _Peak:
    bytes: int | None = None


class _LiveTensorBytes(TorchDispatchMode):
    """Tracks the bytes of the tensor storages created inside the mode that are still alive, and their peak."""

    def __init__(self):
        super().__init__()
        self.live: dict[int, tuple[StorageWeakRef, int]] = {}  # storage id -> (weak reference, bytes)
        self.current = self.peak = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for key, (ref, nbytes) in list(self.live.items()):
            if ref.expired():
                del self.live[key]
                self.current -= nbytes
        # views and in-place results reuse their input's storage: counted already, or older than the mode (a
        # weight), and then not the prefill's memory
        inputs = {t.untyped_storage()._cdata for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        for tensor in tree_leaves(out):
            if isinstance(tensor, torch.Tensor):
                ref = StorageWeakRef(tensor.untyped_storage())
                if ref.cdata not in self.live and ref.cdata not in inputs:
                    nbytes = tensor.untyped_storage().nbytes()
                    self.live[ref.cdata] = (ref, nbytes)
                    self.current += nbytes
        self.peak = max(self.peak, self.current)
        return out


@contextmanager
def peak_memory(device: torch.device):
    """Measure the peak memory of the tensors the enclosed code creates (see the module docstring); read `.bytes`
    afterwards."""
    peak = _Peak()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        yield peak
        peak.bytes = torch.cuda.max_memory_allocated(device) - base
    else:
        with _LiveTensorBytes() as tracker:
            yield peak
        peak.bytes = tracker.peak


def timed_forward(model, ids: torch.Tensor, cache=None, **kwargs):
    """(seconds, cache after the call) of one forward."""
    device = model.device
    ids = ids.to(device)
    _sync(device)
    start = time.perf_counter()
    out = model(input_ids=ids, use_cache=True, **{CACHE_ARG: cache}, **kwargs)
    _sync(device)
    return time.perf_counter() - start, getattr(out, OUTPUT_CACHE_FIELD)


@torch.inference_mode()
def measure(models: dict, context: int, decode_tokens: int, repeats: int = 3, seed: int = 0) -> dict:
    """Prefill `context` tokens, then decode `decode_tokens` steps from that prefill's cache, `repeats` times, for
    every model on the same tokens.

    Args:
        models: label -> model; all take the same token ids (the smallest vocabulary bounds them).
        context: prefill length.
        decode_tokens: single-token steps in each decode run.
        repeats: prefill runs and decode runs per model (the median counts).
        seed: chooses the random tokens.

    Returns:
        label -> {"prefill_tok_s" (median run), "prefill_fastest_tok_s", "prefill_runs_tok_s" (every run, in
        order), "decode_ms" (the median over runs of each run's median step), "decode_fastest_ms" (fastest step),
        "decode_runs_ms" (each run's median step, in order), "cache_bytes" (after the prefill), "peak_bytes" (the
        prefill's peak memory, from one more untimed prefill)}. The runs show how much the machine moved the
        numbers: runs that disagree by more than the difference between two models do not separate them.
    """
    if min(context, decode_tokens, repeats) < 1:
        raise BenchError(f"context, decode_tokens and repeats must be >= 1, got {context}, {decode_tokens}, {repeats}")
    vocab = min(model.config.vocab_size for model in models.values())
    low = min(100, vocab // 2)  # above the special tokens that low ids usually are
    ids = torch.randint(low, vocab, (1, context + decode_tokens), generator=torch.Generator().manual_seed(seed))
    prefill, caches, peaks = {name: [] for name in models}, {}, {}
    for name, model in models.items():
        with peak_memory(model.device) as peak:
            model(input_ids=ids[:, :context].to(model.device), use_cache=True, logits_to_keep=1)
        peaks[name] = peak.bytes
    held, runs = {}, {name: [] for name in models}  # cache bytes after the prefill; each decode run's steps (s)
    for _ in range(repeats):  # a round: each model's prefill in turn, then each one's decode run from its prefill
        for name, model in models.items():
            caches[name] = None  # free the previous run's cache before timing the next
            seconds, caches[name] = timed_forward(model, ids[:, :context], logits_to_keep=1)
            prefill[name].append(seconds)
            held[name] = cache_bytes(caches[name])
        for name, model in models.items():
            steps = []
            for t in range(context, context + decode_tokens):
                seconds, caches[name] = timed_forward(model, ids[:, t : t + 1], caches[name])
                steps.append(seconds)
            runs[name].append(steps)
    results = {
        name: {
            "prefill_tok_s": context / statistics.median(prefill[name]),
            "prefill_fastest_tok_s": context / min(prefill[name]),
            "prefill_runs_tok_s": [context / seconds for seconds in prefill[name]],
            "cache_bytes": held[name],
            "peak_bytes": peaks[name],
        }
        for name in models
    }
    for name, steps in runs.items():
        results[name]["decode_runs_ms"] = [1000 * statistics.median(run) for run in steps]
        results[name]["decode_ms"] = statistics.median(results[name]["decode_runs_ms"])
        results[name]["decode_fastest_ms"] = 1000 * min(min(run) for run in steps)
    return results


def run_bench(
    models: dict,
    contexts: list[int],
    decode_tokens: int = 32,
    repeats: int = 3,
    step: Callable[[], None] | None = None,
) -> dict:
    """`measure` at every context after a short warm-up (first calls pay for lazy initialisation).

    Args:
        models: label -> model, in column order (the first is the one being evaluated, the last its reference).
        contexts: prefill lengths.
        decode_tokens, repeats: as for `measure`.
        step: called after each context.

    Returns:
        {"models": labels, "decode_tokens", "repeats", "device", "hardware", "dtype", "threads",
        "rows": [{"context": C, label: {...}}]}.

    Raises:
        BenchStopped: a context ran out of memory (the original's KV cache at a long one, most often); it carries
            the contexts measured before it, which a long run should not lose.
    """
    if not models or not contexts:
        raise BenchError(f"run_bench needs at least one model and one context, got {len(models)} and {len(contexts)}")
    measure(models, min(64, min(contexts)), 2, repeats=1)
    first, rows, stopped = next(iter(models.values())), [], None
    for context in contexts:
        try:
            rows.append({"context": context, **measure(models, context, decode_tokens, repeats)})
        except torch.OutOfMemoryError:
            stopped = context  # raised below, once the failed call's tensors are freed with its exception
            break
        if step is not None:
            step()
    result = {
        "models": list(models),
        "decode_tokens": decode_tokens,
        "repeats": repeats,
        "device": str(first.device),
        "hardware": hardware_name(first.device),
        "dtype": str(first.dtype).removeprefix("torch."),
        "threads": torch.get_num_threads(),
        "rows": rows,
    }
    if stopped is not None:
        measured = f" (measured: {', '.join(str(row['context']) for row in rows)})" if rows else ""
        # bfloat16 halves a float32 model's memory, and changes nothing for models already in 16 bits
        wide = any(model.dtype not in (torch.bfloat16, torch.float16) for model in models.values())
        raise BenchStopped(
            f"out of memory at context {stopped} on {result['device']}{measured}: measure shorter contexts"
            + (", or in a smaller dtype (bfloat16)" if wide else ""),
            result if rows else None,
        )
    return result


def hardware_name(device: torch.device) -> str:
    """The GPU's or CPU's model name, which speed numbers mean nothing without (the model card shows it)."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    with suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine() or "unknown CPU"


_METRICS = (  # field, name, format, the field of its timed runs (None: measured once)
    ("prefill_tok_s", "prefill tokens/s", lambda v: f"{v:.0f}", "prefill_runs_tok_s"),
    ("decode_ms", "decode ms/token", lambda v: f"{v:.1f}", "decode_runs_ms"),
    ("cache_bytes", "cache MiB", lambda v: f"{v / 2**20:.2f}", None),
    ("peak_bytes", "prefill peak MiB", lambda v: f"{v / 2**20:.1f}", None),
)


def bench_rows(result: dict) -> tuple[list[str], list[list[str]]]:
    """The side-by-side table of `linearize bench`: a row per context and metric, a column per model and, with two
    models, their ratio (first / second, for every metric: below 1 means faster decode or less memory). A timed
    metric with several runs also shows the range of the runs' ratios, each run against the other model's run of the
    same round ("1.03x (0.98-1.06)"): a range that spans 1 means this machine could not tell the two apart.

    Args:
        result: what `run_bench` returned.

    Returns:
        The header and the rows, as text.
    """
    labels = result["models"]
    header = ["context", "metric", *labels] + (["ratio"] if len(labels) == 2 else [])
    rows = []
    for row in result["rows"]:
        for field, name, show, runs_field in _METRICS:
            values = [row[label][field] for label in labels]
            cells = [str(row["context"]), name] + ["n/a" if v is None else show(v) for v in values]
            if len(labels) == 2:
                cells.append(_ratio(values, [row[label].get(runs_field) for label in labels]))
            rows.append(cells)
    return header, rows


def _ratio(values: list, runs: list[list[float] | None]) -> str:
    """First / second model, with the range of the per-round ratios when both have several runs."""
    if not (values[0] and values[1]):
        return "n/a"
    text = f"{values[0] / values[1]:.2f}x"
    if all(r and len(r) > 1 for r in runs):
        ratios = [a / b for a, b in zip(*runs, strict=True)]
        text += f" ({min(ratios):.2f}-{max(ratios):.2f})"
    return text


def plot_bench(result: dict, path: Path) -> Path:
    """Write a PNG, whole or not at all: prefill tokens/s, decode ms/token and cache MiB against context (log2 x), one
    line per model.

    Needs matplotlib (`pip install matplotlib`) and no display: the figure is drawn without pyplot, so the caller's
    backend and figures (a notebook's) are left as they were."""
    from matplotlib.figure import Figure

    from .outputs import file_written_whole

    contexts = [row["context"] for row in result["rows"]]
    panels = (
        ("prefill_tok_s", "prefill tokens/s (higher is better)"),
        ("decode_ms", "decode ms/token, median step (lower is better)"),
        ("cache_bytes", "cache MiB after prefill"),
    )
    figure = Figure(figsize=(15, 4.2), layout="constrained")
    axes = figure.subplots(1, len(panels))
    for axis, (field, title) in zip(axes, panels, strict=True):
        for label in result["models"]:
            values = [row[label][field] for row in result["rows"]]
            if field == "cache_bytes":
                values = [v / 2**20 for v in values]
            axis.plot(contexts, values, marker="o", label=label)
        axis.set_xscale("log", base=2)
        axis.minorticks_off()
        axis.set_xticks(contexts, [str(c) for c in contexts])
        axis.set_xlabel("context (tokens)")
        axis.set_title(title, fontsize=10)
        axis.grid(True, alpha=0.3)
        axis.set_ylim(bottom=0)
    axes[0].legend()
    threads = f"{result['threads']} thread" + "s" * (result["threads"] != 1)
    figure.suptitle(f"{' vs '.join(result['models'])} on {result['device']} ({threads})")
    with file_written_whole(path) as partial:
        figure.savefig(partial, dpi=120, format="png")
    return Path(path)
