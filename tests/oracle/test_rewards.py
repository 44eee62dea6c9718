"""The one reward plug-in point: built-in rewards, token-array and text functions, task oracles and import
paths, all resolved by ``get_reward`` into oracles with both forms; rollouts scored with and without jit."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxrlhf.oracle import (
    BatchFunctionOracle,
    FunctionOracle,
    Oracle,
    RewardFunctionError,
    RewardSpecError,
    TokenFunctionOracle,
    build_task_tokenizer,
    get_reward,
    get_task,
    register_reward,
    registered_rewards,
    reward_form,
    rollout_reward_inputs,
)
from jaxrlhf.rollout.generate import Rollout

WITH_AND_WITHOUT_JIT = pytest.mark.parametrize("transform", [lambda f: f, jax.jit], ids=["eager", "jit"])
TOK = build_task_tokenizer(["a", "b", "c"])  # a=4, b=5, c=6; eos=2


def make_rollout():
    prompt = np.array([[0, 9, 8], [7, 7, 7], [0, 0, 6]], np.int32)
    prompt_mask = (np.arange(3)[None] >= np.array([[1], [0], [2]])).astype(np.int32)
    response = np.array([[5, 5, 2, 0], [5, 1, 5, 3], [4, 0, 0, 0]], np.int32)
    response_mask = np.array([[1, 1, 1, 0], [1, 1, 1, 1], [1, 0, 0, 0]], np.int32)
    return Rollout(
        sequences=jnp.asarray(np.concatenate([prompt, response], 1)),
        sequence_mask=jnp.asarray(np.concatenate([prompt_mask, response_mask], 1)),
        response_tokens=jnp.asarray(response), response_mask=jnp.asarray(response_mask),
        logprobs=jnp.zeros((3, 4)), stopped=jnp.array([True, False, True]))


@WITH_AND_WITHOUT_JIT
def test_builtin_rewards(transform):
    rollout = make_rollout()
    count = get_reward("token_count:5")
    assert count.jittable and isinstance(count, TokenFunctionOracle)
    np.testing.assert_allclose(transform(count.score_rollout)(rollout), [2 / 3, 2 / 4, 0.0], rtol=1e-6)
    np.testing.assert_allclose(transform(get_reward("length").score_rollout)(rollout), [3 / 4, 1, 1 / 4])
    prompt, prompt_mask, response, _ = rollout_reward_inputs(rollout)
    np.testing.assert_array_equal(prompt[1], [7, 7, 7])
    np.testing.assert_array_equal(prompt_mask[2], [0, 0, 1])
    np.testing.assert_array_equal(response[0], [5, 5, 2, 0])
    builtins = {"length", "token_count:<token id>", "task:<task name>[,key=value...]"}
    assert builtins <= set(registered_rewards())


def prompt_length_reward(prompt_tokens, prompt_mask, response_tokens, response_mask):
    """A host (NumPy) token reward: the prompt's length."""
    assert isinstance(prompt_mask, np.ndarray)
    return prompt_mask.sum(1).astype(np.float64)


def count_b(prompt: str, response: str) -> float:
    return float(response.split().count("b"))


def test_token_and_text_functions_are_oracles_with_both_forms():
    assert reward_form(prompt_length_reward) == "tokens" and reward_form(count_b) == "text"
    register_reward("test_prompt_length", prompt_length_reward, overwrite=True)
    tokens = get_reward("test_prompt_length", tokenizer=TOK)
    assert isinstance(tokens, TokenFunctionOracle) and not tokens.jittable
    scores = tokens.score_rollout(make_rollout())
    assert scores.dtype == np.float32
    np.testing.assert_array_equal(scores, [2, 3, 1])
    # The text form encodes with the tokenizer: prompts of 1 and 3 symbols.
    np.testing.assert_array_equal(tokens.score_texts(["a", "a b c"], ["b", ""]), [1, 3])
    with pytest.raises(TypeError, match=r"cannot be traced by jax\.jit"):
        jax.jit(tokens.score_rollout)(make_rollout())
    # A NaN from a host token function is named like the text form's (it reached the update as a
    # "non-finite loss" that never named the reward).
    register_reward("test_nan_row", lambda pt, pm, rt, rm: np.where(pm.sum(1) == 3, np.nan, 1.0),
                    overwrite=True)
    with pytest.raises(RewardFunctionError, match=r"'test_nan_row' returned nan for batch row 1 \(of 3\)"):
        get_reward("test_nan_row", tokenizer=TOK).score_rollout(make_rollout())

    register_reward("test_count_b", count_b, overwrite=True)
    text = get_reward("test_count_b", tokenizer=TOK)
    assert isinstance(text, FunctionOracle) and not text.jittable
    np.testing.assert_array_equal(text.score_texts(["a"], ["b b c"]), [2.0])
    # The array form decodes: row 0 is "b b" then eos, row 2 is "a".
    np.testing.assert_array_equal(text.score_rollout(make_rollout())[[0, 2]], [2.0, 0.0])


