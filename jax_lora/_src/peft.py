"""PEFT LoRA adapter folders, both ways.

A PEFT folder holds ``adapter_config.json`` and ``adapter_model.safetensors``
with keys ``base_model.model.<module>.lora_A.weight`` (r, in) and
``...lora_B.weight`` (out, r). Our kernels are (in, out) (GPT-2's Conv1D is
stored (in, out) in torch too, hence PEFT's ``fan_in_fan_out``), so for every
2-D kernel ``a = lora_A.T`` and ``b = lora_B.T``.

Nothing is matched loosely: an adapter key whose module is not in the base, a
shape that does not fit, or a feature we do not implement is an error naming
the keys, never a silently zero adapter.
"""

from __future__ import annotations

import collections
import json
import os
import re
from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp
import numpy as np

from jax_lora._src.adapt import lora_weights
from jax_lora._src.lora import LoraWeight
from jax_lora._src.files import atomic_folder
from jax_lora._src.tree import leaves, map_leaves

__all__ = [
    "PeftAdapter",
    "read_peft",
    "load_peft",
    "save_peft",
    "pattern_value",
    "module_to_path",
    "path_to_module",
    "few",
    "adapter_modules",
]

PREFIX = "base_model.model."
_KEY = re.compile(r"base_model\.model\.(.+)\.lora_([AB])\.weight")


class PeftAdapter(collections.namedtuple("PeftAdapter", "config tensors")):
  """A PEFT folder in memory: ``config`` (the JSON dict) and ``tensors`` ``{key: np.ndarray}``."""


def pattern_value(patterns: Mapping[str, Any], module: str, default: Any) -> Any:
  """PEFT's ``rank_pattern``/``alpha_pattern`` lookup: the first key ``k`` with
  ``re.match(rf"(.*\\.)?({k})$", module)`` gives the value, else ``default``."""
  for k, v in patterns.items():
    if re.match(rf"(.*\.)?({k})$", module):
      return v
  return default


def module_to_path(module: str, model_type: str) -> str:
  """PEFT module name (``model.layers.0.self_attn.q_proj``) → our kernel path."""
  from jax_lora.models.hf import hf_key_to_path
  return hf_key_to_path(module + ".weight", model_type)


def path_to_module(path: str, model_type: str) -> str:
  """Our kernel path (``model/layers_0/self_attn/q_proj/kernel``) → PEFT module name."""
  from jax_lora.models.hf import path_to_hf_key
  key = path_to_hf_key(path, model_type)
  return key[: -len(".weight")] if key.endswith(".weight") else key


def few(items, n: int = 3) -> str:
  items = sorted(items)
  more = f" (+{len(items) - n} more)" if len(items) > n else ""
  return ", ".join(repr(i) for i in items[:n]) + more


