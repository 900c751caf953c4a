"""Run unmodified Flax NNX models with LoRA unmerged (and quantized bases).

``apply(graphdef, adapted_state, x)`` merges the module and calls it while
``nnx.Linear``, ``nnx.LinearGeneral`` and ``nnx.Einsum`` compute LoRA/quantized
kernels through :mod:`jax_lora.ops`. Kernels the fast path does not reach are
found by a shape-only probe and merged, with a warning naming them.
"""

from __future__ import annotations

import contextlib
import threading
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from jax_lora import ops
from jax_lora.linen import _fallback
from jax_lora.lora import LoraWeight, _leaves, _map, is_quantized

__all__ = ["apply", "intercept"]

_local = threading.local()


def _special(k) -> bool:
  return isinstance(k, LoraWeight) or is_quantized(k)


def _bias(m):
  return m.bias.get_value() if m.bias is not None else None


def _linear(m, kernel, x):
  return ops.dense(x, kernel, _bias(m), n_in=1, dtype=m.dtype, precision=m.precision,
                   rng=getattr(_local, "rng", None))


def _linear_general(m, kernel, x):
  if m.batch_axis:
    return None
  return ops.dense_general(x, kernel, _bias(m), tuple(m.axis), dtype=m.dtype, precision=m.precision,
                           rng=getattr(_local, "rng", None))


def _einsum(m, kernel, x, einsum_str=None):
  spec = (einsum_str or m.einsum_str or "").replace(" ", "")
  if ops._parse_einsum(spec) is None:
    return None
  y = ops.einsum(spec, x, kernel, dtype=m.dtype, precision=m.precision, rng=getattr(_local, "rng", None))
  if m.bias is not None:
    bshape = m._infer_broadcasted_bias_shape(spec, x, jax.ShapeDtypeStruct(kernel.shape, jnp.float32))
    y = y + jnp.reshape(_bias(m).astype(y.dtype), bshape)
  return y


_HANDLERS = {nnx.Linear: _linear, nnx.LinearGeneral: _linear_general, nnx.Einsum: _einsum}


def _patched(cls, orig):
  handler = _HANDLERS[cls]

  def __call__(self, inputs, *args, **kwargs):
    probe = getattr(_local, "probe", None)
    if type(self) is not cls:
      return orig(self, inputs, *args, **kwargs)
    if probe is not None:
      seen, paths = probe
      if id(self) in paths and not (args or {k: v for k, v in kwargs.items() if k != "einsum_str"}):
        seen.add(paths[id(self)] + "/kernel")
      return orig(self, inputs, *args, **kwargs)
    kernel = self.kernel.get_value()
    if not _special(kernel):
      return orig(self, inputs, *args, **kwargs)
    out = handler(self, kernel, inputs, *args, **kwargs)
    if out is None:
      raise NotImplementedError(f"jax_lora cannot run this {cls.__name__} call unmerged")
    return out

  return __call__


@contextlib.contextmanager
def intercept(dropout_rng: jax.Array | None = None):
  """Context in which nnx Linear/LinearGeneral/Einsum run LoRA/quantized kernels unmerged."""
  originals = {cls: cls.__call__ for cls in _HANDLERS}
  prev = getattr(_local, "rng", None)
  _local.rng = dropout_rng
  try:
    for cls, orig in originals.items():
      cls.__call__ = _patched(cls, orig)
    yield
  finally:
    for cls, orig in originals.items():
      cls.__call__ = orig
    _local.rng = prev


def _module_paths(module) -> dict[int, str]:
  return {id(node): "/".join(str(p) for p in path) for path, node in nnx.iter_graph(module)
          if isinstance(node, nnx.Module)}


def _call(graphdef, state, others, method, args, kwargs):
  module = nnx.merge(graphdef, state, *others)
  fn = getattr(module, method or "__call__")
  return module, fn(*args, **kwargs)


def _probe(graphdef, adapted, others, method, args, kwargs) -> frozenset:
  seen: set[str] = set()

  def run():
    state = _map(lambda p, v: jnp.zeros(v.shape, jnp.float32) if _special(v) else v, adapted)
    module = nnx.merge(graphdef, state, *others)
    _local.probe = (seen, _module_paths(module))
    try:
      with intercept():
        return getattr(module, method or "__call__")(*args, **kwargs)
    finally:
      _local.probe = None

  jax.eval_shape(run)
  special = {p for p, v in _leaves(adapted).items() if _special(v)}
  if special - seen:
    try:  # hand-written layers using jax_lora.dot, or unused kernels: keep them all
      with intercept():
        jax.eval_shape(lambda: getattr(nnx.merge(graphdef, adapted, *others), method or "__call__")(*args, **kwargs))
      seen = special
    except Exception:  # noqa: BLE001 - merge what the fast path does not reach
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
  state = _fallback(adapted, fast)
  with intercept(dropout_rng):
    module = nnx.merge(graphdef, state, *others)
    return getattr(module, method or "__call__")(*args, **kwargs)
