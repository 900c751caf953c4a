"""Gradient checkpointing (rematerialization) policies for LoRA/QLoRA models.

One name picks what a checkpointed layer keeps for the backward pass:

- ``"none"``: no checkpointing (every activation is kept; fastest, most memory).
- ``"full"``: nothing inside the layer is saved (``nothing_saveable``); the layer's
  forward pass runs again in the backward pass. Only the layer inputs stay.
- ``"dots"``: matmul outputs without batch dimensions are saved
  (``dots_with_no_batch_dims_saveable``): the projections are not recomputed,
  the element-wise work and attention are.
- ``"offload"``: like ``"full"``, but the layer input (marked with
  :func:`tag_layer_input`) is moved to host memory (``pinned_host``) between the
  forward and backward passes (``save_and_offload_only_these_names``). Needs a
  backend with host memory kinds; :func:`remat_policy` raises otherwise.

The LoRA custom VJP (``jax_lora.dot`` and the intercepted Flax layers) and quantized bases work inside
``jax.checkpoint``: with ``"full"`` a quantized kernel is dequantized once in
the forward pass and again in the recomputation, never stored in float.

XLA:CPU drops ``jax.checkpoint``'s CSE barriers (``optimization_barrier``) before
common-subexpression elimination, so a plain ``jax.checkpoint`` outside a loop
saves nothing there: the recomputation is merged back into the forward pass.
:func:`checkpoint` and :func:`remat_module` therefore wrap the checkpointed
function in a custom VJP whose backward pass makes the saved residuals depend
on the incoming cotangent (``+ 0·g[0]``, which XLA cannot fold), so the
recomputation can neither be merged nor hoisted, on every backend. Inside
``nn.scan`` (``scan=True``) the loop already separates them and plain
``nn.remat`` is used.

>>> import flax.linen as nn
>>> from jax_lora.remat import checkpoint, remat_module
>>> Layer = remat_module(nn.Dense, "full")                          # a Linen layer class
>>> f = checkpoint(lambda w, x: jnp.tanh(x @ w), "dots")           # a plain function
>>> float(jax.grad(lambda w: f(w, jnp.ones((2, 3))).sum())(jnp.eye(3))[0, 0]) > 0
True
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax.core import lift as _lift
from flax.linen import transforms as _transforms
from jax.ad_checkpoint import checkpoint_name

__all__ = ["POLICIES", "LAYER_INPUT", "remat_policy", "check_policy", "tag_layer_input", "remat_module",
           "checkpoint"]

POLICIES = ("none", "full", "dots", "offload")
LAYER_INPUT = "jax_lora_layer_input"  # checkpoint_name of a layer's input (offloaded by "offload")


def check_policy(name: str, what: str = "remat") -> str:
  """Returns ``name`` if it is a known policy, else raises a one-line ValueError naming ``what``."""
  if name not in POLICIES:
    raise ValueError(f"{what}={name!r} is unknown; use one of {', '.join(POLICIES)}")
  return name


def _host_memory_ok() -> tuple[bool, str]:
  dev = jax.devices()[0]
  try:
    kinds = [m.kind for m in dev.addressable_memories()]
  except Exception:  # noqa: BLE001 - a backend without the memories API has no host memory kinds
    kinds = []
  return "pinned_host" in kinds, f"{dev.platform} (memory kinds {kinds})"


def remat_policy(name: str) -> Callable | None:
  """The ``jax.checkpoint`` policy of a policy name; None for ``"none"`` (no checkpointing).

  Raises:
    ValueError: an unknown name, or ``"offload"`` on a backend without ``pinned_host`` memory.
  """
  check_policy(name)
  if name == "none":
    return None
  if name == "full":
    return jax.checkpoint_policies.nothing_saveable
  if name == "dots":
    return jax.checkpoint_policies.dots_with_no_batch_dims_saveable
  ok, where = _host_memory_ok()
  if not ok:
    raise ValueError(f"remat='offload' needs host memory ('pinned_host'), which the {where} backend lacks; "
                     "use remat='full' instead")
  return jax.checkpoint_policies.save_and_offload_only_these_names(
      names_which_can_be_saved=(), names_which_can_be_offloaded=(LAYER_INPUT,), offload_src="device",
      offload_dst="pinned_host")


def tag_layer_input(x: Any) -> Any:
  """Marks a layer's input (a pytree of arrays) as the value ``"offload"`` moves to host memory.

  An identity otherwise; call it first thing in a checkpointed layer.
  """
  return checkpoint_name(x, LAYER_INPUT)


def _tie(tree: Any, g: Any) -> Any:
  """``tree`` with ``0·g[0]`` added to every array leaf: the same values, computed after ``g``."""
  gs = [x for x in jax.tree.leaves(g) if jnp.issubdtype(x.dtype, jnp.inexact) and x.size]
  if not gs:
    return tree
  zero = jax.lax.optimization_barrier(gs[0].reshape(-1)[0]).astype(jnp.float32) * 0

  def add(v):
    if not hasattr(v, "dtype") or v.dtype == jax.dtypes.float0 or jax.dtypes.issubdtype(v.dtype, jax.dtypes.extended):
      return v
    return v + zero.astype(v.dtype)

  return jax.tree.map(add, tree)


def _tied(fn: Callable, policy: Callable) -> Callable:
  """``jax.checkpoint(fn, policy)`` whose recomputation runs only once the cotangent exists."""

  @jax.custom_vjp
  def f(*args):
    return fn(*args)

  def fwd(*args):
    return jax.vjp(jax.checkpoint(fn, policy=policy, prevent_cse=False), *args)

  def bwd(vjp_fn, g):
    return _tie(vjp_fn, g)(g)

  f.defvjp(fwd, bwd)
  return f


def _core_checkpoint(fn, variables=True, rngs=True, policy=None):
  """Flax's ``lift.checkpoint`` with :func:`_tied` in place of ``jax.checkpoint`` (positional args)."""

  def inner(scope_fn, repack_fn, variable_groups, rng_groups, *args):
    def rematted(variable_groups, rng_groups, *args):
      scope = scope_fn(variable_groups, rng_groups)
      y = fn(scope, *args)
      return y, repack_fn(scope)

    return _tied(rematted, policy)(variable_groups, rng_groups, *args)

  return _lift.pack(inner, (variables,), (variables,), (rngs,), name="remat")


