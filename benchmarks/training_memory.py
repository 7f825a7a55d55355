"""Peak memory of one fine-tuning step of each method against the original with LoRA (the fair control), for both
kinds of stage, on the torch path (fp32, CPU).

    python benchmarks/training_memory.py [--methods original,liger,liger-gla,still,swa,parallax]
        [--seq-lens 512,2048,4096] [--layers 2] [--gradient-checkpointing]

The model has the embedded SmolLM2-135M's shapes (hidden 576, 9 heads of 64, 3 KV heads, MLP 1536) with `--layers`
layers and a 2048-token vocabulary, so that the logits do not hide the attention; random weights, as memory does
not depend on them. Each row is one fresh process: the model converted with the recipes' settings, LoRA (r 8) on
q/k/v/o, AdamW over what the stage trains (`lora` stage: the adapters and the method's parameters; attention
transfer: those of the converted layers but o_proj), one step to create the optimizer state, then one step (forward,
backward, optimizer step) under `torch.profiler.profile(profile_memory=True)`: `peak` is the most the step's
allocations held at once beyond what was allocated before it. `saved` is what a `lora` stage's forward keeps for
backward (every tensor autograd saves, weights excluded, each storage once), the activation memory. Attention
transfer back-propagates layer by layer inside the forward (`linearize.training.transfer`), so it saves nothing
across layers; Parallax without a window is exact at conversion and has no transfer stage.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

METHODS = {
    "original": None,
    "liger": ("liger", {"window": 64, "sinks": 4, "mix": 0.9}),  # recipes/smollm2-135m-liger.yaml
    "liger-gla": ("liger-gla", {}),
    "still": ("still", {"chunk_size": 64, "topk": 8}),  # recipes/smollm2-135m-still.yaml
    "swa": ("swa", {}),
    "parallax": ("parallax", {"probe_rank": 8}),  # recipes/smollm2-135m-parallax.yaml
}
STAGES = ("lora", "attention_transfer")


def build(method: str, layers: int, stage: str):
    """The model with LoRA and the parameters `stage` trains, as the trainer sets them."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, LlamaConfig

    from linearize.convert import convert_model, plan_conversion
    from linearize.layers.base import LinearizedAttention
    from linearize.training.checks import transfer_trains

    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=576, intermediate_size=1536, num_hidden_layers=layers, num_attention_heads=9,
        num_key_value_heads=3, head_dim=64, vocab_size=2048, max_position_embeddings=8192, tie_word_embeddings=True,
    )  # fmt: skip
    model = AutoModelForCausalLM.from_config(config)
    source_names = {name for name, _ in model.named_parameters()}
    if METHODS[method] is not None:
        name, options = METHODS[method]
        model = convert_model(model, plan_conversion(model.config, "llama", name, **options).config)
    new = {name for name, _ in model.named_parameters()} - source_names
    targets = ["q_proj", "k_proj", "v_proj", "o_proj"]
    model = get_peft_model(model.train(), LoraConfig(r=8, lora_alpha=16, target_modules=targets))
    attention = [f"{name}." for name, m in model.named_modules() if isinstance(m, LinearizedAttention)]
    params = []
    for name, p in model.named_parameters():
        train = "lora_" in name or any(name.endswith(n) for n in new)
        if stage == "attention_transfer":
            train = train and any(transfer_trains(name, layer) for layer in attention)
        p.requires_grad_(train)
        if train:
            params.append(p)
    return model, params


def measure(method: str, stage: str, seq_len: int, layers: int, checkpointing: bool) -> dict:
    import torch
    from torch.profiler import ProfilerActivity, profile

    from linearize.compat import set_activation_checkpointing
    from linearize.training.transfer import AttentionTransfer

    model, params = build(method, layers, stage)
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    if checkpointing and stage == "lora":  # as the trainer: attention transfer holds one layer's graph anyway
        set_activation_checkpointing(model, enabled=True)
    ids = torch.randint(3, 2048, (1, seq_len), generator=torch.Generator().manual_seed(0))

    def step() -> None:
        if stage == "attention_transfer":
            with AttentionTransfer(model):
                model(input_ids=ids, use_cache=False, logits_to_keep=1)
        else:
            model(input_ids=ids, labels=ids, use_cache=False).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step()  # the optimizer's state, which every later step holds
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    held = peak = 0
    for event in sorted(events, key=lambda e: e.start_ns()):
        held += event.nbytes()
        peak = max(peak, held)

    saved = {}
    if stage == "lora":
        weights = {p.untyped_storage().data_ptr() for p in model.parameters()}

        def keep(t: torch.Tensor) -> torch.Tensor:
            storage = t.untyped_storage()
            if storage.data_ptr() not in weights:
                saved[storage.data_ptr()] = storage.nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t):
            model(input_ids=ids, labels=ids, use_cache=False)
    return {"method": method, "stage": stage, "seq_len": seq_len, "peak_mib": peak / 2**20,
            "saved_mib": sum(saved.values()) / 2**20 if saved else None}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--seq-lens", default="512,2048,4096")
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # method,stage,seq_len: one measurement, in a child process
    args = parser.parse_args()
    if args.one:
        method, stage, seq_len = args.one.split(",")
        print(json.dumps(measure(method, stage, int(seq_len), args.layers, args.gradient_checkpointing)))
        return
    methods, lengths = args.methods.split(","), [int(n) for n in args.seq_lens.split(",")]
    rows = {}
    for stage in STAGES:
        for method in methods:
            if stage == "attention_transfer" and method in ("original", "parallax"):
                continue  # nothing to transfer
            for seq_len in lengths:
                command = [sys.executable, __file__, "--one", f"{method},{stage},{seq_len}", f"--layers={args.layers}"]
                command += ["--gradient-checkpointing"] if args.gradient_checkpointing else []
                child = subprocess.run(command, capture_output=True, text=True)
                if child.returncode:  # its output is captured: pass on why it failed
                    raise SystemExit(f"{method} {stage} {seq_len} failed:\n{child.stderr[-3000:]}")
                rows[method, stage, seq_len] = json.loads(child.stdout.strip().splitlines()[-1])
    header = " | ".join(f"T = {n}" for n in lengths)
    print(f"| stage | method | {header} |\n|---|---|" + "---|" * len(lengths))
    for method, stage in dict.fromkeys((method, stage) for method, stage, _ in rows):
        cells = []
        for n in lengths:
            row = rows[method, stage, n]
            saved = f" ({row['saved_mib']:.0f} saved)" if row["saved_mib"] is not None else ""
            cells.append(f"{row['peak_mib']:.0f}{saved}")
        print(f"| {stage} | {method} | {' | '.join(cells)} |")


if __name__ == "__main__":
    main()
