"""Peak memory of one attention-transfer step against a plain forward pass and a LoRA (next-token) step.

    python benchmarks/transfer_memory.py [--seq-len 1024] [--method liger]

Each mode runs in a fresh process on the embedded model (fp32, CPU) with one sequence of `--seq-len` tokens and
reports the process's peak resident memory during the step (ru_maxrss, its high-water mark reset once the model is
loaded and converted) minus its resident memory then, i.e. what the step itself added. Attention transfer
back-propagates each layer's loss inside the forward pass, so it should sit near the forward pass, far below a step
that back-propagates through the whole model.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
from collections.abc import Callable

MODES = ("forward", "attention_transfer", "lora")


def _rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def run_mode(mode: str, seq_len: int, method: str) -> dict:
    import torch
    from peft import LoraConfig, get_peft_model

    from linearize import sources
    from linearize.convert import convert_model, plan_conversion
    from linearize.training.transfer import AttentionTransfer

    torch.manual_seed(0)
    source, _ = sources.load(None, dtype="float32")
    model = convert_model(source, plan_conversion(source.config, sources.EMBEDDED_NAME, method).config)
    del source
    model = get_peft_model(model.train(), LoraConfig(r=8, target_modules=["q_proj", "k_proj", "v_proj"]))
    ids = torch.randint(100, model.config.vocab_size, (1, seq_len))

    def step() -> None:
        if mode == "forward":
            with torch.no_grad():
                model(input_ids=ids, use_cache=False, logits_to_keep=1)
        elif mode == "attention_transfer":
            with AttentionTransfer(model, loss_scale=1.0):
                model(input_ids=ids, use_cache=False, logits_to_keep=1)
        else:
            model(input_ids=ids, labels=ids, use_cache=False).loss.backward()

    before, added = added_peak_mib(step)
    return {"mode": mode, "baseline_mib": before, "added_mib": added}


def added_peak_mib(step: Callable[[], None]) -> tuple[float, float]:
    """The resident memory before `step` and the most that `step` added to it, in MiB. The peak is reset first:
    the process's peak so far (loading the model) would otherwise stand in for any step that adds less."""
    before = _rss_mib()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets the peak resident memory (VmHWM, which ru_maxrss reads) to the current one (Linux)
    step()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB -> MiB on Linux
    return before, peak - before


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--method", default="liger")
    parser.add_argument("--mode", choices=MODES, help=argparse.SUPPRESS)  # one measurement, in a child process
    args = parser.parse_args()
    if args.mode:
        print(json.dumps(run_mode(args.mode, args.seq_len, args.method)))
        return
    rows = []
    for mode in MODES:
        command = [sys.executable, __file__, "--mode", mode, "--seq-len", str(args.seq_len), "--method", args.method]
        child = subprocess.run(command, capture_output=True, text=True)
        if child.returncode:  # its output is captured: pass on why it failed
            raise SystemExit(f"the {mode} measurement failed (exit status {child.returncode}):\n{child.stderr[-3000:]}")
        rows.append(json.loads(child.stdout.strip().splitlines()[-1]))
    print(f"peak memory added by one step, {args.method}, 1 x {args.seq_len} tokens, fp32 CPU")
    forward = rows[0]["added_mib"]
    for row in rows:
        print(f"{row['mode']:>20} | {row['added_mib']:8.0f} MiB | {row['added_mib'] / forward:5.2f}x forward")


if __name__ == "__main__":
    main()
