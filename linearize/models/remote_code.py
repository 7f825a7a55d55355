"""The remote-code files of a converted model folder: two stubs that import the installed linearize, so that
`from_pretrained(folder, trust_remote_code=True)` works without `import linearize`. Every save writes them (see
`LinearizeConfig.save_pretrained`), so a folder saved by transformers itself (a Trainer checkpoint, `push_to_hub`)
loads the same way; the package's own source is never copied into a folder."""

from __future__ import annotations

from pathlib import Path

# No package index serves linearize: it installs from its repository (pyproject.toml's [project.urls]).
REPOSITORY = "https://github.com/linearize/linearize"
INSTALL_COMMAND = f'pip install "linearize @ git+{REPOSITORY}"'

_STUB = f'''"""Remote-code entry point of a model converted with linearize; install it with
{INSTALL_COMMAND}
"""

try:
    from linearize.models.{{module}} import {{name}}
except ImportError as error:
    raise ImportError(
        {f"This model was converted with linearize and needs it to load: {INSTALL_COMMAND}"!r}
    ) from error

__all__ = ["{{name}}"]
'''
_STUBS = {  # Auto class -> (stub file, linearize.models module, class)
    "AutoConfig": ("configuration_linearize", "configuration", "LinearizeConfig"),
    "AutoModelForCausalLM": ("modeling_linearize", "modeling", "LinearizeForCausalLM"),
}
AUTO_MAP = {auto: f"{file}.{name}" for auto, (file, _, name) in _STUBS.items()}  # config.json's `auto_map`


def write_remote_code(folder: str | Path) -> None:
    """Write the stub files into `folder`."""
    for file, module, name in _STUBS.values():
        (Path(folder) / f"{file}.py").write_text(_STUB.format(module=module, name=name))
