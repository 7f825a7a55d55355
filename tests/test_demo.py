"""`linearize demo` end to end on a tiny model: every conversion measured, the fine-tune saved and reloaded."""

import math
from pathlib import Path

import pytest
from typer.testing import CliRunner

from linearize.cli import app
from linearize.demo import ANSWERING, quick_recipe, run_demo
from linearize.training.checks import warmup_note
from tests.tiny import source_folder


@pytest.fixture(autouse=True)
def linearize_cache(tmp_path_factory, monkeypatch):
    """linearize's cache, apart from the demo's folders: a demo locks its output folder with a file in the cache, and
    these tests left one in the user's ~/.cache/linearize/locks at every run."""
    cache = tmp_path_factory.mktemp("linearize-cache")
    monkeypatch.setenv("LINEARIZE_CACHE", str(cache))
    return cache


def test_demo_measures_every_conversion_and_reloads_the_fine_tuned_model(tmp_path, capsys, linearize_cache):
    source = source_folder(tmp_path / "src")
    result = run_demo(tmp_path / "demo", steps=1, model=str(source), quiet=True)
    assert capsys.readouterr().out == ""  # called from a script: quiet says nothing, and progress is no output
    rows = {row.label: row for row in result.rows}
    assert list(rows) == ["original", "swa", "parallax", "liger at conversion", "liger fine-tuned"]
    assert all(math.isfinite(row.perplexity) for row in rows.values())
    # Parallax is exact at conversion: the original's perplexity on the same windows
    assert math.isclose(rows["parallax"].perplexity, rows["original"].perplexity, rel_tol=1e-4)
    assert rows["swa"].cache_bytes < rows["original"].cache_bytes and not rows["swa"].cache_grows
    assert rows["original"].cache_grows and not rows["liger fine-tuned"].cache_grows
    assert rows["liger at conversion"].decode_ms is None and rows["liger fine-tuned"].decode_ms > 0
    assert set(result.answers) == set(ANSWERING)
    assert (result.model_folder / "config.json").exists() and result.model_folder.parent.parent == tmp_path / "demo"
    assert len(list((linearize_cache / "locks").iterdir())) == 1  # the output folder's lock, in this test's cache


def test_demo_refuses_an_existing_folder_without_force(tmp_path):
    (tmp_path / "demo").mkdir()
    (tmp_path / "demo" / "keep.txt").write_text("mine")
    result = CliRunner().invoke(app, ["demo", "-o", str(tmp_path / "demo"), "--steps", "1"])
    assert result.exit_code == 1 and "--force" in result.output
    assert (tmp_path / "demo" / "keep.txt").read_text() == "mine"


def test_a_demo_that_fails_with_force_keeps_the_earlier_folder(tmp_path, monkeypatch):
    from linearize.training import trainer

    source = source_folder(tmp_path / "src")
    (tmp_path / "demo").mkdir()
    (tmp_path / "demo" / "keep.txt").write_text("mine")

    def interrupted(recipe, **kwargs):
        assert not (tmp_path / "demo" / "keep.txt").exists()  # set aside while the new demo runs
        (Path(recipe.output.dir) / "partial").mkdir(parents=True)
        raise KeyboardInterrupt

    monkeypatch.setattr(trainer, "finetune", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run_demo(tmp_path / "demo", steps=1, force=True, model=str(source), say=lambda _: None, quiet=True)
    assert [p.name for p in (tmp_path / "demo").iterdir()] == ["keep.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["demo", "src"]  # nothing left beside it


@pytest.mark.parametrize("steps", [1, 2, 3, 40])
def test_the_demo_recipe_warms_up_within_its_steps(steps, tmp_path):
    stage = quick_recipe(tmp_path / "demo", steps).stages[0]
    assert warmup_note(0, stage, steps) is None and stage.schedule.warmup_steps == min(2, steps - 1)


@pytest.mark.parametrize("name", ["demo #1", "a: b", "[v2]", "*x", "%x", 'say "hi"', "back\\slash", "café"])
def test_the_demo_recipe_takes_any_folder_name(name):
    """The run folder and the model were written into the recipe's YAML unquoted: `-o "demo #1"` trained into
    "demo" beside it (the rest read as a comment), and `a: b`, `[v2]` or `%x` failed as malformed YAML."""
    for folder in (Path(name), Path("/data") / name):
        run, model = folder / "liger-run", str(folder / "source")
        recipe = quick_recipe(run, 3, model)
        assert Path(recipe.output.dir) == run and recipe.model.name == model
