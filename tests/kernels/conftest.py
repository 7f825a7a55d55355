import pytest
import torch
from torch.utils import _device


@pytest.fixture(autouse=True)
def nan_empty(monkeypatch):
    """Fill float tensors from torch.empty, torch.empty_like and Tensor.new_empty with NaN, so reading uninitialised
    memory fails."""
    real_empty, real_empty_like, real_new_empty = torch.empty, torch.empty_like, torch.Tensor.new_empty

    def poison(t: torch.Tensor) -> torch.Tensor:
        if t.is_floating_point():
            with torch.no_grad():  # the tensor may have been created with requires_grad=True
                t.fill_(float("nan"))
        return t

    # `with torch.device(...)` reads the constructors it redirects from a set built once per process: built under
    # this patch, it would hold the lambda and not torch.empty, and no later device context would place torch.empty
    _device._device_constructors()
    monkeypatch.setattr(torch, "empty", lambda *args, **kwargs: poison(real_empty(*args, **kwargs)))
    monkeypatch.setattr(torch, "empty_like", lambda *args, **kwargs: poison(real_empty_like(*args, **kwargs)))
    monkeypatch.setattr(
        torch.Tensor, "new_empty", lambda self, *args, **kwargs: poison(real_new_empty(self, *args, **kwargs))
    )