def remat_module(cls: type[nn.Module], name: str, *, scan: bool = False,
                 methods: tuple[str, ...] | None = None) -> type[nn.Module]:
  """The Linen class ``cls`` checkpointed with the policy ``name`` (``cls`` itself for ``"none"``).

  Args:
    cls: a Linen module class (e.g. a decoder layer); its params may be LoraWeights
      and quantized arrays (use it under :func:`jax_lora.linen.apply`). Its
      checkpointed methods take positional arguments only.
    name: a policy name (:data:`POLICIES`).
    scan: the class will be wrapped by ``nn.scan``: then plain ``nn.remat`` with
      ``prevent_cse=False`` (the loop keeps XLA from merging the recomputation).
    methods: the methods to checkpoint (default ``__call__``).
  """
  policy = remat_policy(name)
  if name == "none":
    return cls
  kw = dict(methods=list(methods)) if methods else {}
  if scan:
    return nn.remat(cls, policy=policy, prevent_cse=False, **kw)
  return _transforms.lift_transform(_core_checkpoint, cls, policy=policy, **kw)


def checkpoint(fn: Callable, name: str) -> Callable:
  """``fn`` checkpointed with the policy ``name`` (``fn`` itself for ``"none"``), positional args.

  For hand-written layers (e.g. with :func:`jax_lora.dot`): ``fn`` may take
  LoraWeights and quantized arrays among its arguments. Unlike a plain
  ``jax.checkpoint`` the recomputation survives XLA:CPU's CSE (see the module doc).
  """
  policy = remat_policy(name)
  if name == "none":
    return fn
  return _tied(fn, policy)
