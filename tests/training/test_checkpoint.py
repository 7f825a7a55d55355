"""Run folders and checkpoints: resume continues a killed run exactly, refuses what would change it, and a run
folder never loses what it holds."""

from __future__ import annotations

import errno
import io
import json
import os
import resource
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import linearize.outputs
import linearize.sources
from linearize.errors import LinearizeError
from linearize.training import checkpoint as checkpoint_module
from linearize.training import trainer as trainer_module
from linearize.training.checkpoint import (
    LOCK_FILE,
    METRICS_FILE,
    RECIPE_FILE,
    checkpoint_dir,
    list_checkpoints,
    prepare_run_folder,
    run_lock,
    save_checkpoint,
)
from linearize.training.fingerprints import PACKING, legacy_recipe_hash
from linearize.training.recipe import load_recipe, resolved_yaml
from tests.training.runs import invoke, metrics, process_env, trained, write_recipe

AUTO_AFTER_TRANSFER = [
    "conversion.softmax_layers=auto:1",
    "conversion.selection={scorer: loss, calibration: CORPUS, windows: 1, after: attention_transfer}",
]


@pytest.mark.parametrize("selected", [False, True], ids=["named-layers", "auto-after-transfer"])
def test_killed_run_resumes_to_the_same_result(workspace, tmp_path, monkeypatch, selected):
    """Killed inside a stage, or (named layers) at the checkpoint that closes one: the resumed run's weights and
    losses are the straight run's exactly, LoRA dropout's random draws included."""
    extra = [o.replace("CORPUS", f"{workspace}/corpus/*.txt") for o in AUTO_AFTER_TRANSFER] if selected else []
    extra.append("lora.dropout=0.1")
    straight = tmp_path / "straight"
    straight.mkdir()
    first = invoke("finetune", write_recipe(workspace, straight), *extra)
    assert first.exit_code == 0, first.output

    resumed = tmp_path / "resumed"
    resumed.mkdir()
    recipe = write_recipe(workspace, resumed)
    real_checkpoint = trainer_module.Trainer.checkpoint
    calls = []

    def killed_after_second_checkpoint(self, *args):
        real_checkpoint(self, *args)
        calls.append(self.state.global_step)
        # the second closes the transfer stage; the third, step 2 of 4 of the lora stage, comes after the selection
        if len(calls) == (3 if selected else 2):
            raise KeyboardInterrupt

    monkeypatch.setattr(trainer_module.Trainer, "checkpoint", killed_after_second_checkpoint)
    result = invoke("finetune", recipe, *extra)
    assert result.exit_code == 130 and "(overrides included) with --resume" in " ".join(result.output.split())
    assert not (resumed / "run" / "model").exists()
    monkeypatch.setattr(trainer_module.Trainer, "checkpoint", real_checkpoint)

    result = invoke("finetune", recipe, *extra)
    assert result.exit_code == 1 and "pass --resume" in result.output
    if selected:  # the resumed run takes the kept layers from its checkpoint: it must not score again
        monkeypatch.setattr(trainer_module, "select_layers", lambda *args, **kwargs: pytest.fail("scored again"))
        # a checkpoint of an earlier linearize (its recipe fingerprint covered the bookkeeping too, its data
        # fingerprint had no packing version) still resumes, where its data packs as it did
        state = list_checkpoints(resumed / "run")[-1] / "trainer_state.json"
        saved = json.loads(state.read_text())
        saved["recipe_hash"] = legacy_recipe_hash(load_recipe(resumed / "run" / "linearize_recipe.yaml"))
        del saved["data"]["packing"]
        state.write_text(json.dumps(saved))
        # its fingerprint holds the bookkeeping: changing it is refused, before the run's recipe file is rewritten
        recorded = (resumed / "run" / "linearize_recipe.yaml").read_text()
        refused = invoke("finetune", recipe, *extra, "training.eval_every=1", "--resume")
        shown = " ".join(refused.output.split())
        assert refused.exit_code == 1 and "also needs training.checkpoint_every, training.eval_batches" in shown
        assert (resumed / "run" / "linearize_recipe.yaml").read_text() == recorded
        bookkeeping = []
    else:  # how often it evaluates and keeps checkpoints, and whether it recomputes, may change: the results do not
        bookkeeping = ["training.eval_every=1", "training.keep_checkpoints=3", "training.checkpoint_every=3"]
        bookkeeping.append("training.gradient_checkpointing=true")
    result = invoke("finetune", recipe, *extra, *bookkeeping, "--resume")
    assert result.exit_code == 0, result.output
    if bookkeeping:
        changed = "training.gradient_checkpointing false -> true, training.eval_every 2 -> 1"
        shown = " ".join(result.output.split())
        assert f"resuming with other bookkeeping than the run started with: {changed}" in shown
    if selected:  # scored once, after the transfer stage
        chosen = [r["layer_selection"] for r in metrics(straight / "run") if "layer_selection" in r]
        assert len(chosen) == 1 and chosen[0]["after"] == "attention_transfer"
        assert [r["layer_selection"] for r in metrics(resumed / "run") if "layer_selection" in r] == chosen
        config = json.loads((resumed / "run" / "model" / "config.json").read_text())["linearize"]
        assert config["layer_selection"] == chosen[0] and config["softmax_layers"] == [
            max(range(2), key=chosen[0]["scores"].__getitem__)
        ]

    a, b = trained(straight / "run"), trained(resumed / "run")
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=0, msg=name)
    final = [r for r in metrics(straight / "run") if "eval_loss" in r][-1]
    final_resumed = [r for r in metrics(resumed / "run") if "eval_loss" in r][-1]
    assert final["eval_loss"] == final_resumed["eval_loss"]


