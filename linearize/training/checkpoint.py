"""Run folders and checkpoints: what a run writes, and how `--resume` finds where to continue.

A run folder holds `linearize_recipe.yaml` (the resolved recipe), `metrics.jsonl`, `checkpoints/`, at the end
`model/`, and the lock file that keeps a second run out while one trains (`run_lock`). A checkpoint holds every
tensor training has changed (new method parameters and LoRA adapters), the optimizer and scheduler states, the
position in the stages and the data, and the RNG states. Each is written to a temporary folder and renamed into
place, so a checkpoint either exists whole or not at all.
"""

from __future__ import annotations

import json
import os
import pickle
import random
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from ..errors import LinearizeError
from ..locks import LockHeld, locked
from ..outputs import atomic_folder, check_writable, delete_folder, write_errors
from ..publish import RECIPE_FILE  # the run's resolved recipe, under the name its model folder has it
from .fingerprints import (
    PACKING,
    PACKING_CHANGES,
    bookkeeping_keys,
    recipe_differences,
    recipe_hash,
    resumable_hashes,
)
from .recipe import Recipe, load_recipe

STATE_FILE = "trainer_state.json"
METRICS_FILE = "metrics.jsonl"
LOCK_FILE = ".linearize-run.lock"  # in the run folder: beside it, a name near the length limit would not fit
_PREFIX = "step-"
# what continues a run, named for both who reach these messages: the command's option, `finetune`'s argument
RESUME = "--resume (resume=True)"


def checkpoint_dir(run: Path) -> Path:
    return run / "checkpoints"


def list_checkpoints(run: Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first."""
    folder = checkpoint_dir(run)
    if not folder.is_dir():
        return []
    found = [p for p in folder.iterdir() if _is_checkpoint_name(p.name) and (p / STATE_FILE).is_file()]
    return sorted(found, key=lambda p: int(p.name.removeprefix(_PREFIX)))


def _is_checkpoint_name(name: str) -> bool:
    """`step-000040`, not a copy a user made beside it (`step-000040.bak`)."""
    step = name.removeprefix(_PREFIX)
    return step != name and step.isascii() and step.isdigit()


def rng_state() -> dict[str, Any]:
    """This process's random states; under torchrun a checkpoint keeps every process's (`own_rng_state`)."""
    state = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}
    if torch.cuda.is_available():
        # the device this process trains on (its view of the other devices is not what they drew)
        state["cuda_device"] = torch.cuda.get_rng_state()
    return state


def own_rng_state(saved: list[dict[str, Any]] | dict[str, Any], rank: int) -> dict[str, Any]:
    """Process `rank`'s random states out of a checkpoint's `saved` ones. Each process keeps its own: processes seed
    alike but draw unlike (LoRA dropout draws once per document of a pack, and each process trains other packs).
    A checkpoint written before kept the main process's alone."""
    return saved[rank] if isinstance(saved, list) else saved


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    if torch.cuda.is_available():
        if "cuda_device" in state:
            torch.cuda.set_rng_state(state["cuda_device"])
        elif "cuda" in state:  # written before cuda_device: every device, as the main process saw them
            torch.cuda.set_rng_state_all(state["cuda"])


def optimizer_states(model, optimizers: list[torch.optim.Optimizer], sharded: bool) -> list[dict]:
    """Optimizer states to save; under FSDP (`sharded`) gathered whole (keyed by parameter name) by every
    process."""
    if not sharded:
        return [opt.state_dict() for opt in optimizers]
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return [get_optimizer_state_dict(model, opt, options=options) for opt in optimizers]


def load_optimizer_states(model, optimizers: list[torch.optim.Optimizer], states: list[dict], sharded: bool) -> None:
    """Give `optimizers` the `states` that `optimizer_states` saved."""
    if not sharded:
        for opt, saved in zip(optimizers, states, strict=True):
            try:
                opt.load_state_dict(saved)
            except ValueError:  # torch: a parameter group of another size
                raise LinearizeError(
                    "the checkpoint's optimizer trained other parameters than this stage trains (an earlier "
                    "linearize also trained o_proj's adapter in attention transfer): finish the run with the "
                    "version that started it, or start again in another output.dir"
                ) from None
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    options = StateDictOptions(full_state_dict=True)
    for opt, saved in zip(optimizers, states, strict=True):
        set_optimizer_state_dict(model, opt, optim_state_dict=saved, options=options)


def save_checkpoint(
    run: Path,
    global_step: int,
    tensors: dict[str, torch.Tensor],
    optimizer_states: list[dict],
    schedulers: list,
    state: dict[str, Any],
    keep: int,
    rng_states: list[dict[str, Any]] | None = None,
) -> Path:
    """Write checkpoint `step-<global_step>` atomically and delete all but the `keep` most recent. `rng_states`:
    every process's `rng_state()` in rank order (by default this process's alone)."""
    folder = checkpoint_dir(run)
    folder.mkdir(parents=True, exist_ok=True)
    final = folder / f"{_PREFIX}{global_step:06d}"
    with atomic_folder(final, force=True) as tmp:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, tmp / "trained.safetensors")
        schedules = [s.state_dict() for s in schedulers]
        rng = rng_states or [rng_state()]
        _torch_save({"optimizers": optimizer_states, "schedulers": schedules, "rng": rng}, tmp / "optimizer.pt")
        (tmp / STATE_FILE).write_text(json.dumps(state, indent=2))
    for old in list_checkpoints(run)[:-keep]:
        delete_folder(old)  # never half a checkpoint: one without its state file would sit there unlisted
    return final


