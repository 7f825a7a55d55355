"""The wheel: `kernels/` ships inside the `linearize` namespace, never as a top-level `kernels` module, and the
wheel holds what its metadata declares."""

import os
import shutil
import subprocess
import sys
import tarfile
import zipfile
from importlib.machinery import PathFinder
from pathlib import Path

import linearize.kernels
import pytest

ROOT = Path(__file__).resolve().parents[1]
# what the builds read, and tests/, which setuptools' sdist would take up
BUILD_READS = ("pyproject.toml", "README.md", "LICENSE", "MANIFEST.in", "linearize", "kernels", "tests")


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    """A copy of the checkout's files that the builds read.

    Built in place, setuptools goes through build/lib, which keeps what an earlier build put there: a wheel built in
    the checkout also holds a module deleted since, or a data file dropped from package-data."""
    source = tmp_path_factory.mktemp("source")
    for name in BUILD_READS:
        if (ROOT / name).is_dir():
            shutil.copytree(ROOT / name, source / name, symlinks=True, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(ROOT / name, source / name)
    return source


@pytest.fixture(scope="module")
def wheel(source, tmp_path_factory) -> tuple[Path, str]:
    """The wheel built from the checkout's files, and what the build printed on stderr."""
    folder = tmp_path_factory.mktemp("wheel")
    build = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation", "-w", folder, source],
        check=True,
        capture_output=True,
        text=True,
    )
    (path,) = folder.glob("linearize-*.whl")
    return path, build.stderr


def test_wheel_version_is_the_package_version(wheel):
    """The version is written once, as linearize.__version__ (`linearize --version` prints it), and the wheel's
    metadata reads it from there."""
    assert wheel[0].name.startswith(f"linearize-{linearize.__version__}-")
    metadata = zipfile.ZipFile(wheel[0]).read(f"linearize-{linearize.__version__}.dist-info/METADATA").decode()
    assert f"\nVersion: {linearize.__version__}\n" in metadata


def test_installed_package_maps_kernels_into_linearize():
    assert Path(linearize.kernels.__file__).resolve() == ROOT / "kernels" / "__init__.py"


