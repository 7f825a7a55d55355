from __future__ import annotations

import random
from pathlib import Path

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


@pytest.fixture
def unreadable_locked(monkeypatch):
    """Files named locked.* refuse to be read, as for a user without read permission (tests may run as root)."""
    open_file = Path.open

    def guarded(path, mode="r", *args, **kwargs):
        if path.stem == "locked" and "r" in mode:
            raise PermissionError(13, "Permission denied", str(path))
        return open_file(path, mode, *args, **kwargs)

    monkeypatch.setattr(Path, "open", guarded)
