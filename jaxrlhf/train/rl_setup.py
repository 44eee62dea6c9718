"""Building an RL run's phases from models: sampling settings, the reward, the reference and critic, and the
jitted phases of one iteration.

:func:`build_rl_phases` is the one builder of the program an RL iteration runs: the trainer calls it with
the models it loaded, ``benchmarks/ppo_iteration.py`` with random ones, so the benchmark times the trainer's
program. It takes built models and parameters, never a run or a config file.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax

from jaxrlhf.config import ConfigError
from jaxrlhf.data.tokenize import chat_turn_end_ids
from jaxrlhf.models.config import ModelConfig
from jaxrlhf.models.heads import init_value_head
from jaxrlhf.models.transformer import LanguageModel
from jaxrlhf.rl import RewardNormalization
from jaxrlhf.rollout.generate import GenerationConfig
from jaxrlhf.steps import CriticParams, PolicyParams, RewardModelParams, RewardModelScorer, RLConfig
from jaxrlhf.steps.rl_iteration import RLPhases, ScoreFn, make_rl_phases
from jaxrlhf.train.model_setup import LoadedModel, load_model, load_reward_model, read_normalization
from jaxrlhf.train.reward_functions import RewardFunctions
from jaxrlhf.train.run import compile_step
from jaxrlhf.train.run_config import GenerationSection, ModelSection, RewardSection

log = logging.getLogger("jaxrlhf")

# Why on-policy RL refuses filtered sampling (issue 12 §1): the update's log-probs are those of the whole
# tempered softmax, not of the filtered distribution the tokens were drawn from.
_OFF_POLICY = ("the update's log-probs are those of the unfiltered tempered softmax, so the first PPO ratio "
               "would read 1 while the update is off-policy")


def sampling_settings(gen: GenerationSection, temperature: float, tokenizer: Any,
                      model_config: ModelConfig | None = None) -> GenerationConfig:
    """The rollouts' :class:`GenerationConfig`: the algorithm's temperature, stopping at the tokenizer's eos,
    at every eos id of the model's config (Llama 3 Instruct lists three; its chat turns end with the third)
    and at the token that closes an assistant turn in the tokenizer's chat template (chat completions are
    trained to end there), unless ``generation.stop_token_ids`` says otherwise. Filtered sampling (top-k,
    top-p, a minimum length) is refused: see :data:`_OFF_POLICY`."""
    if gen.temperature is not None and gen.temperature != temperature:
        raise ConfigError(
            f"generation.temperature: {gen.temperature} differs from the algorithm's temperature "
            f"{temperature} (sampling and every log-prob must use the same one; set the algorithm's)"
        )
    for key, value, off in (("top_k", gen.top_k, 0), ("top_p", gen.top_p, 1.0),
                            ("min_new_tokens", gen.min_new_tokens, 0)):
        if value != off:
            raise ConfigError(f"generation.{key}: {value} is not supported by on-policy RL ({_OFF_POLICY}); "
                              f"leave it at {off}")
    stop = gen.stop_token_ids
    if stop is None:
        model_eos = model_config.eos_token_ids if model_config is not None else ()
        candidates = (tokenizer.eos_token_id, *model_eos, *chat_turn_end_ids(tokenizer))
        stop = tuple(dict.fromkeys(i for i in candidates if i is not None))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    vocab = model_config.vocab_size if model_config is not None else None
    outside = [s for s in stop if s is not None and vocab is not None and not 0 <= s < vocab]
    if outside and gen.stop_token_ids is not None:
        raise ConfigError(f"generation.stop_token_ids: {outside[0]} is not a token of the model (vocab_size "
                          f"{vocab}), so no rollout could stop there")
    if outside:  # derived from the tokenizer or the model's config: ids the model cannot emit stop nothing
        log.info("stop ids %s are outside the model's vocabulary (%d) and left out", outside, vocab)
        stop = tuple(s for s in stop if s not in outside)
    try:
        return GenerationConfig(
            max_new_tokens=gen.max_new_tokens,
            temperature=temperature,
            stop_token_ids=tuple(int(s) for s in stop if s is not None),
            pad_token_id=int(pad),
        )
    except ValueError as e:
        raise ConfigError(f"generation: {e}") from None


def same_vocabulary(policy_tokenizer: Any, other: Any, key: str, policy_vocab: int | None = None,
                    other_vocab: int | None = None) -> None:
    """The other model reads the policy's token ids: the same tokenizer, and (when the sizes are given) an
    embedding with a row for every id the policy can emit: its vocabulary padded at least as far."""
    if other is not None and other.get_vocab() != policy_tokenizer.get_vocab():
        raise ConfigError(f"{key}: its tokenizer differs from the policy's (the models must share token ids)")
    if policy_vocab is not None and other_vocab is not None and other_vocab < policy_vocab:
        # An id past the other model's table embeds as NaN: every score or KL would be NaN.
        raise ConfigError(f"{key}: its vocab_size {other_vocab} is smaller than the policy's {policy_vocab} "
                          f"(ids {other_vocab}–{policy_vocab - 1} are padding rows the policy can still "
                          "sample, which this model cannot embed); use a model whose vocab_size is at least "
                          "the policy's")


def fresh_copy(tree: Any) -> Any:
    """Fresh buffers: the policy's are donated to the update, a reference or critic must not alias them."""
    return jax.tree.map(jnp.copy, tree)


def reward_model_score_fn(
    model: LanguageModel,
    params: RewardModelParams,
    normalization: RewardNormalization | None = None,
    micro_batch_size: int | None = None,
) -> ScoreFn:
    """``score(rollout) -> [B]``: the jitted (normalised) reward model at ``params``."""
    scorer = RewardModelScorer(model, normalization, micro_batch_size)
    score = compile_step(lambda params, rollout: scorer(params, rollout), donate=False)
    return lambda rollout: score(params, rollout)


