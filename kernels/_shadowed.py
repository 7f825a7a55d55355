"""Hand the top-level name `kernels` to the installed Hugging Face package when a checkout's folder is found first."""

import importlib.util
import sys
import types
from importlib.machinery import PathFinder
from pathlib import Path


class NotInstalled(types.ModuleType):
    """Stands for the top-level `kernels` where no such package is installed.

    transformers (5.17 to 5.25 at least) asks for `kernels` by `find_spec`, which finds this folder, and then imports
    it to read `__version__`: an import that raised there would break `import transformers`. This module imports, has
    neither a version nor a file (transformers then reports the package unavailable), and raises on any other use.
    """

    def __getattr__(self, name: str):
        raise AttributeError(
            f"module 'kernels' has no attribute {name!r}: the Hugging Face package `kernels` is not installed "
            "(the checkout's kernels/ folder is linearize.kernels); pip install kernels if you need it"
        )


def load_installed_kernels() -> None:
    """Replace `sys.modules["kernels"]` (this folder) by the package of that name installed elsewhere on sys.path.

    The import system returns whatever `sys.modules` holds once a module's body has run, so `import kernels` then
    yields the installed package, or a `NotInstalled` module where there is none.
    """
    sys.modules.pop(__name__)  # this helper is not part of the installed package
    # every checkout's root, not just this one's: another's kernels/ (a worktree on PYTHONPATH) would be loaded as the
    # installed package and, doing the same, load this one again, round and round until a RecursionError
    elsewhere = [entry for entry in sys.path if not _is_checkout(Path(entry or "."))]
    spec = PathFinder.find_spec("kernels", elsewhere)
    if spec is None or spec.loader is None:
        sys.modules["kernels"] = NotInstalled("kernels")
        return
    module = importlib.util.module_from_spec(spec)
    sys.modules["kernels"] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules["kernels"]
        raise


def _is_checkout(root: Path) -> bool:
    """Whether `root`'s `kernels` is a linearize checkout's kernels/ folder (this helper beside it), not the package."""
    return (root / "kernels" / Path(__file__).name).is_file()