def test_resume_without_a_checkpoint_says_that_the_run_starts_from_the_beginning(workspace, tmp_path):
    """A job script that always passes --resume starts its first run so; a mistyped output.dir must not silently."""
    recipe = write_recipe(workspace, tmp_path)
    result = invoke("finetune", recipe, "stages.0.max_steps=1", "stages.1.max_steps=1", "--resume", "-q")
    assert result.exit_code == 0, result.output
    assert "--resume (resume=True): " in result.output
    assert "holds no checkpoint of this recipe yet; training starts from the beginning" in " ".join(
        result.output.split()
    )


def test_resume_refuses_a_changed_recipe(workspace, tmp_path):
    recipe = write_recipe(workspace, tmp_path)
    assert invoke("finetune", recipe, "stages.1.max_steps=2").exit_code == 0
    result = invoke("finetune", recipe, "stages.1.max_steps=3", "--resume")
    assert result.exit_code == 1
    message = " ".join(result.output.split())
    assert "holds a run of a different recipe (stages.1.max_steps 2 -> 3)" in message
    assert "nothing was changed" in message and (tmp_path / "run" / "model").is_dir()


def test_resume_refuses_changed_data(workspace, tmp_path, monkeypatch):
    """The same recipe over data files that changed since the checkpoint: another batch order and other held-out
    documents, so the run is refused, not continued on them."""
    corpus = tmp_path / "corpus"
    shutil.copytree(workspace / "corpus", corpus)
    recipe = write_recipe(workspace, tmp_path)
    data = f"data.sources=[{{path: {corpus}/*.txt}}]"
    real_checkpoint = trainer_module.Trainer.checkpoint

    def killed_after_the_first(self, *args):
        real_checkpoint(self, *args)
        raise KeyboardInterrupt

    monkeypatch.setattr(trainer_module.Trainer, "checkpoint", killed_after_the_first)
    assert invoke("finetune", recipe, data).exit_code == 130
    monkeypatch.setattr(trainer_module.Trainer, "checkpoint", real_checkpoint)
    (corpus / "doc99.txt").write_text(" ".join(f"w{i % 124}" for i in range(300)))
    result = invoke("finetune", recipe, data, "--resume")
    message = " ".join(result.output.split())
    assert (
        result.exit_code == 1
        and "was trained on other packed data (" in message
        and "the data files or their tokenization changed" in message
    )
    dry_run = invoke("finetune", recipe, data, "--resume", "--dry-run")  # the plan says so too
    assert dry_run.exit_code == 1 and "was trained on other packed data (" in " ".join(dry_run.output.split())
    # a checkpoint of an earlier linearize, whose packing made document starts targets: named as such
    state = list_checkpoints(tmp_path / "run")[-1] / "trainer_state.json"
    saved = json.loads(state.read_text())
    del saved["data"]["packing"]
    state.write_text(json.dumps(saved))
    result = invoke("finetune", recipe, data, "--resume")
    message = " ".join(result.output.split())
    assert result.exit_code == 1 and "by an earlier linearize, which packed documents differently" in message
    assert "first token is a target" in message and "gets no second one" in message
    saved["data"]["packing"] = 2  # one version back: only what changed since is named
    state.write_text(json.dumps(saved))
    message = " ".join(invoke("finetune", recipe, data, "--resume", "--dry-run").output.split())
    assert "(since then blank text records are no documents, and a document that ends with EOS gets" in message
    saved["data"]["packing"] = PACKING + 1  # a run started by a later linearize: nothing "since then" to name
    state.write_text(json.dumps(saved))
    message = " ".join(invoke("finetune", recipe, data, "--resume", "--dry-run").output.split())
    assert f"by a later linearize, which packs documents differently (packing version {PACKING + 1}" in message


