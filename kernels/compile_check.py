"""Compile every Triton kernel our ops launch for real NVIDIA GPUs, on a machine that has none.

Triton compiles ahead of time for any NVIDIA target without a GPU or driver: through TTGIR and PTX to a cubin with
the `ptxas` inside the triton wheel. This module runs each op on CPU tensors of real shapes with an offline
stand-in for the GPU driver, so Triton's own binder specialises every launch exactly as it would on the GPU, and
compiles it instead of launching it (`warmup=True`). Autotuned kernels compile every configuration that survives
their pruning for the target. For each compiled kernel it reports what decides whether it can run and run well:

- shared memory (`metadata.shared`, what Triton checks against the device when it loads the kernel),
- registers per thread and spill bytes (the `ptxas -v` log),
- whether the dots reach tensor cores (`mma` / `wgmma` in the PTX).

    python -m linearize.kernels.compile_check                       # sm_80 and sm_90, head dim 128, bf16
    python -m linearize.kernels.compile_check --head-dims 64,128 --dtypes bf16,fp16 --markdown table.md

It exits with status 1 when a kernel breaks the budget (`violations`). Numbers come from the ptxas of the
installed triton wheel: another Triton release may allocate registers a little differently.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
import json
import os
import re
import sys
import tempfile
import warnings
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import torch


@dataclasses.dataclass(frozen=True)
class Target:
    name: str  # sm_80
    gpu: str  # the GPUs it stands for
    capability: int
    shared_memory: int  # bytes of shared memory one block may opt in to
    registers: int = 65536  # 32-bit registers per block


TARGETS = {
    "sm80": Target("sm_80", "A100", 80, 166_912),
    "sm90": Target("sm_90", "H100/H200", 90, 232_448),
}
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
# the budget of `violations`
SPILL_BUDGET = 2048  # bytes of spill stores per thread, anywhere
STRICT_TARGET, STRICT_HEAD_DIM = "sm_90", 128  # where forward and decode kernels may not spill at all


@dataclasses.dataclass(frozen=True)
class Shape:
    """Attention shape of one layer: Llama-3-8B-like by default."""

    batch: int = 1
    tokens: int = 8192
    heads: int = 32
    kv_heads: int = 8
    head_dim: int = 128
    dtype: str = "bf16"

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]


@dataclasses.dataclass
class KernelReport:
    """One compiled launch configuration of one kernel."""

    target: str
    kernel: str
    location: str  # file:line of the kernel's definition
    method: str  # the workload that launched it
    phase: str  # train | prefill | decode
    direction: str  # forward | backward
    head_dim: int
    dtype: str
    config: str  # block sizes and other meta-parameters
    warps: int = 0
    stages: int = 0
    shared: int = 0
    shared_limit: int = 0
    registers: int = 0
    spill_stores: int = 0
    spill_loads: int = 0
    mma: str = ""  # wgmma | mma | "" (no tensor cores)
    has_dot: bool = False
    error: str = ""


# -- the offline driver ----------------------------------------------------------------------------------------------


class _OfflineUtils:
    def __init__(self, target: Target):
        self.target = target

    def get_device_properties(self, device):
        # what pruning code asks of a device
        return {
            "max_shared_mem": self.target.shared_memory,
            "max_num_regs": self.target.registers,
            "multiprocessor_count": 132 if self.target.capability >= 90 else 108,
            "warpSize": 32,
        }


class OfflineDriver:
    """Stands in for Triton's CUDA driver: names the target, answers device queries, never launches."""

    def __init__(self, target: Target):
        from triton.backends.compiler import GPUTarget

        self.target = target
        self.gpu_target = GPUTarget("cuda", target.capability, 32)
        self.utils = _OfflineUtils(target)

    def is_active(self) -> bool:
        return True

    def get_current_device(self) -> int:
        return self.target.capability  # one JIT cache per target

    def set_current_device(self, device) -> None:
        pass

    def get_current_stream(self, device=None) -> int:
        return 0

    def get_current_target(self):
        return self.gpu_target

    def get_active_torch_device(self):
        return torch.device("cpu")

    def get_benchmarker(self):
        # the autotuner "times" each configuration by compiling it; every one ties, so the first wins
        def bench(kernel_call, quantiles=None, **kwargs):
            kernel_call()
            return [0.0, 0.0, 0.0] if quantiles else 0.0

        return bench


