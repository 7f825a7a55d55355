from __future__ import annotations

import random

import pytest

from tests.tiny import source_folder


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """A tiny source model and a corpus of twelve short documents."""
    root = tmp_path_factory.mktemp("finetune")
    source_folder(root / "source")
    rng = random.Random(0)
    corpus = root / "corpus"
    corpus.mkdir()
    for i in range(12):  # word-level tiny tokenizer: w0 ... w123
        (corpus / f"doc{i}.txt").write_text(" ".join(f"w{rng.randrange(124)}" for _ in range(100)))
    return root
