"""Feedback records: a pool of responses with gold scores, annotated into the trainers' data formats.

A *pool* is ``prompts`` [P], ``responses`` [P][K_p] and ``gold`` [P][K_p] (ragged K allowed). The
records are plain dicts, ready to dump as JSONL:

* preferences ``{"prompt", "chosen", "rejected"}``
* rankings    ``{"prompt", "responses": [best first]}``
* ratings     ``{"prompt", "response", "rating"}`` (rating an int in 1..num_levels)
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from typing import Literal

import jax
import numpy as np

from jaxrlhf.config import is_number
from jaxrlhf.oracle.annotators import pairwise_preferences, plackett_luce_rankings, quantised_ratings

# field → (valid, the rule in words) of AnnotatorConfig; the experiment pipeline's hyper-parameter checks
# use the same rules for its annotator fields.
ANNOTATOR_RULES: dict[str, tuple[Callable[[float], bool], str]] = {
    "temperature": (lambda x: math.isfinite(x) and x >= 0, "a finite number >= 0"),
    "flip_prob": (lambda x: 0 <= x <= 1, "in [0, 1]"),
    "noise_std": (lambda x: math.isfinite(x) and x >= 0, "a finite number >= 0"),
    "pairs_per_prompt": (lambda x: x >= 0, ">= 0"),
    "num_levels": (lambda x: x >= 2, ">= 2"),
}


@dataclasses.dataclass(frozen=True)
class AnnotatorConfig:
    """How a simulated annotator labels a pool (see :mod:`jaxrlhf.oracle.annotators` for the maths)."""

    kind: Literal["preference", "ranking", "rating"] = "preference"
    temperature: float = 1.0  # τ of the Bradley–Terry / Plackett–Luce annotators; 0 = deterministic
    flip_prob: float = 0.0  # ε, probability of flipping each pairwise label
    pairs_per_prompt: int = 0  # pairs drawn per prompt; 0 = every pair of distinct responses
    noise_std: float = 0.0  # σ of the rating annotator
    num_levels: int = 5  # k of the rating scale 1..k
    rating_low: float = -1.0  # gold value at the bottom of the rating scale
    rating_high: float = 1.0  # gold value at the top of the rating scale

    def __post_init__(self) -> None:
        # Python numbers only: a vmapped sweep hands traced values, which the annotators check themselves.
        for key, (valid, rule) in ANNOTATOR_RULES.items():
            value = getattr(self, key)
            if is_number(value) and not valid(value):
                raise ValueError(f"AnnotatorConfig.{key} must be {rule}, got {value}")
        low, high = self.rating_low, self.rating_high
        if is_number(low) and is_number(high) and not (math.isfinite(low + high) and high > low):
            raise ValueError(f"AnnotatorConfig.rating_high must be finite and above rating_low, got {high}")


def _check_pool(prompts, responses, gold) -> list[np.ndarray]:
    if not (len(prompts) == len(responses) == len(gold)):
        raise ValueError(
            f"pool sizes differ: {len(prompts)} prompts, {len(responses)} response lists, "
            f"{len(gold)} gold lists"
        )
    gold_rows = []
    for i, (rs, gs) in enumerate(zip(responses, gold)):
        if isinstance(rs, str):
            raise TypeError(f"responses[{i}] must be a list of strings, got a single string")
        g = np.asarray(gs, np.float32).reshape(-1)
        if len(rs) != g.shape[0]:
            raise ValueError(f"pool row {i}: {len(rs)} responses but {g.shape[0]} gold scores")
        if not np.all(np.isfinite(g)):
            raise ValueError(f"pool row {i}: gold scores must be finite, got {g.tolist()}")
        gold_rows.append(g)
    return gold_rows


def _host_rng(key: jax.Array) -> np.random.Generator:
    """A NumPy generator seeded from a jax key, for host-side choices (which pairs to label)."""
    return np.random.default_rng(np.asarray(jax.random.randint(key, (4,), 0, 2**31 - 1)).tolist())


def _preference_records(key, prompts, responses, gold_rows, config) -> list[dict]:
    pair_key, label_key = jax.random.split(key)
    rng = _host_rng(pair_key)
    rows, firsts, seconds = [], [], []
    for i, rs in enumerate(responses):
        # Identical texts carry no preference information and would give chosen == rejected.
        pairs = [(a, b) for a in range(len(rs)) for b in range(a + 1, len(rs)) if rs[a] != rs[b]]
        if config.pairs_per_prompt > 0 and len(pairs) > config.pairs_per_prompt:
            picked = rng.choice(len(pairs), size=config.pairs_per_prompt, replace=False)
            pairs = [pairs[j] for j in sorted(picked)]
        for a, b in pairs:
            rows.append(i)
            firsts.append(a)
            seconds.append(b)
    if not rows:
        return []
    gold_1 = np.array([gold_rows[i][a] for i, a in zip(rows, firsts)], np.float32)
    gold_2 = np.array([gold_rows[i][b] for i, b in zip(rows, seconds)], np.float32)
    first_wins = np.asarray(
        pairwise_preferences(label_key, gold_1, gold_2, config.temperature, config.flip_prob)
    )
    records = []
    for i, a, b, win in zip(rows, firsts, seconds, first_wins):
        chosen, rejected = (a, b) if win else (b, a)
        records.append(
            {"prompt": prompts[i], "chosen": responses[i][chosen], "rejected": responses[i][rejected]}
        )
    return records


def _ranking_records(key, prompts, responses, gold_rows, config) -> list[dict]:
    # A text repeated in a prompt's responses is ranked once (its first occurrence): a ranking holding it
    # twice would tie it with itself, which teaches nothing and is scored as a lost pair.
    distinct = [[j for j, r in enumerate(rs) if r not in rs[:j]] for rs in responses]
    orders: dict[int, np.ndarray] = {}
    by_size: dict[int, list[int]] = {}
    for i, keep in enumerate(distinct):
        if len(keep) >= 2:
            by_size.setdefault(len(keep), []).append(i)
    for size, rows in by_size.items():
        gold = np.stack([gold_rows[i][distinct[i]] for i in rows])
        perms = plackett_luce_rankings(jax.random.fold_in(key, size), gold, config.temperature)
        orders.update(zip(rows, np.asarray(perms)))
    return [
        {"prompt": prompts[i], "responses": [responses[i][distinct[i][j]] for j in orders[i]]}
        for i in range(len(prompts))
        if i in orders
    ]


def _rating_records(key, prompts, responses, gold_rows, config) -> list[dict]:
    if not gold_rows or sum(g.shape[0] for g in gold_rows) == 0:
        return []
    ratings = np.asarray(
        quantised_ratings(
            key,
            np.concatenate(gold_rows),
            config.noise_std,
            config.num_levels,
            config.rating_low,
            config.rating_high,
        )
    )
    records, n = [], 0
    for i, rs in enumerate(responses):
        for r in rs:
            records.append({"prompt": prompts[i], "response": r, "rating": int(ratings[n])})
            n += 1
    return records


def annotate_pool(
    key: jax.Array,
    prompts: Sequence[str],
    responses: Sequence[Sequence[str]],
    gold: Sequence[Sequence[float]],
    config: AnnotatorConfig,
) -> list[dict]:
    """Label a pool with the simulated annotator ``config.kind`` and return the records.

    Preferences: for each prompt, every pair of distinct responses (or ``pairs_per_prompt`` of them drawn
    at random) labelled by the Bradley–Terry annotator. Rankings: one Plackett–Luce ranking of each
    prompt's responses (prompts with fewer than 2 are skipped). Ratings: one record per response.
    """
    gold_rows = _check_pool(prompts, responses, gold)
    builders = {"preference": _preference_records, "ranking": _ranking_records, "rating": _rating_records}
    if config.kind not in builders:
        raise ValueError(f"AnnotatorConfig.kind must be one of {list(builders)}, got {config.kind!r}")
    return builders[config.kind](key, list(prompts), responses, gold_rows, config)


def _record_kind(index: int, record: dict) -> str:
    if {"prompt", "chosen", "rejected"} <= record.keys():
        return "preference"
    if {"prompt", "responses"} <= record.keys():
        return "ranking"
    if {"prompt", "response", "rating"} <= record.keys():
        return "rating"
    raise ValueError(f"record {index} has keys {sorted(record)}, which match no feedback format")


def coverage_report(records: Sequence[dict]) -> dict:
    """How much of the prompt/response space a feedback set spans.

    Keys: ``kind``, ``records``, ``distinct_prompts``, ``distinct_responses`` (texts),
    ``distinct_prompt_responses`` ((prompt, response) pairs), ``comparisons`` (pairwise comparisons
    implied: 1 per preference, K(K−1)/2 per ranking of K, 0 for ratings) and ``distinct_comparisons``
    (unordered (prompt, {a, b}) pairs among them).
    """
    kinds = {_record_kind(i, r) for i, r in enumerate(records)}
    if len(kinds) > 1:
        raise ValueError(f"records mix feedback formats: {sorted(kinds)}")
    kind = kinds.pop() if kinds else "empty"
    prompts, texts, prompt_texts, comparisons, distinct = set(), set(), set(), 0, set()
    for r in records:
        if kind == "preference":
            shown = [r["chosen"], r["rejected"]]
        elif kind == "ranking":
            shown = list(r["responses"])
        else:
            shown = [r["response"]]
        prompts.add(r["prompt"])
        texts.update(shown)
        prompt_texts.update((r["prompt"], t) for t in shown)
        if kind != "rating":
            pairs = [(a, b) for i, a in enumerate(shown) for b in shown[i + 1 :]]
            comparisons += len(pairs)
            distinct.update((r["prompt"], frozenset(p)) for p in pairs)
    return {
        "kind": kind,
        "records": len(records),
        "distinct_prompts": len(prompts),
        "distinct_responses": len(texts),
        "distinct_prompt_responses": len(prompt_texts),
        "comparisons": comparisons,
        "distinct_comparisons": len(distinct),
    }