def test_resumed_run_logs_every_step_once(workspace, tmp_path, monkeypatch):
    recipe = write_recipe(workspace, tmp_path)
    real_forward_loss = trainer_module.Trainer.forward_loss

    def killed_one_step_after_a_checkpoint(self, *args):
        if self.state.global_step == 5:  # checkpoint at 4, then the lora stage's baseline and step 5 were logged
            raise KeyboardInterrupt
        return real_forward_loss(self, *args)

    monkeypatch.setattr(trainer_module.Trainer, "forward_loss", killed_one_step_after_a_checkpoint)
    assert invoke("finetune", recipe).exit_code == 130
    assert [r["global_step"] for r in metrics(tmp_path / "run") if "lr" in r] == [1, 2, 3, 4, 5]
    monkeypatch.setattr(trainer_module.Trainer, "forward_loss", real_forward_loss)

    result = invoke("finetune", recipe, "--resume")
    assert result.exit_code == 0, result.output
    records = metrics(tmp_path / "run")
    assert [r["global_step"] for r in records if "lr" in r] == list(range(1, 9))
    evals = [(r["stage"], r["step"]) for r in records if "lr" not in r]
    assert evals == [(0, 0), (0, 2), (0, 4), (1, 0), (1, 2), (1, 4)]


def test_a_run_that_failed_before_any_checkpoint_takes_the_corrected_recipe(workspace, tmp_path):
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes(b"caf\xe9 w1 w2\n")
    recipe = write_recipe(workspace, tmp_path)
    short = ["stages.0.max_steps=1", "stages.1.max_steps=1"]
    failed = invoke("finetune", recipe, *short, f"data.sources.0.path={latin1}")
    assert failed.exit_code == 1 and "is not UTF-8 text" in failed.output
    assert (tmp_path / "run" / "linearize_recipe.yaml").is_file() and not list_checkpoints(tmp_path / "run")

    fixed = invoke("finetune", recipe, *short)
    assert fixed.exit_code == 0, fixed.output
    assert "reached no checkpoint: this recipe replaces it" in " ".join(fixed.output.split())
    assert f"path: {latin1}" not in (tmp_path / "run" / "linearize_recipe.yaml").read_text()

    changed = invoke("finetune", recipe, "stages.0.max_steps=2", "stages.1.max_steps=1", "--resume")
    assert changed.exit_code == 1
    assert "holds a run of a different recipe" in changed.output and "Resume it with that recipe" in changed.output
    assert (tmp_path / "run" / "model").is_dir()


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(workspace, tmp_path, monkeypatch):
    recipe = write_recipe(workspace, tmp_path)
    real_forward_loss = trainer_module.Trainer.forward_loss

    def poisoned(self, model, batch, transfer, *args):
        loss = real_forward_loss(self, model, batch, transfer, *args)
        return loss * float("nan") if self.state.global_step == 2 else loss

    monkeypatch.setattr(trainer_module.Trainer, "forward_loss", poisoned)
    result = invoke("finetune", recipe)
    assert result.exit_code == 1
    assert "the loss became nan at stage 1 (attention_transfer) step 3" in result.output
    assert "step-000002" in result.output and "optimizer.lr" in result.output
    assert [p.name for p in list_checkpoints(tmp_path / "run")] == ["step-000002"]