def read_peft(folder: str) -> PeftAdapter:
  """Reads and validates a PEFT LoRA folder (config + safetensors), without a base model.

  Raises:
    ValueError: missing files, a non-LoRA adapter, or features we do not
      implement (DoRA, modules_to_save weights, LoRA biases, embedding LoRA,
      trained base biases, target_parameters); the message names them.
  """
  from safetensors.numpy import load_file

  cfg_path = os.path.join(folder, "adapter_config.json")
  st_path = os.path.join(folder, "adapter_model.safetensors")
  if not os.path.exists(cfg_path):
    raise ValueError(f"{folder} has no adapter_config.json; pass a PEFT adapter folder")
  if not os.path.exists(st_path):
    extra = " (adapter_model.bin pickles are not read: re-save with safe_serialization=True)" if os.path.exists(
        os.path.join(folder, "adapter_model.bin")) else ""
    raise ValueError(f"{folder} has no adapter_model.safetensors{extra}")
  with open(cfg_path) as f:
    config = json.load(f)
  if config.get("peft_type", "LORA") != "LORA":
    raise ValueError(f"{folder}: peft_type {config.get('peft_type')!r} is not supported; only LORA adapters are")
  unsupported = []
  if config.get("use_dora"):
    unsupported.append("use_dora=true (DoRA)")
  if config.get("lora_bias"):
    unsupported.append("lora_bias=true")
  if config.get("target_parameters"):
    unsupported.append("target_parameters")
  if config.get("layer_replication"):
    unsupported.append("layer_replication")
  if config.get("trainable_token_indices"):
    unsupported.append("trainable_token_indices")
  try:
    tensors = load_file(st_path)
  except Exception as e:  # noqa: BLE001 - safetensors raises various types
    raise ValueError(f"{st_path} is not a readable safetensors file ({e})") from None
  other = [k for k in tensors if not _KEY.fullmatch(k)]
  if any("lora_magnitude_vector" in k for k in other):
    unsupported.append("DoRA magnitude vectors")
  if any("lora_embedding_" in k for k in other):
    unsupported.append("LoRA on embeddings (lora_embedding_A/B)")
  if any(".lora_B.bias" in k or ".lora_A.bias" in k for k in other):
    unsupported.append("LoRA biases")
  rest = [k for k in other if not re.search(r"lora_magnitude_vector|lora_embedding_|\.lora_[AB]\.bias", k)]
  if rest and config.get("modules_to_save"):
    unsupported.append(f"modules_to_save weights ({few(rest)})")
  elif rest and config.get("bias", "none") != "none":
    unsupported.append(f"trained biases bias={config.get('bias')!r} ({few(rest)})")
  elif rest:
    raise ValueError(f"{st_path}: keys that are not 'base_model.model.<module>.lora_A|B.weight': {few(rest)}")
  if unsupported:
    raise ValueError(f"{folder}: unsupported PEFT features: {'; '.join(unsupported)}; only plain LoRA "
                     "(lora_A/lora_B weights) can be loaded")
  mods_a = {m.group(1) for k in tensors if (m := _KEY.fullmatch(k)) and m.group(2) == "A"}
  mods_b = {m.group(1) for k in tensors if (m := _KEY.fullmatch(k)) and m.group(2) == "B"}
  if mods_a != mods_b:
    raise ValueError(f"{st_path}: lora_A and lora_B do not pair up for modules {few(mods_a ^ mods_b)}")
  return PeftAdapter(config=config, tensors=tensors)


def adapter_modules(adapter: PeftAdapter) -> dict[str, dict[str, Any]]:
  """``{module: {"A": (r, in), "B": (out, r), "rank", "alpha", "rslora"}}`` in PEFT's layout.

  Raises:
    ValueError: if a factor's rank disagrees with ``r``/``rank_pattern``.
  """
  cfg = adapter.config
  r0, alpha0 = int(cfg.get("r", 8)), float(cfg.get("lora_alpha", 8))
  rp, ap = cfg.get("rank_pattern") or {}, cfg.get("alpha_pattern") or {}
  out = {}
  for key in sorted(adapter.tensors):
    m = _KEY.fullmatch(key)
    if m is None or m.group(2) != "A":
      continue
    mod = m.group(1)
    a = adapter.tensors[key]
    b = adapter.tensors[f"{PREFIX}{mod}.lora_B.weight"]
    r = int(pattern_value(rp, mod, r0))
    if a.ndim != 2 or b.ndim != 2 or a.shape[0] != r or b.shape[1] != r:
      raise ValueError(f"adapter {mod!r}: lora_A {a.shape} / lora_B {b.shape} do not have rank {r} from "
                       "r/rank_pattern; the adapter_config.json does not describe these weights")
    out[mod] = dict(A=a, B=b, rank=r, alpha=float(pattern_value(ap, mod, alpha0)),
                    rslora=bool(cfg.get("use_rslora", False)))
  return out