class _FileWrites:
    """A file's `write` for torch.save, keeping the OSError a write raised: torch reports it as a RuntimeError
    without the errno, which a full disk needs to be named as one."""

    def __init__(self, file):
        self.file, self.error = file, None

    def write(self, data) -> int:
        try:
            return self.file.write(data)
        except OSError as error:
            self.error = error
            raise

    def flush(self) -> None:
        self.file.flush()


def _torch_save(obj: Any, path: Path) -> None:
    with open(path, "wb") as file:
        writes = _FileWrites(file)
        try:
            torch.save(obj, writes)
        except RuntimeError:
            if writes.error is None:
                raise
            raise writes.error from None


def load_checkpoint(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any], dict[str, Any]]:
    """The trained tensors, the optimizer/scheduler/RNG states and the trainer state of a checkpoint."""
    with _unreadable(path):
        tensors = load_file(path / "trained.safetensors")
        # weights only: a run folder may be someone else's (a colleague's run, resumed), and a full unpickling runs
        # whatever calls the file names; ours holds tensors and plain values, and NumPy's RNG state, allowed here.
        # Onto the CPU: a CUDA run's optimizer states name its GPU, which a CPU resume lacks (and every torchrun
        # process would fill the main process's GPU with them); `load_state_dict` moves each to its parameter's device
        with torch.serialization.safe_globals(_numpy_rng_globals()):
            states = torch.load(path / "optimizer.pt", weights_only=True, map_location="cpu")
    return tensors, states, _trainer_state(path)


def _numpy_rng_globals() -> list:
    """What a pickled `np.random.get_state()` names besides plain values: its key array, under the module name of
    the NumPy that wrote it (`numpy.core` before 2.0, `numpy._core` since)."""
    reconstruct = np.empty(0).__reduce__()[0]
    names = [f"numpy.{core}.multiarray._reconstruct" for core in ("core", "_core")]
    return [np.ndarray, np.dtype, type(np.dtype(np.uint32)), *((reconstruct, name) for name in names)]


def _trainer_state(path: Path) -> dict[str, Any]:
    with _unreadable(path):
        return json.loads((path / STATE_FILE).read_text())


@contextmanager
def _unreadable(path: Path) -> Iterator[None]:
    try:
        yield
    # a damaged file: torch.load raises EOFError for an empty one (which click would print as a bare "Aborted")
    # and UnpicklingError for bytes torch did not write; safetensors its own error for a bad header
    except (OSError, ValueError, RuntimeError, EOFError, pickle.UnpicklingError, SafetensorError) as error:
        raise LinearizeError(
            f"checkpoint {path} cannot be read ({error}); delete it to resume from an older one"
        ) from None


def check_resumable(
    checkpoint: Path,
    recipe: Recipe,
    processes: int,
    data_fingerprint: dict[str, Any] | None = None,
    state: dict[str, Any] | None = None,
) -> None:
    """Refuse to resume `checkpoint` (its trainer `state`, read from it if not given) with another recipe, process
    count or (given `data_fingerprint`, as `fingerprints.data_fingerprint` computes it) packed data: each would
    change what the run computes. The run checks before it loads anything, and again with the data; so does
    `finetune --dry-run --resume`."""
    state = state if state is not None else _trainer_state(checkpoint)
    if state.get("recipe_hash") not in resumable_hashes(recipe):
        raise LinearizeError(
            f"checkpoint {checkpoint} belongs to a different recipe; it cannot be resumed (a checkpoint of an earlier "
            f"linearize also needs {', '.join(bookkeeping_keys())} as they were)"
        )
    if state["processes"] != processes:
        raise LinearizeError(
            f"checkpoint {checkpoint} was written by a run of {state['processes']} process(es) and the global batch "
            f"order depends on it; resume with the same count (torchrun --nproc_per_node {state['processes']}), "
            f"not {processes}"
        )
    saved, now = state.get("data"), data_fingerprint  # saved: absent if written before it was kept
    if now is None or saved is None or all(saved[key] == now[key] for key in ("train_packs", "sha256")):
        return  # the same packs, whatever the packing version that made them
    if (version := saved.get("packing", 1)) > PACKING:  # a run started by a later linearize, resumed with this one
        raise LinearizeError(
            f"checkpoint {checkpoint} was written by a later linearize, which packs documents differently (packing "
            f"version {version}, this one's {PACKING}): finish the run with the version that started it, or start "
            "again in another output.dir"
        )
    if version != PACKING:
        since = "; ".join(change for v, change in PACKING_CHANGES.items() if v > version)
        raise LinearizeError(
            f"checkpoint {checkpoint} was written by an earlier linearize, which packed documents differently (since "
            f"then {since}): the run cannot continue with this version's data; finish it with the version that "
            "started it, or start again in another output.dir"
        )
    raise LinearizeError(
        f"checkpoint {checkpoint} was trained on other packed data ({saved['train_packs']} training packs, now "
        f"{now['train_packs']}, or other tokens in them): the data files or their tokenization changed since, so "
        "the batch order and the held-out documents would too; restore them, or start a new run in another output.dir"
    )


