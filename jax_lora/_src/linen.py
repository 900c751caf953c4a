"""Run unmodified Flax Linen models with LoRA unmerged (and quantized bases).

``apply(model, adapted, x)`` intercepts ``nn.Dense``, ``nn.DenseGeneral`` and
``nn.Einsum`` calls (``nn.intercept_methods``): when a layer's kernel is a
:class:`~jax_lora.LoraWeight` or a quantized array, the layer is computed by
:mod:`jax_lora.ops` (``x@W + s·(x@A)@B``, dequantizing inside the step).
LoRA factors live at the kernel's own path, so ``nn.scan``-stacked layers slice
them along with the kernel. Any targeted kernel that the model uses some other
way is found by a shape-only probe and merged instead, with a warning naming it.
"""

from __future__ import annotations

import contextlib
import re
import threading
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jax_lora._src import lora as ops
from jax_lora._src.fallback import is_special, merge_unreached, plain_shapes, special_paths
from jax_lora._src.tree import leaves, materialize

__all__ = ["apply", "intercept", "infer_layouts"]

_local = threading.local()


def _module_path(m: nn.Module) -> str:
  return "/".join(str(p) for p in m.path)


def _bias(m: nn.Module):
  return m.get_variable("params", "bias") if getattr(m, "use_bias", False) else None


def _call_dense(m: nn.Dense, kernel, x, rng):
  return ops.dense(x, kernel, _bias(m), n_in=1, dtype=m.dtype, precision=m.precision, rng=rng)


def _call_dense_general(m: nn.DenseGeneral, kernel, x, rng):
  if m.batch_dims not in ((), None):
    return None
  axis = m.axis if isinstance(m.axis, tuple) else (m.axis,)
  return ops.dense_general(x, kernel, _bias(m), axis, dtype=m.dtype, precision=m.precision, rng=rng)


def _call_einsum(m: nn.Einsum, kernel, x, rng, einsum_str=None):
  spec = (einsum_str or m.einsum_str or "").replace(" ", "")
  if ops.parse_einsum(spec) is None:
    return None
  y = ops.einsum(spec, x, kernel, dtype=m.dtype, precision=m.precision, rng=rng)
  if m.use_bias:
    _, bshape = m._get_bias_shape(spec, x, jax.ShapeDtypeStruct(kernel.shape, jnp.float32))
    y = y + jnp.reshape(m.get_variable("params", "bias").astype(y.dtype), bshape)
  return y


def _call_embed(m: nn.Embed, table, ids, rng):
  return ops.embed(ids, table, dtype=m.dtype)


def _call_conv(m: nn.Conv, kernel, x, rng):
  """PEFT's Conv LoRA, unmerged: ``conv(x, W) + s · conv(x, A) @ B`` with ``A`` a conv kernel
  ``(*window, in, r)`` and ``B`` ``(r, out)`` (layout 'i' for the window and input axes,
  'o' for the output). Flax's own Conv computes both convolutions (same padding,
  strides, dilations), run as unbound clones on these kernels."""
  lw = kernel if isinstance(kernel, ops.LoraWeight) else None
  base = lw.w if lw is not None else kernel
  dtype = ops.compute_dtype(x, base, m.dtype)
  params = {"kernel": materialize(base, dtype)}
  if m.use_bias:
    params["bias"] = m.get_variable("params", "bias")
  y = m.clone(parent=None).apply({"params": params}, x)
  if lw is None:
    return y
  if lw.layout != "i" * (len(lw.layout) - 1) + "o" or lw.m is not None:
    raise ValueError(f"conv kernel {lw.path!r} has LoRA layout {lw.layout!r}{' with DoRA' if lw.m is not None else ''}; "
                     f"a conv kernel (*window, in, out) needs {'i' * (len(lw.layout) - 1) + 'o'!r} and no DoRA")
  ops.note_consumed(lw.path)
  xd = ops.lora_dropout(x, lw.dropout, rng, lw.path)
  xa = m.clone(parent=None, features=lw.rank, use_bias=False).apply({"params": {"kernel": lw.a.astype(dtype)}}, xd)
  return y + ops.dense(xa * jnp.asarray(lw.scale, dtype), lw.b.astype(dtype), dtype=dtype)


