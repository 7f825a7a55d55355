"""What `linearize eval` and `linearize bench` share: which two models to compare, how to name and load them,
Markdown tables, and the results recorded into a model folder (which `linearize push` puts in the model card)."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

from . import sources
from .errors import LinearizeError
from .outputs import write_file

EMBEDDED = "embedded"


@dataclass
class ModelSpec:
    """A model named on the command line: `source` is what `sources.load` takes (None = the embedded default)."""

    label: str
    source: str | None

    @property
    def folder(self) -> Path | None:
        """The local folder holding the model, if it is one."""
        if self.source is None:
            return None
        path = Path(self.source).expanduser()
        return path if (path / "config.json").is_file() else None


def model_spec(name: str) -> ModelSpec:
    """`name` is a folder, a hub id or "embedded"."""
    if name == EMBEDDED:
        return ModelSpec(label=f"{sources.EMBEDDED_NAME} (embedded)", source=None)
    path = Path(name).expanduser()
    if not path.is_dir():
        return ModelSpec(label=name, source=name)
    # a fine-tuning run saves its model as RUN/model: the run's name says which model it is
    label = f"{path.resolve().parent.name}/{path.name}" if path.name == "model" else path.name
    return ModelSpec(label=label, source=name)


def recorded_source(folder: Path) -> str | None:
    """What a converted folder was converted from, as `model_spec` takes it: the Hub id its config records
    (`source_model`), or "embedded" for the embedded default (whose weights are not the Hub's); None if neither."""
    config = json.loads((folder / "config.json").read_text())
    source, weights = config.get("source_model"), config.get("source_weights")
    # folders from before `source_weights` recorded the embedded default as the Hub id it was quantised from
    if weights == "embedded" or (weights is None and source == sources.EMBEDDED_ID):
        return EMBEDDED
    return source


def is_converted(folder: Path) -> bool:
    return json.loads((folder / "config.json").read_text()).get("model_type") == "linearize"


def resolve_pair(model: str, against: str | None) -> list[ModelSpec]:
    """The models to measure side by side: MODEL, then the one to compare it with.

    Args:
        model: a folder, hub id or "embedded".
        against: the same kinds; None means the source that a converted folder records, and no comparison for
            anything else.

    Returns:
        One or two specs with distinct labels.
    """
    first = model_spec(model)
    if against is None and first.folder is not None and is_converted(first.folder):
        against = recorded_source(first.folder)
        if against is None:
            raise LinearizeError(
                f"{model} does not record the model it was converted from; name it with --against "
                "(a folder, a hub id, or 'embedded' for the embedded SmolLM2)"
            )
    if against is None:
        return [first]
    second = model_spec(against)
    if second.label == first.label:
        second.label += " (against)"
    return [first, second]


def counted(count: int, noun: str) -> str:
    """'1 run', '3 runs': a count and its noun, for the lines and captions of reports."""
    return f"{count} {noun}" + "s" * (count != 1)


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    """A GitHub-flavoured Markdown table."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def write_json(path: Path, payload: dict) -> Path:
    """Write `payload` to `path` whole or not at all: `push` reads these records into model cards."""
    return write_file(path, json_text(payload, indent=2) + "\n")


def json_text(payload, indent: int | None = None) -> str:
    """`payload` as JSON that strict readers (jq, JavaScript) take: a number that is not finite (an overflowed
    perplexity, a model that produced NaN) is null, where json.dumps writes NaN or Infinity, which is not JSON."""
    return json.dumps(_finite(payload), indent=indent, allow_nan=False)


def _finite(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: _finite(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(item) for item in value]
    return value


def record(spec: ModelSpec, name: str, payload: dict) -> Path | None:
    """Write `payload` as `name` into the model's folder when it is a local folder; returns the path written."""
    if spec.folder is None:
        return None
    return write_json(spec.folder / name, payload)
