"""GPU check of the attention kernels: versions, a correctness table, then timings against SDPA.

    python benchmarks/gpu_check.py                     # CUDA: every section, ~4-5 minutes on an H100/H200
    python benchmarks/gpu_check.py --skip-correctness  # only the timings (--skip-timings: only the correctness)
    python benchmarks/gpu_check.py --smoke             # anywhere, ~30 s on 2 CPU cores: tiny shapes, torch backend

Every line is flushed as soon as it is known, so a run cut off by a timeout still reports, and each section ends
with its elapsed time. No row starts after --budget seconds (default 420: the run ends before 8 minutes unless one
row takes over a minute). On CUDA an op that raises prints ERROR in its row and the run goes on; --smoke raises
instead, so a broken code path fails tests/test_benchmarks.py. Exit status 1 when a row FAILs or ERRORs. Our ops
run on backend "triton" on CUDA, "torch" in --smoke (fp32, 4/2 heads, head dim 32, tolerance 1e-4).

1. Header: Python, torch (CUDA), triton, transformers and fla versions, the device.
2. Correctness (~1.5 min, mostly compiling and autotuning our Triton kernels, which warms them for the timings):
   each public op in bf16 (the gates of the linear states and the states in fp32, as the layers pass them) against
   backend "reference" on the same values in fp32 (float64 for STILL's oracles), at B = 1, 32 query heads, 8 KV
   heads, head dim 128 and T = 2048, or 1024 where the oracle loops over tokens (GLA, Liger, Parallax); the decode
   steps at batch 2, one row with invalid cache slots (Parallax against 2048 cached tokens). One row per output,
   final state and gradient: ||ref - out|| / ||ref|| against 2e-2, the bf16 tolerance of the CUDA configs of
   tests/kernels. STILL's saliency scores are not differentiated; its selection runs on identical scores on both
   paths, and the row gives the share of (chunk, head) whose picked scores differ (ties may pick other tokens with
   the same score), tolerance 0. A failing row on CUDA is followed by where its error sits, the op again on fp32
   inputs and one rerun per launch configuration of each autotuned kernel of the op (benchmarks/gpu_diagnose.py).
3. Timings (~2 min; fla's autotuning of chunk_gla, in its first row's "warm s", took 258 s on an H200, so fla's
   rows come last at each length), B = 1, 32/8 heads, D = 128, bf16, at T = 2K, 8K and 32K: forward,
   forward+backward and one decode step at that context (ms: triton.testing.do_bench medians, after a first call of
   each, whose seconds with compiling and autotuning are "warm s"), and each time over SDPA's in the same run (< 1x
   is faster). Rows:
     - sdpa causal: `scaled_dot_product_attention` with enable_gqa (never the math backend on CUDA), the original
       layer's cost; its decode step is one query against the T-token cache;
     - liger (ours): `liger_attention` (gated linear branch + 64-key window, mixed); decode: `liger_decode`;
     - fla chunk_gla + our window: fla's GLA kernel (our `fla` backend, which repeats K, V and the gates per query
       head) plus our window op, mixed in fp32;
     - still (ours): `self_saliency`, top-4-of-64 `select_salient` and `still_attention`, the [softmax(u),
       softmax(-u)] features given (the NP-Map matmul is not timed); decode: the STILL layer's own step after a
       T-token prefill (projections included);
     - parallax (ours): `parallax_attention`, probe r = 0.05 randn; decode: `parallax_decode`;
     - fla parallel_parallax: fla's Parallax kernels on the same inputs (no decode row);
     - swa (ours): `sliding_window_attention` over 60 recent keys and 4 sinks, the training-free baseline.
   fla rows need flash-linear-attention (and CUDA). Liger's and swa's decode cost does not depend on T.
4. Decode sweep (~10 s): one decode step of Parallax and of SDPA at batch 1 and 32 against 4K and 16K caches.

The kernel test suite's CUDA configs (fp32, bf16 and fp16 at small shapes): `pytest -m triton tests/kernels`.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.metadata
import importlib.util
import itertools
import platform
import sys
import time
from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F
from gpu_diagnose import FAMILIES, locate, relative_error, sweep_configs  # beside this file, the script's folder
from gpu_inputs import (
    CHUNK,
    PROBE,
    SWA_RECENT,
    SWA_SINKS,
    TOPK,
    WINDOW,
    Setup,
    liger_decode_inputs,
    liger_inputs,
    parallax_inputs,
    randn,
    sink_mask,
    still_inputs,
)
from linearize.kernels import gated_linear_attention, sliding_window_attention
from linearize.kernels.liger import liger_attention, liger_decode
from linearize.kernels.parallax import parallax_attention, parallax_decode
from linearize.kernels.still import select_salient, self_saliency, still_attention
from torch.nn.attention import SDPBackend, sdpa_kernel

FAST_SDPA = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION]
START = time.perf_counter()
PROBLEMS: list[str] = []  # the rows that failed or raised, for the summary and the exit status


class Case(NamedTuple):
    """One op checked against its reference: op(backend, **inputs) -> named outputs."""

    name: str
    inputs: dict[str, torch.Tensor]
    op: Callable[..., dict[str, torch.Tensor]]
    grads: tuple[str, ...]  # the inputs whose gradients are compared
    reference_dtype: torch.dtype


class Path(NamedTuple):
    """One timed row: forward(**inputs) -> output, and a decode step (or None)."""

    forward: Callable[..., torch.Tensor]
    inputs: dict[str, torch.Tensor]
    decode: Callable[[], object] | None


def say(line: str = "") -> None:
    print(line, flush=True)


def elapsed() -> float:
    return time.perf_counter() - START


@contextlib.contextmanager
def section(title: str):
    start = time.perf_counter()
    say(f"\n== {title} (at {elapsed():.0f} s)")
    yield
    say(f"-- {title}: {time.perf_counter() - start:.1f} s")


def over_budget(s: Setup, what: str) -> bool:
    if elapsed() < s.budget:
        return False
    say(f"skipped {what}: {elapsed():.0f} s elapsed, past the {s.budget:.0f} s budget")
    return True


def attempt(setup: Setup, label: str, fn: Callable, *args):
    """fn(*args), or None after printing the error (--smoke raises it)."""
    try:
        return fn(*args)
    except Exception as error:
        if setup.strict:
            raise
        message = (str(error).strip().splitlines() or [""])[0][:300]
        say(f"{label}: ERROR {type(error).__name__}: {message}")
        PROBLEMS.append(f"{label} raised")
        return None
    finally:
        if setup.device == "cuda":
            with contextlib.suppress(RuntimeError):  # a broken CUDA context fails the next rows, not the script
                torch.cuda.empty_cache()


def header(setup: Setup) -> None:
    import transformers

    def version(module: str, *dists: str) -> str:
        for dist in dists:
            with contextlib.suppress(importlib.metadata.PackageNotFoundError):
                return importlib.metadata.version(dist)
        return "not installed" if importlib.util.find_spec(module) is None else "unknown version"

    cuda = f" (CUDA {torch.version.cuda})" if torch.version.cuda else ""
    device = torch.cuda.get_device_name() if setup.device == "cuda" else "cpu"
    say(f"python {platform.python_version()}, torch {torch.__version__}{cuda}, triton {version('triton', 'triton')}")
    say(f"transformers {transformers.__version__}, fla {version('fla', 'fla-core', 'flash-linear-attention')}")
    say(f"device {device}; our backend {setup.backend!r}, activations {setup.dtype}")


# ---------------------------------------------------------------- correctness


def gla_case(s: Setup, T: int) -> Case:
    x = liger_inputs(s, T)
    x = {"q": x["q_lin"], "k": x["k_lin"], "v": x["v"], "g": x["g"]}
    x["initial_state"] = randn(s, 1, s.Hkv, s.D, s.D, scale=0.1, dtype=torch.float32)

    def op(backend, **x):
        o, state = gated_linear_attention(**x, output_final_state=True, backend=backend)
        return {"o": o, "final state": state}

    return Case("gated_linear_attention", x, op, tuple(x), torch.float32)


def window_case(s: Setup, T: int) -> Case:
    x = {"q": randn(s, 1, T, s.H, s.D), "k": randn(s, 1, T, s.Hkv, s.D), "v": randn(s, 1, T, s.Hkv, s.D)}
    x |= {"sink_k": x["k"][:, :SWA_SINKS].clone(), "sink_v": x["v"][:, :SWA_SINKS].clone()}
    mask = sink_mask(s, T)

    def op(backend, **x):
        return {"o": sliding_window_attention(**x, window=SWA_RECENT, sink_mask=mask, backend=backend)}

    return Case("sliding_window + sinks", x, op, tuple(x), torch.float32)


def liger_case(s: Setup, T: int) -> Case:
    x = liger_inputs(s, T) | {"initial_state": randn(s, 1, s.Hkv, s.D, s.D, scale=0.1, dtype=torch.float32)}

    def op(backend, **x):
        o, state = liger_attention(**x, window=WINDOW, output_final_state=True, backend=backend)
        return {"o": o, "final state": state}

    return Case("liger_attention", x, op, tuple(x), torch.float32)


def liger_decode_case(s: Setup) -> Case:
    x = liger_decode_inputs(s, 2, [WINDOW, 20])  # row 1 is the 20th token of its sequence

    def op(backend, **x):
        o, state = liger_decode(**x, backend=backend)
        return {"o": o, "new state": state}

    return Case("liger_decode", x, op, (), torch.float32)


def saliency_case(s: Setup, x: dict[str, torch.Tensor]) -> Case:
    def op(backend, q, k):
        return {"scores": self_saliency(q, k, window=CHUNK, backend=backend)}

    return Case("self_saliency", {"q": x["q"], "k": x["k"]}, op, (), torch.float64)


def still_case(s: Setup, x: dict[str, torch.Tensor]) -> Case:
    scores = self_saliency(x["q"], x["k"], window=CHUNK, backend=s.backend)
    salient = select_salient(scores, chunk_size=CHUNK, topk=TOPK, backend=s.backend)

    def op(backend, **x):
        return {"o": still_attention(**x, salient=salient, chunk_size=CHUNK, backend=backend)}

    return Case("still_attention", x, op, tuple(x), torch.float64)


def parallax_case(s: Setup, T: int) -> Case:
    x = parallax_inputs(s, T)

    def op(backend, **x):
        return {"o": parallax_attention(**x, backend=backend)}

    return Case("parallax_attention", x, op, tuple(x), torch.float32)


def parallax_decode_case(s: Setup, L: int) -> Case:
    q, r = randn(s, 2, s.H, s.D), randn(s, 2, s.H, s.D, scale=PROBE)
    x = {"q": q, "r": r, "k_cache": randn(s, 2, L, s.Hkv, s.D), "v_cache": randn(s, 2, L, s.Hkv, s.D)}
    valid = torch.arange(L, device=s.device) >= torch.tensor([[0], [L // 3]], device=s.device)  # row 1 left-padded

    def op(backend, **x):
        return {"o": parallax_decode(**x, cache_valid=valid, backend=backend)}

    return Case("parallax_decode", x, op, (), torch.float32)


def run_case(case: Case, inputs: dict, backend: str, cotangents: dict | None = None) -> tuple[dict, dict]:
    """Outputs and the gradients of sum(output * cotangent) (cotangents drawn in each output's dtype when not
    given), all detached; and the cotangents."""
    leaves = {name: t.detach().clone().requires_grad_(name in case.grads) for name, t in inputs.items()}
    out = case.op(backend, **leaves)
    if cotangents is None:
        cotangents = {name: torch.randn_like(o) for name, o in out.items()}
    if case.grads:
        sum((o.double() * cotangents[name].double()).sum() for name, o in out.items()).backward()
    grads = {f"d{name}": leaves[name].grad for name in case.grads}
    return {name: o.detach() for name, o in out.items()} | grads, cotangents


def against_reference(case: Case, backend: str) -> tuple[dict, dict, dict]:
    """Our outputs and gradients, the reference's on the same values widened to `case.reference_dtype` with the same
    cotangents, and those cotangents."""
    ours, cotangents = run_case(case, case.inputs, backend)
    widen = {name: t.to(case.reference_dtype) if t.is_floating_point() else t for name, t in case.inputs.items()}
    reference, _ = run_case(case, widen, "reference", cotangents)
    return ours, reference, cotangents


def report(name: str, T: int, quantity: str, error: float, tol: float) -> None:
    ok = error <= tol  # False for NaN
    if not ok:
        PROBLEMS.append(f"{name} {quantity}")
    say(f"{name:<24} {T:>5} {quantity:<14} {error:>9.2e} {tol:>7.0e}  {'PASS' if ok else 'FAIL'}")


def check(s: Setup, case: Case, T: int) -> list[str]:
    """One row per output and gradient; for each that fails on CUDA, where its error sits, then a sweep of the
    launch configurations of the op's autotuned kernels. Returns the failing quantities."""
    ours, reference, cotangents = against_reference(case, s.backend)
    failed = []
    for quantity, ref in reference.items():
        error = relative_error(ref, ours[quantity])
        report(case.name, T, quantity, error, s.tol)
        if not error <= s.tol:
            failed.append(quantity)
            if ref.dim() == 4 and ours[quantity] is not None and ours[quantity].shape == ref.shape:
                say(f"    {quantity}: {locate(ref, ours[quantity], CHUNK)}")
    if failed and s.device == "cuda":
        rerun = lambda: run_case(case, case.inputs, s.backend, cotangents)[0]  # noqa: E731
        sweep_configs(FAMILIES.get(case.name, ()), rerun, reference, failed)
    return failed


