"""The fine-tuning data pipeline: sources, formats, loss masks, packing and the held-out split."""

from __future__ import annotations

import json
import re
import string

import pytest
import torch
from pydantic import ValidationError

from linearize.data import IGNORE_INDEX, DataError, DataSource, builtin_documents
from linearize.errors import LinearizeError
from linearize.training.data import DataConfig, load_data

CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
# Like Qwen3's template: only a final assistant turn gets an (empty) think block, so a conversation's rendering
# is not an extension of the rendering of its first turns.
THINKING = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
    "{% if m['role'] == 'assistant' and loop.last %}<think>\n\n</think>\n\n{% endif %}"
    "{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

ALPACA = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request."
    "\n\n### Instruction:\n{}\n\n### Response:\n"
)


def byte_tokenizer(chat_template: str | None = CHATML):
    """One token per byte plus special tokens, so every text round-trips; it has EOS but no pad token."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {c: i for i, c in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>")
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tokenizer.chat_template = chat_template
    return tokenizer


@pytest.fixture
def tokenizer():
    return byte_tokenizer()


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


def expected_stream(tokenizer, documents):
    """Token ids and labels of documents, each a list of (text, trained) segments, laid end to end: no document's
    first token is a target (it is the label of the EOS before it)."""
    ids, labels = [], []
    for segments in documents:
        first = len(ids)
        for text, trained in segments:
            segment = tokenizer(text, add_special_tokens=False)["input_ids"]
            ids += segment
            labels += segment if trained else [IGNORE_INDEX] * len(segment)
        if first:
            labels[first] = IGNORE_INDEX
    return ids, labels


def assert_packed(packs, tokenizer, documents, seq_len):
    """The packs are the documents' stream cut into full rows of seq_len, the partial tail dropped."""
    ids, labels = expected_stream(tokenizer, documents)
    rows = len(ids) // seq_len
    assert packs.input_ids.shape == packs.labels.shape == (rows, seq_len)
    assert packs.input_ids.flatten().tolist() == ids[: rows * seq_len]
    assert packs.labels.flatten().tolist() == labels[: rows * seq_len]


def load(tokenizer, *sources: DataSource, seq_len: int = 8, held_out: float | int = 0, seed: int = 0):
    return load_data(DataConfig(sources=list(sources), seq_len=seq_len, held_out=held_out), tokenizer, seed)


# ---------------------------------------------------------------- formats and packing


def test_text_files_of_a_glob_are_packed_in_order_all_trained(tmp_path, tokenizer):
    (tmp_path / "b.txt").write_text("second document, a little longer")
    (tmp_path / "a.md").write_text("first document")
    (tmp_path / "c.txt").write_text("   \n")  # blank files are no documents
    data = load(tokenizer, DataSource(path=str(tmp_path / "*")), seq_len=7)
    documents = [[("first document</s>", True)], [("second document, a little longer</s>", True)]]
    assert_packed(data.train, tokenizer, documents, 7)
    item = data.train[1]
    assert item["input_ids"].dtype == item["labels"].dtype == torch.long and item["input_ids"].shape == (7,)
    assert data.train.num_trained_tokens == data.train.num_tokens - 1 == len(data.train) * 7 - 1  # second's 's'
    assert len(data.held_out) == 0 and data.held_out.input_ids.shape == (0, 7)
    assert any("2 documents (text)" in note for note in data.notes)
    note = "train: 2 documents -> 6 packs of 7 tokens (42 tokens, 98% trained; the last 6, short of a pack, left out)"
    assert note in data.notes  # 48 tokens: 6 full packs, and the tail the log names


def test_blank_text_records_are_no_documents(tmp_path, tokenizer):
    """As blank files are not: WikiText's empty rows would each add a lone EOS (after a BOS: a trained BOS -> EOS)
    and count as documents for the held-out share."""
    path = write_jsonl(tmp_path / "rows.jsonl", [{"text": "abc"}, {"text": ""}, {"text": " \n"}, {"text": "de"}])
    data = load(tokenizer, DataSource(path=path), seq_len=3)
    assert_packed(data.train, tokenizer, [[("abc</s>", True)], [("de</s>", True)]], 3)
    assert any("2 documents (text)" in note for note in data.notes)


