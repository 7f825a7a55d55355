"""`linearize push`: the real huggingface_hub client against a Hub-compatible stub server on 127.0.0.1.

The stub implements what a push uses (repo creation, branch creation, YAML validation, preupload and commit),
accepts only the token "hf_good" and records every request, so the tests check what arrived and that failures
send nothing. huggingface_hub reads HF_HUB_DISABLE_XET and HF_HUB_OFFLINE into `constants` at import (conftest
imports it before this file), but looks them up there at call time: the fixtures patch `constants`.
"""

import base64
import json
import shutil
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from huggingface_hub import ModelCard, constants
from transformers import AutoModelForCausalLM
from typer.testing import CliRunner

import linearize.publish
from linearize import sources
from linearize.cli import app
from linearize.convert import convert_model, plan_conversion, save_model, source_hub_id, source_weights
from linearize.errors import LinearizeError
from linearize.publish import _http_error, plan_push, push, push_command
from linearize.training.recipe import Recipe, resolved_yaml
from tests.tiny import source_folder, source_model, tiny_tokenizer

GOOD_TOKEN = "hf_good"
REPO = "my-org/tiny-liger"
EVAL_TABLE = "| model | perplexity |\n|---|---|\n| tiny-liger | 123.4 |"
runner = CliRunner()


class StubHub(BaseHTTPRequestHandler):
    """The Hub endpoints a push calls. Files of a commit land in `root/ORG/NAME/REVISION/`."""

    root: Path
    requests: list[tuple[str, str]]
    created: list[dict]
    visibility: list[object]  # what each repo creation asked for: "public", "private", or None (the account's default)
    existing: dict[str, bool]  # repos on the Hub before the test, each with whether it is private

    def log_message(self, *args):
        pass

    def _reply(self, code: int, body: dict) -> None:
        data = json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _body(self) -> bytes:
        if self.headers.get("Transfer-Encoding") == "chunked":
            chunks = []
            while size := int(self.rfile.readline().strip(), 16):
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
            self.rfile.readline()
            return b"".join(chunks)
        return self.rfile.read(int(self.headers.get("Content-Length", 0)))

    def do_GET(self):
        path = self.path.split("?")[0]
        self.requests.append(("GET", path))
        repo = path.removeprefix("/api/models/")
        known = {**self.existing, **{entry["repo"]: entry["private"] for entry in self.created}}
        if path.startswith("/api/models/") and repo in known:
            return self._reply(200, {"id": repo, "private": known[repo]})
        self._reply(404, {"error": "not in the stub"})

    def do_POST(self):
        path, body, host = self.path.split("?")[0], self._body(), self.headers["Host"]
        self.requests.append(("POST", path))
        if self.headers.get("Authorization") != f"Bearer {GOOD_TOKEN}":
            return self._reply(401, {"error": "Invalid username or password."})
        if path == "/api/repos/create":
            request = json.loads(body)
            repo = f"{request['organization']}/{request['name']}"
            if repo in self.existing:  # as the Hub: unchanged
                return self._reply(
                    409, {"error": "You already created this model repo", "url": f"http://{host}/{repo}"}
                )
            # huggingface_hub 1.8 and later send "visibility"; 1.5 to 1.7 (transformers 5.17's floor) send "private"
            visibility = request.get("visibility", {True: "private", False: "public"}.get(request.get("private")))
            private = visibility == "private"
            self.visibility.append(visibility)
            self.created.append({"repo": f"{request['organization']}/{request['name']}", "private": private})
            return self._reply(200, {"url": f"http://{host}/{self.created[-1]['repo']}"})
        if path == "/api/validate-yaml" or "/branch/" in path:
            return self._reply(200, {})
        if "/preupload/" in path:
            files = json.loads(body)["files"]
            return self._reply(
                200, {"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False} for f in files]}
            )
        if "/commit/" in path:
            repo, revision = path.removeprefix("/api/models/").split("/commit/")
            for line in body.decode().splitlines():
                item = json.loads(line)
                if item["key"] == "file":
                    dest = self.root / repo / revision / item["value"]["path"]
                    dest.parent.mkdir(parents=True, exist_ok=True)
                    dest.write_bytes(base64.b64decode(item["value"]["content"]))
            return self._reply(
                200, {"commitUrl": f"http://{host}/{repo}/commit/1", "commitOid": "1" * 40, "pullRequestUrl": None}
            )
        self._reply(404, {"error": "not in the stub"})


@pytest.fixture(autouse=True)
def no_credentials(tmp_path, monkeypatch):
    """No token from the environment or a login on this machine; classic (non-Xet) uploads."""
    for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_OIDC_RESOURCE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no-token"))
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)