def check_selection(s: Setup, q: torch.Tensor, k: torch.Tensor) -> None:
    """Both selections of the same scores must pick the same multiset of scores in every (chunk, head)."""
    scores = self_saliency(q, k, window=CHUNK, backend=s.backend)
    B, T, H = scores.shape
    pad = -T % CHUNK

    def picked(backend):
        chosen = select_salient(scores, chunk_size=CHUNK, topk=TOPK, backend=backend)
        values = torch.where(chosen, scores, float("-inf"))
        return F.pad(values, (0, 0, 0, pad), value=float("-inf")).view(B, -1, CHUNK, H).sort(dim=2).values

    differ = (picked(s.backend) != picked("reference")).any(dim=2)  # [B, chunks, H]
    report("select_salient", T, "chunks differ", differ.double().mean().item(), 0.0)


def correctness(s: Setup, T: int, T_loop: int) -> None:
    """T for the oracles over [T, T] masks, T_loop for those looping over tokens (GLA, Liger, Parallax)."""
    say(f"{'op':<24} {'T':>5} {'quantity':<14} {'rel err':>9} {'tol':>7}  verdict")
    torch.manual_seed(0)
    still_x = still_inputs(s, T)
    cases = {  # name: a Case of the setup's dtype, its T
        "gated_linear_attention": (lambda s: gla_case(s, T_loop), T_loop),
        "sliding_window + sinks": (lambda s: window_case(s, T), T),
        "liger_attention": (lambda s: liger_case(s, T_loop), T_loop),
        "liger_decode": (liger_decode_case, 1),
        "self_saliency": (lambda s: saliency_case(s, still_x), T),
        "select_salient": (None, T),
        "still_attention": (lambda s: still_case(s, {name: t.to(s.dtype) for name, t in still_x.items()}), T),
        "parallax_attention": (lambda s: parallax_case(s, T_loop), T_loop),
        "parallax_decode": (lambda s: parallax_decode_case(s, T), 1),
    }
    for name, (build, length) in cases.items():
        if over_budget(s, f"{name} and the rest of the correctness"):
            break
        if build is None:
            attempt(s, name, check_selection, s, still_x["q"], still_x["k"])
            continue
        failed = attempt(s, name, lambda build=build, length=length: check(s, build(s), length))
        if failed and s.dtype != torch.float32:
            attempt(s, f"{name} in fp32", in_fp32, s, build, length, failed)


