"""Passkey retrieval: a 5-digit key hidden at a chosen depth in filler text, asked for at the end.

The prompt follows the task of Mohtashami & Jaggi (Landmark Attention, 2023), as used by LongLoRA and most
linear-attention papers. Each trial is scored two ways from one prefill of the prompt:

- greedy: the model decodes a few tokens; correct when the first number in them is the key;
- ranked: the log-likelihood of " KEY" after the prompt is compared with that of `distractors` other random
  5-digit keys; correct only when the true key scores strictly highest (a tie is a miss, so a model that ignores
  its context cannot score by construction).
"""

from __future__ import annotations

import copy
import random
import re
from collections.abc import Callable
from dataclasses import dataclass

import torch

from .compat import CACHE_ARG, OUTPUT_CACHE_FIELD
from .errors import LinearizeError

INTRO = (
    "There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. "
    "I will quiz you about the important information there.\n"
)
FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
NEEDLE = "The pass key is {key}. Remember it. {key} is the pass key. "
QUESTION = "\nWhat is the pass key? The pass key is"
SENTENCES = re.findall(r"[^.]+\. ", FILLER)  # the filler's sentences, each with its closing space
DEFAULT_DEPTHS = (0.0, 0.25, 0.5, 0.75, 1.0)


@dataclass
class PasskeyPrompt:
    """One prompt: its token ids (LongTensor[T]), the key and where the needle sits."""

    ids: torch.Tensor
    key: str
    depth: float


KEYS = 90_000  # the 5-digit keys


def random_key(rng: random.Random) -> str:
    return str(rng.randint(10000, 10000 + KEYS - 1))


def passkey_prompt(tokenizer, context: int, depth: float, key: str) -> PasskeyPrompt:
    """A prompt of `context` tokens or up to a filler sentence fewer, with the needle after `depth` (0 = start, 1 =
    end) of the filler.

    The filler is as many of FILLER's sentences, in turn, as fit: counted in the whole prompt's tokens, since tokens
    merge where pieces meet (most tokenizers join FILLER's closing space to the next sentence's first word, which
    makes each repeat a token shorter than FILLER alone).

    Args:
        tokenizer: the model's tokenizer.
        context: prompt length in tokens, the tokenizer's special tokens included.
        depth: fraction of the filler placed before the needle (rounded to a whole sentence).
        key: the 5-digit key.

    Returns:
        The prompt's ids (with the tokenizer's special tokens, as the model normally sees text).
    """
    if not 0.0 <= depth <= 1.0:
        raise LinearizeError(f"passkey depth must be between 0 and 1, got {depth}")

    def ids(sentences: int) -> list[int]:
        filler = [SENTENCES[i % len(SENTENCES)] for i in range(sentences)]
        before = round(depth * sentences)
        text = INTRO + "".join(filler[:before]) + NEEDLE.format(key=key) + "".join(filler[before:]) + QUESTION
        return tokenizer(text).input_ids

    shortest = len(ids(len(SENTENCES)))  # the instructions and one whole FILLER
    if shortest > context:
        raise LinearizeError(
            f"passkey context {context} is too short: the instructions and the filler around the key take at least "
            f"{shortest} tokens; give a context of at least {shortest} tokens"
        )
    # an estimate from a stretch of filler, then a sentence at a time to the most that fit
    per_sentence = _length(tokenizer, FILLER * 8) / (8 * len(SENTENCES))
    sentences = max(len(SENTENCES), len(SENTENCES) + int((context - shortest) / per_sentence))
    while sentences > len(SENTENCES) and len(ids(sentences)) > context:
        sentences -= 1
    while len(ids(sentences + 1)) <= context:
        sentences += 1
    return PasskeyPrompt(ids=torch.tensor(ids(sentences)), key=key, depth=depth)


def check_contexts(tokenizer, contexts: list[int]) -> None:
    """Refuse a context too short for the prompt's instructions, before any model loads or runs."""
    for context in contexts:
        passkey_prompt(tokenizer, context, 0.0, "12345")


def _length(tokenizer, text: str) -> int:
    return len(tokenizer(text, add_special_tokens=False).input_ids)


def _forward(model, ids: torch.Tensor, cache=None, logits_to_keep: int = 0):
    """Logits [T', V] for `ids` [T] continuing `cache`, and the updated cache."""
    out = model(
        input_ids=ids[None].to(model.device), use_cache=True, logits_to_keep=logits_to_keep, **{CACHE_ARG: cache}
    )
    return out.logits[0].float(), getattr(out, OUTPUT_CACHE_FIELD)


def _greedy(model, first_logits: torch.Tensor, cache, steps: int) -> list[int]:
    """`steps` greedy tokens from the prefill's last logits [V], on a copy of its cache."""
    cache = copy.deepcopy(cache)
    tokens = [int(first_logits.argmax())]
    for _ in range(steps - 1):
        logits, cache = _forward(model, torch.tensor(tokens[-1:]), cache)
        tokens.append(int(logits[-1].argmax()))
    return tokens


