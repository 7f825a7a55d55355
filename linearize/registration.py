"""Registering the converted-model classes with transformers' Auto classes, as soon as transformers is imported.

`import linearize` must make `AutoModelForCausalLM.from_pretrained(converted_folder)` work whichever of the two
packages the user imports first, yet cost no transformers import itself: transformers imports torch, seconds that
`linearize --help` must not spend. So the classes are registered now when transformers is already loaded, and
otherwise right after it loads.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys


def register_with_transformers() -> None:
    if "transformers" in sys.modules:
        _register()
    elif not any(isinstance(finder, _AfterTransformersLoads) for finder in sys.meta_path):
        sys.meta_path.insert(0, _AfterTransformersLoads())


def _register() -> None:
    # importing linearize.models registers its classes; when that import is what loaded transformers, it is
    # already under way and finishes the registration itself
    importlib.import_module(f"{__package__}.models")


class _AfterTransformersLoads(importlib.abc.MetaPathFinder):
    """Finds transformers as the other finders do, with a loader that registers our classes once it has run."""

    def find_spec(self, fullname, path, target=None):
        if fullname != "transformers":
            return None
        sys.meta_path.remove(self)  # once is enough, and the lookup below must not come back here
        spec = importlib.util.find_spec(fullname)
        if spec is not None and spec.loader is not None:
            spec.loader = _RegisteringLoader(spec.loader)
        return spec


class _RegisteringLoader(importlib.abc.Loader):
    def __init__(self, loader):
        self._loader = loader

    def __getattr__(self, name):  # resource readers and the like: the original loader's
        return getattr(self._loader, name)

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module) -> None:
        self._loader.exec_module(module)
        _register()
