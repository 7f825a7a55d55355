"""GPU check for the attention kernels: correctness tests, then one table of timings and ratios.

    python benchmarks/gpu_check.py                 # on a CUDA machine: tests + timings at 2K, 8K, 32K
    python benchmarks/gpu_check.py --smoke         # anywhere: tiny shapes, torch backend, checks the script runs

Shapes are Llama-3-8B-like attention: 32 query heads, 8 KV heads, head dim 128, bf16, batch 1. Rows:
  - liger fused (ours): `liger_attention`, one op for both branches and the mix (fused Triton kernels on CUDA),
    as the layer runs prefill and training; its decode step is the fused `liger_decode` kernel;
  - liger unfused (ours): gated linear attention + 64-key sliding window as two of our ops (Triton where the op
    has a Triton kernel, else the torch path);
  - fla chunk_gla + window: flash-linear-attention's GLA kernel plus the same window op (when fla is installed);
  - still (ours): self-saliency scores, top-4-of-64 selection and the STILL attention, all three on the default
    backend (the Triton kernels on CUDA, the torch path elsewhere), with [softmax(x), softmax(-x)] standing in for
    the NP-Map features (the map's per-head matmul is not timed); its decode step is the layer's own, against a
    cache filled by a T-token prefill (T/16 salient tokens per head, the two raw chunks and the linear state);
  - still torch (ours): the same three ops on the blockwise torch path (CUDA only, next to the Triton row);
  - parallax (ours): `parallax_attention` with a probe r = 0.05 q (both score products, all four accumulators; the
    Triton kernels on CUDA); its decode step is `parallax_decode` against the T-token KV cache;
  - sdpa causal: full causal softmax attention (`scaled_dot_product_attention`), the original layer's cost.
Columns: forward, forward+backward (ms) and one decode step at that context (ms), each with its ratio to
sdpa. A second table times one decode step of Parallax and sdpa at batch 1 and 32 against 4K and 16K caches.
Keep the whole script under 8 minutes: it prints as it goes, so a cut-off run still reports.
"""

from __future__ import annotations

import argparse
import functools
import platform
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

WINDOW = 64


def timer(device: str):
    if device == "cuda":
        from triton.testing import do_bench

        return lambda fn: do_bench(fn, warmup=5, rep=20)

    def cpu_bench(fn):
        fn()
        start = time.perf_counter()
        fn()
        return 1000 * (time.perf_counter() - start)

    return cpu_bench


def inputs(T: int, H: int, Hkv: int, D: int, dtype, device, grad: bool):
    def make(*shape):
        return torch.randn(*shape, dtype=dtype, device=device).requires_grad_(grad)

    q, k, v = make(1, T, H, D), make(1, T, Hkv, D), make(1, T, Hkv, D)
    gate = F.logsigmoid(torch.randn(1, T, Hkv, D, device=device) * 4).div(16).requires_grad_(grad)
    return q, k, v, gate


def liger_unfused(q, k, v, gate, linear_backend=None):
    from linearize.kernels import gated_linear_attention, sliding_window_attention

    q_lin, k_lin = q.float().softmax(-1), k.float().softmax(-1)
    o_linear, _ = gated_linear_attention(q_lin, k_lin, v.float(), gate, backend=linear_backend)
    o_window = sliding_window_attention(q, k, v, window=WINDOW)
    return 0.5 * o_window.float() + 0.5 * o_linear


def liger_fused(q, k, v, gate):
    from linearize.kernels.liger import liger_attention

    q_lin, k_lin = q.float().softmax(-1), k.float().softmax(-1)
    o, _ = liger_attention(q_lin, k_lin, v.float(), gate, q, k, window=WINDOW)
    return o


def still(q, k, v, gate=None, backend=None):
    from linearize.kernels.still import select_salient, self_saliency, still_attention

    groups = q.shape[2] // k.shape[2]
    scores = self_saliency(q, k, window=64, backend=backend)
    salient = select_salient(scores, chunk_size=64, topk=4, backend=backend)

    def features(x):
        return torch.cat([x.float().softmax(-1), (-x.float()).softmax(-1)], dim=-1)

    k_feat = features(k.repeat_interleave(groups, dim=2))
    gate = torch.sigmoid(q.float())
    return still_attention(q, k, v, features(q), k_feat, gate, salient, chunk_size=64, backend=backend)