def test_a_document_that_ends_with_eos_gets_no_second_one(tmp_path, tokenizer):
    """Data prepared for other trainers often appends the EOS token's text to each text or response: EOS once, not an
    EOS trained to follow an EOS."""
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": "abc</s>"}, {"text": "de"}])
    documents = [[("abc</s>", True)], [("de</s>", True)]]
    assert_packed(load(tokenizer, DataSource(path=path), seq_len=3).train, tokenizer, documents, 3)
    path = write_jsonl(tmp_path / "i.jsonl", [{"instruction": "Hi", "output": "Yo</s>"}] * 2)
    data = load(tokenizer, DataSource(path=path), seq_len=16)
    assert_packed(data.train, tokenizer, [[(ALPACA.format("Hi"), False), ("Yo</s>", True)]] * 2, 16)


def test_instruction_records_train_only_the_response_and_eos(tmp_path, tokenizer):
    path = write_jsonl(
        tmp_path / "alpaca.jsonl",
        [
            {"instruction": "Add the numbers.", "input": "2 and 3", "output": "5"},
            {"instruction": "Name a colour.", "input": "", "output": "Blue."},
        ],
    )
    data = load(tokenizer, DataSource(path=path), seq_len=4)
    with_input = (
        "Below is an instruction that describes a task, paired with an input that provides further context. "
        "Write a response that appropriately completes the request.\n\n"
        "### Instruction:\nAdd the numbers.\n\n### Input:\n2 and 3\n\n### Response:\n"
    )
    without_input = ALPACA.format("Name a colour.")
    documents = [[(with_input, False), ("5</s>", True)], [(without_input, False), ("Blue.</s>", True)]]
    assert_packed(data.train, tokenizer, documents, 4)
    assert data.warnings == [
        "95 of 97 training packs hold no trained token (prompts longer than a pack?): LoRA steps learn nothing from "
        "them (attention transfer does); a longer data.seq_len trains their responses"
    ]


def test_parquet_instruction_records_with_null_input(tmp_path, tokenizer):
    import pyarrow as pa
    import pyarrow.parquet as pq

    records = [{"instruction": "Say hi.", "input": None, "output": "Hi!"}] * 3
    pq.write_table(pa.Table.from_pylist(records), tmp_path / "data.parquet")
    data = load(tokenizer, DataSource(path=str(tmp_path / "data.parquet")), seq_len=16)
    assert_packed(data.train, tokenizer, [[(ALPACA.format("Say hi."), False), ("Hi!</s>", True)]] * 3, 16)


def chat(*turns):
    return {"messages": [{"role": role, "content": content} for role, content in turns]}


def test_chat_trains_assistant_turns_and_their_end_of_turn(tmp_path, tokenizer):
    turns = [("system", "Be brief."), ("user", "Hi"), ("assistant", "Hello!"), ("user", "Bye"), ("assistant", "Bye.")]
    record = chat(*turns)
    data = load(tokenizer, DataSource(path=write_jsonl(tmp_path / "chat.jsonl", [record] * 2)), seq_len=8)
    segments = [
        ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n", False),
        ("Hello!<|im_end|>\n", True),
        ("<|im_start|>user\nBye<|im_end|>\n<|im_start|>assistant\n", False),
        ("Bye.<|im_end|>\n", True),
    ]
    assert_packed(data.train, tokenizer, [segments] * 2, 8)  # no EOS: the template delimits conversations


def test_chat_with_a_template_that_renders_the_last_turn_differently(tmp_path):
    tokenizer = byte_tokenizer(THINKING)
    record = chat(("user", "Hi"), ("assistant", "Hello!"), ("user", "Bye"), ("assistant", "Bye."))
    data = load(tokenizer, DataSource(path=write_jsonl(tmp_path / "chat.jsonl", [record])), seq_len=2)
    segments = [
        ("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n", False),
        ("Hello!<|im_end|>\n", True),
        ("<|im_start|>user\nBye<|im_end|>\n<|im_start|>assistant\n", False),
        ("<think>\n\n</think>\n\nBye.<|im_end|>\n", True),
    ]
    assert_packed(data.train, tokenizer, [segments], 2)