def test_a_damaged_checkpoint_is_named_and_an_older_one_resumes(workspace, tmp_path):
    """A checkpoint whose tensors or optimizer state are not what linearize wrote (a disk error, a copy cut short)
    is named with the fix, whatever the damage: no safetensors or unpickling traceback, no bare "Aborted"."""
    recipe = write_recipe(workspace, tmp_path)
    assert invoke("finetune", recipe, "stages.1.max_steps=2").exit_code == 0
    run = tmp_path / "run"
    latest = list_checkpoints(run)[-1]
    for name, damage in (
        ("trained.safetensors", b"\x10" * 100),  # a header length past the end
        ("optimizer.pt", b"\x80\x02garbage" * 10),  # no pickle torch wrote
        ("optimizer.pt", b""),
    ):
        intact = (latest / name).read_bytes()
        (latest / name).write_bytes(damage)
        result = invoke("finetune", recipe, "stages.1.max_steps=2", "--resume")
        shown = " ".join(result.output.split())
        assert result.exit_code == 1 and f"checkpoint {latest} cannot be read" in shown, (name, result.exception)
        assert "delete it to resume from an older one" in shown
        (latest / name).write_bytes(intact)
    shutil.rmtree(latest)
    assert invoke("finetune", recipe, "stages.1.max_steps=2", "--resume").exit_code == 0


def test_a_run_with_results_is_continued_only_when_asked_in_the_callers_terms(workspace, tmp_path):
    """The library's `finetune` reaches this refusal too: it names its argument beside the command's option."""
    recipe = load_recipe(write_recipe(workspace, tmp_path))
    run = tmp_path / "run"
    (run / "model").mkdir(parents=True)
    (run / RECIPE_FILE).write_text(resolved_yaml(recipe))
    with pytest.raises(LinearizeError, match=r"already holds this recipe's run; pass --resume \(resume=True\)"):
        prepare_run_folder(run, recipe, resume=False)


def test_output_folder_that_is_not_a_run(workspace, tmp_path):
    recipe = write_recipe(workspace, tmp_path)
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "precious.txt").write_text("keep me")
    result = invoke("finetune", recipe)
    assert result.exit_code == 1 and "is not a linearize run" in result.output
    assert (tmp_path / "run" / "precious.txt").read_text() == "keep me"


def test_an_output_dir_that_is_a_file_or_under_one_is_refused_before_training(workspace, tmp_path):
    recipe = write_recipe(workspace, tmp_path)
    (tmp_path / "afile").write_text("keep me")
    for folder, message in ((tmp_path / "afile", "is a file, not a folder"), (tmp_path / "afile" / "run", "is a file")):
        for dry_run in ((), ("--dry-run",)):
            result = invoke("finetune", recipe, f"output.dir={folder}", *dry_run)
            assert result.exit_code == 1 and message in result.output and "Traceback" not in result.output
    assert (tmp_path / "afile").read_text() == "keep me"


# a process that holds a run folder's lock as a training run does, until it is killed
HOLD_THE_RUN = """
import sys, time
from linearize.locks import locked
with locked(sys.argv[1]):
    print("holding", flush=True)
    time.sleep(120)
"""


