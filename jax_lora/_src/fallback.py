"""Merging the LoRA / quantized kernels that an integration's fast path does not reach.

Every integration (Linen, NNX, plain functions) finds, with a shape-only probe,
which special kernels its intercepted layers compute unmerged; the rest are
merged per call here (exact, and gradients still reach A and B), with one
warning per path and process.
"""

from __future__ import annotations

import threading
import warnings
from collections.abc import Callable, Collection
from typing import Any

import jax
import jax.numpy as jnp

from jax_lora._src.lora import LoraUsageError, LoraWeight, merged_kernel, record_consumed
from jax_lora._src.tree import is_quantized, leaves, map_leaves, materialize

__all__ = ["is_special", "special_paths", "plain_shapes", "merge_unreached", "merge_until_traced"]

_warned: set[str] = set()
_lock = threading.Lock()


def is_special(v: Any) -> bool:
  """True for kernels the fast paths handle: LoRA weights and quantized arrays."""
  return isinstance(v, LoraWeight) or is_quantized(v)


def special_paths(tree: Any) -> set[str]:
  """Paths of every LoRA weight and quantized array in ``tree``."""
  return {p for p, v in leaves(tree).items() if is_special(v)}


def plain_shapes(tree: Any) -> Any:
  """Shape-only twin of ``tree`` with every special kernel as a float32 ``ShapeDtypeStruct``."""
  return map_leaves(lambda p, v: jax.ShapeDtypeStruct(v.shape, jnp.float32) if is_special(v) else v, tree)


def _warn(path: str, v: Any) -> None:
  with _lock:
    if path in _warned:
      return
    _warned.add(path)
  what = "LoRA adapter" if isinstance(v, LoraWeight) else "quantized kernel"
  warnings.warn(f"jax_lora: {what} {path!r} is not used through an interceptable layer "
                "(Linen nn.Dense/DenseGeneral/Einsum, NNX Linear/LinearGeneral/Einsum, jax_lora.dot) "
                "in this call; merging it into a dense weight instead (correct, but no "
                "frozen-base savings there)", stacklevel=3)


def merge_unreached(tree: Any, fast: Collection[str], warn: bool = True) -> Any:
  """``tree`` with every special kernel whose path is not in ``fast`` merged (LoRA:
  ``merged_kernel`` in the base dtype) or dequantized (with a warning, once per path)."""

  def f(path, v):
    if not is_special(v) or path in fast:
      return v
    if warn:
      _warn(path, v)
    return merged_kernel(v) if isinstance(v, LoraWeight) else materialize(v)

  return map_leaves(f, tree)


def merge_until_traced(tree: Any, trace: Callable[[Any], Any], warn: bool = True) -> tuple[Any, set[str]]:
  """``(params, merged)``: ``tree`` with as few special kernels merged as ``trace(params)`` needs.

  ``trace`` runs the user's code (shapes only, e.g. under ``jax.eval_shape``). Each
  ``LoraUsageError`` merges the weight it names; a ``TypeError``/``AttributeError``
  from elsewhere merges, once, every weight the trace had not consumed through the
  fast path, and is raised as it is if the code still fails (then it was the
  code's own error).
  """
  special = special_paths(tree)
  merged: set[str] = set()
  first_error = None
  while True:
    params = merge_unreached(tree, special - merged, warn=warn)
    try:
      with record_consumed() as seen:
        trace(params)
      return params, merged
    except LoraUsageError as e:
      if e.path in merged:
        raise
      merged.add(e.path)
    except (TypeError, AttributeError) as e:
      rest = special - merged - seen
      if first_error is not None or not rest:
        raise (first_error or e) from None
      first_error = e
      merged |= rest
