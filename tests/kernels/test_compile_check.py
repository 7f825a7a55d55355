"""The compile check (`linearize.kernels.compile_check`): its parsing and budget rules on known inputs, shared-memory
pruning against an offline target, and the CI run itself: every kernel our ops define compiles for A100 (sm_80) and
H100/H200 (sm_90) at head dim 128 in bf16, on the training and decode paths of every method, within the budget.

The CI run compiles for real GPU targets, so it needs compiled Triton: it runs in a subprocess without the
interpreter that the rest of the test session uses.
"""

import json
import os
import subprocess
import sys

import pytest
import triton
from linearize.kernels import compile_check
from linearize.kernels.common.launch import fitting, max_shared_memory
from linearize.kernels.compile_check import (
    TARGETS,
    KernelReport,
    OfflineDriver,
    defined_kernels,
    parse_ptxas_log,
    tensor_core_instructions,
    violations,
)

PTXAS_LOG = """\
ptxas info    : 11 bytes gmem
ptxas info    : Compiling entry function 'parallax_decode_kernel' for 'sm_90a'
ptxas info    : Function properties for parallax_decode_kernel
    48 bytes stack frame, 36 bytes spill stores, 40 bytes spill loads
ptxas info    : Used 168 registers, used 1 barriers
ptxas info    : Compile time = 180.534 ms
"""


def test_parse_ptxas_log():
    assert parse_ptxas_log(PTXAS_LOG) == (168, 36, 40)
    with pytest.raises(ValueError, match="one entry function"):
        parse_ptxas_log("ptxas info    : 11 bytes gmem\n")


def test_tensor_core_instructions_name_their_operands():
    assert tensor_core_instructions("wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 {%r1}") == "wgmma bf16"
    ptx = "mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 a; mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 b"
    assert tensor_core_instructions(ptx) == "mma f16+tf32"
    assert tensor_core_instructions("fma.rn.f32 %f1, %f2, %f3, %f4;") == ""


def _report(**fields) -> KernelReport:
    defaults = dict(
        target="sm_90", kernel="k", location="kernels/x.py:1", method="window", phase="train", direction="forward",
        head_dim=128, dtype="bf16", config="", warps=4, stages=2, shared=1000, shared_limit=232_448, registers=128,
        mma="wgmma bf16", has_dot=True,
    )  # fmt: skip
    return KernelReport(**(defaults | fields))


@pytest.mark.parametrize(
    "fields, finding",
    [
        ({"error": "CompilationError: at 3:4 bad"}, "CompilationError"),
        ({"shared": 240_000}, "shared memory"),
        ({"registers": 255, "warps": 16}, "register file"),
        ({"direction": "backward", "spill_stores": 4096}, "spill stores"),
        ({"spill_stores": 8}, "forward or decode kernel spills"),
        ({"registers": 32, "spill_stores": 8, "direction": "backward"}, "register collapse"),
        ({"mma": ""}, "no bf16 tensor-core instruction"),
        ({"mma": "wgmma tf32"}, "no bf16 tensor-core instruction"),
        ({"mma": "mma bf16+tf32"}, "fp32 operands"),
    ],
)
def test_each_budget_rule(fields, finding):
    found = violations([_report(**fields)])
    assert len(found) >= 1 and any(finding in line for line in found), found


def test_within_budget_and_exemptions():
    fine = [
        _report(),
        _report(direction="backward", spill_stores=1024),  # backward kernels may spill a little
        _report(target="sm_80", spill_stores=512, shared_limit=166_912),  # strictness is for sm_90 at D = 128
        _report(head_dim=64, spill_stores=512),
        _report(dtype="fp32", mma=""),  # an fp32 model multiplies exactly, off the tensor cores
        _report(has_dot=False, mma=""),
        _report(method="fla-gla", spill_stores=50_000),  # fla's kernels are compared, not judged
    ]
    assert violations(fine) == []


