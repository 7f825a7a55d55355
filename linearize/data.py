"""Documents, read from where they are and packed into rows of tokens: what fine-tuning and perplexity share.

A `DataSource` is a local file or glob, a Hugging Face dataset or the built-in English corpus (shipped with the
package for offline fine-tuning and perplexity; corpus/README.md says where each of its documents comes from and
under which licence). Every source yields documents (`read_documents`); a document is a list of text segments, each
marked trained or not (the prompt of an instruction record or the user turns of a conversation are not).
`pack_documents` tokenizes documents (each whole, its segments' tokens marked where they fall), concatenates them in
order, each opened with BOS where the tokenizer puts one before a text and closed with one EOS where it is a text or
instruction document (none is added to one that ends with it), and cuts the result into `seq_len` packs. Each pack
carries position ids that restart at every document (and at the pack's start), transformers' convention for packed
rows: the model then keeps the documents apart, so no attention or recurrent state carries one document into the
next. Labels are unshifted (the model shifts them) and -100 where no loss is taken.
"""

from __future__ import annotations

import functools
import glob
import gzip
import itertools
import json
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import Field, model_validator

from .errors import LinearizeError
from .sections import Section

BuiltinSplit = Literal["train", "test"]
BUILTIN_SPLITS: tuple[BuiltinSplit, ...] = ("train", "test")
IGNORE_INDEX = -100  # the label that transformers' loss skips

# Prompt templates of instruction records: without and with an input. The response follows the prompt directly.
PROMPT_TEMPLATES = {
    "alpaca": (
        "Below is an instruction that describes a task. Write a response that appropriately completes the request."
        "\n\n### Instruction:\n{instruction}\n\n### Response:\n",
        "Below is an instruction that describes a task, paired with an input that provides further context. "
        "Write a response that appropriately completes the request.\n\n"
        "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n",
    )
}

TEXT_SUFFIXES = (".txt", ".md", ".text")
RECORD_SUFFIXES = (".jsonl", ".json", ".parquet")


class DataError(LinearizeError, ValueError):
    """The data is missing, malformed or too small; the message names the problem and the fix."""


class TooFewTokens(DataError):
    """The text is shorter than one pack."""

    def __init__(self, message: str, tokens: int):
        super().__init__(message)
        self.tokens = tokens


class DataSource(Section):
    """One place documents come from: a local file or glob, a Hugging Face dataset, or the built-in corpus."""

    path: str | None = Field(
        None,
        description="local file or glob (e.g. data/*.jsonl): .txt/.md (one document per file), .jsonl, .json "
        "(a list of records) or .parquet",
    )
    dataset: str | None = Field(
        None, description="Hugging Face dataset name or local dataset folder, loaded with datasets.load_dataset"
    )
    builtin: Literal["english"] | None = Field(
        None,
        description="built-in offline corpus: 'english' is general English shipped with linearize (web pages, "
        "Wikipedia articles, novel chapters), split 'train' (the default) or 'test'",
    )
    subset: str | None = Field(None, description="configuration name of the Hugging Face dataset (dataset only)")
    split: str = Field(
        "train", description="split of the Hugging Face dataset (e.g. 'train' or 'train[:1000]') or of the builtin"
    )
    format: Literal["auto", "text", "instruction", "chat"] = Field(
        "auto",
        description="text (all tokens trained), instruction (alpaca fields instruction/input/output) or chat "
        "(a list of role/content messages); auto detects it from the fields of the first record",
    )
    text_field: str = Field("text", description="record field holding the text of text records")
    messages_field: str = Field("messages", description="record field holding the messages of chat records")
    max_documents: int | None = Field(None, gt=0, description="use at most this many documents (the first ones)")

    @model_validator(mode="after")
    def _one_origin(self) -> DataSource:
        given = [name for name in ("path", "dataset", "builtin") if getattr(self, name) is not None]
        if len(given) != 1:
            raise ValueError(f"give exactly one of path, dataset or builtin (got {', '.join(given) or 'none'})")
        if self.subset is not None and self.dataset is None:
            raise ValueError("subset applies to a Hugging Face dataset only; remove it or use `dataset`")
        if self.path is not None and self.split != "train":  # "train" is the default a resolved recipe writes
            raise ValueError("split applies to a dataset or the builtin corpus; a path reads its files whole")
        if self.builtin is not None and self.split not in BUILTIN_SPLITS:
            raise ValueError(f"the builtin corpus has the splits {' and '.join(BUILTIN_SPLITS)}, not {self.split!r}")
        return self

    @model_validator(mode="after")
    def _record_fields_read(self) -> DataSource:
        """Refuse text_field or messages_field where no record of their format is read (their defaults, which a
        resolved recipe writes, stay accepted)."""
        raw = self.builtin is not None or (self.path is not None and Path(self.path).suffix.lower() in TEXT_SUFFIXES)
        for key, fmt in (("text_field", "text"), ("messages_field", "chat")):
            if getattr(self, key) == type(self).model_fields[key].default:
                continue
            if raw:
                raise ValueError(
                    f"{key} names a field of records, and {self.label} is raw text (records come from "
                    f"{', '.join(RECORD_SUFFIXES)} files and datasets); remove it"
                )
            if self.format not in ("auto", fmt):
                raise ValueError(
                    f"{key} names the field of {fmt} records, and format: {self.format} reads none; remove it, or "
                    f"set format: {fmt} (or auto)"
                )
        return self

    @property
    def label(self) -> str:
        """How the source is named in notes and error messages."""
        if self.path is not None:
            return self.path
        if self.dataset is not None:
            return f"dataset {self.dataset}" + (f" ({self.subset})" if self.subset else "") + f" [{self.split}]"
        return f"builtin {self.builtin} [{self.split}]"