def test_wheel_holds_linearize_kernels_and_imports_from_it(wheel, tmp_path):
    wheel, stderr = wheel
    # every importable folder is a listed package: setuptools warns, 40 lines in `make demo`'s install, otherwise
    assert "absent from the `packages` configuration" not in stderr, stderr
    names = set(zipfile.ZipFile(wheel).namelist())
    assert {"linearize/corpus/english.jsonl.gz", "linearize/corpus/README.md"} <= names
    assert not [n for n in names if n.startswith("kernels/")]
    # every source module ships, at its place in the linearize namespace
    sources = [
        p.relative_to(ROOT).as_posix() for folder in ("linearize", "kernels") for p in (ROOT / folder).rglob("*.py")
    ]
    in_wheel = {s: "linearize/" + s if s.startswith("kernels/") else s for s in sources}
    missing = [s for s, name in in_wheel.items() if name not in names]
    assert not missing, f"modules missing from the wheel (add their packages to pyproject.toml): {missing}"
    # ...and no other: none that the checkout has since deleted or renamed
    stale = sorted(n for n in names if n.endswith(".py") and n not in in_wheel.values())
    assert not stale, f"modules in the wheel that the checkout does not have: {stale}"
    zipfile.ZipFile(wheel).extractall(tmp_path / "site")
    probe = "import linearize.kernels as k, linearize.layers.liger; print(k.__file__)"
    # -I: isolated mode, so neither the repository nor the editable install is on the path
    result = subprocess.run(
        [sys.executable, "-I", "-c", f"import sys; sys.path.insert(0, {str(tmp_path / 'site')!r}); {probe}"],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().startswith(str(tmp_path / "site"))


def test_wheel_ships_the_licence_it_declares(wheel):
    """Apache-2.0 asks that a copy of the licence go with every copy of the work: the wheel's metadata names it and
    holds its text."""
    archive = zipfile.ZipFile(wheel[0])
    (metadata,) = [n for n in archive.namelist() if n.endswith(".dist-info/METADATA")]
    headers = archive.read(metadata).decode().split("\n\n")[0].splitlines()
    assert "License-Expression: Apache-2.0" in headers and "License-File: LICENSE" in headers
    licence = archive.read(metadata.replace("METADATA", "licenses/LICENSE")).decode()
    assert "Apache License" in licence and "Version 2.0, January 2004" in licence


def test_wheel_marks_the_package_typed(wheel):
    """Without py.typed, mypy and pyright skip an installed linearize's annotations ("missing library stubs or
    py.typed marker"); the marker in `linearize` covers its subpackages, linearize.kernels included."""
    assert "linearize/py.typed" in zipfile.ZipFile(wheel[0]).namelist()


def test_sdist_holds_the_sources_and_licence_but_no_partial_test_suite(source, tmp_path):
    """setuptools adds tests/test*.py to an sdist by default, without the conftest files and helpers they import."""
    build = f"from setuptools import build_meta; build_meta.build_sdist({str(tmp_path)!r})"
    subprocess.run([sys.executable, "-c", build], cwd=source, check=True, capture_output=True)
    (sdist,) = tmp_path.glob("linearize-*.tar.gz")
    with tarfile.open(sdist) as archive:
        names = [name.split("/", 1)[1] for name in archive.getnames() if "/" in name]  # under linearize-0.1.0/
    assert {"LICENSE", "pyproject.toml", "kernels/__init__.py", "linearize/corpus/english.jsonl.gz"} <= set(names)
    assert not [name for name in names if name.startswith("tests")]


def _from_checkout_root(probe: str) -> str:
    """stdout of `python -c probe` run from the checkout's root (first on sys.path, as `python -m` puts it)."""
    result = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_a_checkout_root_on_sys_path_does_not_shadow_the_installed_kernels_package():
    """`python -m linearize` from a checkout puts its root first on sys.path, where kernels/ is found as the top-level
    `kernels`: the Hugging Face package transformers >= 5.25 imports. The folder hands that name over."""
    elsewhere = [p for p in sys.path if Path(p or ".").resolve() != ROOT]
    installed = PathFinder.find_spec("kernels", elsewhere)
    probe = (
        "import sys\n"
        "try:\n"
        "    import kernels\n"
        "    print(kernels.__file__)\n"
        "except ModuleNotFoundError as error:\n"
        "    print(error.name)\n"
        "import linearize.kernels\n"
        "print(linearize.kernels.__file__, sorted(m for m in sys.modules if m.startswith('kernels._shadowed')))\n"
    )
    top_level, ours = _from_checkout_root(probe).splitlines()
    assert top_level == (installed.origin if installed else "kernels")
    assert ours == f"{ROOT / 'kernels' / '__init__.py'} []"


def test_without_the_kernels_package_a_checkout_root_on_sys_path_keeps_transformers_importable():
    """transformers imports `kernels` to read its version where `find_spec` finds one and no distribution has that
    name: this folder must not raise there (it did on transformers 5.17, breaking `import transformers`)."""
    probe = (
        "from importlib.machinery import PathFinder\n"
        "find_spec = PathFinder.find_spec.__func__\n"
        "def hide_installed(cls, name, path=None, target=None):  # the search outside the checkout finds nothing\n"
        "    return None if name == 'kernels' and path is not None else find_spec(cls, name, path, target)\n"
        "PathFinder.find_spec = classmethod(hide_installed)\n"
        "import importlib.metadata as metadata\n"
        "version = metadata.version\n"
        "def no_kernels_distribution(name):\n"
        "    if name == 'kernels':\n"
        "        raise metadata.PackageNotFoundError(name)\n"
        "    return version(name)\n"
        "metadata.version = no_kernels_distribution\n"
        "from transformers.utils.import_utils import is_kernels_available\n"
        "import transformers.integrations.hub_kernels\n"
        "import kernels\n"
        "try:\n"
        "    kernels.get_kernel\n"
        "except AttributeError as error:\n"
        "    print(is_kernels_available(), 'not installed' in str(error))\n"
    )
    assert _from_checkout_root(probe).split() == ["False", "True"]


def test_another_checkout_on_sys_path_does_not_send_the_kernels_import_round_in_circles(tmp_path):
    """Two checkouts on sys.path (the current one first, as `python -m` puts it; another, a worktree say, on
    PYTHONPATH): each one's kernels/ must pass over the other's, not load it as the installed package, which then
    loads the first again, until a RecursionError ends `import transformers` (on 5.25, which imports `kernels`)."""
    other = tmp_path / "other-checkout"
    shutil.copytree(ROOT / "kernels", other / "kernels", ignore=shutil.ignore_patterns("__pycache__"))
    elsewhere = [p for p in sys.path if Path(p or ".").resolve() != ROOT]
    installed = PathFinder.find_spec("kernels", elsewhere)
    probe = (
        "try:\n"
        "    import kernels\n"
        "    print(kernels.__file__)\n"
        "except ModuleNotFoundError as error:\n"
        "    print(error.name)\n"
    )
    path = os.pathsep.join(filter(None, [str(other), os.environ.get("PYTHONPATH")]))
    result = subprocess.run(
        [sys.executable, "-c", probe], cwd=ROOT, env={**os.environ, "PYTHONPATH": path}, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == (installed.origin if installed else "kernels")