def test_pruning_keeps_the_configurations_that_fit_the_device(monkeypatch):
    from triton.runtime import driver

    configs = [triton.Config({"BLOCK": block}, num_stages=3) for block in (32, 64, 128)]

    def estimate(args):
        return args["BLOCK"] * 1000 * args["num_stages"]  # 96 KB, 192 KB, 384 KB

    prune = fitting(estimate)
    if max_shared_memory() is None:  # no device answers (Triton's interpreter): nothing to prune against
        assert prune(configs, {}) == configs
    monkeypatch.setattr(driver, "_active", OfflineDriver(TARGETS["sm80"]))
    assert max_shared_memory() == 166_912
    assert [c.kwargs["BLOCK"] for c in prune(configs, {})] == [32]
    monkeypatch.setattr(driver, "_active", OfflineDriver(TARGETS["sm90"]))
    assert [c.kwargs["BLOCK"] for c in prune(configs, {})] == [32, 64]
    huge = [triton.Config({"BLOCK": 1024}, num_stages=3), triton.Config({"BLOCK": 512}, num_stages=3)]
    assert [c.kwargs["BLOCK"] for c in prune(huge, {})] == [512]  # none fits: the smallest, not nothing


def test_pruning_drops_the_excluded_configurations_first(monkeypatch):
    from triton.runtime import driver

    configs = [triton.Config({"BLOCK": block}, num_warps=warps) for block, warps in ((64, 4), (64, 8), (32, 4))]

    def excluded(args):
        return args["GATED"] and (args["BLOCK"], args["num_warps"]) == (64, 4)

    prune = fitting(lambda args: 0, excluded)
    monkeypatch.setattr(driver, "_active", OfflineDriver(TARGETS["sm90"]))
    assert [(c.kwargs["BLOCK"], c.num_warps) for c in prune(configs, {}, GATED=True)] == [(64, 8), (32, 4)]
    assert prune(configs, {}, GATED=False) == configs


@pytest.mark.parametrize("target", ["sm80", "sm90"])
def test_gated_chunk_states_leave_out_64x64_tiles_on_4_warps(monkeypatch, target):
    """With a gate, that configuration sits at the register limit: under triton 3.6 (the GPU machines') it spills in
    prefill and decode (an initial and a final state) on sm_80 and sm_90, which share the tuning key with training.
    Without a gate (STILL) it takes half the registers and stays."""
    from linearize.kernels.common.chunk_state import chunk_state_fwd_kernel
    from triton.runtime import driver

    monkeypatch.setattr(driver, "_active", OfflineDriver(TARGETS[target]))
    prune = chunk_state_fwd_kernel.early_config_prune

    def tried(gated):
        kept = prune(chunk_state_fwd_kernel.configs, {"k": None, "v": None}, BT=64, HAS_GATE=gated)
        return {(c.kwargs["BK"], c.kwargs["BV"], c.num_warps) for c in kept}

    assert (64, 64, 4) not in tried(True) and (64, 64, 8) in tried(True)
    assert (64, 64, 4) in tried(False)


@pytest.mark.compile
def test_every_kernel_compiles_for_a100_and_h100_within_budget(tmp_path):
    """The CI subset: sm_80 and sm_90, head dim 128, bf16, the training and decode paths of every method."""
    out = tmp_path / "reports.json"
    env = {name: value for name, value in os.environ.items() if name != "TRITON_INTERPRET"}
    command = [sys.executable, "-m", "linearize.kernels.compile_check", "--phases", "train,decode", "--json", str(out)]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-5000:]
    reports = [KernelReport(**r) for r in json.loads(out.read_text())]
    assert violations(reports) == []
    for target in TARGETS.values():
        compiled = {r.kernel for r in reports if r.target == target.name}
        assert compiled == defined_kernels(), f"{target.name}: never launched: {defined_kernels() - compiled}"
    assert {r.method for r in reports} == set(compile_check.WORKLOADS)