def in_fp32(s: Setup, build: Callable[[Setup], Case], T: int, failed: list[str]) -> None:
    """A case that failed in half precision, again on fp32 inputs (exact dots): the same failure points at the
    algorithm or a miscompile, none at precision. Printed only; the half-precision rows decided the verdict."""
    case = build(s._replace(dtype=torch.float32))
    ours, reference, _ = against_reference(case, s.backend)
    errors = " ".join(f"{q} {relative_error(reference[q], ours[q]):.2e}" for q in failed)
    say(f"    {case.name} on fp32 inputs: {errors}")


# ---------------------------------------------------------------- timings


def sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = True) -> torch.Tensor:
    """Softmax attention `[B, T, H, D]` over GQA keys; on CUDA never the math backend, whose [T, T] scores would
    not fit at 32K. One query against a cache is not causal-masked: torch aligns a causal mask to the top left."""
    with sdpa_kernel(FAST_SDPA) if q.is_cuda else contextlib.nullcontext():
        out = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=causal, enable_gqa=True
        )
    return out.transpose(1, 2)


def sdpa_path(s: Setup, T: int) -> Path:
    x = {"q": randn(s, 1, T, s.H, s.D), "k": randn(s, 1, T, s.Hkv, s.D), "v": randn(s, 1, T, s.Hkv, s.D)}
    q, k, v = randn(s, 1, 1, s.H, s.D), randn(s, 1, T + 1, s.Hkv, s.D), randn(s, 1, T + 1, s.Hkv, s.D)
    return Path(sdpa, x, lambda: sdpa(q, k, v, causal=False))


