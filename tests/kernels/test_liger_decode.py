import linearize.kernels.liger as liger_mod
import pytest
import torch
import torch.nn.functional as F
from linearize.kernels.gla import naive_recurrent_gla
from linearize.kernels.liger import liger_attention, liger_decode, naive_liger_decode, torch_liger_decode
from linearize.kernels.window import naive_sliding_window_attention

from tests.kernels._close import BF16_RATIO, assert_close
from tests.kernels._devices import CUDA, INTERPRET, TRITON_DEVICE, needs_triton_device

# (B, H, Hkv, D, W); K = V = D. Batch row 0 sees its whole window, row 1 is left-padded, row 2 sees no key.
SHAPES = {
    "H4-Hkv2-D16-W5": (3, 4, 2, 16, 5),
    "H2-Hkv2-D16-W16": (3, 2, 2, 16, 16),
    "H4-Hkv2-D32-W16": (3, 4, 2, 32, 16),
    "H2-Hkv2-D32-W5": (3, 2, 2, 32, 5),
    "H4-Hkv2-D64-W16": (3, 4, 2, 64, 16),
    "H2-Hkv2-D64-W5": (3, 2, 2, 64, 5),
    "H6-Hkv2-D24-W7": (3, 6, 2, 24, 7),  # nothing a power of two: every mask matters
    "H2-Hkv1-D128-W5": (3, 2, 1, 128, 5),
}
# how the Triton path runs: (device, activation dtype, relative L2 tolerance): fp32, and bf16 activations (the log
# decay and the state stay fp32, as the layer passes them), whose output rounding needs a looser tolerance.
# only the runs this machine can do are collected, so nothing is reported as skipped
TRITON_RUNS = (
    [
        pytest.param("cpu", torch.float32, 1e-4, id="interpret-fp32"),
        pytest.param("cpu", torch.bfloat16, 2e-2, id="interpret-bf16"),
    ]
    if INTERPRET and not CUDA
    else []
) + (
    [
        pytest.param("cuda", torch.float32, 1e-4, id="cuda-fp32"),
        pytest.param("cuda", torch.bfloat16, 2e-2, id="cuda-bf16"),
    ]
    if CUDA
    else []
)