def _log_likelihoods(model, first_logits: torch.Tensor, cache, continuations: list[list[int]]) -> list[float]:
    """Sum of log p(continuation | prompt) for each continuation, from the prefill's last logits [V] and its cache
    (left untouched). Continuations of equal length are scored in one batched forward on a copy of the cache."""
    first = first_logits.log_softmax(-1)
    scores = [float(first[c[0]]) for c in continuations]
    for length in sorted({len(c) for c in continuations} - {1}):
        rows = [i for i, c in enumerate(continuations) if len(c) == length]
        ids = torch.tensor([continuations[i] for i in rows])  # [K, m]
        batch_cache = copy.deepcopy(cache)
        batch_cache.batch_repeat_interleave(len(rows))
        out = model(input_ids=ids[:, :-1].to(model.device), use_cache=True, **{CACHE_ARG: batch_cache})
        logits = out.logits.float().log_softmax(-1)  # [K, m-1, V]
        picked = logits.gather(-1, ids[:, 1:, None].to(logits.device))[..., 0].sum(-1)  # [K]
        for row, score in zip(rows, picked.tolist(), strict=True):
            scores[row] += score
    return scores


@torch.inference_mode()
def score_prompt(model, tokenizer, prompt: PasskeyPrompt, distractors: list[str]) -> dict:
    """Greedy and ranked correctness of one prompt.

    Args:
        model: a causal LM (converted or not).
        tokenizer: its tokenizer.
        prompt: from `passkey_prompt`.
        distractors: other keys that the true key must out-score.

    Returns:
        {"greedy": bool, "ranked": bool, "answer": decoded greedy text, "rank": 1-based rank of the true key}.
    """
    first_logits, cache = _forward(model, prompt.ids, logits_to_keep=1)
    first_logits = first_logits[-1]
    answer_ids = tokenizer(" " + prompt.key, add_special_tokens=False).input_ids
    # one token more than the key, so that a longer number is not mistaken for it
    answer = tokenizer.decode(_greedy(model, first_logits, cache, len(answer_ids) + 1), skip_special_tokens=True)
    numbers = re.findall(r"\d+", answer)
    candidates = [answer_ids] + [tokenizer(" " + k, add_special_tokens=False).input_ids for k in distractors]
    true_score, *others = _log_likelihoods(model, first_logits, cache, candidates)
    return {
        "greedy": bool(numbers) and numbers[0] == prompt.key,
        "ranked": all(true_score > other for other in others),
        "answer": answer,
        "rank": 1 + sum(other >= true_score for other in others),
    }


def passkey_retrieval(
    model,
    tokenizer,
    contexts: list[int],
    depths: tuple[float, ...] = DEFAULT_DEPTHS,
    trials: int = 2,
    seed: int = 0,
    distractors: int = 9,
    step: Callable[[], None] | None = None,
) -> dict:
    """Passkey accuracy at each context length, over every depth and `trials` keys per depth.

    The keys depend only on `seed`, so two models evaluated with the same arguments see the same prompts.

    Args:
        model, tokenizer: the model to test.
        contexts: prompt lengths in tokens.
        depths: needle positions, fractions of the filler before it.
        trials: keys per (context, depth).
        seed: chooses the keys and distractors.
        distractors: keys ranked against the true one (chance of a blind guess: 1 / (distractors + 1)), 1 to 89999.
        step: called after each trial (progress bars).

    Returns:
        {"contexts": {C: {"greedy": acc, "ranked": acc, "trials": n, "by_depth": {depth: {"greedy", "ranked"}}}},
         "distractors": n}.
    """
    if trials < 1:
        raise LinearizeError(f"passkey retrieval needs at least one trial per depth, got trials={trials}")
    if not depths:
        raise LinearizeError("passkey retrieval needs at least one depth, got none")
    if not 1 <= distractors <= KEYS - 1:  # none: every trial ranks first; more than the other keys: never drawn
        raise LinearizeError(
            f"passkey retrieval needs at least one distractor and at most {KEYS - 1} distractors (the other 5-digit "
            f"keys), got distractors={distractors}"
        )
    for depth in depths:
        if not 0.0 <= depth <= 1.0:
            raise LinearizeError(f"passkey depth must be between 0 and 1, got {depth}")
    rng = random.Random(seed)
    results = {}
    for context in contexts:
        outcomes = []
        for depth in depths:
            for _ in range(trials):
                key = random_key(rng)
                others = _distractors(rng, key, distractors)
                scored = score_prompt(model, tokenizer, passkey_prompt(tokenizer, context, depth, key), others)
                outcomes.append((depth, scored))
                if step is not None:
                    step()
        results[context] = _summarise(outcomes)
    return {"contexts": results, "distractors": distractors}


def _distractors(rng: random.Random, key: str, count: int) -> list[str]:
    keys: set[str] = set()
    while len(keys) < count:
        candidate = random_key(rng)
        if candidate != key:
            keys.add(candidate)
    return sorted(keys)


def _summarise(outcomes: list[tuple[float, dict]]) -> dict:
    def accuracy(rows: list[dict], field: str) -> float:
        return sum(r[field] for r in rows) / len(rows)

    by_depth = {}
    for depth in dict.fromkeys(d for d, _ in outcomes):
        rows = [s for d, s in outcomes if d == depth]
        by_depth[depth] = {"greedy": accuracy(rows, "greedy"), "ranked": accuracy(rows, "ranked")}
    rows = [s for _, s in outcomes]
    return {
        "greedy": accuracy(rows, "greedy"),
        "ranked": accuracy(rows, "ranked"),
        "trials": len(rows),
        "by_depth": by_depth,
    }
