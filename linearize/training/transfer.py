"""The original model inside a converted one: attention transfer (LoLCATs stage 1), where each converted layer
learns to reproduce the original attention, and the teacher of distillation (`original_model`).

While `AttentionTransfer` is active, every converted attention layer computes, from the same input, its own
output (the student, before `o_proj`) and the original softmax attention output (the teacher: the source's
frozen projections, RoPE and causal softmax). The layer's loss is `mse_factor * MSE(student, teacher)`, and
the layer passes the *teacher* output on through the original `o_proj`, so every layer trains on the inputs
the original model would give it (LoLCATs' stage 1, docs/methods.md §2.2). LoRA adapters outside the converted
layers' students (MLPs, kept softmax layers, o_proj: a lora stage before may have trained them) are off meanwhile;
the students' own stay on, whether or not the stage trains them.

Memory stays close to a forward pass: the frozen model builds no autograd graph, and each layer's loss is
back-propagated as soon as it is computed, inside the forward pass, so at most one layer's graph is alive.
The same backward-inside-forward is why data-parallel runs average these gradients explicitly rather than
through DDP's hooks.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager, nullcontext

import torch
import torch.nn.functional as F
from torch import nn

from ..data import next_token_targets
from ..kernels.window.chunk import attention as masked_attention
from ..layers.base import DocumentBatch, LinearizedAttention, source_linear

TEACHER_BLOCK = 256  # queries per block where the teacher needs a mask or capped logits


def lora_layers(module: nn.Module) -> list[nn.Module]:
    """The peft LoRA layers inside `module` (each switches its adapters on and off with `enable_adapters`)."""
    return [m for m in module.modules() if hasattr(m, "enable_adapters") and hasattr(m, "lora_A")]


@contextmanager
def adapters_off(layers: list[nn.Module]) -> Iterator[None]:
    """The adapters of these peft LoRA layers off inside the context (those that were on: on again after), and every
    parameter's requires_grad as it was: peft's switch also sets it, which is the training stage's to choose."""
    switched = [m for m in layers if not m.disable_adapters]
    requires_grad = {p: p.requires_grad for m in switched for p in m.parameters()}
    for module in switched:
        module.enable_adapters(False)
    try:
        yield
    finally:
        for module in switched:
            module.enable_adapters(True)
        for p, flag in requires_grad.items():
            p.requires_grad_(flag)


@torch.no_grad()
def teacher_attention(
    attn: LinearizedAttention,
    hidden_states: torch.Tensor,
    position_embeddings: tuple[torch.Tensor, torch.Tensor],
    valid: torch.Tensor | None,
    document_ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """The source model's causal softmax attention output before `o_proj`, `[B, T, H * D]`: within the source
    layer's sliding window if it has one, with its logit cap if it has one (Gemma).

    Args:
        attn: a converted layer, which still owns the source's projections (and q/k norms).
        hidden_states: the layer input `[B, T, hidden]`.
        position_embeddings: the rotary tables (cos, sin), each `[B, T, R]` (R <= D: see `layers.base.apply_rope`).
        valid: `[B, T]` bool, False at padding, or None.
        document_ids: `[B, T]`, the document of each token of packed rows (queries see their own only), or None.
    """
    if document_ids is not None:  # each document as a row of its own: causal attention without a [T, T] mask
        return DocumentBatch.of(document_ids).run(
            lambda x, rotary, valid: teacher_attention(attn, x, rotary, valid), hidden_states, *position_embeddings
        )
    q, k, v, _ = attn.project(hidden_states, frozen=True)
    q, k = attn.rotate(q, k, position_embeddings)
    q, k, v = (x.transpose(1, 2) for x in (q, k, v))  # [B, heads, T, D]
    if valid is None and attn.source_window is None and attn.softcap is None:
        o = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=attn.scaling, enable_gqa=True)
    else:  # a mask, or logits spelled out to be capped (Gemma 2): by blocks of queries, never [T, T]
        blocks = range(0, q.shape[2], TEACHER_BLOCK)
        o = torch.cat([_teacher_block(attn, q, k, v, valid, start) for start in blocks], dim=2)  # [B, H, T, D]
    return o.transpose(1, 2).flatten(2)


