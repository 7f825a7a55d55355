"""What identifies a run's computation, so that `--resume` continues only the run it stopped: the recipe's fingerprint
(`recipe_hash`: everything but where results go and the bookkeeping a resumed run may change) and the packed
data's (`data_fingerprint`). Checkpoints record both; `checkpoint.check_resumable` compares them."""

from __future__ import annotations

import hashlib
import json
from typing import Any

import yaml

from .data import FinetuneData
from .recipe import Recipe

# Fields added after runs existed, with the value that means "as before": left out of the fingerprint at that
# value, so that runs from before them still resume. A parent goes before its children; "*" is every item of a list.
_ADDED_LATER = {
    ("conversion", "selection"): None,
    ("conversion", "selection", "spread"): False,
    ("conversion", "convert_layers"): None,
    ("conversion", "probe_rank"): None,
    ("stages", "*", "optimizer", "new_name"): None,
}


_WHERE_RESULTS_GO = {"output": {"dir", "push_to_hub", "private"}}
# How often a run evaluates and keeps checkpoints, how it saves, and whether it recomputes activations in backward
# (memory, not numbers: the same steps bit for bit): a resumed run may change them.
_BOOKKEEPING = {
    "training": {"eval_every", "eval_batches", "checkpoint_every", "keep_checkpoints", "gradient_checkpointing"},
    "output": {"merge_lora"},
}
# Bookkeeping that checkpoints of an earlier linearize still fingerprinted: they resume with it as it was.
_BOOKKEEPING_LATER = {"training": {"gradient_checkpointing"}}


def _left_out(*exclusions: dict[str, set[str]], but: dict[str, set[str]] | None = None) -> dict[str, set[str]]:
    sections = {section for exclusion in exclusions for section in exclusion}
    merged = {s: set().union(*(exclusion.get(s, set()) for exclusion in exclusions)) for s in sections}
    return {s: keys - (but or {}).get(s, set()) for s, keys in merged.items()}


_NOT_COMPUTED = _left_out(_WHERE_RESULTS_GO, _BOOKKEEPING)


def bookkeeping_keys() -> list[str]:
    """The settings a resumed run may change (`recipe_hash` leaves them out), as dotted keys."""
    return [f"{section}.{key}" for section, keys in _BOOKKEEPING.items() for key in sorted(keys)]


def recipe_hash(recipe: Recipe) -> str:
    """Fingerprint of what a run computes: everything but where its results go (folder, Hub repo) and its
    bookkeeping (evaluations, checkpoints, merging LoRA at the end)."""
    return _fingerprint(recipe, _NOT_COMPUTED)


def legacy_recipe_hash(recipe: Recipe) -> str:
    """The fingerprint checkpoints recorded before bookkeeping was left out of `recipe_hash`."""
    return _fingerprint(recipe, _WHERE_RESULTS_GO)


def resumable_hashes(recipe: Recipe) -> set[str]:
    """The fingerprints of checkpoints that `recipe` may resume: `recipe_hash`, and those an earlier linearize
    recorded (before `gradient_checkpointing` was bookkeeping, and before bookkeeping was left out)."""
    earlier = _left_out(_WHERE_RESULTS_GO, _BOOKKEEPING, but=_BOOKKEEPING_LATER)
    return {recipe_hash(recipe), _fingerprint(recipe, earlier), legacy_recipe_hash(recipe)}


def _fingerprint(recipe: Recipe, exclude: dict[str, set[str]]) -> str:
    content = recipe.model_dump(mode="json", exclude=exclude)
    for (*parents, name), unset in _ADDED_LATER.items():
        for section in _sections(content, parents):
            if name in section and section[name] == unset:
                del section[name]
    return hashlib.sha256(yaml.safe_dump(content, sort_keys=True).encode()).hexdigest()[:16]


def recipe_differences(old: Recipe, new: Recipe, most: int = 6, bookkeeping: bool = False) -> str:
    """'stages.1.max_steps 2 -> 3, ...': the settings that differ between two recipes, at most `most` of them, for
    messages about continuing a run with another recipe: what the run computes, or with `bookkeeping` the
    bookkeeping alone (where results go is never compared)."""

    def flat(fields, prefix: str = "") -> dict[str, Any]:
        if isinstance(fields, dict):
            return {k: v for key, value in fields.items() for k, v in flat(value, f"{prefix}{key}.").items()}
        if isinstance(fields, list) and any(isinstance(item, (dict, list)) for item in fields):
            return {k: v for i, item in enumerate(fields) for k, v in flat(item, f"{prefix}{i}.").items()}
        return {prefix[:-1]: fields}

    fields = {"include": _BOOKKEEPING} if bookkeeping else {"exclude": _NOT_COMPUTED}
    before, after = (flat(r.model_dump(mode="json", **fields)) for r in (old, new))
    changed = [
        f"{key} {json.dumps(before.get(key))} -> {json.dumps(after.get(key))}"  # as YAML reads them: null, true
        for key in dict.fromkeys([*before, *after])
        if before.get(key) != after.get(key)
    ]
    return ", ".join(changed[:most]) + (f" and {len(changed) - most} more" if len(changed) > most else "")


def _sections(fields, keys: list[str]) -> list[dict]:
    """The mappings found at `keys` below `fields` ("*": in every item of a list); none where a key is missing."""
    if not keys:
        return [fields] if isinstance(fields, dict) else []
    key, *rest = keys
    if key == "*":
        children = fields if isinstance(fields, list) else []
    else:
        children = [fields.get(key)] if isinstance(fields, dict) else []
    return [section for child in children for section in _sections(child, rest)]


# How `linearize.data.pack_documents` lays documents out, recorded with a checkpoint's data (1: recorded as no
# version), and what each version changed, which a refused checkpoint of an earlier version is told.
PACKING = 5
PACKING_CHANGES = {
    2: "no document's first token is a target, and documents open with their tokenizer's BOS",
    3: "blank text records are no documents, and a document that ends with EOS gets no second one",
    4: "no copy of a held-out document is trained on",
    5: "a document is tokenized whole, not segment by segment (prompt, response)",
}


def data_fingerprint(data: FinetuneData) -> dict[str, Any]:
    """What a resumed run must find again: the packs' count, a digest of their tokens and labels, the packing."""
    digest = hashlib.sha256()
    for packs in (data.train, data.held_out):
        digest.update(packs.input_ids.numpy().tobytes())
        digest.update(packs.labels.numpy().tobytes())
    return {"train_packs": len(data.train), "sha256": digest.hexdigest()[:16], "packing": PACKING}
