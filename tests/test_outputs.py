"""Output safety of `linearize convert`: refused outputs, write failures, killed runs and folder modes. Every
failure must end with a clear error, a non-zero exit and nothing lost."""

import contextlib
import errno
import json
import os
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
from huggingface_hub import constants as hub_constants
from safetensors import SafetensorError
from transformers import AutoModelForCausalLM
from typer.testing import CliRunner

import linearize.convert
import linearize.locks
import linearize.outputs
from linearize import sources
from linearize.cli import app
from linearize.errors import LinearizeError
from linearize.locks import locked
from tests.tiny import source_folder

runner = CliRunner()


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    return source_folder(tmp_path_factory.mktemp("source") / "tiny-llama")


@pytest.fixture
def no_weights_loaded(monkeypatch):
    """Refusals must come before any weights load."""

    def load(*args, **kwargs):
        raise AssertionError("weights were loaded before the output folder was checked")

    monkeypatch.setattr(sources, "load", load)


def files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def save_fails_with(monkeypatch, error: Exception) -> None:
    def save_then_fail(self, folder, **kwargs):
        (folder / "model.safetensors").write_bytes(b"partial")
        raise error

    monkeypatch.setattr(linearize.convert.LinearizeForCausalLM, "save_pretrained", save_then_fail)


@pytest.mark.parametrize("out", [".", "..", "sub"], ids=["is", "contains", "lies-inside"])
def test_output_overlapping_the_source_folder_is_refused(out, tmp_path, no_weights_loaded):
    src = source_folder(tmp_path / "fx" / "smol")
    before = files(tmp_path)
    result = invoke("convert", src, "-o", src / out, "--force")
    assert result.exit_code == 1
    message = " ".join(result.output.split())
    assert f"the source model '{src}'" in message and "--force (force=True) does not change this" in message
    assert files(tmp_path) == before


def test_output_in_the_hub_cache_folder_of_a_hub_id_source_is_refused(tmp_path, monkeypatch, no_weights_loaded):
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    snapshot = tmp_path / "hub" / "models--org--tiny" / "snapshots" / "abc"
    result = invoke("convert", "org/tiny", "-o", snapshot, "--force")
    assert result.exit_code == 1
    assert "lies inside the source model 'org/tiny'" in result.output


@pytest.mark.parametrize("out", ["SmolLM2-135M-Instruct", ".", "SmolLM2-135M-Instruct/sub"])
def test_output_overlapping_the_embedded_cache_is_refused(out, source, tmp_path, monkeypatch, no_weights_loaded):
    monkeypatch.setenv("LINEARIZE_CACHE", str(tmp_path / "cache"))
    (tmp_path / "cache" / "SmolLM2-135M-Instruct").mkdir(parents=True)
    result = invoke("convert", source, "-o", tmp_path / "cache" / out, "--force")
    assert result.exit_code == 1
    assert "the embedded model's cache" in result.output and "Choose an output folder outside it" in result.output


@pytest.mark.parametrize("out,relation", [(".", "is"), ("..", "contains")])
def test_current_folder_as_output_is_refused(out, relation, source, tmp_path, monkeypatch, no_weights_loaded):
    (tmp_path / "work").mkdir()
    (tmp_path / "work" / "notes.txt").write_text("mine")
    monkeypatch.chdir(tmp_path / "work")
    result = invoke("convert", source, "-o", out, "--force")
    assert result.exit_code == 1
    assert f"output folder '{out}' {relation} the current folder" in result.output
    assert "-o ./converted-model" in result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["work"]
    assert (tmp_path / "work" / "notes.txt").read_text() == "mine"


def test_home_folder_as_output_is_refused(source, tmp_path, monkeypatch, no_weights_loaded):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    (tmp_path / "home").mkdir()
    result = invoke("convert", source, "-o", tmp_path, "--force")
    assert result.exit_code == 1
    assert "contains your home folder" in result.output