def _teacher_block(
    attn: LinearizedAttention, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, valid: torch.Tensor | None, start: int
) -> torch.Tensor:
    """`teacher_attention` of the `TEACHER_BLOCK` queries from `start` (q, k, v `[B, heads, T, D]`) over the keys
    they reach: a [block, keys] mask and logits, where the whole [T, T] made the teacher of one layer at 2K tokens
    (SmolLM2's shapes, fp32) peak at 67 MiB with padding and at 445 MiB with capped logits, 16 times that at 8K,
    against 32 MiB and 72 MiB by blocks."""
    end = min(start + TEACHER_BLOCK, q.shape[2])
    window = attn.source_window or end
    first = max(0, start - window + 1)
    position = torch.arange(first, end, device=q.device)
    behind = position[start - first :, None] - position[None, :]  # [block, keys]: how far each key is behind
    mask = (behind >= 0) & (behind < window)  # causal, within the source's window
    if valid is not None:
        # a padded query still sees itself, so no row is empty (its output is excluded from the loss)
        mask = mask & (valid[:, None, None, first:end] | (behind == 0))
    keys = slice(first, end)
    return masked_attention(q[:, :, start:end], k[:, :, keys], v[:, :, keys], mask, attn.scaling, attn.softcap)


class AttentionTransfer:
    """Context manager that turns a converted model's forward pass into an attention-transfer step.

    Args:
        model: the converted model (possibly wrapped by peft).
        loss_scale: multiplier of the forward pass's mean MSE over layers (e.g. mse_factor / micro-batches); each
            layer back-propagates its share, loss_scale / layers times its own MSE.
        relative: divide each layer's MSE by the mean square of its teacher output (layers then compare on one
            scale: what `linearize.selection` ranks them by).

    After each forward pass, `layer_losses` holds the detached MSE of every converted layer (unscaled), in
    layer order. Backward runs only when grad mode is on and the student output requires grad, so the same
    context evaluates held-out MSE under `torch.no_grad()`.
    """

    def __init__(self, model: nn.Module, loss_scale: float = 1.0, relative: bool = False):
        self.model = model
        self.layers = [m for m in model.modules() if isinstance(m, LinearizedAttention)]
        self.loss_scale = loss_scale
        self.relative = relative
        self.layer_losses: list[torch.Tensor] = []
        self._inputs: dict[int, tuple] = {}
        self._handles: list = []
        self._adapters_off = nullcontext()

    def __enter__(self) -> AttentionTransfer:
        for attn in self.layers:
            self._handles.append(attn.register_forward_pre_hook(self._keep_inputs, with_kwargs=True))
            # in place of o_proj's forward, not a hook after it: its product of the student output would be thrown
            # away (a tenth of a layer's matrix products)
            attn.o_proj.forward = self._teacher_output(attn)
        # adapters that a lora stage trained outside the students would move the activations away from the original
        # model's: off for the stage (the students' own stay on)
        students = {id(m) for attn in self.layers for name, m in attn.named_modules() if not name.startswith("o_proj")}
        self._adapters_off = adapters_off([m for m in lora_layers(self.model) if id(m) not in students])
        self._adapters_off.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        for attn in self.layers:
            attn.o_proj.__dict__.pop("forward", None)
        self._adapters_off.__exit__(None, None, None)
        self._handles.clear()
        self._inputs.clear()

    def loss(self) -> torch.Tensor:
        """Mean MSE over layers of the last forward pass (detached)."""
        losses, self.layer_losses = self.layer_losses, []
        return torch.stack(losses).mean()

    def _keep_inputs(self, attn, args, kwargs):
        # each layer learns from the inputs alone: no gradient may flow back into earlier layers, whose graphs
        # (if any) the earlier per-layer backward already freed
        if args:
            hidden_states, args = args[0].detach(), (args[0].detach(), *args[1:])
        else:
            hidden_states = kwargs["hidden_states"] = kwargs["hidden_states"].detach()
        valid = LinearizedAttention.token_validity(kwargs.get("padding_mask"), hidden_states.shape[1])
        self._inputs[id(attn)] = (hidden_states, kwargs["position_embeddings"], valid, kwargs.get("document_ids"))
        return args, kwargs

    def _teacher_output(self, attn: LinearizedAttention):
        """The forward of `attn.o_proj` meanwhile: it back-propagates the layer's loss and returns the source's o_proj
        of the teacher output."""

        def forward(student: torch.Tensor) -> torch.Tensor:  # [B, T, H * D]
            hidden_states, position_embeddings, valid, document_ids = self._inputs.pop(id(attn))
            teacher = teacher_attention(attn, hidden_states, position_embeddings, valid, document_ids)
            error = (student.float() - teacher.float()).square()
            if valid is not None:
                error = error[valid]
            mse = error.mean()
            if self.relative:
                mse = mse / (teacher.float()[valid] if valid is not None else teacher.float()).square().mean()
            if torch.is_grad_enabled() and mse.requires_grad:
                (mse * (self.loss_scale / len(self.layers))).backward()
            self.layer_losses.append(mse.detach())
            base = source_linear(attn.o_proj)
            return F.linear(teacher.to(base.weight.dtype), base.weight, base.bias)

        return forward


