"""Plain functions: ``f(params, x)`` written with :func:`jax_lora.dot` (or ``x @ w``)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax

from jax_lora import ops
from jax_lora.linen import _fallback
from jax_lora.lora import lora_weights

__all__ = ["apply_fn"]


def apply_fn(f: Callable[..., Any], adapted: Any, *args, dropout_rng: jax.Array | None = None, **kwargs):
  """Calls ``f(adapted, *args, **kwargs)`` with LoRA unmerged where ``f`` uses :func:`jax_lora.dot`.

  ``f`` receives the adapted tree itself: kernels are :class:`~jax_lora.LoraWeight`
  nodes that ``jax_lora.dot(x, w)`` and ``x @ w`` compute unmerged. If ``f``
  uses a targeted kernel any other way (``w.T``, ``jnp.einsum``…), a shape-only
  probe fails and every adapter ``f`` had not yet consumed is merged instead,
  with a warning naming them.
  """
  with ops.record_consumed() as seen, ops.dropout_key(dropout_rng):
    try:
      jax.eval_shape(lambda p: f(p, *args, **kwargs), adapted)
      return f(adapted, *args, **kwargs)
    except (TypeError, AttributeError, ValueError) as err:
      if not lora_weights(adapted):
        raise
      first_error = err
  fast = frozenset(seen)
  merged = _fallback(adapted, fast)
  try:
    with ops.dropout_key(dropout_rng):
      return f(merged, *args, **kwargs)
  except Exception:
    raise first_error from None