def sentencepiece_tokenizer():
    """A tokenizer like Llama 2's, Mistral's or Phi-3's (transformers' LlamaTokenizer: SentencePiece's Metaspace, bytes
    as fallback): it opens every text it is given with "▁", a space, so a text cut in two does not tokenize as the
    two halves do."""
    from transformers import LlamaTokenizer

    pieces = ["<unk>", "<s>", "</s>", *(f"<0x{b:02X}>" for b in range(256)), "▁", *string.ascii_letters, *".:!"]
    tokenizer = LlamaTokenizer(vocab={piece: i for i, piece in enumerate(pieces)}, merges=[])
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tokenizer.chat_template = CHATML
    return tokenizer


@pytest.mark.parametrize("fmt", ["instruction", "chat"])
def test_documents_tokenize_whole_as_their_text_does_anywhere_else(fmt, tmp_path):
    """A response tokenized apart from its prompt would open with "▁" on such a tokenizer: a space that the text does
    not have, trained to come after every prompt. The document is tokenized whole; its prompt tokens are still
    those of the prompt alone."""
    tokenizer = sentencepiece_tokenizer()
    if fmt == "instruction":
        record, prompt = {"instruction": "Say it.", "output": "Done"}, ALPACA.format("Say it.")
        text, eos = prompt + "Done", [tokenizer.eos_token_id]
    else:
        record, prompt = (
            chat(("user", "Hi"), ("assistant", "Done")),
            "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n",
        )
        text, eos = prompt + "Done<|im_end|>\n", []
    data = load(tokenizer, DataSource(path=write_jsonl(tmp_path / "d.jsonl", [record])), seq_len=2)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"] + eos
    untrained = len(tokenizer(prompt, add_special_tokens=False)["input_ids"])
    assert data.train.input_ids.flatten().tolist() == ids[: len(ids) // 2 * 2]
    assert data.train.labels.flatten().tolist() == ([IGNORE_INDEX] * untrained + ids[untrained:])[: len(ids) // 2 * 2]
    assert "\nDone" in tokenizer.decode(data.train.input_ids.flatten())


def test_auto_format_and_custom_fields(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "d.jsonl", [{"body": "some text here", "id": 1}])
    data = load(tokenizer, DataSource(path=path, text_field="body"), seq_len=4)
    assert_packed(data.train, tokenizer, [[("some text here</s>", True)]], 4)
    convo = [{"conversation": chat(("user", "Hi"), ("assistant", "Yo"))["messages"]}]
    path = write_jsonl(tmp_path / "c.jsonl", convo)
    data = load(tokenizer, DataSource(path=path, messages_field="conversation"), seq_len=4)
    assert any("(chat)" in note for note in data.notes)


def test_record_fields_where_no_record_has_them_are_refused():
    # text_field and messages_field name fields of records: on raw text, or records of another format, they were
    # taken and ignored
    for source, message in [
        (dict(builtin="english", text_field="body"), "text_field names a field of records, and builtin english"),
        (dict(path="notes/*.md", messages_field="turns"), "messages_field names a field of records, and notes/*.md"),
        (dict(path="a.jsonl", format="instruction", text_field="body"), "text_field names the field of text records"),
        (dict(path="a.jsonl", format="text", messages_field="turns"), "messages_field names the field of chat records"),
    ]:
        with pytest.raises(ValidationError, match=re.escape(message)):
            DataSource(**source)
    assert DataSource(path="a.jsonl", format="chat", messages_field="turns").messages_field == "turns"
    assert DataSource(path="data/*", text_field="body").text_field == "body"  # may match record files
    assert DataSource(builtin="english", text_field="text", messages_field="messages")  # what resolved recipes write


def test_a_byte_order_mark_is_not_text(tmp_path, tokenizer):
    """Files saved by editors that write a UTF-8 BOM read as the same records and text."""
    (tmp_path / "a.jsonl").write_text('{"text": "first"}\n', encoding="utf-8-sig")
    (tmp_path / "b.txt").write_text("second", encoding="utf-8-sig")
    data = load(tokenizer, DataSource(path=str(tmp_path / "*")), seq_len=3)
    assert_packed(data.train, tokenizer, [[("first</s>", True)], [("second</s>", True)]], 3)


@pytest.mark.parametrize("suffix", ["jsonl", "json", "txt"])
def test_a_byte_that_is_not_utf8_is_located_by_its_line(suffix, tmp_path, tokenizer):
    """A Latin-1 byte deep in a large file (after a BOM): the message says on which line it is, to find and fix it."""
    lines = [b'{"text": "' + b"w" * 100 + b'"}'] * 999 + [b'{"text": "caf\xe9"}']
    path = tmp_path / f"data.{suffix}"
    path.write_bytes(b"\xef\xbb\xbf" + (b"[" + b",\n".join(lines) + b"]" if suffix == "json" else b"\n".join(lines)))
    with pytest.raises(DataError, match=rf"data.{suffix} is not UTF-8 text \(byte 0xe9 on line 1000 cannot be"):
        load(tokenizer, DataSource(path=str(path)))


@pytest.mark.parametrize("name", ["locked.txt", "locked.jsonl"])
def test_an_unreadable_file_is_named(name, tmp_path, tokenizer, unreadable_locked):
    (tmp_path / name).write_text('{"text": "words"}\n')
    with pytest.raises(DataError, match=f"cannot read {tmp_path / name}: Permission denied; check that it is readable"):
        load(tokenizer, DataSource(path=str(tmp_path / name)))


def test_json_list_and_max_documents(tmp_path, tokenizer):
    (tmp_path / "d.json").write_text(json.dumps([{"text": f"document number {i}"} for i in range(10)]))
    data = load(tokenizer, DataSource(path=str(tmp_path / "d.json"), max_documents=2), seq_len=4)
    documents = [[("document number 0</s>", True)], [("document number 1</s>", True)]]
    assert_packed(data.train, tokenizer, documents, 4)


def test_builtin_corpus_is_the_default_and_loads_offline(tokenizer):
    data = load_data(DataConfig(seq_len=512), tokenizer)
    assert len(data.train) > 100 and len(data.held_out) > 0
    masked = data.train.labels == -100  # text: every token is a target but a document's first
    assert torch.equal(data.train.labels[~masked], data.train.input_ids[~masked])
    assert (data.train.position_ids[masked] == 0).all()
    assert masked[:, 1:].sum() == (data.train.position_ids[:, 1:] == 0).sum() > 300  # (a pack's first: no target)
    assert any(note.startswith("builtin english [train]: 379 documents") for note in data.notes)


def test_builtin_splits_are_disjoint_general_english_from_every_source():
    import gzip
    from importlib import resources

    train, test = builtin_documents("train"), builtin_documents("test")
    assert (len(train), len(test)) == (379, 41)
    assert not set(train) & set(test)
    with resources.files("linearize").joinpath("corpus/english.jsonl.gz").open("rb") as raw, gzip.open(raw) as f:
        records = [json.loads(line) for line in f]
    sources = {"c4", "wikipedia", "gutenberg-3261", "gutenberg-16215"}
    for split in ("train", "test"):
        assert {r["source"] for r in records if r["split"] == split} == sources
    attributed = resources.files("linearize").joinpath("corpus/README.md").read_text()
    assert all(f"`{source}`" in attributed for source in sources)
    with pytest.raises(ValueError, match="splits train, test, not 'validation'"):
        builtin_documents("validation")


def test_a_builtin_split_reaches_the_packs(tokenizer):
    source = DataSource(builtin="english", split="test", max_documents=1)
    data = load(tokenizer, source, seq_len=16)
    first = tokenizer(builtin_documents("test")[0], add_special_tokens=False)["input_ids"]
    assert data.train.input_ids.flatten()[:16].tolist() == first[:16]
    assert data.warnings[0].startswith("builtin english [test] is the text that `linearize eval --text builtin`")
    with pytest.raises(ValidationError, match="builtin corpus has the splits train and test, not 'validation'"):
        DataSource(builtin="english", split="validation")
    with pytest.raises(ValidationError, match="split applies to a dataset or the builtin corpus; a path reads"):
        DataSource(path="a.txt", split="test")


def test_local_dataset_folder_through_datasets(tmp_path, monkeypatch, tokenizer):
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "cache")
    folder = tmp_path / "ds"
    folder.mkdir()
    write_jsonl(folder / "train.jsonl", [{"text": f"row {i}"} for i in range(5)])
    data = load(tokenizer, DataSource(dataset=str(folder), max_documents=3), seq_len=2)
    assert_packed(data.train, tokenizer, [[(f"row {i}</s>", True)] for i in range(3)], 2)
    (folder / "train.jsonl").write_text('{"text": "row 0"}\n{"text": \n')  # a record cut short
    with pytest.raises(LinearizeError, match=r"dataset .*ds could not be read: .*; fix the file, or read it as a"):
        load(tokenizer, DataSource(dataset=str(folder)), seq_len=2)


# ---------------------------------------------------------------- held-out split


def numbered_documents(tmp_path, count=20):
    # "docNN</s>" is 6 tokens, so with seq_len 6 every pack is exactly one document
    return DataSource(path=write_jsonl(tmp_path / "docs.jsonl", [{"text": f"doc{i:02}"} for i in range(count)]))


def documents_of(packs, tokenizer):
    return [tokenizer.decode(row).removesuffix("</s>") for row in packs.input_ids]


def test_held_out_documents_are_disjoint_seeded_and_in_order(tmp_path, tokenizer):
    source = numbered_documents(tmp_path)
    first = load(tokenizer, source, seq_len=6, held_out=0.2, seed=1)
    train, held = documents_of(first.train, tokenizer), documents_of(first.held_out, tokenizer)
    assert len(held) == 4 and not set(train) & set(held)
    assert sorted(train + held) == [f"doc{i:02}" for i in range(20)]
    assert train == sorted(train) and held == sorted(held)  # the split keeps the sources' order
    again = load(tokenizer, source, seq_len=6, held_out=0.2, seed=1)
    assert torch.equal(again.held_out.input_ids, first.held_out.input_ids)
    other = load(tokenizer, source, seq_len=6, held_out=0.2, seed=2)
    assert documents_of(other.held_out, tokenizer) != held


def test_no_copy_of_a_held_out_document_is_trained_on(tmp_path, tokenizer):
    source = numbered_documents(tmp_path)  # given twice, to weigh it double: each document is there twice
    data = load(tokenizer, source, source, seq_len=6, held_out=4)
    train, held = documents_of(data.train, tokenizer), documents_of(data.held_out, tokenizer)
    assert len(held) == 4 and not set(train) & set(held)
    assert set(train) | set(held) == {f"doc{i:02}" for i in range(20)}
    assert len(train) == 40 - 2 * len(set(held))  # both copies of each held-out document are out of training
    assert f"left out of training: {40 - 4 - len(train)} documents identical to held-out ones" in " ".join(data.notes)


def test_held_out_count_and_a_tiny_fraction_hold_out_at_least_one(tmp_path, tokenizer):
    source = numbered_documents(tmp_path)
    assert len(load(tokenizer, source, seq_len=6, held_out=3).held_out) == 3
    assert len(load(tokenizer, source, seq_len=6, held_out=0.001).held_out) == 1


def test_held_out_errors(tmp_path, tokenizer):
    source = numbered_documents(tmp_path, count=4)
    with pytest.raises(LinearizeError, match=r"has 4 documents, all held out \(held_out=4\); lower held_out"):
        load(tokenizer, source, seq_len=6, held_out=4)
    # one long text: a positive fraction holds out at least one document, so only 0 can train on it
    one = DataSource(path=write_jsonl(tmp_path / "book.jsonl", [{"text": "a" * 599}]))
    with pytest.raises(LinearizeError, match=r"has 1 document, all held out \(held_out=0.01\); set held_out: 0"):
        load(tokenizer, one, seq_len=6, held_out=0.01)
    assert len(load(tokenizer, one, seq_len=6, held_out=0).train) == 100
    with pytest.raises(LinearizeError, match=r"held-out data has 6 tokens, fewer than one pack of seq_len=12"):
        load(tokenizer, source, seq_len=12, held_out=1)


# ---------------------------------------------------------------- bad input


def test_missing_file_empty_glob_and_folder(tmp_path, tokenizer):
    with pytest.raises(LinearizeError, match="not found"):
        load(tokenizer, DataSource(path=str(tmp_path / "nope.jsonl")))
    with pytest.raises(LinearizeError, match=r"no file matches .*\*\.jsonl"):
        load(tokenizer, DataSource(path=str(tmp_path / "*.jsonl")))
    with pytest.raises(LinearizeError, match="is a folder"):
        load(tokenizer, DataSource(path=str(tmp_path)))
    (tmp_path / "data.csv").write_text("a,b\n")
    with pytest.raises(LinearizeError, match=r"data\.csv.*must end in"):
        load(tokenizer, DataSource(path=str(tmp_path / "data.csv")))


def test_a_file_whose_name_looks_like_a_glob_is_that_file(tmp_path, tokenizer):
    (tmp_path / "part[1].jsonl").write_text('{"text": "w1 w2 w3"}\n')
    assert load(tokenizer, DataSource(path=str(tmp_path / "part[1].jsonl")))  # read, not matched as a glob
    with pytest.raises(LinearizeError, match=r"no file matches .*part\[2\]\.jsonl"):  # a glob when no such file
        load(tokenizer, DataSource(path=str(tmp_path / "part[2].jsonl")))


def test_bad_jsonl_line_names_file_and_line(tmp_path, tokenizer):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "fine"}\n\n{"text": oops}\n')
    with pytest.raises(LinearizeError, match=r"bad\.jsonl, line 3: not valid JSON"):
        load(tokenizer, DataSource(path=str(path)))