# -- recording and compiling launches -------------------------------------------------------------------------------

_context = {"method": "", "phase": "", "direction": "forward", "shape": Shape()}


@contextlib.contextmanager
def _labelled(**labels) -> Iterator[None]:
    saved = dict(_context)
    _context.update(labels)
    try:
        yield
    finally:
        _context.clear()
        _context.update(saved)


_PTXAS_REGISTERS = re.compile(r"Used (\d+) registers")
_PTXAS_SPILLS = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")


def parse_ptxas_log(log: str) -> tuple[int, int, int]:
    """Registers per thread, spill store bytes and spill load bytes of the one entry function in a `ptxas -v` log."""
    registers = _PTXAS_REGISTERS.findall(log)
    spills = _PTXAS_SPILLS.findall(log)
    if len(registers) != 1 or len(spills) != 1:
        raise ValueError(f"expected one entry function in the ptxas log, got:\n{log}")
    return int(registers[0]), int(spills[0][0]), int(spills[0][1])


_MMA = re.compile(r"\b(wgmma\.mma_async|mma\.sync)((?:\.[A-Za-z0-9_]+)+)")
_OPERANDS = ("bf16", "f16", "tf32")


def tensor_core_instructions(ptx: str) -> str:
    """The tensor-core instructions in PTX and their operand types, e.g. "wgmma bf16" or "mma bf16+tf32"; "" when
    nothing multiplies on tensor cores."""
    kinds, operands = set(), set()
    for instruction, suffix in _MMA.findall(ptx):
        kinds.add("wgmma" if instruction.startswith("wgmma") else "mma")
        operands |= {part for part in suffix.split(".") if part in _OPERANDS}
    if not kinds:
        return ""
    return f"{'+'.join(sorted(kinds, reverse=True))} {'+'.join(t for t in _OPERANDS if t in operands)}"


def _has_dot(fn) -> bool:
    """Whether a kernel (or a @triton.jit helper it calls) multiplies with tl.dot."""
    import triton

    seen = set()

    def visit(f) -> bool:
        if id(f) in seen:
            return False
        seen.add(id(f))
        if "tl.dot(" in f.src:
            return True
        return any(isinstance(g, triton.runtime.jit.JITFunction) and visit(g) for g in f.__globals__.values())

    return visit(fn)


_KERNELS_ROOT = Path(__file__).resolve().parent


def _location(fn) -> str:
    code = fn.fn.__code__
    path = Path(code.co_filename).resolve()
    try:
        name = "kernels/" + path.relative_to(_KERNELS_ROOT).as_posix()
    except ValueError:  # another package's kernel (fla)
        parts = path.parts
        name = "/".join(parts[parts.index("site-packages") + 1 :]) if "site-packages" in parts else path.name
    return f"{name}:{code.co_firstlineno}"


_CONFIG_SKIP = {"H", "HQ", "HKV", "HS", "HV", "G", "K", "V", "D", "DV", "F", "NC", "NK", "DOT_PREC"}


def _config(constexprs: dict) -> str:
    """Meta-parameters that choose tiles (block sizes, chunk): the constexprs named in upper case, minus shapes."""
    items = []
    for path, value in constexprs.items():
        name = path if isinstance(path, str) else None
        if (
            name
            and name.isupper()
            and name not in _CONFIG_SKIP
            and isinstance(value, int)
            and not isinstance(value, bool)
        ):
            items.append(f"{name}={value}")
    return " ".join(items)


