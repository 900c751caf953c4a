"""The unmerged LoRA matmul: ``y = x@W + s·dropout(x)@A@B``, never forming W + s·BA.

These are the kernels every integration (Linen, NNX, plain functions) calls.
Tokens are flattened to ``(N, d)`` first: on XLA:CPU, gradients of matmuls that
contract two axes (batch, seq) fall off the fast GEMM path.
"""

from __future__ import annotations

import contextlib
import functools
import math
import threading
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jax_lora.lora import LoraWeight, is_quantized, materialize

__all__ = ["dot", "dense", "dense_general", "einsum", "lora_matmul"]

_state = threading.local()


@contextlib.contextmanager
def record_consumed():
  """Collects the paths of LoraWeights consumed by the fast path (used by probes)."""
  prev = getattr(_state, "consumed", None)
  _state.consumed = seen = set()
  try:
    yield seen
  finally:
    _state.consumed = prev


@contextlib.contextmanager
def dropout_key(rng: jax.Array | None):
  """Default LoRA-dropout key for :func:`dot` calls inside the context (None: no dropout)."""
  prev = getattr(_state, "rng", None)
  _state.rng = rng
  try:
    yield
  finally:
    _state.rng = prev


def _note(path: str) -> None:
  seen = getattr(_state, "consumed", None)
  if seen is not None:
    seen.add(path)


def _dropout(x: jax.Array, rate: float, rng: jax.Array | None, path: str) -> jax.Array:
  if rate <= 0.0 or rng is None:
    return x
  from jax_lora.lora import _path_key
  keep = 1.0 - rate
  mask = jax.random.bernoulli(_path_key(rng, path), keep, x.shape)
  return jnp.where(mask, x / keep, jnp.zeros_like(x))


def _add_low_rank(y: jax.Array, u: jax.Array, v: jax.Array, precision=None) -> jax.Array:
  """``y + u @ v`` for a thin ``u`` (N, r)."""
  return y + jnp.dot(u, v, precision=precision)


def lora_matmul(x, xd, wb, a, b, scale, precision=None, dtype=None):
  """``x @ W + scale·(xd @ a) @ b`` on 2-D operands, without forming ``a @ b``.

  ``wb`` is the base kernel: a float array or a quantized array, dequantized to
  ``dtype`` in the forward pass and again in the backward pass. The backward
  dequantization reads the quantized arrays through an optimization barrier
  tied to the incoming gradient, so XLA can neither merge it with the forward
  one (CSE) nor hoist it: no float copy of a quantized base stays alive
  between the forward and the backward pass. ``xd`` is ``x`` with LoRA dropout
  applied, or ``x`` itself; both go through the same custom VJP with thin
  rank-r products (its gradient for ``wb`` is only computed if someone asks for
  it, otherwise XLA removes it).
  """
  dtype = x.dtype if dtype is None else dtype
  if xd is x:
    return _lmm(x, wb, a, b, scale, precision, dtype)
  return _lmm_drop(x, xd, wb, a, b, scale, precision, dtype)


def _w2(wb, dtype, n_in):
  return materialize(wb, dtype).reshape(n_in, -1)


def _w2_after(wb, t, dtype, n_in):
  """The kernel dequantized only once ``t`` exists, as a value of its own (see :func:`lora_matmul`).

  Every array of a quantized kernel (codes and scales) gets ``0·t[0]`` added: a
  data dependence on ``t`` that XLA cannot fold (``0·t`` is not 0 for inf/NaN),
  so neither the code look-ups nor the scaling can be hoisted ahead of ``t``,
  and the backward dequantization differs from the forward one. ``optimization_barrier``
  alone is not enough: XLA:CPU removes barriers before common-subexpression
  elimination. A float kernel is returned as is.
  """
  if not is_quantized(wb):
    return _w2(wb, dtype, n_in)
  zero = jax.lax.optimization_barrier(t.reshape(-1)[0]).astype(jnp.float32) * 0
  wb = jax.tree.map(lambda v: v + zero.astype(v.dtype), wb)
  return _w2(wb, dtype, n_in)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6))
def _lmm(x, wb, a, b, scale, precision, dtype):
  return _lmm_fwd(x, wb, a, b, scale, precision, dtype)[0]


def _lmm_fwd(x, wb, a, b, scale, precision, dtype):
  xa = jnp.dot(x, a, precision=precision) * jnp.asarray(scale, x.dtype)
  y = _add_low_rank(jnp.dot(x, _w2_after(wb, x, dtype, x.shape[1]), precision=precision), xa, b, precision)
  return y, (x, wb, a, b, xa)


def _zero_cotangent(tree):
  def z(v):
    if jnp.issubdtype(v.dtype, jnp.inexact):
      return jnp.zeros(v.shape, v.dtype)
    return np.zeros(v.shape, jax.dtypes.float0)
  return jax.tree.map(z, tree)


def _base_grad(x, g, wb, precision):
  if is_quantized(wb):
    return _zero_cotangent(wb)  # a quantized base is frozen by construction
  return jnp.dot(x.T, g, precision=precision).reshape(wb.shape).astype(wb.dtype)