@dataclass
class Document:
    """Text segments in order, each trained or not, and whether an EOS (trained) follows them."""

    segments: list[tuple[str, bool]]
    eos: bool = True


def next_token_targets(labels: torch.Tensor) -> torch.Tensor:
    """`[..., T - 1]` bool: which positions' next token the loss counts (position t predicts label t + 1, so a
    sequence's first label is no one's target)."""
    return labels[..., 1:] != IGNORE_INDEX


@dataclass
class PackedSequences(torch.utils.data.Dataset):
    """Token packs of equal length; each item is a dict of `input_ids`, `labels` and (when documents are kept
    apart) `position_ids`, each LongTensor[seq_len]."""

    input_ids: torch.Tensor  # [N, seq_len]
    labels: torch.Tensor  # [N, seq_len]; input_ids where trained, IGNORE_INDEX elsewhere
    position_ids: torch.Tensor | None = None  # [N, seq_len]; restarting at 0 where a document starts
    left_out: int = 0  # tokens after the last full pack, which no pack holds

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def __getitem__(self, index: int | list[int] | slice) -> dict[str, torch.Tensor]:
        """One pack (each value `[seq_len]`), or several as a batch (each `[len(index), seq_len]`)."""
        item = {"input_ids": self.input_ids[index], "labels": self.labels[index]}
        if self.position_ids is not None:
            item["position_ids"] = self.position_ids[index]
        return item

    @property
    def num_tokens(self) -> int:
        return self.input_ids.numel()

    @property
    def num_trained_tokens(self) -> int:
        return int((self.labels != IGNORE_INDEX).sum())


# ---------------------------------------------------------------- packing


def require_eos(tokenizer) -> None:
    """Refuse a tokenizer without an EOS token, which `pack_documents` puts after every text or instruction
    document."""
    if tokenizer.eos_token_id is None:
        raise DataError(
            "the tokenizer has no EOS token, which ends every document and trained response in the packed data; "
            "set one (tokenizer.eos_token) or use the model's own tokenizer"
        )


def leading_bos(tokenizer) -> int | None:
    """The BOS id that `tokenizer` puts before a text by default (Llama 3, Gemma, Mistral: their pretraining documents
    begin with it, and Gemma's activations are far off without it), or None (GPT-2, Qwen, SmolLM2 put none)."""
    bos = tokenizer.bos_token_id
    return bos if bos is not None and tokenizer("x")["input_ids"][:1] == [bos] else None