@pytest.fixture
def hub(tmp_path, monkeypatch):
    """The stub server, with the Hub switched back on for this test (conftest sets HF_HUB_OFFLINE=1)."""
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    handler = type(
        "Handler",
        (StubHub,),
        {"root": tmp_path / "hub", "requests": [], "created": [], "visibility": [], "existing": {}},
    )
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    handler.url = f"http://127.0.0.1:{server.server_port}"
    yield handler
    server.shutdown()
    server.server_close()


@pytest.fixture
def no_verify(monkeypatch):
    """Skip the subprocess load check (its own tests run it) and record which folders it was asked about."""
    checked = []
    monkeypatch.setattr(linearize.publish, "verify_folder", checked.append)
    return checked


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """A converted, fine-tuned-looking folder: a recorded Hub source, a recipe and an eval table, no bench."""
    source = source_model("llama")
    plan = plan_conversion(source.config, "my-org/tiny-llama", "liger", window=8)
    out = save_model(convert_model(source, plan.config), tiny_tokenizer(), tmp_path_factory.mktemp("m") / "model")
    (out / "linearize_recipe.yaml").write_text("conversion:\n  method: liger\n  window: 8\n")
    (out / "linearize_eval.json").write_text(json.dumps({"markdown": EVAL_TABLE, "rows": []}))
    return out


def arrived(hub, repo: str = REPO, revision: str = "main") -> dict[str, bytes]:
    base = hub.root / repo / revision
    return {p.relative_to(base).as_posix(): p.read_bytes() for p in base.rglob("*") if p.is_file()}


def test_push_uploads_the_folder_and_its_card(folder, hub):
    url = push(folder, REPO, private=True, token=GOOD_TOKEN, endpoint=hub.url)  # verifies in a fresh process
    assert url == f"{hub.url}/{REPO}"
    files = arrived(hub)
    local = {p.name for p in folder.iterdir()}
    assert set(files) == local | {"README.md"}
    assert {"model.safetensors", "config.json", "tokenizer.json", "modeling_linearize.py"} <= local
    assert files["model.safetensors"] == (folder / "model.safetensors").read_bytes()
    assert not (folder / "README.md").exists()  # the user's folder is left as it was
    assert hub.created == [{"repo": REPO, "private": True}]
    assert hub.requests[0] == ("POST", "/api/repos/create")
    assert hub.requests[-1] == ("POST", f"/api/models/{REPO}/commit/main")  # one commit, last


def test_model_card_front_matter_and_body(folder, tmp_path):
    card_text = plan_push(folder, REPO).card
    (tmp_path / "README.md").write_text(card_text)
    card = ModelCard.load(tmp_path / "README.md")
    assert card.data.base_model == "my-org/tiny-llama"
    assert card.data.tags == ["linearize", "linear-attention", "liger", "text-generation"]
    assert card.data.library_name == "transformers" and card.data.pipeline_tag == "text-generation"
    assert "| 0-1 | liger |" in card.text and "`window=8`" in card.text
    assert EVAL_TABLE in card.text  # the latest eval table, embedded as written
    assert "Not measured yet" in card.text  # no bench file
    assert "method: liger" in card.text  # the recipe
    assert f'from_pretrained("{REPO}", trust_remote_code=True)' in card.text and "import linearize" in card.text
    # without the flag, transformers asks on the terminal whether to run the code when it reads the config
    assert f'AutoTokenizer.from_pretrained("{REPO}", trust_remote_code=True)' in card.text
    assert "GGUF" not in card.text
    config = json.loads((folder / "config.json").read_text())
    embedded = tmp_path / "embedded"
    shutil.copytree(folder, embedded)
    (embedded / "config.json").write_text(json.dumps({**config, "source_weights": "embedded"}))
    assert "(the Q4_1 GGUF of it that linearize embeds for offline use, dequantised)" in plan_push(embedded, REPO).card


