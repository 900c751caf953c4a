"""Block-wise weight quantization for QLoRA: NF4 (with double quantization), int4, int8.

A :class:`QuantizedArray` is a pytree node holding the stored arrays (codes and
block constants) with static metadata (scheme, block size, original shape and
dtype). It stands in for a float kernel anywhere: ``q.dequantize(dtype)`` is
jit-friendly and returns the original shape, so ``jax_lora.linen.apply``
dequantizes each weight inside the step, in the compute dtype.

Memory layout (explicit, tested): the kernel is transposed so that the
quantized axes (``axis``: the input axes of the kernel, the axes LoRA's ``A``
contracts; one int, or a tuple flattened in order) come last, i.e. a 2-D
``(in, out)`` kernel is stored as ``kernel.T`` = PyTorch's ``(out, in)``.
:func:`quantize` picks the input axes from the LoRA layout (or
``QuantConfig.layouts``): a DenseGeneral ``(in, heads, head_dim)`` kernel blocks
along ``in``, ``(heads, head_dim, out)`` along ``heads·head_dim``, a stacked
``(layers, in, out)`` or ``(in, layers, out)`` kernel along ``in`` (with one
double-quantization offset per layer).
Blocks of ``block_size`` run along that last axis, which is bitsandbytes'
order: the packed bytes of a 2-D kernel are exactly ``quantize_4bit(W_torch)``'s.
4-bit codes are packed two per ``uint8``, the first element in the high nibble.
If the quantized axis is not a multiple of ``block_size`` it is zero-padded
(zeros never change a block's absmax); the padding is sliced off on
dequantization and counted in :func:`bits_report`.

Double quantization (bitsandbytes' scheme): ``offset = mean(absmax)``; the
``absmax - offset`` values are quantized in flat blocks of ``dq_block_size``
(256) with the signed 8-bit dynamic code book, leaving a uint8 code per block
and one float32 constant per 256 blocks.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import warnings
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jax_lora._src.tree import (base_of, first_match, is_quantized, leaves, map_leaves, match_paths,
                                with_base)

__all__ = [
    "NF4_CODE",
    "QuantConfig",
    "QuantizedArray",
    "BitsReport",
    "quantize_array",
    "quantize",
    "dequantize",
    "bits_report",
    "dynamic_map",
    "quant_axes",
]

# bitsandbytes' NF4 code book, index 0..15 (get_4bit_type('nf4')).
NF4_CODE = np.array([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
], dtype=np.float32)
_NF4_BOUNDS = (NF4_CODE[:-1] + NF4_CODE[1:]) / np.float32(2)  # midpoints, float32 like bitsandbytes

_SCHEMES = ("nf4", "int4", "int8")
_LEVELS = {"int4": 7, "int8": 127}  # symmetric: codes in [-L, L], value = code/L · absmax
_TINY = np.float32(1e-38)  # absmax floor: an all-zero block quantizes to code 0.0, never divides by zero


@functools.cache
def dynamic_map() -> np.ndarray:
  """bitsandbytes' signed 8-bit dynamic code book (``create_dynamic_map(signed=True)``), sorted."""
  data = []
  for i in range(7):
    n = 2**i + 1
    bounds = _linspace_f32(0.1, 1.0, n)
    means = (bounds[:-1] + bounds[1:]) / np.float32(2)
    for sign in (1.0, -1.0):
      data += (np.float32(sign * 10.0 ** (-6 + i)) * means).astype(np.float32).tolist()  # float32 product, like torch
  data += [0.0, 1.0]
  data.sort()
  return np.asarray(data, dtype=np.float32)


