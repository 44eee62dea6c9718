"""digit_sort: hand-computed rewards, LCS, exact optimum, host/array agreement, behaviour quality."""

import itertools

import jax
import numpy as np
import pytest

from jaxrlhf.oracle import EOS_ID, decode_batch, get_task
from jaxrlhf.oracle.tasks.digit_sort import longest_common_subsequence

TASK = get_task("digit_sort", seed=0)
ORACLE = TASK.oracle
P, N = TASK.max_prompt_tokens + 1, TASK.max_response_tokens  # room for an optional <bos>
SCORE_JIT = jax.jit(ORACLE.score_tokens)


def brute_force_lcs(a, b):
    """Longest common subsequence by trying every subsequence of ``a`` (tiny inputs only)."""
    best = 0
    for k in range(len(a) + 1):
        for sub in itertools.combinations(a, k):
            it = iter(b)
            if all(x in it for x in sub):
                best = max(best, k)
    return best


def test_longest_common_subsequence():
    assert longest_common_subsequence([1, 3, 2], [1, 2, 3]) == 2
    assert longest_common_subsequence([], [1]) == 0
    rng = np.random.default_rng(0)
    for _ in range(200):
        a, b = rng.integers(0, 4, size=rng.integers(0, 7)), rng.integers(0, 4, size=rng.integers(0, 7))
        assert longest_common_subsequence(list(a), list(b)) == brute_force_lcs(list(a), list(b))


def test_hand_computed_rewards():
    cases = {
        "1 2 3": 1.0,
        "1 3 2": 2 / 3,  # LCS 2
        "1 2": (2 - 0.5) / 3,  # one missing
        "1 2 3 3": (3 - 0.5) / 3,  # one extra
        "3 2 1": 1 / 3,
        "0 1 2 3 4 5 6 7 8 9": (3 - 0.5 * 7) / 3,  # the ascending exploit
        "": -0.5,  # (0 - 0.5·3)/3
        "9 9 9 9 9 9 9 9 9": -1.0,  # (0 - 0.5·6)/3 clipped at −1
        "1 <unk> 3": 2 / 3,
    }
    texts = list(cases)
    scores = ORACLE.score_texts(["3 1 2"] * len(texts), texts)
    np.testing.assert_allclose(scores, np.float32(list(cases.values())), rtol=0, atol=1e-7)
    np.testing.assert_array_equal(ORACLE.score_texts(["3 1 2"], ["1 2 3"], finished=[False]), [-1.0])
    assert ORACLE.score_texts(["<bos> 5 5 0"], ["0 5 5"])[0] == 1.0
    assert TASK.optimal_response("5 0 5 1") == "0 1 5 5"
    assert TASK.is_optimal("5 0 5 1", "0 1 5 5") and not TASK.is_optimal("5 0 5 1", "0 1 5")


def test_optimum_is_the_sorted_prompt():
    """Every digit sequence of up to 4 tokens scored by the jitted array form: only the sorted one gets 1."""
    prompt = "2 0 2"
    seqs = [q for k in range(5) for q in itertools.product(range(10), repeat=k)]
    tok = TASK.tokenizer
    prompt_ids = tok(prompt, add_special_tokens=False)["input_ids"]
    prompt_tokens = np.tile(np.array(prompt_ids, np.int32), (len(seqs), 1))
    response_tokens = np.zeros((len(seqs), 5), np.int32)
    response_mask = np.zeros_like(response_tokens, bool)
    for b, q in enumerate(seqs):
        ids = [tok.convert_tokens_to_ids(str(x)) for x in q] + [EOS_ID]
        response_tokens[b, : len(ids)], response_mask[b, : len(ids)] = ids, True
    scores = np.asarray(
        jax.jit(ORACLE.score_tokens)(
            prompt_tokens, np.ones_like(prompt_tokens, bool), response_tokens, response_mask
        )
    )
    best = np.flatnonzero(scores == scores.max())
    assert scores.max() == 1.0 and [seqs[i] for i in best] == [(0, 2, 2)]
    assert scores.min() >= -1.0