@pytest.mark.parametrize("window", [None, 8])
def test_the_card_of_an_untrained_conversion_says_what_to_expect_of_it(window, tmp_path):
    """Parallax without a window is the original model exactly at conversion: its card must not promise it lower
    quality; with a window (which cuts keys off), or with another method, fine-tuning is what recovers quality."""
    source = source_model("llama")
    options = {} if window is None else {"window": window}
    plan = plan_conversion(source.config, "my-org/tiny-llama", "parallax", **options)
    out = save_model(convert_model(source, plan.config), tiny_tokenizer(), tmp_path / "parallax")
    card = " ".join(plan_push(out, REPO).card.split())
    exact = "computes the base model's outputs exactly until it is trained"
    assert (exact in card) == (window is None)
    assert ("expect lower quality than the base model" in card) == (window is not None)


def test_the_card_says_where_the_speeds_were_measured(folder, tmp_path):
    measured = shutil.copytree(folder, tmp_path / "measured")
    table = "| context | metric | tiny-liger |\n|---|---|---|\n| 64 | decode ms/token | 1.1 |"
    conditions = {"device": "cuda:0", "hardware": "NVIDIA H100", "dtype": "bfloat16", "threads": 1}
    record = {"models": ["tiny-liger"], "decode_tokens": 32, "repeats": 3, **conditions, "rows": [], "markdown": table}
    (measured / "linearize_bench.json").write_text(json.dumps(record))
    card = plan_push(measured, REPO).card
    assert "on NVIDIA H100, cuda:0, bfloat16, 1 thread; prefill: the median of 3 runs" in card
    assert "decode: the median of 3 runs of 32 steps.\n\n" + table in card
    assert "Measured by" not in card.split("## Speed and memory")[0]  # not above the eval table


def test_a_file_linking_out_of_the_folder_is_refused_and_a_cache_snapshots_links_are_not(folder, tmp_path):
    secret = tmp_path / "token"
    secret.write_text("hf_secret")
    linked = shutil.copytree(folder, tmp_path / "linked")
    (linked / "notes.txt").symlink_to(secret)
    with pytest.raises(LinearizeError, match=r"notes\.txt' links to .*token', outside the folder: a push would send"):
        plan_push(linked, REPO)
    (linked / "notes.txt").unlink()
    (linked / "notes.txt").symlink_to(linked / "config.json")  # inside: sent as the file it names
    assert "notes.txt" in dict(plan_push(linked, REPO).files)
    snapshot = tmp_path / "models--org--m" / "snapshots" / "abc123"  # as huggingface_hub lays out its cache
    blobs = tmp_path / "models--org--m" / "blobs"
    blobs.mkdir(parents=True)
    snapshot.mkdir(parents=True)
    for path in folder.iterdir():
        if path.is_file():
            shutil.copy(path, blobs / path.name)
            (snapshot / path.name).symlink_to(blobs / path.name)
    assert {name for name, _ in plan_push(snapshot, REPO).files} >= {"config.json", "model.safetensors"}


def test_private_into_an_existing_public_repo_is_refused_before_any_upload(folder, hub, no_verify):
    """--private cannot make an existing repo private: pushing into a public one would publish what the user meant to
    keep private."""
    hub.existing[REPO] = False
    result = runner.invoke(app, ["push", str(folder), REPO, "--private", "--token", GOOD_TOKEN, "--endpoint", hub.url])
    shown = " ".join(result.output.split())
    assert (
        result.exit_code == 1 and f"'{REPO}' already exists and is public" in shown and "nothing was uploaded" in shown
    )
    assert not any("/commit/" in path for _, path in hub.requests) and not arrived(hub)
    hub.existing[REPO] = True  # private already: the push goes on
    push(folder, REPO, private=True, token=GOOD_TOKEN, endpoint=hub.url)
    assert "config.json" in arrived(hub)


