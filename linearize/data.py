"""The built-in English corpus, shipped with the package for offline fine-tuning and perplexity (corpus/README.md
says where each document comes from and under which licence)."""

from __future__ import annotations

import functools
import gzip
import json
from importlib import resources
from typing import Literal

BuiltinSplit = Literal["train", "test"]
BUILTIN_SPLITS: tuple[BuiltinSplit, ...] = ("train", "test")


def builtin_documents(split: BuiltinSplit = "train") -> list[str]:
    """The documents of one split of the built-in corpus, in the file's (seeded random) order: "train" (379 web
    pages, Wikipedia articles and novel chapters) or "test" (41 others, never trained on by `builtin: english`)."""
    if split not in BUILTIN_SPLITS:
        raise ValueError(f"the built-in corpus has the splits {', '.join(BUILTIN_SPLITS)}, not {split!r}")
    return [record["text"] for record in _records() if record["split"] == split]


def builtin_text(split: BuiltinSplit = "test") -> str:
    """One split of the built-in corpus as a single text, documents separated by blank lines."""
    return "\n\n".join(builtin_documents(split))


@functools.cache
def _records() -> tuple[dict, ...]:
    with resources.files("linearize").joinpath("corpus/english.jsonl.gz").open("rb") as raw, gzip.open(raw) as lines:
        return tuple(json.loads(line) for line in lines)
