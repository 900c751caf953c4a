"""LoRA weights as pytree nodes, and the pure functions over parameter trees.

An *adapted* tree is the original parameter tree in which every targeted kernel
leaf is replaced by a :class:`LoraWeight` node holding the frozen base ``w`` and
the factors ``a`` and ``b``. No path is renamed: base checkpoints, sharding rules
and quantization rules keep applying to the same paths.
"""

from __future__ import annotations

import dataclasses
import math
import zlib
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jax_lora.config import LoraConfig
from jax_lora.paths import match_paths, path_str

__all__ = [
    "LoraWeight",
    "init_lora",
    "split",
    "combine",
    "merge",
    "unmerge",
    "lora_weights",
    "ParamReport",
    "param_report",
    "is_quantized",
    "materialize",
]


def is_quantized(x: Any) -> bool:
  """True for quantized base weights (anything with ``dequantize``, e.g. NF4)."""
  return hasattr(x, "dequantize") and hasattr(x, "shape") and not isinstance(x, LoraWeight)


def materialize(w: Any, dtype=None) -> jax.Array:
  """A float array for ``w`` (dequantized if quantized), optionally cast."""
  if is_quantized(w):
    return w.dequantize(dtype)
  return w if dtype is None else w.astype(dtype)


@dataclasses.dataclass(frozen=True)
class LoraWeight:
  """A frozen kernel with a low-rank update: ``W + scale · A @ B``.

  ``a`` has shape ``(*batch, *in, r)`` and ``b`` ``(*batch, r, *out)``, where the
  batch/in/out axes are the kernel's axes marked 'b'/'i'/'o' in ``layout`` (in
  kernel order). ``alpha``, ``rank`` and the rest are static metadata, so
  gradients, optimizer states and checkpoints carry them along.
  """

  w: Any  # the frozen base kernel (float array or a quantized array); None in a trainable split
  a: Any  # (*batch, *in, r), trainable
  b: Any  # (*batch, r, *out), trainable, zero at init
  alpha: float = dataclasses.field(default=8.0, metadata=dict(static=True))
  rank: int = dataclasses.field(default=8, metadata=dict(static=True))
  layout: str = dataclasses.field(default="io", metadata=dict(static=True))
  path: str = dataclasses.field(default="", metadata=dict(static=True))
  rslora: bool = dataclasses.field(default=False, metadata=dict(static=True))
  dropout: float = dataclasses.field(default=0.0, metadata=dict(static=True))

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
    return _delta(self.a, self.b, self.scale, self.layout, dtype)

  def __rmatmul__(self, x):
    """``x @ lora_weight`` runs unmerged: ``x@W + s·(x@A)@B`` (2-D (in, out) kernels)."""
    from jax_lora.ops import dot
    return dot(x, self)

  def __repr__(self):
    shp = None if self.w is None else tuple(self.w.shape)
    return f"LoraWeight(path={self.path!r}, shape={shp}, rank={self.rank}, alpha={self.alpha})"


jax.tree_util.register_dataclass(LoraWeight)


def _delta(a, b, scale, layout, dtype):
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


def _is_variable(x) -> bool:
  # flax.nnx Variables (Param, ...) wrap a value; treat them as leaves and look inside.
  return hasattr(x, "get_raw_value") and hasattr(x, "replace") and type(x).__module__.startswith("flax.nnx")


def _is_leaf(x) -> bool:
  return isinstance(x, LoraWeight) or is_quantized(x) or _is_variable(x) or x is None


def _value(x):
  return x.get_value() if _is_variable(x) else x


def _rewrap(x, new):
  return x.replace(new) if _is_variable(x) else new


def _map(fn: Callable[[str, Any], Any], tree, *rest):
  """Maps ``fn(path, value)`` over leaves; LoraWeights, quantized arrays and nnx
  Variables are single leaves (Variables are unwrapped and re-wrapped). ``None``
  (from the tree or from ``fn``) is a placeholder and stays ``None``."""

  def f(kp, x, *xs):
    if x is None:
      return None
    out = fn(path_str(kp), _value(x), *[_value(y) for y in xs])
    return None if out is None else _rewrap(x, out)

  return jax.tree_util.tree_map_with_path(f, tree, *rest, is_leaf=_is_leaf)


def _leaves(tree) -> dict[str, Any]:
  flat, _ = jax.tree_util.tree_flatten_with_path(tree, is_leaf=_is_leaf)
  return {path_str(kp): _value(x) for kp, x in flat if x is not None}


def _path_key(key: jax.Array, path: str) -> jax.Array:
  return jax.random.fold_in(key, zlib.crc32(path.encode()) & 0x7FFFFFFF)


