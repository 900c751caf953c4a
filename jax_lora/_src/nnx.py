"""Run unmodified Flax NNX models with LoRA unmerged (and quantized bases).

``apply(graphdef, adapted_state, x)`` merges the module and calls it while its
``nnx.Linear``, ``nnx.LinearGeneral`` and ``nnx.Einsum`` instances compute
LoRA/quantized kernels through :mod:`jax_lora._src.lora`. Interception is scoped
to the call: the module objects that ``nnx.merge`` builds for this call are
switched to private subclasses (their ``__call__`` computes unmerged) and back;
no class attribute is changed, so other threads and other NNX code in the
process are untouched. Kernels the fast path does not reach are found by a
shape-only probe and merged, with a warning naming them.
"""

from __future__ import annotations

import contextlib
import threading
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from jax_lora._src import lora as ops
from jax_lora._src.fallback import is_special, merge_unreached, special_paths
from jax_lora._src.tree import map_leaves

__all__ = ["apply"]

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


def _make(cls, handler):
  """A private subclass of ``cls`` whose call runs ``handler`` on special kernels."""

  def __call__(self, inputs, *args, **kwargs):
    probe = getattr(_local, "probe", None)
    if probe is not None:  # shape-only probe: record the calls the fast path can take
      seen, paths = probe
      if id(self) in paths and not (args or {k: v for k, v in kwargs.items() if k != "einsum_str"}):
        seen.add(paths[id(self)] + "/kernel")
      return cls.__call__(self, inputs, *args, **kwargs)
    kernel = self.kernel.get_value()
    if not is_special(kernel):
      return cls.__call__(self, inputs, *args, **kwargs)
    out = handler(self, kernel, inputs, *args, **kwargs)
    if out is None:
      raise NotImplementedError(f"jax_lora cannot run this {cls.__name__} call unmerged; the probe should "
                                "have merged it, please report it")
    return out

  return type(f"_Lora{cls.__name__}", (cls,), {"__call__": __call__, "__module__": __name__})


_SUBCLASSES = {cls: _make(cls, h) for cls, h in
               ((nnx.Linear, _linear), (nnx.LinearGeneral, _linear_general), (nnx.Einsum, _einsum))}


def _module_paths(module) -> dict[int, str]:
  return {id(node): "/".join(str(p) for p in path) for path, node in nnx.iter_graph(module)
          if isinstance(node, nnx.Module)}


@contextlib.contextmanager
def _intercepted(module, dropout_rng=None, probe=None):
  """Switches the exact-type Linear/LinearGeneral/Einsum objects of ``module`` (built for
  this call) to the intercepting subclasses, and back on exit."""
  swapped = []
  for _, node in nnx.iter_graph(module):
    sub = _SUBCLASSES.get(type(node))
    if sub is not None:
      object.__setattr__(node, "__class__", sub)
      swapped.append((node, type(node).__mro__[1]))
  prev = getattr(_local, "rng", None), getattr(_local, "probe", None)
  _local.rng, _local.probe = dropout_rng, probe
  try:
    yield module
  finally:
    _local.rng, _local.probe = prev
    for node, cls in swapped:
      object.__setattr__(node, "__class__", cls)


def _call(module, method, args, kwargs):
  return getattr(module, method or "__call__")(*args, **kwargs)


def _probe(graphdef, adapted, others, method, args, kwargs) -> frozenset:
  seen: set[str] = set()

  def run():
    state = map_leaves(lambda p, v: jnp.zeros(v.shape, jnp.float32) if is_special(v) else v, adapted)
    module = nnx.merge(graphdef, state, *others)
    with _intercepted(module, probe=(seen, _module_paths(module))):
      return _call(module, method, args, kwargs)

  jax.eval_shape(run)
  special = special_paths(adapted)
  if special - seen:
    def as_is():
      module = nnx.merge(graphdef, adapted, *others)
      with _intercepted(module):
        return _call(module, method, args, kwargs)
    try:  # hand-written layers using jax_lora.dot, or unused kernels: keep them all
      jax.eval_shape(as_is)
      seen = special
    except ops.LoraUsageError:  # merge what the fast path does not reach
      pass
  return frozenset(seen)


def apply(graphdef: Any, adapted: Any, *args, others: tuple = (), method: str | None = None,
          dropout_rng: jax.Array | None = None, **kwargs):
  """Calls ``nnx.merge(graphdef, adapted, *others).method(*args, **kwargs)`` with LoRA unmerged.

  Args:
    graphdef: from ``nnx.split(model, ...)``.
    adapted: the (params) state from ``nnx.split`` after :func:`jax_lora.init_lora`.
    *args: the call's positional arguments.
    others: further states from ``nnx.split`` (e.g. batch statistics, RNG state).
    method: method name (default ``__call__``).
    dropout_rng: PRNG key for LoRA dropout; None disables it.
    **kwargs: the call's keyword arguments.
  """
  fast = _probe(graphdef, adapted, others, method, args, kwargs)
  module = nnx.merge(graphdef, merge_unreached(adapted, fast), *others)
  with _intercepted(module, dropout_rng):
    return _call(module, method, args, kwargs)
