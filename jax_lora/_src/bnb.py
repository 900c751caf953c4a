"""bitsandbytes' NF4 safetensors layout, read and written without torch.

A 4-bit weight ``X.weight`` of PyTorch shape ``(out, in)`` is stored as
``X.weight`` (packed uint8, ``(out·in/2, 1)``), ``X.weight.absmax``,
``X.weight.quant_map`` (the 16 NF4 values), and with double quantization
``X.weight.nested_absmax`` and ``X.weight.nested_quant_map``, plus
``X.weight.quant_state.bitsandbytes__nf4`` (JSON bytes: blocksize, shape,
dtype, nested_blocksize, nested_offset). Our 2-D :class:`QuantizedArray` keeps
the Flax kernel ``(in, out)`` with blocks along ``in``: its stored layout is
already ``(out, in)`` row-major, so conversion is a reshape, byte for byte.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np

from jax_lora._src.quant import NF4_CODE, QuantizedArray, dynamic_map, quantize_array

__all__ = ["to_bnb", "from_bnb", "quantize_state_dict", "read_nf4_tensors"]

_QS = "quant_state.bitsandbytes__nf4"


def _dtype_name(dtype) -> str:
  return {"float32": "float32", "bfloat16": "bfloat16", "float16": "float16"}[np.dtype(dtype).name]


def to_bnb(q: QuantizedArray, key: str = "weight") -> dict[str, np.ndarray]:
  """bitsandbytes tensors for one 2-D NF4 kernel (Flax ``(in, out)``), keys prefixed by ``key``.

  Raises:
    ValueError: for non-NF4, non-2-D, padded layouts or blocks not along the input axis.
  """
  if q.scheme != "nf4" or q.ndim != 2 or q.axis != 0:
    raise ValueError(f"{key}: bitsandbytes stores 2-D NF4 kernels quantized along the input axis; got {q!r}")
  if q.padded != q.shape[0]:
    raise ValueError(f"{key}: input dim {q.shape[0]} is padded to {q.padded} (block {q.block_size}); "
                     "bitsandbytes' layout needs a block size dividing it")
  out_, in_ = q.shape[1], q.shape[0]
  t = {key: np.array(q.codes).reshape(-1, 1), f"{key}.quant_map": NF4_CODE.copy()}
  meta = {"quant_type": "nf4", "blocksize": q.block_size, "dtype": _dtype_name(q.dtype), "shape": [out_, in_]}
  if q.double_quant:
    t[f"{key}.absmax"] = np.array(q.absmax_codes).reshape(-1)
    t[f"{key}.nested_absmax"] = np.array(q.nested_absmax, np.float32)
    t[f"{key}.nested_quant_map"] = dynamic_map().copy()
    meta.update(nested_blocksize=q.dq_block_size, nested_dtype="float32", nested_offset=float(np.asarray(q.offset)))
  else:
    t[f"{key}.absmax"] = np.array(q.absmax, np.float32).reshape(-1)
  t[f"{key}.{_QS}"] = np.frombuffer(json.dumps(meta).encode(), np.uint8).copy()
  return t


def from_bnb(tensors: dict[str, Any], key: str = "weight") -> QuantizedArray:
  """Our NF4 kernel (Flax ``(in, out)``) from bitsandbytes tensors under ``key``.

  Raises:
    ValueError: if a key is missing, the type is not NF4, the code books differ
      from ours, or the input dim is not a multiple of the block size.
  """
  import jax.numpy as jnp

  need = [key, f"{key}.absmax", f"{key}.{_QS}"]
  missing = [k for k in need if k not in tensors]
  if missing:
    raise ValueError(f"bitsandbytes NF4 weight {key!r} lacks {missing}; is it a 4-bit nf4 checkpoint?")
  meta = json.loads(bytes(np.asarray(tensors[f"{key}.{_QS}"], np.uint8)).decode())
  if meta.get("quant_type") != "nf4":
    raise ValueError(f"{key}: quant_type {meta.get('quant_type')!r} is not supported; only nf4")
  if f"{key}.quant_map" in tensors and not np.array_equal(np.asarray(tensors[f"{key}.quant_map"], np.float32), NF4_CODE):
    raise ValueError(f"{key}: quant_map is not the NF4 code book")
  out_, in_ = meta["shape"]
  block = int(meta["blocksize"])
  if in_ % block:
    raise ValueError(f"{key}: input dim {in_} is not a multiple of block {block}; blocks straddle rows, "
                     "which our layout cannot hold (dequantize with bitsandbytes and re-quantize)")
  nblk = in_ // block
  codes = jnp.asarray(np.asarray(tensors[key], np.uint8).reshape(out_, in_ // 2))
  common = dict(scheme="nf4", block_size=block, shape=(in_, out_), dtype=np.dtype(jnp.dtype(meta["dtype"])), axis=0)
  if f"{key}.nested_absmax" in tensors:
    nq = tensors.get(f"{key}.nested_quant_map")
    if nq is not None and not np.array_equal(np.asarray(nq, np.float32), dynamic_map()):
      raise ValueError(f"{key}: nested_quant_map is not bitsandbytes' 8-bit dynamic map")
    return QuantizedArray(
        codes=codes, absmax_codes=jnp.asarray(np.asarray(tensors[f"{key}.absmax"], np.uint8).reshape(out_, nblk)),
        nested_absmax=jnp.asarray(np.asarray(tensors[f"{key}.nested_absmax"], np.float32)),
        offset=jnp.asarray(np.float32(meta["nested_offset"])), dq_block_size=int(meta["nested_blocksize"]), **common)
  return QuantizedArray(codes=codes, absmax=jnp.asarray(np.asarray(tensors[f"{key}.absmax"], np.float32)
                                                        .reshape(out_, nblk)), **common)


def read_nf4_tensors(tensors: dict[str, Any]) -> dict[str, QuantizedArray]:
  """``{weight key: QuantizedArray}`` for every bitsandbytes NF4 weight in a state dict."""
  suffix = "." + _QS
  return {k[:-len(suffix)]: from_bnb(tensors, k[:-len(suffix)]) for k in tensors if k.endswith(suffix)}


def quantize_state_dict(tensors: dict[str, Any], keys: list[str], blocksize: int = 64,
                        double_quant: bool = True) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
  """Quantizes PyTorch-layout ``(out, in)`` weights ``keys`` of a state dict to bitsandbytes NF4.

  Returns:
    ``(tensors, quantization_config)``: the new state dict (other tensors
    unchanged) and the ``quantization_config`` entry for ``config.json``.
  """
  out = dict(tensors)
  for k in keys:
    w = np.asarray(tensors[k])
    if w.ndim != 2:
      raise ValueError(f"{k}: only 2-D linear weights can be written as bitsandbytes NF4, got shape {w.shape}")
    q = quantize_array(w.T, "nf4", blocksize, double_quant=double_quant, axis=0)
    out.update(to_bnb(q, k))
  dtype = _dtype_name(np.asarray(tensors[keys[0]]).dtype) if keys else "float32"
  qconfig = {"quant_method": "bitsandbytes", "load_in_4bit": True, "load_in_8bit": False,
             "bnb_4bit_quant_type": "nf4", "bnb_4bit_use_double_quant": double_quant,
             "bnb_4bit_compute_dtype": dtype, "bnb_4bit_quant_storage": "uint8"}
  return out, qconfig