def test_a_repo_without_private_gets_the_accounts_default_visibility(folder, hub, no_verify):
    """An organization may make its new repos private by default: a push without --private must not override that
    with an explicit "public" (huggingface_hub sends one for private=False)."""
    push(folder, REPO, token=GOOD_TOKEN, endpoint=hub.url)
    push(folder, REPO, private=True, token=GOOD_TOKEN, endpoint=hub.url)
    assert hub.visibility == [None, "private"]


def test_revision_goes_to_a_branch(folder, hub, no_verify):
    url = push(folder, REPO, revision="v2", token=GOOD_TOKEN, endpoint=hub.url)
    assert url.endswith(f"{REPO}/tree/v2") and no_verify == [folder]
    assert ("POST", f"/api/models/{REPO}/branch/v2") in hub.requests
    assert "config.json" in arrived(hub, revision="v2") and hub.created == [{"repo": REPO, "private": False}]
    assert push(folder, REPO, revision="exp/x", token=GOOD_TOKEN, endpoint=hub.url).endswith(f"{REPO}/tree/exp%2Fx")
    for bad in ("bad branch", "a..b", "x.lock", "exp/", "~1"):  # what git refuses, refused here, the dry run too
        result = runner.invoke(app, ["push", str(folder), REPO, "--revision", bad, "--dry-run"])
        assert result.exit_code == 1 and "is not a valid branch name" in result.output, bad
    assert runner.invoke(app, ["push", str(folder), REPO, "--revision", "exp/liger-mix", "--dry-run"]).exit_code == 0


def test_dry_run_prints_the_plan_and_sends_nothing(folder, hub, no_verify):
    result = runner.invoke(app, ["push", str(folder), REPO, "--dry-run", "--endpoint", hub.url])
    assert result.exit_code == 0, result.output
    assert "model.safetensors" in result.output and "KiB" in result.output and "one commit" in result.output
    assert "base_model: my-org/tiny-llama" in result.output and EVAL_TABLE in result.output
    assert hub.requests == [] and no_verify == []


def test_only_the_folders_own_files_are_sent(folder, hub, no_verify, tmp_path):
    """A run folder kept inside the model folder (checkpoints with pickled optimizer state, metrics, a second model):
    transformers loads a model from its folder's own files, so a subfolder is named as left out and not sent."""
    kept = shutil.copytree(folder, tmp_path / "kept")
    (kept / "run" / "checkpoints" / "step-000001").mkdir(parents=True)
    (kept / "run" / "checkpoints" / "step-000001" / "optimizer.pt").write_bytes(b"pickled")
    (kept / "run" / "metrics.jsonl").write_text("{}\n")
    result = runner.invoke(app, ["push", str(kept), REPO, "--dry-run"])
    assert result.exit_code == 0 and "optimizer.pt" not in result.output
    assert "Not sent: run/ (a subfolder" in " ".join(result.output.split())
    result = runner.invoke(app, ["push", str(kept), REPO, "--token", GOOD_TOKEN, "--endpoint", hub.url])
    assert result.exit_code == 0, result.output
    assert "Not sent: run/" in " ".join(result.output.split())
    assert set(arrived(hub)) == {p.name for p in folder.iterdir()} | {"README.md"}


def test_a_readme_of_the_users_is_named_as_replaced_by_the_card(folder, hub, no_verify, tmp_path):
    written = shutil.copytree(folder, tmp_path / "written")
    (written / "README.md").write_text("# My own notes on this model\n")
    replaced = "Not sent: README.md (the folder's own; the generated model card replaces it on the Hub)"
    result = runner.invoke(app, ["push", str(written), REPO, "--dry-run"])
    assert result.exit_code == 0 and replaced in " ".join(result.output.split())
    result = runner.invoke(app, ["push", str(written), REPO, "--token", GOOD_TOKEN, "--endpoint", hub.url])
    assert result.exit_code == 0 and replaced in " ".join(result.output.split())
    assert b"My own notes" not in arrived(hub)["README.md"]
    assert (written / "README.md").read_text() == "# My own notes on this model\n"  # kept as it was


