"""Attention transfer: the teacher is the source attention, only the student's trainable parameters get
gradients, and no graph is built through the frozen model. Distillation: the converted model computes the
source's logits inside `original_model`, and the loss is the KL divergence at the counted positions."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, get_peft_model
from torch.utils._python_dispatch import TorchDispatchMode

from linearize.data import next_token_targets
from linearize.training import transfer
from linearize.training.transfer import AttentionTransfer, distillation_loss, original_model, teacher_attention
from tests.tiny import FAMILIES, attention_projections, converted_model, source_attention_call, source_model


@pytest.mark.parametrize("family", FAMILIES)
def test_teacher_is_the_source_attention(family):
    """The teacher output through o_proj equals the source model's own attention module output."""
    source = source_model(family)
    converted = converted_model(family, "liger")
    ids = torch.randint(4, 128, (2, 12), generator=torch.Generator().manual_seed(0))
    converted_attn = converted.model.layers[1].self_attn
    inputs, expected = source_attention_call(source, 1, ids)
    teacher = teacher_attention(converted_attn, inputs["hidden_states"], inputs["position_embeddings"], None)
    torch.testing.assert_close(converted_attn.o_proj(teacher), expected, rtol=1e-5, atol=1e-5)


def test_padded_queries_are_left_out_and_real_rows_match_unpadded():
    model = converted_model("llama", "liger")
    attn = model.model.layers[0].self_attn
    x = torch.randn(1, 6, 64)
    cos, sin = model.model.rotary_emb(x, torch.arange(6)[None])
    unpadded = teacher_attention(attn, x, (cos, sin), None)
    padded_x = torch.cat([torch.randn(1, 3, 64), x], dim=1)
    positions = torch.cat([torch.zeros(3, dtype=torch.long), torch.arange(6)])[None]
    valid = torch.tensor([[False] * 3 + [True] * 6])
    padded = teacher_attention(attn, padded_x, model.model.rotary_emb(padded_x, positions), valid)
    assert not padded.isnan().any()
    torch.testing.assert_close(padded[:, 3:], unpadded, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", ["gemma2", "mistral"])
def test_teacher_by_blocks_of_queries_is_the_source_attention(family, monkeypatch):
    """Blocks of 5 queries (Gemma 2: capped logits and a window of 8; Mistral: padding) give the teacher of the
    whole sequence at once."""
    source = source_model(family)
    attn = converted_model(family, "liger", convert_layers="all").model.layers[0].self_attn
    ids = torch.randint(4, 128, (2, 12), generator=torch.Generator().manual_seed(0))
    inputs, expected = source_attention_call(source, 0, ids)
    x, rotary = inputs["hidden_states"], inputs["position_embeddings"]
    valid = torch.ones(2, 12, dtype=torch.bool)
    valid[1, :4] = False  # left padding: the real rows of the padded row match the unpadded call below
    monkeypatch.setattr(transfer, "TEACHER_BLOCK", 5)
    teacher = teacher_attention(attn, x, rotary, valid if family == "mistral" else None)
    torch.testing.assert_close(attn.o_proj(teacher[0]), expected[0], rtol=1e-5, atol=1e-5)
    if family == "mistral":
        unpadded = teacher_attention(attn, x[1:, 4:], tuple(t[-1:, 4:] for t in rotary), None)
        torch.testing.assert_close(teacher[1, 4:], unpadded[0], rtol=1e-5, atol=1e-5)
    else:
        torch.testing.assert_close(attn.o_proj(teacher), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("case", ["padding", "softcap"])
def test_teacher_makes_no_tensor_of_every_query_against_every_key(case, monkeypatch):
    """A mask or capped logits [T, T] grow with the square of the length, in every layer of a transfer step: the
    teacher takes its queries by blocks instead (here of 16: all heads' logits of a block stay under T^2)."""
    family = "gemma2" if case == "softcap" else "llama"
    attn = converted_model(family, "liger", convert_layers="all").model.layers[1].self_attn
    attn.source_window = None  # every key in reach: Gemma's window would bound the blocks' keys anyway
    monkeypatch.setattr(transfer, "TEACHER_BLOCK", 16, raising=False)
    length = 300
    x = torch.randn(1, length, 64)
    rotary = tuple(t.expand(1, length, -1) for t in (torch.ones(1, 1, attn.head_dim), torch.zeros(1, 1, attn.head_dim)))
    valid = (torch.arange(length) >= 3)[None] if case == "padding" else None
    largest = 0

    class Largest(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            nonlocal largest
            out = func(*args, **(kwargs or {}))
            sizes = [t.numel() for t in torch.utils._pytree.tree_leaves(out) if isinstance(t, torch.Tensor)]
            largest = max([largest, *sizes])
            return out

    with Largest():
        teacher_attention(attn, x, rotary, valid)
    assert largest < length * length


def _lora_model(family: str = "llama"):
    model = converted_model(family, "liger", convert_layers="all").train()  # no softmax layer builds a graph
    return get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=attention_projections(family)))


@pytest.mark.parametrize("family", FAMILIES)
def test_only_adapters_get_gradients_and_the_frozen_model_builds_no_graph(family):
    model = _lora_model(family)
    for name, p in model.named_parameters():
        if "lora_B" in name:  # nonzero B, so that A's gradient is nonzero too
            torch.nn.init.normal_(p, std=0.1)
    ids = torch.randint(4, 128, (2, 16), generator=torch.Generator().manual_seed(0))
    with AttentionTransfer(model, loss_scale=1.0) as transfer:
        out = model(input_ids=ids, use_cache=False)
        assert len(transfer.layer_losses) == len(model.config.converted_layers())
        loss = transfer.loss()
    assert loss > 0 and not out.logits.requires_grad  # the backward already ran, layer by layer
    for name, p in model.named_parameters():
        if "lora_" in name:
            assert p.grad is not None and p.grad.abs().sum() > 0, name
        else:
            assert p.grad is None, name


def test_layer_losses_are_each_layers_own_mse():
    """Each layer's MSE compares its student output with the teacher's, from teacher-consistent inputs."""
    model = converted_model("llama", "liger")
    source = source_model("llama")
    ids = torch.randint(4, 128, (1, 10), generator=torch.Generator().manual_seed(1))
    inputs = _attention_inputs(source, ids)
    with torch.no_grad(), AttentionTransfer(model) as transfer:
        model(input_ids=ids, use_cache=False)
        losses = list(transfer.layer_losses)
    for i, layer in enumerate(model.model.layers):
        hidden_states, position_embeddings = inputs[i]
        captured = {}
        handle = layer.self_attn.o_proj.register_forward_pre_hook(lambda m, a, seen=captured: seen.update(o=a[0]))
        with torch.no_grad():
            layer.self_attn(hidden_states=hidden_states, position_embeddings=position_embeddings)
        handle.remove()
        teacher = teacher_attention(layer.self_attn, hidden_states, position_embeddings, None)
        torch.testing.assert_close(losses[i], (captured["o"] - teacher).square().mean(), rtol=1e-4, atol=1e-8)


def test_after_a_lora_stage_layers_still_train_on_the_original_activations():
    """Adapters a lora stage trained outside what transfer trains (MLPs, a kept softmax layer, o_proj) are left out of
    the transfer forward, so each layer sees the original model's activations; its own q/k/v adapters stay in the
    student, and every adapter is as it was afterwards (requires_grad included)."""
    source = source_model("llama")
    model = converted_model("llama", "liger", softmax_layers="0")
    targets = [*attention_projections("llama"), "o_proj", "gate_proj", "down_proj"]
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=targets))
    for name, p in model.named_parameters():
        if "lora_B" in name:  # as a lora stage leaves them
            torch.nn.init.normal_(p, std=0.3)
        p.requires_grad_("lora_" in name and "layers.1.self_attn.q_proj" in name)
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    ids = torch.randint(4, 128, (1, 12), generator=torch.Generator().manual_seed(0))
    inputs, _ = source_attention_call(source, 1, ids)
    attn = model.base_model.model.model.layers[1].self_attn
    captured = {}
    handle = attn.o_proj.register_forward_pre_hook(lambda m, a: captured.update(student=a[0]))
    with torch.no_grad():
        attn(hidden_states=inputs["hidden_states"], position_embeddings=inputs["position_embeddings"])
        handle.remove()
        teacher = teacher_attention(attn, inputs["hidden_states"], inputs["position_embeddings"], None)
        before = model(input_ids=ids).logits
        with AttentionTransfer(model) as transfer:
            inside = model(input_ids=ids, use_cache=False).logits
            losses = list(transfer.layer_losses)
        after = model(input_ids=ids).logits
    torch.testing.assert_close(inside, source(ids).logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(losses[0], (captured["student"] - teacher).square().mean(), rtol=1e-4, atol=1e-8)
    torch.testing.assert_close(after, before, rtol=0, atol=0)
    assert {name for name, p in model.named_parameters() if p.requires_grad} == trainable


def _attention_inputs(source, ids: torch.Tensor) -> dict[int, tuple]:
    """Each layer's attention input (hidden states, rotary tables) when the source model reads `ids`."""
    inputs = {}
    for i, layer in enumerate(source.model.layers):
        layer.self_attn.register_forward_pre_hook(
            lambda m, a, kw, i=i: inputs.update({i: (kw["hidden_states"], kw["position_embeddings"])}), with_kwargs=True
        )
    with torch.no_grad():
        source(ids)
    return inputs


def test_a_step_gets_the_gradient_of_the_mean_layer_mse_on_the_original_activations():
    """The gradients of a transfer forward are those of `loss_scale` times the mean over layers of each layer's MSE,
    each layer reading the input the source model gives it."""
    model = _lora_model()
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.1)
    ids = torch.randint(4, 128, (1, 12), generator=torch.Generator().manual_seed(2))
    with AttentionTransfer(model, loss_scale=3.0):
        model(input_ids=ids, use_cache=False)
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    inputs = _attention_inputs(source_model("llama"), ids)
    layers = model.base_model.model.model.layers
    losses = []
    for i, layer in enumerate(layers):
        hidden_states, position_embeddings = inputs[i]
        captured = {}
        handle = layer.self_attn.o_proj.register_forward_pre_hook(lambda m, a, seen=captured: seen.update(o=a[0]))
        layer.self_attn(hidden_states=hidden_states, position_embeddings=position_embeddings)
        handle.remove()
        teacher = teacher_attention(layer.self_attn, hidden_states, position_embeddings, None)
        losses.append((captured["o"] - teacher).square().mean())
    (3.0 * torch.stack(losses).mean()).backward()
    assert grads.keys() == {name for name, p in model.named_parameters() if p.grad is not None}
    for name, grad in grads.items():
        torch.testing.assert_close(grad, dict(model.named_parameters())[name].grad, rtol=1e-4, atol=1e-6)


