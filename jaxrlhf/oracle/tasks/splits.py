"""Disjoint prompt splits of a task's prompt space, and the report of how prompt lists overlap.

Every prompt belongs to exactly one split, decided by a hash of its text (special tokens and extra spaces
dropped): h = blake2b-64(text)/2⁶⁴ ∈ [0, 1), and split i holds the prompts with
c_{i−1} ≤ h < c_i, c the cumulative split fractions. The partition needs no enumeration of the prompt
space, does not depend on the seed of a run (every run evaluates on the same held-out part of the space)
and is the same on every machine. Sampling from a split draws from the task's prompt distribution and
keeps the prompts that fall in it, so each split sees the same distribution, restricted to its part.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
from collections.abc import Mapping, Sequence

from jaxrlhf.oracle.task_tokenizer import SPECIAL_TOKENS

SPLITS = ("sft", "feedback", "rl", "eval")
#: the fraction of the prompt space in each split (by hash value)
SPLIT_FRACTIONS = {"sft": 0.25, "feedback": 0.25, "rl": 0.25, "eval": 0.25}
_PERSON = b"jaxrlhf-split"  # blake2b personalisation: the hash is this partition's own


def canonical_prompt(prompt: str) -> str:
    """The prompt's symbols, special tokens dropped, joined by single spaces."""
    return " ".join(w for w in prompt.split() if w not in SPECIAL_TOKENS)


def prompt_hash(prompt: str) -> float:
    """A uniform number in [0, 1) fixed by the prompt's canonical text."""
    digest = hashlib.blake2b(canonical_prompt(prompt).encode(), digest_size=8, person=_PERSON).digest()
    return int.from_bytes(digest, "big") / 2.0**64


def check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"unknown prompt split {split!r}; the splits are {list(SPLITS)}")


def prompt_split(prompt: str) -> str:
    """The split that ``prompt`` belongs to."""
    h, upper = prompt_hash(prompt), 0.0
    for split in SPLITS:
        upper += SPLIT_FRACTIONS[split]
        if h < upper:
            return split
    return SPLITS[-1]  # h within rounding of 1


@dataclasses.dataclass(frozen=True)
class PromptOverlapReport:
    """Sizes of named prompt lists and the number of distinct prompts each pair shares."""

    counts: dict[str, int]  # prompts in each list
    distinct: dict[str, int]  # distinct prompts in each list
    overlaps: dict[tuple[str, str], int]  # distinct prompts in both lists of each pair

    @property
    def max_overlap(self) -> int:
        return max(self.overlaps.values(), default=0)

    def overlap(self, a: str, b: str) -> int:
        return self.overlaps[(a, b)] if (a, b) in self.overlaps else self.overlaps[(b, a)]

    def lines(self) -> list[str]:
        """One line per list and one per pair, e.g. ``"eval: 512 prompts (498 distinct)"`` and
        ``"overlap eval/sft: 0 prompts"``."""
        lines = [f"{name}: {n} prompts ({self.distinct[name]} distinct)" for name, n in self.counts.items()]
        lines += [f"overlap {a}/{b}: {n} prompts" for (a, b), n in self.overlaps.items()]
        return lines


def prompt_overlap_report(lists: Mapping[str, Sequence[str]]) -> PromptOverlapReport:
    """Counts and pairwise overlaps (distinct canonical prompts in common) of named prompt lists."""
    sets = {name: {canonical_prompt(p) for p in prompts} for name, prompts in lists.items()}
    return PromptOverlapReport(
        counts={name: len(prompts) for name, prompts in lists.items()},
        distinct={name: len(s) for name, s in sets.items()},
        overlaps={(a, b): len(sets[a] & sets[b]) for a, b in itertools.combinations(sets, 2)},
    )
