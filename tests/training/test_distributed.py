"""The process group helpers outside torchrun: what `init_world` leaves to the caller."""

import torch

from linearize.training.distributed import init_world


def test_one_process_trains_on_the_callers_gpu_and_leaves_its_current_device(monkeypatch):
    """A notebook that chose GPU 1 (`torch.cuda.set_device(1)`, GPU 0 busy) fine-tunes there, and its current device
    stays GPU 1 after the run (one process took GPU 0 and made it the process's current device)."""
    chosen = []
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)
    monkeypatch.setattr(torch.cuda, "set_device", chosen.append)
    world = init_world()
    assert world.device == torch.device("cuda", 1) and not world.distributed and chosen == []