def original_attention_forward(attn: LinearizedAttention):
    """A forward for `attn` that computes the source's attention on its frozen projections (LoRA adapters left out),
    as the layer was before conversion: assign it to `attn.forward`, delete it to restore the converted layer."""

    def forward(hidden_states, position_embeddings=None, padding_mask=None, document_ids=None, **kwargs):
        valid = LinearizedAttention.token_validity(padding_mask, hidden_states.shape[1])
        o = teacher_attention(attn, hidden_states, position_embeddings, valid, document_ids)
        return source_linear(attn.o_proj)(o), None

    return forward


@contextmanager
def original_model(model: nn.Module) -> Iterator[nn.Module]:
    """Inside this context the converted model computes the source model's outputs: every converted layer runs
    the original softmax attention on its frozen projections, and LoRA adapters are off. The distillation teacher
    comes from the student's own weights this way, with no second copy of the model; call it under no_grad.
    Parameters the method added are unused, as the source model has none."""
    layers = [m for m in model.modules() if isinstance(m, LinearizedAttention)]
    try:
        for attn in layers:
            attn.forward = original_attention_forward(attn)
        with adapters_off(lora_layers(model)):
            yield model
    finally:
        for attn in layers:
            attn.__dict__.pop("forward", None)


def distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean KL(teacher || student) of the next-token distributions at the positions the next-token loss counts.

    Computed by chunks of positions (`chunk_positions`), with its gradient w.r.t. the student's logits in the same
    pass, so that the fp32 [positions, vocab] temporaries (log-softmaxes, probabilities: 400 MB each at 2048 tokens
    of a 49152-token vocabulary) exist for one chunk at a time, and the teacher's logits are not kept for the backward.

    Args:
        student_logits, teacher_logits: `[B, T, V]`; position t predicts token t + 1.
        labels: `[B, T]` token ids, -100 where no loss is taken (prompts, padding).
    """
    rows, positions = next_token_targets(labels).nonzero(as_tuple=True)  # [N] each: the counted (b, t)
    with_grad = torch.is_grad_enabled() and student_logits.requires_grad
    return _ChunkedKL.apply(student_logits, teacher_logits.detach(), rows, positions, with_grad)


KD_CHUNK_ELEMENTS = 2**20  # per fp32 temporary of the distillation loss on CPU: 4 MB, which stays in cache


def chunk_positions(logits: torch.Tensor) -> int:
    """Positions per chunk of the distillation loss. On CPU, 4 MB temporaries took a third of the time of 50 MB
    ones (docs/training-speed.md); an accelerator gets 16 times larger ones, as each chunk costs a dozen launches
    (not measured)."""
    budget = KD_CHUNK_ELEMENTS * (1 if logits.device.type == "cpu" else 16)
    return max(1, budget // logits.shape[-1])


class _ChunkedKL(torch.autograd.Function):
    """`F.kl_div(student, teacher, log_target=True, reduction="batchmean")` of the fp32 log-softmaxes at the counted
    positions, by chunks of positions. Its gradient w.r.t. the student's logits, softmax(student) - softmax(teacher)
    at each counted position over their number, is computed in the forward (fp32, cast in the backward, as the
    log-softmax of `.float()` logits would): nothing of the chunks is recomputed or kept."""

    @staticmethod
    def forward(ctx, student_logits, teacher_logits, rows, positions, with_grad: bool):
        ctx.dtype = student_logits.dtype
        count, step = len(rows), chunk_positions(student_logits)
        ctx.grad = torch.zeros(student_logits.shape, device=student_logits.device) if with_grad else None  # [B, T, V]
        total = torch.zeros((), device=student_logits.device)
        for start in range(0, count, step):
            index = rows[start : start + step], positions[start : start + step]
            student = student_logits[index].float().log_softmax(-1)  # [C, V]
            teacher = teacher_logits[index].float().log_softmax(-1)
            teacher_probs = teacher.exp()
            total += teacher.sub_(student).mul_(teacher_probs).sum()  # kl_div's terms, exp(t) * (t - s)
            if ctx.grad is not None:
                ctx.grad[index] = student.exp_().sub_(teacher_probs).div_(count)
        return total / count

    @staticmethod
    def backward(ctx, grad):
        grad_logits, ctx.grad = ctx.grad, None  # scaled in place, no second [B, T, V]: one backward per forward
        return grad_logits.mul_(grad).to(ctx.dtype), None, None, None, None