def test_a_second_run_into_a_folder_another_run_trains_into_is_refused_before_loading(workspace, tmp_path, monkeypatch):
    """Both would train, mix their rows in metrics.jsonl and replace each other's checkpoints. The second is refused
    at once, naming the other; a dry run takes no lock; under torchrun the job's processes share one lock (the other
    torchrun tests train) and all stop. The lock goes with its holder, however it ends."""
    recipe = write_recipe(workspace, tmp_path)
    run = tmp_path / "run"
    env = process_env()
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD_THE_RUN, str(run / LOCK_FILE)], env=env, stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout.readline() == "holding\n"
        monkeypatch.setattr(linearize.sources, "load_model", lambda *args, **kwargs: pytest.fail("loaded weights"))
        result = invoke("finetune", recipe)
        shown = " ".join(result.output.split())
        assert result.exit_code == 1, result.output
        assert f"is in use by another linearize finetune (process {holder.pid} on" in shown
        assert "Wait for that run to finish" in shown and "choose another output.dir" in shown
        assert sorted(p.name for p in run.iterdir()) == [LOCK_FILE]  # nothing read as, or written into, a run
        assert invoke("finetune", recipe, "--dry-run").exit_code == 0

        torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "linearize"]
        result = subprocess.run(
            [*torchrun, "finetune", str(recipe), "-q"], env=env, capture_output=True, text=True, timeout=300
        )
        assert result.returncode != 0
        assert "is in use by another linearize finetune" in result.stderr
        assert "Error: stopped because process 0 failed: see its error" in result.stderr
    finally:
        holder.kill()
        holder.wait()
    with run_lock(run):  # killed: no stale lock
        pass


@pytest.mark.parametrize("name", [LOCK_FILE, METRICS_FILE])
def test_a_run_folder_whose_lock_or_metrics_file_is_a_link_is_refused(name, workspace, tmp_path, monkeypatch):
    """A run folder copied from someone else may hold its lock or metrics file as a link: a run truncated and wrote
    the file the link points to (the lock its process id, metrics.jsonl its rows), outside the folder."""
    recipe = write_recipe(workspace, tmp_path)
    run = tmp_path / "run"
    run.mkdir()
    (run / RECIPE_FILE).write_text(resolved_yaml(load_recipe(recipe)))  # the same recipe's run, no checkpoint yet
    precious = tmp_path / "thesis.tex"
    precious.write_text("years of work\n")
    (run / name).symlink_to(Path("..") / precious.name)
    monkeypatch.setattr(linearize.sources, "load_model", lambda *args, **kwargs: pytest.fail("loaded weights"))
    result = invoke("finetune", recipe)
    shown = " ".join(result.output.split())
    assert result.exit_code == 1 and f"holds {name} as a link to '../thesis.tex'" in shown, result.output
    assert precious.read_text() == "years of work\n"


def test_pruning_a_checkpoint_that_is_already_gone_goes_on(tmp_path, monkeypatch):
    """A checkpoint deleted by hand between the run listing it and deleting it: the run goes on."""
    run = tmp_path / "run"
    for step in (1, 2):
        save_checkpoint(run, step, {"w": torch.zeros(1)}, [], [], {"step": step}, keep=2)
    first, sibling = checkpoint_dir(run) / "step-000001", linearize.outputs._sibling

    def deleted_meanwhile(path, kind):
        if path == first:
            shutil.rmtree(path)
        return sibling(path, kind)

    monkeypatch.setattr(linearize.outputs, "_sibling", deleted_meanwhile)
    save_checkpoint(run, 3, {"w": torch.zeros(1)}, [], [], {"step": 3}, keep=2)
    assert [p.name for p in list_checkpoints(run)] == ["step-000002", "step-000003"]


class _Planted:
    """What a pickle from someone else may hold: a call, here one that creates a folder, run as it is read."""

    def __init__(self, made: Path):
        self.made = made

    def __reduce__(self):
        return os.mkdir, (str(self.made),)