def liger_path(s: Setup, T: int) -> Path:
    step = liger_decode_inputs(s, 1, [WINDOW])

    def forward(**x):
        return liger_attention(**x, window=WINDOW, backend=s.backend)[0]

    return Path(forward, liger_inputs(s, T), lambda: liger_decode(**step, backend=s.backend))


def fla_liger_path(s: Setup, T: int) -> Path:
    def forward(q_lin, k_lin, v, g, q_rot, k_rot):
        o_linear, _ = gated_linear_attention(q_lin, k_lin, v, g, backend="fla")
        o_window = sliding_window_attention(q_rot, k_rot, v, window=WINDOW, backend=s.backend)
        return 0.5 * o_window.float() + 0.5 * o_linear.float()

    return Path(forward, liger_inputs(s, T), None)


def still_path(s: Setup, T: int) -> Path:
    def forward(q, k, v, q_feat, k_feat, gate):
        scores = self_saliency(q, k, window=CHUNK, backend=s.backend)
        salient = select_salient(scores, chunk_size=CHUNK, topk=TOPK, backend=s.backend)
        return still_attention(q, k, v, q_feat, k_feat, gate, salient, chunk_size=CHUNK, backend=s.backend)

    return Path(forward, still_inputs(s, T), still_decode_step(s, T))


