"""Publishing a converted model folder to the Hugging Face Hub: plan, model card, local check, upload.

`plan_push` is pure (it reads the folder and renders the card; `--dry-run` prints it). `push` checks everything
it can locally first (repo id form, offline mode, token, that the folder loads and generates in a fresh process),
then creates the repo and uploads the folder in one commit. The generated card goes up as README.md from memory:
the user's folder is never modified, and a README.md already in it is replaced on the Hub by the card. One
commit means the Hub shows either the whole upload or none of it; success is reported only once it returned.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit, urlunsplit

from .comparison import counted
from .convert import layer_groups
from .errors import LinearizeError
from .hub import LOGIN_HINT, REPO_ID, check_branch, check_can_push, check_repo_id, transport_errors
from .methods import LAYOUT_KEYS, get_method
from .models.remote_code import INSTALL_COMMAND, REPOSITORY
from .selection import SCORERS, LayerSelection, spread_flag
from .sources import RECIPE_FILE, TOKENIZER_FILES, WITHOUT_LORA, check_model_folder, lacks_trained_lora, license_terms

CARD_FILE = "README.md"
EVAL_FILE = "linearize_eval.json"  # written by `linearize eval`; its "markdown" key holds a ready table
BENCH_FILE = "linearize_bench.json"  # written by `linearize bench`, same shape
TAGS = ["linearize", "linear-attention"]
WEIGHTS_FILE, WEIGHTS_INDEX = "model.safetensors", "model.safetensors.index.json"  # what save_pretrained writes
_WRITE_AGAIN = "write the folder again (re-run the conversion or fine-tuning that made it, or copy it again whole)"

# Run in a fresh interpreter so that a folder that only loads thanks to this process's state (imported modules,
# registered classes) is caught. `import linearize` registers the classes, as a user's code would.
_VERIFY_SCRIPT = """
import sys
import torch
import linearize
from transformers import AutoModelForCausalLM, AutoTokenizer

folder = sys.argv[1]
device = "cuda" if torch.cuda.is_available() else "cpu"
tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=False)
model = AutoModelForCausalLM.from_pretrained(folder, dtype="auto", trust_remote_code=False).to(device).eval()
ids = tokenizer("Hello", return_tensors="pt").input_ids.to(device)
pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
with torch.inference_mode():
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=4, do_sample=False, pad_token_id=pad)
if out.shape[1] <= ids.shape[1]:
    raise SystemExit("RuntimeError: the model generated no token")
