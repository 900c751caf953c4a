"""Run unmodified Flax NNX models with LoRA unmerged (and quantized bases).

``apply(graphdef, adapted_state, x)`` merges the module and calls it while its
``nnx.Linear``, ``nnx.LinearGeneral`` and ``nnx.Einsum`` instances compute
LoRA/quantized kernels through :mod:`jax_lora._src.lora`. Interception is scoped
to the call: the module objects that ``nnx.merge`` builds for this call are
switched to private subclasses (their ``__call__`` computes unmerged) and back;
no class attribute is changed, so other threads and other NNX code in the
process are untouched. Inside ``nnx.scan``/``nnx.vmap``/``nnx.remat`` the
modules NNX rebuilds keep the subclass (it is part of the graph), so stacked
layers run unmerged too.

A shape-only probe (``jax.eval_shape`` with the states as arguments, so NNX
transforms see variables of their own trace) runs the call first; a kernel the
model uses some other way (``w.T``, a ``LinearGeneral`` with ``batch_axis``...)
raises a ``LoraUsageError`` naming it and is merged, with a warning.
:func:`apply_with_state` also returns the updated non-parameter states
(BatchNorm statistics, RNG counters).
"""

from __future__ import annotations

import contextlib
import re
import threading
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from jax_lora._src import lora as ops
from jax_lora._src.fallback import is_special, merge_unreached, merge_until_traced, special_paths
from jax_lora._src.trace import matmul_params
from jax_lora._src.tree import is_variable, materialize

__all__ = ["apply", "apply_with_state", "infer_layouts"]

_local = threading.local()


def _bias(m):
  return m.bias.get_value() if m.bias is not None else None


def _rng():
  return getattr(_local, "rng", None)


def _linear(m, kernel, x):
  return ops.dense(x, kernel, _bias(m), n_in=1, dtype=m.dtype, precision=m.precision, rng=_rng())


def _linear_general(m, kernel, x):
  if m.batch_axis:
    return None
  return ops.dense_general(x, kernel, _bias(m), tuple(m.axis), dtype=m.dtype, precision=m.precision, rng=_rng())


def _einsum(m, kernel, x, einsum_str=None):
  spec = (einsum_str or m.einsum_str or "").replace(" ", "")
  if ops.parse_einsum(spec) is None:
    return None
  y = ops.einsum(spec, x, kernel, dtype=m.dtype, precision=m.precision, rng=_rng())
  if m.bias is not None:
    bshape = m._infer_broadcasted_bias_shape(spec, x, jax.ShapeDtypeStruct(kernel.shape, jnp.float32))
    y = y + jnp.reshape(_bias(m).astype(y.dtype), bshape)
  return y


class _View:
  """``module`` with some attributes replaced, for calling its class's ``__call__`` on other kernels."""

  def __init__(self, module, **overrides):
    self._module = module
    self.__dict__.update(overrides)

  def __getattr__(self, name):
    return getattr(self._module, name)


def _conv(m, kernel, x):
  """PEFT's Conv LoRA, unmerged: ``conv(x, W) + s · conv(x, A) @ B`` (A a ``(*window, in, r)``
  conv kernel, B ``(r, out)``), both convolutions computed by ``nnx.Conv.__call__`` itself."""
  if m.feature_group_count != 1 or m.mask is not None or m.conv_general_dilated is not jax.lax.conv_general_dilated:
    return None
  lw = kernel if isinstance(kernel, ops.LoraWeight) else None
  base = lw.w if lw is not None else kernel
  dtype = ops.compute_dtype(x, base, m.dtype)
  y = nnx.Conv.__call__(_View(m, kernel=materialize(base, dtype), bias=_bias(m)), x)
  if lw is None:
    return y
  if lw.layout != "i" * (len(lw.layout) - 1) + "o" or lw.m is not None:
    return None
  ops.note_consumed(lw.path)
  xd = ops.lora_dropout(x, lw.dropout, _rng(), lw.path)
  xa = nnx.Conv.__call__(_View(m, kernel=lw.a.astype(dtype), bias=None, use_bias=False), xd)
  return y + ops.dense(xa * jnp.asarray(lw.scale, dtype), lw.b.astype(dtype), dtype=dtype)


def _refuse(cls, kernel, what):
  if isinstance(kernel, ops.LoraWeight):
    raise ops.LoraUsageError(kernel.path, f"{cls.__name__} {what}")
  raise TypeError(f"jax_lora cannot run a quantized kernel through {cls.__name__} {what}")


def _make(cls, handler):
  """A private subclass of ``cls`` whose call runs ``handler`` on special kernels."""

  def __call__(self, inputs, *args, **kwargs):
    kernel = self.kernel.get_value()
    if not is_special(kernel):
      return cls.__call__(self, inputs, *args, **kwargs)
    if kwargs.get("out_sharding", None) is None:  # NNX layers pass out_sharding=None by default
      kwargs.pop("out_sharding", None)
    if args or {k: v for k, v in kwargs.items() if k != "einsum_str"}:
      _refuse(cls, kernel, f"called with extra arguments {sorted(kwargs) or len(args)}")
    if getattr(self, "dot_general", None) not in (None, jax.lax.dot_general) or getattr(
        self, "dot_general_cls", None) is not None or getattr(self, "preferred_element_type", None) is not None:
      _refuse(cls, kernel, "with a custom dot_general or preferred_element_type")
    out = handler(self, kernel, inputs, **kwargs)
    if out is None:
      _refuse(cls, kernel, "with these settings (batch_axis, an einsum with '...')")
    return out

  return type(f"_Lora{cls.__name__}", (cls,), {"__call__": __call__, "__module__": __name__})