def parallax_path(s: Setup, T: int) -> Path:
    q, r = randn(s, 1, s.H, s.D), randn(s, 1, s.H, s.D, scale=PROBE)
    k, v = randn(s, 1, T + 1, s.Hkv, s.D), randn(s, 1, T + 1, s.Hkv, s.D)

    def forward(**x):
        return parallax_attention(**x, backend=s.backend)

    decode = lambda: parallax_decode(q, r, k, v, None, backend=s.backend)  # noqa: E731
    return Path(forward, parallax_inputs(s, T), decode)


def fla_parallax_path(s: Setup, T: int) -> Path:
    from fla.ops.parallax import parallel_parallax

    return Path(parallel_parallax, parallax_inputs(s, T), None)


def swa_path(s: Setup, T: int) -> Path:
    mask = sink_mask(s, T)
    q = randn(s, 1, 1, s.H, s.D)
    k, v = randn(s, 1, SWA_RECENT + SWA_SINKS, s.Hkv, s.D), randn(s, 1, SWA_RECENT + SWA_SINKS, s.Hkv, s.D)

    def forward(q, k, v):
        sinks = {"sink_k": k[:, :SWA_SINKS], "sink_v": v[:, :SWA_SINKS], "sink_mask": mask}
        return sliding_window_attention(q, k, v, window=SWA_RECENT, **sinks, backend=s.backend)

    def decode():
        sinks = {"sink_k": k[:, :SWA_SINKS], "sink_v": v[:, :SWA_SINKS]}
        recent = {"k": k[:, SWA_SINKS:], "v": v[:, SWA_SINKS:]}
        return sliding_window_attention(q, **recent, window=SWA_RECENT, **sinks, backend=s.backend)

    x = {"q": randn(s, 1, T, s.H, s.D), "k": randn(s, 1, T, s.Hkv, s.D), "v": randn(s, 1, T, s.Hkv, s.D)}
    return Path(forward, x, decode)