def test_the_student_output_is_not_projected():
    """o_proj (and its adapter) never multiplies the student output, which the teacher's replaces: the layer's loss
    reads it before o_proj."""
    model = converted_model("llama", "liger")
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "o_proj"]))
    calls = []
    for name, module in model.named_modules():
        if "o_proj." in name and isinstance(module, torch.nn.Linear):  # its base layer and its adapter's
            module.register_forward_hook(lambda m, a, out, name=name: calls.append(name))
    ids = torch.randint(4, 128, (1, 8), generator=torch.Generator().manual_seed(0))
    with AttentionTransfer(model) as transfer:
        model(input_ids=ids, use_cache=False)
        assert len(transfer.layer_losses) == len(model.config.converted_layers())
    assert calls == []


def test_hooks_are_removed_on_exit():
    model = converted_model("llama", "liger")
    ids = torch.randint(4, 128, (1, 8))
    with torch.no_grad():
        before = model(input_ids=ids, use_cache=False).logits
        with AttentionTransfer(model):
            model(input_ids=ids, use_cache=False)
        after = model(input_ids=ids, use_cache=False).logits
    torch.testing.assert_close(before, after, rtol=0, atol=0)


@pytest.mark.parametrize("family", FAMILIES)
def test_original_model_reproduces_the_source_logits_and_restores_the_student(family):
    source = source_model(family)
    model = converted_model(family, "liger", softmax_layers="0")  # a kept softmax layer has adapters too
    targets = [*attention_projections(family), "o_proj"]
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=targets))
    for name, p in model.named_parameters():
        if "lora_B" in name:  # adapters that change the model
            torch.nn.init.normal_(p, std=0.1)
    ids = torch.randint(4, 128, (2, 14), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        student = model(input_ids=ids).logits
        with original_model(model) as teacher:
            inside = teacher(input_ids=ids).logits
        after = model(input_ids=ids).logits
        expected = source(ids).logits
    torch.testing.assert_close(inside, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(after, student, rtol=0, atol=0)
    assert not torch.allclose(student, expected, atol=1e-2)


def test_original_model_keeps_frozen_adapters_frozen():
    """A stage that trains only the method's parameters beside adapters an earlier stage trained (distillation
    runs the teacher every step): the adapters stay out of the backward pass."""
    model = converted_model("llama", "parallax")
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=attention_projections("llama")))
    for name, p in model.named_parameters():
        p.requires_grad_("r_proj" in name)
    flags = {name: p.requires_grad for name, p in model.named_parameters()}
    with torch.no_grad(), original_model(model) as teacher:
        teacher(input_ids=torch.randint(4, 128, (1, 6)))
    assert {name: p.requires_grad for name, p in model.named_parameters()} == flags