def test_a_checkpoint_never_runs_code_its_optimizer_file_names(tmp_path):
    """A run folder may come from someone else (a colleague's run, resumed): optimizer.pt is read with torch's
    weights-only unpickler, so a file that names a call to make is refused as unreadable instead of running it,
    while what linearize writes there (optimizer, scheduler and every RNG state, NumPy's included) loads whole."""
    weight = torch.nn.Parameter(torch.ones(3))
    weight.grad = torch.ones(3)
    optimizer = torch.optim.AdamW([weight])
    optimizer.step()
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    path = save_checkpoint(tmp_path / "run", 1, {"w": weight}, [optimizer.state_dict()], [scheduler], {}, keep=1)
    _, states, _ = checkpoint_module.load_checkpoint(path)
    saved_numpy = checkpoint_module.rng_state()["numpy"]
    assert states["rng"][0]["numpy"][0] == saved_numpy[0] and (states["rng"][0]["numpy"][1] == saved_numpy[1]).all()
    assert torch.equal(states["optimizers"][0]["state"][0]["exp_avg"], optimizer.state[weight]["exp_avg"])

    made = tmp_path / "made-by-the-pickle"
    torch.save({"optimizers": [], "schedulers": [], "rng": [_Planted(made)]}, path / "optimizer.pt")
    with pytest.raises(LinearizeError, match="cannot be read"):
        checkpoint_module.load_checkpoint(path)
    assert not made.exists()


def test_a_checkpoint_written_on_a_gpu_resumes_on_a_cpu(tmp_path, monkeypatch):
    """A run trained on CUDA keeps its optimizer states there, and torch.save records that device: a resume on a
    machine without CUDA (or under torchrun on another GPU) must read them onto the CPU, from where the optimizer
    moves them to its parameters' device. Without that the checkpoint read as damaged ("delete it")."""
    weight = torch.nn.Parameter(torch.ones(3))
    weight.grad = torch.ones(3)
    optimizer = torch.optim.AdamW([weight])
    optimizer.step()
    with monkeypatch.context() as gpu:  # every storage saved as a CUDA run's would be
        gpu.setattr(torch.serialization, "location_tag", lambda storage: "cuda:0")
        path = save_checkpoint(tmp_path / "run", 1, {"w": weight}, [optimizer.state_dict()], [], {}, keep=1)
    _, states, _ = checkpoint_module.load_checkpoint(path)
    saved = states["optimizers"][0]
    assert saved["state"][0]["exp_avg"].device.type == "cpu"
    resumed = torch.optim.AdamW([torch.nn.Parameter(torch.ones(3))])
    resumed.load_state_dict(saved)
    assert torch.equal(next(iter(resumed.state.values()))["exp_avg"], optimizer.state[weight]["exp_avg"])


def test_each_process_restores_the_random_state_of_its_own_gpu(monkeypatch):
    """Under torchrun every process draws on its own device: a checkpoint keeps each process's device state and
    each process restores its own onto its own device, not the main process's view of every device (where the
    others were never drawn from)."""
    restored = {}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda: torch.tensor([7], dtype=torch.uint8))
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda state: restored.update(device=state))
    monkeypatch.setattr(torch.cuda, "set_rng_state_all", lambda states: restored.update(every_device=states))
    state = checkpoint_module.rng_state()
    assert state["cuda_device"].tolist() == [7] and "cuda" not in state
    checkpoint_module.set_rng_state(state)
    assert restored == {"device": state["cuda_device"]}

    restored.clear()  # a checkpoint written before: every device as the main process saw them
    legacy = {**state, "cuda": [torch.tensor([1], dtype=torch.uint8)]}
    del legacy["cuda_device"]
    checkpoint_module.set_rng_state(legacy)
    assert restored == {"every_device": legacy["cuda"]}
    # each process takes its own of a checkpoint's states; of one written before, the main process's alone
    assert checkpoint_module.own_rng_state([legacy, state], 1) is state
    assert checkpoint_module.own_rng_state(legacy, 1) is legacy