def _lmm_bwd(scale, precision, dtype, res, g):
  x, wb, a, b, xa = res
  w = _w2_after(wb, g, dtype, x.shape[1])
  gb = jnp.dot(g, b.T, precision=precision) * jnp.asarray(scale, g.dtype)  # (N, r)
  dx = _add_low_rank(jnp.dot(g, w.T, precision=precision), gb, a.T, precision)
  return (dx, _base_grad(x, g, wb, precision), jnp.dot(x.T, gb, precision=precision),
          jnp.dot(xa.T, g, precision=precision))


_lmm.defvjp(_lmm_fwd, _lmm_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7))
def _lmm_drop(x, xd, wb, a, b, scale, precision, dtype):
  return _lmm_drop_fwd(x, xd, wb, a, b, scale, precision, dtype)[0]


def _lmm_drop_fwd(x, xd, wb, a, b, scale, precision, dtype):
  xa = jnp.dot(xd, a, precision=precision) * jnp.asarray(scale, x.dtype)
  y = _add_low_rank(jnp.dot(x, _w2_after(wb, x, dtype, x.shape[1]), precision=precision), xa, b, precision)
  return y, (x, xd, wb, a, b, xa)


def _lmm_drop_bwd(scale, precision, dtype, res, g):
  x, xd, wb, a, b, xa = res
  w = _w2_after(wb, g, dtype, x.shape[1])
  gb = jnp.dot(g, b.T, precision=precision) * jnp.asarray(scale, g.dtype)  # (N, r)
  return (jnp.dot(g, w.T, precision=precision), jnp.dot(gb, a.T, precision=precision),
          _base_grad(x, g, wb, precision), jnp.dot(xd.T, gb, precision=precision),
          jnp.dot(xa.T, g, precision=precision))


