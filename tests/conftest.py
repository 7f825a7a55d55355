import os
import sys

# Tests never touch the network: an accidental Hub call must fail fast. Set before transformers is imported.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# Without a GPU, Triton kernels run only in its interpreter, which must be chosen before triton is imported.
import pytest  # noqa: E402
import torch  # noqa: E402
from torch.utils import _device  # noqa: E402

assert "triton" not in sys.modules, "triton was imported before the interpreter could be chosen"
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
if os.environ.get("TRITON_INTERPRET") == "1":
    from tests import triton_interpreter

    triton_interpreter.install()


@pytest.fixture
def nan_empty(monkeypatch):
    """Fill float tensors from torch.empty, torch.empty_like and Tensor.new_empty with NaN, so reading uninitialised
    memory fails: autouse in the folders of ops, layers and models (their conftest.py), where scratch buffers and
    caches are allocated."""
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


@pytest.fixture(autouse=True)
def _torch_settings_kept():
    """Torch's process-wide settings are each test's to put back: a benchmark's main() run in a test set one thread
    and every later test ran on one (slower, and not what it runs alone)."""
    before = torch.get_num_threads(), torch.get_default_dtype(), torch.is_grad_enabled()
    yield
    after = torch.get_num_threads(), torch.get_default_dtype(), torch.is_grad_enabled()
    assert after == before, f"(threads, default dtype, grad mode) left at {after}, not {before}"