def test_json_lines_named_json_and_a_list_named_jsonl_say_how_to_name_them(tmp_path, tokenizer):
    """The two JSON layouts swapped, as a download or an export names them: the message names the suffix to use."""
    lines = tmp_path / "lines.json"
    lines.write_text('{"text": "a"}\n{"text": "b"}\n')
    with pytest.raises(LinearizeError, match=r"lines\.json: not valid JSON \(Extra data, line 2.*name it \.jsonl"):
        load(tokenizer, DataSource(path=str(lines)))
    listed = tmp_path / "list.jsonl"
    listed.write_text('[{"text": "a"}, {"text": "b"}]\n')
    with pytest.raises(LinearizeError, match=r"list\.jsonl, line 1: a record must be an object.*got list.*\.json file"):
        load(tokenizer, DataSource(path=str(listed)))


def test_records_without_expected_fields(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "qa.jsonl", [{"question": "q", "answer": "a"}])
    with pytest.raises(LinearizeError, match=r"fields \['answer', 'question'\]; expected 'text'.*'instruction'"):
        load(tokenizer, DataSource(path=path))
    path = write_jsonl(tmp_path / "mixed.jsonl", [{"text": "a"}, {"body": "b"}])
    with pytest.raises(LinearizeError, match=r"mixed\.jsonl, line 2: text record lacks \['text'\]; its fields.*"
                       r"the format of .*mixed\.jsonl's first record\): a source holds one format"):  # fmt: skip
        load(tokenizer, DataSource(path=path))
    with pytest.raises(LinearizeError, match=r"line 1: instruction record lacks .*, format: instruction\)"):
        load(tokenizer, DataSource(path=path, format="instruction"))
    with pytest.raises(LinearizeError, match="must be an object"):
        load(tokenizer, DataSource(path=write_jsonl(tmp_path / "list.jsonl", [[1, 2]])))


