"""Packed rows: documents laid end to end in one row, marked by position ids that restart, run exactly as the
documents run alone (outputs and every gradient), for every method, on the torch path and the Triton path."""

import pytest
import torch

from linearize import compat
from linearize.layers.base import DocumentBatch, length_groups, packed_document_ids
from linearize.training.transfer import original_model, teacher_attention
from tests.tiny import METHODS, converted_model

LENGTHS = [(13, 22, 5), (40,)]  # the documents of each row: a pack of three, and a row that is one document


def packed_rows(lengths=LENGTHS, vocab=128, seed=0):
    """Token ids [B, T] of random documents, their position ids (restarting per document) and the documents."""
    generator = torch.Generator().manual_seed(seed)
    documents = [[torch.randint(3, vocab, (n,), generator=generator) for n in row] for row in lengths]
    ids = torch.stack([torch.cat(row) for row in documents])
    positions = torch.stack([torch.cat([torch.arange(len(doc)) for doc in row]) for row in documents])
    return ids, positions, documents


def loss_weights(shape, seed=1):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def pack_and_apart(model, ids, positions, documents):
    """Logits and parameter gradients of the packed rows, and of every document run alone."""
    weights = loss_weights((*ids.shape, model.config.vocab_size))
    model.zero_grad()
    packed = model(ids, position_ids=positions, use_cache=False).logits
    (packed * weights).sum().backward()
    packed_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    model.zero_grad()
    apart, start = [], 0
    for row, docs in enumerate(documents):
        start = 0
        for doc in docs:
            logits = model(doc[None], use_cache=False).logits[0]
            (logits * weights[row, start : start + len(doc)]).sum().backward()
            apart.append(logits)
            start += len(doc)
    apart_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return packed.flatten(0, 1), torch.cat(apart), packed_grads, apart_grads


def assert_same(model, ids, positions, documents, tol=1e-4):
    packed, apart, packed_grads, apart_grads = pack_and_apart(model, ids, positions, documents)
    torch.testing.assert_close(packed, apart, rtol=tol, atol=tol)
    assert packed_grads.keys() == apart_grads.keys() and packed_grads
    for name, grad in packed_grads.items():
        torch.testing.assert_close(grad, apart_grads[name], rtol=tol, atol=tol, msg=name)


@pytest.mark.parametrize("method", METHODS)
def test_a_pack_of_documents_equals_the_documents_apart(method, monkeypatch):
    # documents of 40, 22, 13 and 5 tokens run as the batches {40}, {22} and {13, 5} (5 left-padded to 13)
    monkeypatch.setattr(DocumentBatch, "group_cost", 10)
    model = converted_model("llama", method).train()
    assert_same(model, *packed_rows())


@pytest.mark.parametrize("method", ["liger-sinks", "still"])
def test_packs_in_a_hybrid_with_softmax_layers_and_qk_norm(method):
    # the kept softmax layer keeps documents apart through transformers' mask for packed rows
    model = converted_model("qwen3", method, softmax_layers="0").train()
    assert_same(model, *packed_rows())


@pytest.mark.parametrize("call", ["model", "decoder"])
def test_packed_rows_need_no_use_cache_false(call):
    """Trainer's padding-free batches leave use_cache at the config's True: the documents still run apart, with no
    cache, through the model and through its decoder alone."""
    model = converted_model("llama", "liger")
    ids, positions, _ = packed_rows()
    if call == "model":
        default, apart = (model(ids, position_ids=positions, **flag) for flag in ({}, {"use_cache": False}))
        torch.testing.assert_close(default.logits, apart.logits, rtol=0, atol=0)
    else:
        default, apart = (model.model(ids, position_ids=positions, **flag) for flag in ({}, {"use_cache": False}))
        torch.testing.assert_close(default.last_hidden_state, apart.last_hidden_state, rtol=0, atol=0)
    assert getattr(default, compat.OUTPUT_CACHE_FIELD) is None


@pytest.mark.parametrize("method", ["liger-sinks", "still"])
def test_rows_flattened_by_transformers_collator_keep_their_documents_apart(method):
    """A training loop of one's own packs rows with transformers' DataCollatorWithFlattening (README, "Loading a
    converted model"): position ids that restart, labels, and with `return_flash_attn_kwargs` the cumulative lengths
    that flash attention reads, which converted layers do without."""
    from transformers import DataCollatorWithFlattening

    model = converted_model("llama", method, softmax_layers="1")
    _, _, documents = packed_rows(lengths=[(9, 14, 5)])
    collator = DataCollatorWithFlattening(return_tensors="pt", return_flash_attn_kwargs=True, return_seq_idx=True)
    batch = collator([{"input_ids": doc.tolist()} for doc in documents[0]])
    with torch.no_grad():
        packed = model(**batch)
        apart = torch.cat([model(doc[None], use_cache=False).logits[0] for doc in documents[0]])
    torch.testing.assert_close(packed.logits[0], apart, rtol=1e-4, atol=1e-4)
    assert torch.isfinite(packed.loss)


