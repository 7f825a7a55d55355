"""The full compile table of our Triton kernels, beside flash-linear-attention's for the same computations.

    python benchmarks/kernel_resources.py                       # writes docs/kernel-resources.md
    python benchmarks/kernel_resources.py --no-fla --head-dims 128 --markdown /tmp/table.md

Every launch of every method (training, prefill and decode; B=1, T=8192, 32 query / 8 KV heads) is compiled for
A100 (sm_80) and H100/H200 (sm_90), at head dims 64 and 128, in bf16 and fp16, with `linearize.kernels.compile_check`
(no GPU needed). fla's chunk_gla (the computation of our GLA op, and so of Liger's linear branch) and its parallax op
are compiled the same way (at head dim 128 in bf16 unless told), every configuration their autotuners would try on
that target, for the comparison the budget asks for: our backward kernels spill no more than theirs. The page lists,
per kernel, the worst configuration (spills, then shared memory), fla's against ours, and every budget violation.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import sys
from collections import defaultdict
from pathlib import Path

import triton
from linearize.kernels.compile_check import (
    FLA_WORKLOADS,
    PHASES,
    SPILL_BUDGET,
    TARGETS,
    WORKLOADS,
    KernelReport,
    check,
    markdown_table,
    violations,
)

ROOT = Path(__file__).resolve().parents[1]


def worst_per_kernel(reports: list[KernelReport]) -> list[KernelReport]:
    """Per (target, head dim, dtype, kernel, direction): the configuration with the most spills, then the most
    shared memory — what decides whether every configuration the autotuner may pick is safe."""
    worst: dict[tuple, KernelReport] = {}
    for r in reports:
        key = (r.target, r.head_dim, r.dtype, r.kernel, r.direction)
        if key not in worst or (r.spill_stores, r.shared) > (worst[key].spill_stores, worst[key].shared):
            worst[key] = r
    return sorted(worst.values(), key=lambda r: (r.target, r.head_dim, r.dtype, r.method, r.direction, r.kernel))


def comparison(ours: list[KernelReport], fla: list[KernelReport]) -> str:
    """Spills and shared memory of the same computation, ours against fla's, per target, head dim and dtype."""
    pairs = {"fla-gla": ("gla", "chunk_gla"), "fla-parallax": ("parallax", "parallax")}
    lines = [
        "| target | D | dtype | computation | direction | ours: max spill B, kernels | fla: max spill B (best config "
        "per kernel), kernels | ours ≤ fla |",
        "|---|---|---|---|---|---|---|---|",
    ]
    group = defaultdict(list)
    for r in ours + fla:
        group[(r.target, r.head_dim, r.dtype, r.method, r.direction)].append(r)
    for fla_method, (our_method, name) in pairs.items():
        for target in sorted({r.target for r in fla}):
            for head_dim in sorted({r.head_dim for r in fla}):
                for dtype in sorted({r.dtype for r in fla}):
                    for direction in ("forward", "backward"):
                        mine = [
                            r for r in group[(target, head_dim, dtype, our_method, direction)] if r.phase == "train"
                        ]
                        theirs = group[(target, head_dim, dtype, fla_method, direction)]
                        if not mine or not theirs:
                            continue
                        # fla's autotuner picks one configuration per kernel: credit it with its best one
                        best = defaultdict(lambda: float("inf"))
                        for r in theirs:
                            if not r.error:
                                best[r.kernel] = min(best[r.kernel], r.spill_stores)
                        our_max = max(r.spill_stores for r in mine)
                        their_max = max(best.values()) if best else float("nan")
                        lines.append(
                            f"| {target} | {head_dim} | {dtype} | {name} | {direction} | {our_max:,}, "
                            f"{len({r.kernel for r in mine})} | {their_max:,}, {len(best)} | "
                            f"{'yes' if our_max <= their_max else '**no**'} |"
                        )
    return "\n".join(lines) + "\n"


def summary(reports: list[KernelReport]) -> str:
    """One line: configurations, kernels, how many go over shared memory, spill, and the worst spill."""
    spilling = [r for r in reports if r.spill_stores]
    worst = max(spilling, key=lambda r: r.spill_stores, default=None)
    line = (
        f"{len(reports)} configurations of {len({r.kernel for r in reports})} kernels; "
        f"{sum(r.shared > r.shared_limit for r in reports)} over shared memory; {len(spilling)} spill"
    )
    if worst:
        line += f", at most {worst.spill_stores:,} B ({worst.target} `{worst.kernel}`, {worst.registers} registers)"
    return line + "."


