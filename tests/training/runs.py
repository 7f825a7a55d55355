"""A tiny fine-tuning run for the tests of `linearize finetune`: its recipe, and how the tests run and read it."""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

from safetensors.torch import load_file
from typer.testing import CliRunner

from linearize.cli import app
from linearize.training.checkpoint import list_checkpoints

ROOT = Path(__file__).resolve().parents[2]

RECIPE = """\
model: {{name: {source}}}
conversion: {{method: liger, window: 8}}
data:
  sources: [{{path: "{corpus}/*.txt"}}]
  seq_len: 32
  held_out: 2
lora: {{r: 4, alpha: 8, target_modules: [q_proj, k_proj, v_proj, o_proj]}}
stages:
  - kind: attention_transfer
    trainable: [lora]
    max_steps: 4
    optimizer: {{lr: 0.01}}
  - kind: lora
    max_steps: 4
    optimizer: {{lr: 0.005}}
    schedule: {{warmup_steps: 1}}
training: {{grad_accum: 2, eval_every: 2, eval_batches: 2, checkpoint_every: 2, keep_checkpoints: 2}}
output: {{dir: {out}}}
"""


def write_recipe(workspace: Path, tmp_path: Path, text: str = RECIPE) -> Path:
    path = tmp_path / "recipe.yaml"
    path.write_text(text.format(source=workspace / "source", corpus=workspace / "corpus", out=tmp_path / "run"))
    return path


def invoke(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def trained(run: Path) -> dict:
    """The tensors the latest checkpoint of `run` holds."""
    return load_file(list_checkpoints(run)[-1] / "trained.safetensors")


def instruction_file(path: Path, seed: int = 2, records: int = 40) -> Path:
    """Alpaca-style records of the tiny vocabulary, prompts of 2-29 words and answers of 1-11: packs that train
    varying numbers of tokens."""
    rng = random.Random(seed)
    rows = [
        {"instruction": " ".join(f"w{rng.randrange(124)}" for _ in range(rng.randrange(2, 30))), "input": "",
         "output": " ".join(f"w{rng.randrange(124)}" for _ in range(rng.randrange(1, 12)))}
        for _ in range(records)
    ]  # fmt: skip
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def process_env() -> dict[str, str]:
    """The environment of the processes these tests start (torchrun jobs, a run held elsewhere): one thread each, and
    this checkout first on PYTHONPATH, ahead of what it held, which under `make test-floor` puts the oldest
    transformers first (replaced by the checkout alone, the processes ran the newest)."""
    path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": path}