def test_under_torchrun_a_resumed_run_continues_every_process_as_the_straight_run(workspace, tmp_path):
    """Each process draws LoRA dropout once per document of its packs, so the processes' random states part after
    the first step: a run of two processes, stopped at a checkpoint inside the lora stage and resumed, must still
    train to the straight run's losses and weights. (Stopped there: the straight run's folder as it was then,
    the later checkpoints and the model not yet written.)"""
    recipe = write_recipe(workspace, tmp_path)
    env = process_env()
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "linearize", "finetune"]
    command += [str(recipe), "lora.dropout=0.1", "stages.0.max_steps=1", "stages.1.max_steps=3"]
    command += ["training.checkpoint_every=1", "training.keep_checkpoints=4", "-q"]
    straight = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert straight.returncode == 0, straight.stderr[-3000:]
    run, resumed = tmp_path / "run", tmp_path / "resumed"
    shutil.copytree(run, resumed)
    shutil.rmtree(resumed / "model")
    for later in list_checkpoints(resumed)[2:]:  # kept: step 1 (the transfer) and step 2 (the lora stage's first)
        shutil.rmtree(later)
    result = subprocess.run([*command, f"output.dir={resumed}", "--resume"], env=env, capture_output=True, text=True,
                            timeout=300)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    losses = [[r["loss"] for r in metrics(folder) if "loss" in r] for folder in (run, resumed)]
    assert len(losses[0]) == 3 and losses[1] == losses[0]
    a, b = trained(run), trained(resumed)
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=0, atol=0, msg=name)


def test_resume_with_another_process_count_is_refused_before_loading(workspace, tmp_path, monkeypatch):
    recipe = write_recipe(workspace, tmp_path)
    real_checkpoint = trainer_module.Trainer.checkpoint

    def killed_after_the_first(self, *args):
        real_checkpoint(self, *args)
        raise KeyboardInterrupt

    monkeypatch.setattr(trainer_module.Trainer, "checkpoint", killed_after_the_first)
    assert invoke("finetune", recipe).exit_code == 130
    state = list_checkpoints(tmp_path / "run")[-1] / "trainer_state.json"
    state.write_text(json.dumps({**json.loads(state.read_text()), "processes": 2}))  # as torchrun with two wrote it
    monkeypatch.setattr(trainer_module, "Trainer", lambda *args: pytest.fail("loaded the model and the data"))
    result = invoke("finetune", recipe, "--resume")
    message = " ".join(result.output.split())
    assert result.exit_code == 1 and "was written by a run of 2 process(es)" in message
    assert "torchrun --nproc_per_node 2), not 1" in message


class _FullDisk(io.BytesIO):
    def write(self, data):
        if self.tell() + len(data) > 256:
            raise OSError(errno.ENOSPC, "No space left on device")
        return super().write(data)


def test_a_full_disk_at_a_checkpoint_says_so_and_keeps_the_last_one(workspace, tmp_path, monkeypatch):
    """The optimizer state goes through torch.save, which reports a failed write as a RuntimeError without the
    errno: the disk must still be named full, and no partial checkpoint left."""
    recipe = write_recipe(workspace, tmp_path)
    opened = []

    def disk_fills_after_the_first_checkpoint(path, mode):
        opened.append(path)
        return open(path, mode) if len(opened) == 1 else _FullDisk()

    monkeypatch.setattr(checkpoint_module, "open", disk_fills_after_the_first_checkpoint, raising=False)
    result = invoke("finetune", recipe, "stages.1.max_steps=4", "training.checkpoint_every=2")
    assert result.exit_code == 1 and "the disk is full" in result.output and "Traceback" not in result.output
    assert len(opened) == 2 and [p.name for p in list_checkpoints(tmp_path / "run")] == ["step-000002"]
    assert [p.name for p in (tmp_path / "run" / "checkpoints").iterdir()] == ["step-000002"]  # nothing partial


def test_under_torchrun_a_failure_of_the_main_process_stops_the_others_with_its_message(workspace, tmp_path):
    """The main process alone writes checkpoints; when that fails (a file-size limit here) the other process must
    stop with a line that points to it, not with gloo's "Connection closed by peer" traceback."""
    recipe = write_recipe(workspace, tmp_path)
    env = process_env()
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "linearize"]
    command += ["finetune", str(recipe), "stages.1.max_steps=2", "training.checkpoint_every=1", "-q"]

    def small_files():  # Python ignores SIGXFSZ: a write past the limit raises EFBIG ("File too large")
        resource.setrlimit(resource.RLIMIT_FSIZE, (32 * 1024, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))

    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300, preexec_fn=small_files)
    assert result.returncode != 0
    assert "Error: could not write output folder" in result.stderr and "File too large." in result.stderr
    assert "Error: stopped because process 0 failed: see its error" in result.stderr
    assert "Connection closed" not in result.stderr and "[rank1]: Traceback" not in result.stderr
    assert not list_checkpoints(tmp_path / "run")


