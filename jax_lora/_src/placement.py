"""Placing trees on a mesh: shardings from rules, memory kinds (host offload), bytes per device."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jax_lora._src.sharding_rules import ShardingRules, param_specs

__all__ = ["param_shardings", "batch_sharding", "opt_state_shardings", "with_memory_kind", "place",
           "bytes_per_device"]


def _to_sharding(mesh: Mesh, memory_kind: str | None):
  def f(s):
    return NamedSharding(mesh, s, memory_kind=memory_kind)
  return f


def param_shardings(adapted: Any, rules: ShardingRules, mesh: Mesh, memory_kind: str | None = None) -> Any:
  """``NamedSharding`` tree for ``adapted`` (split it with ``jl.split`` like the params)."""
  specs = param_specs(adapted, rules, mesh)
  return jax.tree.map(_to_sharding(mesh, memory_kind), specs, is_leaf=lambda x: isinstance(x, P))


def batch_sharding(mesh: Mesh, rules: ShardingRules | Sequence[str] = ("data",)) -> NamedSharding:
  """Sharding of the batch: leading axis split over ``rules.batch`` (or the given axes)."""
  axes = rules.batch if isinstance(rules, ShardingRules) else tuple(rules)
  for a in axes:
    if a not in mesh.shape:
      raise ValueError(f"batch axis {a!r} is not a mesh axis {tuple(mesh.axis_names)}")
  return NamedSharding(mesh, P(axes if len(axes) > 1 else (axes[0] if axes else None)))


def opt_state_shardings(optimizer: optax.GradientTransformation, opt_state: Any, trainable_shardings: Any,
                        mesh: Mesh, memory_kind: str | None = None) -> Any:
  """Shards optimizer state like its parameters (Adam moments of A like A, ...).

  Non-parameter state (step counts, scalars) is replicated.
  """
  shardings = with_memory_kind(trainable_shardings, memory_kind) if memory_kind else trainable_shardings
  rep = NamedSharding(mesh, P(), memory_kind=memory_kind)
  return optax.tree_map_params(optimizer, lambda _, s: s, opt_state, shardings,
                               transform_non_params=lambda _: rep, is_leaf=lambda x: x is None)


def with_memory_kind(shardings: Any, memory_kind: str) -> Any:
  """The same shardings in another memory (e.g. ``"pinned_host"`` for host offload).

  Raises a clear error when the backend has no such memory.
  """
  leaves = [s for s in jax.tree.leaves(shardings) if isinstance(s, jax.sharding.Sharding)]
  if leaves:
    dev = min(leaves[0].device_set, key=lambda d: d.id)  # any sharding: Named or single-device
    kinds = [m.kind for m in dev.addressable_memories()]
    if memory_kind not in kinds:
      raise ValueError(f"the {dev.platform} backend has no memory kind {memory_kind!r} (it has {kinds}); "
                       "host offload is unavailable here: keep the optimizer state on device (offload off)")
  return jax.tree.map(lambda s: s.with_memory_kind(memory_kind), shardings)


def place(tree: Any, shardings: Any) -> Any:
  """Puts ``tree`` on the mesh; works with several processes (each supplies its own shards).

  Every process must hold the same full values (e.g. params from the same seed).
  """

  def put(x, s):
    if x is None:
      return None
    if jax.process_count() == 1:
      # Steps donate their inputs: never hand back a buffer the caller still holds
      # (device_put may reuse the source buffer, even with may_alias=False on CPU).
      return jax.device_put(jnp.array(x, copy=True) if isinstance(x, jax.Array) else x, s)
    host = np.asarray(x)
    return jax.make_array_from_callback(host.shape, s, lambda idx: host[idx])

  return jax.tree.map(put, tree, shardings, is_leaf=lambda x: x is None)



def bytes_per_device(tree: Any, device: Any = None) -> int:
  """Bytes that ``device`` (default: the first local one) holds for the arrays of ``tree``."""
  device = jax.local_devices()[0] if device is None else device
  total = 0
  for x in jax.tree.leaves(tree):
    for s in getattr(x, "addressable_shards", ()):
      if s.device == device:
        total += s.data.nbytes
  return total