class _Recorder:
    """Replaces `JITFunction.run` while installed: compiles each launch for the offline target, records a report."""

    def __init__(self, target: Target):
        self.target = target
        self.reports: list[KernelReport] = []
        self._ptxas: dict[int, tuple[int, int, int]] = {}  # id of a compiled kernel -> registers, spills
        self._rows: set[tuple] = set()

    def run(self, original, fn, args, grid, kwargs):
        shape: Shape = _context["shape"]
        names = [p.name for p in fn.params]
        bound = dict(zip(names, args, strict=False)) | kwargs
        constexprs = {p.name: bound[p.name] for p in fn.params if p.is_constexpr and p.name in bound}
        constexprs |= {name: value for name, value in kwargs.items() if name not in names}  # autotuned values
        report = KernelReport(
            target=self.target.name, kernel=fn.fn.__name__, location=_location(fn), method=_context["method"],
            phase=_context["phase"], direction=_context["direction"], head_dim=shape.head_dim, dtype=shape.dtype,
            config=_config(constexprs), shared_limit=self.target.shared_memory, has_dot=_has_dot(fn),
        )  # fmt: skip
        log = io.StringIO()
        try:
            with contextlib.redirect_stdout(log), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                kernel = original(fn, *args, grid=grid, warmup=True, **kwargs)
        except Exception as error:  # a compile error is a finding, not a crash of the check
            lines = [line for line in str(error).strip().splitlines() if line.strip()] or [""]
            report.error = f"{type(error).__name__}: {lines[0][:80]} {lines[-1][:200]}".strip()
            self.reports.append(report)
            return None
        if id(kernel) not in self._ptxas:  # a new compilation (the JIT cache returns the same object again)
            self._ptxas[id(kernel)] = parse_ptxas_log(log.getvalue())
        row = (report.kernel, report.phase, report.direction, id(kernel))
        if row in self._rows:
            return kernel
        self._rows.add(row)
        report.registers, report.spill_stores, report.spill_loads = self._ptxas[id(kernel)]
        meta = kernel.metadata
        report.warps, report.stages, report.shared = meta.num_warps, meta.num_stages, meta.shared
        report.mma = tensor_core_instructions(kernel.asm["ptx"])
        self.reports.append(report)
        return kernel

    @contextlib.contextmanager
    def installed(self) -> Iterator[_Recorder]:
        from triton import knobs
        from triton.runtime import driver
        from triton.runtime.jit import JITFunction

        original = JITFunction.run
        recorder = self

        def run(fn, *args, grid, warmup, **kwargs):
            return recorder.run(original, fn, args, grid, kwargs)

        cache = tempfile.TemporaryDirectory(prefix="linearize-compile-check-")
        saved = (knobs.cache.dir, knobs.compilation.always_compile, knobs.nvidia.dump_ptxas_log, driver._active)
        knobs.cache.dir = cache.name  # ptxas runs (and logs) for every kernel, never a cached cubin
        knobs.compilation.always_compile = True
        knobs.nvidia.dump_ptxas_log = True
        driver.set_active(OfflineDriver(self.target))
        JITFunction.run = run
        try:
            yield self
        finally:
            JITFunction.run = original
            knobs.cache.dir, knobs.compilation.always_compile, knobs.nvidia.dump_ptxas_log, driver._active = saved
            cache.cleanup()


# -- workloads: what each method launches, with the dtypes its layer passes ------------------------------------------


def _randn(*shape, dtype, grad=False) -> torch.Tensor:
    return torch.randn(*shape, dtype=dtype).requires_grad_(grad)


def _backward(*outputs) -> None:
    with _labelled(direction="backward"):
        sum(o.float().sum() for o in outputs if o is not None).backward()


def _gla(shape: Shape, phase: str) -> None:
    """gated linear attention as liger-gla (and Liger with sinks) run it: q, k, v in the model dtype, g in fp32"""
    from .gla.triton import triton_chunk_gla

    B, T, H, Hkv, D, dtype = _dims(shape, phase)
    grad = phase == "train"
    q, k, v = (
        _randn(B, T, H, D, dtype=dtype, grad=grad),
        _randn(B, T, Hkv, D, dtype=dtype, grad=grad),
        _randn(B, T, Hkv, D, dtype=dtype, grad=grad),
    )
    g = _randn(B, T, Hkv, D, dtype=torch.float32, grad=grad)
    state = None if phase == "train" else torch.zeros(B, Hkv, D, D)
    o, _ = triton_chunk_gla(q, k, v, g, initial_state=state, output_final_state=phase != "train")
    if grad:
        _backward(o)


