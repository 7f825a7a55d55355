"""GLA on packed batches (`cu_seqlens`): every backend against each sequence run separately through the oracle.

Outputs, final states and the gradients of q, k, v, g and initial_state must equal those of running the N sequences
one by one through `naive_recurrent_gla` (state restarting at every boundary, one initial/final state per sequence).
Triton runs in the interpreter on CPU (fp32, tiny shapes), or on the GPU.
"""

import functools

import pytest
import torch
import torch.nn.functional as F
from linearize.kernels.gla import chunk_gla, fused_recurrent_gla, gated_linear_attention, naive_recurrent_gla

from tests.kernels._close import BF16_RATIO, assert_close
from tests.kernels._devices import CUDA, INTERPRET, TRITON_DEVICE, needs_triton_device

# odd lengths: a 1-token sequence, sequences ending mid-chunk, one spanning three 16-token chunks; and sequences
# spanning two of the Triton path's 64-token chunks
LENGTHS = {"1-17-5-33": [1, 17, 5, 33], "3-0-20": [3, 0, 20], "70-3-66": [70, 3, 66]}
SHORT = ["1-17-5-33", "3-0-20"]  # every sequence within one Triton chunk
H, HKV, K, V = 4, 2, 16, 16

TRITON_DEVICES = (["cpu"] if INTERPRET else []) + (["cuda"] if CUDA else [])


def _cu(lengths: list[int], dtype: torch.dtype = torch.int32) -> torch.Tensor:
    return torch.tensor([0, *lengths], dtype=dtype).cumsum(0).to(dtype)


def _gates(shape: tuple[int, ...], kind: str) -> torch.Tensor:
    if kind == "logsigmoid":
        return F.logsigmoid(torch.randn(shape) * 8) / 16
    # about -8 per step: strong decay, exp(-b) over a 16-token chunk would be far beyond fp32
    return -8 + 0.1 * torch.randn(shape)


@functools.cache
def _inputs(lengths_id: str, gate: str, with_state: bool) -> dict[str, torch.Tensor]:
    lengths = LENGTHS[lengths_id]
    T, N = sum(lengths), len(lengths)
    torch.manual_seed(0)
    x = {
        "q": torch.randn(1, T, H, K),
        "k": torch.randn(1, T, HKV, K),
        "v": torch.randn(1, T, HKV, V),
        "g": _gates((1, T, HKV, K), gate),
    }
    if with_state:
        x["initial_state"] = torch.randn(N, HKV, K, V)
    return x


def _separately(lengths: list[int]):
    """The oracle on each packed sequence in turn, with the packed interface."""

    def fn(q, k, v, g, scale, initial_state=None, output_final_state=False):
        outputs, states, bos = [], [], 0
        for n, length in enumerate(lengths):
            part = slice(bos, bos + length)
            h0 = k.new_zeros(1, HKV, K, V) if initial_state is None else initial_state[n : n + 1]
            if length:
                o, ht = naive_recurrent_gla(q[:, part], k[:, part], v[:, part], g[:, part], scale, h0, True)
            else:  # an empty sequence outputs nothing and passes its state through
                o, ht = q.new_zeros(1, 0, H, V), h0
            outputs.append(o)
            states.append(ht)
            bos += length
        return torch.cat(outputs, dim=1), torch.cat(states) if output_final_state else None

    return fn


def _run(fn, inputs: dict[str, torch.Tensor], device: str = "cpu") -> dict[str, torch.Tensor]:
    """Outputs and the gradients of (o * do).sum() + (ht * dht).sum() for every input, do and dht random."""
    leaves = {name: x.detach().to(device, copy=True).requires_grad_() for name, x in inputs.items()}
    o, ht = fn(**leaves, scale=K**-0.5, output_final_state=True)
    gen = torch.Generator().manual_seed(1)
    do, dht = torch.randn(o.shape, generator=gen), torch.randn(ht.shape, generator=gen)
    ((o * do.to(device)).sum() + (ht * dht.to(device)).sum()).backward()
    return {"o": o, "ht": ht} | {f"d{name}": x.grad for name, x in leaves.items()}


@functools.cache
def _reference(lengths_id: str, gate: str, with_state: bool) -> dict[str, torch.Tensor]:
    return _run(_separately(LENGTHS[lengths_id]), _inputs(lengths_id, gate, with_state))


def _check(out: dict[str, torch.Tensor], ref: dict[str, torch.Tensor]) -> None:
    assert out.keys() == ref.keys()
    for name in ref:
        assert_close(name, ref[name], out[name].float().cpu())


def _dispatch(backend: str, lengths: list[int], cu_dtype: torch.dtype = torch.int32):
    def fn(q, **kwargs):
        return gated_linear_attention(q, cu_seqlens=_cu(lengths, cu_dtype).to(q.device), backend=backend, **kwargs)

    return fn


PATHS = {
    "reference": lambda lengths: _dispatch("reference", lengths),
    "torch": lambda lengths: _dispatch("torch", lengths, torch.int64),
    "recurrent": lambda lengths: functools.partial(fused_recurrent_gla, cu_seqlens=_cu(lengths)),
    "chunk16": lambda lengths: functools.partial(chunk_gla, chunk_size=16, cu_seqlens=_cu(lengths)),
}


@pytest.mark.parametrize("with_state", [False, True], ids=["h0-none", "h0"])
@pytest.mark.parametrize("gate", ["logsigmoid", "decay-8"])
@pytest.mark.parametrize("lengths_id", LENGTHS)
@pytest.mark.parametrize("path", PATHS)
def test_torch_paths_match_separate_sequences(path, lengths_id, gate, with_state):
    fn = PATHS[path](LENGTHS[lengths_id])
    _check(_run(fn, _inputs(lengths_id, gate, with_state)), _reference(lengths_id, gate, with_state))