def test_empty_dataset_and_too_little_text(tmp_path, tokenizer):
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(LinearizeError, match="holds no documents"):
        load(tokenizer, DataSource(path=str(tmp_path / "empty.jsonl")))
    (tmp_path / "short.txt").write_text("tiny")
    with pytest.raises(LinearizeError, match=r"training data has 5 tokens, fewer than one pack of seq_len=1024"):
        load(tokenizer, DataSource(path=str(tmp_path / "short.txt")), seq_len=1024)


def test_raw_text_cannot_be_read_as_records(tmp_path, tokenizer):
    (tmp_path / "a.txt").write_text("plain text")
    with pytest.raises(LinearizeError, match="raw text, which has no chat records"):
        load(tokenizer, DataSource(path=str(tmp_path / "a.txt"), format="chat"))


def test_chat_records_need_a_chat_template(tmp_path):
    path = write_jsonl(tmp_path / "chat.jsonl", [chat(("user", "Hi"), ("assistant", "Yo"))])
    with pytest.raises(LinearizeError, match="no chat template"):
        load(byte_tokenizer(chat_template=None), DataSource(path=path))


def test_chat_template_errors_name_the_record(tmp_path):
    tokenizer = byte_tokenizer("{{ raise_exception('roles must alternate user/assistant') }}")
    path = write_jsonl(tmp_path / "chat.jsonl", [chat(("user", "Hi"), ("assistant", "Yo"))])
    with pytest.raises(LinearizeError, match=r"chat\.jsonl, line 1: the chat template cannot render.*must alternate"):
        load(tokenizer, DataSource(path=path))