def load_peft(folder: str, params: Any, model_type: str = "llama", dtype=jnp.float32) -> Any:
  """Puts a PEFT adapter onto our params: each adapted kernel becomes a :class:`LoraWeight`.

  Args:
    folder: PEFT adapter folder.
    params: our parameter tree (``variables["params"]``), plain kernels; with scanned
      layers (``scan_layers=True``) every layer must carry the adapter with one rank/alpha.
    model_type: the base's Hugging Face ``model_type`` (key mapping).
    dtype: dtype of the loaded A and B.

  Returns:
    The adapted tree (same structure, adapted kernels replaced).

  Raises:
    ValueError: adapter modules missing from the base, shape mismatches,
      unsupported features; the message names the keys.
  """
  adapter = read_peft(folder)
  mods = adapter_modules(adapter)
  flat = leaves(params)
  dropout = float(adapter.config.get("lora_dropout", 0.0) or 0.0)
  paths, stacked, missing = {}, collections.defaultdict(dict), []
  for mod in mods:
    try:
      p = module_to_path(mod, model_type)
    except ValueError:
      p = None
    scanned = re.sub(r"/layers_(\d+)/", "/layers/", p, count=1) if p else None
    if p is not None and p in flat:
      paths[p] = mod
    elif scanned is not None and scanned != p and scanned in flat:
      stacked[scanned][int(re.search(r"/layers_(\d+)/", p).group(1))] = mod
    else:
      missing.append(mod)
  if missing:
    raise ValueError(f"{folder}: adapter modules not in the base model: {few(missing)}; "
                     f"wrong base model or model_type {model_type!r}?")
  bad = []
  for p, mod in paths.items():
    w, e = flat[p], mods[mod]
    if isinstance(w, LoraWeight):
      raise ValueError(f"{p!r} already has a LoRA adapter; load adapters onto the base params")
    if len(w.shape) != 2 or tuple(w.shape) != (e["A"].shape[1], e["B"].shape[0]):
      bad.append(f"{mod}: base kernel {tuple(w.shape)} vs lora_A {e['A'].shape}, lora_B {e['B'].shape}")
  new = {}
  for p, per_layer in stacked.items():
    w = flat[p]
    n = w.shape[0]
    es = [mods[per_layer[i]] for i in sorted(per_layer)]
    if sorted(per_layer) != list(range(n)) or len({(e["rank"], e["alpha"]) for e in es}) != 1:
      raise ValueError(f"{folder}: the base has scanned layers at {p!r}, so every one of its {n} layers needs the "
                       "adapter with one rank/alpha; load the base with scan_layers=False instead")
    if len(w.shape) != 3 or any(tuple(w.shape[1:]) != (e["A"].shape[1], e["B"].shape[0]) for e in es):
      bad.append(f"{p}: base kernel {tuple(w.shape)} vs lora_A {es[0]['A'].shape}, lora_B {es[0]['B'].shape}")
      continue
    a = np.stack([e["A"].T for e in es])
    b = np.stack([e["B"].T for e in es])
    new[p] = (a, b, es[0], "bio")
  if bad:
    raise ValueError(f"{folder}: adapter shapes do not fit the base: {'; '.join(bad[:3])}")
  for p, mod in paths.items():
    e = mods[mod]
    new[p] = (e["A"].T, e["B"].T, e, "io")

  def f(path, w):
    if path not in new:
      return w
    a, b, e, lay = new[path]
    return LoraWeight(w=w, a=jnp.asarray(a, dtype), b=jnp.asarray(b, dtype), alpha=e["alpha"], rank=e["rank"],
                      layout=lay, path=path, rslora=e["rslora"], dropout=dropout)

  return map_leaves(f, params)


def _unstacked(lws: dict[str, LoraWeight]) -> dict[str, tuple[np.ndarray, np.ndarray, LoraWeight]]:
  """``{path: (a (in, r), b (r, out), lw)}`` with scan-stacked ('bio') layers split per layer."""
  out = {}
  for p, lw in lws.items():
    a, b = np.asarray(lw.a, np.float32), np.asarray(lw.b, np.float32)
    if lw.layout == "io":
      out[p] = (a, b, lw)
    elif lw.layout == "bio" and "/layers/" in p:
      for i in range(a.shape[0]):
        out[p.replace("/layers/", f"/layers_{i}/", 1)] = (a[i], b[i], lw)
    else:
      raise ValueError(f"cannot export {p!r} with layout {lw.layout!r} to PEFT; only 2-D (in, out) kernels "
                       "(or scan-stacked 'bio' layers) map to torch Linear/Conv1D")
  return out


