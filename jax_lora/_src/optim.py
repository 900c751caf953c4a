"""optax helper: an optimizer whose state exists only for the LoRA factors."""

from __future__ import annotations

import dataclasses
from typing import Any

import optax

from jax_lora._src.adapt import trainable_paths
from jax_lora._src.lora import LoraWeight
from jax_lora._src.tree import map_leaves

__all__ = ["lora_optimizer"]


def _labels(adapted: Any, bias: str, modules_to_save) -> Any:
  bias_paths = trainable_paths(adapted, bias, modules_to_save)

  def lab(path, v):
    if isinstance(v, LoraWeight):
      return dataclasses.replace(v, w="frozen", a="frozen" if v.freeze_a else "lora", b="lora",
                                 m=None if v.m is None else "lora")
    return "lora" if path in bias_paths else "frozen"

  return map_leaves(lab, adapted)


def lora_optimizer(tx: optax.GradientTransformation, bias: str = "none",
                   modules_to_save=()) -> optax.GradientTransformation:
  """Wraps ``tx`` for the *full* adapted tree so that only A/B (and chosen biases and
  ``modules_to_save``, as in :func:`jax_lora.split`) train.

  Frozen leaves get ``optax.set_to_zero()`` (no state, zero update); unlike
  ``optax.masked``, which passes masked-out gradients through unchanged and so
  freezes nothing. Prefer differentiating the trainable half of
  :func:`jax_lora.split` alone (then no base gradient is ever computed and a
  plain ``tx`` already holds state for A/B only); this wrapper is for code that
  keeps one tree.

  Example:
    >>> import jax_lora as jl
    >>> adapted = jl.init_lora({"w": jnp.ones((4, 4))}, jl.LoraConfig(rank=2, targets=("w",)), jax.random.key(0))
    >>> tx = lora_optimizer(optax.adamw(1e-3))
    >>> opt_state = tx.init(adapted)   # Adam moments for A and B only
  """
  return optax.multi_transform({"lora": tx, "frozen": optax.set_to_zero()},
                               lambda tree: _labels(tree, bias, tuple(modules_to_save)))
