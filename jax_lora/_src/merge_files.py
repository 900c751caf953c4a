"""Merge a PEFT LoRA folder into a Hugging Face model folder, on the safetensors alone.

No model is built: for every adapted module ``m`` the tensor ``m.weight`` gets
``W += s·B@A`` (torch Linear, (out, in)) or ``W += s·(B@A)ᵀ`` (GPT-2 Conv1D,
``fan_in_fan_out``), exactly as PEFT's ``merge_and_unload`` does in float32.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from typing import Any

import numpy as np

from jax_lora._src.files import atomic_folder, read_safetensors
from jax_lora._src.peft import adapter_modules, few, full_tensors, is_floating, read_peft, resolve_keys, token_rows

__all__ = ["merged_tensors", "merge_adapter_files", "copy_side_files", "save_tensors", "SIDE_FILES", "CONV1D_MODEL_TYPES"]

# model_types whose adapted linears are transformers Conv1D modules (weights stored (in, out)).
CONV1D_MODEL_TYPES = ("gpt2",)

# Files of a model folder that travel with the weights (config, tokenizer, generation settings).
SIDE_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
              "special_tokens_map.json", "vocab.json", "merges.txt", "tokenizer.model", "added_tokens.json",
              "chat_template.jinja", "chat_template.json", "vocab.txt", "spiece.model")


def merged_tensors(base: dict[str, Any], adapter_folder: str, fan_in_fan_out: bool | None = None,
                   model_type: str | None = None) -> dict[str, Any]:
  """Base tensors with the adapter folded in (float32 math, stored back in each weight's dtype).

  ``fan_in_fan_out`` (weights stored (in, out), GPT-2's Conv1D) defaults to the
  adapter config's value; PEFT forces it on for Conv1D bases, so pass True for them.
  Adapter names find base keys by :func:`jax_lora.peft.resolve_keys` (``model_type``
  lets it match the family's other spellings of a key). Whole tensors the adapter
  carries (trained biases, ``modules_to_save``) replace the base's.

  Raises:
    ValueError: adapter modules or tensors with no key in the base, shapes that do not
      fit, or a non-floating base weight.
  """
  adapter = read_peft(adapter_folder)
  mods = adapter_modules(adapter)
  full = full_tensors(adapter)
  if fan_in_fan_out is None:
    fan_in_fan_out = bool(adapter.config.get("fan_in_fan_out", False))
  found, missing = resolve_keys([m + ".weight" for m in mods] + list(full), base, model_type)
  if missing:
    raise ValueError(f"{adapter_folder}: adapter modules/tensors not in the base model: {few(missing)}; "
                     "wrong base model?")
  bad = []
  for mod, e in mods.items():
    k = found[mod + ".weight"]
    w = base[k]
    t = fan_in_fan_out or e["embedding"]  # stored (in, out): Conv1D, or an embedding (vocab, d)
    want = (e["A"].shape[1], e["B"].shape[0]) if t else (e["B"].shape[0], e["A"].shape[1])
    if w.ndim != 2 or tuple(w.shape) != want:
      bad.append(f"{k}: {tuple(w.shape)} but the adapter implies {want}")
    elif not is_floating(w):
      bad.append(f"{k}: dtype {w.dtype} is not floating (a damaged header?)")
  for key, v in full.items():
    k = found[key]
    if tuple(base[k].shape) != tuple(v.shape):
      bad.append(f"{key}: {tuple(v.shape)} but the base's {k} is {tuple(base[k].shape)}")
  if bad:
    raise ValueError(f"{adapter_folder}: adapter does not fit the base: {'; '.join(bad[:3])}")
  rows = token_rows(adapter)
  found_rows, missing = resolve_keys(list(rows), base, model_type)
  if missing:
    raise ValueError(f"{adapter_folder}: trainable tokens for {few(missing)}, not in the base model")
  out = dict(base)
  for key, (ids, r) in rows.items():
    k = found_rows[key]
    if base[k].ndim != 2 or base[k].shape[1] != r.shape[1] or ids.max(initial=0) >= base[k].shape[0]:
      raise ValueError(f"{adapter_folder}: trainable tokens {key!r} do not fit {k} {tuple(base[k].shape)}")
    table = np.array(base[k])
    table[ids] = r.astype(table.dtype)
    out[k] = table
  for key, v in full.items():
    k = found[key]
    out[k] = v.astype(base[k].dtype)
  for mod, e in mods.items():
    k = found[mod + ".weight"]
    s = e["alpha"] / (math.sqrt(e["rank"]) if e["rslora"] else e["rank"])
    delta = (e["B"].astype(np.float32) @ e["A"].astype(np.float32)) * np.float32(s)
    t = fan_in_fan_out or e["embedding"]
    if t:
      delta = delta.T
    w = out[k]
    merged = w.astype(np.float32) + delta
    if e["M"] is not None:  # DoRA: every output row (column with fan_in_fan_out) gets norm M
      ax = 0 if t else 1
      norm = np.sqrt(np.sum(np.square(merged), axis=ax, keepdims=True))
      merged = merged * (e["M"].astype(np.float32).reshape(norm.shape) / norm)
    out[k] = merged.astype(w.dtype)
  return out


def copy_side_files(src: str, dst: str, dtype: str | None = None) -> None:
  """Copies config/tokenizer files; with ``dtype``, config.json records it."""
  for name in SIDE_FILES:
    p = os.path.join(src, name)
    if os.path.isfile(p):
      shutil.copyfile(p, os.path.join(dst, name))
  cfg = os.path.join(dst, "config.json")
  if dtype is not None and os.path.exists(cfg):
    with open(cfg) as f:
      c = json.load(f)
    c["dtype"] = dtype
    c.pop("torch_dtype", None)
    with open(cfg, "w") as f:
      json.dump(c, f, indent=2)


def _cast(tensors: dict[str, Any], dtype: str | None) -> dict[str, Any]:
  if dtype is None:
    return tensors
  import ml_dtypes

  target = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16, "float16": np.float16}.get(dtype)
  if target is None:
    raise ValueError(f"dtype {dtype!r} is not supported; use float32, bfloat16 or float16")
  return {k: (v.astype(target) if np.issubdtype(v.dtype, np.floating) or v.dtype == ml_dtypes.bfloat16 else v)
          for k, v in tensors.items()}


def _known(model_type: str | None) -> str | None:
  """``model_type`` if our model families know its key spellings, else None (exact keys only)."""
  from jax_lora.models.hf import FAMILIES
  return model_type if model_type in FAMILIES else None


def save_tensors(path: str, tensors: dict[str, Any]) -> None:
  """Writes ``{key: numpy array}`` (bf16 allowed) as safetensors with metadata format=pt."""
  from safetensors.flax import save_file
  import jax.numpy as jnp

  save_file({k: jnp.asarray(v) for k, v in tensors.items()}, path, metadata={"format": "pt"})


def merge_adapter_files(base: str, adapter: str, out: str, dtype: str | None = None) -> None:
  """``jax-lora merge``: HF model folder + PEFT folder → merged HF model folder (atomic).

  Args:
    base: Hugging Face model folder (config.json + safetensors).
    adapter: PEFT LoRA folder.
    out: output folder (config, tokenizer files if present, model.safetensors).
    dtype: "float32" or "bfloat16" to cast floating tensors; None keeps each tensor's dtype.
  """
  if not os.path.isfile(os.path.join(base, "config.json")):
    raise ValueError(f"{base} has no config.json; pass a Hugging Face model folder as --base")
  with open(os.path.join(base, "config.json")) as f:
    model_type = json.load(f).get("model_type")
  tensors = read_safetensors(base)
  if _known(model_type):  # our families' weights are all floating: an integer one is a damaged header
    ints = [f"{k} ({v.dtype})" for k, v in tensors.items() if not is_floating(v)]
    if ints:
      raise ValueError(f"{base}: non-floating weights {few(ints)}; a {model_type} checkpoint holds floats "
                       "(a damaged safetensors header?)")
  if dtype == "float32":  # widen before merging so bf16 bases merge in float32
    tensors = _cast(tensors, dtype)
  # GPT-2's Conv1D stores (in, out): PEFT merges transposed there whatever the adapter config says
  conv1d = True if model_type in CONV1D_MODEL_TYPES else None
  tensors = _cast(merged_tensors(tensors, adapter, conv1d, model_type=_known(model_type)), dtype)
  with atomic_folder(out) as tmp:
    copy_side_files(base, tmp, dtype)
    save_tensors(os.path.join(tmp, "model.safetensors"), tensors)
