"""`linearize bench`: measurements on tiny models, the table, the JSON record and the plot (no timing asserted)."""

import importlib.util
import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from linearize.benchmark import bench_rows, cache_bytes, measure, peak_memory, run_bench
from linearize.cli import app
from linearize.comparison import counted
from linearize.compat import CACHE_ARG
from linearize.errors import LinearizeError
from tests.tiny import cache_of, converted_model, source_folder, source_model

runner = CliRunner()
CONTEXTS = [16, 48]


@pytest.fixture(scope="module")
def result():
    models = {"liger": converted_model("llama", "liger"), "original": source_model("llama")}
    return run_bench(models, CONTEXTS, decode_tokens=2, repeats=1)


def test_every_measurement_is_positive(result):
    assert [row["context"] for row in result["rows"]] == CONTEXTS
    for row in result["rows"]:
        for label in ("liger", "original"):
            numbers = row[label]
            assert numbers["prefill_tok_s"] > 0 and numbers["decode_ms"] > 0 and numbers["cache_bytes"] > 0
            assert numbers["decode_fastest_ms"] <= numbers["decode_ms"]
            assert numbers["prefill_fastest_tok_s"] >= numbers["prefill_tok_s"]
            assert numbers["prefill_runs_tok_s"] == [numbers["prefill_tok_s"]]  # one run (repeats=1)
            assert numbers["decode_runs_ms"] == [numbers["decode_ms"]]


def test_the_result_names_the_hardware_and_dtype(result):
    assert result["device"] == "cpu" and result["dtype"] == "float32" and result["hardware"]


def test_models_alternate_in_prefill_runs_and_in_uninterrupted_decode_runs():
    models = {"liger": converted_model("llama", "liger"), "original": source_model("llama")}
    calls = []  # (model, tokens in the call), in call order
    for label, model in models.items():
        model.register_forward_pre_hook(
            lambda _, args, kwargs, label=label: calls.append((label, kwargs["input_ids"].shape[1])), with_kwargs=True
        )
    result = measure(models, context=12, decode_tokens=3, repeats=3)
    prefills = [call for call in calls if call[1] == 12]
    steps = [label for label, tokens in calls if tokens == 1]
    # one untimed prefill each for the peak, then the timed ones in turn
    assert prefills == [("liger", 12), ("original", 12)] * 4
    assert steps == (["liger"] * 3 + ["original"] * 3) * 3
    for numbers in result.values():
        runs = numbers["decode_runs_ms"]
        assert len(runs) == 3 and len(numbers["prefill_runs_tok_s"]) == 3
        assert numbers["decode_ms"] == sorted(runs)[1]  # the median run
        assert numbers["prefill_tok_s"] == sorted(numbers["prefill_runs_tok_s"])[1]


def test_every_decode_run_steps_from_the_prefill_of_the_context():
    models = {"liger": converted_model("llama", "liger"), "original": source_model("llama")}
    starts = {label: [] for label in models}  # tokens cached before each decode step, per model

    def record(label, kwargs):
        if kwargs["input_ids"].shape[1] == 1:
            starts[label].append(kwargs[CACHE_ARG].get_seq_length())

    for label, model in models.items():
        model.register_forward_pre_hook(lambda _, args, kwargs, label=label: record(label, kwargs), with_kwargs=True)
    measure(models, context=12, decode_tokens=3, repeats=3)
    for label in models:  # each run times the same steps after a prefill of 12 tokens, not after the previous runs
        assert starts[label] == [12, 13, 14] * 3, label


def test_measure_takes_a_small_vocabulary_and_refuses_empty_runs():
    config = source_model("llama").config
    config.vocab_size = 64  # the random prompts drew from ids 100 and up
    model = type(source_model("llama"))(config)
    assert measure({"tiny": model}, context=8, decode_tokens=1, repeats=1)["tiny"]["decode_ms"] > 0
    # a LinearizeError (the CLI prints its message), and still a ValueError for callers that caught that
    with pytest.raises(LinearizeError, match="must be >= 1, got 8, 0, 1") as error:
        measure({"tiny": model}, context=8, decode_tokens=0, repeats=1)
    assert isinstance(error.value, ValueError)
    for models, contexts in (({"tiny": model}, []), ({}, [8])):
        with pytest.raises(LinearizeError, match="at least one model and one context") as error:
            run_bench(models, contexts, decode_tokens=1, repeats=1)
        assert isinstance(error.value, ValueError)


