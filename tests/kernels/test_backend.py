import pytest
import torch
from linearize.kernels import resolve_backend

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