@pytest.mark.parametrize("repo_id", ["tiny-liger", "a/b/c", "-org/name", "org/na--me", "org/na me"])
def test_a_malformed_repo_id_is_refused_locally(repo_id, folder, hub):
    result = runner.invoke(app, ["push", str(folder), repo_id, "--token", GOOD_TOKEN, "--endpoint", hub.url])
    assert result.exit_code != 0 and "ORG/NAME" in result.output
    assert hub.requests == []


def test_no_token_is_refused_locally(folder, hub, no_verify):
    result = runner.invoke(app, ["push", str(folder), REPO, "--endpoint", hub.url])
    assert result.exit_code != 0 and "hf auth login" in result.output and "HF_TOKEN" in result.output
    assert hub.requests == [] and no_verify == []


def test_no_token_for_convert_names_fixes_that_convert_has(hub, tmp_path):
    """`convert --push-to-hub` has no --token option: the message must not tell its user to pass one."""
    result = runner.invoke(app, ["convert", "-o", str(tmp_path / "out"), "--push-to-hub", REPO])
    assert result.exit_code == 1 and "HF_TOKEN" in result.output and "pass --token" not in result.output
    assert "`linearize push` also takes --token" in " ".join(result.output.split())
    assert hub.requests == [] and not (tmp_path / "out").exists()


def test_a_rejected_token_is_not_reported_as_pushed(folder, hub, no_verify):
    result = runner.invoke(app, ["push", str(folder), REPO, "--token", "hf_bad", "--endpoint", hub.url])
    assert result.exit_code != 0 and "rejected the token (401)" in result.output
    assert "Pushed" not in result.output and "not done; rerun the same command" in result.output
    assert not [path for _, path in hub.requests if "/commit/" in path] and not hub.root.exists()
    # a push that follows a conversion or a fine-tune says how to push the saved folder instead
    with pytest.raises(LinearizeError, match="rejected the token .* the push is not done; push it with `linearize"):
        push(folder, REPO, token="hf_bad", endpoint=hub.url, verify=False, retry="push it with `linearize push`")


def test_a_refusal_without_a_status_says_none_of_one():
    error = _http_error(RuntimeError("connection reset by the proxy"), REPO, "https://hub", "Not done.")
    assert str(error) == "the Hub refused the upload: connection reset by the proxy. Not done."


def test_the_retry_command_pastes_into_a_shell():
    assert push_command(Path("runs/my model"), REPO, private=True) == f"linearize push 'runs/my model' {REPO} --private"
    assert push_command(Path("runs/liger/model"), REPO) == f"linearize push runs/liger/model {REPO}"


def test_a_folder_that_does_not_load_sends_nothing(folder, hub, tmp_path):
    broken = shutil.copytree(folder, tmp_path / "broken")
    config = json.loads((broken / "config.json").read_text())
    # intact files (the cheap checks of the plan pass), but weights of the wrong shape: only loading finds it
    (broken / "config.json").write_text(json.dumps(config | {"vocab_size": config["vocab_size"] * 2}))
    with pytest.raises(LinearizeError, match="does not load and generate, so nothing was sent: .*Error"):
        push(broken, REPO, token=GOOD_TOKEN, endpoint=hub.url)
    assert hub.requests == []


def test_a_folder_without_a_tokenizer_is_refused_by_the_plan(folder, hub, tmp_path):
    bare = shutil.copytree(folder, tmp_path / "bare")
    for name in sources.TOKENIZER_FILES:
        (bare / name).unlink(missing_ok=True)
    result = runner.invoke(app, ["push", str(bare), REPO, "--dry-run"])
    assert result.exit_code == 1 and "has no tokenizer" in result.output and "--tokenizer" in result.output
    assert hub.requests == []


def test_a_folder_without_all_its_weights_is_refused_by_the_plan(folder, hub, tmp_path):
    """A copy cut short: no weights, or a sharded save missing a shard, would load nowhere once pushed."""
    weightless = shutil.copytree(folder, tmp_path / "weightless")
    (weightless / "model.safetensors").unlink()
    result = runner.invoke(app, ["push", str(weightless), REPO, "--dry-run"])
    assert result.exit_code == 1 and "has no weights (no model.safetensors" in " ".join(result.output.split())
    sharded = shutil.copytree(weightless, tmp_path / "sharded")
    AutoModelForCausalLM.from_pretrained(folder).save_pretrained(sharded, max_shard_size="100KB")
    shards = sorted(sharded.glob("model-*.safetensors"))
    assert len(shards) > 1 and plan_push(sharded, REPO).files
    shards[-1].unlink()
    with pytest.raises(LinearizeError, match=f"lacks the weight shard.s. {shards[-1].name} that model.safetensors"):
        plan_push(sharded, REPO)
    assert hub.requests == []


