"""The LoRA weight and its unmerged matmul: ``y = x@W + s·dropout(x)@A@B``.

:class:`LoraWeight` is the pytree node that stands in for a kernel; the
functions here are the kernels every integration (Linen, NNX, plain functions)
calls, and they never form ``W + s·A@B``. Tokens are flattened to ``(N, d)``
first: on XLA:CPU, gradients of matmuls that contract two axes (batch, seq)
fall off the fast GEMM path. This module knows nothing of quantization beyond
the :func:`jax_lora._src.tree.materialize` protocol.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
import sys
import threading
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jax_lora._src.tree import is_quantized, materialize, path_key

__all__ = [
    "LoraWeight",
    "LoraUsageError",
    "merged_kernel",
    "weight_norm",
    "lora_matmul",
    "dense",
    "dense_general",
    "einsum",
    "einsum_layout",
    "parse_einsum",
    "dot",
    "embed",
    "attend",
    "matvec",
    "dropout_key",
    "record_consumed",
    "note_consumed",
    "lora_dropout",
    "compute_dtype",
]


class LoraUsageError(TypeError):
  """A :class:`LoraWeight` was used other than through an unmerged matmul (``w.T``,
  ``w + 1``, ``jnp.asarray(w)``...). The integrations catch it and merge that one
  kernel instead; ``path`` names it."""

  def __init__(self, path: str, what: str):
    super().__init__(f"LoRA weight {path!r} used as a plain array ({what}); only x @ w, jax_lora.dot and the "
                     "Flax layers jax_lora intercepts run it unmerged")
    self.path = path


@dataclasses.dataclass(frozen=True)
class LoraWeight:
  """A frozen kernel with a low-rank update: ``W + scale · A @ B``.

  ``a`` has shape ``(*batch, *in, r)`` and ``b`` ``(*batch, r, *out)``, where the
  batch/in/out axes are the kernel's axes marked 'b'/'i'/'o' in ``layout`` (in
  kernel order). ``alpha``, ``rank`` and the rest are static metadata, so
  gradients, optimizer states and checkpoints carry them along.

  >>> lw = LoraWeight(w=jnp.ones((4, 3)), a=jnp.ones((4, 2)), b=jnp.zeros((2, 3)), alpha=4.0, rank=2)
  >>> (jnp.ones((1, 4)) @ lw).tolist()   # x@W + 2·(x@A)@B with B = 0
  [[4.0, 4.0, 4.0]]
  """

  jax_lora_node = True  # a single leaf for jax_lora's tree maps (not a dataclass field)
  wraps_base = True  # ``w`` is a base weight that quantization and sharding rules see at this path

  w: Any  # the frozen base kernel (float array or a quantized array); None in a trainable split
  a: Any  # (*batch, *in, r), trainable
  b: Any  # (*batch, r, *out), trainable, zero at init
  alpha: float = dataclasses.field(default=8.0, metadata=dict(static=True))
  rank: int = dataclasses.field(default=8, metadata=dict(static=True))
  layout: str = dataclasses.field(default="io", metadata=dict(static=True))
  path: str = dataclasses.field(default="", metadata=dict(static=True))
  rslora: bool = dataclasses.field(default=False, metadata=dict(static=True))
  dropout: float = dataclasses.field(default=0.0, metadata=dict(static=True))
  # A is fixed (not trained): PEFT's trainable tokens are a LoRA with A the one-hot columns of
  # the chosen token ids and B their new rows minus the old (see jax_lora.init_lora).
  freeze_a: bool = dataclasses.field(default=False, metadata=dict(static=True))
  # DoRA's magnitude (*batch, *out), trainable; None for plain LoRA. With it the layer computes
  # ``m / ‖W + s·A@B‖ · (x@W + s·(x@A)@B)`` (norm over the input axes, not differentiated).
  m: Any = None

  @property
  def scale(self) -> float:
    return self.alpha / (math.sqrt(self.rank) if self.rslora else self.rank)

  @property
  def shape(self) -> tuple[int, ...]:
    return tuple(self.w.shape)

  @property
  def dtype(self):
    return self.w.dtype

  @property
  def ndim(self) -> int:
    return len(self.w.shape)

  def delta(self, dtype=jnp.float32) -> jax.Array:
    """The dense update ``scale · A @ B`` laid out like ``w`` (for merging, never per step)."""
    return delta(self.a, self.b, self.scale, self.layout, dtype)

  def __rmatmul__(self, x):
    """``x @ lora_weight`` runs unmerged: ``x@W + s·(x@A)@B`` (2-D (in, out) kernels)."""
    return dot(x, self)

  def __repr__(self):
    shp = None if self.w is None else tuple(self.w.shape)
    dora = ", dora" if self.m is not None else ""
    return f"LoraWeight(path={self.path!r}, shape={shp}, rank={self.rank}, alpha={self.alpha}{dora})"

  # Any other use as an array is refused with a LoraUsageError (never silently wrong).
  def _refuse(self, what):
    raise LoraUsageError(self.path, what)

  __array_ufunc__ = None  # NumPy defers ``np_array @ w`` to __rmatmul__

  def __array__(self, *args, **kwargs):
    self._refuse("converted to a NumPy array")

  def __jax_array__(self):
    """Refused with this weight's path (``jnp.einsum(..., w)``, ``jnp.asarray(w)``), so the
    integrations merge exactly this weight. A JAX array's ``x @ w`` asks first: answering
    with ``self`` makes it return NotImplemented, and Python calls :meth:`__rmatmul__`."""
    if sys._getframe(1).f_code.co_name in ("_operator_matmul", "_operator_rmatmul"):
      return self
    self._refuse("converted to a JAX array (jnp.einsum, jnp.asarray...)")

  def __matmul__(self, x):
    """``lora_weight @ x`` runs unmerged for an ``(out, in)`` kernel (layout "oi", e.g.
    Equinox's ``eqx.nn.Linear``: ``weight @ x``); ``x`` is ``(in,)`` or ``(in, n)``."""
    return matvec(self, x)

  @property
  def T(self):  # noqa: N802 - the array attribute
    self._refuse("w.T")

  def astype(self, dtype):
    self._refuse(f"w.astype({dtype})")

  def reshape(self, *shape):
    self._refuse("w.reshape(...)")

  def __getitem__(self, idx):
    self._refuse("w[...]")

  def __add__(self, other):
    self._refuse("w + ...")

  __radd__ = __sub__ = __rsub__ = __mul__ = __rmul__ = __truediv__ = __add__


jax.tree_util.register_dataclass(LoraWeight)


def delta(a: jax.Array, b: jax.Array, scale: float, layout: str, dtype=jnp.float32) -> jax.Array:
  """``scale · A @ B`` as a dense kernel in ``layout`` order (see :class:`LoraWeight`)."""
  nb = layout.count("b")
  r = a.shape[-1]
  batch = a.shape[:nb]
  ins = a.shape[nb:-1]
  outs = b.shape[nb + 1:]
  a2 = a.astype(dtype).reshape(batch + (math.prod(ins), r))
  b2 = b.astype(dtype).reshape(batch + (r, math.prod(outs)))
  d = jnp.matmul(a2, b2, precision=jax.lax.Precision.HIGHEST) * jnp.asarray(scale, dtype)
  d = d.reshape(batch + ins + outs)
  # axes are now ordered (b..., i..., o...): put them back in kernel order.
  src = [i for i, c in enumerate(layout) if c == "b"] + [i for i, c in enumerate(layout) if c == "i"] + [
      i for i, c in enumerate(layout) if c == "o"]
  if src == sorted(src):
    return d
  return jnp.transpose(d, np.argsort(src))


def merged_kernel(lw: LoraWeight, dtype=None) -> jax.Array:
  """``W + scale·A@B``, added in float32 and cast to ``dtype`` (default: the base's
  dtype; a quantized base is dequantized first). The one merge every path uses.
  With DoRA (``lw.m``) each output column is rescaled to norm ``m``, as PEFT merges."""
  out = lw.w.dtype if dtype is None else dtype
  merged = materialize(lw.w, jnp.float32) + lw.delta(jnp.float32)
  if lw.m is not None:
    ins = tuple(i for i, c in enumerate(lw.layout) if c == "i")
    norm = jnp.sqrt(jnp.sum(jnp.square(merged), axis=ins, keepdims=True))
    merged = merged * (jnp.expand_dims(lw.m.astype(jnp.float32), ins) / norm)
  return merged.astype(out)


def weight_norm(w: Any, a: jax.Array, b: jax.Array, scale: float) -> jax.Array:
  """``‖W + scale·A@B‖`` per output column of a 2-D (in, out) kernel, in float32, from
  thin products only (``‖W‖² + 2s·⟨WᵀA, Bᵀ⟩ + s²·Bᵀ(AᵀA)B``): no dense ``A@B``. DoRA's norm."""
  w = materialize(w, jnp.float32)
  a, b = a.astype(jnp.float32), b.astype(jnp.float32)
  hi = jax.lax.Precision.HIGHEST
  wa = jnp.dot(w.T, a, precision=hi)  # (out, r)
  sq = (jnp.sum(jnp.square(w), axis=0) + 2 * scale * jnp.sum(wa * b.T, axis=1)
        + scale * scale * jnp.sum(b * jnp.dot(jnp.dot(a.T, a, precision=hi), b, precision=hi), axis=0))
  return jnp.sqrt(jnp.maximum(sq, 0.0))


# ----------------------------------------------------------------------------- call-scoped state

_state = threading.local()


@contextlib.contextmanager
def record_consumed():
  """Collects the paths of LoraWeights consumed by the fast path in this thread (for probes)."""
  prev = getattr(_state, "consumed", None)
  _state.consumed = seen = set()
  try:
    yield seen
  finally:
    _state.consumed = prev


@contextlib.contextmanager
def dropout_key(rng: jax.Array | None):
  """Default LoRA-dropout key for :func:`dot` calls in this thread (None: no dropout)."""
  prev = getattr(_state, "rng", None)
  _state.rng = rng
  try:
    yield
  finally:
    _state.rng = prev


def note_consumed(path: str) -> None:
  """Records that the fast path computed the LoRA weight at ``path`` unmerged (for probes)."""
  _note(path)


def lora_dropout(x: jax.Array, rate: float, rng: jax.Array | None, path: str) -> jax.Array:
  """Inverted dropout on the LoRA branch's input, keyed by ``path`` (identity without ``rng``)."""
  return _dropout(x, rate, rng, path)


def compute_dtype(x: jax.Array, base: Any, dtype=None):
  """The dtype a (possibly quantized) kernel is computed in (see ``QuantConfig.compute_dtype``)."""
  return _compute_dtype(x, base, dtype)


def _note(path: str) -> None:
  seen = getattr(_state, "consumed", None)
  if seen is not None:
    seen.add(path)


def _dropout(x: jax.Array, rate: float, rng: jax.Array | None, path: str) -> jax.Array:
  if rate <= 0.0 or rng is None:
    return x
  keep = 1.0 - rate
  mask = jax.random.bernoulli(path_key(rng, path), keep, x.shape)
  return jnp.where(mask, x / keep, jnp.zeros_like(x))


# ----------------------------------------------------------------------------- the matmul


def lora_matmul(x, wb, a, b, scale, *, x_lora=None, precision=None, dtype=None):
  """``x @ W + scale·(x_lora @ a) @ b`` on 2-D operands, without forming ``a @ b``.

  ``wb`` is the base kernel: a float array or a quantized array, dequantized to
  ``dtype`` in the forward pass and again in the backward pass. Each
  dequantization is tied to the value it serves (``x`` forward, the incoming
  cotangent backward; see :func:`_w2_after`), so XLA can neither merge the two
  (CSE) nor hoist them: no float copy of a quantized base stays alive between
  the forward and the backward pass. ``x_lora`` is the LoRA branch's input
  (``x`` with dropout applied; default ``x``). A custom VJP keeps every
  product thin (rank r); the base's weight gradient is only computed if asked
  for (a float base being differentiated), otherwise XLA removes it.
  """
  dtype = x.dtype if dtype is None else dtype
  return _lmm(x, x if x_lora is None else x_lora, wb, a, b, scale, precision, dtype)


def _w2(wb, dtype, n_in):
  return materialize(wb, dtype).reshape(n_in, -1)


def _w2_after(wb, t, dtype, n_in):
  """The kernel dequantized only once ``t`` exists, as a value of its own.

  Every array of a quantized kernel (codes and scales) gets ``0·t[0]`` added: a
  data dependence on ``t`` that XLA cannot fold (``0·t`` is not 0 for inf/NaN),
  so neither the code look-ups nor the scaling can be hoisted ahead of ``t``,
  and the backward dequantization differs from the forward one.
  ``optimization_barrier`` alone is not enough: XLA:CPU removes barriers before
  common-subexpression elimination. A float kernel is returned as is.
  """
  if not is_quantized(wb):
    return _w2(wb, dtype, n_in)
  zero = jax.lax.optimization_barrier(t.reshape(-1)[0]).astype(jnp.float32) * 0
  wb = jax.tree.map(lambda v: v + zero.astype(v.dtype), wb)
  return _w2(wb, dtype, n_in)


def _add_low_rank(y: jax.Array, u: jax.Array, v: jax.Array, precision=None) -> jax.Array:
  """``y + u @ v`` for a thin ``u`` (N, r)."""
  return y + jnp.dot(u, v, precision=precision)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7))