def test_a_conversation_that_opens_with_the_assistant_is_named(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "chat.jsonl", [chat(("assistant", "Hello"), ("user", "Hi"), ("assistant", "Yo"))])
    with pytest.raises(LinearizeError, match=r"chat\.jsonl, line 1: the conversation opens with an assistant message"):
        load(tokenizer, DataSource(path=path))


def test_a_damaged_parquet_file_is_named(tmp_path, tokenizer):
    (tmp_path / "bad.parquet").write_bytes(b"not parquet")
    with pytest.raises(LinearizeError, match=r"bad\.parquet: not a readable Parquet file \(.*magic bytes"):
        load(tokenizer, DataSource(path=str(tmp_path / "bad.parquet")))


def test_conversations_without_an_assistant_turn_train_nothing(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "chat.jsonl", [chat(("user", "Hi there"))] * 4)
    with pytest.raises(LinearizeError, match="no token of the training data is trained"):
        load(tokenizer, DataSource(path=path), seq_len=4)


def test_dataset_not_cached_while_offline(tmp_path, monkeypatch, tokenizer):
    import datasets

    assert datasets.config.HF_HUB_OFFLINE  # tests/conftest.py: nothing here may reach the network
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path)
    with pytest.raises(LinearizeError, match=r"not in the local cache.*offline.*HF_HUB_OFFLINE.*run once online"):
        load(tokenizer, DataSource(dataset="someone/not-cached-anywhere"))


