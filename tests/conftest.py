import importlib
import os
import sys
from pathlib import Path

# Tests never touch the network: an accidental Hub call must fail fast. Set before transformers is imported.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# transformers >= 5.25 imports the Hugging Face `kernels` package, which this repository's top-level kernels/ folder
# (installed as linearize.kernels) shadows wherever the repository root is on sys.path: `python -m pytest` and the
# fresh interpreters tests start from here. Import the installed one first, without the root, and keep the root off
# the path of child interpreters (PYTHONSAFEPATH, Python 3.11+).
ROOT = Path(__file__).resolve().parents[1]
os.environ["PYTHONSAFEPATH"] = "1"
_path = sys.path[:]
sys.path[:] = [p for p in _path if Path(p or ".").resolve() != ROOT]
try:
    importlib.import_module("kernels")
except ImportError:  # transformers before 5.25 does not need it
    pass
finally:
    sys.path[:] = _path

# Without a GPU, Triton kernels run only in its interpreter, which must be chosen before triton is imported.
import torch  # noqa: E402

assert "triton" not in sys.modules, "triton was imported before the interpreter could be chosen"
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
if os.environ.get("TRITON_INTERPRET") == "1":
    from tests import triton_interpreter

    triton_interpreter.install()