def test_without_restarting_positions_the_documents_run_together():
    model = converted_model("llama", "liger")
    ids, positions, documents = packed_rows()
    together = model(ids, use_cache=False).logits
    apart = model(ids, position_ids=positions, use_cache=False).logits
    assert torch.equal(together[1], apart[1])  # one document: nothing to keep apart
    assert not torch.allclose(together[0, 13:], apart[0, 13:], atol=1e-3)  # later documents saw earlier ones


def test_document_ids_and_the_padded_batches_of_documents(monkeypatch):
    positions = torch.tensor([[0, 1, 2, 0, 1, 0], [5, 6, 7, 8, 9, 10]])
    assert packed_document_ids(positions).tolist() == [[0, 0, 0, 1, 1, 2], [0, 0, 0, 0, 0, 0]]
    assert packed_document_ids(positions[1:]) is None
    x = torch.arange(1.0, 13.0).view(2, 6)  # no zeros: a zero is padding
    seen = []

    def attend(x, rotary, valid):
        seen.append(x.tolist())
        assert torch.equal(valid, x > 0) if valid is not None else bool((x > 0).all())
        return torch.stack([x, 2 * rotary[1]], -1)  # [N, L, 2]

    for group_cost, batches in [
        (100, [[[7, 8, 9, 10, 11, 12], [0, 0, 0, 1, 2, 3], [0, 0, 0, 0, 4, 5], [0, 0, 0, 0, 0, 6]]]),  # longest first
        (3, [[[7, 8, 9, 10, 11, 12]], [[1, 2, 3], [0, 4, 5], [0, 0, 6]]]),  # 6 + 9 + 2 * 3 against 4 * 6 + 3
    ]:
        seen.clear()
        monkeypatch.setattr(DocumentBatch, "group_cost", group_cost)
        out = DocumentBatch(packed_document_ids(positions)).run(attend, x, x, x)
        assert sorted(seen) == sorted(batches)
        assert torch.equal(out, torch.stack([x, 2 * x], -1))


def test_length_groups_minimise_the_tokens_run():
    assert length_groups([1500, 300, 248], 128) == [[0], [1, 2]]  # 2100 tokens in 2 groups
    assert length_groups([300, 248, 1500], 3000) == [[2, 0, 1]]  # 4500 + 3000 < 2100 + 2 * 3000
    assert length_groups([300, 248, 1500], 0) == [[2], [0], [1]]  # 2048 in 3 groups


def test_the_transfer_teacher_keeps_documents_apart():
    model = converted_model("llama", "liger")
    attn = model.model.layers[0].self_attn
    ids, positions, documents = packed_rows(lengths=[(9, 15)])
    hidden = model.model.embed_tokens(ids)
    rotary = model.model.rotary_emb(hidden, positions)
    teacher = teacher_attention(attn, hidden, rotary, None, packed_document_ids(positions))
    for start, end in ((0, 9), (9, 24)):
        alone = model.model.rotary_emb(hidden[:, start:end], positions[:, start:end])
        expected = teacher_attention(attn, hidden[:, start:end], alone, None)
        torch.testing.assert_close(teacher[:, start:end], expected, rtol=1e-5, atol=1e-5)


def test_the_distillation_teacher_keeps_documents_apart():
    model = converted_model("llama", "still")
    ids, positions, documents = packed_rows()
    with torch.no_grad(), original_model(model) as teacher:
        packed = teacher(ids, position_ids=positions, use_cache=False).logits.flatten(0, 1)
        apart = torch.cat([teacher(doc[None], use_cache=False).logits[0] for row in documents for doc in row])
    torch.testing.assert_close(packed, apart, rtol=1e-4, atol=1e-4)


@pytest.mark.triton
@pytest.mark.parametrize("method", METHODS)
def test_packs_on_the_triton_kernels_equal_the_documents_apart(method, monkeypatch):
    monkeypatch.setenv("LINEARIZE_BACKEND", "triton")
    model = converted_model("llama", method).train()
    assert_same(model, *packed_rows(lengths=[(7, 5)]))  # the interpreter is slow: one short pack