def _inputs(shape_id: str, seed: int = 0) -> dict:
    B, H, Hkv, D, W = SHAPES[shape_id]
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(shape, generator=gen)

    valid = torch.ones(B, W, dtype=torch.bool)
    valid[1, : W // 2] = False  # left padding: the oldest half of the window was never filled
    valid[2] = False  # nothing visible: the window branch must give zeros
    return {
        "q_lin": randn(B, H, D).softmax(-1),
        "k_lin": randn(B, Hkv, D).softmax(-1),
        "v": randn(B, Hkv, D),
        "g": F.logsigmoid(randn(B, Hkv, D) * 4) / 16,
        "state": randn(B, Hkv, D, D),
        "q_rot": randn(B, H, D),
        "window_k": randn(B, W, Hkv, D),
        "window_v": randn(B, W, Hkv, D),
        "window_valid": valid,
    }


def _check(ref: tuple, out: tuple, ratio: float = 1e-4) -> None:
    assert_close("o", ref[0], out[0], ratio)
    assert_close("new_state", ref[1], out[1], ratio)
    assert out[1].dtype == torch.float32


@pytest.mark.parametrize("shape_id", SHAPES)
def test_torch_matches_reference(shape_id):
    inputs = _inputs(shape_id)
    ref = naive_liger_decode(**inputs)
    out = torch_liger_decode(**inputs)
    _check(ref, out)
    assert out[0].dtype == torch.float32
    assert out[0][2].abs().sum() > 0  # the linear branch still speaks for the row that sees no window key


@pytest.mark.parametrize("shape_id", ["H4-Hkv2-D64-W16", "H2-Hkv1-D128-W5"])
def test_torch_bf16(shape_id):
    """bf16 activations (the log decay and the state fp32): the output within `BF16_RATIO` of the oracle on the same
    inputs in fp32, the fp32 state within fp32 rounding."""
    kept = ("g", "state", "window_valid")
    inputs = {name: x if name in kept else x.bfloat16() for name, x in _inputs(shape_id).items()}
    ref = naive_liger_decode(**{name: x if x.dtype == torch.bool else x.float() for name, x in inputs.items()})
    out = torch_liger_decode(**inputs)
    assert out[0].dtype == torch.bfloat16
    assert_close("o", ref[0], out[0].float(), BF16_RATIO)
    assert_close("new_state", ref[1], out[1])
    assert out[1].dtype == torch.float32


def _run_triton(
    inputs: dict, device: str, dtype: torch.dtype, tiles: dict | None = None, **kwargs
) -> tuple[tuple, tuple]:
    """(reference, Triton) results: activations cast to `dtype` (the log decay and the state stay fp32), and the
    reference run in fp32 on exactly those rounded values."""
    from linearize.kernels.liger.triton import triton_liger_decode

    inputs = {name: x if name in ("g", "state", "window_valid") else x.to(dtype) for name, x in inputs.items()}
    ref = naive_liger_decode(
        **{name: x if x.dtype == torch.bool else x.float() for name, x in inputs.items()}, **kwargs
    )
    out = triton_liger_decode(**{name: x.to(device) for name, x in inputs.items()}, **kwargs, **(tiles or {}))
    assert out[0].dtype == dtype and out[0].device.type == device
    return ref, tuple(x.cpu() for x in out)


@pytest.mark.triton
@pytest.mark.parametrize("device, dtype, ratio", TRITON_RUNS)
@pytest.mark.parametrize("shape_id", SHAPES)
def test_triton_matches_reference(shape_id, device, dtype, ratio):
    ref, out = _run_triton(_inputs(shape_id), device, dtype)
    _check(ref, out, ratio)
    if dtype == torch.float32:  # the fused kernel also agrees with the op-by-op path it replaces
        _check(torch_liger_decode(**_inputs(shape_id)), out, ratio)


@pytest.mark.triton
@pytest.mark.parametrize("device, dtype, ratio", TRITON_RUNS)
@pytest.mark.parametrize("block_d", [16, 32])
def test_triton_tiles_over_v_and_d(block_d, device, dtype, ratio):
    """Small tiles: four V tiles of the state and several head-dim tiles of the window scores."""
    ref, out = _run_triton(_inputs("H4-Hkv2-D64-W16", seed=1), device, dtype, dict(block_v=16, block_d=block_d))
    _check(ref, out, ratio)


@pytest.mark.triton
@pytest.mark.parametrize("device, dtype, ratio", TRITON_RUNS)
def test_triton_options_and_garbage_in_invalid_slots(device, dtype, ratio):
    """scale and mix reach the kernel; invalid window slots are never read, so even NaN there is harmless."""
    inputs = _inputs("H4-Hkv2-D16-W5", seed=2)
    inputs["window_k"][~inputs["window_valid"]] = float("nan")
    inputs["window_v"][~inputs["window_valid"]] = float("nan")
    for scale, mix in [(None, 0.5), (0.3, 0.25), (1.0, 1.0), (0.5, 0.0)]:
        ref, out = _run_triton(inputs, device, dtype, scale=scale, mix=mix)
        assert not ref[0].isnan().any()
        _check(ref, out, ratio)


@pytest.mark.triton
@pytest.mark.parametrize("device, dtype, ratio", TRITON_RUNS)
def test_triton_strided_inputs(device, dtype, ratio):
    """Views as a decode loop makes them: the window as the tail of a longer key cache, q and v sliced out of wider
    projections, the state a slice of a wider buffer."""
    from linearize.kernels.liger.triton import triton_liger_decode

    inputs = {name: x.to(device) for name, x in _inputs("H4-Hkv2-D16-W5", seed=3).items()}
    inputs = {name: x if name in ("g", "state", "window_valid") else x.to(dtype) for name, x in inputs.items()}
    ref = naive_liger_decode(
        **{name: x.cpu() if x.dtype == torch.bool else x.float().cpu() for name, x in inputs.items()}
    )
    views = {}
    for name, x in inputs.items():
        if name in ("window_k", "window_v"):  # [B, W, Hkv, D] tail of a [B, W + 7, Hkv, D] cache
            cache = torch.randn(x.shape[0], x.shape[1] + 7, *x.shape[2:], device=device).to(x.dtype)
            cache[:, 7:] = x
            views[name] = cache[:, 7:]
        elif name == "window_valid":
            views[name] = torch.cat([torch.zeros_like(x[:, :3]), x], 1)[:, 3:]
        else:  # last dim a slice of a twice-as-wide buffer: rows no longer contiguous
            wide = torch.randn(*x.shape[:-1], 2 * x.shape[-1], device=device).to(x.dtype)
            wide[..., 3 : 3 + x.shape[-1]] = x
            views[name] = wide[..., 3 : 3 + x.shape[-1]]
            assert not views[name].is_contiguous()
    out = triton_liger_decode(**views)
    _check(ref, tuple(x.cpu() for x in out), ratio)


@pytest.mark.parametrize("shape_id", ["H4-Hkv2-D16-W5", "H4-Hkv2-D32-W16"])
def test_torch_matches_prefill_ops(shape_id):
    """A decode step equals the prefill oracles run on T = 1 and mixed: GLA from the state, window over W keys."""
    inputs = _inputs(shape_id)
    W = inputs["window_k"].shape[1]
    o_linear, state = naive_recurrent_gla(
        inputs["q_lin"][:, None],
        inputs["k_lin"][:, None],
        inputs["v"][:, None],
        inputs["g"][:, None],
        scale=1.0,
        initial_state=inputs["state"],
        output_final_state=True,
    )
    o_window = naive_sliding_window_attention(
        inputs["q_rot"][:, None], inputs["window_k"], inputs["window_v"], W, key_valid=inputs["window_valid"]
    )
    expected = ((0.5 * o_window + 0.5 * o_linear)[:, 0], state)
    _check(expected, torch_liger_decode(**inputs))
    _check(expected, naive_liger_decode(**inputs))


@pytest.mark.parametrize(
    "backend", ["reference", "torch", pytest.param("triton", marks=[pytest.mark.triton, needs_triton_device])]
)
def test_decoding_equals_the_full_forward(backend):
    """A prefill of 6 tokens, then one step per token with the window as a ring (the token at position p in slot
    p % W, the prefill's last W - 1 tokens already there), the state carried: each step's output is that row of
    `liger_attention` over all 15 tokens, and the last state its final state. Row 1 is left-padded by 3 (its values
    zero there, as the layer passes them); GQA, K != D, a window shorter than the prefill."""
    B, T, P, H, Hkv, K, D, W = 2, 15, 6, 4, 2, 8, 16, 4
    gen = torch.Generator().manual_seed(0)
    x = {
        "q_lin": torch.randn(B, T, H, K, generator=gen).softmax(-1),
        "k_lin": torch.randn(B, T, Hkv, K, generator=gen).softmax(-1),
        "v": torch.randn(B, T, Hkv, D, generator=gen),
        "g": F.logsigmoid(torch.randn(B, T, Hkv, K, generator=gen) * 4) / 16,
        "q_rot": torch.randn(B, T, H, D, generator=gen),
        "k_rot": torch.randn(B, T, Hkv, D, generator=gen),
    }
    valid = torch.arange(T) >= torch.tensor([0, 3])[:, None]  # [B, T]
    x["v"] = x["v"] * valid[..., None, None]
    options = {"scale": 0.3, "mix": 0.4}
    full, final = liger_attention(**x, window=W, key_valid=valid, output_final_state=True, backend="reference",
                                  **options)  # fmt: skip
    device = TRITON_DEVICE if backend == "triton" else "cpu"
    x = {name: t.to(device) for name, t in x.items()}
    prefill = {name: t[:, :P] for name, t in x.items()}
    _, state = liger_attention(**prefill, window=W, key_valid=valid[:, :P].to(device), output_final_state=True,
                               backend="reference" if backend == "reference" else "torch", **options)  # fmt: skip
    ring_k, ring_v = torch.zeros(B, W, Hkv, D, device=device), torch.zeros(B, W, Hkv, D, device=device)
    ring_valid = torch.zeros(B, W, dtype=torch.bool, device=device)
    for p in range(P - W + 1, T):
        slot = p % W
        ring_k[:, slot], ring_v[:, slot] = x["k_rot"][:, p], x["v"][:, p]
        ring_valid[:, slot] = valid[:, p].to(device)
        if p < P:  # the prefill's last W - 1 tokens fill the ring
            continue
        step = {name: x[name][:, p] for name in ("q_lin", "k_lin", "v", "g", "q_rot")}
        o, state = liger_decode(**step, state=state, window_k=ring_k, window_v=ring_v, window_valid=ring_valid,
                                backend=backend, **options)  # fmt: skip
        assert_close(f"o[{p}]", full[:, p], o.cpu())
    assert_close("final state", final, state.cpu())


@pytest.mark.triton
def test_dispatch(monkeypatch):
    inputs = _inputs("H4-Hkv2-D16-W5")
    ref = naive_liger_decode(**inputs, scale=0.2, mix=0.3)
    for backend in ("reference", "torch"):
        _check(ref, liger_decode(**inputs, scale=0.2, mix=0.3, backend=backend))
    if TRITON_DEVICE:
        on_device = {name: x.to(TRITON_DEVICE) for name, x in inputs.items()}
        out = liger_decode(**on_device, scale=0.2, mix=0.3, backend="triton")
        _check(ref, tuple(x.cpu() for x in out))
        if CUDA:  # CUDA tensors default to the fused kernel
            monkeypatch.delenv("LINEARIZE_BACKEND", raising=False)
            cuda_inputs = {name: x.cuda() for name, x in inputs.items()}
            _check(ref, tuple(x.cpu() for x in liger_decode(**cuda_inputs, scale=0.2, mix=0.3)))

    calls = []
    monkeypatch.setattr(liger_mod, "torch_liger_decode", lambda *a, **kw: calls.append("torch") or ref)
    monkeypatch.setattr(liger_mod, "naive_liger_decode", lambda *a, **kw: calls.append("reference") or ref)
    monkeypatch.delenv("LINEARIZE_BACKEND", raising=False)
    liger_decode(**inputs)  # CPU default
    monkeypatch.setenv("LINEARIZE_BACKEND", "reference")
    liger_decode(**inputs)
    liger_decode(**inputs, backend="torch")  # the argument wins over the environment
    assert calls == ["torch", "reference", "torch"]
    with pytest.raises(ValueError, match="valid backends"):
        liger_decode(**inputs, backend="cuda")


@pytest.mark.parametrize(
    "name, bad",
    [
        ("q_lin", lambda x: x[:, :3]),  # H not a multiple of Hkv
        ("state", lambda x: x[..., :8]),  # state V differs from v
        ("q_rot", lambda x: x[..., :8]),  # D != V
        ("window_v", lambda x: x[:, :-1]),  # W differs from the keys'
        ("window_valid", lambda x: x.float()),  # not bool
        ("g", lambda x: x[:, None]),  # wrong rank
    ],
)
def test_bad_shapes_raise(name, bad):
    inputs = _inputs("H4-Hkv2-D16-W5")
    inputs[name] = bad(inputs[name])
    with pytest.raises(ValueError, match="expected q_lin"):
        liger_decode(**inputs, backend="reference")


@pytest.mark.triton
def test_triton_rejects_long_windows():
    from linearize.kernels.liger.triton import MAX_WINDOW, triton_liger_decode

    inputs = _inputs("H2-Hkv2-D16-W16")
    for name in ("window_k", "window_v"):
        inputs[name] = inputs[name].repeat(1, MAX_WINDOW // 16 + 1, 1, 1)
    inputs["window_valid"] = inputs["window_valid"].repeat(1, MAX_WINDOW // 16 + 1)
    with pytest.raises(ValueError, match=f"at most {MAX_WINDOW} window keys"):
        triton_liger_decode(**inputs)


@pytest.mark.triton
def test_long_windows_default_to_torch_on_cuda(monkeypatch):
    """A window longer than the Triton kernel holds: CUDA tensors default to the torch step (here a CUDA device as
    the dispatcher sees it), and asking for "triton" says why it cannot run."""
    from linearize.kernels.backend import resolve_backend
    from linearize.kernels.liger.triton import MAX_WINDOW

    inputs = _inputs("H2-Hkv2-D16-W16")
    for name in ("window_k", "window_v"):
        inputs[name] = inputs[name].repeat(1, MAX_WINDOW // 16 + 1, 1, 1)
    inputs["window_valid"] = inputs["window_valid"].repeat(1, MAX_WINDOW // 16 + 1)
    monkeypatch.delenv("LINEARIZE_BACKEND", raising=False)
    monkeypatch.setattr(
        liger_mod, "resolve_backend", lambda backend, device, **kw: resolve_backend(backend, torch.device("cuda"), **kw)
    )
    _check(naive_liger_decode(**inputs), liger_decode(**inputs))
    with pytest.raises(NotImplementedError, match=f"at most {MAX_WINDOW} window keys"):
        liger_decode(**inputs, backend="triton")


# Gemma 2's logit soft-capping of the window branch: with scale 1 the D = 16..64 scores reach well beyond the cap
SOFTCAP = {"softcap": 2.0, "scale": 1.0}


@pytest.mark.parametrize("shape_id", ["H4-Hkv2-D16-W5", "H4-Hkv2-D64-W16", "H6-Hkv2-D24-W7"])
def test_torch_matches_reference_with_softcap(shape_id):
    """Capped window logits: output, new state and every input gradient of the torch step equal the oracle's."""

    def run(fn):
        x = {name: t.clone().requires_grad_(t.is_floating_point()) for name, t in _inputs(shape_id).items()}
        o, state = fn(**x, **SOFTCAP)
        gen = torch.Generator().manual_seed(1)
        (
            (o * torch.randn(o.shape, generator=gen)).sum() + (state * torch.randn(state.shape, generator=gen)).sum()
        ).backward()
        return {"o": o, "new_state": state} | {f"d{name}": t.grad for name, t in x.items() if t.requires_grad}

    ref, out = run(naive_liger_decode), run(torch_liger_decode)
    assert out.keys() == ref.keys()
    for name in ref:
        assert_close(name, ref[name], out[name])
    uncapped = naive_liger_decode(**_inputs(shape_id), scale=SOFTCAP["scale"])[0]
    assert (uncapped - ref["o"]).abs().amax() > 0.05  # the cap matters


def test_softcap_dispatch(monkeypatch):
    monkeypatch.delenv("LINEARIZE_BACKEND", raising=False)
    inputs = _inputs("H4-Hkv2-D16-W5")
    ref = naive_liger_decode(**inputs, **SOFTCAP)
    for backend in ("reference", "torch", None):
        _check(ref, liger_decode(**inputs, **SOFTCAP, backend=backend))
    with pytest.raises(NotImplementedError, match="soft-capping .* use backend 'torch'"):
        liger_decode(**inputs, **SOFTCAP, backend="triton")