def test_unwritable_output_location_is_refused_before_loading(source, tmp_path, monkeypatch, no_weights_loaded):
    locked = (tmp_path / "locked").resolve()
    locked.mkdir()
    access = os.access
    monkeypatch.setattr(os, "access", lambda path, mode, **kw: Path(path) != locked and access(path, mode, **kw))
    result = invoke("convert", source, "-o", locked / "new" / "out")
    assert result.exit_code == 1
    assert "you do not have permission to write there" in result.output and str(locked) in result.output


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root writes into read-only folders")
def test_read_only_folder_as_output_location_is_refused(source, tmp_path, no_weights_loaded):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        result = invoke("convert", source, "-o", locked / "out")
    finally:
        locked.chmod(0o755)
    assert result.exit_code == 1
    assert "cannot write output folder" in result.output
    assert list(locked.iterdir()) == []


def test_write_error_during_save_names_the_folder_and_the_reason(source, tmp_path, monkeypatch):
    save_fails_with(monkeypatch, PermissionError(errno.EACCES, "Permission denied", "model.safetensors"))
    result = invoke("convert", source, "-o", tmp_path / "out")
    assert result.exit_code == 1
    assert f"could not write output folder '{tmp_path / 'out'}': Permission denied (model.safetensors)" in (
        result.output
    )
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "error",
    [
        SafetensorError(
            'Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "No space left on device" })'
        ),
        OSError(errno.ENOSPC, "No space left on device", "model.safetensors"),
    ],
    ids=["safetensors", "oserror"],
)
def test_full_disk_during_save_keeps_the_existing_output(error, source, tmp_path, monkeypatch):
    out = tmp_path / "out"
    assert invoke("convert", source, "-o", out).exit_code == 0
    before = files(out)
    save_fails_with(monkeypatch, error)
    result = invoke("convert", source, "-o", out, "--force")
    assert result.exit_code == 1
    assert "the disk is full" in result.output and f"the existing '{out}' is unchanged" in result.output
    assert files(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_failed_move_into_place_puts_the_existing_output_back(source, tmp_path, monkeypatch):
    out = tmp_path / "out"
    assert invoke("convert", source, "-o", out).exit_code == 0
    before = files(out)
    replace = os.replace

    def busy_for_the_new_folder(src, dst):
        if "linearize-tmp" in str(src):
            raise OSError(errno.EBUSY, "Device or resource busy", str(dst))
        replace(src, dst)

    monkeypatch.setattr(os, "replace", busy_for_the_new_folder)
    result = invoke("convert", source, "-o", out, "--force")
    assert result.exit_code == 1
    assert f"could not write output folder '{out}': Device or resource busy" in result.output
    assert files(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_output_under_a_file_is_refused(source, tmp_path, no_weights_loaded):
    (tmp_path / "notes.txt").write_text("mine")
    result = invoke("convert", source, "-o", tmp_path / "notes.txt" / "out")
    assert result.exit_code == 1
    assert f"'{tmp_path / 'notes.txt'}' is a file, not a folder" in result.output
    result = invoke("convert", source, "-o", tmp_path / "notes.txt", "--force")
    assert result.exit_code == 1
    assert "is a file, not a folder" in result.output
    assert (tmp_path / "notes.txt").read_text() == "mine"


def test_an_output_named_by_a_link_is_written_where_the_link_points(source, tmp_path):
    """An output named by a link (to a folder on a bigger disk, say): a link to a folder not made yet failed with
    'Not a directory' once the conversion was done, and --force replaced the link with a new folder beside it, on
    the link's disk, and left the linked folder as it was."""
    disk, models = tmp_path / "big-disk", tmp_path / "models"
    disk.mkdir()
    models.mkdir()
    (models / "out").symlink_to(disk / "out")
    assert invoke("convert", source, "-o", models / "out", "--method", "swa").exit_code == 0
    assert (models / "out").is_symlink() and (disk / "out" / "config.json").is_file()
    assert invoke("convert", source, "-o", models / "out", "--method", "liger", "--force").exit_code == 0
    assert (models / "out").is_symlink()
    assert json.loads((disk / "out" / "config.json").read_text())["linearize"]["method"] == "liger"
    assert [p.name for p in models.iterdir()] == ["out"] and [p.name for p in disk.iterdir()] == ["out"]


def test_ctrl_c_during_save_keeps_the_existing_output(source, tmp_path, monkeypatch):
    out = tmp_path / "out"
    assert invoke("convert", source, "-o", out).exit_code == 0
    before = files(out)
    save_fails_with(monkeypatch, KeyboardInterrupt())
    result = invoke("convert", source, "-o", out, "--force")
    assert result.exit_code == 130
    assert files(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_output_folder_mode_follows_the_umask(umask, source, tmp_path):
    previous = os.umask(umask)
    try:
        assert invoke("convert", source, "-o", tmp_path / "out").exit_code == 0
    finally:
        os.umask(previous)
    assert stat.S_IMODE((tmp_path / "out").stat().st_mode) == 0o777 & ~umask
    modes = {path.name: stat.S_IMODE(path.stat().st_mode) for path in (tmp_path / "out").iterdir()}
    assert modes["model.safetensors"] == 0o666 & ~umask and set(modes.values()) == {0o666 & ~umask}, modes


# Runs `linearize` with the model's save patched to hang once its files are written: the test kills it there.
_HANG_IN_SAVE = """
import sys, time
from pathlib import Path
from linearize.cli import app
from linearize.models import LinearizeForCausalLM

save = LinearizeForCausalLM.save_pretrained

def save_then_hang(self, folder, **kwargs):
    save(self, folder, **kwargs)
    (Path(folder) / "saved").touch()
    time.sleep(600)

LinearizeForCausalLM.save_pretrained = save_then_hang
app(sys.argv[1:], prog_name="linearize")
"""


def wait_for_file(pattern: str, folder: Path, process: subprocess.Popen, timeout: float = 300) -> Path:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = next(folder.glob(pattern), None)
        if found is not None:
            return found
        if process.poll() is not None:
            pytest.fail(f"convert exited ({process.returncode}) before saving: {process.stderr.read()}")
        time.sleep(0.1)
    pytest.fail(f"no {pattern} in {folder} after {timeout} s")


def finished_pid() -> int:
    """The id of a process that has exited (and been reaped)."""
    process = subprocess.Popen([sys.executable, "-c", ""])
    process.wait()
    return process.pid


def test_convert_killed_while_saving_loses_nothing_and_the_next_run_cleans_up(source, tmp_path):
    out = tmp_path / "out"
    assert invoke("convert", source, "-o", out).exit_code == 0
    before = files(out)
    command = [sys.executable, "-c", _HANG_IN_SAVE, "convert", str(source), "-o", str(out), "--force"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        staging = wait_for_file(".out.linearize-tmp-*/saved", tmp_path, process).parent
    finally:
        process.kill()
        process.wait()
    assert staging.is_dir()
    assert files(out) == before
    assert AutoModelForCausalLM.from_pretrained(out).config.model_type == "linearize"

    result = invoke("convert", source, "-o", tmp_path / "second")
    assert result.exit_code == 0, result.output
    assert not staging.exists()
    assert f"Removed '{staging}'" in result.output and f"process {process.pid} is gone" in result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "second"]


def test_convert_terminated_while_saving_cleans_up_as_on_ctrl_c(source, tmp_path):
    """SIGTERM is how `timeout`, CI cancels, `docker stop` and schedulers stop a run: it must not leave a staging
    folder (the size of the model) behind as SIGKILL has to."""
    out = tmp_path / "out"
    command = [sys.executable, "-c", _HANG_IN_SAVE, "convert", str(source), "-o", str(out)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        wait_for_file(".out.linearize-tmp-*/saved", tmp_path, process)
        process.terminate()
        _, stderr = process.communicate(timeout=60)
    finally:
        process.kill()
        process.wait()
    assert process.returncode == 143, stderr
    assert "Traceback" not in stderr and "terminated (SIGTERM): interrupted; no output folder was written" in stderr
    assert list(tmp_path.iterdir()) == []


def test_output_retired_by_a_killed_run_is_put_back_and_live_runs_are_left_alone(source, tmp_path):
    out = tmp_path / "out"
    assert invoke("convert", source, "-o", out).exit_code == 0
    before = files(out)
    retired = tmp_path / f".out.linearize-old-{finished_pid()}-0123abcd"
    out.rename(retired)
    running = tmp_path / f".other.linearize-tmp-{os.getppid()}-0123abcd"
    running.mkdir()
    result = invoke("convert", source, "-o", tmp_path / "second")
    assert result.exit_code == 0, result.output
    assert f"Restored '{out}'" in result.output
    assert files(out) == before and not retired.exists()
    assert running.is_dir()


def test_output_set_aside_by_a_killed_run_replaces_what_that_run_wrote(source, tmp_path):
    """`replaced_when_done` (the demo) keeps the old output aside for minutes: a run killed meanwhile leaves an
    incomplete output beside it, and the next run puts the old one back over it."""
    out = tmp_path / "out"
    assert invoke("convert", source, "-o", out).exit_code == 0
    before = files(out)
    out.rename(tmp_path / f".out.linearize-kept-{finished_pid()}-0123abcd")
    (out / "liger-run").mkdir(parents=True)  # the killed run's incomplete output
    result = invoke("convert", source, "-o", tmp_path / "second")
    assert result.exit_code == 0, result.output
    assert f"Restored '{out}'" in result.output and files(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "second"]


def test_the_folders_of_another_users_run_are_left_alone(tmp_path, monkeypatch):
    """A process that may not be signalled (another user's, in a shared folder) is alive as far as we know: its
    staging folder is the output it is writing, and its retired or set-aside folder its only copy."""
    for kind in ("tmp", "old", "kept"):
        (tmp_path / f".out-{kind}.linearize-{kind}-{finished_pid()}-0123abcd").mkdir()
    before = sorted(tmp_path.iterdir())

    def not_permitted(pid, signal):
        raise PermissionError(errno.EPERM, "Operation not permitted")

    monkeypatch.setattr(linearize.outputs.os, "kill", not_permitted)
    linearize.outputs.remove_leftovers(tmp_path)
    assert sorted(tmp_path.iterdir()) == before


@pytest.mark.parametrize("kind", ["kept", "old", "tmp"])
def test_a_leftover_named_for_the_folder_itself_or_its_parent_touches_nothing(kind, tmp_path):
    """A leftover names the output it belongs to after its first dot: `.NAME.linearize-kept-...`. One whose NAME is
    "." or ".." (from an archive or a copied folder; no output has that name) named the folder itself or its parent,
    and putting the 'kept' one back deleted that whole folder, the user's files beside the output with it."""
    folder = tmp_path / "parent" / "outputs"
    folder.mkdir(parents=True)
    (tmp_path / "parent" / "notes.txt").write_text("kept")
    (folder / "model").mkdir()
    leftovers = [folder / f"{dots}.linearize-{kind}-{finished_pid()}-0123abcd" for dots in ("..", "...")]
    for leftover in leftovers:
        leftover.mkdir()
    linearize.outputs.remove_leftovers(folder)
    assert (tmp_path / "parent" / "notes.txt").read_text() == "kept" and (folder / "model").is_dir()
    assert all(leftover.is_dir() for leftover in leftovers)


def test_a_folder_deleted_as_a_whole_is_never_left_half_deleted(tmp_path, monkeypatch):
    """Checkpoint pruning: a delete cut short leaves a staging leftover (removed by the next run writing there) and
    never a checkpoint without its state file under its own name, which no listing would find again."""
    doomed = tmp_path / "step-000003"
    (doomed / "inside").mkdir(parents=True)
    (doomed / "trainer_state.json").write_text("{}")

    def cut_short(path):
        (path / "trainer_state.json").unlink()
        raise KeyboardInterrupt

    monkeypatch.setattr(linearize.outputs, "_remove", cut_short)
    with pytest.raises(KeyboardInterrupt):
        linearize.outputs.delete_folder(doomed)
    monkeypatch.undo()
    [leftover] = tmp_path.glob("*.linearize-tmp-*")
    assert not doomed.exists() and ".step-000003.linearize-tmp-" in leftover.name
    linearize.outputs.remove_leftovers(tmp_path)  # the delete cut short has let go of its lock, as a killed one
    assert list(tmp_path.iterdir()) == []
    linearize.outputs.delete_folder(doomed)  # nothing there: nothing to do


def test_a_file_written_whole_by_two_threads_at_once_is_one_of_theirs(tmp_path):
    """Each writer stages its own sibling: threads of one process writing one file at once (a library caller's
    records) must not share one, or the first to finish removes what the other then renames."""
    import threading

    from linearize.outputs import file_written_whole, write_file

    path = tmp_path / "results.json"
    with file_written_whole(path) as partial:
        partial.write_text("first")
        other = threading.Thread(target=write_file, args=(path, "second"))
        other.start()
        other.join()
        assert path.read_text() == "second"
    assert path.read_text() == "first" and [p.name for p in tmp_path.iterdir()] == [path.name]


@pytest.mark.parametrize("failure", [OSError(errno.ENOSPC, "No space left on device"), KeyboardInterrupt()])
def test_a_file_whose_writing_fails_keeps_the_earlier_one_and_leaves_no_partial_one(failure, tmp_path):
    """A full disk or Ctrl-C while a record is written: the earlier record stays as it was, and the hidden sibling
    that held the partial one is removed (nothing else would ever remove it)."""
    from linearize.outputs import file_written_whole

    path = tmp_path / "results.json"
    path.write_text("earlier")
    with pytest.raises(type(failure)), file_written_whole(path) as partial:
        partial.write_text("part")
        raise failure
    assert path.read_text() == "earlier" and [p.name for p in tmp_path.iterdir()] == [path.name]


@pytest.fixture
def home_and_work(tmp_path, monkeypatch):
    """A home folder and, apart from it, the current folder."""
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    (tmp_path / "home").mkdir()
    (tmp_path / "work").mkdir()
    monkeypatch.chdir(tmp_path / "work")
    return tmp_path / "home", tmp_path / "work"


def test_a_file_written_under_a_tilde_goes_to_the_home_folder(home_and_work):
    """The shell leaves '~' as it is in `--json=~/r.json` (or quoted): `check_writable` looked at the home folder
    while the record, --json or --plot file went into a new folder named '~' in the current one (which
    `rm -rf ~` would then clear up)."""
    home, work = home_and_work
    linearize.outputs.write_file(Path("~/results.json"), "{}")
    assert (home / "results.json").read_text() == "{}" and list(work.iterdir()) == []


def test_recipe_init_under_a_tilde_writes_into_the_home_folder(home_and_work):
    home, work = home_and_work
    assert invoke("recipe", "init", "-o", "~/my.yaml").exit_code == 0
    assert (home / "my.yaml").is_file() and list(work.iterdir()) == []
    result = invoke("recipe", "init", "-o", "~/my.yaml")  # an edited recipe there is kept
    assert result.exit_code == 1 and "already exists" in result.output


def test_a_file_named_by_a_link_is_written_where_the_link_points(tmp_path):
    """A record or recipe named by a link (into a shared folder, say) was replaced by a file of its own, leaving the
    linked file as it was."""
    from linearize.outputs import write_file

    (tmp_path / "shared").mkdir()
    (tmp_path / "shared" / "recipe.yaml").write_text("old")
    (tmp_path / "recipe.yaml").symlink_to(Path("shared") / "recipe.yaml")
    write_file(tmp_path / "recipe.yaml", "new")
    assert (tmp_path / "recipe.yaml").is_symlink() and (tmp_path / "shared" / "recipe.yaml").read_text() == "new"
    assert [p.name for p in (tmp_path / "shared").iterdir()] == ["recipe.yaml"]


def test_an_output_another_run_saved_meanwhile_is_kept_without_force(source, tmp_path, monkeypatch):
    """Two `convert -o SAME` at once: the later to finish must not replace what the earlier saved (only --force
    replaces an output), and says so."""
    out = tmp_path / "out"

    def another_run_saves_first(self, folder, **kwargs):
        (folder / "model.safetensors").write_bytes(b"ours")
        out.mkdir()
        (out / "model.safetensors").write_bytes(b"theirs")

    monkeypatch.setattr(linearize.convert.LinearizeForCausalLM, "save_pretrained", another_run_saves_first)
    result = invoke("convert", source, "--window", 8, "-o", out)
    assert result.exit_code == 1, result.output
    assert "already exists" in " ".join(result.output.split())
    assert "pass --force (force=True) to replace it" in " ".join(result.output.split())
    assert files(out) == {"model.safetensors": b"theirs"} and list(tmp_path.iterdir()) == [out]


@pytest.mark.parametrize("force", [False, True])
def test_an_output_another_run_moves_into_place_at_the_same_moment(force, tmp_path, monkeypatch):
    """The other run's rename comes between this one's look and its own rename: without force this one is refused
    as above; with force it replaces the other's output as it would have a moment later, rather than failing on
    'Directory not empty'."""
    out, replace, moved = tmp_path / "out", os.replace, []

    def the_other_run_first(source, target):
        if Path(target) == out and not moved:
            moved.append(out)
            out.mkdir()
            (out / "theirs").write_text("")
        replace(source, target)

    monkeypatch.setattr(linearize.outputs.os, "replace", the_other_run_first)
    refused = pytest.raises(LinearizeError, match="already exists") if not force else contextlib.nullcontext()
    with refused, linearize.outputs.atomic_folder(out, force=force) as staging:
        (staging / "ours").write_text("")
    kept = "ours" if force else "theirs"
    assert [p.name for p in tmp_path.iterdir()] == ["out"] and [p.name for p in out.iterdir()] == [kept]


def test_an_output_name_too_long_for_its_hidden_sibling_is_refused_before_loading(source, tmp_path, no_weights_loaded):
    """A name near the file system's limit (255 bytes) is valid, but the hidden folder it is written through adds
    up to 33 bytes: refused at once, saying how long it may be, not with 'File name too long' after the conversion."""
    out = tmp_path / ("m" * 230)
    result = invoke("convert", source, "-o", out)
    shown = " ".join(result.output.split())
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert "has a name too long (230 bytes)" in shown and "at most 222 bytes" in shown
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(LinearizeError, match="at most 222 bytes"):  # one byte more: a 7-digit process id overflows
        linearize.outputs.check_name_length(tmp_path / ("m" * 223))
    longest = tmp_path / ("m" * 222)
    with linearize.outputs.atomic_folder(longest) as staging:
        (staging / "ours").write_text("")
    assert [p.name for p in longest.iterdir()] == ["ours"]


def test_a_second_in_place_writer_is_refused_and_the_first_keeps_its_folder(tmp_path, monkeypatch):
    # two `linearize demo -o SAME`: the second, with --force, would set aside the folder the first trains into
    monkeypatch.setenv("LINEARIZE_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "demo"
    with linearize.outputs.replaced_when_done(out):
        out.mkdir()
        (out / "checkpoint.txt").write_text("first")
        refused = pytest.raises(LinearizeError, match="being written by another linearize run .*process")
        with refused, linearize.outputs.replaced_when_done(out, force=True):
            pytest.fail("the second writer ran")
        assert (out / "checkpoint.txt").read_text() == "first"
    assert (out / "checkpoint.txt").read_text() == "first"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache", "demo"]  # the lock is not left beside it
    with linearize.outputs.replaced_when_done(out, force=True):  # released: the next run replaces it
        out.mkdir()
    assert list(out.iterdir()) == []


def test_an_in_place_writer_replaces_an_existing_folder_only_with_force(tmp_path, monkeypatch):
    monkeypatch.setenv("LINEARIZE_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "demo"
    (out / "liger-run").mkdir(parents=True)
    with pytest.raises(LinearizeError, match="already exists; pass --force"), linearize.outputs.replaced_when_done(out):
        pytest.fail("the writer ran")
    assert [p.name for p in out.iterdir()] == ["liger-run"]


def test_an_in_place_writer_cut_short_deleting_the_old_folder_keeps_the_new_one(tmp_path, monkeypatch):
    """Once the work is done, the old folder is deleted: a delete cut short (Ctrl-C, a kill) left it under its
    set-aside name, which the next run took for a killed run's and put back over the completed output."""
    monkeypatch.setenv("LINEARIZE_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "outputs" / "demo"
    (out / "old-run").mkdir(parents=True)

    def cut_short(path):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt), linearize.outputs.replaced_when_done(out, force=True):
        (out / "new-run").mkdir(parents=True)
        monkeypatch.setattr(linearize.outputs, "_remove", cut_short)
    monkeypatch.undo()
    monkeypatch.setenv("LINEARIZE_CACHE", str(tmp_path / "cache"))
    linearize.outputs.remove_leftovers(out.parent)  # the next run writing beside it
    assert [p.name for p in out.iterdir()] == ["new-run"]
    assert [p.name for p in out.parent.iterdir()] == ["demo"]


def test_an_in_place_writer_runs_unlocked_where_the_cache_cannot_be_written(tmp_path, monkeypatch):
    (tmp_path / "file").write_text("")
    monkeypatch.setenv("LINEARIZE_CACHE", str(tmp_path / "file" / "cache"))
    with linearize.outputs.replaced_when_done(tmp_path / "demo"):
        (tmp_path / "demo").mkdir()
    assert (tmp_path / "demo").is_dir()


# Writes through `atomic_folder` or `replaced_when_done` under a process id that means nothing on this machine, as a
# run on another host sharing the folder (NFS, a volume shared by containers, a SLURM array job) does, until killed.
_WRITE_FROM_ANOTHER_HOST = """
import os, sys, time
from pathlib import Path
import linearize.outputs as outputs

os.getpid = lambda: int(sys.argv[1])
out, in_place = Path(sys.argv[2]), sys.argv[3] == "True"
with outputs.replaced_when_done(out, force=True) if in_place else outputs.atomic_folder(out) as staging:
    written = out if in_place else staging
    written.mkdir(exist_ok=True)
    (written / "theirs").write_text("")
    print("writing", flush=True)
    time.sleep(120)
"""


@pytest.mark.parametrize("in_place", [False, True], ids=["staging", "set-aside"])
def test_a_run_writing_from_another_host_is_left_alone_until_it_is_killed(in_place, tmp_path, monkeypatch):
    """A writer's process id says nothing on another machine: a run here took the staging folder of a live run on
    another host for a killed run's and deleted it (and put back the output one writing in place had set aside,
    over its work). A leftover is a killed run's only when the lock its writer holds is free."""
    monkeypatch.setenv("LINEARIZE_CACHE", str(tmp_path / "cache"))
    models = tmp_path / "models"
    (models / "out").mkdir(parents=True)
    (models / "out" / "old").write_text("")
    name, kind = ("out", "kept") if in_place else ("new", "tmp")
    command = [sys.executable, "-c", _WRITE_FROM_ANOTHER_HOST, str(finished_pid()), str(models / name), str(in_place)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "LINEARIZE_CACHE": str(tmp_path / "cache")}
    writer = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, text=True)
    try:
        assert writer.stdout.readline() == "writing\n"
        [leftover] = models.glob(f".{name}.linearize-{kind}-*")
        during = sorted(p.name for p in models.iterdir())
        linearize.outputs.remove_leftovers(models)
        assert sorted(p.name for p in models.iterdir()) == during
        assert files(leftover) == ({"old": b""} if in_place else {"theirs": b""})
        assert files(models / "out") == ({"theirs": b""} if in_place else {"old": b""})
    finally:
        writer.kill()
        writer.wait()
    linearize.outputs.remove_leftovers(models)  # killed: its lock is free
    assert sorted(p.name for p in models.iterdir()) == ["out"] and files(models / "out") == {"old": b""}


def test_a_lock_file_left_without_its_folder_is_removed_once_free(tmp_path):
    """A run killed just before making its staging folder, or just after moving it into place, leaves its lock file
    alone: the next run removes it. One still empty may be one whose writer has yet to lock it, and one held is a
    live writer's: both stay."""
    left, empty, held = (tmp_path / f".out.linearize-lock-{finished_pid()}-{n}0123abc" for n in range(3))
    left.write_text("process 1 on host-b\n")
    empty.touch()
    with locked(held):
        linearize.outputs.remove_leftovers(tmp_path)
    assert sorted(tmp_path.iterdir()) == [empty, held]


def test_where_nothing_can_be_locked_a_leftover_is_a_killed_runs_when_its_process_is_gone(tmp_path, monkeypatch):
    """Without fcntl (Windows) or on a file system that cannot lock, a lock file tells nothing: the process id
    decides, as for a leftover from before there were lock files."""
    monkeypatch.setattr(linearize.locks, "fcntl", None)
    dead, alive = finished_pid(), os.getppid()
    for pid in (dead, alive):
        (tmp_path / f".out.linearize-tmp-{pid}-0123abcd").mkdir()
        (tmp_path / f".out.linearize-lock-{pid}-0123abcd").write_text(f"process {pid} on here\n")
    linearize.outputs.remove_leftovers(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        f".out.linearize-{kind}-{alive}-0123abcd" for kind in ("lock", "tmp")
    ]
