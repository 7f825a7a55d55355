import importlib

import pytest
import torch
from linearize.kernels import resolve_backend
from linearize.kernels.backend import SOFTCAP_NOT_IN_TRITON, outside_autocast, softcap_unsupported

CPU = torch.device("cpu")


def test_default_is_torch(monkeypatch):
    monkeypatch.delenv("LINEARIZE_BACKEND", raising=False)
    assert resolve_backend(None, CPU) == "torch"


@pytest.mark.parametrize("name", ["reference", "torch"])
def test_explicit_name_wins_over_env(monkeypatch, name):
    monkeypatch.setenv("LINEARIZE_BACKEND", "reference" if name == "torch" else "torch")
    assert resolve_backend(name, CPU) == name


def test_env_var(monkeypatch):
    monkeypatch.setenv("LINEARIZE_BACKEND", "reference")
    assert resolve_backend(None, CPU) == "reference"


@pytest.mark.parametrize("source", ["argument", "env"])
def test_unknown_name_lists_valid_ones(monkeypatch, source):
    monkeypatch.setenv("LINEARIZE_BACKEND", "cuda" if source == "env" else "torch")
    with pytest.raises(ValueError, match="'reference', 'torch', 'triton', 'fla'") as err:
        resolve_backend("cuda" if source == "argument" else None, CPU)
    assert "cuda" in str(err.value)


def test_cuda_tensors_default_to_triton_when_the_op_has_it(monkeypatch):
    monkeypatch.delenv("LINEARIZE_BACKEND", raising=False)
    cuda = torch.device("cuda")
    assert resolve_backend(None, cuda) == "triton"
    assert resolve_backend(None, cuda, available=("reference", "torch")) == "torch"


def test_missing_implementation_is_named():
    with pytest.raises(NotImplementedError, match="no 'triton' implementation"):
        resolve_backend("triton", CPU, available=("reference", "torch"))


def test_triton_on_cpu_needs_the_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ValueError, match="CUDA tensors"):
        resolve_backend("triton", CPU)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert resolve_backend("triton", CPU) == "triton"


def test_softcap_rules_out_triton(monkeypatch):
    """A logit cap has no Triton kernel: CUDA tensors then default to "torch", and an explicit "triton" request,
    argument or environment, is refused with the reason and the way out."""
    monkeypatch.delenv("LINEARIZE_BACKEND", raising=False)
    cuda = torch.device("cuda")  # only a device object: nothing runs on it
    assert softcap_unsupported(None) == {}
    assert resolve_backend(None, cuda, unsupported=softcap_unsupported(None)) == "triton"
    assert resolve_backend(None, cuda, unsupported=softcap_unsupported(2.0)) == "torch"
    assert resolve_backend("reference", cuda, unsupported=softcap_unsupported(2.0)) == "reference"
    assert "use backend 'torch'" in SOFTCAP_NOT_IN_TRITON
    for device in (cuda, CPU):
        with pytest.raises(NotImplementedError, match="soft-capping .* no Triton kernel yet; use backend 'torch'"):
            resolve_backend("triton", device, unsupported=softcap_unsupported(2.0))
    monkeypatch.setenv("LINEARIZE_BACKEND", "triton")
    with pytest.raises(NotImplementedError, match="soft-capping.*LINEARIZE_BACKEND='triton'"):
        resolve_backend(None, cuda, unsupported=softcap_unsupported(50.0))


@pytest.mark.parametrize("softcap", [0.0, -1.0])
def test_softcap_must_be_positive(softcap):
    with pytest.raises(ValueError, match="softcap must be None or > 0"):
        softcap_unsupported(softcap)


PUBLIC_OPS = [
    ("gla", "gated_linear_attention"),
    ("liger", "liger_attention"),
    ("liger", "liger_decode"),
    ("parallax", "parallax_attention"),
    ("parallax", "parallax_decode"),
    ("still", "self_saliency"),
    ("still", "still_attention"),
    ("still", "still_decode"),
    ("window", "sliding_window_attention"),
]


@pytest.mark.parametrize(("folder", "name"), PUBLIC_OPS)
def test_every_public_op_runs_outside_autocast(folder, name):
    op = getattr(importlib.import_module(f"linearize.kernels.{folder}"), name)
    assert op.__wrapped__.__name__ == name
    # the wrapper that `outside_autocast` makes, not just any decorator that keeps the name (as functools' do)
    assert op.__code__ is outside_autocast(len).__code__


def test_an_op_keeps_fp32_accumulation_under_autocast():
    """A model trained under torch.autocast(bf16) calls ops with bf16 projections: the op's torch path accumulates
    in fp32 as without autocast, where autocast alone would have run its matrix products in bfloat16."""
    from linearize.kernels import gated_linear_attention

    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 100, 2, 64).bfloat16() for _ in range(3))
    g = torch.nn.functional.logsigmoid(torch.randn(1, 100, 2, 64)) / 16
    plain, _ = gated_linear_attention(q, k, v, g, backend="torch")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        autocast, _ = gated_linear_attention(q, k, v, g, backend="torch")
    torch.testing.assert_close(autocast, plain, rtol=0, atol=0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        bf16_products, _ = gated_linear_attention.__wrapped__(q, k, v, g, backend="torch")
    assert not torch.equal(bf16_products, plain)  # the test would notice autocast reaching the op