_SUBCLASSES = {cls: _make(cls, h) for cls, h in
               ((nnx.Linear, _linear), (nnx.LinearGeneral, _linear_general), (nnx.Einsum, _einsum),
                (nnx.Conv, _conv))}


@contextlib.contextmanager
def _intercepted(module, dropout_rng=None):
  """Switches the exact-type Linear/LinearGeneral/Einsum objects of ``module`` (built for
  this call) to the intercepting subclasses, and back on exit."""
  swapped = []
  for _, node in nnx.iter_graph(module):
    sub = _SUBCLASSES.get(type(node))
    if sub is not None:
      object.__setattr__(node, "__class__", sub)
      swapped.append((node, type(node).__mro__[1]))
  prev = getattr(_local, "rng", None)
  _local.rng = dropout_rng
  try:
    yield module
  finally:
    _local.rng = prev
    for node, cls in swapped:
      object.__setattr__(node, "__class__", cls)


def _run(graphdef, params, others, method, args, kwargs, dropout_rng):
  """Builds the module from copies of the states, calls it intercepted; returns (out, module)."""
  module = nnx.merge(graphdef, params, *others, copy=True)
  with _intercepted(module, dropout_rng):
    out = getattr(module, method or "__call__")(*args, **kwargs)
  return out, module


def _probe(graphdef, adapted, others, method, args, kwargs) -> frozenset:
  """Paths of the special kernels that can stay in place (see the module docstring)."""
  special = special_paths(adapted)
  _, merged = merge_until_traced(
      adapted, lambda p: jax.eval_shape(lambda p, o: _run(graphdef, p, o, method, args, kwargs, None)[0], p,
                                        tuple(others)), warn=False)
  return frozenset(special - merged)

def _updated(old, module):
  """``old`` (a state from ``nnx.split``) with the module's current values at its paths."""
  now = {kp: v for kp, v in jax.tree_util.tree_flatten_with_path(nnx.state(module), is_leaf=is_variable)[0]}

  def f(kp, v):
    cur = now.get(kp)
    if cur is None or not is_variable(v):
      return v
    return v.replace(cur.get_value())

  return jax.tree_util.tree_map_with_path(f, old, is_leaf=is_variable)


def apply_with_state(graphdef: Any, adapted: Any, *args, others: tuple = (), method: str | None = None,
                     dropout_rng: jax.Array | None = None, **kwargs):
  """Like :func:`apply`, and returns ``(out, updated_others)``.

  ``updated_others`` is a tuple like ``others`` holding the values the call left
  in those variables: BatchNorm's running statistics, RNG-stream counters
  (``nnx.Dropout``), caches. Pass it as ``others`` to the next call (two
  training calls then draw different dropout masks). The params are not
  returned: they are the inputs, unchanged (the A/B factors train through
  gradients, not mutation).
  """
  fast = _probe(graphdef, adapted, others, method, args, kwargs)
  out, module = _run(graphdef, merge_unreached(adapted, fast), tuple(others), method, args, kwargs, dropout_rng)
  return out, tuple(_updated(o, module) for o in others)


def apply(graphdef: Any, adapted: Any, *args, others: tuple = (), method: str | None = None,
          dropout_rng: jax.Array | None = None, **kwargs):
  """Calls ``nnx.merge(graphdef, adapted, *others).method(*args, **kwargs)`` with LoRA unmerged.

  Returns only the output; :func:`apply_with_state` also returns the updated
  ``others`` (BatchNorm statistics, RNG counters), which this call discards.

  Args:
    graphdef: from ``nnx.split(model, ...)``.
    adapted: the (params) state from ``nnx.split`` after :func:`jax_lora.init_lora`.
    *args: the call's positional arguments.
    others: further states from ``nnx.split`` (e.g. batch statistics, RNG state).
    method: method name (default ``__call__``).
    dropout_rng: PRNG key for LoRA dropout; None disables it.
    **kwargs: the call's keyword arguments.
  """
  return apply_with_state(graphdef, adapted, *args, others=others, method=method, dropout_rng=dropout_rng,
                          **kwargs)[0]


def infer_layouts(graphdef: Any, params: Any, *args, others: tuple = (), method: str | None = None,
                  **kwargs) -> dict[str, str]:
  """LoRA layouts ('b'/'i'/'o' per axis) of every kernel used as a matmul operand, by tracing.

  The NNX counterpart of :func:`jax_lora.linen.infer_layouts`: 'i' marks the
  axes a matmul contracts, 'o' the others, 'b' axes that ``nnx.scan``/``nnx.vmap``
  stack (layers). Pass the result as ``LoraConfig(layouts=...)`` (or
  ``QuantConfig(layouts=...)``).
  """
  def f(p, o):
    return getattr(nnx.merge(graphdef, p, *o, copy=True), method or "__call__")(*args, **kwargs)

  return {re.escape(p): lay for p, lay in matmul_params(f, params, tuple(others)).items()}
