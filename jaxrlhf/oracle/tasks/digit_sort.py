"""Sort the digits of the prompt in ascending order: a dense, graded gold reward.

Prompt: k digits (``"3 1 4 1 5"``); optimal response: the same digits sorted (``"1 1 3 4 5"``), then eos.
With t = sorted(prompt digits), r = the response (m tokens; non-digit tokens never match) and
λ = ``length_penalty``:

    R* = max(−1, (LCS(r, t) − λ·|m − k|) / k)      for a response that emitted eos,
    R* = −1                                         for one that did not (or a prompt without digits).

LCS is the longest common subsequence, so R* gives partial credit for partially sorted or incomplete
answers. The unique optimum is r = t with R* = 1 (LCS = k needs t as a subsequence of r, and m = k then
forces r = t). Over-optimisation hazard: a proxy that learned "ascending runs are good" rewards long
ascending outputs such as ``0 1 2 … 9``, which contain t as a subsequence when the digits are distinct
but pay λ per extra token under R*.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jaxrlhf.oracle.base import Oracle, check_text_batch, check_token_batch, response_body, token_lookup
from jaxrlhf.oracle.task_tokenizer import EOS_ID, SPECIAL_TOKENS, build_task_tokenizer
from jaxrlhf.oracle.tasks.base import Task, as_generator, register_task

DIGITS = [str(d) for d in range(10)]


def longest_common_subsequence(a: list, b: list) -> int:
    """Length of the longest common subsequence of two lists (dynamic programme, O(len a · len b))."""
    row = [0] * (len(b) + 1)
    for x in a:
        prev_diag, row[0] = 0, 0
        for j, y in enumerate(b, start=1):
            prev_diag, row[j] = row[j], prev_diag + 1 if x == y else max(row[j], row[j - 1])
    return row[-1]


class DigitSortOracle(Oracle):
    """Gold reward of a sorting answer (formula in the module docstring). Jittable."""

    jittable = True

    def __init__(self, vocab: dict[str, int], length_penalty: float):
        if length_penalty < 0:
            raise ValueError(f"length_penalty must be >= 0, got {length_penalty}")
        self.name = "digit_sort"
        self.length_penalty = float(length_penalty)
        vocab_size = max(vocab.values()) + 1
        self.digit_of_token = np.full(vocab_size, -1, np.int32)
        for d in DIGITS:
            self.digit_of_token[vocab[d]] = int(d)

    def gold_value(self, k: int, lcs: int, length_gap: int) -> np.float32:
        """R* of a finished response from k, LCS and |m − k|; both forms read these very numbers."""
        if k == 0:
            return np.float32(-1.0)
        return np.float32(max(-1.0, (lcs - self.length_penalty * length_gap) / k))

    def _value_table(self, max_k: int, max_gap: int) -> np.ndarray:
        """``gold_value`` for every (k, lcs, gap) up to the bounds, in the same float64 arithmetic."""
        k, lcs, gap = np.ogrid[: max_k + 1, : max_k + 1, : max_gap + 1]
        with np.errstate(divide="ignore", invalid="ignore"):
            value = np.maximum(-1.0, (lcs - self.length_penalty * gap) / k)
        return np.where(k == 0, -1.0, value).astype(np.float32)

    @staticmethod
    def prompt_digits(prompt: str) -> list[int]:
        """The digits of a prompt, special tokens skipped; anything else is an error."""
        digits = []
        for i, w in enumerate(prompt.split()):
            if w in SPECIAL_TOKENS:
                continue
            if w not in DIGITS:
                raise ValueError(f"digit_sort prompt {prompt!r}: symbol {i} ({w!r}) is not a digit")
            digits.append(int(w))
        return digits

    def score_texts(self, prompts, responses, finished=None) -> np.ndarray:
        finished = check_text_batch(prompts, responses, finished)
        scores = []
        for prompt, response, done in zip(prompts, responses, finished):
            target = sorted(self.prompt_digits(prompt))
            answer = [int(w) if w in DIGITS else -1 for w in response.split()]
            lcs = longest_common_subsequence(answer, target)
            scores.append(self.gold_value(len(target), lcs, abs(len(answer) - len(target))) if done else -1.0)
        return np.array(scores, np.float32)

    def score_tokens(self, prompt_tokens, prompt_mask, response_tokens, response_mask) -> jax.Array:
        check_token_batch(prompt_tokens, prompt_mask, response_tokens, response_mask)
        n_prompt, n_response = np.shape(prompt_tokens)[1], np.shape(response_tokens)[1]
        # TARGET: the prompt's digits sorted; 10 pads the row and matches nothing.
        prompt_digits = token_lookup(self.digit_of_token, prompt_tokens, -1)
        is_digit = jnp.asarray(prompt_mask, bool) & (prompt_digits >= 0)
        k = is_digit.sum(axis=1)
        target = jnp.sort(jnp.where(is_digit, prompt_digits, 10), axis=1)  # [B, P]
        # LCS: one row of the DP table per response token, L[i] = max(L[i], L[i-1] + match, new[i-1]).
        length, finished = response_body(response_tokens, response_mask, EOS_ID)
        answer = token_lookup(self.digit_of_token, response_tokens, -1)  # [B, N], −1 for non-digits

        def add_token(row, inputs):
            token, active = inputs  # [B], [B]
            match = (target == token[:, None]).astype(row.dtype)
            candidate = jnp.maximum(row[:, 1:], row[:, :-1] + match)
            new = jax.lax.cummax(jnp.concatenate([row[:, :1], candidate], axis=1), axis=1)
            return jnp.where(active[:, None], new, row), None

        active = jnp.arange(n_response)[None, :] < length[:, None]
        row0 = jnp.zeros((target.shape[0], n_prompt + 1), jnp.int32)
        row, _ = jax.lax.scan(add_token, row0, (answer.T, active.T))
        lcs = jnp.take_along_axis(row, k[:, None], axis=1)[:, 0]
        # SCORE
        table = jnp.asarray(self._value_table(n_prompt, max(n_prompt, n_response)))
        score = table[k, lcs, jnp.abs(length - k)]
        return jnp.where(finished, score, -1.0).astype(jnp.float32)


@register_task
class DigitSortTask(Task):
    """Sort k random digits; behaviour = a sloppy sorter.

    Behaviour policy: with probability ``copy_prob`` it starts from the prompt's order, else from the
    sorted digits; then makes Poisson(``swap_rate``) random adjacent swaps, drops a digit with
    probability ``drop_prob`` and inserts a random digit with probability ``insert_prob``.
    """

    name = "digit_sort"

    def __init__(
        self,
        seed: int = 0,
        min_digits: int = 3,
        max_digits: int = 7,
        max_response_tokens: int = 12,
        length_penalty: float = 0.5,
        copy_prob: float = 0.3,
        swap_rate: float = 1.5,
        drop_prob: float = 0.25,
        insert_prob: float = 0.25,
    ):
        if not 1 <= min_digits <= max_digits <= 16:
            raise ValueError(f"need 1 <= min_digits <= max_digits <= 16, got {min_digits}, {max_digits}")
        if max_response_tokens < max_digits + 2:
            raise ValueError(
                f"max_response_tokens={max_response_tokens} must be >= max_digits + 2 = {max_digits + 2} "
                "(the answer, one inserted digit and eos)"
            )
        for arg, p in (("copy_prob", copy_prob), ("drop_prob", drop_prob), ("insert_prob", insert_prob)):
            if not 0.0 <= p <= 1.0:
                raise ValueError(f"{arg} must be a probability, got {p}")
        self.seed, self.min_digits, self.max_digits = seed, min_digits, max_digits
        self.copy_prob, self.swap_rate = copy_prob, swap_rate
        self.drop_prob, self.insert_prob = drop_prob, insert_prob
        self.tokenizer = build_task_tokenizer(DIGITS, model_max_length=max_digits + max_response_tokens)
        self.oracle = DigitSortOracle(self.tokenizer.get_vocab(), length_penalty)
        self.max_prompt_tokens = max_digits
        self.max_response_tokens = max_response_tokens

    def draw_prompts(self, rng, n: int) -> list[str]:
        rng = as_generator(rng)
        sizes = rng.integers(self.min_digits, self.max_digits + 1, size=n)
        return [" ".join(str(d) for d in rng.integers(0, 10, size=k)) for k in sizes]

    def prompt_space_size(self) -> int:
        return sum(10**k for k in range(self.min_digits, self.max_digits + 1))

    def _behaviour_answer(self, rng: np.random.Generator, digits: list[int]) -> list[int]:
        answer = list(digits) if rng.random() < self.copy_prob else sorted(digits)
        for _ in range(rng.poisson(self.swap_rate)):
            if len(answer) >= 2:
                i = int(rng.integers(len(answer) - 1))
                answer[i], answer[i + 1] = answer[i + 1], answer[i]
        if rng.random() < self.drop_prob and len(answer) > 1:
            del answer[int(rng.integers(len(answer)))]
        if rng.random() < self.insert_prob:
            answer.insert(int(rng.integers(len(answer) + 1)), int(rng.integers(10)))
        return answer

    def behaviour_response(self, rng, prompt: str) -> str:
        return " ".join(map(str, self._behaviour_answer(rng, self.oracle.prompt_digits(prompt))))

    def optimal_response(self, prompt: str) -> str:
        return " ".join(map(str, sorted(self.oracle.prompt_digits(prompt))))

    def describe(self) -> str:
        return (
            f"digit_sort: sort {self.min_digits}-{self.max_digits} random digits ascending "
            f"({self.prompt_space_size()} prompts); R* = "
            f"max(-1, (LCS(response, sorted) - {self.oracle.length_penalty}*|len gap|)/k), -1 without eos; "
            "optimum = the sorted digits (R* = 1)"
        )