def _linspace_f32(start: float, end: float, steps: int) -> np.ndarray:
  # torch.linspace in float32 (fused multiply-add): first half counted from start, second from end.
  s, e = np.float32(start), np.float32(end)
  step = np.float64(np.float32((e - s) / np.float32(steps - 1)))
  i = np.arange(steps)
  lo = s + step * i.astype(np.float32)
  hi = e - step * (steps - 1 - i).astype(np.float32)
  return np.where(i < steps // 2, lo, hi).astype(np.float32)


@functools.cache
def _pair_table(scheme: str) -> np.ndarray:
  """(256, 2) float32: the (high, low) nibble values of every byte."""
  b = np.arange(256)
  hi, lo = b >> 4, b & 0xF
  if scheme == "nf4":
    return np.stack([NF4_CODE[hi], NF4_CODE[lo]], -1)
  sext = lambda v: np.where(v >= 8, v - 16, v).astype(np.float32)  # two's-complement nibble
  return np.stack([sext(hi), sext(lo)], -1) * np.float32(1.0 / _LEVELS[scheme])


@dataclasses.dataclass(frozen=True, kw_only=True)
class QuantConfig:
  """How :func:`quantize` quantizes a parameter tree."""

  scheme: str = "nf4"  # "nf4" (QLoRA), "int4" (symmetric, levels ±7) or "int8" (symmetric, ±127)
  block_size: int = 64  # values per absmax constant, along the quantized axis (even, ≥ 2)
  double_quant: bool = True  # quantize the absmax constants too (8-bit dynamic codes, bitsandbytes' scheme)
  dq_block_size: int = 256  # absmax constants per second-level constant
  # regexes fullmatched on "/" paths; None: every ≥2-D "kernel" leaf and every LoRA-adapted base
  targets: tuple[str, ...] | None = None
  min_size: int = 4096  # with targets=None, smaller kernels stay float
  # Kernel axis (int) or axes (tuple, flattened) the blocks run along. None: the kernel's
  # input axes: the 'i' axes of its LoRA layout or of ``layouts``; else (in, out) -> 0 and,
  # for other kernels without a layout, the first of (-2,), (0,), (0, 1), ... that a block
  # divides (the fewest padded values otherwise).
  axis: int | tuple[int, ...] | None = None
  # (regex, layout) pairs as in LoraConfig.layouts ('b','i','o' per kernel axis), for
  # kernels quantized without a LoRA adapter; e.g. jax_lora.linen.infer_layouts' result.
  layouts: tuple[tuple[str, str], ...] = ()
  # Padded values allowed per quantized value before quantize() warns (a block size that
  # does not divide the input axes stores zeros: 0.05 = 5% more bits).
  max_padding: float = 0.05
  # The dtype a quantized kernel is dequantized to and multiplied in (x is cast to it; LoRA A/B
  # are cast to it inside the matmul, their float32 values and gradients stay float32). None: the
  # layer's compute dtype (Flax ``dtype``, else the input's). Stored on each QuantizedArray.
  compute_dtype: Any = None

  def __post_init__(self):
    if self.scheme not in _SCHEMES:
      raise ValueError(f"QuantConfig.scheme={self.scheme!r} is unknown; use one of {_SCHEMES}")
    if self.block_size < 2 or self.block_size % 2:
      raise ValueError(f"QuantConfig.block_size={self.block_size} must be an even number ≥ 2 (e.g. 64)")
    if self.dq_block_size < 1:
      raise ValueError(f"QuantConfig.dq_block_size={self.dq_block_size} must be ≥ 1 (e.g. 256)")
    if isinstance(self.targets, str):
      raise ValueError("QuantConfig.targets must be a tuple of regexes, not a string; wrap it: (pattern,)")
    lays = self.layouts.items() if isinstance(self.layouts, dict) else self.layouts
    object.__setattr__(self, "layouts", tuple((str(k), str(v)) for k, v in lays))
    for pat, lay in self.layouts:
      if not lay or set(lay) - set("bio") or "i" not in lay:
        raise ValueError(f"QuantConfig.layouts[{pat!r}]={lay!r}: use one of 'b','i','o' per kernel axis, with an 'i'")
    if isinstance(self.axis, list):
      object.__setattr__(self, "axis", tuple(self.axis))
    if self.compute_dtype is not None:
      if not jnp.issubdtype(jnp.dtype(self.compute_dtype), jnp.floating):
        raise ValueError(f"QuantConfig.compute_dtype={self.compute_dtype!r} must be a float dtype "
                         "(e.g. jnp.bfloat16) or None")
      object.__setattr__(self, "compute_dtype", np.dtype(jnp.dtype(self.compute_dtype)))


def _field(static: bool = False, default=dataclasses.MISSING):
  return dataclasses.field(default=default, metadata=dict(static=static))


@dataclasses.dataclass(frozen=True, kw_only=True)
class QuantizedArray:
  """A block-quantized weight; ``.shape``/``.dtype`` describe the original float weight.

  Data (pytree children): ``codes`` (uint8, two 4-bit codes per byte, or int8),
  shaped ``(*rest, K_padded // 2)`` (4-bit) or ``(*rest, K_padded)`` (int8) where
  ``rest`` are the other axes in order and ``K`` the quantized axis; either
  ``absmax`` (float32, ``(*rest, K_padded // block_size)``) or its double-quantized
  parts ``absmax_codes`` (uint8, same shape), ``nested_absmax`` (float32, one per
  ``dq_block_size`` flat absmax values) and ``offset`` (float32 scalar).
  """

  jax_lora_node = True  # a single leaf for jax_lora's tree maps (not a dataclass field)

  codes: jax.Array
  absmax: jax.Array | None = None
  absmax_codes: jax.Array | None = None
  nested_absmax: jax.Array | None = None
  offset: jax.Array | None = None
  scheme: str = _field(True, "nf4")
  block_size: int = _field(True, 64)
  dq_block_size: int = _field(True, 256)
  shape: tuple[int, ...] = _field(True, ())
  dtype: Any = _field(True, np.dtype(np.float32))
  # non-negative index of the quantized axis in ``shape``, or a tuple of them (flattened in order)
  axis: Any = _field(True, 0)
  # dtype the kernel is dequantized to and multiplied in by the LoRA matmul (None: the layer's dtype)
  compute_dtype: Any = _field(True, None)

  # ---------------------------------------------------------------- shape-like
  @property
  def ndim(self) -> int:
    return len(self.shape)

  @property
  def size(self) -> int:
    return math.prod(self.shape)

  @property
  def double_quant(self) -> bool:
    return self.absmax_codes is not None

  @property
  def axes(self) -> tuple[int, ...]:
    """The quantized axes (``axis`` as a tuple)."""
    return (self.axis,) if isinstance(self.axis, int) else tuple(self.axis)

  @property
  def perm(self) -> tuple[int, ...]:
    """Axis order of the stored layout: the other axes, then the quantized axes."""
    return tuple(i for i in range(self.ndim) if i not in self.axes) + self.axes

  @property
  def quantized_len(self) -> int:
    """Number of values along the (flattened) quantized axes."""
    return math.prod(self.shape[a] for a in self.axes)

  @property
  def padded(self) -> int:
    """Length of the quantized axes after padding to a multiple of ``block_size``."""
    return -(-self.quantized_len // self.block_size) * self.block_size

  def __repr__(self):
    dq = ", double_quant" if self.double_quant else ""
    return f"QuantizedArray({self.scheme}, shape={self.shape}, dtype={np.dtype(self.dtype).name}, block={self.block_size}{dq})"

  # ---------------------------------------------------------------- values
  def local(self) -> "QuantizedArray":
    """Self with ``shape``/``axis`` matching the arrays after leading axes were sliced off
    (``nn.scan`` slices every data field but keeps the static metadata)."""
    k = self.ndim - len(self.axes) + 1 - self.codes.ndim
    if k <= 0:
      return self
    ax = self.axis - k if isinstance(self.axis, int) else tuple(a - k for a in self.axis)
    return dataclasses.replace(self, shape=self.shape[k:], axis=ax)

  def scales(self) -> jax.Array:
    """The float32 absmax per block, ``(*rest, K_padded // block_size)`` (reconstructed if double-quantized)."""
    if not self.double_quant:
      return self.absmax.astype(jnp.float32)
    ac = self.absmax_codes
    lead = ac.shape[:-2]
    rows = ac.reshape(math.prod(lead), -1)
    n = rows.shape[1]
    nested = self.nested_absmax.reshape(rows.shape[0], -1).astype(jnp.float32)
    nb = nested.shape[1]
    vals = jnp.asarray(dynamic_map())[rows.astype(jnp.int32)]
    vals = jnp.pad(vals, ((0, 0), (0, nb * self.dq_block_size - n))).reshape(-1, nb, self.dq_block_size)
    rec = (vals * nested[..., None]).reshape(rows.shape[0], -1)[:, :n]
    rec = rec + self.offset.reshape(-1, 1).astype(jnp.float32)
    return rec.reshape(ac.shape)

  def unpacked(self) -> jax.Array:
    """Integer codes, one per element, in the stored layout ``(*rest, K_padded)``."""
    self = self.local()
    c = self.codes
    if self.scheme == "int8":
      return c
    if self.scheme == "nf4":
      hi, lo = c >> 4, c & 0xF
    else:  # int4: two's-complement nibbles, sign-extended with arithmetic shifts
      s = c.astype(jnp.int8)
      hi, lo = s >> 4, (s << 4) >> 4
    return jnp.stack([hi, lo], axis=-1).reshape(c.shape[:-1] + (c.shape[-1] * 2,))

  def dequantize(self, dtype=None) -> jax.Array:
    """The float weight in its original shape (``dtype``: default the original dtype)."""
    self = self.local()
    dtype = self.dtype if dtype is None else dtype
    c = self.codes
    if self.scheme == "int8":
      vals = c.astype(jnp.float32) * jnp.float32(1.0 / _LEVELS["int8"])
    else:  # one look-up per byte gives both values (2x faster than unpacking on CPU)
      vals = jnp.asarray(_pair_table(self.scheme))[c.astype(jnp.int32)]
    shape = c.shape[:-1] + (self.padded,)
    nblk = self.padded // self.block_size
    w = (vals.reshape(shape[:-1] + (nblk, self.block_size)) * self.scales()[..., None]).reshape(shape)
    w = w[..., :self.quantized_len].astype(dtype)
    w = w.reshape(w.shape[:-1] + tuple(self.shape[a] for a in self.axes))
    return jnp.transpose(w, np.argsort(self.perm))

  # ---------------------------------------------------------------- sharding
  def shard_specs(self, kernel_spec, axis_sizes: dict[str, int]) -> "QuantizedArray":
    """PartitionSpecs for the stored arrays given the float kernel's spec (cut at block boundaries).

    Raises:
      ValueError: if the quantized axis is sharded and a block would straddle two shards.
    """
    from jax.sharding import PartitionSpec as P

    spec = list(kernel_spec) + [None] * (self.ndim - len(kernel_spec))
    if len(self.axes) > 1 and any(spec[a] is not None for a in self.axes):
      raise ValueError(f"quantized axes {self.axes} of shape {self.shape} are flattened into blocks; "
                       "shard another axis of this kernel")
    kspec = spec[self.axes[0]]
    if kspec is not None:
      names = kspec if isinstance(kspec, tuple) else (kspec,)
      n = math.prod(axis_sizes[a] for a in names)
      k = self.quantized_len
      if self.padded != k or (k // n) % self.block_size or k % n:
        raise ValueError(f"quantized axis of length {k} split {n} ways cuts {self.block_size}-value blocks; "
                         f"shard another axis or use a block size dividing {k // max(n, 1)}")
    stored = P(*[spec[i] for i in self.perm[:self.ndim - len(self.axes)]], spec[self.axes[0]])
    opt = lambda x, s: None if x is None else s
    return dataclasses.replace(self, codes=stored, absmax=opt(self.absmax, stored),
                               absmax_codes=opt(self.absmax_codes, stored),
                               nested_absmax=opt(self.nested_absmax, P()), offset=opt(self.offset, P()))


jax.tree_util.register_dataclass(QuantizedArray)


# ------------------------------------------------------------------------------ quantize one array


def _block_absmax(x: jax.Array, block: int) -> tuple[jax.Array, jax.Array]:
  """(x as (*rest, nblk, block), absmax (*rest, nblk)) for x of shape (*rest, K) with K % block == 0."""
  xb = x.reshape(x.shape[:-1] + (x.shape[-1] // block, block))
  return xb, jnp.max(jnp.abs(xb), axis=-1)


def _nf4_codes(scaled: jax.Array) -> jax.Array:
  # index of the nearest code: number of midpoints strictly below the value (ties go low, like bitsandbytes).
  idx = jnp.zeros(scaled.shape, jnp.uint8)
  for b in _NF4_BOUNDS:
    idx = idx + (scaled > b).astype(jnp.uint8)
  return idx


def _pack(q: jax.Array) -> jax.Array:
  """Two 4-bit codes per byte along the last axis, the first in the high nibble."""
  q = q.astype(jnp.uint8).reshape(q.shape[:-1] + (q.shape[-1] // 2, 2))
  return (q[..., 0] << 4) | (q[..., 1] & 0xF)


@functools.cache
def _dq_lut() -> np.ndarray:
  """Code of the nearest dynamic-map entry for each of 65536 grid points on [-1, 1].

  bitsandbytes 0.50 on CPU rounds the normalized value to this 16-bit grid before
  the look-up, so a value within half a grid step (1.5e-5) of the midpoint
  between two codes can land on the farther one; using the same grid keeps our
  codes identical to bitsandbytes'.
  """
  code = dynamic_map().astype(np.float64)
  centers = np.arange(65536, dtype=np.float64) / 65535 * 2 - 1
  i = np.clip(np.searchsorted(code, centers, side="right") - 1, 0, code.shape[0] - 2)
  return (i + (np.abs(centers - code[i + 1]) < np.abs(centers - code[i]))).astype(np.uint8)


def _dq_codes(v: jax.Array) -> jax.Array:
  """8-bit dynamic codes for v in [-1, 1]: the 16-bit grid look-up bitsandbytes uses."""
  v = jnp.clip(v, -1.0, 1.0)
  idx = jnp.trunc(((v + 1.0) * 0.5) * 65535.0 + 0.5).astype(jnp.int32)
  return jnp.asarray(_dq_lut())[idx]


def _double_quantize(absmax: jax.Array, dq_block: int) -> tuple[jax.Array, jax.Array, jax.Array]:
  """bitsandbytes' double quantization of the absmax constants.

  2-D weights (absmax ``(out, nblk)``) use one offset and nested blocks over the
  flat absmax, exactly like bitsandbytes. Stacked weights (``(*lead, out, nblk)``,
  e.g. ``nn.scan`` layers) get one offset and nested constants per leading
  index, so slicing a layer off every field (as ``nn.scan`` does) stays exact.
  """
  lead = absmax.shape[:-2]
  rows = absmax.reshape(math.prod(lead), -1)
  n = rows.shape[1]
  offset = jnp.mean(rows, axis=1)
  centered = rows - offset[:, None]
  nb = -(-n // dq_block)
  # pad with zeros of the last block's own values: padding must not change its absmax
  padded = jnp.pad(centered, ((0, 0), (0, nb * dq_block - n))).reshape(-1, nb, dq_block)
  nested = jnp.max(jnp.abs(padded), axis=-1)
  normed = padded / jnp.maximum(nested, _TINY)[..., None]
  codes = _dq_codes(normed).reshape(rows.shape[0], -1)[:, :n].reshape(absmax.shape)
  return codes, nested.reshape(lead + (nb,)), offset.reshape(lead)


@functools.partial(jax.jit, static_argnames=("scheme", "block_size", "double_quant", "dq_block_size", "axis"))
def _quantize_jit(w, *, scheme, block_size, double_quant, dq_block_size, axis):
  perm = tuple(i for i in range(w.ndim) if i not in axis) + axis
  x = jnp.transpose(w.astype(jnp.float32), perm)
  x = x.reshape(x.shape[:w.ndim - len(axis)] + (-1,))
  k = x.shape[-1]
  pad = -(-k // block_size) * block_size - k
  if pad:
    x = jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, pad)])
  xb, absmax = _block_absmax(x, block_size)
  inv = (jnp.float32(1.0) / jnp.maximum(absmax, _TINY))[..., None]
  scaled = jnp.clip(xb * inv, -1.0, 1.0).reshape(x.shape)
  if scheme == "nf4":
    codes = _pack(_nf4_codes(scaled))
  else:
    lv = _LEVELS[scheme]
    q = jnp.round(scaled * jnp.float32(lv)).astype(jnp.int8)
    codes = q if scheme == "int8" else _pack(q.astype(jnp.uint8))
  if double_quant:
    ac, nested, offset = _double_quantize(absmax, dq_block_size)
    return dict(codes=codes, absmax_codes=ac, nested_absmax=nested, offset=offset)
  return dict(codes=codes, absmax=absmax)


def quantize_array(w: Any, scheme: str = "nf4", block_size: int = 64, *, double_quant: bool = True,
                   dq_block_size: int = 256, axis: int | tuple[int, ...] = -2, check_finite: bool = True,
                   compute_dtype: Any = None) -> QuantizedArray:
  """Quantizes one float array block-wise (blocks along ``axis``).

  Args:
    w: float array (float32/bfloat16/float16), at least 1-D.
    scheme: "nf4", "int4" or "int8".
    block_size: values per absmax (even); the axis is zero-padded to a multiple of it.
    double_quant: also quantize the absmax constants (8-bit, blocks of ``dq_block_size``).
    dq_block_size: absmax constants per second-level constant.
    axis: the axis blocks run along (default -2: the input axis of an (in, out) kernel;
      a 1-D array uses axis 0), or a tuple of axes flattened (in order) into one.
    check_finite: raise on NaN/inf (needs a concrete array; skipped under tracing).
    compute_dtype: the dtype the kernel is dequantized to and multiplied in (None: the
      layer's compute dtype); see :class:`QuantConfig`.

  Returns:
    A :class:`QuantizedArray` whose ``dequantize()`` has ``w``'s shape and dtype.
  """
  compute_dtype = QuantConfig(scheme=scheme, block_size=block_size, dq_block_size=dq_block_size,
                              compute_dtype=compute_dtype).compute_dtype  # validates
  w = jnp.asarray(w)
  if not jnp.issubdtype(w.dtype, jnp.floating):
    raise ValueError(f"can only quantize float arrays, got dtype {w.dtype}; cast it to float32 first")
  if w.ndim == 0 or w.size == 0:
    raise ValueError(f"cannot quantize an array of shape {w.shape}; keep it in float (exclude it from targets)")
  axes = (axis if w.ndim > 1 else 0,) if not isinstance(axis, (tuple, list)) else tuple(axis)
  if not axes or any(not -w.ndim <= a < w.ndim for a in axes) or len({a % w.ndim for a in axes}) != len(axes):
    raise ValueError(f"axis {axis} is out of range for shape {w.shape}; pass distinct axes in [-{w.ndim}, {w.ndim})")
  axes = tuple(a % w.ndim for a in axes)
  if check_finite and not isinstance(w, jax.core.Tracer) and not bool(jnp.isfinite(w).all()):
    raise ValueError(f"array of shape {w.shape} has NaN or inf values; fix the weights before quantizing")
  parts = _quantize_jit(w, scheme=scheme, block_size=block_size, double_quant=double_quant,
                        dq_block_size=dq_block_size, axis=axes)
  return QuantizedArray(**parts, scheme=scheme, block_size=block_size, dq_block_size=dq_block_size,
                        shape=tuple(w.shape), dtype=np.dtype(w.dtype), axis=axes[0] if len(axes) == 1 else axes,
                        compute_dtype=compute_dtype)


# ------------------------------------------------------------------------------ pytrees


def _default_target(path: str, x: Any, min_size: int, adapted: bool = False) -> bool:
  named = adapted or path.split("/")[-1] == "kernel"  # LoRA-adapted bases whatever their name (Equinox 'weight')
  return named and len(np.shape(x)) >= 2 and math.prod(np.shape(x)) >= min_size


def _guess_axes(shape: tuple[int, ...], block: int) -> tuple[int, ...]:
  """Input axes of a kernel without a layout: (in, out) -> (0,); otherwise the first of
  (-2,), (0,), (0, 1), (0, 1, 2)... whose length a block divides, else the least padded."""
  n = len(shape)
  if n == 2:
    return (0,)
  cands = [(n - 2,), (0,)] + [tuple(range(j)) for j in range(2, n)]
  pad = lambda ax: -(-math.prod(shape[a] for a in ax) // block) * block / math.prod(shape[a] for a in ax)
  for ax in cands:
    if pad(ax) == 1:
      return ax
  return min(cands, key=pad)


def quant_axes(path: str, v: Any, config: QuantConfig) -> int | tuple[int, ...]:
  """The axes :func:`quantize` blocks ``v`` (a kernel or LoRA weight at ``path``) along."""
  if config.axis is not None:
    return config.axis
  lay = getattr(v, "layout", None) if getattr(type(v), "wraps_base", False) else None
  if lay is None:
    lay = first_match(path, config.layouts)
  w = base_of(v)
  if lay is not None and len(lay) == len(w.shape):
    ax = tuple(i for i, c in enumerate(lay) if c == "i")
  else:
    ax = _guess_axes(tuple(w.shape), config.block_size)
  return ax[0] if len(ax) == 1 else ax


def quantize(params: Any, config: QuantConfig = QuantConfig()) -> Any:
  """Quantizes the targeted kernels of a parameter tree (LoRA-adapted trees too: their ``w``).

  Embeddings, norms, biases and kernels smaller than ``config.min_size`` stay in
  float unless ``config.targets`` names them. Every pattern must match a path.
  Blocks run along each kernel's input axes (see ``QuantConfig.axis``); a kernel
  whose input axes a block does not divide is zero-padded, with a warning naming
  it when the padding adds more than ``config.max_padding`` of its values.

  >>> import jax, jax_lora as jl
  >>> q = jl.quantize({"attn": {"kernel": jax.numpy.ones((64, 4, 16))}})   # DenseGeneral (in, heads, head_dim)
  >>> q["attn"]["kernel"].axis, round(jl.quant.bits_report(q).bits_per_param, 3)
  (0, 4.188)
  """
  flat = {p: base_of(v) for p, v in leaves(params).items()}
  if config.targets is None:
    adapted = {p for p, v in leaves(params).items() if getattr(type(v), "wraps_base", False)}
    chosen = {p for p, v in flat.items() if not is_quantized(v) and _default_target(p, v, config.min_size, p in adapted)}
  else:
    chosen = set(match_paths(flat.keys(), config.targets, what="quantization target"))

  def q(x, path, axis):
    if is_quantized(x):
      raise ValueError(f"{path!r} is already quantized; quantize the float parameters once")
    try:
      out = quantize_array(x, config.scheme, config.block_size, double_quant=config.double_quant,
                           dq_block_size=config.dq_block_size, axis=axis, compute_dtype=config.compute_dtype)
    except ValueError as e:
      raise ValueError(f"{path!r}: {e}") from None
    waste = out.padded / out.quantized_len - 1
    if waste > config.max_padding:
      warnings.warn(f"jax_lora.quantize: {path!r} {tuple(x.shape)} blocked along axes {out.axes} "
                    f"({out.quantized_len} values) is padded by {waste:.0%} to blocks of {config.block_size}; "
                    "give its layout (QuantConfig(layouts=...)), a block_size dividing its input axes, "
                    "or exclude it from targets", stacklevel=3)
    return out

  def f(path, v):
    if path not in chosen:
      return v
    return with_base(v, q(base_of(v), path, quant_axes(path, v, config)))

  return map_leaves(f, params)


def dequantize(tree: Any, dtype=None) -> Any:
  """Replaces every quantized array (also inside LoraWeights) by its float array."""

  def f(path, v):
    w = base_of(v)
    return with_base(v, w.dequantize(dtype)) if is_quantized(w) else v

  return map_leaves(f, tree)


# ------------------------------------------------------------------------------ bit accounting


@dataclasses.dataclass(frozen=True)
class BitsReport:
  """Stored bits, measured from the arrays (``size · itemsize · 8`` of every stored field)."""

  quantized_params: int  # original elements of the quantized weights
  quantized_bits: int  # bits actually stored for them (codes, absmax or its double-quant parts, padding)
  float_params: int  # elements of the leaves left in float
  float_bits: int  # their stored bits
  per_leaf: dict[str, float]  # path -> bits per parameter of each quantized leaf

  @property
  def bits_per_param(self) -> float:
    """Stored bits per original parameter of the quantized weights."""
    return self.quantized_bits / max(self.quantized_params, 1)

  @property
  def total_bits_per_param(self) -> float:
    """Stored bits per parameter over the whole tree."""
    return (self.quantized_bits + self.float_bits) / max(self.quantized_params + self.float_params, 1)


def _array_bits(x) -> int:
  if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
    x = jax.random.key_data(x)
  return int(np.prod(np.shape(x))) * np.dtype(x.dtype).itemsize * 8


def _is_array(x) -> bool:
  return hasattr(x, "shape") and hasattr(x, "dtype") and not is_quantized(x)


def stored_bits(q: QuantizedArray) -> int:
  """Bits stored by one quantized array (all its data fields)."""
  return sum(_array_bits(x) for x in jax.tree.leaves(q))


def bits_report(tree: Any) -> BitsReport:
  """Measures stored bits per parameter for a tree holding quantized arrays (LoRA a/b excluded).

  Works on Linen dicts, NNX ``State``s and Equinox modules: array leaves count
  (PRNG keys by their key data); other leaves (functions, ints, None) are skipped.
  """
  qp = qb = fp = fb = 0
  per = {}
  for path, v in leaves(tree).items():
    v = base_of(v)
    if v is None or not (is_quantized(v) or _is_array(v)):
      continue
    if is_quantized(v):
      bits = stored_bits(v)
      qp, qb = qp + v.size, qb + bits
      per[path] = bits / v.size
    else:
      fp, fb = fp + int(np.prod(np.shape(v))), fb + _array_bits(v)
  return BitsReport(qp, qb, fp, fb, per)