def _init_factors(path: str, w, lay: str, r: int, alpha: float, cfg: LoraConfig, key):
  shape = tuple(w.shape)
  batch = tuple(s for s, c in zip(shape, lay) if c == "b")
  ins = tuple(s for s, c in zip(shape, lay) if c == "i")
  outs = tuple(s for s, c in zip(shape, lay) if c == "o")
  n_in, n_out = math.prod(ins), math.prod(outs)
  if r > min(n_in, n_out):
    raise ValueError(
        f"rank {r} for {path!r} exceeds min(d_in, d_out) = min({n_in}, {n_out}); lower rank or rank_pattern")
  dtype = jnp.dtype(cfg.dtype or jnp.float32)
  k = _path_key(key, path)
  if cfg.init == "kaiming":  # PEFT: kaiming_uniform(a=sqrt(5)) on (r, in) == U(±1/sqrt(in))
    bound = 1.0 / math.sqrt(n_in)
    a = jax.random.uniform(k, batch + ins + (r,), dtype, -bound, bound)
    b = jnp.zeros(batch + (r,) + outs, dtype)
    return w, a, b
  if cfg.init == "gaussian":  # PEFT: normal(std=1/r)
    a = jax.random.normal(k, batch + ins + (r,), dtype) / r
    b = jnp.zeros(batch + (r,) + outs, dtype)
    return w, a, b
  # PiSSA: principal r singular triplets go into A, B; W keeps the residual.
  if is_quantized(w):
    raise ValueError(f"init='pissa' needs a float base but {path!r} is quantized; use init='kaiming' or LoftQ")
  scale = alpha / (math.sqrt(r) if cfg.use_rslora else r)
  wf = materialize(w, jnp.float32)
  src = [i for i, c in enumerate(lay) if c == "b"] + [i for i, c in enumerate(lay) if c == "i"] + [
      i for i, c in enumerate(lay) if c == "o"]
  w2 = jnp.transpose(wf, src).reshape(batch + (n_in, n_out))
  u, s, vh = jnp.linalg.svd(w2, full_matrices=False)
  sq = jnp.sqrt(s[..., :r] / scale)
  a = (u[..., :, :r] * sq[..., None, :]).reshape(batch + ins + (r,)).astype(dtype)
  b = (sq[..., :, None] * vh[..., :r, :]).reshape(batch + (r,) + outs).astype(dtype)
  w_res = (wf - _delta(a, b, scale, lay, jnp.float32)).astype(w.dtype)
  return w_res, a, b


def init_lora(params: Any, config: LoraConfig, key: jax.Array) -> Any:
  """Adds LoRA factors to every kernel matched by ``config.targets``.

  Args:
    params: any parameter pytree (Linen ``variables["params"]``, an ``nnx.State``,
      a plain dict); kernels may be float or quantized arrays.
    config: what to adapt and how.
    key: PRNG key; each path gets ``fold_in(key, crc32(path))``.

  Returns:
    The same tree with each targeted kernel replaced by a :class:`LoraWeight`
    (``b = 0``, so the adapted model equals the base at init; except PiSSA, whose
    base is the residual and whose A·B restore the original exactly).
  """
  leaves = _leaves(params)
  for p, v in leaves.items():
    if isinstance(v, LoraWeight):
      raise ValueError(f"{p!r} already has a LoRA adapter; merge it first or init from the base params")
  targets = set(match_paths(leaves.keys(), config.targets, what="LoRA target"))
  for p in sorted(targets):
    v = leaves[p]
    if not hasattr(v, "shape") or len(v.shape) < 2:
      raise ValueError(
          f"LoRA target {p!r} has shape {getattr(v, 'shape', None)}; LoRA needs a kernel with >= 2 axes, "
          "narrow the target pattern (e.g. '.*/kernel')")

  def f(path, w):
    if path not in targets:
      return w
    lay = config.layout_for(path, len(w.shape))
    r, alpha = config.rank_for(path), config.alpha_for(path)
    w, a, b = _init_factors(path, w, lay, r, alpha, config, key)
    return LoraWeight(w=w, a=a, b=b, alpha=alpha, rank=r, layout=lay, path=path,
                      rslora=config.use_rslora, dropout=config.dropout)

  return _map(f, params)


def lora_weights(adapted: Any) -> dict[str, LoraWeight]:
  """``{path: LoraWeight}`` for every adapter in ``adapted``."""
  return {p: v for p, v in _leaves(adapted).items() if isinstance(v, LoraWeight)}