@pytest.mark.parametrize("method", ["liger", "still"])
def test_a_run_model_saved_without_its_lora_is_refused(method, folder, hub, tmp_path):
    """With output.merge_lora: false a run's model/ holds the converted model without the LoRA its stages trained
    (that is in the run's adapter/): pushed, it would be sold by its card as the fine-tuned model. A STILL run that
    trained only the method's new parameters has nothing left out."""
    trains = ["lora"] if method == "liger" else ["new"]
    recipe = Recipe.model_validate(
        {"conversion": {"method": method}, "stages": [{"kind": "attention_transfer", "trainable": trains}],
         "output": {"merge_lora": False}}
    )  # fmt: skip
    unmerged = shutil.copytree(folder, tmp_path / "unmerged")
    (unmerged / "linearize_recipe.yaml").write_text(resolved_yaml(recipe))
    if method == "still":
        assert plan_push(unmerged, REPO).files
        return
    result = runner.invoke(app, ["push", str(unmerged), REPO, "--token", GOOD_TOKEN, "--endpoint", hub.url])
    output = " ".join(result.output.split())
    assert result.exit_code == 1 and "without the LoRA adapter" in output and "output.merge_lora=true" in output
    assert hub.requests == []


@pytest.mark.parametrize("record", ['{"markdown": 3}', '["a table"]'])
def test_a_hand_edited_record_is_named_without_a_traceback(record, folder, tmp_path):
    edited = shutil.copytree(folder, tmp_path / "edited")
    (edited / "linearize_eval.json").write_text(record)
    result = runner.invoke(app, ["push", str(edited), REPO, "--dry-run"])
    assert isinstance(result.exception, SystemExit), result.exception  # an error line, not a traceback
    assert result.exit_code == 1 and "linearize_eval.json" in result.output and "rerun" in result.output


def test_offline_is_refused_before_any_request(folder, hub, monkeypatch):
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    result = runner.invoke(app, ["push", str(folder), REPO, "--token", GOOD_TOKEN, "--endpoint", hub.url])
    assert result.exit_code != 0 and "HF_HUB_OFFLINE=1" in result.output
    assert hub.requests == []


def test_an_unreachable_hub_is_named(folder, hub, no_verify):
    with socket.socket() as s:  # a port nobody listens on once closed
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(LinearizeError, match="cannot reach the Hub at http://127.0.0.1.*not done"):
        push(folder, REPO, token=GOOD_TOKEN, endpoint=f"http://127.0.0.1:{port}")