def _window(shape: Shape, phase: str, sinks: int = 4) -> None:
    """the sliding window with sinks, as swa (window 64, 4 sinks) and Liger with sinks run it"""
    from .window.triton import triton_sliding_window_attention

    B, T, H, Hkv, D, dtype = _dims(shape, phase)
    grad = phase == "train"
    recent = 60
    S = T + (recent - 1 if phase == "decode" else 0)
    q = _randn(B, T, H, D, dtype=dtype, grad=grad)
    k, v = _randn(B, S, Hkv, D, dtype=dtype, grad=grad), _randn(B, S, Hkv, D, dtype=dtype, grad=grad)
    sink_k, sink_v = _randn(B, sinks, Hkv, D, dtype=dtype, grad=grad), _randn(B, sinks, Hkv, D, dtype=dtype, grad=grad)
    sink_mask = torch.ones(B, T, sinks, dtype=torch.bool)
    key_valid = torch.ones(B, S, dtype=torch.bool)
    o = triton_sliding_window_attention(q, k, v, recent, key_valid, sink_k, sink_v, sink_mask)
    if grad:
        _backward(o)


def _liger(shape: Shape, phase: str) -> None:
    """Liger (window 64, no sinks): the op in training and prefill, the fused decode step. The layer passes the
    feature-mapped q and k and the values in the model dtype, the log decay and the state in fp32."""
    B, T, H, Hkv, D, dtype = _dims(shape, phase)
    if phase == "decode":
        from .liger.triton import triton_liger_decode

        window = 64
        triton_liger_decode(
            _randn(B, H, D, dtype=dtype), _randn(B, Hkv, D, dtype=dtype), _randn(B, Hkv, D, dtype=dtype),
            _randn(B, Hkv, D, dtype=torch.float32), torch.zeros(B, Hkv, D, D), _randn(B, H, D, dtype=dtype),
            _randn(B, window, Hkv, D, dtype=dtype), _randn(B, window, Hkv, D, dtype=dtype),
            torch.ones(B, window, dtype=torch.bool),
        )  # fmt: skip
        return
    from .liger.attention_triton import triton_liger_attention

    grad = phase == "train"
    o, _ = triton_liger_attention(
        _randn(B, T, H, D, dtype=dtype, grad=grad), _randn(B, T, Hkv, D, dtype=dtype, grad=grad),
        _randn(B, T, Hkv, D, dtype=dtype, grad=grad), _randn(B, T, Hkv, D, dtype=torch.float32, grad=grad),
        _randn(B, T, H, D, dtype=dtype, grad=grad), _randn(B, T, Hkv, D, dtype=dtype, grad=grad),
        window=64, output_final_state=phase == "prefill",
    )  # fmt: skip
    if grad:
        _backward(o)


def _still(shape: Shape, phase: str) -> None:
    """STILL (chunk 64, top-4): saliency, selection and the attention in training and prefill (decoding is torch).
    The layer passes the NP-Map features (2 D of them, per query head) and the gate in the model dtype."""
    if phase == "decode":
        return
    from .still.attention_triton import triton_still_attention
    from .still.saliency_triton import triton_self_saliency
    from .still.selection import torch_select_salient
    from .still.selection_triton import triton_select_salient

    B, T, H, Hkv, D, dtype = _dims(shape, phase)
    grad = phase == "train"
    q, k = _randn(B, T, H, D, dtype=dtype, grad=grad), _randn(B, T, Hkv, D, dtype=dtype, grad=grad)
    v = _randn(B, T, Hkv, D, dtype=dtype, grad=grad)
    valid = torch.ones(B, T, dtype=torch.bool)
    scores = triton_self_saliency(q.detach(), k.detach(), window=64, key_valid=valid)
    triton_select_salient(scores, chunk_size=64, topk=4)
    salient = torch_select_salient(torch.randn(B, T, H), 64, 4)  # the attention's input, with a real top-4 layout
    q_feat = _randn(B, T, H, 2 * D, dtype=dtype, grad=grad)
    k_feat = _randn(B, T, H, 2 * D, dtype=dtype, grad=grad)
    gate = _randn(B, T, H, D, dtype=dtype, grad=grad)
    o = triton_still_attention(q, k, v, q_feat, k_feat, gate, salient, chunk_size=64, key_valid=valid)
    if grad:
        _backward(o)


