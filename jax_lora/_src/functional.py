"""Plain functions: ``f(params, x)`` written with :func:`jax_lora.dot` (or ``x @ w``)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax

from jax_lora._src import lora
from jax_lora._src.fallback import merge_until_traced

__all__ = ["apply_fn"]


def _eval_shape(g, tree):
  """``jax.eval_shape(g, tree)`` where ``tree`` may hold non-array leaves (an Equinox
  module's activation functions): those are closed over as they are."""
  flat, treedef = jax.tree.flatten(tree)
  is_arr = [hasattr(v, "shape") and hasattr(v, "dtype") for v in flat]

  def h(arrays):
    it = iter(arrays)
    return g(treedef.unflatten([next(it) if a else v for v, a in zip(flat, is_arr)]))

  return jax.eval_shape(h, [v for v, a in zip(flat, is_arr) if a])


def apply_fn(f: Callable[..., Any], adapted: Any, *args, dropout_rng: jax.Array | None = None, **kwargs):
  """Calls ``f(adapted, *args, **kwargs)`` with LoRA unmerged where ``f`` uses :func:`jax_lora.dot`.

  ``f`` receives the adapted tree itself: kernels are :class:`~jax_lora.LoraWeight`
  nodes that ``jax_lora.dot(x, w)`` and ``x @ w`` compute unmerged. Where ``f``
  uses a LoRA weight any other way, a shape-only probe finds it: ``w.T``,
  ``w.reshape``, ``w + 1``... raise a ``LoraUsageError`` naming the weight, which
  is then merged; a ``TypeError``/``AttributeError`` from elsewhere (e.g.
  ``jnp.einsum`` on a LoRA weight) merges every weight ``f`` had not consumed
  through the fast path, and is raised as it is if ``f`` still fails with
  them merged (then it was ``f``'s own error). Merged weights are named in a
  warning.

  >>> import jax.numpy as jnp, jax_lora as jl
  >>> p = jl.init_lora({"w": jnp.eye(3)}, jl.LoraConfig(rank=1, targets=("w",)), jax.random.key(0))
  >>> jl.apply_fn(lambda p, x: x @ p["w"], p, jnp.ones((2, 3))).tolist()
  [[1.0, 1.0, 1.0], [1.0, 1.0, 1.0]]
  """

  def trace(p):
    with lora.dropout_key(dropout_rng):
      _eval_shape(lambda q: f(q, *args, **kwargs), p)

  params, _ = merge_until_traced(adapted, trace)
  with lora.dropout_key(dropout_rng):
    return f(params, *args, **kwargs)