_lmm_drop.defvjp(_lmm_drop_fwd, _lmm_drop_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _qmm(x, wb, precision, dtype):
  """``x @ dequantize(wb)`` for a frozen quantized kernel without LoRA, dequantized again
  in the backward pass rather than kept (see :func:`lora_matmul`)."""
  return jnp.dot(x, _w2_after(wb, x, dtype, x.shape[1]), precision=precision)


def _qmm_fwd(x, wb, precision, dtype):
  return _qmm(x, wb, precision, dtype), (wb, jnp.zeros((0, x.shape[1]), x.dtype))


def _qmm_bwd(precision, dtype, res, g):
  wb, x0 = res
  return jnp.dot(g, _w2_after(wb, g, dtype, x0.shape[1]).T, precision=precision), _zero_cotangent(wb)


_qmm.defvjp(_qmm_fwd, _qmm_bwd)


def _kernel_parts(kernel: Any, dtype) -> tuple[jax.Array, LoraWeight | None]:
  if isinstance(kernel, LoraWeight):
    _note(kernel.path)
    return materialize(kernel.w, dtype), kernel
  return materialize(kernel, dtype), None


def _compute_dtype(x: jax.Array, base: Any, dtype=None):
  """The dtype a kernel is computed in. A quantized kernel's own ``compute_dtype``
  (set from :class:`jax_lora.QuantConfig`) wins; else ``dtype`` (the layer's) if given;
  else Flax's default: the promoted type of input and kernel (a quantized kernel
  takes the input's dtype)."""
  own = getattr(base, "compute_dtype", None) if is_quantized(base) else None
  if own is not None:
    return own
  if dtype is not None:
    return dtype
  return x.dtype if is_quantized(base) else jnp.result_type(x.dtype, base.dtype)


def dense(x: jax.Array, kernel: Any, bias: jax.Array | None = None, *, n_in: int = 1, dtype=None,
          precision=None, rng: jax.Array | None = None) -> jax.Array:
  """Contracts the last ``n_in`` axes of ``x`` with the leading ``n_in`` axes of ``kernel``.

  ``kernel`` is a float array, a quantized array (dequantized here, inside the
  step) or a :class:`LoraWeight` (computed unmerged). ``dtype`` is the compute
  dtype (default: the result type of ``x`` and the kernel, like Flax).
  """
  base = kernel.w if isinstance(kernel, LoraWeight) else kernel
  dtype = _compute_dtype(x, base, dtype)
  lw = kernel if isinstance(kernel, LoraWeight) else None
  x = x.astype(dtype)
  lead, ins = x.shape[:x.ndim - n_in], x.shape[x.ndim - n_in:]
  # a quantized kernel sliced by nn.scan reports its shape through _local()
  shape = tuple(base._local().shape if hasattr(base, "_local") else base.shape)
  if shape[:n_in] != tuple(ins):
    raise ValueError(f"kernel input axes {shape[:n_in]} do not match the input's {tuple(ins)}")
  outs = shape[n_in:]
  x2 = x.reshape(-1, math.prod(ins))
  if lw is None and is_quantized(base):
    y = _qmm(x2, base, precision, dtype)
  elif lw is None:
    y = jnp.dot(x2, _w2(base, dtype, x2.shape[1]), precision=precision)
  else:
    _note(lw.path)
    r = lw.a.shape[-1]
    a2, b2 = lw.a.astype(dtype).reshape(-1, r), lw.b.astype(dtype).reshape(r, -1)
    if a2.shape[0] != x2.shape[1]:
      raise ValueError(f"LoRA A for {lw.path!r} has {a2.shape[0]} input features but the layer gets {x2.shape[1]}")
    xd = _dropout(x2, lw.dropout, rng, lw.path)
    y = lora_matmul(x2, xd, base, a2, b2, lw.scale, precision, dtype)
  y = y.reshape(lead + tuple(outs))
  if bias is not None:
    y = y + bias.astype(dtype)
  return y


def dense_general(x: jax.Array, kernel: Any, bias: jax.Array | None, axis: tuple[int, ...], *, dtype=None,
                  precision=None, rng: jax.Array | None = None) -> jax.Array:
  """Contracts the ``axis`` axes of ``x`` (any positions) with the leading kernel axes
  (Linen ``DenseGeneral`` / NNX ``LinearGeneral`` without batch axes)."""
  axis = tuple(a % x.ndim for a in axis)
  rest = [i for i in range(x.ndim) if i not in axis]
  if list(axis) != list(range(x.ndim - len(axis), x.ndim)):
    x = jnp.transpose(x, rest + list(axis))
  return dense(x, kernel, bias, n_in=len(axis), dtype=dtype, precision=precision, rng=rng)


def dot(x: jax.Array, w: Any, *, rng: jax.Array | None = None, precision=None) -> jax.Array:
  """``x @ w`` for a plain, quantized or LoRA kernel (the helper for hand-written layers).

  >>> y = dot(x, params["w"])   # params from jax_lora.init_lora: runs unmerged
  """
  if rng is None:
    rng = getattr(_state, "rng", None)
  return dense(x, w, n_in=1, precision=precision, rng=rng)


def _parse_einsum(spec: str):
  spec = spec.replace(" ", "")
  if "->" not in spec or spec.count(",") != 1 or "." in spec:
    return None
  lhs, out = spec.split("->")
  xs, ks = lhs.split(",")
  batch = [c for c in ks if c in xs and c in out]
  ins = [c for c in ks if c in xs and c not in out]
  outs = [c for c in ks if c in out and c not in xs]
  if len(batch) + len(ins) + len(outs) != len(ks) or not ins or not outs:
    return None
  return xs, ks, out, batch, ins, outs


def einsum_layout(spec: str) -> str | None:
  """LoRA layout ('b'/'i'/'o' per kernel axis) implied by an einsum ``"x,kernel->y"``."""
  parsed = _parse_einsum(spec)
  if parsed is None:
    return None
  _, ks, _, batch, ins, _ = parsed
  return "".join("b" if c in batch else "i" if c in ins else "o" for c in ks)


def einsum(spec: str, x: jax.Array, kernel: Any, *, dtype=None, precision=None, rng=None) -> jax.Array:
  """``jnp.einsum(spec, x, kernel)`` with a plain, quantized or LoRA kernel, unmerged."""
  base = kernel.w if isinstance(kernel, LoraWeight) else kernel
  dtype = _compute_dtype(x, base, dtype)
  w, lw = _kernel_parts(kernel, dtype)
  x = x.astype(dtype)
  y = jnp.einsum(spec, x, w, precision=precision)
  if lw is None:
    return y
  parsed = _parse_einsum(spec)
  if parsed is None:
    raise ValueError(f"einsum {spec!r} for {lw.path!r}: LoRA needs 'x,kernel->y' without '...' "
                     "and with input and output kernel axes")
  xs, ks, out, batch, ins, outs = parsed
  used = set(xs + ks + out)
  rch = next(c for c in "rzyxwvutsqponmlkjihgfedcbaRZYXWVUTSQPONMLKJIHGFEDCBA" if c not in used)
  a_spec = "".join(batch + ins) + rch
  b_spec = "".join(batch) + rch + "".join(outs)
  want_a = tuple(w.shape[ks.index(c)] for c in batch + ins) + (lw.rank,)
  if tuple(lw.a.shape) != want_a:
    raise ValueError(f"LoRA A for {lw.path!r} has shape {tuple(lw.a.shape)} but einsum {spec!r} implies {want_a}; "
                     f"init it with layout {einsum_layout(spec)!r}")
  xa_spec = "".join(c for c in xs if c not in ins) + rch
  xd = _dropout(x, lw.dropout, rng, lw.path)
  xa = jnp.einsum(f"{xs},{a_spec}->{xa_spec}", xd, lw.a.astype(dtype), precision=precision)
  xa = xa * jnp.asarray(lw.scale, dtype)
  return y + jnp.einsum(f"{xa_spec},{b_spec}->{out}", xa, lw.b.astype(dtype), precision=precision)