def load_reports(path: Path) -> list[KernelReport]:
    """Reports written by `python -m linearize.kernels.compile_check --json PATH` (at any commit)."""
    fields = {f.name for f in dataclasses.fields(KernelReport)}
    return [KernelReport(**{k: v for k, v in row.items() if k in fields}) for row in json.loads(path.read_text())]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--head-dims", default="64,128")
    parser.add_argument("--dtypes", default="bf16,fp16")
    parser.add_argument("--no-fla", action="store_true", help="skip fla's kernels")
    parser.add_argument("--fla-head-dims", default="128", help="fla autotunes many configurations: compile fewer")
    parser.add_argument("--fla-dtypes", default="bf16")
    parser.add_argument("--before", type=Path, help="a compile_check --json file of an earlier commit, to compare")
    parser.add_argument("--before-label", default="before", help="what --before measured, e.g. a commit")
    parser.add_argument("--workers", type=int, default=None)
    parser.add_argument("--markdown", type=Path, default=ROOT / "docs" / "kernel-resources.md")
    args = parser.parse_args()
    head_dims = tuple(int(d) for d in args.head_dims.split(","))
    dtypes = tuple(args.dtypes.split(","))
    targets = tuple(TARGETS)

    ours = check(targets, tuple(WORKLOADS), head_dims, dtypes, PHASES, workers=args.workers)
    fla = []
    if not args.no_fla:
        fla_head_dims = tuple(int(d) for d in args.fla_head_dims.split(","))
        fla_dtypes = tuple(args.fla_dtypes.split(","))
        fla = check(targets, tuple(FLA_WORKLOADS), fla_head_dims, fla_dtypes, ("train",), workers=args.workers)
    found = violations(ours)
    page = [
        "# Kernel resources on A100 and H100/H200, compiled without a GPU",
        "",
        f"Written by `python benchmarks/kernel_resources.py` on {datetime.date.today()} with triton "
        f"{triton.__version__} (its bundled ptxas; another release allocates registers a little differently). "
        f"Shapes: B=1, T=8192, 32 query / 8 KV heads, head dims {', '.join(map(str, head_dims))}, "
        f"{', '.join(dtypes)}; targets sm_80 (A100, 166,912 B of shared memory per block) and sm_90 (H100/H200, "
        "232,448 B). Every configuration an autotuner may try on the target is compiled. "
        "`python -m linearize.kernels.compile_check` reruns any part; `tests/kernels/test_compile_check.py` runs "
        "sm_80 and sm_90 at head dim 128 in bf16 on every CI run.",
        "",
        "## Summary",
        "",
        f"- Now: {summary(ours)} {len(found)} over budget (budget: no compile error, shared memory and registers "
        "within the target's, no spill in a forward or decode kernel on sm_90 at head dim 128, at most "
        f"{SPILL_BUDGET:,} B of spill stores anywhere, no register collapse, every dot of a half-precision model "
        "on tensor cores with model-dtype operands).",
    ]
    before = load_reports(args.before) if args.before else []
    if before:
        shapes = sorted({(r.head_dim, r.dtype) for r in before})
        now = [r for r in ours if (r.head_dim, r.dtype) in shapes]
        where = ", ".join(f"D={d} {t}" for d, t in shapes)
        page += [
            f"- {args.before_label}, at {where}: {summary(before)}",
            f"- Now, at {where}: {summary(now)} {len(violations(now))} over budget.",
        ]
    if fla:
        page += [f"- flash-linear-attention (chunk_gla, parallax; every autotuner configuration): {summary(fla)}"]
    page.append("")
    if fla:
        page += ["## Against flash-linear-attention", "", comparison(ours, fla)]
    if found:
        page += ["## Over budget", ""] + [f"- {line}" for line in found] + [""]
    page += ["## Every kernel, its worst configuration", "", markdown_table(worst_per_kernel(ours))]
    if before:
        page += [f"## {args.before_label}: every kernel, its worst configuration", ""]
        page += [markdown_table(worst_per_kernel(before))]
    if fla:
        page += ["## flash-linear-attention's kernels, their worst configuration", ""]
        page += [markdown_table(worst_per_kernel(fla))]
    args.markdown.write_text("\n".join(page))
    print(f"wrote {args.markdown}: {len(ours)} configurations, {len(found)} over budget", file=sys.stderr)
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
