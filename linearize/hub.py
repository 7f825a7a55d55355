"""What every push to the Hugging Face Hub checks first, before anything is converted, trained or sent: the repo id
form, a branch name, offline mode and a token. `linearize push` (`linearize.publish`), `convert --push-to-hub` and a
recipe's `output.push_to_hub` all run these checks; this module imports nothing else of linearize but its errors."""

from __future__ import annotations

import re
import sys

from .errors import LinearizeError

REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*$")  # ORG/NAME
# every push checks the token, and only `linearize push` takes one on its command line
LOGIN_HINT = "run `hf auth login` or set HF_TOKEN (`linearize push` also takes --token)"


def check_repo_id(repo_id: str) -> str:
    """Refuse a repo id that is not `org/name` before anything is sent.

    Args:
        repo_id: the target, e.g. "my-user/smollm2-liger".

    Returns:
        The repo id, unchanged.
    """
    if not REPO_ID.match(repo_id) or "--" in repo_id or ".." in repo_id or len(repo_id.split("/")[1]) > 96:
        raise LinearizeError(
            f"repo id '{repo_id}' is not of the form ORG/NAME (letters, digits, '-', '_', '.'; e.g. "
            "my-user/smollm2-135m-liger); the ORG is your user name or an organization you can write to"
        )
    return repo_id


def check_branch(name: str) -> str:
    """Refuse a branch name that git (and so the Hub) refuses, before anything is sent: git's rules for ref names
    (`git check-ref-format`), in short."""
    parts = name.split("/")
    bad = (
        not name
        or any(not part or part.startswith(".") or part.endswith(".lock") for part in parts)
        or name.endswith(".")
        or ".." in name
        or "@{" in name
        or name == "@"
        or any(ord(c) < 32 or c in " ~^:?*[\\\x7f" for c in name)
    )
    if bad:
        raise LinearizeError(
            f"--revision '{name}' is not a valid branch name (no spaces, '..', '~^:?*[\\', '@{{', and no part that "
            "is empty, starts with '.' or ends in '.lock'); e.g. --revision v2 or --revision exp/liger-mix"
        )
    return name


def check_can_push(token: str | None = None) -> str:
    """Refuse offline mode and a missing token before any request is made.

    Args:
        token: a token given explicitly (default: HF_TOKEN or the one `hf auth login` stored).

    Returns:
        The token to use.
    """
    from huggingface_hub import constants, get_token

    if constants.HF_HUB_OFFLINE:
        raise LinearizeError(
            "the Hugging Face Hub is switched off on this machine (HF_HUB_OFFLINE=1): unset it on a connected "
            "machine to push (`linearize push --dry-run` shows what would be sent)"
        )
    token = token or get_token()
    if not token:
        raise LinearizeError(f"no Hugging Face token found: {LOGIN_HINT} (it needs write access)")
    return token


def transport_errors() -> tuple[type[BaseException], ...]:
    # huggingface_hub 1.x talks through httpx and 2.x through httpx2; take the transport errors of whichever it
    # has imported rather than pinning one.
    errors: list[type[BaseException]] = [OSError]
    for module in ("httpx2", "httpx"):
        if module in sys.modules:
            errors.append(sys.modules[module].TransportError)
    return tuple(errors)