def test_credentials_in_the_endpoint_are_never_printed(folder, hub, no_verify):
    """An endpoint may carry a user name and password (`https://user:secret@hub.example`); messages, the plan and
    the returned URL name the Hub without them, since they end up in terminals and CI logs."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(LinearizeError, match=f"cannot reach the Hub at http://127.0.0.1:{port} ") as caught:
        push(folder, REPO, token=GOOD_TOKEN, endpoint=f"http://user:s3cret@127.0.0.1:{port}")
    assert "s3cret" not in str(caught.value)
    secret_url = hub.url.replace("http://", "http://user:s3cret@")
    result = runner.invoke(app, ["push", str(folder), REPO, "--dry-run", "--endpoint", secret_url])
    assert result.exit_code == 0 and f"{hub.url}/{REPO}" in result.output and "s3cret" not in result.output


def test_a_folder_not_converted_by_linearize_is_refused(tmp_path):
    with pytest.raises(LinearizeError, match="not a model converted by linearize"):
        plan_push(source_folder(tmp_path / "plain"), REPO)
    (tmp_path / "afile").write_text("not a folder")
    for path, problem in ((tmp_path / "afile", "is a file, not a model folder"), (tmp_path / "nope", "does not exist")):
        with pytest.raises(LinearizeError, match=problem):
            plan_push(path, REPO)


def test_convert_push_to_hub_reaches_the_same_push(hub, no_verify, tmp_path, monkeypatch):
    monkeypatch.setattr(constants, "ENDPOINT", hub.url)
    monkeypatch.setenv("HF_TOKEN", GOOD_TOKEN)
    src = source_folder(tmp_path / "src")
    result = runner.invoke(
        app, ["convert", str(src), "--window", "8", "-o", str(tmp_path / "out"), "--push-to-hub", REPO, "--private"]
    )
    assert result.exit_code == 0, result.output
    assert "Pushed" in result.output and no_verify == [tmp_path / "out"]
    assert "model.safetensors" in arrived(hub) and hub.created[0]["private"] is True
    card = arrived(hub)["README.md"].decode()
    assert "base_model" not in card and "\nA model (base model not recorded) with" in card  # not a Hub id


def test_convert_push_to_hub_checks_the_target_before_converting(hub, tmp_path):
    src = source_folder(tmp_path / "src")
    result = runner.invoke(app, ["convert", str(src), "-o", str(tmp_path / "out"), "--push-to-hub", "bad"])
    assert result.exit_code != 0 and "ORG/NAME" in result.output and not (tmp_path / "out").exists()
    result = runner.invoke(app, ["convert", str(src), "--dry-run", "--push-to-hub", "bad id"])
    assert result.exit_code != 0 and "ORG/NAME" in result.output
    for name in sources.TOKENIZER_FILES:  # a bare checkpoint: refused before converting, not at the push
        (src / name).unlink(missing_ok=True)
    result = runner.invoke(app, ["convert", str(src), "-o", str(tmp_path / "out"), "--push-to-hub", REPO], env={
        "HF_TOKEN": GOOD_TOKEN, "HF_ENDPOINT": hub.url, "COLUMNS": "300"})  # fmt: skip
    assert result.exit_code != 0 and "has no tokenizer" in result.output and "a pushed model needs one" in result.output
    assert not (tmp_path / "out").exists() and hub.requests == []


def test_source_hub_id(tmp_path, monkeypatch):
    assert source_hub_id(sources.EMBEDDED_NAME) == sources.EMBEDDED_ID
    assert source_hub_id("Qwen/Qwen3-0.6B") == "Qwen/Qwen3-0.6B"
    assert source_hub_id(str(tmp_path)) is None and source_hub_id("./a/b") is None and source_hub_id("llama") is None
    # the embedded default's weights are not the Hub's: the config says which a conversion started from
    expected = {sources.EMBEDDED_NAME: "embedded", sources.EMBEDDED_ID: "hub", str(tmp_path): "local"}
    for source, weights in expected.items():
        config = plan_conversion(source_model("llama").config, source, "swa").config
        assert (config.source_model, config.source_weights) == (source_hub_id(source), weights)
    monkeypatch.chdir(tmp_path)  # a downloaded folder that bears the embedded default's name is a local folder
    (tmp_path / sources.EMBEDDED_NAME).mkdir()
    assert (source_hub_id(sources.EMBEDDED_NAME), source_weights(sources.EMBEDDED_NAME)) == (None, "local")


def _cache_card(cache: Path, repo_id: str, text: str) -> None:
    """`text` as repo_id's README.md in a Hub cache laid out as huggingface_hub writes one."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    commit = "0" * 40
    (repo / "snapshots" / commit).mkdir(parents=True)
    (repo / "snapshots" / commit / "README.md").write_text(text)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)