def test_torch_bf16_inputs():
    """bf16 activations, the log decay and the initial states fp32: outputs and every gradient within `BF16_RATIO`
    of the oracle on the same inputs in fp32, the fp32 final states within fp32 rounding."""
    x = {
        name: t.bfloat16() if name in ("q", "k", "v") else t
        for name, t in _inputs("1-17-5-33", "logsigmoid", True).items()
    }
    ref = _run(_separately(LENGTHS["1-17-5-33"]), {name: t.float() for name, t in x.items()})
    out = _run(PATHS["torch"](LENGTHS["1-17-5-33"]), x)
    assert out.keys() == ref.keys()
    for name in ref:
        assert out[name].dtype == (torch.bfloat16 if name in ("o", "dq", "dk", "dv") else torch.float32), name
        assert_close(name, ref[name], out[name].float(), ratio=1e-4 if name == "ht" else BF16_RATIO)


@pytest.mark.triton
@pytest.mark.parametrize("with_state", [False, True], ids=["h0-none", "h0"])
@pytest.mark.parametrize("gate", ["logsigmoid", "decay-8"])
@pytest.mark.parametrize("lengths_id", SHORT)
@pytest.mark.parametrize("device", TRITON_DEVICES)
def test_triton_matches_separate_sequences(device, lengths_id, gate, with_state):
    fn = _dispatch("triton", LENGTHS[lengths_id])
    out = _run(fn, _inputs(lengths_id, gate, with_state), device)
    assert out["ht"].shape == (len(LENGTHS[lengths_id]), HKV, K, V) and out["ht"].dtype == torch.float32
    _check(out, _reference(lengths_id, gate, with_state))


@pytest.mark.triton
@pytest.mark.parametrize("device", TRITON_DEVICES)
def test_triton_sequences_spanning_several_chunks(device):
    """Sequences of 70 and 66 tokens, each over two 64-token chunks that start mid-way through the packed batch:
    the state carried from chunk to chunk within a sequence (the decay mild enough for it to matter), and from
    the initial state, restarting at every boundary."""
    fn = _dispatch("triton", LENGTHS["70-3-66"])
    _check(_run(fn, _inputs("70-3-66", "logsigmoid", True), device), _reference("70-3-66", "logsigmoid", True))


@pytest.mark.triton
@pytest.mark.parametrize("device", TRITON_DEVICES)
def test_triton_inference_without_final_state(device):
    """No gradients (no states saved), no final state: the output still restarts at every boundary."""
    from linearize.kernels.gla.triton import triton_chunk_gla

    lengths = LENGTHS["1-17-5-33"]
    x = {name: t.to(device) for name, t in _inputs("1-17-5-33", "logsigmoid", True).items()}
    with torch.no_grad():
        o, ht = triton_chunk_gla(**x, scale=0.5, cu_seqlens=_cu(lengths, torch.int64).to(device))
    assert ht is None
    ref_o, _ = _separately(lengths)(**{name: t.cpu() for name, t in x.items()}, scale=0.5)
    assert_close("o", ref_o, o.cpu())


def _bad_call(backend: str, **changes):
    x = dict(_inputs("1-17-5-33", "logsigmoid", True)) | {"cu_seqlens": _cu(LENGTHS["1-17-5-33"])}
    x |= changes
    return gated_linear_attention(**x, backend=backend)


@pytest.mark.parametrize("backend", ["reference", "torch", "triton"])
def test_rejects_bad_packed_batches(backend):
    x = _inputs("1-17-5-33", "logsigmoid", True)
    T = x["q"].shape[1]
    with pytest.raises(ValueError, match="batch size must be 1"):
        _bad_call(backend, **{name: t.expand(2, *t.shape[1:]) for name, t in x.items() if name != "initial_state"})
    for bad in ([1, 18, 23, T], [0, 18, 23, T - 1], [0, 18, 5, T]):
        with pytest.raises(ValueError, match="cu_seqlens must rise from 0 to T"):
            _bad_call(backend, cu_seqlens=torch.tensor(bad, dtype=torch.int32))
    with pytest.raises(ValueError, match="int32 or int64"):
        _bad_call(backend, cu_seqlens=torch.tensor([0.0, T]))
    with pytest.raises(ValueError, match="1-D"):
        _bad_call(backend, cu_seqlens=torch.tensor([[0, T]]))
    with pytest.raises(ValueError, match="one state per sequence"):
        _bad_call(backend, initial_state=x["initial_state"][:3])


@pytest.mark.triton
def test_triton_function_rejects_bad_initial_state():
    from linearize.kernels.gla.triton import triton_chunk_gla

    x = dict(_inputs("1-17-5-33", "logsigmoid", True))
    x["initial_state"] = x["initial_state"][:2]
    with pytest.raises(ValueError, match="initial_state"):
        triton_chunk_gla(**x, cu_seqlens=_cu(LENGTHS["1-17-5-33"]))


@pytest.mark.triton
@needs_triton_device
def test_fla_backend_matches_separate_sequences():
    """fla's chunk_gla gets cu_seqlens as is (its state per query head: repeated over each group, then one kept)."""
    x = {name: t.to(TRITON_DEVICE) for name, t in _inputs("1-17-5-33", "logsigmoid", True).items()}
    with torch.no_grad():
        o, ht = _dispatch("fla", LENGTHS["1-17-5-33"], torch.int64)(**x, scale=K**-0.5, output_final_state=True)
    ref = _reference("1-17-5-33", "logsigmoid", True)
    assert_close("o", ref["o"], o.cpu())
    assert_close("ht", ref["ht"], ht.cpu())