def pack_documents(
    documents: list[Document], tokenizer, seq_len: int, name: str, boundaries: bool = True
) -> PackedSequences:
    """Tokenize `documents`, concatenate them in order and cut the result into full packs of `seq_len`; with
    `boundaries`, position ids restart at each document's first token and at each pack's first token, and no
    document's first token is a target (the token before it, the last document's EOS, cannot see it coming). `name`
    names the set in the error raised when it has fewer tokens than one pack."""
    bos = leading_bos(tokenizer)
    ids: list[int] = []
    labels: list[int] = []
    starts: list[int] = []  # where each document's tokens begin in `ids`
    for doc, (doc_ids, doc_labels) in zip(documents, _tokenized(documents, tokenizer), strict=True):
        starts.append(len(ids))
        if bos is not None and doc_ids[:1] != [bos]:  # a chat template may have written it
            ids.append(bos)
            labels.append(IGNORE_INDEX)  # a marker, not text to learn
        ids += doc_ids
        labels += doc_labels
        # data prepared for other trainers often ends each text with the EOS token's text already
        if doc.eos and (len(ids) == starts[-1] or ids[-1] != tokenizer.eos_token_id):
            ids.append(tokenizer.eos_token_id)
            labels.append(tokenizer.eos_token_id)
    packs = len(ids) // seq_len
    if packs == 0:
        raise TooFewTokens(
            f"the {name} data has {len(ids)} tokens, fewer than one pack of seq_len={seq_len}; "
            "add data, lower seq_len" + (" or hold out more documents" if name == "held-out" else ""),
            len(ids),
        )
    size = packs * seq_len  # the trailing partial pack is left out (`left_out`): every pack is full
    position_ids = None
    if boundaries:
        for start in starts[1:]:  # labels are unshifted: this is the target of the position before
            labels[start] = IGNORE_INDEX
        first = torch.zeros(len(ids), dtype=torch.bool)
        first[starts] = True
        first = first[:size].view(packs, seq_len)
        first[:, 0] = True
        index = torch.arange(seq_len).expand(packs, -1)
        position_ids = index - torch.where(first, index, 0).cummax(dim=1).values  # [packs, seq_len]
    return PackedSequences(
        torch.tensor(ids[:size], dtype=torch.long).view(packs, seq_len),
        torch.tensor(labels[:size], dtype=torch.long).view(packs, seq_len),
        position_ids,
        len(ids) - size,
    )


def _tokenized(documents: list[Document], tokenizer) -> Iterator[tuple[list[int], list[int]]]:
    """Each document's token ids and labels (the ids where its segment is trained, IGNORE_INDEX elsewhere).

    A document is tokenized whole, as its text is anywhere else: a segment tokenized alone may not tokenize as it
    does after the one before (SentencePiece tokenizers, Llama 2's, Mistral's or Phi-3's, open every text with a
    space, which a response after its prompt does not have). A segment's tokens end where the tokens of the text up
    to its end stop agreeing with the document's (a token that spans two segments belongs to the second)."""
    prefixes = [
        "".join(text for text, _ in doc.segments[: i + 1]) for doc in documents for i in range(len(doc.segments))
    ]
    # One batched call: fast tokenizers encode the batch in parallel; the BOS, if any, is added per document.
    encoded = iter(tokenizer(prefixes, add_special_tokens=False)["input_ids"] if prefixes else [])
    for doc in documents:
        upto = [next(encoded) for _ in doc.segments]  # the tokens of the text up to the end of each segment
        ids, labels = (upto[-1] if upto else []), []
        for (_, trained), tokens in zip(doc.segments, upto, strict=True):
            end = max(len(labels), _agreeing(tokens, ids))
            labels += ids[len(labels) : end] if trained else [IGNORE_INDEX] * (end - len(labels))
        yield ids, labels


def _agreeing(a: list[int], b: list[int]) -> int:
    """How many leading tokens `a` and `b` share."""
    return next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))


# ---------------------------------------------------------------- the built-in corpus


def builtin_documents(split: BuiltinSplit = "train") -> list[str]:
    """The documents of one split of the built-in corpus, in the file's (seeded random) order: "train" (379 web
    pages, Wikipedia articles and novel chapters) or "test" (41 others, never trained on by `builtin: english`)."""
    if split not in BUILTIN_SPLITS:
        raise ValueError(f"the built-in corpus has the splits {', '.join(BUILTIN_SPLITS)}, not {split!r}")
    return [record["text"] for record in _records() if record["split"] == split]


@functools.cache
def _records() -> tuple[dict, ...]:
    with resources.files("linearize").joinpath("corpus/english.jsonl.gz").open("rb") as raw, gzip.open(raw) as lines:
        return tuple(json.loads(line) for line in lines)


# ---------------------------------------------------------------- sources


