"""Plain functions: ``f(params, x)`` written with :func:`jax_lora.dot` (or ``x @ w``)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax

from jax_lora._src import lora
from jax_lora._src.fallback import merge_unreached, special_paths

__all__ = ["apply_fn"]


def apply_fn(f: Callable[..., Any], adapted: Any, *args, dropout_rng: jax.Array | None = None, **kwargs):
  """Calls ``f(adapted, *args, **kwargs)`` with LoRA unmerged where ``f`` uses :func:`jax_lora.dot`.

  ``f`` receives the adapted tree itself: kernels are :class:`~jax_lora.LoraWeight`
  nodes that ``jax_lora.dot(x, w)`` and ``x @ w`` compute unmerged. Where ``f``
  uses a LoRA weight any other way (``w.T``, ``jnp.einsum``...), a shape-only
  probe sees the :class:`~jax_lora._src.lora.LoraUsageError` naming it, and that
  one weight is merged instead, with a warning. Any other error of ``f`` is
  raised as it is.

  >>> import jax.numpy as jnp, jax_lora as jl
  >>> p = jl.init_lora({"w": jnp.eye(3)}, jl.LoraConfig(rank=1, targets=("w",)), jax.random.key(0))
  >>> jl.apply_fn(lambda p, x: x @ p["w"], p, jnp.ones((2, 3))).tolist()
  [[1.0, 1.0, 1.0], [1.0, 1.0, 1.0]]
  """
  merged: set[str] = set()
  budget = len(special_paths(adapted))
  while True:
    params = merge_unreached(adapted, special_paths(adapted) - merged)
    try:
      with lora.dropout_key(dropout_rng):
        jax.eval_shape(lambda p: f(p, *args, **kwargs), params)
      break
    except lora.LoraUsageError as e:
      if e.path in merged or len(merged) >= budget:
        raise
      merged.add(e.path)
  with lora.dropout_key(dropout_rng):
    return f(params, *args, **kwargs)
