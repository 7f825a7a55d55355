"""Run folders and checkpoints: what a run writes, and how `--resume` finds where to continue.

A run folder holds `linearize_recipe.yaml` (the resolved recipe), `metrics.jsonl`, `checkpoints/` and, at the
end, `model/`. A checkpoint holds every tensor training has changed (new method parameters and LoRA
adapters), the optimizer and scheduler states, the position in the stages and the data, and the RNG states.
Each is written to a temporary folder and renamed into place, so a checkpoint either exists whole or not at all.
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from ..errors import LinearizeError
from ..outputs import atomic_folder

RECIPE_FILE = "linearize_recipe.yaml"
STATE_FILE = "trainer_state.json"
_PREFIX = "step-"


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
    state = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(
    run: Path,
    global_step: int,
    tensors: dict[str, torch.Tensor],
    optimizer_states: list[dict],
    schedulers: list,
    state: dict[str, Any],
    keep: int,
) -> Path:
    """Write checkpoint `step-<global_step>` atomically and delete all but the `keep` most recent."""
    folder = checkpoint_dir(run)
    folder.mkdir(parents=True, exist_ok=True)
    final = folder / f"{_PREFIX}{global_step:06d}"
    with atomic_folder(final, force=True) as tmp:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, tmp / "trained.safetensors")
        torch.save(
            {
                "optimizers": optimizer_states,
                "schedulers": [s.state_dict() for s in schedulers],
                "rng": rng_state(),
            },
            tmp / "optimizer.pt",
        )
        (tmp / STATE_FILE).write_text(json.dumps(state, indent=2))
    for old in list_checkpoints(run)[:-keep]:
        shutil.rmtree(old)
    return final


def load_checkpoint(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any], dict[str, Any]]:
    """The trained tensors, the optimizer/scheduler/RNG states and the trainer state of a checkpoint."""
    try:
        tensors = load_file(path / "trained.safetensors")
        # our own file, holding optimizer states and RNG tuples that need full unpickling
        states = torch.load(path / "optimizer.pt", weights_only=False)
        state = json.loads((path / STATE_FILE).read_text())
    except (OSError, ValueError, RuntimeError) as error:
        raise LinearizeError(
            f"checkpoint {path} cannot be read ({error}); delete it to resume from an older one"
        ) from None
    return tensors, states, state