def test_distillation_loss_is_the_kl_divergence_at_counted_positions():
    generator = torch.Generator().manual_seed(0)
    student, teacher = torch.randn(2, 5, 7, generator=generator), torch.randn(2, 5, 7, generator=generator)
    labels = torch.tensor([[-100, -100, 3, 4, 5], [-100, 1, 2, -100, -100]])
    expected = []
    for b, t in [(0, 1), (0, 2), (0, 3), (1, 0), (1, 1)]:  # position t predicts label t + 1
        p, q = teacher[b, t].softmax(-1), student[b, t].softmax(-1)
        expected.append((p * (p.log() - q.log())).sum())
    torch.testing.assert_close(distillation_loss(student, teacher, labels), torch.stack(expected).mean())
    assert distillation_loss(teacher, teacher, labels).abs() < 1e-6


def _kl_in_one_piece(student_logits, teacher_logits, labels):
    """The distillation loss as it was before it went by chunks: every counted position's log-softmax at once."""
    counted = next_token_targets(labels)
    student = student_logits[:, :-1][counted].float().log_softmax(-1)
    teacher = teacher_logits[:, :-1][counted].float().log_softmax(-1)
    return torch.nn.functional.kl_div(student, teacher, log_target=True, reduction="batchmean")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_distillation_loss_by_chunks_is_the_loss_and_gradient_in_one_piece(dtype, monkeypatch):
    """On a tiny model's logits (bfloat16 as under autocast), with prompts and padding left out and 17 counted
    positions, chunks of 4 (the last of 1): the loss and its gradient w.r.t. the student's logits are those of the
    log-softmaxes of every counted position at once, to fp32 rounding; the teacher gets no gradient."""
    monkeypatch.setattr(transfer, "KD_CHUNK_ELEMENTS", 4 * 128, raising=False)
    model = _lora_model()
    for name, p in model.named_parameters():
        if "lora_B" in name:  # a student that differs from its teacher
            torch.nn.init.normal_(p, std=1.0)
    ids = torch.randint(4, 128, (2, 12), generator=torch.Generator().manual_seed(0))
    labels = ids.clone()
    labels[0, :3] = -100  # a prompt
    labels[1, 9:] = -100  # padding
    assert int(next_token_targets(labels).sum()) == 17
    with torch.no_grad(), original_model(model) as teacher:
        teacher_logits = teacher(input_ids=ids).logits.to(dtype)
    student_logits = model(input_ids=ids).logits.detach().to(dtype).requires_grad_()
    loss = distillation_loss(student_logits, teacher_logits, labels)
    (grad,) = torch.autograd.grad(loss, student_logits)
    expected = _kl_in_one_piece(student_logits, teacher_logits, labels)
    (expected_grad,) = torch.autograd.grad(expected, student_logits)
    assert expected > 1e-2 and expected_grad.abs().max() > 1e-4
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-7)
    assert grad.dtype == dtype
    tolerance = {"rtol": 1e-5, "atol": 1e-7} if dtype == torch.float32 else {}  # bfloat16: one rounding apart
    torch.testing.assert_close(grad, expected_grad, **tolerance)