def read_documents(source: DataSource, tokenizer, template: str = "alpaca") -> tuple[list[Document], str]:
    """The documents of one source (read lazily up to `max_documents`) and the formats they were read as."""
    found = list(itertools.islice(_documents(source, tokenizer, template), source.max_documents))
    if not found:
        raise DataError(f"{source.label} holds no documents; check the files or the split, or remove this source")
    return [doc for doc, _ in found], ", ".join(sorted({fmt for _, fmt in found}))


def _documents(source: DataSource, tokenizer, template: str) -> Iterator[tuple[Document, str]]:
    """Each document of `source` with its format."""
    if source.builtin is not None:
        yield from _from_texts(builtin_documents(source.split), source, source.label)
    elif source.dataset is not None:
        yield from _from_records(_dataset_records(source), source, tokenizer, template)
    else:
        for path in data_files(source.path):
            try:
                if path.suffix.lower() in TEXT_SUFFIXES:
                    yield from _from_texts([_read_text(path)], source, str(path))
                else:
                    yield from _from_records(_file_records(path), source, tokenizer, template)
            except OSError as error:  # a file without read permission, an I/O error
                raise DataError(f"cannot read {path}: {error.strerror or error}; check that it is readable") from None


def _from_texts(texts: Iterable[str], source: DataSource, where: str) -> Iterator[tuple[Document, str]]:
    if source.format not in ("auto", "text"):
        raise DataError(
            f"{where} is raw text, which has no {source.format} records; use format: text or "
            "give a .jsonl/.json/.parquet file of records"
        )
    yield from ((Document([(text, True)]), "text") for text in texts if text.strip())


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8-sig")  # -sig: a byte-order mark some editors write is not text
    except UnicodeDecodeError as error:
        raise DataError(_not_utf8(path, error)) from None


def _not_utf8(path: Path, error: UnicodeDecodeError, first_line: int = 1) -> str:
    """Where `error`, raised decoding `path` from line `first_line` on, found a byte that is not UTF-8."""
    byte = error.object[error.start]
    line = first_line + error.object.count(b"\n", 0, error.start)
    return (
        f"{path} is not UTF-8 text (byte 0x{byte:02x} on line {line} cannot be decoded: {error.reason}); "
        "convert it to UTF-8 (e.g. `iconv -f latin1 -t utf-8 FILE`) or leave it out of the data"
    )


def data_files(pattern: str) -> list[Path]:
    """The files that `pattern` (a path or a glob) names, sorted so that their order is reproducible. A file whose
    name only looks like a glob (data[1].jsonl) is that file."""
    pattern = os.path.expanduser(pattern)
    if glob.has_magic(pattern) and not Path(pattern).is_file():
        paths = sorted(Path(p) for p in glob.glob(pattern, recursive=True) if Path(p).is_file())
        if not paths:
            raise DataError(f"no file matches {pattern!r}; check the pattern (relative to {os.getcwd()})")
    else:
        path = Path(pattern)
        if path.is_dir():
            raise DataError(f"{pattern} is a folder; name its files with a glob, e.g. {pattern.rstrip('/')}/*.jsonl")
        if not path.is_file():
            raise DataError(f"data file {pattern} not found (relative to {os.getcwd()}); check the path")
        paths = [path]
    unknown = [str(p) for p in paths if p.suffix.lower() not in TEXT_SUFFIXES + RECORD_SUFFIXES]
    if unknown:
        raise DataError(
            f"cannot read {', '.join(unknown)}: data files must end in {', '.join(TEXT_SUFFIXES + RECORD_SUFFIXES)}"
        )
    return paths


# Records are (where, record) pairs, `where` locating the record for error messages.
def _file_records(path: Path) -> Iterator[tuple[str, Any]]:
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        yield from _jsonl_records(path)
        return
    if suffix == ".json":
        try:
            data = json.loads(_read_text(path))
        except json.JSONDecodeError as error:
            # more after one whole value: JSON Lines, most often, which Hugging Face datasets also name .json
            lines = "; for one JSON object per line (JSON Lines) name it .jsonl" if error.msg == "Extra data" else ""
            raise DataError(
                f"{path}: not valid JSON ({error.msg}, line {error.lineno}, column {error.colno}){lines}"
            ) from None
        if not isinstance(data, list):
            raise DataError(f"{path}: a .json data file must hold a list of records; use .jsonl for one per line")
        yield from ((f"{path}, record {i}", record) for i, record in enumerate(data))
        return
    import pyarrow
    import pyarrow.parquet

    try:
        rows = pyarrow.parquet.read_table(path).to_pylist()
    except pyarrow.ArrowException as error:
        raise DataError(f"{path}: not a readable Parquet file ({error}); check the file, or rewrite it") from None
    yield from ((f"{path}, row {i}", row) for i, row in enumerate(rows))