def test_task_oracles_by_name_and_import_paths():
    task = get_task("random_walk", seed=3)
    oracle = get_reward("task:random_walk,seed=3")
    assert oracle.jittable and type(oracle) is type(task.oracle)
    prompt = task.sample_prompts(0, 1)[0]
    assert oracle.score_texts([prompt], [task.optimal_response(prompt)])[0] == task.optimal_score
    by_path = get_reward("jaxrlhf.oracle.token_rewards:length_reward")
    assert not by_path.jittable  # no `jittable` attribute: a host function
    np.testing.assert_allclose(by_path.score_rollout(make_rollout()), [3 / 4, 1, 1 / 4])
    assert get_reward("jaxrlhf.oracle.token_rewards.length_reward").fn.__wrapped__ is by_path.fn.__wrapped__
    instance = get_task("digit_sort").oracle
    register_reward("test_digit_sort", instance, overwrite=True)
    assert get_reward("test_digit_sort") is instance and isinstance(instance, Oracle)


@pytest.mark.parametrize("spec, message", [
    ("nope", "unknown reward 'nope'; registered: .*or an import path"),
    ("token_count:x", "token_count:x.*integer token id"),
    ("task:no_such_task", "unknown task 'no_such_task'"),
    ("task:random_walk,seed", "expected key=value"),
    ("jaxrlhf.oracle.token_rewards:missing", "has no attribute 'missing'"),
])
def test_bad_specs_are_spec_errors(spec, message):
    with pytest.raises(RewardSpecError, match=message):
        get_reward(spec)


def test_registration_errors_and_shape_checks():
    with pytest.raises(ValueError, match="already registered"):
        register_reward("length", prompt_length_reward)
    with pytest.raises(ValueError, match="contain no ':'"):
        register_reward("a:b", count_b)
    with pytest.raises(RewardSpecError, match="takes 3 required arguments"):
        register_reward("test_three", lambda a, b, c: 0.0)
    register_reward("test_bad_shape", lambda p, pm, r, rm: np.zeros(2), overwrite=True)
    with pytest.raises(ValueError, match=r"returned shape \(2,\), expected \(3,\)"):
        get_reward("test_bad_shape").score_rollout(make_rollout())


# ------------------------------------------------------------------------------------ TRL's signature


def exact_answer(prompts, completions, answer, **kwargs):
    """A reward written for TRL's GRPOTrainer: the dataset's `answer` column arrives as a keyword."""
    return [1.0 if c.strip() == a else 0.0 for c, a in zip(completions, answer)]


