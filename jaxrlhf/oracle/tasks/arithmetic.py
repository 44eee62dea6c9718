"""Multi-digit arithmetic with an exactly checkable answer: a verifiable reward.

Prompt: ``"4 7 + 3 8 ="`` (operands' digits most significant first; operators ``+``, ``-``, ``*``);
response: the result's digits, most significant first (``"8 5"``) or, with ``answer_order="lsb"``, least
significant first (``"5 8"``, the order in which a carry is computed, easier for a small model), then eos.
Subtraction prompts have a ≥ b, so every answer is a non-negative integer.

Gold reward, t = the result's digits in the answer order, r = the response (m tokens before eos):

    exact (default):    R* = 1 if the response emitted eos and r = t, else 0;
    partial_credit:     R* = (number of places j with r's digit of 10^j = t's) / max(m, |t|), 0 without eos,

places aligned by place value (the units digit of r against the units digit of t, whatever the lengths).
R* = 1 exactly for the correct answer under either rule. The prompt space holds C² ordered operand pairs
per operator (C(C + 1)/2 for subtraction), C the count of numbers with ``min_digits``..``max_digits``
digits: 10 000 additions for 1–2 digits, a million for 1–3.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jaxrlhf.oracle.base import Oracle, check_text_batch, check_token_batch, response_body, token_lookup
from jaxrlhf.oracle.task_tokenizer import EOS_ID, SPECIAL_TOKENS, build_task_tokenizer
from jaxrlhf.oracle.tasks.base import Task, as_generator, register_task

DIGITS = [str(d) for d in range(10)]
OPERATORS = ("+", "-", "*")
EQUALS = "="
ANSWER_ORDERS = ("msb", "lsb")
_MAX_RESULT_DIGITS = 9  # int32 arithmetic in the array form: results below 10⁹
_SCORE_TABLE = 256  # partial credit for up to 255 response tokens (longer ones read as 255)


def _apply(op: str, a: int, b: int) -> int:
    return a + b if op == "+" else a - b if op == "-" else a * b


def result_digits(value: int, order: str) -> list[int]:
    """The digits of a non-negative integer, most (``"msb"``) or least (``"lsb"``) significant first."""
    digits = [int(c) for c in str(value)]
    return digits if order == "msb" else digits[::-1]


class ArithmeticOracle(Oracle):
    """Exact-match (or place-value partial-credit) gold reward of an arithmetic answer. Jittable."""

    jittable = True

    def __init__(self, vocab: dict[str, int], answer_order: str = "msb", partial_credit: bool = False):
        if answer_order not in ANSWER_ORDERS:
            raise ValueError(f"answer_order must be one of {ANSWER_ORDERS}, got {answer_order!r}")
        self.name = "arithmetic"
        self.answer_order, self.partial_credit = answer_order, bool(partial_credit)
        vocab_size = max(vocab.values()) + 1
        self.digit_of_token = np.full(vocab_size, -1, np.int32)
        for d in DIGITS:
            self.digit_of_token[vocab[d]] = int(d)
        self.operator_of_token = np.full(vocab_size, -1, np.int32)  # index into OPERATORS
        for i, op in enumerate(OPERATORS):
            self.operator_of_token[vocab[op]] = i
        self.equals_id = vocab[EQUALS]
        self.special_token = np.zeros(vocab_size, bool)
        for token in SPECIAL_TOKENS:
            self.special_token[vocab[token]] = True
        matches, length = np.ogrid[:_SCORE_TABLE, :_SCORE_TABLE]
        # R* from (matching places, max(m, |t|)), shared by both forms so that they agree to the bit
        self.score_table = np.where(length > 0, matches / np.maximum(length, 1), 0.0).astype(np.float32)

    def parse_prompt(self, prompt: str) -> tuple[int, str, int]:
        """(a, operator, b) of ``"a-digits op b-digits ="`` (special tokens skipped); a ValueError else."""
        words = [w for w in prompt.split() if w not in SPECIAL_TOKENS]
        ops = [i for i, w in enumerate(words) if w in OPERATORS]
        ok = (
            len(ops) == 1
            and 0 < ops[0] < len(words) - 2
            and words[-1] == EQUALS
            and all(w in DIGITS for i, w in enumerate(words[:-1]) if i != ops[0])
        )
        if not ok:
            raise ValueError(
                f"arithmetic prompt {prompt!r}: expected 'digits op digits =' with op in {OPERATORS}"
            )
        a, b = int("".join(words[: ops[0]])), int("".join(words[ops[0] + 1 : -1]))
        op = words[ops[0]]
        if op == "-" and a < b:
            raise ValueError(f"arithmetic prompt {prompt!r}: subtraction needs a >= b")
        if _apply(op, a, b) >= 10**_MAX_RESULT_DIGITS:
            raise ValueError(
                f"arithmetic prompt {prompt!r}: the result has more than {_MAX_RESULT_DIGITS} digits"
            )
        return a, op, b

    def target(self, prompt: str) -> list[int]:
        """The correct answer's digits in the answer order."""
        a, op, b = self.parse_prompt(prompt)
        return result_digits(_apply(op, a, b), self.answer_order)

    def _score(self, target: list[int], response: str, finished: bool) -> np.float32:
        if not finished:
            return np.float32(0.0)
        answer = [int(w) if w in DIGITS else -1 for w in response.split()]
        if not self.partial_credit:
            return np.float32(1.0 if answer == target else 0.0)
        if self.answer_order == "msb":  # align the units digits
            answer, target = answer[::-1], target[::-1]
        matches = sum(x == y for x, y in zip(answer, target))
        length = max(len(answer), len(target))
        return self.score_table[matches, min(length, self.score_table.shape[1] - 1)]

    def score_texts(self, prompts, responses, finished=None) -> np.ndarray:
        finished = check_text_batch(prompts, responses, finished)
        return np.array(
            [self._score(self.target(p), r, f) for p, r, f in zip(prompts, responses, finished)], np.float32
        )

    def score_tokens(self, prompt_tokens, prompt_mask, response_tokens, response_mask) -> jax.Array:
        """Array form; a prompt that does not parse scores 0 (the host form raises instead)."""
        check_token_batch(prompt_tokens, prompt_mask, response_tokens, response_mask)
        prompt_tokens, response_tokens = jnp.asarray(prompt_tokens), jnp.asarray(response_tokens)
        n_response = response_tokens.shape[1]
        pow10 = jnp.asarray([10**k for k in range(_MAX_RESULT_DIGITS + 1)], jnp.int32)
        # PROMPT: a-digits, one operator, b-digits, "=" as the last real token.
        real = jnp.asarray(prompt_mask, bool) & ~token_lookup(self.special_token, prompt_tokens, True)
        digit = token_lookup(self.digit_of_token, prompt_tokens, -1)
        op_index = token_lookup(self.operator_of_token, prompt_tokens, -1)
        is_op = real & (op_index >= 0)
        is_equals = real & (prompt_tokens == self.equals_id)
        is_digit = real & (digit >= 0)
        after_op = jnp.cumsum(is_op, axis=1) > 0  # at or after the operator
        in_a, in_b = is_digit & ~after_op, is_digit & after_op
        n_a, n_b = in_a.sum(axis=1), in_b.sum(axis=1)
        last_real = real & (jnp.cumsum(real[:, ::-1], axis=1)[:, ::-1] == 1)
        well_formed = (
            (is_op.sum(axis=1) == 1)
            & (is_equals.sum(axis=1) == 1)
            & jnp.all(~is_equals | last_real, axis=1)
            & jnp.all(~real | is_digit | is_op | is_equals, axis=1)
            & (n_a > 0) & (n_b > 0)
            & (n_a <= _MAX_RESULT_DIGITS) & (n_b <= _MAX_RESULT_DIGITS)
        )

        def value(in_operand, count):
            place = count[:, None] - jnp.cumsum(in_operand, axis=1)  # digits after this one
            return jnp.sum(jnp.where(in_operand, digit * pow10[jnp.clip(place, 0, _MAX_RESULT_DIGITS)], 0), 1)

        a, b = value(in_a, n_a), value(in_b, n_b)
        op = jnp.max(jnp.where(is_op, op_index, -1), axis=1)
        limit = 10**_MAX_RESULT_DIGITS - 1
        product_fits = (b == 0) | (a <= limit // jnp.maximum(b, 1))  # a·b would overflow int32 otherwise
        fits = jnp.select([op == 0, op == 1], [a + b <= limit, a >= b], product_fits)
        well_formed &= fits
        result = jnp.where(well_formed, jnp.select([op == 0, op == 1], [a + b, a - b], a * b), 0)
        result_length = 1 + jnp.sum(result[:, None] >= pow10[None, 1:], axis=1)  # [B]
        # RESPONSE: digits before eos, compared place by place.
        length, finished = response_body(response_tokens, response_mask, EOS_ID)
        answer = token_lookup(self.digit_of_token, response_tokens, -1)  # [B, N], −1 for non-digits
        position = jnp.arange(n_response)[None, :]
        place = length[:, None] - 1 - position if self.answer_order == "msb" else jnp.broadcast_to(
            position, answer.shape
        )
        target = (result[:, None] // pow10[jnp.clip(place, 0, _MAX_RESULT_DIGITS)]) % 10
        match = (position < length[:, None]) & (place < result_length[:, None]) & (answer == target)
        matches = match.sum(axis=1)
        longest = jnp.maximum(length, result_length)
        if self.partial_credit:
            table = jnp.asarray(self.score_table)
            score = table[jnp.minimum(matches, table.shape[0] - 1), jnp.minimum(longest, table.shape[1] - 1)]
        else:
            score = ((matches == result_length) & (length == result_length)).astype(jnp.float32)
        return jnp.where(finished & well_formed, score, 0.0).astype(jnp.float32)


@register_task
class ArithmeticTask(Task):
    """``a op b =`` with operands of ``min_digits``..``max_digits`` digits; behaviour = a careless
    calculator.

    Behaviour policy: the correct answer, except with probability ``error_rate`` one mistake, chosen
    uniformly among: a forgotten carry or borrow (the digit-wise sum or difference mod 10; for ``*``
    the last partial product only), one digit replaced by another, one digit dropped, one digit
    inserted. Every mistake gives a wrong answer, so the demonstrations' mean gold is 1 − ``error_rate``
    under the exact-match reward.
    """

    name = "arithmetic"

    def __init__(
        self,
        seed: int = 0,
        operations: tuple[str, ...] | list[str] = ("+",),
        min_digits: int = 1,
        max_digits: int = 2,
        answer_order: str = "msb",
        partial_credit: bool = False,
        error_rate: float = 0.3,
    ):
        operations = tuple(operations)
        if not operations or any(op not in OPERATORS for op in operations) or len(set(operations)) < len(
            operations
        ):
            raise ValueError(f"operations must be distinct operators from {OPERATORS}, got {operations}")
        widest = 2 * max_digits if "*" in operations else max_digits + ("+" in operations)
        if not 1 <= min_digits <= max_digits or widest > _MAX_RESULT_DIGITS:
            raise ValueError(
                f"need 1 <= min_digits <= max_digits and results of at most {_MAX_RESULT_DIGITS} digits; got "
                f"min_digits={min_digits}, max_digits={max_digits} with operations {operations}"
            )
        if not 0.0 <= error_rate <= 1.0:
            raise ValueError(f"error_rate must be a probability, got {error_rate}")
        self.seed, self.operations = seed, operations
        self.min_digits, self.max_digits, self.error_rate = min_digits, max_digits, error_rate
        self.tokenizer = build_task_tokenizer(
            [*DIGITS, *OPERATORS, EQUALS], model_max_length=2 * max_digits + 2 + widest + 2
        )
        self.oracle = ArithmeticOracle(self.tokenizer.get_vocab(), answer_order, partial_credit)
        self.answer_order = answer_order
        self.max_prompt_tokens = 2 * max_digits + 2
        self.max_response_tokens = widest + 2  # one inserted digit and eos
        self._low = 0 if min_digits == 1 else 10 ** (min_digits - 1)
        self._high = 10**max_digits - 1

    def prompt_space_size(self) -> int:
        count = self._high - self._low + 1
        return sum(count * (count + 1) // 2 if op == "-" else count * count for op in self.operations)

    def _operand(self, rng: np.random.Generator) -> int:
        k = int(rng.integers(self.min_digits, self.max_digits + 1))
        return int(rng.integers(0 if k == 1 else 10 ** (k - 1), 10**k))

    def draw_prompts(self, rng, n: int) -> list[str]:
        rng = as_generator(rng)
        prompts = []
        for _ in range(n):
            op = self.operations[int(rng.integers(len(self.operations)))]
            a, b = self._operand(rng), self._operand(rng)
            if op == "-" and a < b:
                a, b = b, a
            prompts.append(f"{' '.join(str(a))} {op} {' '.join(str(b))} =")
        return prompts

    def _mistake(self, rng: np.random.Generator, a: int, op: str, b: int) -> list[int]:
        """A wrong answer's digits, most significant first."""
        correct = [int(c) for c in str(_apply(op, a, b))]
        kind = int(rng.integers(4))
        if kind == 0:  # forgotten carry / borrow
            da, db = str(a).zfill(len(str(max(a, b)))), str(b).zfill(len(str(max(a, b))))
            if op == "+":
                wrong = int("".join(str((int(x) + int(y)) % 10) for x, y in zip(da, db)))
            elif op == "-":
                wrong = int("".join(str((int(x) - int(y)) % 10) for x, y in zip(da, db)))
            else:
                wrong = a * b - a * (b % 10) + (a * (b % 10)) % 10  # the units partial product's carry lost
            if wrong != _apply(op, a, b):
                return [int(c) for c in str(wrong)]
            kind = 1
        answer = list(correct)
        if kind == 1:  # one digit replaced
            i = int(rng.integers(len(answer)))
            answer[i] = (answer[i] + int(rng.integers(1, 10))) % 10
        elif kind == 2 and len(answer) > 1:  # one digit dropped
            del answer[int(rng.integers(len(answer)))]
        else:  # one digit inserted
            answer.insert(int(rng.integers(len(answer) + 1)), int(rng.integers(10)))
        return answer

    def behaviour_response(self, rng, prompt: str) -> str:
        a, op, b = self.oracle.parse_prompt(prompt)
        if rng.random() < self.error_rate:
            digits = self._mistake(rng, a, op, b)
        else:
            digits = [int(c) for c in str(_apply(op, a, b))]
        if self.answer_order == "lsb":
            digits = digits[::-1]
        return " ".join(map(str, digits))

    def optimal_response(self, prompt: str) -> str:
        return " ".join(map(str, self.oracle.target(prompt)))

    def describe(self) -> str:
        ops = " ".join(self.operations)
        order = "most" if self.answer_order == "msb" else "least"
        reward = (
            "place-value partial credit" if self.oracle.partial_credit else "1 for the exact answer, else 0"
        )
        return (
            f"arithmetic: a op b (op in {ops}), operands of {self.min_digits}-{self.max_digits} digits "
            f"({self.prompt_space_size()} prompts); answer digits {order} significant first + eos; "
            f"R* = {reward} (0 without eos)"
        )