def still_decode_step(T: int, H: int, Hkv: int, D: int, dtype, device):
    """The STILL layer's decode step after a T-token prefill (projections included, as in the model)."""
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    from linearize.convert import plan_conversion
    from linearize.families import get_family
    from linearize.layers.still import StillAttention

    source = LlamaConfig(
        hidden_size=H * D, num_attention_heads=H, num_key_value_heads=Hkv, num_hidden_layers=1,
        intermediate_size=64, vocab_size=128, max_position_embeddings=T + 16,
    )  # fmt: skip
    config = plan_conversion(source, "llama", "still").config
    layer = StillAttention(config, 0, get_family("llama")).to(device=device, dtype=dtype)
    layer.init_new_parameters(torch.device(device), dtype)
    rotary = LlamaRotaryEmbedding(source).to(device)
    cache = StillAttention.cache_layer(config)
    x = torch.randn(1, T + 1, H * D, dtype=dtype, device=device)
    positions = torch.arange(T + 1, device=device)[None]
    cos, sin = rotary(x, positions)
    with torch.no_grad():
        layer(x[:, :T], position_embeddings=(cos[:, :T], sin[:, :T]), cache=_OneLayer(cache))

    def step():
        with torch.no_grad():
            saved = {name: getattr(cache, name) for name in cache._tensor_fields}
            layer(x[:, T:], position_embeddings=(cos[:, T:], sin[:, T:]), cache=_OneLayer(cache))
            for name, value in saved.items():  # every timed step starts from the same cache
                setattr(cache, name, value)

    return step


class _OneLayer:
    def __init__(self, layer):
        self.layers = [layer]


def fla_installed() -> bool:
    try:
        import fla.ops.gla  # noqa: F401
    except ImportError:
        return False
    return True


def sdpa(q, k, v, gate=None, causal=True):
    # one query against a cache is not causal-masked: torch aligns a causal mask to the top-left corner
    out = F.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=causal, enable_gqa=True
    )
    return out.transpose(1, 2)


def parallax(q, k, v, gate=None):
    from linearize.kernels.parallax import parallax_attention

    return parallax_attention(q, 0.05 * q, k, v)  # a probe that depends on q, so the backward computes dr


def decode_step(name: str, T: int, H: int, Hkv: int, D: int, dtype, device):
    """One token against a context of T: returns a callable, or None when the row has no decode path.

    Liger's decode cost does not depend on T (a D x D state per KV head and a 64-key window); sdpa's does.
    """
    from linearize.kernels.liger import liger_decode
    from linearize.kernels.parallax import parallax_decode

    if name == "still (ours)":
        return still_decode_step(T, H, Hkv, D, dtype, device)
    q = torch.randn(1, 1, H, D, dtype=dtype, device=device)
    if name == "parallax (ours)":
        k = torch.randn(1, T + 1, Hkv, D, dtype=dtype, device=device)
        return lambda: parallax_decode(q[:, 0], 0.05 * q[:, 0], k, k, None)
    if name == "sdpa causal":
        k = torch.randn(1, T + 1, Hkv, D, dtype=dtype, device=device)
        return lambda: sdpa(q, k, k, causal=False)
    if name != "liger fused (ours)":
        return None
    q_lin, k_lin = torch.rand(1, H, D, device=device), torch.rand(1, Hkv, D, device=device)
    v = torch.randn(1, Hkv, D, dtype=dtype, device=device)
    gate = torch.full((1, Hkv, D), -0.05, device=device)
    state = torch.randn(1, Hkv, D, D, device=device)
    window = torch.randn(1, WINDOW, Hkv, D, dtype=dtype, device=device)
    valid = torch.ones(1, WINDOW, dtype=torch.bool, device=device)
    return lambda: liger_decode(q_lin, k_lin, v, gate, state, q[:, 0], window, window, valid)