def test_trl_reward_functions_get_the_columns_as_keywords():
    assert reward_form(exact_answer) == "batch"
    oracle = get_reward("tests.oracle.test_rewards:exact_answer", tokenizer=TOK)
    assert isinstance(oracle, BatchFunctionOracle) and not oracle.jittable
    scores = oracle.score_batch(["2+2=", "3+3="], [" 4", "7"], {"answer": ["4", "6"], "level": [1, 2]})
    np.testing.assert_array_equal(scores, [1.0, 0.0])
    assert scores.dtype == np.float32
    # A function naming only some keywords gets only those; a conversational prompt gets its completion
    # as one assistant message (TRL's convention); None is "does not apply" (NaN).
    seen = {}

    def conversational(completions, prompts):
        seen.update(prompts=prompts, completions=completions)
        return [None, 0.5]

    chat = BatchFunctionOracle(conversational)
    prompts = [[{"role": "user", "content": "hi"}], "plain"]
    out = chat.score_batch(prompts, ["yo", "ok"], {"answer": ["a", "b"]}, completion_ids=[[5], [6]])
    assert np.isnan(out[0]) and out[1] == 0.5
    assert seen["completions"] == [[{"role": "assistant", "content": "yo"}], "ok"]
    # A required column the data lacks is one error naming it and the columns there are.
    with pytest.raises(RewardFunctionError, match=r"needs the column 'answer'.*its columns: level"):
        oracle.score_batch(["q"], ["a"], {"level": [1]})
    # Without columns (the demo's gold reward, texts decoded from tokens) a function needing none works.
    np.testing.assert_array_equal(chat.score_texts(["a", "b"], ["x", "y"])[1:], [0.5])
    assert oracle.required_columns == ("answer",) and chat.required_columns == ()


def test_a_prompt_record_without_a_needed_column_is_named_before_training():
    """Checked over every record up front: at run time a record without the column reached the function
    as None when it was sampled (an AttributeError in the user's code), or silently never."""
    from jaxrlhf.data import DataError
    from jaxrlhf.data.tokenize import PromptExample
    from jaxrlhf.train.reward_functions import check_prompt_columns
    from jaxrlhf.train.run_config import RewardSection

    examples = [PromptExample(np.zeros(2, np.int32), f"p.jsonl:{i + 1}", {"prompt": "q", "answer": "4"})
                for i in range(3)]
    section = RewardSection(function="tests.oracle.test_rewards:exact_answer")
    check_prompt_columns(section, TOK, examples)  # every record has it
    examples[1] = PromptExample(np.zeros(2, np.int32), "p.jsonl:2", {"prompt": "q"})
    with pytest.raises(DataError, match=r"^p\.jsonl:2: reward 'tests\.oracle\.test_rewards:exact_answer' "
                                        r"needs the column 'answer', which this record lacks"):
        check_prompt_columns(section, TOK, examples)
    check_prompt_columns(RewardSection(function="length"), TOK, examples)  # a built-in needs no column


@pytest.mark.parametrize("fn, message", [
    (lambda prompt, response: 1 / 0,
     r"reward 'bad' raised ZeroDivisionError: division by zero \(.*test_rewards\.py:\d+\) on prompt 'a'"),
    (lambda prompt, response: "high", r"reward 'bad' returned str 'high'; expected a float"),
    (lambda prompts, completions: [1.0], r"reward 'bad' returned 1 scores for 2 completions"),
    (lambda prompts, completions: ["x", 1.0], r"returned str 'x' for completion 0; expected a float or None"),
    (lambda prompts, completions: [float("nan"), 1.0], r"returned nan for completion 0"),
    (lambda prompts, completions: {}["answer"], r"reward 'bad' raised KeyError: 'answer'"),
])
def test_a_failing_user_function_is_one_error_naming_it(fn, message):
    register_reward("bad", fn, overwrite=True)
    with pytest.raises(RewardFunctionError, match=message) as info:
        get_reward("bad", tokenizer=TOK).score_texts(["a", "a b"], ["b", "c"])
    assert "\n" not in str(info.value)