def still_decode_step(s: Setup, T: int) -> Callable[[], None]:
    """The STILL layer's decode step after a T-token prefill (projections included, as in the model)."""
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    from linearize.convert import plan_conversion
    from linearize.families import get_family
    from linearize.layers.still import StillAttention

    source = LlamaConfig(
        hidden_size=s.H * s.D, num_attention_heads=s.H, num_key_value_heads=s.Hkv, num_hidden_layers=1,
        intermediate_size=64, vocab_size=128, max_position_embeddings=T + 16,
    )  # fmt: skip
    config = plan_conversion(source, "llama", "still").config
    layer = StillAttention(config, 0, get_family("llama")).to(device=s.device, dtype=s.dtype)
    layer.init_new_parameters(torch.device(s.device), s.dtype)
    cache = StillAttention.cache_layer(config.settings)
    x = torch.randn(1, T + 1, s.H * s.D, dtype=s.dtype, device=s.device)
    cos, sin = LlamaRotaryEmbedding(source).to(s.device)(x, torch.arange(T + 1, device=s.device)[None])
    with torch.no_grad():
        layer(x[:, :T], position_embeddings=(cos[:, :T], sin[:, :T]), cache=_OneLayer(cache))

    def step():
        saved = {name: getattr(cache, name) for name in cache._tensor_fields}
        layer(x[:, T:], position_embeddings=(cos[:, T:], sin[:, T:]), cache=_OneLayer(cache))
        # the step writes the ring, the state and the token count in place and may grow the salient tensors: put
        # the latter back, so the cache stays one size; each step then costs what one after T tokens does, but for
        # the fold every chunk_size-th step, which the median leaves out
        for name, value in saved.items():
            setattr(cache, name, value)

    return step


class _OneLayer:
    """The cache object the layer reads: `.layers[layer_idx]`."""

    def __init__(self, layer):
        self.layers = [layer]


def timer(device: str) -> Callable[..., float]:
    """bench(fn, leaves=()) -> ms: do_bench's median on CUDA (gradients of `leaves` reset between runs), else one
    call (the smoke run checks the code, not the speed)."""
    if device == "cuda":
        from triton.testing import do_bench

        return lambda fn, leaves=(): do_bench(fn, warmup=10, rep=50, grad_to_none=list(leaves), return_mode="median")

    def one_call(fn, leaves=()):
        start = time.perf_counter()
        fn()
        return 1000 * (time.perf_counter() - start)

    return one_call


def time_path(s: Setup, bench, path: Path) -> tuple[float, float, float, float | None]:
    """Warm-up seconds (the first call of each timed callable), forward, forward+backward and decode ms."""
    x = path.inputs
    leaves = [t.requires_grad_() for t in x.values() if t.is_floating_point()]

    def forward():
        with torch.no_grad():
            return path.forward(**x)

    def decode():
        with torch.no_grad():
            path.decode()

    start = time.perf_counter()
    do = torch.randn_like(forward())

    def train():
        path.forward(**x).backward(do)

    train()
    if path.decode is not None:
        decode()
    if s.device == "cuda":
        torch.cuda.synchronize()
    warm = time.perf_counter() - start
    for leaf in leaves:
        leaf.grad = None
    return warm, bench(forward), bench(train, leaves), bench(decode) if path.decode is not None else None


def time_length(s: Setup, bench, T: int, paths: dict[str, Callable[[Setup, int], Path]]) -> None:
    say(
        f"{'T':>6} {'path':<27} {'warm s':>7} {'fwd ms':>9} {'f+b ms':>9} {'decode ms':>10} "
        f"{'fwd/sdpa':>9} {'f+b/sdpa':>9} {'dec/sdpa':>9}"
    )
    base = [None] * 3  # sdpa's times, the first row's
    for name, build in paths.items():
        if over_budget(s, f"{name} and the rest at T = {T}"):
            break
        times = attempt(s, f"{T:>6} {name}", lambda build: time_path(s, bench, build(s, T)), build)
        if times is None:
            continue
        warm, *ms = times
        if name == "sdpa causal":
            base = ms
        cells = [f"{m:>9.3f}" if m is not None else f"{'-':>9}" for m in ms]
        ratios = [f"{m / b:>8.2f}x" if m is not None and b else f"{'-':>9}" for m, b in zip(ms, base, strict=True)]
        say(f"{T:>6} {name:<27} {warm:>7.1f} {cells[0]} {cells[1]} {cells[2]:>10} {' '.join(ratios)}")


