"""Fixtures shared by the rl tests: run each numeric function with and without `jax.jit`."""

import jax
import pytest


@pytest.fixture(params=[False, True], ids=["eager", "jit"])
def maybe_jit(request):
    """`jax.jit` (keyword arguments such as static_argnames passed on) or the identity."""
    if request.param:
        return jax.jit
    return lambda f, **_: f