def test_tokenizer_without_pad_is_fine_without_eos_is_not(tmp_path, tokenizer):
    source = DataSource(path=write_jsonl(tmp_path / "d.jsonl", [{"text": "enough text for a pack"}]))
    assert tokenizer.pad_token is None
    assert any("no pad token" in note for note in load(tokenizer, source).notes)
    tokenizer.eos_token = None
    with pytest.raises(LinearizeError, match="no EOS token"):
        load(tokenizer, source)


def test_config_validation():
    assert DataConfig().sources == [DataSource(builtin="english")]
    with pytest.raises(ValidationError, match="exactly one of path, dataset or builtin"):
        DataSource(path="a.txt", builtin="english")
    with pytest.raises(ValidationError, match="exactly one of path, dataset or builtin"):
        DataSource()
    with pytest.raises(ValidationError, match="subset applies to a Hugging Face dataset only"):
        DataSource(path="a.txt", subset="x")
    with pytest.raises(ValidationError, match="fraction must be in"):
        DataConfig(held_out=1.0)
    with pytest.raises(ValidationError):
        DataConfig(seq_len=1)
    with pytest.raises(ValidationError):
        DataConfig(sources=[])
    with pytest.raises(ValidationError, match="Extra inputs"):
        DataSource(builtin="english", text="x")
    assert isinstance(DataConfig(held_out=5).held_out, int) and DataConfig(held_out=0).held_out == 0