def test_converted_cache_is_constant_and_the_original_grows(result):
    liger = [row["liger"]["cache_bytes"] for row in result["rows"]]
    original = [row["original"]["cache_bytes"] for row in result["rows"]]
    assert liger[0] == liger[1]
    # keys and values of 2 layers x 2 KV heads x 16 dims in fp32, per prefilled token
    assert original == [2 * 2 * 2 * 16 * 4 * c for c in CONTEXTS]


def test_cache_bytes_count_what_a_sliding_window_layer_still_holds_after_the_prefill():
    """transformers' sliding-window layer keeps the last window - 1 tokens of a prefill as a view of the whole
    prefill's keys and values: the storage of every prefilled token stays held until the next step."""
    ids = torch.randint(3, 128, (1, 48))
    every_token = 2 * 2 * 32 * 4 * 48  # keys and values of 2 KV heads x 32 dims in fp32, per prefilled token
    for model in (source_model("gemma2"), converted_model("gemma2", "liger")):  # layer 0 slides over 8 tokens
        with torch.inference_mode():
            cache = cache_of(model(input_ids=ids, use_cache=True))
        sliding, other = cache.layers
        assert sliding.keys.shape[-2] == 7 and sliding.keys.untyped_storage().nbytes() == every_token / 2
        other_bytes = every_token if hasattr(other, "keys") and other.keys is not None else other.nbytes()
        assert cache_bytes(cache) == every_token + other_bytes


def test_peak_memory_counts_tensors_alive_at_once():
    kept = torch.ones(1024)  # created before: not counted
    weight = torch.nn.Parameter(torch.ones(64, 64))  # nor its views (a weight that an op reshapes)
    with peak_memory(torch.device("cpu")) as peak:
        transposed = weight.t()
        for _ in range(3):
            scratch = torch.ones(2**20)  # 4 MiB, dropped at the next iteration's assignment
            view = scratch[:10]  # shares the storage: not counted again
            total = scratch.sum()
        del scratch, view
        both = (torch.zeros(2**18), torch.zeros(2**18))  # 1 MiB each, alive together
    # at the peak, the new 4 MiB buffer is created while the previous one and the previous 4-byte sum still live
    assert peak.bytes == 2 * 4 * 2**20 + 4
    assert kept.sum() == 1024 and total.item() == 2**20 and len(both) == 2 and transposed.shape == (64, 64)


def test_table_has_both_models_and_their_ratios(result):
    header, rows = bench_rows(result)
    assert header == ["context", "metric", "liger", "original", "ratio"]
    assert [r[:2] for r in rows[:4]] == [
        ["16", "prefill tokens/s"],
        ["16", "decode ms/token"],
        ["16", "cache MiB"],
        ["16", "prefill peak MiB"],
    ]
    assert len(rows) == 8 and all(len(r) == 5 for r in rows)
    first = result["rows"][0]
    assert rows[2][-1] == f"{first['liger']['cache_bytes'] / first['original']['cache_bytes']:.2f}x"


def test_ratio_shows_the_range_of_the_rounds_when_there_are_several_runs():
    def model(prefill_runs, decode_runs, cache_bytes):
        return {
            "prefill_tok_s": sorted(prefill_runs)[1],
            "prefill_runs_tok_s": prefill_runs,
            "decode_ms": sorted(decode_runs)[1],
            "decode_runs_ms": decode_runs,
            "cache_bytes": cache_bytes,
            "peak_bytes": 2**21,
        }

    new, old = model([90, 100, 80], [9, 10, 12], 2**19), model([100, 100, 100], [10, 10, 10], 2**20)
    result = {"models": ["new", "old"], "rows": [{"context": 64, "new": new, "old": old}]}
    _, rows = bench_rows(result)
    ratios = {metric: ratio for _, metric, _, _, ratio in rows}
    # each round's ratio pairs the runs of the same round: 0.90, 1.00, 0.80 and 0.90, 1.00, 1.20
    assert ratios == {
        "prefill tokens/s": "0.90x (0.80-1.00)",
        "decode ms/token": "1.00x (0.90-1.20)",
        "cache MiB": "0.50x",
        "prefill peak MiB": "1.00x",
    }