def make_score_fn(
    reward: RewardSection, policy_tokenizer: Any, dtype: str,
    place: Callable[[Any, str], Any] = lambda tree, name: tree,
    mesh: Any = None,
    policy_vocab: int | None = None,
) -> ScoreFn:
    """The configured reward as ``score(rollout) -> [B]``: the jitted reward model (its parameters placed by
    ``place``), or the reward function(s) ``reward.function`` / ``reward.functions`` name
    (:class:`~jaxrlhf.train.reward_functions.RewardFunctions`: any oracle or reward function of
    ``jaxrlhf.oracle.get_reward``, TRL's form included; jitted when jittable, else called on the host once
    per batch — given ``mesh``, on each process's own rows of a multi-host rollout; a weighted sum of
    several, each logged as ``rewards/<name>/mean``)."""
    if reward.model_path is not None:
        rm, norm = load_reward_model(reward.model_path, dtype)
        same_vocabulary(policy_tokenizer, rm.tokenizer, "reward.model_path", policy_vocab,
                        rm.model.config.vocab_size)
        if norm is None and reward.normalize:
            log.warning("%s has no reward normalisation; using raw rewards", reward.model_path)
        return reward_model_score_fn(rm.model, place(rm.params, "reward model params"),
                                     norm if reward.normalize else None, reward.micro_batch_size)
    return RewardFunctions.from_section(reward, policy_tokenizer, mesh=mesh)


def load_reference(path: str | None, policy: LoadedModel, dtype: str,
                   key: jax.Array) -> tuple[LanguageModel, PolicyParams]:
    """The KL reference: ``reference.path``, or (default) a copy of the policy's initial LM."""
    if path is None:
        return policy.model, PolicyParams(fresh_copy(policy.params))
    ref = load_model(ModelSection(path=path, dtype=dtype), key, "reference.path")
    same_vocabulary(policy.tokenizer, ref.tokenizer, "reference.path", policy.model.config.vocab_size,
                    ref.model.config.vocab_size)
    return ref.model, PolicyParams(ref.params)


def load_critic(path: str | None, policy: LoadedModel, dtype: str,
                key: jax.Array) -> tuple[LanguageModel, CriticParams]:
    """A separate critic: from ``critic.path`` (its reward or value head initialising the value head) or the
    policy's initial weights with a zero value head.

    A reward head comes with the reward model's normalisation folded in (w' = gain·w, b' = gain·b + bias,
    so that V = gain·r + bias): the critic starts on the scale of the normalised rewards it will predict."""
    normalization = None
    if path is None:
        model, lm, heads = policy.model, fresh_copy(policy.params), policy.heads
    else:
        critic = load_model(ModelSection(path=path, dtype=dtype), key, what="critic.path")
        same_vocabulary(policy.tokenizer, critic.tokenizer, "critic.path", policy.model.config.vocab_size,
                        critic.model.config.vocab_size)
        model, lm, heads = critic.model, critic.params, critic.heads
        normalization = read_normalization(path)
    head = heads.get("value_head")
    if head is None and heads.get("reward_head") is not None:
        head = heads["reward_head"]
        if normalization is not None:
            head = normalized_head(head, normalization)
    head = head or init_value_head(model.config.hidden_size)
    return model, CriticParams(lm, jax.tree.map(jnp.asarray, head))


def normalized_head(head: Any, normalization: RewardNormalization) -> Any:
    """A scalar head ``h·w + b`` rescaled to ``gain·(h·w + b) + bias``."""
    gain, bias = jnp.float32(normalization.gain), jnp.float32(normalization.bias)
    proj = head["proj"]
    return {**head, "proj": {**proj, "kernel": jnp.asarray(proj["kernel"]) * gain,
                             "bias": jnp.asarray(proj["bias"]) * gain + bias}}


def policy_with_value_head(policy: LoadedModel, shared_critic: bool) -> PolicyParams:
    """The policy's parameters: its LM and, with a shared critic, its saved value head or a zero one."""
    if not shared_critic:
        return PolicyParams(policy.params)
    head = policy.heads.get("value_head") or init_value_head(policy.model.config.hidden_size)
    return PolicyParams(policy.params, jax.tree.map(jnp.asarray, head))


def build_rl_phases(
    policy_model: LanguageModel,
    ref_model: LanguageModel,
    critic_model: LanguageModel | None,
    cfg: RLConfig,
    generation: GenerationConfig,
    score: ScoreFn,
    optimizer: optax.GradientTransformation,
    critic_optimizer: optax.GradientTransformation | None,
    state_shardings: Any = None,
    watch: Callable[[str, Any], Any] = lambda name, fn: fn,
) -> RLPhases:
    """The jitted phases of one RL iteration (see :func:`jaxrlhf.steps.rl_iteration.make_rl_phases`).

    Generation and experience are jitted without donation (their inputs live on); the update donates the
    state, pinned to ``state_shardings`` (the layout the state was placed with). ``score`` is used as given
    (:func:`make_score_fn` jits what can be jitted). ``watch(name, fn)`` may wrap each jitted phase (the
    trainer's recompilation warnings).
    """
    phases = make_rl_phases(policy_model, ref_model, critic_model, cfg, generation, score, optimizer,
                            critic_optimizer)
    return RLPhases(
        generate=watch("generate", compile_step(phases.generate, donate=False)),
        score=phases.score,
        experience=watch("experience", compile_step(phases.experience, donate=False)),
        update=watch("update", compile_step(phases.update, state_shardings=state_shardings)),
    )