RACE = """\
import os, sys, time
from pathlib import Path
from linearize.cli import app
from linearize.training import trainer
rank, write_text, prepare = int(os.environ["RANK"]), Path.write_text, trainer.prepare_run_folder
def slow_write(self, *args, **kwargs):  # the main process stages the run's recipe file on a slow disk
    written = write_text(self, *args, **kwargs)
    if "linearize_recipe.yaml" in self.name and self.name.endswith(".tmp"):
        time.sleep(3)
    return written
def late(*args, **kwargs):  # the other process, a second behind
    if rank == 1:
        time.sleep(1)
    return prepare(*args, **kwargs)
Path.write_text, trainer.prepare_run_folder = slow_write, late
app(sys.argv[1:])
"""


def test_under_torchrun_the_other_processes_take_the_run_folder_as_the_main_process_found_it(workspace, tmp_path):
    """The main process writes the run's recipe file (staged beside it) as soon as it has checked the folder: a
    process that looked later would find its own job's files there, and refuse a new run's folder as "not a
    linearize run" (or see a checkpoint the main process did not). Every process goes by what the main one found."""
    script = tmp_path / "race.py"
    script.write_text(RACE)
    env = process_env()
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", str(script), "finetune"]
    command += [str(write_recipe(workspace, tmp_path)), "stages.0.max_steps=1", "stages.1.max_steps=1", "-q"]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / "run" / "model" / "config.json").is_file()


def test_optimizer_states_of_other_parameters_are_refused_by_name():
    """A checkpoint whose optimizer trained another set of parameters (an earlier linearize trained o_proj's adapter
    in attention transfer too) cannot continue: a message, not torch's ValueError."""
    from linearize.errors import LinearizeError

    earlier = torch.optim.AdamW([torch.zeros(2, requires_grad=True), torch.zeros(3, requires_grad=True)])
    now = torch.optim.AdamW([torch.zeros(2, requires_grad=True)])
    with pytest.raises(LinearizeError, match="trained other parameters than this stage trains"):
        checkpoint_module.load_optimizer_states(None, [now], [earlier.state_dict()], sharded=False)


def test_a_full_disk_when_a_resume_starts_keeps_the_run_resumable(workspace, tmp_path, monkeypatch):
    """Each start rewrites the run's recipe file: a write cut short there (a full disk) must leave the file that
    says whose checkpoints these are as it was, or every later --resume refuses them as another recipe's."""
    recipe = write_recipe(workspace, tmp_path)
    assert invoke("finetune", recipe, "stages.1.max_steps=4", "training.checkpoint_every=2").exit_code == 0
    saved = (tmp_path / "run" / "linearize_recipe.yaml").read_text()
    write_text = Path.write_text

    def disk_full_for_the_recipe(self, text, *args, **kwargs):
        if "linearize_recipe.yaml" not in self.name or self.parent != tmp_path / "run":
            return write_text(self, text, *args, **kwargs)
        with open(self, "w") as file:
            file.write(text[:10])
        raise OSError(errno.ENOSPC, "No space left on device", str(self))

    monkeypatch.setattr(Path, "write_text", disk_full_for_the_recipe)
    result = invoke("finetune", recipe, "stages.1.max_steps=4", "training.checkpoint_every=2", "--resume")
    monkeypatch.undo()
    assert result.exit_code == 1 and "Traceback" not in result.output, result.output
    assert "the disk is full" in " ".join(result.output.split())
    assert (tmp_path / "run" / "linearize_recipe.yaml").read_text() == saved
    assert sorted(p.name for p in (tmp_path / "run").iterdir() if p.name.startswith(".")) == [LOCK_FILE]
    result = invoke("finetune", recipe, "stages.1.max_steps=4", "training.checkpoint_every=2", "--resume")
    assert result.exit_code == 0, result.output