def _handler(m):
  # Exact types only: subclasses may change the math.
  return {nn.Dense: _call_dense, nn.DenseGeneral: _call_dense_general, nn.Einsum: _call_einsum,
          nn.Embed: _call_embed, nn.Conv: _call_conv}.get(type(m))


def _param_name(m) -> str:
  return "embedding" if type(m) is nn.Embed else "kernel"


def _interceptor(next_fun, args, kwargs, context):
  m = context.module
  if type(m) is nn.Embed and context.method_name == "attend" and getattr(_local, "probe", None) is None:
    table = m.get_variable("params", "embedding")
    if isinstance(table, ops.LoraWeight):  # tied head: trainable tokens run unmerged, LoRA is refused
      return ops.attend(args[0] if args else kwargs["query"], table, dtype=m.dtype)
  handler = _handler(m) if context.method_name == "__call__" else None
  name = _param_name(m)
  if handler is None or not m.has_variable("params", name):
    return next_fun(*args, **kwargs)
  probe = getattr(_local, "probe", None)
  if probe is not None:  # shape-only probe: which kernels can the fast path take?
    seen, bad = probe
    (bad if _unsupported(m, args[1:], kwargs) else seen).add(_module_path(m) + "/" + name)
    return next_fun(*args, **kwargs)
  kernel = m.get_variable("params", name)
  if not is_special(kernel):
    return next_fun(*args, **kwargs)
  rng = getattr(_local, "rng", None)
  x = args[0] if args else kwargs.pop("inputs")
  extra = args[1:]
  if handler is _call_einsum:
    out = handler(m, kernel, x, rng, *extra, **kwargs)
  elif extra or kwargs:
    out = None
  else:
    out = handler(m, kernel, x, rng)
  if out is None:
    raise NotImplementedError(
        f"jax_lora cannot run {type(m).__name__} at {_module_path(m)!r} with these arguments unmerged; "
        "this should have been caught by the probe, please report it")
  return out


@contextlib.contextmanager
def intercept(dropout_rng: jax.Array | None = None):
  """Context in which Linen Dense/DenseGeneral/Einsum layers run LoRA/quantized kernels.

  Use it around your own ``model.apply({"params": adapted}, ...)`` when every
  targeted kernel belongs to such a layer; :func:`apply` also handles the rest.
  """
  prev = getattr(_local, "rng", None)
  _local.rng = dropout_rng
  try:
    with nn.intercept_methods(_interceptor):
      yield
  finally:
    _local.rng = prev


def _intercepted_paths(model, adapted, args, kwargs, method) -> tuple[set[str], set[str]]:
  """Kernels of interceptable layers, split into (computable, unsupported call), by one trace."""
  seen: set[str] = set()
  bad: set[str] = set()
  prev = getattr(_local, "probe", None)
  _local.probe = (seen, bad)
  try:
    with nn.intercept_methods(_interceptor):
      jax.eval_shape(lambda p: model.apply({"params": p}, *args, method=method, **kwargs), plain_shapes(adapted))
  finally:
    _local.probe = prev
  return seen, bad


_probe_cache: dict[Any, frozenset] = {}


def _cache_key(model, adapted, args, kwargs, method):
  try:
    mkey = hash(model)
  except TypeError:
    mkey = id(model)
  struct = jax.tree.structure(adapted)
  shapes = tuple((getattr(x, "shape", None), str(getattr(x, "dtype", type(x)))) for x in jax.tree.leaves((args, kwargs)))
  return (type(model), mkey, struct, shapes, method)


def _unsupported(m, args, kwargs) -> bool:
  # custom matmuls (e.g. AQT) or output dtypes change the math: leave those layers to Flax.
  if getattr(m, "dot_general", None) is not None or getattr(m, "dot_general_cls", None) is not None:
    return True
  if getattr(m, "preferred_element_type", None) is not None:
    return True
  if type(m) is nn.DenseGeneral and m.batch_dims not in ((), None):
    return True
  if type(m) is nn.Conv:
    k = m.get_variable("params", "kernel")
    lay = getattr(k, "layout", None)
    if m.feature_group_count != 1 or m.mask is not None or getattr(m, "conv_general_dilated", None) is not None or (
        lay is not None and lay != "i" * (len(lay) - 1) + "o"):
      return True
  if type(m) is nn.Einsum:
    spec = kwargs.get("einsum_str") or (args[1] if len(args) > 1 else None) or m.einsum_str
    return ops.parse_einsum(spec or "") is None
  return type(m) is not nn.Einsum and (len(args) > 1 or bool(kwargs))


