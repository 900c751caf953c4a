"""Adapting parameter trees: init, split/combine, merge/unmerge, parameter counts.

An *adapted* tree is the original parameter tree in which every targeted kernel
leaf is replaced by a :class:`LoraWeight` node holding the frozen base ``w`` and
the factors ``a`` and ``b``. No path is renamed: base checkpoints, sharding rules
and quantization rules keep applying to the same paths.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jax_lora._src.config import LoraConfig, is_all_linear
from jax_lora._src.lora import LoraWeight, delta, merged_kernel
from jax_lora._src.trace import trace_params
from jax_lora._src.tree import is_quantized, leaves, map_leaves, match_paths, materialize, path_key

__all__ = [
    "init_lora",
    "split",
    "combine",
    "merge",
    "unmerge",
    "lora_weights",
    "ParamReport",
    "param_report",
    "trainable_paths",
    "token_ids",
]


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
  k = path_key(key, path)
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
  w_res = (wf - delta(a, b, scale, lay, jnp.float32)).astype(w.dtype)
  return w_res, a, b


def _resolve_targets(params, config: LoraConfig, apply) -> tuple[set[str], dict[str, str]]:
  flat = leaves(params)
  if apply is None:
    return set(match_paths(flat.keys(), config.target_patterns, what="LoRA target")), {}
  layouts, outputs = trace_params(lambda p: apply(p), params)
  linear = {p for p in layouts if p not in outputs and "lm_head" not in p.split("/")}
  named = [t for t, pat in zip(config.targets, config.target_patterns) if not is_all_linear(t)]
  targets = set(match_paths(flat.keys(), [config.target_patterns[config.targets.index(t)] for t in named],
                            what="LoRA target")) if named else set()
  if len(named) < len(config.targets):
    if not linear:
      raise ValueError("all-linear: tracing apply(params) found no parameter used as a matmul operand "
                       "(besides the output layer); name the targets instead")
    targets |= linear
  return targets, layouts


def init_lora(params: Any, config: LoraConfig, key: jax.Array, *, apply=None) -> Any:
  """Adds LoRA factors to every kernel matched by ``config.targets``.

  Args:
    params: any parameter pytree (Linen ``variables["params"]``, an ``nnx.State``,
      an Equinox module, a plain dict); kernels may be float or quantized arrays.
    config: what to adapt and how.
    key: PRNG key; each path gets ``fold_in(key, crc32(path))``.
    apply: optional ``apply(params) -> outputs`` running the model on example inputs
      (e.g. ``lambda p: model.apply({"params": p}, x)``, NNX:
      ``lambda s: nnx.merge(graphdef, s, rest, copy=True)(x)``); it is only traced
      (``jax.make_jaxpr``, shapes). With it, ``"all-linear"`` means every
      parameter used as a matmul operand (``dot_general``: Dense, einsum, ``x @ w``,
      ``w @ x``), whatever it is named, except the output layer (the matmul
      producing the model's output up to casts, reshapes and a bias: an untied
      ``lm_head``, a tied embedding used as ``h @ E.T``) and modules named
      ``lm_head``; convolutions are not matmuls. Kernels without an entry in
      ``config.layouts`` take the layout the trace shows ('i' contracted axes,
      'o' the others, 'b' scan-stacked ones). Without it, all-linear is the name
      rule :data:`jax_lora._src.config.ALL_LINEAR` (every ``kernel`` leaf but an untied
      ``lm_head``'s, as PEFT's all-linear).

  Returns:
    The same tree with each targeted kernel replaced by a :class:`LoraWeight`
    (``b = 0``, so the adapted model equals the base at init; except PiSSA, whose
    base is the residual and whose A·B restore the original exactly).
  """
  flat = leaves(params)
  for p, v in flat.items():
    if isinstance(v, LoraWeight):
      raise ValueError(f"{p!r} already has a LoRA adapter; merge it first or init from the base params")
  targets, traced = _resolve_targets(params, config, apply)
  for p in sorted(targets):
    v = flat[p]
    if not hasattr(v, "shape") or len(v.shape) < 2:
      raise ValueError(
          f"LoRA target {p!r} has shape {getattr(v, 'shape', None)}; LoRA needs a kernel with >= 2 axes, "
          "narrow the target pattern (e.g. '.*/kernel')")

  def f(path, w):
    if path not in targets:
      return w
    lay = config.layout_for(path, len(w.shape), traced.get(path))
    r, alpha = config.rank_for(path), config.alpha_for(path)
    w, a, b = _init_factors(path, w, lay, r, alpha, config, key)
    lw = LoraWeight(w=w, a=a, b=b, alpha=alpha, rank=r, layout=lay, path=path,
                    rslora=config.use_rslora, dropout=config.dropout)
    return dataclasses.replace(lw, m=dora_magnitude(lw)) if config.use_dora else lw

  tokens = _token_tables(flat, config, targets)
  return map_leaves(lambda p, w: _token_rows(p, w, tokens[p], config) if p in tokens else f(p, w), params)


def _token_tables(flat, config: LoraConfig, targets) -> dict[str, tuple[int, ...]]:
  """``{table path: token ids}`` for ``config.trainable_token_indices``."""
  out = {}
  for name, ids in config.trainable_token_indices:
    hits = [p for p in match_paths(flat.keys(), [rf"(.*/)?{name}(/embedding|/weight)?"], what="trainable tokens table")
            if len(getattr(flat[p], "shape", ())) == 2]
    if len(hits) != 1:
      raise ValueError(f"trainable_token_indices {name!r} names {len(hits)} 2-D tables ({hits[:3]}); name one")
    p = hits[0]
    if p in targets or is_quantized(flat[p]):
      raise ValueError(f"trainable tokens on {p!r}: the table is also a LoRA target or quantized; it can be one")
    if max(ids) >= flat[p].shape[0]:
      raise ValueError(f"trainable_token_indices {name!r}: id {max(ids)} is outside the table's {flat[p].shape[0]} rows")
    out[p] = ids
  return out


def _token_rows(path: str, w, ids: tuple[int, ...], config: LoraConfig) -> LoraWeight:
  """PEFT's trainable tokens as an exact LoRA with a fixed A: ``W + onehot(ids)ᵀ @ B``, B = 0 at
  init (each row of B is the change of one chosen row; the other rows never move)."""
  dtype = jnp.dtype(config.dtype or jnp.float32)
  a = jax.nn.one_hot(jnp.asarray(ids), w.shape[0], dtype=dtype).T  # (vocab, n), fixed
  b = jnp.zeros((len(ids), w.shape[1]), dtype)
  return LoraWeight(w=w, a=a, b=b, alpha=float(len(ids)), rank=len(ids), layout="io", path=path, freeze_a=True)


def token_ids(lw: LoraWeight) -> list[int]:
  """The token ids of a trainable-tokens :class:`LoraWeight` (its fixed one-hot A)."""
  return [int(i) for i in np.argmax(np.asarray(lw.a), axis=0)]


def dora_magnitude(lw: LoraWeight) -> jax.Array:
  """DoRA's initial magnitude: ``‖W + s·A@B‖`` over the input axes, shaped ``(*batch, *out)``
  like ``b`` without its rank axis (float32, or A's dtype when set)."""
  ins = tuple(i for i, c in enumerate(lw.layout) if c == "i")
  m = jnp.sqrt(jnp.sum(jnp.square(merged_kernel(dataclasses.replace(lw, m=None), jnp.float32)), axis=ins))
  return m.astype(lw.a.dtype)


def lora_weights(adapted: Any) -> dict[str, LoraWeight]:
  """``{path: LoraWeight}`` for every adapter in ``adapted``."""
  return {p: v for p, v in leaves(adapted).items() if isinstance(v, LoraWeight)}


def trainable_paths(adapted, bias: str = "none", modules_to_save: Sequence[str] = ()) -> set[str]:
  """Paths of plain leaves that train whole: biases (``bias`` "all", or "lora_only": those
  of adapted modules) and every parameter of the modules in ``modules_to_save``
  (PEFT's option: bare names such as ``"lm_head"``; as in PEFT, every module whose name
  ends with one, so ``"norm"`` also selects ``input_layernorm``).

  Raises:
    ValueError: a bad ``bias``, a ``modules_to_save`` entry that matches no module, or
      one whose module also carries a LoRA adapter (PEFT refuses both too).
  """
  if bias not in ("none", "all", "lora_only"):
    raise ValueError(f"bias must be 'none', 'all' or 'lora_only', got {bias!r}")
  flat = leaves(adapted)
  out = set()
  if bias == "all":
    out = {p for p in flat if p.rsplit("/", 1)[-1] == "bias"}
  elif bias == "lora_only":
    parents = {p.rsplit("/", 1)[0] for p, v in flat.items() if isinstance(v, LoraWeight)}
    out = {p for p in flat if p.rsplit("/", 1)[-1] == "bias" and p.rsplit("/", 1)[0] in parents}
  for name in modules_to_save:
    if not re.fullmatch(r"\w+", name):
      raise ValueError(f"modules_to_save {name!r}: give bare module names as PEFT does (e.g. 'lm_head')")
    pat = re.compile(rf".*{name}")  # PEFT: the module name ends with it (input_layernorm for "norm")
    hits = {p for p in flat if "/" in p and pat.fullmatch(p.rsplit("/", 1)[0])}
    if not hits:
      raise ValueError(f"modules_to_save {name!r} matches no module of the tree")
    lora = sorted(p for p in hits if isinstance(flat[p], LoraWeight))
    if lora:
      raise ValueError(f"modules_to_save {name!r}: {lora[0]!r} also has a LoRA adapter; train it whole or adapt it")
    quant = sorted(p for p in hits if is_quantized(flat[p]))
    if quant:
      raise ValueError(f"modules_to_save {name!r}: {quant[0]!r} is quantized and cannot train whole; leave it out "
                       "of quantization (QuantConfig targets)")
    out |= {p for p in hits if _is_param(flat[p])}
  return out


def split(adapted: Any, bias: str = "none", modules_to_save: Sequence[str] = ()) -> tuple[Any, Any]:
  """Partitions an adapted tree into ``(trainable, frozen)``.

  Both keep the full structure with ``None`` placeholders (equinox-style), so
  ``combine(*split(t)) == t`` exactly. ``trainable`` holds only the A/B factors
  (and biases if ``bias`` is "all" or "lora_only", and the whole ``modules_to_save``,
  see :func:`trainable_paths`): differentiate and optimize it alone, and no gradient
  or optimizer state ever exists for the base.
  """
  bias_paths = trainable_paths(adapted, bias, modules_to_save)

  def trainable(path, v):
    if isinstance(v, LoraWeight):
      return dataclasses.replace(v, w=None, a=None if v.freeze_a else v.a)
    return v if path in bias_paths else None

  def frozen(path, v):
    if isinstance(v, LoraWeight):
      return dataclasses.replace(v, a=v.a if v.freeze_a else None, b=None, m=None)
    return None if path in bias_paths else v

  return map_leaves(trainable, adapted), map_leaves(frozen, adapted)


def combine(trainable: Any, frozen: Any) -> Any:
  """Inverse of :func:`split`: fills each ``None`` of one tree from the other."""
  return jax.tree.map(lambda t, f: f if t is None else t, trainable, frozen, is_leaf=lambda x: x is None)


def merge(adapted: Any, dtype=None) -> Any:
  """Folds every adapter into its kernel: ``W + scale·A@B``, added in float32 and
  cast to ``dtype`` (default: each base's dtype).

  Quantized bases are dequantized first (the adapter was trained on
  dequant(W)); the merged kernel is float. Quantized kernels without an
  adapter are dequantized too, so the result runs in the plain model
  (``model.apply``) with no jax_lora layer. To keep or re-quantize the base,
  see ``jax_lora.quant.merge_quantized``.
  """

  def f(path, v):
    if is_quantized(v):
      return materialize(v, dtype)
    if not isinstance(v, LoraWeight):
      return v
    return merged_kernel(v, dtype)

  return map_leaves(f, adapted)


def unmerge(merged: Any, adapted: Any) -> Any:
  """Undoes :func:`merge`: returns ``adapted`` with each ``w`` set to ``W' - scale·A@B``."""
  ws = leaves(merged)

  def f(path, v):
    if not isinstance(v, LoraWeight):
      return v
    if path not in ws:
      raise ValueError(f"unmerge: {path!r} is adapted but missing from the merged params")
    m = ws[path]
    if tuple(m.shape) != v.shape:
      raise ValueError(f"unmerge: {path!r} has shape {tuple(m.shape)} in the merged params but {v.shape} in the adapter")
    if v.m is not None:
      raise ValueError(f"unmerge: {path!r} is a DoRA adapter, whose merge rescales columns by a norm of the lost "
                       "base; keep the base params instead of unmerging")
    w = (m.astype(jnp.float32) - v.delta(jnp.float32)).astype(m.dtype)
    return dataclasses.replace(v, w=w)

  return map_leaves(f, adapted)


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


def _is_param(v) -> bool:
  """Float arrays and quantized weights count as parameters; RNG keys, integer counters,
  functions and other static leaves (NNX states, Equinox modules) do not."""
  if is_quantized(v):
    return True
  dt = getattr(v, "dtype", None)
  return hasattr(v, "shape") and dt is not None and jnp.issubdtype(dt, jnp.inexact)


def param_report(adapted: Any, bias: str = "none", modules_to_save: Sequence[str] = ()) -> ParamReport:
  """Counts trainable (A/B and trainable biases) and total (base + adapters) parameters.

  Quantized weights count their original number of elements; only float arrays
  and quantized weights are parameters (not RNG keys, counters or functions).
  """
  flat = leaves(adapted)
  bias_paths = trainable_paths(adapted, bias, modules_to_save)
  trainable = total = 0
  rows = []
  for p, v in flat.items():
    if isinstance(v, LoraWeight):
      n = int((0 if v.freeze_a else np.prod(v.a.shape)) + np.prod(v.b.shape) + (0 if v.m is None else np.prod(v.m.shape)))
      rows.append((p, v.shape, v.rank, n))
      trainable += n
      total += n + int(np.prod(v.shape))
    elif _is_param(v):
      n = int(np.prod(v.shape))
      total += n
      if p in bias_paths:
        trainable += n
  return ParamReport(trainable=trainable, total=total, rows=tuple(rows))
