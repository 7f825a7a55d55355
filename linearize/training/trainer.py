"""`finetune`: run a recipe's stages on a converted model, with checkpoints, resume and data parallelism.

The flow: load the source model, convert it, load the data, then for each stage choose what trains (the
method's new parameters and/or LoRA adapters), build its optimizer and schedule, and step through the data
in a fixed order that depends only on the seed, so a resumed run sees exactly the batches an uninterrupted run
would. At the end LoRA is merged (by default) and the model is saved in the foundation's format, atomically.
"""

from __future__ import annotations

import math
import time
import warnings
from contextlib import ExitStack, nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from .. import sources
from ..compat import set_activation_checkpointing
from ..convert import convert_model, keep_softmax_layers, save_model
from ..data import PackedSequences, next_token_targets
from ..errors import LinearizeError
from ..families import get_family
from ..generation import callers_rng_kept
from ..hub import check_can_push
from ..layers.base import LinearizedAttention
from ..outputs import atomic_folder, delete_folder, write_errors, write_file
from ..selection import LayerSelection, select_layers
from .checkpoint import (
    METRICS_FILE,
    RECIPE_FILE,
    RESUME,
    check_resumable,
    list_checkpoints,
    load_checkpoint,
    load_optimizer_states,
    optimizer_states,
    own_rng_state,
    prepare_run_folder,
    rng_state,
    run_lock,
    save_checkpoint,
    set_rng_state,
)
from .checks import (
    check_calibration,
    check_lora_targets,
    check_stage_order,
    check_transfer_trains,
    lora_targets,
    nothing_to_train,
    recipe_notes,
    stage_steps,
    transfer_trains,
    unmatched_targets_note,
    warmup_note,
)
from .data import FinetuneData, load_data
from .distributed import (
    World,
    average_gradients,
    close_world,
    from_main,
    gathered,
    init_world,
    mean_across,
    sum_across,
    together,
)
from .fingerprints import data_fingerprint, recipe_hash
from .optim import build_optimizers, build_schedulers, lr_factor
from .recipe import Recipe, StageSection, resolved_yaml
from .report import Reporter
from .transfer import AttentionTransfer, distillation_loss, original_model


class TrainingDivergedError(LinearizeError):
    """The loss became NaN or infinite."""


@dataclass
class RunState:
    """Where the run is: the stage, optimizer steps done in it, and whether LoRA adapters exist yet."""

    stage: int = 0
    step: int = 0
    global_step: int = 0
    lora_applied: bool = False
    last_eval: dict = field(default_factory=dict)