def _parallax(shape: Shape, phase: str) -> None:
    """Parallax (no window): the attention in training and prefill, its decode step against the cache"""
    B, T, H, Hkv, D, dtype = _dims(shape, phase)
    if phase == "decode":
        from .parallax.decode_triton import triton_parallax_decode

        cache_k, cache_v = _randn(B, shape.tokens, Hkv, D, dtype=dtype), _randn(B, shape.tokens, Hkv, D, dtype=dtype)
        triton_parallax_decode(_randn(B, H, D, dtype=dtype), _randn(B, H, D, dtype=dtype), cache_k, cache_v,
                               torch.ones(B, shape.tokens, dtype=torch.bool))  # fmt: skip
        return
    from .parallax.triton import triton_parallax_attention

    grad = phase == "train"
    q, r = _randn(B, T, H, D, dtype=dtype, grad=grad), _randn(B, T, H, D, dtype=dtype, grad=grad)
    k, v = _randn(B, T, Hkv, D, dtype=dtype, grad=grad), _randn(B, T, Hkv, D, dtype=dtype, grad=grad)
    o = triton_parallax_attention(q, r, k, v, key_valid=torch.ones(B, T, dtype=torch.bool))
    if grad:
        _backward(o)


def _fla_gla(shape: Shape, phase: str) -> None:
    """flash-linear-attention's chunk_gla, for comparison (same shapes, model-dtype operands, fp32 gates)"""
    if phase != "train":
        return
    _import_fla()
    from fla.ops.gla import chunk_gla

    B, T, H, Hkv, D, dtype = _dims(shape, phase)
    q = _randn(B, T, H, D, dtype=dtype, grad=True)
    k, v = _randn(B, T, H, D, dtype=dtype, grad=True), _randn(B, T, H, D, dtype=dtype, grad=True)
    g = torch.nn.functional.logsigmoid(torch.randn(B, T, H, D)).requires_grad_()
    o, _ = chunk_gla(q, k, v, g)
    _backward(o)


def _fla_parallax(shape: Shape, phase: str) -> None:
    """flash-linear-attention's parallel_parallax, for comparison"""
    if phase != "train" or shape.dtype == "fp32":
        return
    _import_fla()
    from fla.ops.parallax import parallel_parallax

    B, T, H, Hkv, D, dtype = _dims(shape, phase)
    q, r = _randn(B, T, H, D, dtype=dtype, grad=True), _randn(B, T, H, D, dtype=dtype, grad=True)
    k, v = _randn(B, T, Hkv, D, dtype=dtype, grad=True), _randn(B, T, Hkv, D, dtype=dtype, grad=True)
    _backward(parallel_parallax(q, r, k, v))


_GPU_NAMES = {80: "NVIDIA A100-SXM4-80GB", 90: "NVIDIA H100 80GB HBM3"}


def _import_fla() -> None:
    """Import fla's ops as on the offline target: fla reads the device at import (its vendor and capability from
    torch.cuda, its shared memory from Triton's driver) to choose its tile lists, so answer for the target."""
    if "fla.ops.gla" in sys.modules:
        return
    from unittest import mock

    from triton.runtime import driver

    capability = driver.active.target.capability
    with mock.patch.multiple(
        torch.cuda,
        device_count=lambda: 1,
        current_device=lambda: 0,
        get_device_name=lambda device=None: _GPU_NAMES[capability],
        get_device_capability=lambda device=None: divmod(capability, 10),
    ):
        import fla.ops.gla  # noqa: F401
        import fla.ops.parallax  # noqa: F401


def _dims(shape: Shape, phase: str):
    tokens = 1 if phase == "decode" else shape.tokens
    return shape.batch, tokens, shape.heads, shape.kv_heads, shape.head_dim, shape.torch_dtype


# method -> workload(shape, phase); a workload with nothing to launch for a phase returns
WORKLOADS: dict[str, Callable[[Shape, str], None]] = {
    "gla": _gla,
    "window": _window,
    "liger": _liger,
    "still": _still,
    "parallax": _parallax,
}
FLA_WORKLOADS: dict[str, Callable[[Shape, str], None]] = {"fla-gla": _fla_gla, "fla-parallax": _fla_parallax}
PHASES = ("train", "prefill", "decode")