def _trainable_bias_paths(adapted, bias: str) -> set[str]:
  if bias == "none":
    return set()
  leaves = _leaves(adapted)
  if bias == "all":
    return {p for p in leaves if p.rsplit("/", 1)[-1] == "bias"}
  if bias == "lora_only":
    parents = {p.rsplit("/", 1)[0] for p, v in leaves.items() if isinstance(v, LoraWeight)}
    return {p for p in leaves if p.rsplit("/", 1)[-1] == "bias" and p.rsplit("/", 1)[0] in parents}
  raise ValueError(f"bias must be 'none', 'all' or 'lora_only', got {bias!r}")


def split(adapted: Any, bias: str = "none") -> tuple[Any, Any]:
  """Partitions an adapted tree into ``(trainable, frozen)``.

  Both keep the full structure with ``None`` placeholders (equinox-style), so
  ``combine(*split(t)) == t`` exactly. ``trainable`` holds only the A/B factors
  (and biases if ``bias`` is "all" or "lora_only"): differentiate and optimize
  it alone, and no gradient or optimizer state ever exists for the base.
  """
  bias_paths = _trainable_bias_paths(adapted, bias)

  def trainable(path, v):
    if isinstance(v, LoraWeight):
      return dataclasses.replace(v, w=None)
    return v if path in bias_paths else None

  def frozen(path, v):
    if isinstance(v, LoraWeight):
      return dataclasses.replace(v, a=None, b=None)
    return None if path in bias_paths else v

  return _map(trainable, adapted), _map(frozen, adapted)


def combine(trainable: Any, frozen: Any) -> Any:
  """Inverse of :func:`split`: fills each ``None`` of one tree from the other."""
  return jax.tree.map(lambda t, f: f if t is None else t, trainable, frozen, is_leaf=lambda x: x is None)


def merge(adapted: Any, dtype=None) -> Any:
  """Folds every adapter into its kernel: ``W + scale·A@B`` in the base dtype.

  Quantized bases are dequantized first (the adapter was trained on
  dequant(W)); the merged kernel is float. To re-quantize, see
  ``jax_lora.quant``.
  """

  def f(path, v):
    if not isinstance(v, LoraWeight):
      return v
    out_dtype = dtype or v.w.dtype
    return (materialize(v.w, jnp.float32) + v.delta(jnp.float32)).astype(out_dtype)

  return _map(f, adapted)


def unmerge(merged: Any, adapted: Any) -> Any:
  """Undoes :func:`merge`: returns ``adapted`` with each ``w`` set to ``W' - scale·A@B``."""
  ws = _leaves(merged)

  def f(path, v):
    if not isinstance(v, LoraWeight):
      return v
    if path not in ws:
      raise ValueError(f"unmerge: {path!r} is adapted but missing from the merged params")
    m = ws[path]
    if tuple(m.shape) != v.shape:
      raise ValueError(f"unmerge: {path!r} has shape {tuple(m.shape)} in the merged params but {v.shape} in the adapter")
    w = (m.astype(jnp.float32) - v.delta(jnp.float32)).astype(m.dtype)
    return dataclasses.replace(v, w=w)

  return _map(f, adapted)


@dataclasses.dataclass(frozen=True)
class ParamReport:
  """Parameter counts of an adapted tree (PEFT's print_trainable_parameters)."""

  trainable: int
  total: int
  rows: tuple[tuple[str, tuple[int, ...], int, int], ...]  # (path, kernel shape, rank, lora params)

  @property
  def percent(self) -> float:
    return 100.0 * self.trainable / max(self.total, 1)

  def __str__(self):
    return f"trainable params: {self.trainable:,} || all params: {self.total:,} || trainable%: {self.percent:.4f}"

  def table(self) -> str:
    w = max([len(r[0]) for r in self.rows] + [6])
    lines = [f"{'module':<{w}}  {'shape':<18} {'rank':>4} {'lora params':>12}"]
    lines += [f"{p:<{w}}  {str(s):<18} {r:>4} {n:>12,}" for p, s, r, n in self.rows]
    lines.append(str(self))
    return "\n".join(lines)


def param_report(adapted: Any, bias: str = "none") -> ParamReport:
  """Counts trainable (A/B and trainable biases) and total (base + adapters) parameters.

  Quantized weights count their original number of elements.
  """
  leaves = _leaves(adapted)
  bias_paths = _trainable_bias_paths(adapted, bias)
  trainable = total = 0
  rows = []
  for p, v in leaves.items():
    if isinstance(v, LoraWeight):
      n = int(np.prod(v.a.shape) + np.prod(v.b.shape))
      rows.append((p, v.shape, v.rank, n))
      trainable += n
      total += n + int(np.prod(v.shape))
    else:
      n = int(np.prod(getattr(v, "shape", ())))
      total += n
      if p in bias_paths:
        trainable += n
  return ParamReport(trainable=trainable, total=total, rows=tuple(rows))