def _probe(model, adapted, args, kwargs, method) -> frozenset:
  key = _cache_key(model, adapted, args, kwargs, method)
  if key not in _probe_cache:
    seen, bad = _intercepted_paths(model, adapted, args, kwargs, method)
    special = special_paths(adapted)
    if special - (seen - bad) and not bad and _runs_as_is(model, adapted, args, kwargs, method):
      # the rest reach jax_lora.dot (hand-written layers) or are unused: keep them all
      seen = special
    _probe_cache[key] = frozenset(seen - bad)
  return _probe_cache[key]


def _runs_as_is(model, adapted, args, kwargs, method) -> bool:
  """Whether the model traces with every LoRA/quantized kernel left in place."""
  try:
    with intercept():
      jax.eval_shape(lambda p: model.apply({"params": p}, *args, method=method, **kwargs), adapted)
    return True
  except Exception:  # noqa: BLE001 - any failure means "not as is": merge those kernels
    return False


def apply(model: nn.Module, adapted: Any, *args, method=None, dropout_rng: jax.Array | None = None,
          variables: dict | None = None, **kwargs):
  """``model.apply({"params": adapted}, *args)`` with LoRA unmerged.

  Args:
    model: any Flax Linen module (unmodified).
    adapted: params from :func:`jax_lora.init_lora` (or ``combine(trainable, frozen)``),
      possibly with quantized kernels.
    *args: the model's positional arguments.
    method: as in ``Module.apply``.
    dropout_rng: PRNG key for LoRA dropout; None disables it (evaluation).
    variables: other variable collections (e.g. ``{"batch_stats": ...}``).
    **kwargs: the model's keyword arguments and ``Module.apply`` options (``rngs``, ``mutable``).
  """
  fast = _probe(model, adapted, args, kwargs, method)
  params = merge_unreached(adapted, fast)
  with intercept(dropout_rng):
    return model.apply({"params": params, **(variables or {})}, *args, method=method, **kwargs)


def infer_layouts(model: nn.Module, params: Any, *args, method=None, **kwargs) -> dict[str, str]:
  """LoRA layouts ('b'/'i'/'o' per axis) of every Dense/DenseGeneral/Einsum kernel, from a probe.

  Kernels seen with fewer axes than stored (``nn.scan``/``nn.vmap`` stacking)
  get leading 'b' axes. Pass the result as ``LoraConfig(layouts=...)``.
  """
  found: dict[str, str] = {}

  def spy(next_fun, a, k, context):
    m = context.module
    if context.method_name == "__call__" and _handler(m) is not None and m.has_variable("params", "kernel"):
      kshape = m.get_variable("params", "kernel").shape
      if type(m) is nn.Einsum:
        spec = k.get("einsum_str") or (a[1] if len(a) > 1 else None) or m.einsum_str
        lay = ops.einsum_layout(spec or "")
      elif type(m) is nn.Conv:
        lay = "i" * (len(kshape) - 1) + "o"
      elif type(m) is nn.DenseGeneral:
        axis = m.axis if isinstance(m.axis, tuple) else (m.axis,)
        lay = "i" * len(axis) + "o" * (len(kshape) - len(axis))
      else:
        lay = "io"
      if lay is not None:
        found[_module_path(m) + "/kernel"] = lay
    return next_fun(*a, **k)

  with nn.intercept_methods(spy):
    jax.eval_shape(lambda p: model.apply({"params": p}, *args, method=method, **kwargs), plain_shapes(params))
  stored = {p: len(v.shape) for p, v in leaves(params).items() if hasattr(v, "shape")}
  out = {}
  for p, lay in found.items():
    n = stored.get(p, len(lay))
    out[p] = "b" * (n - len(lay)) + lay
  return {re.escape(p): lay for p, lay in out.items()}