def decode_sweep(bench, batches, lengths, H, Hkv, D, dtype, device) -> None:
    """One decode step of Parallax and of sdpa per (batch, cache length), and their ratio."""
    from linearize.kernels.parallax import parallax_decode

    print(f"\n{'batch':>6} {'cache':>7} {'sdpa ms':>9} {'parallax ms':>12} {'parallax vs sdpa':>17}", flush=True)
    for B in batches:
        for L in lengths:
            q, r = torch.randn(2, B, H, D, dtype=dtype, device=device)
            k, v = torch.randn(2, B, L, Hkv, D, dtype=dtype, device=device)
            base = bench(functools.partial(sdpa, q[:, None], k, v, causal=False))
            ours = bench(functools.partial(parallax_decode, q, r, k, v, None))
            print(f"{B:>6} {L:>7} {base:>9.3f} {ours:>12.3f} {ours / base:>16.2f}x", flush=True)
            if device == "cuda":
                torch.cuda.empty_cache()


def time_row(bench, fn, T, H, Hkv, D, dtype, device) -> tuple[float, float]:
    """Forward and forward+backward time (ms) of one path at length T."""
    q, k, v, gate = inputs(T, H, Hkv, D, dtype, device, grad=False)
    fwd = bench(lambda: fn(q, k, v, gate))
    q, k, v, gate = inputs(T, H, Hkv, D, dtype, device, grad=True)
    do = torch.randn_like(fn(q, k, v, gate))
    return fwd, bench(lambda: fn(q, k, v, gate).backward(do))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="tiny shapes on the current device, no tests")
    parser.add_argument("--lengths", default="2048,8192,32768")
    parser.add_argument("--skip-tests", action="store_true")
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    import transformers

    print(
        f"python {platform.python_version()}, torch {torch.__version__}, transformers {transformers.__version__}, "
        f"device {torch.cuda.get_device_name() if device == 'cuda' else 'cpu'}",
        flush=True,
    )
    if device == "cuda":
        import triton

        print(f"triton {triton.__version__}", flush=True)
    if not args.smoke and not args.skip_tests:
        result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-m", "triton", "tests/kernels"])
        print(f"kernel tests exit code {result.returncode}", flush=True)

    H, Hkv, D = (4, 2, 32) if args.smoke else (32, 8, 128)
    lengths = [128] if args.smoke else [int(x) for x in args.lengths.split(",")]
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    bench = timer(device)
    rows = {
        "sdpa causal": sdpa,
        "liger fused (ours)": liger_fused,
        "liger unfused (ours)": liger_unfused,
        "still (ours)": still,
        "parallax (ours)": parallax,
    }
    if device == "cuda":
        rows["still torch (ours)"] = lambda q, k, v, gate: still(q, k, v, backend="torch")
    if device == "cuda" and fla_installed():
        rows["fla chunk_gla + window"] = lambda q, k, v, gate: liger_unfused(q, k, v, gate, linear_backend="fla")

    print(
        f"\n{'T':>6} {'path':<24} {'fwd ms':>9} {'fwd+bwd ms':>11} {'decode ms':>10} {'fwd vs sdpa':>12} "
        f"{'f+b vs sdpa':>12}",
        flush=True,
    )
    for T in lengths:
        results = {}
        for name, fn in rows.items():
            fwd, both = time_row(bench, fn, T, H, Hkv, D, dtype, device)
            step = decode_step(name, T, H, Hkv, D, dtype, device)
            decode = bench(step) if step is not None else float("nan")
            results[name] = (fwd, both, decode)
            base = results.get("sdpa causal")
            ratio = f"{base[0] / fwd:>11.2f}x {base[1] / both:>11.2f}x" if base else f"{'':>12} {'':>12}"
            print(f"{T:>6} {name:<24} {fwd:>9.2f} {both:>11.2f} {decode:>10.3f} {ratio}", flush=True)
            if device == "cuda":
                torch.cuda.empty_cache()
    batches, caches = ((1, 2), (64,)) if args.smoke else ((1, 32), (4096, 16384))
    decode_sweep(bench, batches, caches, H, Hkv, D, dtype, device)


if __name__ == "__main__":
    main()