def decode_sweep(s: Setup, bench, batches: tuple[int, ...], caches: tuple[int, ...]) -> None:
    """One decode step of Parallax and of SDPA per (batch, cache length), and their ratio."""
    say(f"{'batch':>6} {'cache':>7} {'sdpa ms':>9} {'parallax ms':>12} {'parallax/sdpa':>14}")
    for B, L in itertools.product(batches, caches):
        if over_budget(s, f"batch {B}, cache {L} and the rest of the sweep"):
            break
        attempt(s, f"{B:>6} {L:>7}", sweep_row, s, bench, B, L)


def sweep_row(s: Setup, bench, B: int, L: int) -> None:
    q, r = randn(s, B, s.H, s.D), randn(s, B, s.H, s.D, scale=PROBE)
    k, v = randn(s, B, L, s.Hkv, s.D), randn(s, B, L, s.Hkv, s.D)
    with torch.no_grad():
        base = bench(lambda: sdpa(q[:, None], k, v, causal=False))
        ours = bench(lambda: parallax_decode(q, r, k, v, None, backend=s.backend))
    say(f"{B:>6} {L:>7} {base:>9.3f} {ours:>12.3f} {ours / base:>13.2f}x")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="tiny shapes, torch backend, any device; raise on errors")
    parser.add_argument("--skip-correctness", action="store_true")
    parser.add_argument("--skip-timings", action="store_true", help="also skips the decode sweep")
    parser.add_argument("--lengths", default="2048,8192,32768", help="timed sequence lengths on CUDA, comma-separated")
    parser.add_argument("--budget", type=float, default=420.0, help="seconds into the run after which no row starts")
    args = parser.parse_args()
    cuda = torch.cuda.is_available() and not args.smoke
    if not args.smoke and not cuda:
        parser.error("no CUDA device: use --smoke")
    if cuda:
        setup = Setup("cuda", torch.bfloat16, "triton", 2e-2, strict=False, budget=args.budget, H=32, Hkv=8, D=128)
    else:
        setup = Setup("cpu", torch.float32, "torch", 1e-4, strict=True, budget=args.budget, H=4, Hkv=2, D=32)
    header(setup)

    if not args.skip_correctness:
        with section("correctness"):
            correctness(setup, *((2048, 1024) if cuda else (160, 96)))
    if not args.skip_timings:
        bench = timer(setup.device)
        paths = {
            "sdpa causal": sdpa_path,
            "liger (ours)": liger_path,
            "still (ours)": still_path,
            "parallax (ours)": parallax_path,
            "swa (ours)": swa_path,
            # last: fla's first call autotunes for minutes (258 s for chunk_gla on an H200 at T = 2048)
            "fla chunk_gla + our window": fla_liger_path,
            "fla parallel_parallax": fla_parallax_path,
        }
        if not cuda or importlib.util.find_spec("fla") is None:
            paths = {name: build for name, build in paths.items() if not name.startswith("fla")}
        for T in [int(n) for n in args.lengths.split(",")] if cuda else [256]:
            if over_budget(setup, f"the timings at T = {T} and after"):
                break
            with section(f"timings at T = {T}"):
                torch.manual_seed(T)
                time_length(setup, bench, T, paths)
        if not over_budget(setup, "the decode sweep"):
            with section("decode sweep"):
                decode_sweep(setup, bench, *(((1, 32), (4096, 16384)) if cuda else ((1, 2), (64,))))

    say(f"\n{len(PROBLEMS)} problem(s){': ' + '; '.join(PROBLEMS) if PROBLEMS else ''}; total {elapsed():.0f} s")
    return 1 if PROBLEMS else 0


if __name__ == "__main__":
    sys.exit(main())
