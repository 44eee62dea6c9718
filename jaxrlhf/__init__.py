"""jaxrlhf: reinforcement learning from human feedback in JAX/Flax.

Layers, bottom to top: ``rl`` (pure numerics), ``models``, ``rollout``, ``steps``, ``parallel``,
``oracle`` (rewards, gold rewards and simulated feedback), ``data``, ``train`` (the run layer) and
``experiments`` (the oracle demo, its evaluation and report).
"""

from jaxrlhf.transformers_logging import hide_missing_framework_advice

__version__ = "0.1.0"

# transformers (tokenizers, configs) works without PyTorch; its advice to install PyTorch is noise here.
hide_missing_framework_advice()