def _jsonl_records(path: Path) -> Iterator[tuple[str, Any]]:
    with path.open("rb") as lines:  # decoded line by line, so that a byte that is not UTF-8 is found by its line
        for number, raw in enumerate(lines, 1):
            try:
                line = raw.decode("utf-8-sig" if number == 1 else "utf-8")
            except UnicodeDecodeError as error:
                raise DataError(_not_utf8(path, error, number)) from None
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise DataError(
                    f"{path}, line {number}: not valid JSON ({error.msg}, column {error.colno}); "
                    "each line of a .jsonl file must be one JSON object"
                ) from None
            yield f"{path}, line {number}", record


_LOCAL_FILE = "give a local file instead (a recipe's `path`, eval's --text FILE)"


def _dataset_records(source: DataSource) -> Iterator[tuple[str, Any]]:
    """Records of a Hugging Face dataset, with errors of an offline or missing dataset made actionable."""
    try:
        import datasets
    except ImportError:
        raise DataError("Hugging Face datasets need the `datasets` package: pip install datasets") from None

    offline = datasets.config.HF_HUB_OFFLINE
    try:
        loaded = datasets.load_dataset(source.dataset, source.subset, split=source.split)
    except (ConnectionError, FileNotFoundError) as error:
        if offline and not Path(source.dataset).exists():
            raise DataError(
                f"dataset {source.dataset} is not in the local cache and the Hugging Face Hub is offline "
                f"(HF_HUB_OFFLINE is set); run once online (unset HF_HUB_OFFLINE) to cache it, or {_LOCAL_FILE} "
                f"({error})"
            ) from None
        raise DataError(
            f"dataset {source.dataset} could not be loaded: {error}; check its name on the Hub "
            f"and the network, or {_LOCAL_FILE}"
        ) from None
    except ValueError as error:  # an unknown subset or split
        raise DataError(f"dataset {source.dataset}: {error}") from None
    except datasets.exceptions.DatasetGenerationError as error:  # a file of the dataset that does not parse
        cause = error.__cause__ or error.__context__ or error
        raise DataError(
            f"dataset {source.dataset} could not be read: {type(cause).__name__}: {cause}; fix the file, or read it "
            "as a local file (a recipe's `path`, eval's --text FILE), which names the file and line of a bad record"
        ) from None
    yield from ((f"{source.label}, row {i}", record) for i, record in enumerate(loaded))


# ---------------------------------------------------------------- formats


def _detect(record: dict, where: str, source: DataSource) -> str:
    if source.format != "auto":
        return source.format
    if source.messages_field in record:
        return "chat"
    if "instruction" in record and "output" in record:
        return "instruction"
    if source.text_field in record:
        return "text"
    raise DataError(
        f"{where}: cannot tell the format from the fields {sorted(record)}; expected {source.text_field!r} (text), "
        f"'instruction' and 'output' (instruction) or {source.messages_field!r} (chat); set text_field or "
        "messages_field to the right field, or rename it"
    )