def _target_modules(adapted_mods: set[str], all_mods: set[str]) -> list[str]:
  """Shortest PEFT ``target_modules`` that select exactly ``adapted_mods`` among ``all_mods``."""
  suffixes = sorted({m.rsplit(".", 1)[-1] for m in adapted_mods})

  def hits(s):
    return {m for m in all_mods if m == s or m.endswith("." + s)}

  if set().union(*(hits(s) for s in suffixes)) == adapted_mods:
    return suffixes
  return sorted(adapted_mods)


def save_peft(folder: str, adapted: Any, model_type: str = "llama", base_model_name_or_path: str | None = None) -> None:
  """Writes our adapters as a PEFT folder that ``PeftModel.from_pretrained`` loads.

  ``r``/``lora_alpha`` are the most common rank/alpha; the others go to
  ``rank_pattern``/``alpha_pattern`` under full module names. Written
  atomically (temporary folder, then rename).

  Args:
    folder: output folder (replaced if it exists).
    adapted: a tree with :class:`LoraWeight` leaves (from ``init_lora``/``load_peft``).
    model_type: the base's Hugging Face ``model_type`` (key mapping).
    base_model_name_or_path: recorded in the config (PEFT loads the base separately).
  """
  from safetensors.numpy import save_file

  lws = lora_weights(adapted)
  if not lws:
    raise ValueError("save_peft: the tree has no LoRA weights; pass the output of init_lora/load_peft")
  flat = _unstacked(lws)
  rs = {lw.rslora for lw in lws.values()}
  if len(rs) > 1:
    raise ValueError("save_peft: adapters mix rsLoRA and plain scaling; PEFT has one use_rslora per adapter")
  entries = {path_to_module(p, model_type): v for p, v in flat.items()}
  r0 = collections.Counter(v[2].rank for v in entries.values()).most_common(1)[0][0]
  a0 = collections.Counter(v[2].alpha for v in entries.values()).most_common(1)[0][0]
  rank_pattern = {m: v[2].rank for m, v in sorted(entries.items()) if v[2].rank != r0}
  alpha_pattern = {m: v[2].alpha for m, v in sorted(entries.items()) if v[2].alpha != a0}
  kernels = {p for p in leaves(adapted) if p.endswith("/kernel")}
  all_mods = {path_to_module(p, model_type) for p in _unstacked_paths(kernels, adapted)}
  dropouts = {v[2].dropout for v in entries.values()}
  config = {
      "peft_type": "LORA",
      "task_type": "SEQ_2_SEQ_LM" if model_type == "t5" else "CAUSAL_LM",
      "base_model_name_or_path": base_model_name_or_path,
      "r": int(r0),
      "lora_alpha": float(a0),
      "lora_dropout": float(max(dropouts)),
      "target_modules": _target_modules(set(entries), all_mods),
      "rank_pattern": rank_pattern,
      "alpha_pattern": alpha_pattern,
      "use_rslora": rs.pop(),
      "fan_in_fan_out": model_type == "gpt2",
      "bias": "none",
      "use_dora": False,
      "modules_to_save": None,
      "init_lora_weights": True,
      "inference_mode": True,
  }
  tensors = {}
  for m, (a, b, _) in entries.items():
    tensors[f"{PREFIX}{m}.lora_A.weight"] = np.ascontiguousarray(a.T)
    tensors[f"{PREFIX}{m}.lora_B.weight"] = np.ascontiguousarray(b.T)
  with atomic_folder(folder) as tmp:
    with open(os.path.join(tmp, "adapter_config.json"), "w") as f:
      json.dump(config, f, indent=2)
    save_file(tensors, os.path.join(tmp, "adapter_model.safetensors"), metadata={"format": "pt"})


def _unstacked_paths(paths: set[str], tree) -> set[str]:
  flat = leaves(tree)
  out = set()
  for p in paths:
    if "/layers/" in p:
      n = flat[p].shape[0]
      out |= {p.replace("/layers/", f"/layers_{i}/", 1) for i in range(n)}
    else:
      out.add(p)
  return out
