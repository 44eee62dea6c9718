"""arithmetic: hand-computed rewards, the exact optimum, host/array agreement, behaviour quality."""

import jax
import numpy as np
import pytest

from jaxrlhf.oracle import EOS_ID, decode_batch, get_task
from jaxrlhf.oracle.tasks.arithmetic import result_digits

TASK = get_task("arithmetic", seed=0)  # a + b, operands of 1–2 digits, exact match
MIXED = get_task("arithmetic", operations=("+", "-", "*"), max_digits=3, partial_credit=True)
LSB = get_task("arithmetic", operations=("+", "-"), answer_order="lsb", partial_credit=True)
TASKS = {"exact": TASK, "mixed": MIXED, "lsb": LSB}


def test_hand_computed_rewards():
    prompts = ["4 7 + 3 8 ="] * 6
    responses = ["8 5", "8 4", "5 8", "0 8 5", "", "8 5 <pad>"]
    np.testing.assert_array_equal(TASK.oracle.score_texts(prompts, responses), [1, 0, 0, 0, 0, 0])
    np.testing.assert_array_equal(TASK.oracle.score_texts(prompts[:1], ["8 5"], finished=[False]), [0.0])
    assert TASK.optimal_response("<bos> 4 7 + 3 8 =") == "8 5"
    # partial credit, places aligned by value: 952 − 87 = 865
    cases = {"8 6 5": 1.0, "8 6 4": 2 / 3, "6 5": 2 / 3, "1 8 6 5": 3 / 4, "5 6 8": 1 / 3, "": 0.0}
    scores = MIXED.oracle.score_texts(["9 5 2 - 8 7 ="] * len(cases), list(cases))
    np.testing.assert_allclose(scores, np.float32(list(cases.values())), rtol=0, atol=0)
    assert MIXED.optimal_response("1 2 * 3 4 =") == "4 0 8"
    # least significant digit first: 47 + 38 = 85 is written "5 8"; "5" alone has the units digit right
    np.testing.assert_allclose(LSB.oracle.score_texts(["4 7 + 3 8 ="] * 3, ["5 8", "5", "8 5"]), [1, 0.5, 0])
    assert result_digits(1203, "lsb") == [3, 0, 2, 1] and result_digits(0, "msb") == [0]


def test_the_correct_answer_is_the_unique_optimum():
    """Every digit string of up to 3 tokens, scored by the jitted array form: only the answer scores 1."""
    tok, prompt = MIXED.tokenizer, "9 + 4 ="
    candidates = [()] + [tuple(map(int, f"{v:0{k}d}")) for k in (1, 2, 3) for v in range(10**k)]
    prompt_ids = np.array(tok(prompt, add_special_tokens=False)["input_ids"], np.int32)
    prompt_tokens = np.tile(prompt_ids, (len(candidates), 1))
    response_tokens = np.zeros((len(candidates), 4), np.int32)
    response_mask = np.zeros_like(response_tokens, bool)
    for b, digits in enumerate(candidates):
        ids = [tok.convert_tokens_to_ids(str(d)) for d in digits] + [EOS_ID]
        response_tokens[b, : len(ids)], response_mask[b, : len(ids)] = ids, True
    for task in (TASK, MIXED):
        oracle = task.oracle
        scores = np.asarray(jax.jit(oracle.score_tokens)(
            prompt_tokens, np.ones_like(prompt_tokens, bool), response_tokens, response_mask))
        assert [candidates[i] for i in np.flatnonzero(scores == 1.0)] == [(1, 3)]
        assert scores.min() >= 0.0


