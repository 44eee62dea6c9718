"""Studies: the comparisons RLHF research is about, each one command on the pure pipeline
(:mod:`jaxrlhf.experiments.pipeline`), with intervals across seeds.

- ``jaxrlhf study choices`` (:mod:`~jaxrlhf.experiments.studies.choices`): implementation choices of PPO,
  each toggled alone from the defaults, paired against the defaults on the same seeds.
- ``jaxrlhf study feedback`` (:mod:`~jaxrlhf.experiments.studies.feedback`): the type, quality and amount of
  feedback at an equal annotation budget, as reward-model agreement with the oracle and as the gold reward
  PPO reaches against each reward model.

A study computes what variants share once per seed (SFT, feedback, reward model) and vmaps what differs:
variants that only change numbers run as one compiled program; structural ones compile once each.
"""