def test_import_paths_find_modules_in_the_working_directory(tmp_path, monkeypatch):
    """As `python -m` would: the console script does not put the working directory on sys.path."""
    import sys

    (tmp_path / "my_gold.py").write_text("def score(prompt, response):\n    return float(len(response))\n")
    (tmp_path / "broken_gold.py").write_text("def score(prompt, response):\n    return (\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(tmp_path))])
    np.testing.assert_array_equal(get_reward("my_gold:score").score_texts(["p"], ["abc"]), [3.0])
    assert sys.path[0] == str(tmp_path)
    with pytest.raises(RewardSpecError, match=r"'broken_gold:score': importing 'broken_gold' raised "
                                              r"SyntaxError: .*broken_gold\.py:2\)"):
        get_reward("broken_gold:score")
    with pytest.raises(RewardSpecError, match=r"cannot import module 'no_such_module'"):
        get_reward("no_such_module:score")


def test_samples_no_function_scores_are_reported_once(caplog):
    """None is TRL's "does not apply"; when every function says so for a sample its reward is 0, which a run
    says once (it trained on 0 rewards in silence before)."""
    import logging

    from jaxrlhf.train.reward_functions import Component, RewardFunctions

    def second_only(completions, **kw):
        return [None if i != 1 else 1.0 for i in range(len(completions))]

    fns = RewardFunctions([Component("second", 2.0, BatchFunctionOracle(second_only))], TOK,
                          compile=lambda fn, donate: fn)
    with caplog.at_level(logging.WARNING, logger="jaxrlhf"):
        np.testing.assert_array_equal(np.asarray(fns(make_rollout())), [0.0, 2.0, 0.0])
        fns(make_rollout())
    warnings = [r.getMessage() for r in caplog.records if "returned None" in r.getMessage()]
    assert warnings == ["reward: every reward function returned None for 2 of 3 samples; their reward is 0 "
                        "(logged once)"]


def test_remax_rows_get_their_own_prompts_columns_and_tm_std_is_bessel_corrected():
    """ReMax's rollout is [P·G samples; P greedy responses]: each row's prompt and columns must be its own
    (they were spread as if each prompt had G + 1 consecutive rows, so a sample met another prompt's
    target); rewards/<fn>/std is TRL's nanstd (ddof 1)."""
    from jaxrlhf.train.reward_functions import Component, RewardFunctions

    seen = {}

    def record(prompts, completions, target, **kw):
        scores = [float(len(c)) for c in completions]
        seen.update(prompts=list(prompts), target=list(target), scores=scores)
        return scores

    fns = RewardFunctions([Component("record", 1.0, BatchFunctionOracle(record))], TOK,
                          compile=lambda fn, donate: fn)
    fns.greedy_baseline = True
    rollout = make_rollout()
    six = jax.tree.map(lambda x: jnp.concatenate([x, x]), rollout)  # P = 2 prompts, G = 2, + 2 greedy rows
    fns.set_columns([{"prompt": "p0", "target": "t0"}, {"prompt": "p1", "target": "t1"}])
    fns(six)
    assert seen["prompts"] == ["p0", "p0", "p1", "p1", "p0", "p1"]
    assert seen["target"] == ["t0", "t0", "t1", "t1", "t0", "t1"]
    scores = np.array(seen["scores"])
    assert scores.std() > 0
    assert fns.metrics()["rewards/record/std"] == pytest.approx(scores.std(ddof=1), rel=1e-6)
    fns.greedy_baseline = False
    fns(six)
    assert seen["target"] == ["t0", "t0", "t0", "t1", "t1", "t1"]  # G = 3 without the greedy rows


def test_a_per_sample_function_sees_the_response_up_to_the_chat_end_of_turn():
    """A chat completion ends with the template's end-of-turn token (<|end|> here, not eos): the per-sample
    form cut only at eos, so the function saw 'ab<|end|>' and the row counted as unfinished."""
    from jaxrlhf.data import make_char_tokenizer
    from jaxrlhf.oracle.base import decode_batch

    tok = make_char_tokenizer("ab")  # a = 8, b = 9, <|end|> = 7, </s> = 2
    _, responses, finished = decode_batch(
        tok, np.array([[8, 9]]), np.ones((1, 2), bool), np.array([[8, 9, 7, 8, 0]]),
        np.array([[1, 1, 1, 1, 0]], bool))
    assert (responses, finished) == (["ab"], [True])


def test_trainer_state_is_passed_where_named_and_its_absence_is_named():
    """TRL passes trainer_state (global_step, max_steps): a function naming it was refused at start-up as a
    missing dataset column."""
    from jaxrlhf.train.reward_functions import TrainerState

    def by_step(completions, trainer_state, **kw):
        return [float(trainer_state.global_step)] * len(completions)

    oracle = BatchFunctionOracle(by_step)
    assert oracle.required_columns == ()  # not a dataset column
    np.testing.assert_array_equal(oracle.score_batch(["a"], ["b"], trainer_state=TrainerState(3, 10)), [3.0])
    with pytest.raises(RewardFunctionError, match="needs 'trainer_state', which only the RL trainer passes"):
        oracle.score_batch(["a"], ["b"])