def _lmm(x, xl, wb, a, b, scale, precision, dtype):
  return _lmm_fwd(x, xl, wb, a, b, scale, precision, dtype)[0]


def _lmm_fwd(x, xl, wb, a, b, scale, precision, dtype):
  xa = jnp.dot(xl, a, precision=precision) * jnp.asarray(scale, x.dtype)
  y = _add_low_rank(jnp.dot(x, _w2_after(wb, x, dtype, x.shape[1]), precision=precision), xa, b, precision)
  return y, (x, xl, wb, a, b, xa)


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
  x, xl, wb, a, b, xa = res
  w = _w2_after(wb, g, dtype, x.shape[1])
  gb = jnp.dot(g, b.T, precision=precision) * jnp.asarray(scale, g.dtype)  # (N, r)
  dx = jnp.dot(g, w.T, precision=precision)
  dxl = jnp.dot(gb, a.T, precision=precision)
  return (dx, dxl, _base_grad(x, g, wb, precision), jnp.dot(xl.T, gb, precision=precision),
          jnp.dot(xa.T, g, precision=precision))


_lmm.defvjp(_lmm_fwd, _lmm_bwd)


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
  lw = kernel if isinstance(kernel, LoraWeight) else None
  base = kernel.w if lw is not None else kernel
  dtype = _compute_dtype(x, base, dtype)
  x = x.astype(dtype)
  lead, ins = x.shape[:x.ndim - n_in], x.shape[x.ndim - n_in:]
  # a quantized kernel sliced by nn.scan reports its shape through local()
  shape = tuple(base.local().shape if hasattr(base, "local") else base.shape)
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
    y = lora_matmul(x2, base, a2, b2, lw.scale, x_lora=xd, precision=precision, dtype=dtype)
    if lw.m is not None:  # DoRA: rescale each output to magnitude m (the norm is a constant)
      w2 = base.reshape(x2.shape[1], -1) if not is_quantized(base) else _w2_after(base, x2, jnp.float32, x2.shape[1])
      norm = jax.lax.stop_gradient(weight_norm(w2, a2, b2, lw.scale))
      y = y * (lw.m.reshape(-1).astype(jnp.float32) / norm).astype(y.dtype)
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

  ``rng`` is the LoRA-dropout key (default: the one given to ``apply_fn``).

  >>> import jax_lora as jl
  >>> p = jl.init_lora({"w": jnp.eye(3)}, jl.LoraConfig(rank=1, targets=("w",)), jax.random.key(0))
  >>> jl.dot(jnp.ones((2, 3)), p["w"]).shape    # x@W + s·(x@A)@B, unmerged
  (2, 3)
  """
  if rng is None:
    rng = getattr(_state, "rng", None)
  return dense(x, w, n_in=1, precision=precision, rng=rng)


def embed(ids: jax.Array, table: Any, *, dtype=None) -> jax.Array:
  """``table[ids]`` for a plain, quantized or LoRA embedding table ``(vocab, d)``.

  A LoRA table (layout "io": ``a`` (vocab, r), ``b`` (r, d)) adds ``s·a[ids] @ b``,
  PEFT's LoRA Embedding, without forming ``a @ b``; no dropout (as PEFT).

  >>> import jax_lora as jl
  >>> t = jl.init_lora({"embedding": jnp.eye(4)}, jl.LoraConfig(rank=1, targets=("embedding",)), jax.random.key(0))
  >>> jl.embed(jnp.array([[1, 2]]), t["embedding"]).shape
  (1, 2, 4)
  """
  lw = table if isinstance(table, LoraWeight) else None
  base = lw.w if lw is not None else table
  w = materialize(base, dtype)
  y = jnp.take(w, ids, axis=0)
  if lw is None:
    return y
  if lw.layout != "io" or lw.m is not None or len(lw.w.shape) != 2:
    raise ValueError(f"{lw.path!r}: LoRA on an embedding needs a plain (vocab, d) table (layout 'io', no DoRA)")
  _note(lw.path)
  xa = jnp.take(lw.a.astype(y.dtype), ids, axis=0) * jnp.asarray(lw.scale, y.dtype)
  return y + jnp.einsum("...r,rd->...d", xa, lw.b.astype(y.dtype))
def matvec(w: Any, x: jax.Array, *, rng: jax.Array | None = None, precision=None) -> jax.Array:
  """``w @ x`` for an ``(out, in)`` kernel (PyTorch / Equinox order; LoRA layout "oi"):
  ``W@x + s·B^T(A^T x)``, unmerged. ``x`` is ``(in,)`` or ``(in, n)``.

  >>> import jax_lora as jl
  >>> w = jl.init_lora({"weight": jnp.eye(3)}, jl.LoraConfig(rank=1, targets=("weight",), layouts={"weight": "oi"}),
  ...                  jax.random.key(0))["weight"]
  >>> (w @ jnp.ones(3)).tolist()
  [1.0, 1.0, 1.0]
  """
  if not isinstance(w, LoraWeight):
    return jnp.matmul(materialize(w), x, precision=precision)
  if w.layout != "oi" or x.ndim not in (1, 2) or w.m is not None:
    raise LoraUsageError(w.path, f"w @ x with layout {w.layout!r}, x of shape {tuple(x.shape)}"
                                 f"{' and DoRA' if w.m is not None else ''} (needs layout 'oi', a 1-D or 2-D x, no DoRA)")
  if rng is None:
    rng = getattr(_state, "rng", None)
  _note(w.path)
  dtype = _compute_dtype(x, w.w)
  xt = (x[None] if x.ndim == 1 else x.T).astype(dtype)
  r = w.a.shape[-1]
  a2, b2 = w.a.astype(dtype).reshape(-1, r), w.b.astype(dtype).reshape(r, -1)
  base = materialize(w.w, dtype).T
  xd = _dropout(xt, w.dropout, rng, w.path)
  y = lora_matmul(xt, base, a2, b2, w.scale, x_lora=xd, precision=precision, dtype=dtype)
  return y[0] if x.ndim == 1 else y.T


def attend(x: jax.Array, table: Any, *, dtype=None) -> jax.Array:
  """``x @ table.T``: logits from a (vocab, d) embedding table used as the output layer (tied
  embeddings). A LoRA table adds ``s·(x @ Bᵀ) @ Aᵀ`` unmerged; only trainable tokens (fixed
  one-hot A) are accepted, since PEFT applies them to the tied head too."""
  lw = table if isinstance(table, LoraWeight) else None
  base = lw.w if lw is not None else table
  w = materialize(base, dtype)
  x = x.astype(w.dtype)
  y = jnp.einsum("...d,vd->...v", x, w)
  if lw is None:
    return y
  if not lw.freeze_a:
    raise ValueError(f"{lw.path!r}: LoRA on an embedding that is also the output layer (tied embeddings): PEFT "
                     "applies it to the lookup only but merges it into both; untie the head or train the "
                     "embedding whole (modules_to_save) instead")
  _note(lw.path)
  xb = jnp.einsum("...d,rd->...r", x, lw.b.astype(w.dtype)) * jnp.asarray(lw.scale, w.dtype)
  return y + jnp.einsum("...r,vr->...v", xb, lw.a.astype(w.dtype))


def parse_einsum(spec: str):
  """``(x, kernel, out, batch, in, out_axes)`` letters of ``"x,kernel->y"``, or None if
  the einsum is not a LoRA-able contraction (``...``, more operands, no in/out axes)."""
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
  parsed = parse_einsum(spec)
  if parsed is None:
    return None
  _, ks, _, batch, ins, _ = parsed
  return "".join("b" if c in batch else "i" if c in ins else "o" for c in ks)


def einsum(spec: str, x: jax.Array, kernel: Any, *, dtype=None, precision=None, rng=None) -> jax.Array:
  """``jnp.einsum(spec, x, kernel)`` with a plain, quantized or LoRA kernel, unmerged."""
  lw = kernel if isinstance(kernel, LoraWeight) else None
  base = kernel.w if lw is not None else kernel
  dtype = _compute_dtype(x, base, dtype)
  w = materialize(base, dtype)
  x = x.astype(dtype)
  y = jnp.einsum(spec, x, w, precision=precision)
  if lw is None:
    return y
  if lw.m is not None:
    raise ValueError(f"{lw.path!r}: DoRA is implemented for dense kernels (x @ W, Dense, DenseGeneral), "
                     f"not for einsum {spec!r}; use plain LoRA here")
  _note(lw.path)
  parsed = parse_einsum(spec)
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
