"""Hand the top-level name `kernels` to the installed Hugging Face package when a checkout's folder is found first."""

import importlib.util
import sys
from importlib.machinery import PathFinder
from pathlib import Path

CHECKOUT_ROOT = Path(__file__).resolve().parents[1]


def load_installed_kernels() -> None:
    """Replace `sys.modules["kernels"]` (this folder) by the package of that name installed elsewhere on sys.path.

    The import system returns whatever `sys.modules` holds once a module's body has run, so `import kernels` then
    yields the installed package. Without one, the import fails as it would have outside the checkout.
    """
    elsewhere = [entry for entry in sys.path if Path(entry or ".").resolve() != CHECKOUT_ROOT]
    spec = PathFinder.find_spec("kernels", elsewhere)
    if spec is None or spec.loader is None:
        raise ModuleNotFoundError("No module named 'kernels'", name="kernels")
    module = importlib.util.module_from_spec(spec)
    sys.modules.pop(__name__)  # this helper is not part of the installed package
    sys.modules["kernels"] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules["kernels"]
        raise