print(repr(tokenizer.decode(out[0, ids.shape[1]:])))
"""


@dataclass
class PushPlan:
    """What `push` will send: the target and every file with its size, README.md being the rendered card."""

    folder: Path
    repo_id: str
    private: bool
    revision: str | None
    card: str
    files: list[tuple[str, int]] = field(default_factory=list)  # (path in the repo, bytes), README.md included
    left_out: list[str] = field(default_factory=list)  # what in the folder is not sent, each with why

    @property
    def total_bytes(self) -> int:
        return sum(size for _, size in self.files)

    def operations(self) -> list:
        """The commit operations: each folder file from disk, README.md from the rendered card."""
        from huggingface_hub import CommitOperationAdd

        return [
            CommitOperationAdd(path, self.card.encode() if path == CARD_FILE else self.folder / path)
            for path, _ in self.files
        ]


def _read_json(path: Path) -> dict[str, Any]:
    try:
        content = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise LinearizeError(f"cannot read {path}: {error}") from None
    if not isinstance(content, dict):  # a hand edit: callers read keys
        raise LinearizeError(
            f"{path} holds a JSON {type(content).__name__}, not an object: rerun the command that wrote it"
        )
    return content


def read_linearize_config(folder: Path) -> dict[str, Any]:
    """The folder's config.json, after checking that it is a model converted by linearize.

    Args:
        folder: a model folder.

    Returns:
        The parsed config.json.
    """
    if not (folder / "config.json").is_file():
        raise LinearizeError(f"'{folder}' is not a model folder: it has no config.json")
    config = _read_json(folder / "config.json")
    if not isinstance(config.get("linearize"), dict):
        raise LinearizeError(
            f"'{folder}' is not a model converted by linearize (its config.json has no 'linearize' block); "
            "convert it first with `linearize convert`"
        )
    return config


def _base_model(config: dict[str, Any]) -> str | None:
    # Folders from linearize before `source_model` was recorded may still carry the source in `_name_or_path`.
    name = config.get("source_model") or config.get("_name_or_path")
    return name if name and REPO_ID.match(name) and not Path(name).exists() else None


def _license_line(license_metadata: dict[str, str]) -> str:
    if not license_metadata:
        return (
            "License: not recorded at conversion (the source's model card was not found or not readable): add the "
            "base model's licence to this card's front matter (`license:`)."
        )
    name = license_metadata.get("license_name", license_metadata["license"])  # "other" comes with its name
    return f"License: the base model's, `{name}`."


def _measurement(folder: Path, file: str, command: str) -> str:
    path = folder / file
    if not path.is_file():
        return f"Not measured yet (`{command}` writes `{file}` into the folder)."
    record = _read_json(path)
    markdown = record.get("markdown")
    if not markdown or not isinstance(markdown, str):
        raise LinearizeError(f"{path} has no 'markdown' table; rerun `{command}` or delete the file")
    return _bench_conditions(record) + markdown.strip()


def _bench_conditions(record: dict[str, Any]) -> str:
    """Where and how a bench record was measured, as a line above its table: speeds mean nothing without the
    hardware. Empty for an eval record; records from before `hardware` and `dtype` were kept go without them."""
    if not {"threads", "repeats", "decode_tokens"} <= record.keys():
        return ""
    parts = (record.get("hardware"), record.get("device"), record.get("dtype"), counted(record["threads"], "thread"))
    where = ", ".join(str(part) for part in parts if part)
    runs = record["repeats"]
    return (
        f"Measured by `linearize bench` on {where}; prefill: the median of {counted(runs, 'run')}, decode: the median "
        f"of {counted(runs, 'run')} of {counted(record['decode_tokens'], 'step')}.\n\n"
    )


def _layers_section(config: dict[str, Any]) -> str:
    settings = config["linearize"]
    groups = layer_groups(settings["method"], config["layer_types"], settings.get("softmax_layers", []))
    rows = "\n".join(f"| {layers} | {fate} |" for layers, fate in groups)
    table = f"| layers | attention |\n|---|---|\n{rows}"
    saved = settings.get("layer_selection")
    if not saved:
        return table
    selection = LayerSelection(**saved)
    kept = ", ".join(map(str, settings["softmax_layers"])) or "none"
    scores = "\n".join(
        f"| {layer} | {score:.4g} | {'softmax' if layer in settings['softmax_layers'] else ''} |"
        for layer, score in enumerate(selection.scores)
    )
    when = "after attention transfer" if selection.after == "attention_transfer" else "at conversion"
    # `restore` measures the converted model with the layer given back, not the original with the layer converted
    how = "what restoring it alone gains" if selection.scorer == "restore" else "how much converting it alone hurts"
    flags = f"--softmax-layers auto:{selection.k}" + spread_flag(selection.spread)
    return f"""{table}

The layers kept as softmax attention ({kept}) were chosen by measurement (`{flags}`):
each layer was scored {when} by {how} ({SCORERS[selection.scorer]}; scorer
`{selection.scorer}`, on {selection.calibration}), and {selection.rule} stayed softmax.

| layer | score | kept |
|---|---|---|
{scores}"""


def _loading_section(name: str) -> str:
    return f"""linearize is not on PyPI; install it from its repository:

```bash
{INSTALL_COMMAND}
```

```python
import linearize  # registers the converted-model classes with transformers
from transformers import AutoModelForCausalLM, AutoTokenizer

model = AutoModelForCausalLM.from_pretrained("{name}")
tokenizer = AutoTokenizer.from_pretrained("{name}")
```

Without `import linearize`, load it with remote code: the repository's `configuration_linearize.py` and
`modeling_linearize.py` import the installed `linearize` package (and say how to install it when it is
missing). The tokenizer needs the flag too: transformers reads the model's config to load it, and without the
flag asks whether to run the repository's code.

