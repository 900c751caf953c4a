"""QLoRA pieces that need both LoRA and quantization: merging onto a quantized
base, and LoftQ initialization (Li et al., arXiv:2310.08659).

Instead of A random and B = 0 on top of ``dequant(Q(W))`` (which starts training
from the quantized model, error ``W − dequant(Q(W))``), alternate ``n_iter``
times: quantize ``W − s·A@B``, then set ``s·A@B`` to the best rank-r
approximation (truncated SVD) of ``W − dequant(Q)``. At start the adapted model
is then closer to the float model than the plain quantized one.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp

from jax_lora._src.adapt import init_lora
from jax_lora._src.lora import LoraWeight, merged_kernel
from jax_lora._src.quant import QuantConfig, QuantizedArray, quantize, quantize_array
from jax_lora._src.tree import is_quantized, map_leaves

__all__ = ["MergeError", "merge_quantized", "loftq_init", "init_loftq"]


def loftq_init(w: jax.Array, rank: int, n_iter: int = 1, config: QuantConfig = QuantConfig(),
               scale: float = 1.0) -> tuple[QuantizedArray, jax.Array, jax.Array]:
  """LoftQ factors for one 2-D kernel ``w`` of shape (in, out).

  Args:
    w: float kernel (in, out).
    rank: LoRA rank r.
    n_iter: alternating quantize / SVD rounds (≥ 1).
    config: how to quantize (scheme, block size, double quantization, axis).
    scale: the LoRA scale s (alpha/rank, or alpha/sqrt(rank) for rsLoRA).

  Returns:
    ``(q, a, b)`` with ``a`` (in, r), ``b`` (r, out) in float32 such that
    ``dequant(q) + scale·a@b`` approximates ``w``.
  """
  if w.ndim != 2:
    raise ValueError(f"LoftQ needs a 2-D (in, out) kernel, got shape {w.shape}; exclude it or reshape it")
  if n_iter < 1:
    raise ValueError(f"n_iter={n_iter} must be ≥ 1")
  if not 0 < rank <= min(w.shape):
    raise ValueError(f"rank {rank} must be in [1, {min(w.shape)}] for a kernel of shape {w.shape}")
  wf = jnp.asarray(w, jnp.float32)
  low = jnp.zeros_like(wf)
  root = math.sqrt(scale)
  for _ in range(n_iter):
    q = quantize_array((wf - low).astype(w.dtype), config.scheme, config.block_size, double_quant=config.double_quant,
                       dq_block_size=config.dq_block_size,
                       axis=-2 if config.axis is None else config.axis)
    u, s, vt = jnp.linalg.svd(wf - q.dequantize(jnp.float32), full_matrices=False)
    sr = jnp.sqrt(s[:rank])
    a = u[:, :rank] * sr[None, :] / root
    b = sr[:, None] * vt[:rank] / root
    low = scale * (a @ b)
  return q, a, b


def init_loftq(params: Any, lora_config, quant_config: QuantConfig, key: jax.Array, n_iter: int = 1) -> Any:
  """``init_lora`` + ``quantize`` with LoftQ factors for every adapted 2-D quantized kernel.

  Kernels targeted by LoRA and by quantization get ``(q, a, b)`` from
  :func:`loftq_init`; other LoRA kernels keep the usual init, other quantized
  kernels are plain quantized.
  """
  adapted = init_lora(quantize(params, quant_config), lora_config, key)
  floats = params

  def f(path, v):
    if not (isinstance(v, LoraWeight) and isinstance(v.w, QuantizedArray) and v.w.ndim == 2 and v.layout == "io"):
      return v
    w = floats
    for part in path.split("/"):
      w = w[part]
    q, a, b = loftq_init(w, v.rank, n_iter, quant_config, v.scale)
    return dataclasses.replace(v, w=q, a=a.astype(v.a.dtype), b=b.astype(v.b.dtype))

  return map_leaves(f, adapted)


# ------------------------------------------------------------------------------ merging


@dataclasses.dataclass(frozen=True)
class MergeError:
  """Error that re-quantizing a merged kernel adds, against the float merge dequant(W)+ΔW."""

  max_abs: float
  mean_abs: float
  rel_frobenius: float  # ||requant - merged||_F / ||merged||_F


def merge_quantized(adapted: Any, requantize: bool = False, dtype=None) -> tuple[Any, dict[str, MergeError]]:
  """Merges adapters onto their dequantized bases (what the adapter saw in training).

  Args:
    adapted: tree with :class:`~jax_lora.LoraWeight` leaves whose ``w`` may be quantized.
    requantize: re-quantize each merged kernel whose base was quantized, with the
      base's own settings (scheme, block, double quantization, axis).
    dtype: dtype of the float merged kernels (default: the base's original dtype).

  Returns:
    ``(params, report)``: plain params (merged kernels float, or quantized again;
    quantized kernels without an adapter are dequantized unless ``requantize``),
    and ``{path: MergeError}`` for every re-quantized kernel (empty otherwise).
  """
  report: dict[str, MergeError] = {}

  def f(path, v):
    if is_quantized(v) and not requantize:  # no adapter: float too, so the plain model runs
      return v.dequantize(dtype)
    if not isinstance(v, LoraWeight):
      return v
    merged = merged_kernel(v, jnp.float32)
    target = merged.astype(dtype or v.w.dtype)
    if not (requantize and is_quantized(v.w)):
      return target
    q = v.w
    rq = quantize_array(target, q.scheme, q.block_size, double_quant=q.double_quant,
                        dq_block_size=q.dq_block_size, axis=q.axis, compute_dtype=q.compute_dtype)
    err = rq.dequantize(jnp.float32) - merged
    report[path] = MergeError(float(jnp.max(jnp.abs(err))), float(jnp.mean(jnp.abs(err))),
                              float(jnp.linalg.norm(err) / jnp.maximum(jnp.linalg.norm(merged), 1e-30)))
    return rq

  return map_leaves(f, adapted), report