def record(target: Target, method: str, shapes: list[Shape], phases=PHASES) -> list[KernelReport]:
    """Compile every launch of `method`'s workload at each shape and phase for `target` (in this process)."""
    workload = (WORKLOADS | FLA_WORKLOADS)[method]
    recorder = _Recorder(target)
    with recorder.installed(), torch.no_grad():
        for shape in shapes:
            for phase in phases:
                with _labelled(method=method, phase=phase, direction="forward", shape=shape), torch.enable_grad():
                    workload(shape, phase)
    return recorder.reports


def defined_kernels() -> set[str]:
    """Names of the Triton kernels our ops define (every `@triton.jit` function named `*_kernel*` in a module of
    linearize.kernels): what a full check must compile."""
    import importlib
    import pkgutil

    from . import __name__ as package
    from . import __path__ as path

    names = set()
    for module_info in pkgutil.walk_packages(path, prefix=f"{package}."):
        if module_info.name == __name__:
            continue
        module = importlib.import_module(module_info.name)
        for name, obj in vars(module).items():
            base = getattr(obj, "base_fn", None) or getattr(obj, "fn", None)  # an Autotuner, or a jitted function
            if "_kernel" in name and getattr(base, "__module__", None) == module.__name__:
                names.add(name)
    return names


def _record_task(task):
    target, method, shapes, phases = task
    os.environ.pop("TRITON_INTERPRET", None)
    return record(TARGETS[target], method, shapes, phases)


def check(
    targets=("sm80", "sm90"),
    methods=tuple(WORKLOADS),
    head_dims=(128,),
    dtypes=("bf16",),
    phases=PHASES,
    tokens: int = 8192,
    workers: int | None = None,
) -> list[KernelReport]:
    """Compile the launches of every (target, method) in its own process (`workers` at a time) and return the
    reports, ordered by target, method, then launch."""
    if os.environ.get("TRITON_INTERPRET") == "1" and "triton" in sys.modules:
        raise RuntimeError("the compile check needs compiled Triton: run it without TRITON_INTERPRET=1")
    shapes = [Shape(tokens=tokens, head_dim=d, dtype=t) for d in head_dims for t in dtypes]
    tasks = [(target, method, shapes, tuple(phases)) for target in targets for method in methods]
    workers = workers or min(len(tasks), os.cpu_count() or 1)
    import multiprocessing

    # one task per process: autotuners remember the configuration they picked, and a second target must not inherit it
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(workers, mp_context=context, max_tasks_per_child=1) as pool:
        return [report for reports in pool.map(_record_task, tasks) for report in reports]


# -- the budget ------------------------------------------------------------------------------------------------------


def violations(reports: list[KernelReport]) -> list[str]:
    """What breaks the budget, in our kernels (fla's are only compared): a compile error; shared memory or
    registers beyond the target's; spills past SPILL_BUDGET anywhere, or any spill in a forward or decode kernel on
    sm_90 at head dim 128; a register collapse (32 registers with spills); in a half-precision workload, a dot that
    misses the tensor cores or multiplies fp32 (tf32) operands."""
    found = []
    for r in reports:
        if r.method.startswith("fla-"):
            continue
        where = f"{r.target} {r.kernel} ({r.method} {r.phase} {r.direction}, D={r.head_dim} {r.dtype}, {r.config})"
        if r.error:
            found.append(f"{where}: {r.error}")
            continue
        if r.shared > r.shared_limit:
            found.append(f"{where}: {r.shared} B of shared memory > {r.shared_limit} B")
        if r.registers * r.warps * 32 > TARGETS_BY_NAME[r.target].registers:
            found.append(f"{where}: {r.registers} registers x {r.warps * 32} threads > the block's register file")
        if r.spill_stores > SPILL_BUDGET:
            found.append(f"{where}: {r.spill_stores} B of spill stores > {SPILL_BUDGET} B")
        strict = r.target == STRICT_TARGET and r.head_dim == STRICT_HEAD_DIM and r.direction == "forward"
        if strict and r.spill_stores:
            found.append(f"{where}: a forward or decode kernel spills ({r.spill_stores} B) on {r.target}")
        if r.registers <= 32 and r.spill_stores:
            found.append(f"{where}: register collapse ({r.registers} registers, {r.spill_stores} B spilled)")
        if r.has_dot and r.dtype in ("bf16", "fp16"):
            model = "bf16" if r.dtype == "bf16" else "f16"
            if model not in r.mma.split(" ")[-1].split("+"):
                found.append(f"{where}: no {r.dtype} tensor-core instruction ({r.mma or 'no MMA at all'})")
            elif "tf32" in r.mma:
                found.append(f"{where}: a dot multiplies fp32 operands on tensor cores (tf32)")
    return found


