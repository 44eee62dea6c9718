"""jaxrlhf: reinforcement learning from human feedback in JAX/Flax.

Layers, bottom to top: ``rl`` (pure numerics), ``models``, ``rollout``, ``steps``, ``parallel``,
``oracle`` (gold rewards and simulated feedback), ``data`` and ``train`` (the run layer).
"""

__version__ = "0.1.0"
