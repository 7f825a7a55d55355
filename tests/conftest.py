import os
import sys

# Tests never touch the network: an accidental Hub call must fail fast. Set before transformers is imported.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# Without a GPU, Triton kernels run only in its interpreter, which must be chosen before triton is imported.
import torch  # noqa: E402

assert "triton" not in sys.modules, "triton was imported before the interpreter could be chosen"
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
if os.environ.get("TRITON_INTERPRET") == "1":
    from tests import triton_interpreter

    triton_interpreter.install()
