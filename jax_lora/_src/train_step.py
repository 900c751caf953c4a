"""Distributed LoRA train steps: ``jit`` with in/out shardings and donation, and a ``pmap`` path."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jax_lora._src.adapt import combine, split
from jax_lora._src.placement import opt_state_shardings, with_memory_kind

__all__ = ["make_train_step", "init_opt_state", "make_pmap_train_step", "replicate", "unreplicate", "shard_batch"]


def _loss_and_grad(loss_fn, remat: bool, policy):
  def f(trainable, frozen, batch):
    return loss_fn(combine(trainable, frozen), batch)

  if remat:
    f = jax.checkpoint(f, policy=policy)
  return jax.value_and_grad(f)


def make_train_step(loss_fn: Callable[[Any, Any], jax.Array], optimizer: optax.GradientTransformation, mesh: Mesh,
                    param_shardings: Any, batch_sharding: Any, *, donate: bool = True, remat: bool = False,
                    remat_policy: Callable | None = None, offload_opt_state: bool = False,
                    offload_frozen: bool = False, bias: str = "none", modules_to_save=()):
  """A jitted LoRA step ``(trainable, opt_state, frozen, batch) -> (trainable, opt_state, loss)``.

  Only ``trainable`` (``jl.split(adapted)[0]``) is differentiated; the frozen
  base gets no gradient and no optimizer state. In and out shardings match, so
  steps chain without resharding; ``trainable`` and ``opt_state`` are donated.

  Args:
    loss_fn: ``loss_fn(adapted, batch) -> scalar`` (mean over the global batch).
    optimizer: an optax transformation over the trainable tree.
    mesh: the device mesh (Auto axes, see :func:`make_mesh`).
    param_shardings: :func:`param_shardings` of the *full* adapted tree.
    batch_sharding: sharding (or prefix tree of shardings) for the batch.
    donate: donate trainable and optimizer-state buffers.
    remat: wrap the loss in ``jax.checkpoint`` (recompute activations in the backward).
    remat_policy: a ``jax.checkpoint_policies`` policy for ``remat``.
    offload_opt_state: keep optimizer state in host memory (``pinned_host``) between steps.
    offload_frozen: keep the frozen base in host memory; copied to device inside the step.
    bias, modules_to_save: as in ``jl.split`` (which biases and whole modules train).

  The opt_state shardings are derived from the first ``opt_state`` passed in
  (:func:`opt_state_shardings`); create it with :func:`init_opt_state`.
  """
  tr_sh, fr_sh = split(param_shardings, bias=bias, modules_to_save=modules_to_save)
  if offload_frozen:
    fr_dev, fr_sh = fr_sh, with_memory_kind(fr_sh, "pinned_host")
  vg = _loss_and_grad(loss_fn, remat, remat_policy)
  rep = NamedSharding(mesh, P())
  cache: dict[Any, Callable] = {}

  def build(opt_state):
    opt_dev = opt_state_shardings(optimizer, opt_state, tr_sh, mesh)
    opt_sh = with_memory_kind(opt_dev, "pinned_host") if offload_opt_state else opt_dev

    def body(trainable, opt_state, frozen, batch):
      if offload_opt_state:
        opt_state = jax.device_put(opt_state, opt_dev)
      if offload_frozen:
        frozen = jax.device_put(frozen, fr_dev)
      loss, grads = vg(trainable, frozen, batch)
      updates, opt_state = optimizer.update(grads, opt_state, trainable)
      return optax.apply_updates(trainable, updates), opt_state, loss

    return jax.jit(body, in_shardings=(tr_sh, opt_sh, fr_sh, batch_sharding), out_shardings=(tr_sh, opt_sh, rep),
                   donate_argnums=(0, 1) if donate else ())

  def step(trainable, opt_state, frozen, batch):
    key = jax.tree.structure(opt_state)
    if key not in cache:
      cache[key] = build(opt_state)
    return cache[key](trainable, opt_state, frozen, batch)

  step.build = build  # for .lower()/.compile() inspection
  return step


def init_opt_state(optimizer: optax.GradientTransformation, trainable: Any, trainable_shardings: Any, mesh: Mesh,
                   memory_kind: str | None = None) -> Any:
  """``optimizer.init(trainable)`` created directly with parameter-like shardings."""
  abstract = jax.eval_shape(optimizer.init, trainable)
  sh = opt_state_shardings(optimizer, abstract, trainable_shardings, mesh)
  state = jax.jit(optimizer.init, out_shardings=sh)(trainable)
  return jax.device_put(state, with_memory_kind(sh, memory_kind)) if memory_kind else state


def make_pmap_train_step(loss_fn: Callable[[Any, Any], jax.Array], optimizer: optax.GradientTransformation, *,
                         axis_name: str = "devices", donate: bool = True, remat: bool = False,
                         remat_policy: Callable | None = None):
  """The ``jax.pmap`` data-parallel step for code that still uses pmap.

  Arguments carry a leading device axis: trainable/opt_state/frozen from
  :func:`replicate`, the batch from :func:`shard_batch`. Gradients and the loss
  are averaged across devices with ``jax.lax.pmean``, so with equal per-device
  batches the step equals the single-device step on the whole batch.
  """
  vg = _loss_and_grad(loss_fn, remat, remat_policy)

  def body(trainable, opt_state, frozen, batch):
    loss, grads = vg(trainable, frozen, batch)
    grads = jax.lax.pmean(grads, axis_name)
    updates, opt_state = optimizer.update(grads, opt_state, trainable)
    return optax.apply_updates(trainable, updates), opt_state, jax.lax.pmean(loss, axis_name)

  return jax.pmap(body, axis_name=axis_name, donate_argnums=(0, 1) if donate else ())


def replicate(tree: Any, devices: Sequence[Any] | None = None) -> Any:
  """Copies every leaf onto each local device (leading device axis) for pmap."""
  devices = list(jax.local_devices() if devices is None else devices)
  mesh = Mesh(np.asarray(devices, dtype=object), ("devices",), axis_types=(AxisType.Auto,))
  s = NamedSharding(mesh, P("devices"))
  return jax.tree.map(lambda x: jax.device_put(jnp.broadcast_to(x, (len(devices),) + tuple(np.shape(x))), s), tree)


def unreplicate(tree: Any) -> Any:
  """The first device's copy of a replicated tree."""
  return jax.tree.map(lambda x: x[0], tree)


def shard_batch(batch: Any, n: int | None = None) -> Any:
  """Splits the leading axis of every batch leaf into ``(n, b/n, ...)`` for pmap."""
  n = jax.local_device_count() if n is None else n

  def f(x):
    if x.shape[0] % n:
      raise ValueError(f"batch size {x.shape[0]} is not divisible by {n} devices; use a multiple of {n}")
    return x.reshape((n, x.shape[0] // n) + tuple(x.shape[1:]))

  return jax.tree.map(f, batch)