def _from_records(
    records: Iterable[tuple[str, Any]], source: DataSource, tokenizer, template: str
) -> Iterator[tuple[Document, str]]:
    """Documents of `records`, in the format set by the source or detected from the first record."""
    fmt = None
    needed = {"text": [source.text_field], "instruction": ["instruction", "output"], "chat": [source.messages_field]}
    for where, record in records:
        if not isinstance(record, dict):
            listed = "; a list of records is read from a .json file" if isinstance(record, list) else ""
            raise DataError(
                f"{where}: a record must be an object (a mapping of fields), got {type(record).__name__}{listed}"
            )
        if fmt is None:
            fmt = _detect(record, where, source)
            if fmt == "chat" and getattr(tokenizer, "chat_template", None) is None:
                raise DataError(
                    f"{source.label} holds chat records, but the tokenizer has no chat template to render them; use "
                    "a chat (instruct) model's tokenizer, or convert the data to instruction records "
                    "(instruction/input/output)"
                )
        missing = [field for field in needed[fmt] if field not in record]
        if missing:
            why = f"format: {fmt}" if source.format != "auto" else f"the format of {source.label}'s first record"
            raise DataError(
                f"{where}: {fmt} record lacks {missing}; its fields are {sorted(record)} (expected {needed[fmt]}, "
                f"{why}): a source holds one format; put records of another format in a source of their own"
            )
        if fmt == "text":
            text = _string(record, source.text_field, where)
            if text.strip():  # a blank record (WikiText's empty rows) would be a lone EOS, as a blank file would
                yield Document([(text, True)]), fmt
        elif fmt == "instruction":
            yield _instruction(record, where, template), fmt
        else:
            yield _chat(record[source.messages_field], where, tokenizer), fmt


def _string(record: dict, field: str, where: str) -> str:
    value = record[field]
    if not isinstance(value, str):
        raise DataError(f"{where}: field {field!r} must be a string, got {type(value).__name__}")
    return value


def _instruction(record: dict, where: str, template: str) -> Document:
    """An alpaca-style record: the prompt is not trained, the output and the EOS after it are."""
    instruction = _string(record, "instruction", where)
    given = record.get("input") or ""
    if not isinstance(given, str):
        raise DataError(f"{where}: field 'input' must be a string, got {type(given).__name__}")
    without_input, with_input = PROMPT_TEMPLATES[template]
    prompt = (
        with_input.format(instruction=instruction, input=given)
        if given.strip()
        else without_input.format(instruction=instruction)
    )
    return Document([(prompt, False), (_string(record, "output", where), True)])


def _chat(messages: Any, where: str, tokenizer) -> Document:
    """A conversation rendered with the tokenizer's chat template; assistant turns (and their end-of-turn) trained.

    Each assistant turn starts where the conversation before it, rendered with the generation prompt, ends, and ends
    where the conversation up to and including it ends. Templates that render a turn differently when it is the last
    one (Qwen3 adds an empty think block) break the second rule; for them the turn ends after its content and the
    end-of-turn text that the template puts after it.
    """
    if not isinstance(messages, list) or not all(
        isinstance(m, dict) and isinstance(m.get("role"), str) for m in messages
    ):
        raise DataError(f"{where}: chat messages must be a list of {{role, content}} objects")

    def render(upto: int, generation_prompt: bool = False) -> str:
        try:
            return tokenizer.apply_chat_template(
                messages[:upto], tokenize=False, add_generation_prompt=generation_prompt
            )
        except Exception as error:  # jinja raises its own types, and templates raise on conversations they reject
            raise DataError(f"{where}: the chat template cannot render this conversation: {error}") from None

    if messages and messages[0]["role"] == "assistant":  # no conversation before it to render as its prompt
        raise DataError(
            f"{where}: the conversation opens with an assistant message; a chat record starts with a system or user "
            "message (drop the opening assistant message, or move it into a system message)"
        )
    full = render(len(messages))
    cuts: list[tuple[int, int]] = []  # [start, end) of each assistant turn in `full`
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prompt = render(i, generation_prompt=True)
        if not full.startswith(prompt):
            raise DataError(
                f"{where}: the chat template renders message {i} differently depending on what follows, so its "
                "assistant reply cannot be located; convert the data to instruction records or use format: text"
            )
        upto = render(i + 1)
        if full.startswith(upto):
            cuts.append((len(prompt), len(upto)))
            continue
        content = message.get("content")
        at = full.find(content, len(prompt)) if isinstance(content, str) and content else -1
        tail = upto[upto.rfind(content) + len(content) :] if at >= 0 else ""
        if at < 0 or not full.startswith(tail, at + len(content)):
            raise DataError(
                f"{where}: assistant message {i} cannot be located in the rendered conversation; convert the data "
                "to instruction records or use format: text"
            )
        cuts.append((len(prompt), at + len(content) + len(tail)))

    segments, done = [], 0
    for start, end in cuts:
        segments += [(full[done:start], False), (full[start:end], True)]
        done = end
    segments.append((full[done:], False))
    # The template's own markers delimit conversations, so no EOS is added after them.
    return Document([(text, trained) for text, trained in segments if text], eos=False)