def test_distillation_loss_temporaries_do_not_grow_with_the_positions(monkeypatch):
    """300 counted positions by chunks of 16: forward and backward make one tensor of every position's values,
    the gradient w.r.t. the student's logits, and the rest for a chunk at a time (log-softmaxes, probabilities and
    the KL's terms at every position were several each, 400 MB each at 2048 tokens of a 49152-token vocabulary)."""
    monkeypatch.setattr(transfer, "KD_CHUNK_ELEMENTS", 16 * 64, raising=False)
    length, vocab = 301, 64
    generator = torch.Generator().manual_seed(0)
    student = torch.randn(1, length, vocab, generator=generator, requires_grad=True)
    teacher = torch.randn(1, length, vocab, generator=generator)
    labels = torch.zeros(1, length, dtype=torch.long)
    sizes = []

    class Sizes(TorchDispatchMode):  # the sizes of the tensors each op allocates (views of its inputs left out)
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            tensors = [t for t in torch.utils._pytree.tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
            given = {t.untyped_storage().data_ptr() for t in tensors}
            outs = [t for t in torch.utils._pytree.tree_leaves(out) if isinstance(t, torch.Tensor)]
            sizes.extend(t.numel() for t in outs if t.untyped_storage().data_ptr() not in given)
            return out

    with Sizes():
        distillation_loss(student, teacher, labels).backward()
    assert sorted(sizes)[-2] <= 16 * vocab and max(sizes) == student.numel()
    sizes.clear()
    with torch.no_grad(), Sizes():  # no gradient to make
        distillation_loss(student, teacher, labels)
    assert max(sizes) <= 16 * vocab
