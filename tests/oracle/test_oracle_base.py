"""Oracle interface: decode_batch, FunctionOracle, the reward registry and import paths."""

import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxrlhf.oracle import (
    FunctionOracle,
    Oracle,
    RewardFunctionError,
    RewardSpecError,
    build_task_tokenizer,
    decode_batch,
    get_reward,
    register_reward,
    registered_rewards,
)
from jaxrlhf.oracle.base import check_token_batch, response_body

TOK = build_task_tokenizer(["a", "b", "c"])  # a=4, b=5, c=6


def count_b(prompt: str, response: str) -> float:
    """Number of 'b' in the response minus the prompt's length in symbols."""
    return response.split().count("b") - len(prompt.split())


def hand_batch():
    prompt_tokens = np.array([[0, 1, 4], [5, 6, 4]], np.int32)  # "<bos> a" left-padded; "b c a"
    prompt_mask = np.array([[0, 1, 1], [1, 1, 1]], bool)
    response_tokens = np.array([[5, 5, 2, 0], [5, 99, 4, 5]], np.int32)  # "b b <eos>"; "b <unk> a b" (no eos)
    response_mask = np.array([[1, 1, 1, 0], [1, 1, 1, 1]], bool)
    return prompt_tokens, prompt_mask, response_tokens, response_mask


def test_decode_batch_and_response_body():
    prompts, responses, finished = decode_batch(TOK, *hand_batch())
    assert prompts == ["a", "b c a"]
    assert responses == ["b b", "b <unk> a b"]
    assert finished == [True, False]
    length, done = response_body(hand_batch()[2], hand_batch()[3], TOK.eos_token_id)
    np.testing.assert_array_equal(length, [2, 4])
    np.testing.assert_array_equal(done, [True, False])


def test_function_oracle_host_and_array_forms():
    oracle = FunctionOracle(count_b, tokenizer=TOK)
    assert not oracle.jittable and oracle.name == "count_b"
    np.testing.assert_array_equal(oracle.score_texts(["a", "a b"], ["b b", "c"]), [1.0, -2.0])
    assert oracle.score_texts(["a"], ["b"]).dtype == np.float32
    scores = oracle.score_tokens(*hand_batch())
    np.testing.assert_array_equal(scores, [2 - 1, 2 - 3])
    capped = FunctionOracle(count_b, tokenizer=TOK, unfinished_score=-5.0)
    np.testing.assert_array_equal(capped.score_tokens(*hand_batch()), [1.0, -5.0])
    np.testing.assert_array_equal(capped.score_texts(["a"], ["b"], finished=[False]), [-5.0])


def test_function_oracle_errors():
    oracle = FunctionOracle(count_b, tokenizer=TOK)
    with pytest.raises(TypeError, match=r"cannot be traced by jax\.jit"):
        jax.jit(oracle.score_tokens)(*hand_batch())
    with pytest.raises(ValueError, match="2 prompts but 1 responses"):
        oracle.score_texts(["a", "b"], ["c"])
    with pytest.raises(TypeError, match="not a single string"):
        oracle.score_texts("a", "b")
    with pytest.raises(ValueError, match="needs a tokenizer"):
        FunctionOracle(count_b).score_tokens(*hand_batch())
    # The error a CLI run reports in one line (jaxrlhf.cli's expected errors), not a traceback.
    with pytest.raises(RewardFunctionError, match="returned nan for batch row 1"):
        FunctionOracle(lambda p, r: float("nan") if r == "c" else 0.0).score_texts(["a", "a"], ["b", "c"])
    with pytest.raises(TypeError, match="callable"):
        FunctionOracle(3)


def test_token_batch_shape_errors():
    pt, pm, rt, rm = hand_batch()
    with pytest.raises(ValueError, match="prompt_mask shape"):
        check_token_batch(pt, pm[:, :2], rt, rm)
    with pytest.raises(ValueError, match="response_tokens: expected a \\[batch, length\\]"):
        check_token_batch(pt, pm, rt[0], rm)
    with pytest.raises(ValueError, match="batch sizes differ"):
        check_token_batch(pt, pm, rt[:1], rm[:1])


class ConstantOracle(Oracle):
    name = "constant"
    jittable = True

    def score_texts(self, prompts, responses, finished=None):
        return np.full(len(prompts), 0.5, np.float32)

    def score_tokens(self, prompt_tokens, prompt_mask, response_tokens, response_mask):
        return jnp.full(prompt_tokens.shape[0], 0.5, jnp.float32)


def test_registry():
    register_reward("test_count_b", count_b, overwrite=True)
    assert "test_count_b" in registered_rewards()
    oracle = get_reward("test_count_b", tokenizer=TOK)
    assert isinstance(oracle, FunctionOracle) and oracle.tokenizer is TOK
    np.testing.assert_array_equal(oracle(["a"], ["b b"]), [1.0])
    instance = ConstantOracle()
    register_reward("test_constant", instance, overwrite=True)
    assert get_reward("test_constant") is instance
    with pytest.raises(ValueError, match="already registered"):
        register_reward("test_constant", instance)
    with pytest.raises(ValueError, match="contain no ':'"):
        register_reward("a:b", count_b)
    with pytest.raises(TypeError, match="expected an Oracle or a callable"):
        register_reward("test_bad", 3)


@pytest.fixture
def user_module(tmp_path, monkeypatch):
    (tmp_path / "my_gold_rewards.py").write_text(
        textwrap.dedent(
            """
            import numpy as np
            from jaxrlhf.oracle import Oracle

            LIMIT = 3

            def length_reward(prompt, response):
                return float(len(response.split()))

            class Holder:
                @staticmethod
                def nested(prompt, response):
                    return 7.0

            class Half(Oracle):
                def score_texts(self, prompts, responses, finished=None):
                    return np.full(len(prompts), 0.5, np.float32)

                def score_tokens(self, *arrays):
                    raise NotImplementedError
            """
        )
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    return "my_gold_rewards"


def test_import_path(user_module):
    oracle = get_reward(f"{user_module}:length_reward", tokenizer=TOK)
    assert isinstance(oracle, FunctionOracle) and oracle.name == f"{user_module}:length_reward"
    np.testing.assert_array_equal(oracle.score_texts(["a", "a"], ["b c", ""]), [2.0, 0.0])
    np.testing.assert_array_equal(oracle.score_tokens(*hand_batch()), [2.0, 4.0])
    np.testing.assert_array_equal(get_reward(f"{user_module}:Holder.nested")(["a"], ["b"]), [7.0])
    half = get_reward(f"{user_module}:Half")
    assert isinstance(half, Oracle) and half(["a"], ["b"])[0] == 0.5


@pytest.mark.parametrize(
    "spec, message",
    [
        ("no_such_oracle", "unknown reward 'no_such_oracle'; registered: .*package.module:function"),
        ("my_gold_rewards:", "must look like 'package.module:function'"),
        (":length_reward", "must look like"),
        ("my_gold_rewards:a:b", "must look like"),
        ("no_such_package.mod:fn", "cannot import module 'no_such_package.mod'"),
        ("my_gold_rewards:missing", "'my_gold_rewards' has no attribute 'missing'"),
        ("my_gold_rewards:LIMIT", "neither an Oracle nor callable"),
    ],
)
def test_bad_specs(user_module, spec, message):
    with pytest.raises(RewardSpecError, match=message):
        get_reward(spec)
    with pytest.raises(RewardSpecError):
        get_reward(3)