@contextmanager
def run_lock(run: Path) -> Iterator[None]:
    """Hold `run` for this run until the block ends. A second `finetune` into the same folder while one trains is
    refused here, before any weights load: both would train, mix their rows in metrics.jsonl and replace each
    other's checkpoints. The system releases the lock however the run ends (a kill included). Taken by one process
    of a torchrun job (the others would find it held by their own job); `--dry-run` takes none."""
    check_writable(run, written_into=True)  # a folder that is a file or cannot be written: said as elsewhere
    _refuse_links(run)
    with ExitStack() as held:
        try:
            with write_errors(run):
                held.enter_context(locked(run / LOCK_FILE))
        except LockHeld as error:
            raise LinearizeError(
                f"output folder '{run}' is in use by another linearize finetune ({error.holder}), which trains into "
                "it: two runs would mix their metrics and replace each other's checkpoints. Wait for that run to "
                f"finish (then {RESUME} continues it, if you stopped it), or choose another output.dir"
            ) from None
        yield


def _refuse_links(run: Path) -> None:
    """Refuse a run folder (someone else's, copied) whose lock or metrics file is a link: a run truncates and writes
    both in place, which would overwrite the file the link points to, anywhere."""
    for name in (LOCK_FILE, METRICS_FILE):
        if (run / name).is_symlink():
            raise LinearizeError(
                f"output folder '{run}' holds {name} as a link to '{os.readlink(run / name)}': a run writes that file "
                "in place, which would overwrite what the link points to. Delete the link (or put a copy of the file "
                "in its place), or choose another output.dir"
            )


def prepare_run_folder(
    run: Path, recipe: Recipe, resume: bool, note: Callable[[str], None] | None = None
) -> Path | None:
    """Check that `run` may hold this recipe's run; return the checkpoint to resume from, if any.

    A run that reached no checkpoint (one that failed on its data, say) has nothing to lose: a changed recipe
    replaces it, and `note` is told so. A run with checkpoints or a saved model keeps its recipe."""
    saved = run / RECIPE_FILE
    check_writable(run, written_into=True)  # also refuses a run folder that is a file
    if not saved.is_file():
        if run.exists() and any(p.name != LOCK_FILE for p in run.iterdir()):  # a run that failed at once left one
            raise LinearizeError(
                f"output folder '{run}' is not empty and is not a linearize run (no {RECIPE_FILE}); "
                "choose another output.dir"
            )
        return None
    checkpoints = list_checkpoints(run)
    has_results = bool(checkpoints) or (run / "model").exists()
    saved_recipe = _saved_recipe(saved)
    if saved_recipe is None or recipe_hash(saved_recipe) != recipe_hash(recipe):
        if has_results:
            differences = recipe_differences(saved_recipe, recipe) if saved_recipe is not None else ""
            changed = f" ({differences})" if differences else ""
            raise LinearizeError(
                f"output folder '{run}' holds a run of a different recipe{changed} (see {saved}), with checkpoints "
                "or a saved model; nothing was changed. Resume it with that recipe, choose another output.dir, or "
                "delete that folder to start over."
            )
        if note is not None:
            note(
                f"output folder '{run}' held a different recipe's run that reached no checkpoint: this recipe "
                f"replaces it ({saved})"
            )
        return None
    if not resume:
        if has_results:
            raise LinearizeError(
                f"output folder '{run}' already holds this recipe's run; pass {RESUME} to continue it from "
                "its latest checkpoint, or choose another output.dir"
            )
        return None
    changed = recipe_differences(saved_recipe, recipe, bookkeeping=True)
    if changed and note is not None:
        note(f"resuming with other bookkeeping than the run started with: {changed}")
    return checkpoints[-1] if checkpoints else None


def _saved_recipe(saved: Path) -> Recipe | None:
    try:
        return load_recipe(saved)
    except LinearizeError:  # unreadable or no longer valid: it cannot be this recipe
        return None