@pytest.mark.parametrize("jit", [False, True])
def test_host_and_array_forms_agree(jit, encode, random_response_arrays):
    score = SCORE_JIT if jit else ORACLE.score_tokens
    rng = np.random.default_rng(1)
    batch = 96
    prompts = TASK.sample_prompts(rng, batch)
    pt, pm, _, _ = encode(
        TASK.tokenizer, prompts, [""] * batch, [False] * batch, P, N, bos_rows=range(0, batch, 3)
    )
    # random tokens: digits mostly, with special tokens mixed in
    token_ids = [0, 1, 3, 14, 63] + list(range(4, 14)) * 4  # 14 and 63 lie past the vocabulary
    rt, rm = random_response_arrays(rng, batch, N, token_ids, EOS_ID)
    pt[1, -1] = 63  # an unknown prompt id reads as <unk> and is skipped
    arrays = (pt, pm, rt, rm)
    np.testing.assert_array_equal(score(*arrays), ORACLE.score_texts(*decode_batch(TASK.tokenizer, *arrays)))
    # near-optimal answers: the sorted digits with a few random edits, finished or not
    responses = []
    for p in prompts:
        answer = sorted(p.split())
        for _ in range(rng.integers(0, 3)):
            answer.insert(int(rng.integers(len(answer) + 1)), str(rng.integers(10)))
        responses.append(" ".join(answer[: N - 1]))
    finished = list(rng.random(batch) < 0.8)
    arrays = encode(TASK.tokenizer, prompts, responses, finished, P, N)
    host = ORACLE.score_texts(prompts, responses, finished)
    np.testing.assert_array_equal(score(*arrays), host)
    # demonstrations
    demos = TASK.demonstrations(2, batch)
    prompts, completions = [d["prompt"] for d in demos], [d["completion"] for d in demos]
    arrays = encode(TASK.tokenizer, prompts, completions, [True] * batch, P, N)
    np.testing.assert_array_equal(score(*arrays), ORACLE.score_texts(prompts, completions))
    optimal = np.asarray(TASK.is_optimal_tokens(*arrays))
    np.testing.assert_array_equal(optimal, [TASK.is_optimal(p, c) for p, c in zip(prompts, completions)])


def test_demonstrations_are_parseable_and_mediocre():
    demos = TASK.demonstrations(0, 2000)
    assert demos == TASK.demonstrations(0, 2000)
    prompts, completions = [d["prompt"] for d in demos], [d["completion"] for d in demos]
    for p, c in zip(prompts, completions):
        assert TASK.min_digits <= len(p.split()) <= TASK.max_prompt_tokens
        assert 1 <= len(c.split()) <= TASK.max_response_tokens - 1
        assert all(w.isdigit() and len(w) == 1 for w in (p + " " + c).split())
    gold = ORACLE.score_texts(prompts, completions)
    assert 0.55 <= gold.mean() <= 0.85
    assert gold.std() > 0.15
    assert 0.05 <= (gold == 1.0).mean() <= 0.4
    # the ascending exploit scores below the behaviour policy on average
    exploit = ORACLE.score_texts(prompts, ["0 1 2 3 4 5 6 7 8 9"] * len(prompts))
    assert exploit.mean() < gold.mean()


def test_bad_inputs_and_describe():
    with pytest.raises(ValueError, match="symbol 1 \\('x'\\) is not a digit"):
        ORACLE.score_texts(["1 x"], ["1"])
    with pytest.raises(ValueError, match="max_response_tokens=5 must be >= max_digits \\+ 2"):
        get_task("digit_sort", max_response_tokens=5)
    with pytest.raises(ValueError, match="length_penalty must be >= 0"):
        get_task("digit_sort", length_penalty=-1.0)
    assert TASK.describe().startswith("digit_sort: sort 3-7 random digits")