def test_the_card_copies_the_licence_recorded_at_conversion(tmp_path, monkeypatch):
    """The Hub asks a derived model's card for its base model's licence: read from the source's card at conversion
    (a folder's README.md, a Hub model's from the cache offline) into config.json, and copied into the card."""
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "cache"))
    other = "---\nlicense: other\nlicense_name: tiny-license\nlicense_link: LICENSE\ntags: [x]\n---\n# A model\n"
    _cache_card(tmp_path / "cache", "my-org/tiny-llama", "---\nlicense: llama3.2\n---\n# Tiny\n")
    local, nameless = tmp_path / "local", tmp_path / "nameless"
    for folder, text in ((local, other), (nameless, "---\nlicense_name: tiny-license\n---\n")):
        folder.mkdir()
        (folder / "README.md").write_text(text)
    recorded = {
        "my-org/tiny-llama": {"license": "llama3.2"},
        str(local): {"license": "other", "license_name": "tiny-license", "license_link": "LICENSE"},
        "my-org/uncached": None,  # offline, not in the cache
        str(tmp_path): None,  # a folder without a card
        str(nameless): None,  # a licence's name without the licence
    }
    source = source_model("llama")
    for name, licence in recorded.items():
        plan = plan_conversion(source.config, name, "swa")
        assert plan.config.source_license == licence, name
        out = save_model(convert_model(source, plan.config), tiny_tokenizer(), tmp_path / "out" / str(len(name)))
        (tmp_path / "card.md").write_text(plan_push(out, REPO).card)
        card = ModelCard.load(tmp_path / "card.md")
        for key in ("license", "license_name", "license_link"):
            assert getattr(card.data, key) == (licence or {}).get(key)
        if licence is None:
            assert "add the base model's licence to this card's front matter" in " ".join(card.text.split())
        else:
            shown = licence.get("license_name", licence["license"])  # "other" goes by its name
            assert f"License: the base model's, `{shown}`." in card.text


def test_the_card_takes_only_licence_terms_from_an_edited_config(folder, tmp_path):
    """config.json's `source_license` goes into the card's front matter: a folder whose config was edited (by hand,
    or someone else's folder pushed) put any key it held there as it was (`widget`, `inference`), failed with a
    TypeError on a key the card sets itself (`tags`) or on a bare string, and with a KeyError on a name alone."""
    config = json.loads((folder / "config.json").read_text())
    edited = tmp_path / "edited"
    for recorded, licence in (
        ({"license": "mit", "tags": "x", "widget": "w", "inference": "false"}, {"license": "mit"}),
        ("apache-2.0", {}),
        ({"license_name": "tiny-license"}, {}),
    ):
        shutil.rmtree(edited, ignore_errors=True)
        shutil.copytree(folder, edited)
        (edited / "config.json").write_text(json.dumps({**config, "source_license": recorded}))
        (tmp_path / "card.md").write_text(plan_push(edited, REPO).card)
        card = ModelCard.load(tmp_path / "card.md").data.to_dict()
        own = {"base_model", "library_name", "pipeline_tag", "tags"}
        assert {key: value for key, value in card.items() if key not in own} == licence, recorded
        assert card["tags"] == ["linearize", "linear-attention", "liger", "text-generation"]


def test_recipe_output_push_to_hub_reaches_the_same_push(hub, tmp_path, monkeypatch):
    monkeypatch.setattr(constants, "ENDPOINT", hub.url)
    monkeypatch.setenv("HF_TOKEN", GOOD_TOKEN)
    src = source_folder(tmp_path / "src")
    (tmp_path / "corpus.txt").write_text(" ".join(f"w{i % 120}" for i in range(400)))
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        f"model: {{name: {src}}}\nconversion: {{window: 8}}\n"
        f"data: {{sources: [{{path: {tmp_path / 'corpus.txt'}}}], seq_len: 16, held_out: 0}}\n"
        "stages: [{kind: lora, max_steps: 1}]\ntraining: {grad_accum: 1}\n"
        f"output: {{dir: {tmp_path / 'run'}, push_to_hub: {REPO}, private: true}}\n"
    )
    result = runner.invoke(app, ["finetune", str(recipe)])
    assert result.exit_code == 0, result.output
    files = arrived(hub)
    assert "model.safetensors" in files and "linearize_recipe.yaml" in files and hub.created[0]["private"] is True
    assert "push_to_hub" in files["README.md"].decode()  # the card embeds the resolved recipe


def test_recipe_push_without_a_token_fails_before_training(tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"stages: [{{kind: lora}}]\noutput: {{dir: {tmp_path / 'run'}, push_to_hub: {REPO}}}\n")
    result = runner.invoke(app, ["finetune", str(recipe)])
    assert result.exit_code == 1 and not (tmp_path / "run").exists()