# eager once (op by op is slow on a CPU), jitted for every variant
@pytest.mark.parametrize(("name", "jit"), [("exact", False), ("exact", True), ("mixed", True), ("lsb", True)])
def test_host_and_array_forms_agree(name, jit, encode, random_response_arrays):
    task = TASKS[name]
    score = jax.jit(task.oracle.score_tokens) if jit else task.oracle.score_tokens
    rng = np.random.default_rng(1)
    batch, p_len, n_len = 128, task.max_prompt_tokens + 1, task.max_response_tokens
    prompts = task.sample_prompts(rng, batch)
    digit_ids = [task.tokenizer.convert_tokens_to_ids(str(d)) for d in range(10)]
    # random responses: digits mostly, special tokens, operators and ids past the vocabulary mixed in
    token_ids = [0, 1, 3, 14, 15, 18, 63, *digit_ids * 4]
    pt, pm, _, _ = encode(task.tokenizer, prompts, [""] * batch, [False] * batch, p_len, n_len,
                          bos_rows=range(0, batch, 3))
    rt, rm = random_response_arrays(rng, batch, n_len, token_ids, EOS_ID)
    arrays = (pt, pm, rt, rm)
    host = task.oracle.score_texts(*decode_batch(task.tokenizer, *arrays))
    np.testing.assert_array_equal(score(*arrays), host)
    # near-correct answers: the answer with a few random edits, finished or not
    responses = []
    for p in prompts:
        answer = task.optimal_response(p).split()
        for _ in range(rng.integers(0, 3)):
            i = int(rng.integers(len(answer) + 1))
            answer[i:i + int(rng.integers(0, 2))] = [str(rng.integers(10))]
        responses.append(" ".join(answer[: n_len - 1]))
    finished = list(rng.random(batch) < 0.85)
    arrays = encode(task.tokenizer, prompts, responses, finished, p_len, n_len)
    host = task.oracle.score_texts(prompts, responses, finished)
    np.testing.assert_array_equal(score(*arrays), host)
    assert 0.2 < (host == 1.0).mean() < 0.9  # both exact answers and wrong ones were checked
    # demonstrations
    demos = task.demonstrations(2, batch)
    prompts, completions = [d["prompt"] for d in demos], [d["completion"] for d in demos]
    arrays = encode(task.tokenizer, prompts, completions, [True] * batch, p_len, n_len)
    np.testing.assert_array_equal(score(*arrays), task.oracle.score_texts(prompts, completions))
    optimal = np.asarray(task.is_optimal_tokens(*arrays))
    np.testing.assert_array_equal(optimal, [task.is_optimal(p, c) for p, c in zip(prompts, completions)])


def test_malformed_prompts_score_zero_in_the_array_form(encode):
    tok = TASK.tokenizer
    bad = ["4 7 + 3 8", "+ 3 8 =", "4 7 + =", "4 7 + 3 + 8 =", "4 = 7 + 3 =", "3 - 4 ="]
    arrays = encode(tok, bad, ["8 5"] * len(bad), [True] * len(bad), 8, 4)
    np.testing.assert_array_equal(jax.jit(MIXED.oracle.score_tokens)(*arrays), np.zeros(len(bad)))
    for prompt in bad:
        with pytest.raises(ValueError, match="arithmetic prompt"):
            MIXED.oracle.score_texts([prompt], ["1"])
    big = get_task("arithmetic", operations=("*",), max_digits=4)
    with pytest.raises(ValueError, match="more than 9 digits"):
        big.oracle.score_texts(["9 9 9 9 9 * 9 9 9 9 9 ="], ["1"])
    arrays = encode(tok, ["9 9 9 9 9 * 9 9 9 9 9 ="], ["1"], [True], 12, 2)
    assert float(jax.jit(big.oracle.score_tokens)(*arrays)[0]) == 0.0  # the product would overflow int32


@pytest.mark.parametrize("error_rate", [0.0, 0.3, 0.6])
def test_demonstrations_err_at_the_configured_rate(error_rate):
    task = get_task("arithmetic", operations=("+", "-", "*"), max_digits=2, error_rate=error_rate)
    demos = task.demonstrations(0, 3000)
    assert demos == task.demonstrations(0, 3000)
    prompts, completions = [d["prompt"] for d in demos], [d["completion"] for d in demos]
    gold = task.oracle.score_texts(prompts, completions)
    # each mistake gives a wrong answer: mean gold = 1 − error_rate up to the binomial error of 3000 draws
    assert abs(gold.mean() - (1 - error_rate)) < 3 * np.sqrt(0.25 / 3000)
    for p, c in zip(prompts, completions):
        assert 1 <= len(c.split()) <= task.max_response_tokens - 1
        assert all(w in "0123456789" for w in c.split())
        assert len(p.split()) <= task.max_prompt_tokens


def test_prompt_space_and_bad_arguments():
    assert TASK.prompt_space_size() == 100 * 100
    two_digit_subtraction = get_task("arithmetic", operations=("-",), min_digits=2, max_digits=2)
    assert two_digit_subtraction.prompt_space_size() == 90 * 91 // 2  # a >= b
    prompts = TASK.sample_prompts(0, 5000)
    assert len(set(prompts)) > 2000  # thousands of distinct prompts
    with pytest.raises(ValueError, match="operations must be distinct operators"):
        get_task("arithmetic", operations=("+", "/"))
    with pytest.raises(ValueError, match="results of at most 9 digits"):
        get_task("arithmetic", operations=("*",), max_digits=5)
    with pytest.raises(ValueError, match="answer_order must be one of"):
        get_task("arithmetic", answer_order="middle")
    assert TASK.describe().startswith("arithmetic: a op b (op in +), operands of 1-2 digits (10000 prompts)")