def test_position_ids_restart_at_every_document_and_every_pack(tmp_path, tokenizer):
    (tmp_path / "a.txt").write_text("abcde")  # 5 bytes + EOS: tokens 0-5
    (tmp_path / "b.txt").write_text("xy")  # tokens 6-8
    (tmp_path / "c.txt").write_text("0123456789")  # tokens 9-19
    data = load(tokenizer, DataSource(path=str(tmp_path / "*.txt")), seq_len=8)
    assert data.train.position_ids.tolist() == [
        [0, 1, 2, 3, 4, 5, 0, 1],  # a, then b starts
        [0, 0, 1, 2, 3, 4, 5, 6],  # b's EOS, restarted with its pack, then c
    ]
    assert data.train[1]["position_ids"].tolist() == data.train.position_ids[1].tolist()
    # no target across a boundary: b's and c's first tokens are not predicted from the EOS before them (the loss
    # shifts labels by one), and every other token is
    ignored = (data.train.labels == -100).nonzero().tolist()
    assert ignored == [[0, 6], [1, 1]] and torch.equal(data.train.labels[0, :6], data.train.input_ids[0, :6])
    apart = load_data(DataConfig(sources=[DataSource(path=str(tmp_path / "*.txt"))], seq_len=8, held_out=0,
                                 document_boundaries=False), tokenizer)  # fmt: skip
    assert apart.train.position_ids is None and "position_ids" not in apart.train[0]
    assert torch.equal(apart.train.input_ids, data.train.input_ids)
    assert torch.equal(apart.train.labels, apart.train.input_ids)  # one stream: every next token is a target


def test_source_labels_reach_the_log_with_their_brackets():
    import io

    from rich.console import Console

    from linearize.training.report import Reporter

    out = io.StringIO()
    Reporter(None, console=Console(file=out)).info(f"{DataSource(builtin='english').label}: 379 documents")
    assert out.getvalue() == "builtin english [train]: 379 documents\n"  # not read as rich markup


def test_documents_open_with_the_bos_the_tokenizer_puts_before_a_text(tmp_path):
    """Llama 3 or Gemma tokenizers put BOS before every text: each packed document opens with it, as in their
    pretraining, untrained; a chat template that writes it itself gets no second one. Without such a BOS
    (SmolLM2, Qwen), nothing is added (the other tests)."""
    from tokenizers import processors

    tokenizer = byte_tokenizer("<s>{% for m in messages %}{{ m['content'] }}{% endfor %}")
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    assert bos not in tokenizer("ab")["input_ids"]
    tokenizer.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", bos)]
    )
    assert tokenizer("ab")["input_ids"][0] == bos
    (tmp_path / "a.txt").write_text("ab")
    (tmp_path / "b.txt").write_text("cde")
    data = load(tokenizer, DataSource(path=str(tmp_path / "*.txt")), seq_len=4)
    a, b = (tokenizer(text, add_special_tokens=False)["input_ids"] for text in ("ab", "cde"))
    assert data.train.input_ids.flatten().tolist() == [bos, *a, eos, bos, *b, eos][:8]
    assert data.train.labels.flatten().tolist() == [-100, *a, eos, -100, *b, eos][:8]
    assert data.train.position_ids.flatten().tolist() == [0, 1, 2, 3, 0, 1, 2, 3]
    path = write_jsonl(tmp_path / "chat.jsonl", [chat(("user", "Hi"), ("assistant", "Yo"))] * 4)
    data = load(tokenizer, DataSource(path=path), seq_len=5)
    assert data.train.input_ids[0, :2].tolist() == [bos, tokenizer("H", add_special_tokens=False)["input_ids"][0]]
