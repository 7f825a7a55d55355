"""Fine-tuning data: the recipe's `data` section, and the training and held-out packs built from it.

The documents of every source (`linearize.data`: files, globs, Hugging Face datasets or the built-in corpus, in
text, instruction or chat format) are split into training and held-out sets before packing, so no held-out text is
ever trained on (copies of a held-out document are left out of training too); each set is packed
(`linearize.data.pack_documents`) into `seq_len` rows whose position ids restart at every document
(`document_boundaries: false` runs them together, as the Liger and LoLCATs reference code does).
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Literal

import torch
from pydantic import Field, field_validator

from ..comparison import counted
from ..data import (
    DataError,
    DataSource,
    Document,
    PackedSequences,
    next_token_targets,
    pack_documents,
    read_documents,
    require_eos,
)
from ..sections import Section


class DataConfig(Section):
    """What to train on, how long the packed sequences are, and how much is held out for evaluation."""

    sources: list[DataSource] = Field(
        default_factory=lambda: [DataSource(builtin="english")],
        min_length=1,
        description="where documents come from; documents of all sources are pooled in this order",
    )
    seq_len: int = Field(1024, gt=1, description="tokens per packed sequence")
    # int first: pydantic before 2.9 writes a union's value through its first member that takes it, and a float
    # takes an int (a count of 4 written as 4.0 reads back as a fraction out of range)
    held_out: int | float = Field(
        0.05,
        description="documents held out for evaluation: a fraction (0 <= f < 1) or a count; chosen by a seeded "
        "shuffle before packing, so no held-out text is trained on (nor a copy of it: a repeated document)",
    )
    template: Literal["alpaca"] = Field("alpaca", description="prompt template of instruction records")

    document_boundaries: bool = Field(
        True,
        description="keep the documents of a pack apart (positions restart at each one; no attention or linear "
        "state crosses into the next); false runs them together, as the Liger and LoLCATs reference code does",
    )

    @field_validator("held_out")
    @classmethod
    def _held_out_range(cls, value: int | float) -> int | float:
        if isinstance(value, float) and not 0 <= value < 1:
            raise ValueError("a fraction must be in [0, 1); give a whole number to hold out that many documents")
        if isinstance(value, int) and value < 0:
            raise ValueError("the number of held-out documents cannot be negative")
        return value


@dataclass
class FinetuneData:
    """The packed training and held-out sets, and human-readable facts about them for the log."""

    train: PackedSequences
    held_out: PackedSequences
    notes: list[str]
    warnings: list[str]  # what the user may want to change: shown even with --quiet


def load_data(config: DataConfig, tokenizer, seed: int = 0) -> FinetuneData:
    """Read every source, hold out documents for evaluation, tokenize and pack both sets.

    Args:
        config: the sources, sequence length and held-out share.
        tokenizer: a Hugging Face tokenizer; it needs an EOS token, and a chat template for chat data.
        seed: chooses the held-out documents (same seed, same split).

    Returns:
        The training and held-out packs, and notes for the log.
    """
    require_eos(tokenizer)
    notes, warnings = [], []
    if tokenizer.pad_token_id is None:
        notes.append("the tokenizer has no pad token; none is needed, every sequence is packed full to seq_len")
    documents: list[Document] = []
    for source in config.sources:
        found, fmt = read_documents(source, tokenizer, config.template)
        notes.append(f"{source.label}: {counted(len(found), 'document')} ({fmt})")
        if source.builtin is not None and source.split == "test":
            warnings.append(
                f"{source.label} is the text that `linearize eval --text builtin` scores; its perplexity "
                "after this run measures training text, not held-out text"
            )
        documents += found

    held = _held_out_indices(len(documents), config.held_out, seed)
    held_docs = [d for i, d in enumerate(documents) if i in held]  # both keep the sources' order
    # a source given twice, or a dataset with repeated records, holds copies: none of a held-out one is trained on
    held_texts = {_content(d) for d in held_docs}
    train_docs = [d for i, d in enumerate(documents) if i not in held and _content(d) not in held_texts]
    if copies := len(documents) - len(held_docs) - len(train_docs):
        notes.append(f"left out of training: {counted(copies, 'document')} identical to held-out ones")
    if not train_docs:
        # lowering a fraction cannot help: any positive one holds out a document (the only one of a single text)
        fix = "set held_out: 0" if isinstance(config.held_out, float) else "lower held_out"
        raise DataError(
            f"the data has {counted(len(documents), 'document')}, all held out (held_out={config.held_out}); {fix} "
            "or add documents"
        )

    train = pack_documents(train_docs, tokenizer, config.seq_len, "training", config.document_boundaries)
    if train.num_trained_tokens == 0:
        raise DataError(
            "no token of the training data is trained: the records hold prompts but no responses "
            "(instruction outputs or assistant messages); check the data or use format: text"
        )
    if untrained := _packs_without_targets(train):
        warnings.append(
            f"{untrained} of {len(train)} training packs hold no trained token (prompts longer than a pack?): LoRA "
            "steps learn nothing from them (attention transfer does); a longer data.seq_len trains their responses"
        )
    notes.append(_describe("train", len(train_docs), train, "trained"))
    if held_docs:
        held_out = pack_documents(held_docs, tokenizer, config.seq_len, "held-out", config.document_boundaries)
        notes.append(_describe("held out", len(held_docs), held_out, "scored"))
    else:
        empty = torch.empty(0, config.seq_len, dtype=torch.long)
        held_out = PackedSequences(empty, empty.clone())
        notes.append("held out: nothing (held_out is 0)")
    return FinetuneData(train=train, held_out=held_out, notes=notes, warnings=warnings)


def _content(document: Document) -> tuple:
    """What makes two documents the same text to train on."""
    return tuple(document.segments), document.eos


def _packs_without_targets(packs: PackedSequences) -> int:
    """How many packs have no trained next-token target (a pack that a long prompt fills)."""
    return int((~next_token_targets(packs.labels).any(dim=1)).sum())


def _describe(name: str, documents: int, packs: PackedSequences, use: str) -> str:
    """'train: 12 documents -> 30 packs of 512 tokens (15360 tokens, 98% trained; the last 211, short of a pack,
    left out)': `use` is what the loss does with the tokens it counts (trained, or scored when held out)."""
    share = packs.num_trained_tokens / packs.num_tokens
    tail = f"; the last {packs.left_out}, short of a pack, left out" if packs.left_out else ""
    return (
        f"{name}: {counted(documents, 'document')} -> {counted(len(packs), 'pack')} of {packs.input_ids.shape[1]} "
        f"tokens ({packs.num_tokens} tokens, {share:.0%} {use}{tail})"
    )


def _held_out_indices(count: int, held_out: float | int, seed: int) -> set[int]:
    """Indices of the held-out documents: a seeded sample, at least one document for any positive fraction."""
    wanted = math.ceil(held_out * count) if isinstance(held_out, float) else held_out
    return set(random.Random(seed).sample(range(count), min(wanted, count)))