TARGETS_BY_NAME = {t.name: t for t in TARGETS.values()}


# -- output ----------------------------------------------------------------------------------------------------------


def markdown_table(reports: list[KernelReport]) -> str:
    header = (
        "| target | kernel | file:line | method | phase | D | dtype | config | warps/stages | shared B (of limit) "
        "| regs | spill st/ld B | MMA |"
    )
    lines = [header, "|" + "---|" * (header.count("|") - 1)]
    for r in reports:
        if r.error:
            lines.append(
                f"| {r.target} | `{r.kernel}` | {r.location} | {r.method} | {r.phase} {r.direction} | {r.head_dim} "
                f"| {r.dtype} | {r.config} | | **{r.error}** | | | |"
            )
            continue
        share = 100 * r.shared / r.shared_limit
        shared = f"{r.shared:,} ({share:.0f}%)" + (" **over**" if r.shared > r.shared_limit else "")
        spills = f"{r.spill_stores:,} / {r.spill_loads:,}" if r.spill_stores or r.spill_loads else "0"
        mma = r.mma or ("**none**" if r.has_dot else "no dot")
        lines.append(
            f"| {r.target} | `{r.kernel}` | {r.location} | {r.method} | {r.phase} {r.direction} | {r.head_dim} "
            f"| {r.dtype} | {r.config} | {r.warps}/{r.stages} | {shared} | {r.registers} | {spills} | {mma} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m linearize.kernels.compile_check",
        description="Compile every Triton kernel the ops launch for A100 (sm_80) and H100/H200 (sm_90) without a "
        "GPU; print shared memory, registers, spills and tensor-core use; exit 1 when a kernel breaks the budget.",
    )
    parser.add_argument("--targets", default="sm80,sm90", help="comma-separated: sm80, sm90 (default both)")
    parser.add_argument("--methods", default=",".join(WORKLOADS),
                        help=f"comma-separated workloads: {', '.join(WORKLOADS | FLA_WORKLOADS)}")  # fmt: skip
    parser.add_argument("--head-dims", default="128", help="comma-separated head dims (default 128)")
    parser.add_argument("--dtypes", default="bf16", help="comma-separated model dtypes: bf16, fp16, fp32")
    parser.add_argument("--phases", default=",".join(PHASES), help="comma-separated: train, prefill, decode")
    parser.add_argument("--tokens", type=int, default=8192, help="sequence length of train and prefill (8192)")
    parser.add_argument("--workers", type=int, default=None, help="processes compiling at once (default: CPUs)")
    parser.add_argument("--markdown", type=Path, help="also write the table to this Markdown file")
    parser.add_argument("--json", type=Path, help="also write every report as JSON")
    args = parser.parse_args(argv)

    def split(text):
        return tuple(x.strip() for x in text.split(",") if x.strip())

    for name, values, known in (
        ("--targets", split(args.targets), TARGETS),
        ("--methods", split(args.methods), WORKLOADS | FLA_WORKLOADS),
        ("--dtypes", split(args.dtypes), DTYPES),
        ("--phases", split(args.phases), PHASES),
    ):
        unknown = [v for v in values if v not in known]
        if unknown:
            parser.error(f"{name}: unknown {', '.join(unknown)}; choose from {', '.join(known)}")
    reports = check(
        split(args.targets), split(args.methods), tuple(int(d) for d in split(args.head_dims)), split(args.dtypes),
        split(args.phases), args.tokens, args.workers,
    )  # fmt: skip
    table = markdown_table(reports)
    print(table)
    if args.markdown:
        args.markdown.write_text(table)
    if args.json:
        args.json.write_text(json.dumps([dataclasses.asdict(r) for r in reports], indent=1))
    found = violations(reports)
    for line in found:
        print(f"over budget: {line}", file=sys.stderr)
    print(f"{len(reports)} kernel configurations compiled, {len(found)} over budget", file=sys.stderr)
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