def test_plot_is_a_png(result, tmp_path):
    pytest.importorskip("matplotlib")
    from linearize.benchmark import plot_bench

    path = plot_bench(result, tmp_path / "plot.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 10_000


def test_a_plot_leaves_the_callers_matplotlib_as_it_was(result, tmp_path):
    """A notebook that plots with its own backend and figures keeps both after `plot_bench` (it switched every
    later figure of the process to Agg, which shows nothing)."""
    matplotlib = pytest.importorskip("matplotlib")
    import matplotlib.pyplot as plt

    from linearize.benchmark import plot_bench

    backend = matplotlib.get_backend()
    matplotlib.use("svg")  # stands for the caller's own (a notebook's inline backend)
    try:
        mine = plt.figure()
        plot_bench(result, tmp_path / "plot.png")
        assert matplotlib.get_backend() == "svg" and plt.get_fignums() == [mine.number]
        plt.close(mine)
    finally:
        matplotlib.use(backend)


def test_a_plot_that_fails_halfway_keeps_the_earlier_one(result, tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    from matplotlib.figure import Figure

    from linearize.benchmark import plot_bench

    path = plot_bench(result, tmp_path / "plot.png")
    earlier = path.read_bytes()

    def interrupted_halfway(self, fname, *args, **kwargs):
        Path(fname).write_bytes(earlier[:100])
        raise KeyboardInterrupt

    monkeypatch.setattr(Figure, "savefig", interrupted_halfway)
    with pytest.raises(KeyboardInterrupt):
        plot_bench(result, path)
    assert path.read_bytes() == earlier and [p.name for p in tmp_path.iterdir()] == [path.name]


def test_bench_cli_writes_table_json_record_and_plot(tmp_path, monkeypatch):
    src = source_folder(tmp_path / "src")
    assert runner.invoke(app, ["convert", str(src), "--window", "8", "-o", str(tmp_path / "liger")]).exit_code == 0
    options = ["--ctx", "16,32", "--decode-tokens", "2", "--repeats", "1", "--json", str(tmp_path / "b.json")]
    result = runner.invoke(app, ["bench", str(tmp_path / "liger"), "--against", str(src), *options])
    assert result.exit_code == 0, result.output
    assert "prefill tokens/s" in result.stdout and "ratio" in result.stdout and "liger" in result.stdout
    written = json.loads((tmp_path / "b.json").read_text())
    assert written == json.loads((tmp_path / "liger" / "linearize_bench.json").read_text())
    assert written["models"] == ["liger", "src"] and written["markdown"].startswith(
        "| context | metric | liger | src | ratio |"
    )
    if importlib.util.find_spec("matplotlib"):
        assert (tmp_path / "liger" / "linearize_bench.png").stat().st_size > 0

    elsewhere = tmp_path / "elsewhere"  # --no-record: no file anywhere, the plot included, unless one is named
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    before = sorted((tmp_path / "liger").iterdir())
    options = ["--ctx", "16", "--decode-tokens", "2", "--repeats", "1", "--no-record"]
    assert runner.invoke(app, ["bench", str(tmp_path / "liger"), "--against", str(src), *options]).exit_code == 0
    assert not any(elsewhere.iterdir()) and sorted((tmp_path / "liger").iterdir()) == before
    if importlib.util.find_spec("matplotlib"):
        result = runner.invoke(
            app, ["bench", str(tmp_path / "liger"), "--against", str(src), *options, "--plot", "named"]
        )
        assert result.exit_code == 0 and [p.name for p in elsewhere.iterdir()] == ["named.png"]


def test_bench_cli_errors(tmp_path):
    src = source_folder(tmp_path / "src")
    result = runner.invoke(app, ["bench", str(src), "--ctx", "512,big"])
    assert result.exit_code != 0 and "comma-separated" in result.output
    result = runner.invoke(app, ["bench", "./no/such/model"])
    assert result.exit_code != 0 and "does not exist" in result.output
    result = runner.invoke(app, ["bench", str(src), "--plot", str(tmp_path / "plot.txt")])
    assert result.exit_code != 0 and "give a path ending in .png" in result.output
    result = runner.invoke(app, ["bench", str(src), "--plot", str(tmp_path / "plot.png"), "--no-plot"])
    assert result.exit_code == 1 and "--no-plot for none; pass one of them" in " ".join(result.output.split())
    result = runner.invoke(app, ["bench", str(src), "--ctx", "16,32,16"])
    assert result.exit_code == 1 and "--ctx names 16 more than once" in result.output
    options = ["--ctx", "600", "--decode-tokens", "1", "--repeats", "1", "--no-plot", "--no-record"]
    result = runner.invoke(app, ["bench", str(src), *options])  # past the tiny model's 512 positions: measured
    shown = " ".join(result.output.split())
    assert (
        result.exit_code == 0
        and "Warning: --ctx 600 is beyond the 512 positions (max_position_embeddings) of src" in shown
    )


def test_bench_cli_json_dash_writes_the_results_to_stdout(tmp_path, monkeypatch):
    """`--json -` wrote a file named '-'; a script piping the results (`| jq`) gets them on stdout, the table on
    stderr, and the record as with any --json."""
    monkeypatch.chdir(tmp_path)  # where a file named "-" would land
    src = source_folder(tmp_path / "src")
    options = ["--ctx", "16", "--decode-tokens", "1", "--repeats", "1", "--no-plot", "--quiet"]
    result = runner.invoke(app, ["bench", str(src), *options, "--json", "-"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    written = json.loads(result.stdout)
    assert [row["context"] for row in written["rows"]] == [16] and "prefill tokens/s" in result.stderr
    assert written == json.loads((src / "linearize_bench.json").read_text())
    assert not (tmp_path / "-").exists()
    result = runner.invoke(app, ["bench", str(src), *options[:-2], "--plot", "-"])  # a PNG on stdout: refused
    assert result.exit_code == 1 and "--plot writes a file, not to stdout" in " ".join(result.output.split())
    assert not (tmp_path / "-").exists()


def test_bench_cli_interrupted_says_so_and_writes_nothing(tmp_path, monkeypatch):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr("linearize.benchmark.run_bench", interrupted)
    src = source_folder(tmp_path / "src")
    before = sorted(src.iterdir())
    result = runner.invoke(app, ["bench", str(src), "--ctx", "16", "--json", str(tmp_path / "b.json")])
    assert result.exit_code == 130 and "interrupted; the results are written" in result.output
    assert sorted(src.iterdir()) == before and not (tmp_path / "b.json").exists()


def test_bench_cli_out_of_memory_at_a_context_keeps_the_contexts_before_it(tmp_path, monkeypatch):
    """A long context that runs out of GPU memory (the original's KV cache, most often) was a traceback that took
    the contexts measured before it along: they are printed and written, and the run still fails, naming it."""
    import linearize.benchmark

    real_measure = linearize.benchmark.measure

    def out_of_memory_at_32(models, context, decode_tokens, *args, **kwargs):
        if context == 32 and decode_tokens == 1:  # not the warm-up's 2 steps
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real_measure(models, context, decode_tokens, *args, **kwargs)

    monkeypatch.setattr(linearize.benchmark, "measure", out_of_memory_at_32)
    src = source_folder(tmp_path / "src")
    options = ["--ctx", "16,32,64", "--decode-tokens", "1", "--repeats", "1", "--no-plot"]
    result = runner.invoke(app, ["bench", str(src), *options, "--json", str(tmp_path / "b.json")])
    shown = " ".join(result.output.split())
    assert result.exit_code == 1 and "Error: out of memory at context 32" in shown, result.output
    assert "16" in result.stdout and "prefill tokens/s" in result.stdout
    written = json.loads((tmp_path / "b.json").read_text())
    assert [row["context"] for row in written["rows"]] == [16]
    assert written == json.loads((src / "linearize_bench.json").read_text())
    result = runner.invoke(app, ["bench", str(src), "--ctx", "32", *options[2:], "--no-record"])
    shown = " ".join(result.output.split())
    assert result.exit_code == 1 and "Error: out of memory at context 32" in shown
    assert shown.endswith("measure shorter contexts, or in a smaller dtype (bfloat16)")  # float32 on a CPU
    result = runner.invoke(app, ["bench", str(src), "--ctx", "32", *options[2:], "--no-record", "--dtype", "bfloat16"])
    shown = " ".join(result.output.split())  # the advice was bfloat16, the dtype it ran out of memory in
    assert result.exit_code == 1 and shown.endswith("on cpu: measure shorter contexts"), shown


def test_report_counts_agree_with_their_nouns():
    assert (counted(1, "run"), counted(3, "run"), counted(0, "trial")) == ("1 run", "3 runs", "0 trials")