class Trainer:
    def __init__(self, recipe: Recipe, world: World, reporter: Reporter, run: Path):
        self.recipe, self.world, self.reporter, self.run = recipe, world, reporter, run
        self.config = recipe.training
        self.state = RunState()
        self.selection: LayerSelection | None = None
        # the model's config, then the data, before the weights: a model that cannot convert costs no data read, and
        # a data error no model load (nor layer scoring)
        config = sources.load_config(recipe.model.name, recipe.model.revision)
        plan = recipe.conversion.plan(config, recipe.model.name or sources.EMBEDDED_NAME)
        targets = lora_targets(plan.config, recipe.lora.target_modules)
        check_lora_targets(recipe, targets)  # peft would refuse them once the stages before LoRA trained
        check_transfer_trains(recipe, plan.config, targets.in_attention)  # else met as the stage begins
        self.tokenizer = sources.load_tokenizer(recipe.model.name, recipe.model.revision)
        self.data: FinetuneData = load_data(recipe.data, self.tokenizer, seed=self.config.seed)
        check_calibration(recipe, self.tokenizer)  # read now: with auto:K after transfer, only after its stages
        self._orders: dict[tuple[int, int], torch.Tensor] = {}
        for note in self.data.notes:
            reporter.info(note)
        for warning in self.data.warnings:
            reporter.warning(warning)
        self.data_fingerprint = data_fingerprint(self.data)  # what its checkpoints record
        self.model, self.new_names = self.build_model()
        notes = [unmatched_targets_note(recipe, targets), *recipe_notes(recipe, config, self.data.train)]
        for note in filter(None, notes):
            reporter.warning(note)
        self.sharded = False

    # -- model surgery ------------------------------------------------------------------------------------------
    def build_model(self) -> tuple[nn.Module, set[str]]:
        """The converted model before training, and the names of the parameters the method added."""
        recipe = self.recipe
        torch.manual_seed(torch_seed(self.config.seed))
        source = sources.load_model(
            recipe.model.name, dtype=recipe.model.dtype, device=str(self.world.device), revision=recipe.model.revision
        )
        self.source_config, self.source_name = source.config, recipe.model.name or sources.EMBEDDED_NAME
        plan = recipe.conversion.plan(source.config, self.source_name)  # with auto:K, every layer converted
        source_keys = set(source.state_dict())
        self.model = convert_model(source, plan.config)
        self.new_names = {n for n, _ in self.model.named_parameters() if n not in source_keys}
        if self.selection is not None:  # chosen before: a rebuilt model keeps the same layers
            self.keep_softmax(self.selection)
        elif recipe.conversion.selection_request() and not recipe.conversion.selects_after_transfer:
            self.select_softmax_layers(self.tokenizer, "conversion")
        return self.model, self.new_names

    def select_softmax_layers(self, tokenizer, after: str) -> None:
        """`conversion.softmax_layers: auto:K`: score every converted layer on the calibration text, then turn the
        K worst back into softmax attention (`linearize.selection`)."""
        request = self.recipe.conversion.selection_request()
        name = f"scoring {self.source_config.num_hidden_layers} layers ({request.scorer}, after {after})"
        with ExitStack() as progress:

            def bar(total: int):
                return progress.enter_context(self.reporter.task(name, total))

            selection = select_layers(self.model, tokenizer, request, bar, after)
        selection = from_main(self.world, selection)  # every process keeps the same layers, near-ties included
        self.keep_softmax(selection)
        shown = ", ".join(f"{i} ({selection.scores[i]:.3g})" for i in selection.layers)
        self.reporter.info(f"kept as softmax attention, layer (score): {shown or 'none'}")
        self.reporter.record(global_step=self.state.global_step, layer_selection=selection.to_dict())

    def keep_softmax(self, selection: LayerSelection) -> None:
        """Turn the layers `selection` keeps back into the source's softmax attention; the rest stays as trained."""
        plan = self.recipe.conversion.plan(self.source_config, self.source_name, selection)
        self.model = keep_softmax_layers(self.model, plan.config)
        self.new_names &= {n for n, _ in self.model.named_parameters()}
        self.selection = selection

    def apply_lora(self) -> None:
        from peft import LoraConfig, get_peft_model

        lora = self.recipe.lora
        torch.manual_seed(torch_seed(self.config.seed))  # adapter initialisation depends on the seed only
        config = LoraConfig(
            r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=lora.target_modules
        )
        new = {id(p) for n, p in self.model.named_parameters() if n in self.new_names}
        try:
            with warnings.catch_warnings():
                # peft asks transformers about gradient checkpointing through a name transformers deprecated
                warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
                self.model = get_peft_model(self.model, config)
        except ValueError as error:
            raise LinearizeError(f"lora.target_modules {lora.target_modules} do not fit this model: {error}") from None
        self.new_names = {n for n, p in self.model.named_parameters() if id(p) in new}  # peft renames, keeps objects
        self.state.lora_applied = True

    def shard(self) -> None:
        """FSDP2: shard every decoder layer, then the rest of the model, across the processes."""
        from torch.distributed.fsdp import fully_shard

        for module in self.model.modules():
            if type(module).__name__.endswith("DecoderLayer"):
                fully_shard(module)
        fully_shard(self.model)
        self.sharded = True

    def trained_tensors(self) -> dict[str, torch.Tensor]:
        """Every tensor training may change: the method's new parameters and the LoRA adapters. Under FSDP every
        process must call this (the shards are gathered)."""
        return {
            name: (p.full_tensor() if hasattr(p, "full_tensor") else p).detach()
            for name, p in self.model.named_parameters()
            if name in self.new_names or "lora_" in name
        }

    def set_trainable(self, index: int, stage: StageSection) -> list[nn.Parameter]:
        # attention transfer trains converted layers only (a kept softmax layer already is its own teacher), and
        # not their o_proj, which gets no gradient there
        layers = [f"{name}." for name, module in self.model.named_modules() if isinstance(module, LinearizedAttention)]
        params = []
        for name, p in self.model.named_parameters():
            train = ("new" in stage.trainable and name in self.new_names) or (
                "lora" in stage.trainable and "lora_" in name
            )
            train = train and (
                stage.kind != "attention_transfer" or any(transfer_trains(name, layer) for layer in layers)
            )
            p.requires_grad_(train)
            if train:
                params.append(p)
        if not params:
            projections = get_family(self.model.config.base_model_type).input_projections
            raise LinearizeError(
                nothing_to_train(index, stage, self.recipe.lora.target_modules, projections, bool(layers))
            )
        return params

    # -- data ---------------------------------------------------------------------------------------------------
    def steps_in(self, stage: StageSection) -> tuple[int, int]:
        """(optimizer steps of the stage, sequences per epoch actually used)."""
        return stage_steps(stage, len(self.data.train), self.config, self.world.size)

    def order(self, stage: int, epoch: int) -> torch.Tensor:
        """The training sequences in the order epoch `epoch` of stage `stage` visits them: a permutation that
        depends only on (seed, stage, epoch), so a resumed run sees the batches an uninterrupted run would."""
        key = (stage, epoch)
        if key not in self._orders:
            seed = torch_seed(self.config.seed * 1_000_003 + stage * 1009 + epoch)
            self._orders = {key: torch.randperm(len(self.data.train), generator=torch.Generator().manual_seed(seed))}
        return self._orders[key]

    def micro_batch(self, stage: int, step: int, micro: int, per_epoch: int) -> dict[str, torch.Tensor]:
        """Micro-batch `micro` of optimizer step `step` for this process. Each epoch uses its first `per_epoch`
        sequences (whole optimizer steps); processes take interleaved micro-batches of the same global batch."""
        mb = self.config.micro_batch_size
        per_step = mb * self.config.grad_accum * self.world.size
        first = step * per_step + (micro * self.world.size + self.world.rank) * mb
        idx = [int(self.order(stage, g // per_epoch)[g % per_epoch]) for g in range(first, first + mb)]
        return _to(self.data.train, idx, self.world.device)

    def loss_divisors(self, batches: list[dict], every_position: bool) -> list[float]:
        """What to divide each micro-batch's mean loss by in an optimizer step (or an evaluation), so that the sum
        over micro-batches, averaged over processes, is the mean over every trained token of the step: however the
        tokens fall into micro-batches (instruction data trains a varying number per pack). With equal counts it is
        grad_accum exactly. A micro-batch without a trained token gets infinity: its (zero) loss adds nothing.
        `every_position` (attention transfer, whose loss reads every position, not the labels): every token counts,
        so that a held-out evaluation's last, smaller micro-batch weighs by its rows."""
        if every_position:
            counts = [batch["input_ids"].numel() for batch in batches]
        else:
            counts = [int(next_token_targets(batch["labels"]).sum()) for batch in batches]
        total = int(sum_across(self.world, torch.tensor(sum(counts), device=self.world.device)).item())
        return [total / (count * self.world.size) if count else math.inf for count in counts]

    # -- one stage ----------------------------------------------------------------------------------------------
    def forward_loss(
        self,
        model: nn.Module,
        batch: dict,
        transfer: AttentionTransfer | None,
        kd_ratio: float = 0.0,
        scored: bool = True,
    ) -> torch.Tensor:
        """The micro-batch loss; for attention transfer its backward has already run inside the forward. `scored`:
        the batch has a trained token (`loss_divisors` counted them)."""
        inputs = {"input_ids": batch["input_ids"], "position_ids": batch.get("position_ids"), "use_cache": False}
        if transfer is not None:
            with self.autocast():
                model(**inputs, logits_to_keep=1)
            return transfer.loss()
        with self.autocast():
            out = model(**inputs, labels=batch["labels"])
        if not scored:  # a long prompt's packs: the mean would be 0 / 0
            # zero, and a graph, so that every process runs the same backward; summed in fp32, as float16 logits
            # sum past its range (infinity times zero is NaN)
            return out.logits.sum(dtype=torch.float32) * 0.0
        if not kd_ratio:
            return out.loss
        with torch.no_grad(), original_model(self.model) as teacher, self.autocast():
            teacher_logits = teacher(**inputs).logits
        kd = distillation_loss(out.logits, teacher_logits, batch["labels"])
        self.next_token_loss = out.loss.detach()  # the part eval_loss compares with: `_backward` logs it apart
        return (1 - kd_ratio) * out.loss + kd_ratio * kd

    def autocast(self) -> torch.autocast:
        """The region of the forward pass where `training.autocast` applies."""
        dtype = self.config.autocast
        return torch.autocast(self.world.device.type, dtype=getattr(torch, dtype or "bfloat16"), enabled=bool(dtype))

    @torch.no_grad()
    def evaluate(self, transfer: AttentionTransfer | None) -> dict[str, float]:
        """Held-out loss (or attention MSE, inside an active transfer: no backward runs under no_grad)."""
        held_out = self.data.held_out
        if len(held_out) == 0:
            return {}
        mb = self.config.micro_batch_size
        starts = range(0, min(len(held_out), mb * self.config.eval_batches), mb)
        batches = [_to(held_out, list(range(i, min(i + mb, len(held_out)))), self.world.device) for i in starts]
        divisors = self.loss_divisors(batches, transfer is not None)  # the mean over the scored tokens
        if all(math.isinf(divisor) for divisor in divisors):
            return {}  # no held-out token is scored within a pack
        # each process scores its share of the batches; every process runs as many forwards (FSDP gathers in each)
        mine = range(self.world.rank, len(batches), self.world.size)
        self.model.eval()
        loss = torch.zeros((), device=self.world.device)
        for i in mine:
            scored = not math.isinf(divisors[i])
            loss += self.forward_loss(self.model, batches[i], transfer, 0.0, scored).float() / divisors[i]
        for _ in range(math.ceil(len(batches) / self.world.size) - len(mine)):
            self.forward_loss(self.model, batches[0], transfer, 0.0, False)
        self.model.train()
        loss = sum_across(self.world, loss).item()
        if transfer is not None:
            return {"eval_mse": loss}
        return {"eval_loss": loss, "eval_ppl": math.exp(min(loss, 50.0))}

    def run_stage(self, index: int, stage: StageSection, resume_states: dict | None) -> None:
        if "lora" in stage.trainable and not self.state.lora_applied:
            self.apply_lora()
        params = self.set_trainable(index, stage)
        fsdp = self.world.distributed and self.config.distributed == "fsdp" and stage.kind == "lora"
        if fsdp and not self.sharded:
            self.shard()
            params = self.set_trainable(index, stage)  # sharding replaced the parameters
        total_steps, per_epoch = self.steps_in(stage)
        new_params = [p for name, p in self.model.named_parameters() if name in self.new_names]
        optimizers = build_optimizers(params, stage.optimizer, new_params)
        schedulers = build_schedulers(optimizers, total_steps, stage.schedule)
        if resume_states is not None:
            load_optimizer_states(self.model, optimizers, resume_states["optimizers"], self.sharded)
            for sched, saved in zip(schedulers, resume_states["schedulers"], strict=True):
                sched.load_state_dict(saved)
            set_rng_state(own_rng_state(resume_states["rng"], self.world.rank))
        start = self.state.step
        name = f"stage {index + 1}/{len(self.recipe.stages)} {stage.kind}"
        count = sum(p.numel() for p in params)
        self.reporter.info(f"{name}: training {count:,} parameters ({', '.join(stage.trainable)})")

        accum = self.config.grad_accum
        transfer = None
        if stage.kind == "attention_transfer":
            transfer = AttentionTransfer(self.model, loss_scale=stage.mse_factor / accum)
        if self.config.gradient_checkpointing:
            # attention transfer holds one layer's graph at a time: recomputation would only cost time
            set_activation_checkpointing(self.model, enabled=transfer is None)
        model = self.model
        ddp = self.world.distributed and stage.kind == "lora" and not self.sharded
        if ddp:
            model = nn.parallel.DistributedDataParallel(self.model)
        self.model.train()
        self.reporter.start_stage(name, total_steps, done=start)
        tokens_per_step = self.config.micro_batch_size * accum * self.world.size * self.recipe.data.seq_len
        try:
            with transfer or nullcontext():
                if start == 0:  # the baseline every later evaluation of the stage compares with
                    self._evaluate_and_record(index, stage, transfer)
                for step in range(start, total_steps):
                    began = time.perf_counter()
                    batches = [self.micro_batch(index, step, micro, per_epoch) for micro in range(accum)]
                    loss, ce = self._backward(model, batches, transfer, stage.kd_ratio, params, ddp)
                    if not math.isfinite(loss):  # before the step: the last checkpoint stays the last good one
                        raise TrainingDivergedError(self._diverged(index, stage, step, loss))
                    if self.config.max_grad_norm is not None:
                        torch.nn.utils.clip_grad_norm_(params, self.config.max_grad_norm)
                    for opt in optimizers:
                        opt.step()
                        opt.zero_grad(set_to_none=True)
                    # every group follows one schedule: the peak lrs times its factor at this step (a stage that
                    # trains only the added parameters has no group at the stage's lr to read it from)
                    factor = lr_factor(step, total_steps, stage.schedule)
                    lr = stage.optimizer.lr * factor
                    rates = {"lr": lr}
                    if stage.optimizer.new_lr is not None:
                        rates["new_lr"] = stage.optimizer.new_lr * factor
                    for sched in schedulers:
                        sched.step()
                    self.state.step, self.state.global_step = step + 1, self.state.global_step + 1
                    seconds = time.perf_counter() - began
                    key = "mse" if transfer is not None else "loss"
                    self.reporter.record(
                        stage=index, kind=stage.kind, step=step + 1, global_step=self.state.global_step,
                        **{key: loss}, **({"ce": ce} if ce is not None else {}), **rates,
                        tokens_per_s=tokens_per_step / seconds, seconds=seconds,
                    )  # fmt: skip
                    self.reporter.step(name, step + 1, total_steps, loss, lr, tokens_per_step / seconds, ce)
                    last = step + 1 == total_steps
                    if (step + 1) % self.config.eval_every == 0 or last:
                        self._evaluate_and_record(index, stage, transfer)
                    if (step + 1) % self.config.checkpoint_every == 0 or last:
                        self.checkpoint(optimizers, schedulers)
        finally:
            self.reporter.end_stage()

    def _backward(
        self, model, batches: list, transfer, kd_ratio: float, params: list, ddp: bool
    ) -> tuple[float, float | None]:
        """Forward and backward over one step's micro-batches, the gradients summed and synchronised across
        processes once (on the last micro-batch, or by hand without DDP or FSDP); returns the step's loss, averaged
        over processes, and with distillation its next-token part (the loss is then mostly KL-weighted, and the
        held-out eval_loss is the next-token loss alone). Under attention transfer the backward runs inside the
        forward, layer by layer."""
        divisors = self.loss_divisors(batches, transfer is not None)
        losses, next_token = [], []
        for micro, (batch, divisor) in enumerate(zip(batches, divisors, strict=True)):
            sync = micro == len(batches) - 1
            if self.sharded:
                model.set_requires_gradient_sync(sync)
            with model.no_sync() if ddp and not sync else nullcontext():
                loss = self.forward_loss(model, batch, transfer, kd_ratio, not math.isinf(divisor))
                if transfer is None:
                    (loss / divisor).backward()
            losses.append(loss.detach().float() / divisor)
            if kd_ratio and transfer is None:
                scored = not math.isinf(divisor)
                next_token.append(self.next_token_loss.float() / divisor if scored else torch.zeros_like(losses[-1]))
        if not ddp and not self.sharded:
            average_gradients(self.world, params)
        ce = mean_across(self.world, torch.stack(next_token).sum()).item() if next_token else None
        return mean_across(self.world, torch.stack(losses).sum()).item(), ce

    def _evaluate_and_record(self, index: int, stage: StageSection, transfer: AttentionTransfer | None) -> None:
        metrics = self.evaluate(transfer)
        if metrics:
            self.state.last_eval = {"stage": index, "kind": stage.kind, "step": self.state.step, **metrics}
            self.reporter.record(global_step=self.state.global_step, **self.state.last_eval)
            shown = "  ".join(f"{k} {v:.4g}" for k, v in metrics.items())
            self.reporter.info(f"held-out after step {self.state.step}: {shown}")

    def _diverged(self, index: int, stage: StageSection, step: int, loss: float) -> str:
        checkpoints = list_checkpoints(self.run)
        kept = f"the last good checkpoint is {checkpoints[-1]}" if checkpoints else "no checkpoint was written yet"
        return (
            f"the loss became {loss} at stage {index + 1} ({stage.kind}) step {step + 1}; training stopped and {kept}. "
            f"Lower stages.{index}.optimizer.lr or set training.max_grad_norm (e.g. 1.0), then start a new run."
        )

    def checkpoint(self, optimizers, schedulers) -> None:
        # collective: under FSDP every process gathers
        tensors, optimizing = self.trained_tensors(), optimizer_states(self.model, optimizers, self.sharded)
        rngs = gathered(self.world, rng_state())
        with together(self.world):  # a full disk on the main process stops them all, with its message
            if not self.world.is_main:
                return
            state = {
                "stage": self.state.stage,
                "step": self.state.step,
                "global_step": self.state.global_step,
                "lora_applied": self.state.lora_applied,
                "processes": self.world.size,
                "recipe_hash": recipe_hash(self.recipe),
                "last_eval": self.state.last_eval,
                "metrics_bytes": self.reporter.metrics_size(),
                "layer_selection": self.selection.to_dict() if self.selection is not None else None,
                "data": self.data_fingerprint,
            }
            keep = self.config.keep_checkpoints
            save_checkpoint(self.run, self.state.global_step, tensors, optimizing, schedulers, state, keep, rngs)

    # -- whole run ----------------------------------------------------------------------------------------------
    def restore(self, checkpoint: Path) -> dict | None:
        """Load a checkpoint; return the optimizer states when it stopped inside a stage."""
        tensors, states, saved = load_checkpoint(checkpoint)
        check_resumable(checkpoint, self.recipe, self.world.size, self.data_fingerprint, saved)
        if saved.get("layer_selection"):
            chosen = LayerSelection(**saved["layer_selection"])
            if self.selection is None:  # chosen after attention transfer
                self.keep_softmax(chosen)
            elif self.selection.layers != chosen.layers:  # scored again at conversion, and differently
                raise LinearizeError(
                    f"checkpoint {checkpoint} kept layers {chosen.layers} as softmax attention, and scoring them "
                    f"again chose {self.selection.layers} (the calibration text or the device's arithmetic "
                    "changed); the run cannot continue with other layers: start it again in a new output.dir"
                )
        if saved["lora_applied"]:
            self.apply_lora()
        missing = set(tensors) - set(dict(self.model.named_parameters()))
        if missing:
            raise LinearizeError(f"checkpoint {checkpoint} holds tensors this model lacks: {sorted(missing)[:5]}")
        self.model.load_state_dict(tensors, strict=False)
        if "metrics_bytes" in saved:  # the rows written after the checkpoint are written again from here on
            self.reporter.truncate_metrics(saved["metrics_bytes"])
        self.state = RunState(
            saved["stage"], saved["step"], saved["global_step"], saved["lora_applied"], saved.get("last_eval", {})
        )
        total, _ = self.steps_in(self.recipe.stages[self.state.stage])
        self.reporter.info(f"resuming from {checkpoint} (stage {self.state.stage + 1}, step {self.state.step})")
        if self.state.step >= total:  # the checkpoint closed its stage: the next one starts fresh
            self.state.stage, self.state.step = self.state.stage + 1, 0
            # as the straight run left it (apply_lora above seeded its own)
            set_rng_state(own_rng_state(states["rng"], self.world.rank))
            return None
        return states

    def train(self, resume_from: Path | None) -> None:
        resume_states = self.restore(resume_from) if resume_from is not None else None
        for index, stage in enumerate(self.recipe.stages[self.state.stage :], self.state.stage):  # those to run
            if note := warmup_note(index, stage, self.steps_in(stage)[0]):  # epochs are steps once data loads
                self.reporter.warning(note)
        for index, stage in enumerate(self.recipe.stages[self.state.stage :], self.state.stage):
            self.state.stage = index
            if stage.kind != "attention_transfer":
                self.select_after_transfer()
            self.run_stage(index, stage, resume_states)
            resume_states = None
            self.state.step = 0
        self.select_after_transfer()

    def select_after_transfer(self) -> None:
        """With `conversion.selection.after: attention_transfer`, once the opening transfer stages are done."""
        if self.recipe.conversion.selects_after_transfer and self.selection is None:
            self.select_softmax_layers(self.tokenizer, "attention_transfer")

    def save(self) -> Path:
        """Write `model/` (LoRA merged unless output.merge_lora is false, then the adapter goes in `adapter/`).
        Every process calls this; the main process writes."""
        out = self.run / "model"
        if self.sharded:
            # the shards cannot be merged in place: gather what training changed into a fresh, whole model
            tensors = self.trained_tensors()
            if not self.world.is_main:
                return out
            self.model, self.new_names = self.build_model()
            self.sharded = False
            if self.state.lora_applied:
                self.apply_lora()
            self.model.load_state_dict(tensors, strict=False)
        if not self.world.is_main:
            return out
        model = self.model
        if self.state.lora_applied and not self.recipe.output.merge_lora:
            self.save_adapter(out)
            model = self.model.unload()  # the converted model without the LoRA layers, unmerged
        else:
            # a finished run resumed with merge_lora: true: the adapter it kept would apply a second time to the
            # merged weights of model/, where it says its base is
            delete_folder(self.run / "adapter")
            if self.state.lora_applied:
                model = self.model.merge_and_unload()
        model.eval()
        for p in model.parameters():
            p.requires_grad_(False)
        save_model(model, self.tokenizer, out, force=True, texts={RECIPE_FILE: resolved_yaml(self.recipe)})
        return out

    def save_adapter(self, base: Path) -> None:
        """Write the LoRA adapter into `adapter/`, recorded as an adapter of the model saved into `base`."""
        for config in self.model.peft_config.values():
            config.base_model_name_or_path = str(base.resolve())  # AutoPeftModel finds it from any folder
            # AutoPeftModelForCausalLM then loads the base through AutoModelForCausalLM, where `import linearize`
            # registered our class (without a task type, peft imports the class's module, which it refuses)
            config.task_type = "CAUSAL_LM"
        # LoRA never targets the embeddings here, so peft need not compare vocabularies with the base folder (which
        # does not exist yet)
        with atomic_folder(self.run / "adapter", force=True) as staging:  # whole or not at all, as model/
            self.model.save_pretrained(staging, save_embedding_layers=False)


def torch_seed(seed: int) -> int:
    """`seed` as torch's generators take it: 64 bits, where a larger one overflows. torch wraps a negative seed
    alike, so every seed it took before keeps its draws."""
    return seed % 2**64


def _to(data: PackedSequences, idx: list[int], device: torch.device) -> dict[str, torch.Tensor]:
    return {name: rows.to(device) for name, rows in data[idx].items()}  # each [mb, seq_len]


def finetune(recipe: Recipe, resume: bool = False, quiet: bool = False, console=None) -> Path:
    """Run `recipe` end to end (under torchrun, as one of its processes: in the process group the caller joined, if
    it did, which stays joined). Returns the saved model folder.

    The run seeds torch with `training.seed` (a resumed run also sets Python's and NumPy's generators from its
    checkpoint), and `quiet` hides transformers' progress bars (as do the processes but the main one under
    torchrun): both are put back as they were when it returns or raises."""
    with callers_rng_kept(), sources.progress_bars_hidden() if quiet else nullcontext():
        return _finetune(recipe, resume, quiet, console)


def _finetune(recipe: Recipe, resume: bool, quiet: bool, console) -> Path:
    run = Path(recipe.output.dir)
    if recipe.output.push_to_hub:
        check_can_push()  # before hours of training, not after
    world = init_world()
    held = ExitStack()  # the run folder's lock and the hidden bars, until the run ends however it ends
    if not world.is_main:  # the main process speaks for the run: transformers' bars (loading, saving) too
        held.enter_context(sources.progress_bars_hidden())
    try:
        with together(world):  # refused on the main process: the others stop too, pointing to its message
            if world.is_main:  # one lock for the job: its other processes would find it held by their own
                held.enter_context(run_lock(run))  # before anything is read from or written into the run folder
        reporter = Reporter(run / METRICS_FILE, quiet=quiet, enabled=world.is_main, console=console)
        # the main process looks and the others go by it: one looking later would find the files the main process
        # writes into the folder below (a staged recipe file, and a new run refused as "not a linearize run")
        with together(world):
            resume_from = prepare_run_folder(run, recipe, resume, note=reporter.info) if world.is_main else None
        resume_from = from_main(world, resume_from)
        if resume and resume_from is None:  # fine for a job that always resumes; else output.dir may be mistyped
            reporter.warning(
                f"{RESUME}: '{run}' holds no checkpoint of this recipe yet; training starts from the beginning"
            )
        if resume_from is not None:  # before the model and the data load, and before the recipe file is rewritten
            check_resumable(resume_from, recipe, world.size)
        check_stage_order(recipe, world.size)
        with together(world):
            if world.is_main:
                if recipe.model.name is None and world.distributed:
                    sources.embedded_model_folder()  # built once, before the other processes read it
                # whole or not at all: a cut-short rewrite on resuming would make the checkpoints another recipe's
                with write_errors(run):
                    run.mkdir(parents=True, exist_ok=True)
                    write_file(run / RECIPE_FILE, resolved_yaml(recipe))
        if resume_from is None:  # rows of an earlier attempt that reached no checkpoint would be read as this run's
            reporter.truncate_metrics(0)
        trainer = Trainer(recipe, world, reporter, run)
        trainer.train(resume_from)
        with together(world):
            out = trainer.save()
        if world.is_main and recipe.output.push_to_hub:
            from ..publish import push, push_command

            # the folder was just trained and saved by this process: the load check in a subprocess is redundant
            reporter.info(f"pushing {out} to {recipe.output.push_to_hub}")
            repo, private = recipe.output.push_to_hub, recipe.output.private
            again = f"push the saved model with `{push_command(out, repo, private)}`"
            url = push(out, repo, private=private, quiet=quiet, verify=False, retry=again)
            reporter.info(f"pushed: {url}")
        return out
    finally:
        held.close()
        close_world(world)