```python
model = AutoModelForCausalLM.from_pretrained("{name}", trust_remote_code=True)
tokenizer = AutoTokenizer.from_pretrained("{name}", trust_remote_code=True)
```"""


def _tuning_section(folder: Path, settings: dict[str, Any]) -> str:
    recipe = folder / RECIPE_FILE
    if recipe.is_file():
        recipe_yaml = recipe.read_text().strip()
        return f"Fine-tuned with `linearize finetune`; the resolved recipe:\n\n```yaml\n{recipe_yaml}\n```"
    untrained = "Not fine-tuned after the conversion (no recipe in the folder)"
    method = get_method(settings["method"])
    if method.exact_with(method.settings.from_saved(settings, method.name)):  # Parallax without a window
        return (
            f"{untrained}: its converted layers start exact (the probe is zero), so the model computes the base "
            "model's outputs exactly until it is trained; fine-tuning with `linearize finetune` starts from there."
        )
    return f"{untrained}: expect lower quality than the base model until it is fine-tuned with `linearize finetune`."


def render_model_card(folder: Path | str, repo_id: str | None = None) -> str:
    """The model card of a converted folder: YAML front matter (base_model, licence, tags, library, pipeline) and a
    body with the method, the layer map, the fine-tuning recipe, the latest eval and bench tables and how to load it.

    Args:
        folder: a model folder converted (and possibly fine-tuned) by linearize.
        repo_id: the Hub repo it goes to, for the loading snippets (default: the folder's name).

    Returns:
        The card as README.md text.
    """
    from huggingface_hub import ModelCard, ModelCardData

    folder = Path(folder)
    config = read_linearize_config(folder)
    settings = config["linearize"]
    method, base = settings["method"], _base_model(config)
    name = repo_id or folder.resolve().name
    # recorded at conversion (`sources.source_license`); its licence terms alone, as config.json may be edited: any
    # other key would go into the card's metadata as it is, and a clash with the card's own keys failed
    license_metadata = license_terms(config.get("source_license"))
    data = ModelCardData(
        base_model=base,
        **license_metadata,
        tags=[*TAGS, method, "text-generation"],
        library_name="transformers",
        pipeline_tag="text-generation",
    )
    params = ", ".join(f"`{k}={v}`" for k, v in settings.items() if k not in LAYOUT_KEYS)
    origin = f"[{base}](https://huggingface.co/{base})" if base else "A model (base model not recorded)"
    if config.get("source_weights") == "embedded":
        origin += " (the Q4_1 GGUF of it that linearize embeds for offline use, dequantised)"
    body = f"""
# {name.split("/")[-1]}

{origin} with its attention converted to **{method}** by [linearize]({REPOSITORY})
(family: {config.get("base_model_type", "unknown")}). Method parameters: {params or "none"}.
{_license_line(license_metadata)}

## Layers

{_layers_section(config)}

## Fine-tuning

{_tuning_section(folder, settings)}

## Evaluation

{_measurement(folder, EVAL_FILE, "linearize eval")}

## Speed and memory

{_measurement(folder, BENCH_FILE, "linearize bench")}

## How to load

{_loading_section(name)}
"""
    return str(ModelCard(f"---\n{data.to_yaml()}\n---\n{body}"))


def _folder_files(folder: Path) -> tuple[list[tuple[str, int]], list[str]]:
    """The folder's own files with their sizes, and what else it holds that is left out, with why. transformers loads
    a model from its folder's own files; a subfolder is someone's addition (a run folder, with checkpoints and
    metrics). Hidden entries (.cache, .git, a run's lock) and bytecode are local state; README.md is the card."""
    found, left_out = [], []
    for path in sorted(folder.iterdir()):
        if path.name.startswith(".") or path.name == "__pycache__":
            continue
        if path.is_dir():
            left_out.append(f"{path.name}/ (a subfolder: the model loads from the folder's own files)")
        elif path.name == CARD_FILE:  # the user's own card, maybe: it must not vanish from the Hub unsaid
            left_out.append(f"{CARD_FILE} (the folder's own; the generated model card replaces it on the Hub)")
        elif path.is_file():
            _check_link(folder, path)
            found.append((path.name, path.stat().st_size))
    return found, left_out


def _check_link(folder: Path, path: Path) -> None:
    """Refuse a file that links out of the folder: a push sends the target, which may be anything the user can read
    (a folder from someone else could link `notes.txt` to the Hub token). A Hugging Face cache snapshot's links into
    its repo's blobs are the model's own files."""
    if not path.is_symlink():
        return
    target, home = path.resolve(), folder.resolve()
    cache_blobs = home.parent.name == "snapshots" and target.parent == home.parent.parent / "blobs"
    if not (target.is_relative_to(home) or cache_blobs):
        raise LinearizeError(
            f"'{path}' links to '{target}', outside the folder: a push would send that file. Copy the file into the "
            "folder if it belongs to the model, or remove the link"
        )


def _check_weights(folder: Path) -> None:
    """Refuse a folder without its weights, or with a shard that its index lists missing (a copy or a download cut
    short): `check_model_folder` reads the safetensors files there are, and `--no-verify` would push it as it is."""
    index = folder / WEIGHTS_INDEX
    if index.is_file():
        weight_map = _read_json(index).get("weight_map")
        if not isinstance(weight_map, dict):
            raise LinearizeError(f"{index} has no 'weight_map'; {_WRITE_AGAIN}")
        missing = sorted(set(weight_map.values()) - {path.name for path in folder.glob("*.safetensors")})
        if missing:
            raise LinearizeError(
                f"'{folder}' lacks the weight shard(s) {', '.join(missing)} that {index.name} lists; {_WRITE_AGAIN}"
            )
    elif not (folder / WEIGHTS_FILE).is_file():
        raise LinearizeError(f"'{folder}' has no weights (no {WEIGHTS_FILE} or {WEIGHTS_INDEX}); {_WRITE_AGAIN}")


def plan_push(folder: Path | str, repo_id: str, *, private: bool = False, revision: str | None = None) -> PushPlan:
    """Everything `push` will send, computed locally: the files with their sizes and the rendered card.

    Args:
        folder: the converted model folder.
        repo_id: the target repo, ORG/NAME.
        private: whether a newly created repo is private.
        revision: the branch to commit to (None: the default branch).

    Returns:
        The plan; nothing is sent or written, and of the weights only the safetensors headers are read.
    """
    folder = Path(folder)
    check_repo_id(repo_id)
    if revision is not None:
        check_branch(revision)
    if not folder.is_dir():
        problem = "is a file, not a model folder" if folder.exists() else "does not exist"
        raise LinearizeError(f"model folder '{folder}' {problem}")
    check_model_folder(folder)  # a folder that cannot load must not look ready to push
    _check_weights(folder)
    if lacks_trained_lora(folder):
        raise LinearizeError(f"'{folder}' holds {WITHOUT_LORA}; then push model/")
    if not any((folder / name).is_file() for name in TOKENIZER_FILES):  # its card tells users to load one
        raise LinearizeError(
            f"'{folder}' has no tokenizer (none of {', '.join(TOKENIZER_FILES)}), so the pushed model could not be "
            "used as its card says; convert again with --tokenizer PATH_OR_ID, or copy the source's tokenizer files "
            "into the folder"
        )
    card = render_model_card(folder, repo_id)
    files, left_out = _folder_files(folder)
    return PushPlan(
        folder, repo_id, private, revision, card, sorted([*files, (CARD_FILE, len(card.encode()))]), left_out
    )


def verify_folder(folder: Path | str) -> str:
    """Load the folder with AutoModelForCausalLM in a fresh Python process and greedily generate a few tokens.

    Args:
        folder: the model folder.

    Returns:
        The generated text (repr), as the check printed it.
    """
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}  # a local folder needs no network
    done = subprocess.run(  # no stdin: nothing in it may wait for an answer
        [sys.executable, "-c", _VERIFY_SCRIPT, str(folder)],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        env=env,
        check=False,
    )
    if done.returncode != 0:
        lines = [line for line in done.stderr.splitlines() if line.strip()]
        reason = lines[-1].strip() if lines else f"exit code {done.returncode}"
        raise LinearizeError(f"'{folder}' does not load and generate, so nothing was sent: {reason}")
    return done.stdout.strip()


def _http_error(error, repo_id: str, endpoint: str, not_done: str) -> LinearizeError:
    status = getattr(getattr(error, "response", None), "status_code", None)
    if status == 401:
        return LinearizeError(f"the Hub at {endpoint} rejected the token (401): {LOGIN_HINT}. {not_done}")
    if status == 403:
        return LinearizeError(
            f"the token may not write to '{repo_id}' (403): use a token with write access to "
            f"'{repo_id.split('/')[0]}'. {not_done}"
        )
    reason = str(error).splitlines()[0] if str(error) else type(error).__name__
    code = f" ({status})" if status is not None else ""
    return LinearizeError(f"the Hub refused the upload{code}: {reason}. {not_done}")


def shown_endpoint(endpoint: str) -> str:
    """`endpoint` without the user name and password a URL may carry (`https://user:secret@hub.example`), which
    messages, progress lines and the returned URL would otherwise print into terminals and CI logs."""
    parts = urlsplit(endpoint)
    if "@" not in parts.netloc:
        return endpoint
    return urlunsplit(parts._replace(netloc=parts.netloc.rpartition("@")[2]))


@contextmanager
def _hub_errors(repo_id: str, endpoint: str, retry: str) -> Iterator[None]:
    """Turn Hub and network failures into LinearizeErrors that say the push did not complete, and how to `retry`.
    The messages name `endpoint` and quote the error without its credentials."""
    from huggingface_hub.errors import HfHubHTTPError

    shown = shown_endpoint(endpoint)
    nothing = f"The Hub did not confirm a commit, so the push is not done; {retry}."
    try:
        yield
    except HfHubHTTPError as error:
        raise LinearizeError(str(_http_error(error, repo_id, shown, nothing)).replace(endpoint, shown)) from None
    except transport_errors() as error:
        reason = str(error).replace(endpoint, shown)
        raise LinearizeError(f"cannot reach the Hub at {shown} ({reason}). {nothing}") from None


@contextmanager
def _progress_bars(show: bool) -> Iterator[None]:
    # A function pair rather than huggingface_hub 2.x's context manager, which 1.x does not have.
    from huggingface_hub.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars

    hide = not show and not are_progress_bars_disabled()
    if hide:
        disable_progress_bars()
    try:
        yield
    finally:
        if hide:
            enable_progress_bars()


def push_command(folder: Path | str, repo_id: str, private: bool = False) -> str:
    """The `linearize push` command line that pushes `folder` to `repo_id` (what a failed push tells users to run),
    quoted for a shell: a folder name with a space must still paste as one argument."""
    return f"linearize push {shlex.quote(str(folder))} {shlex.quote(repo_id)}" + (" --private" if private else "")


def push(
    folder: Path | str,
    repo_id: str,
    *,
    private: bool = False,
    revision: str | None = None,
    token: str | None = None,
    endpoint: str | None = None,
    quiet: bool = False,
    verify: bool = True,
    on_step: Callable[[str], None] | None = None,
    retry: str = "rerun the same command",
) -> str:
    """Check the folder, create the repo (if needed) and upload the folder with its model card in one commit.

    Args:
        folder: the converted model folder (left unchanged).
        repo_id: the target repo, ORG/NAME.
        private: create the repo private (otherwise the account's default visibility: public unless an organization
            makes its new repos private; an existing repo keeps its visibility).
        revision: the branch to commit to, created from the default branch if missing (None: the default branch).
        token: a Hub token with write access (default: HF_TOKEN or the stored login).
        endpoint: the Hub URL (default: HF_ENDPOINT or https://huggingface.co).
        quiet: no upload progress bars (they show only on a terminal anyway).
        verify: first load the folder and generate a few tokens in a fresh process.
        on_step: called with a short description before each step (the CLI prints them).
        retry: what a failure's message tells the user to do to push again.

    Returns:
        The URL of the pushed repo (of its branch, with a revision), once the Hub has accepted the commit.
    """
    from huggingface_hub import HfApi

    step = on_step or (lambda _: None)
    plan = plan_push(folder, repo_id, private=private, revision=revision)
    token = check_can_push(token)
    if verify:
        step(f"Checking that {plan.folder} loads and generates (fresh process)")
        verify_folder(plan.folder)
    for entry in plan.left_out:
        step(f"Not sent: {entry}")
    api = HfApi(endpoint=endpoint, token=token)
    shown = shown_endpoint(api.endpoint)
    with _hub_errors(repo_id, api.endpoint, retry), _progress_bars(not quiet and sys.stderr.isatty()):
        step(f"Creating {repo_id} on {shown}" + (" (private)" if private else ""))
        # private=False would send "public" and override an organization whose new repos are private by default
        api.create_repo(repo_id, private=private or None, exist_ok=True)
        if private and api.model_info(repo_id).private is False:  # an existing repo keeps its visibility
            raise LinearizeError(
                f"'{repo_id}' already exists and is public, and --private does not change an existing repo: nothing "
                "was uploaded. Make it private in its settings on the Hub and push again, or push without --private "
                "to publish it"
            )
        if revision and revision != "main":
            api.create_branch(repo_id, branch=revision, exist_ok=True)
        step(f"Uploading {len(plan.files)} files in one commit")
        api.create_commit(
            repo_id,
            operations=plan.operations(),
            commit_message="Upload the model and its card with linearize",
            revision=revision,
        )
    url = f"{shown}/{repo_id}"
    return f"{url}/tree/{quote(revision, safe='')}" if revision else url  # the Hub's own URLs encode a / in a branch
