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
from collections.abc import Mapping, Sequence
from typing import Any

import jax.numpy as jnp
import numpy as np

from jax_lora._src.adapt import lora_weights, token_ids, trainable_paths
from jax_lora._src.lora import LoraWeight
from jax_lora._src.files import atomic_folder
from jax_lora._src.tree import is_quantized, leaves, map_leaves, materialize

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
    "check_config",
    "full_tensors",
    "resolve_keys",
    "split_key",
    "token_rows",
    "in_modules_to_save",
    "is_floating",
    "KNOWN_CONFIG_FIELDS",
]

PREFIX = "base_model.model."
_KEY = re.compile(r"base_model\.model\.(.+)\.lora_(?:embedding_)?([AB])(\.weight)?")


def _lora_key(key: str):
  """The match of a LoRA factor key: ``<module>.lora_A|B.weight`` (linear) or
  ``<module>.lora_embedding_A|B`` (embedding), else None."""
  m = _KEY.fullmatch(key)
  if m is None or (m.group(3) is None) != (".lora_embedding_" in key):
    return None
  return m
_MAG = ".lora_magnitude_vector"
_TOK = ".token_adapter.trainable_tokens_delta"
_FULL = re.compile(r"base_model\.model\.(.+?)(\.base_layer)?\.(weight|bias)")


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


# Every adapter_config.json field PEFT 0.21 writes, and what reading it means here. An adapter
# is loaded only if each field is honoured or holds the value that means plain LoRA; any other
# value or an unknown field (a typo, a newer PEFT feature) is refused naming it.
_HONOURED = ("r", "lora_alpha", "rank_pattern", "alpha_pattern", "use_rslora", "fan_in_fan_out", "bias",
             "modules_to_save", "lora_dropout", "ensure_weight_tying", "use_dora", "trainable_token_indices")
# Descriptions of how the adapter was made or where it came from; the tensors decide what loads.
_INFORMATIONAL = ("peft_type", "task_type", "auto_mapping", "peft_version", "base_model_name_or_path", "revision",
                  "inference_mode", "target_modules", "exclude_modules", "layers_to_transform", "layers_pattern",
                  "megatron_core", "runtime_config", "qalora_group_size", "eva_config", "loftq_config")
# Initializations that only choose the starting A/B: the trained A/B in the file are the adapter.
# pissa/olora/corda/loftq/lora_ga/mica also rewrite the base weights, which the file does not hold.
_PLAIN_INITS = (True, False, "gaussian", "eva", "orthogonal")
_PLAIN_VALUES = {  # field: values that mean plain LoRA (anything else is a feature we do not implement)
"lora_bias": (False, None), "use_qalora": (False, None),
    "target_parameters": (None, []), "layer_replication": (None, []),
    "alora_invocation_tokens": (None, []), "megatron_config": (None,), "corda_config": (None,),
    "lora_ga_config": (None,), "velora_config": (None,), "monteclora_config": (None,), "use_bdlora": (None, False),
    "arrow_config": (None,), "kasa_config": (None,),
}
_FEATURE = {"alora_invocation_tokens": "aLoRA (activated LoRA)", "layer_replication": "layer replication", "target_parameters": "LoRA on nn.Parameter",
            "lora_bias": "LoRA bias", "use_qalora": "QALoRA", "arrow_config": "Arrow routing", "kasa_config": "KaSA",
            "monteclora_config": "MonteCLoRA", "velora_config": "VeLoRA", "use_bdlora": "BD-LoRA",
            "megatron_config": "Megatron layers", "corda_config": "CorDA", "lora_ga_config": "LoRA-GA"}
KNOWN_CONFIG_FIELDS = frozenset(_HONOURED + _INFORMATIONAL + tuple(_PLAIN_VALUES) + ("init_lora_weights",))
_BIAS = ("none", "all", "lora_only")


def check_config(config: Mapping[str, Any], where: str = "adapter_config.json") -> None:
  """Refuses an ``adapter_config.json`` unless every field is one we honour or a plain-LoRA value.

  Raises:
    ValueError: one line naming the first unknown field (with the nearest known name) or the
      first feature we do not implement.
  """
  import difflib

  for k in config:
    if k not in KNOWN_CONFIG_FIELDS:
      near = difflib.get_close_matches(k, KNOWN_CONFIG_FIELDS, n=1)
      hint = f" (did you mean {near[0]!r}?)" if near else ""
      raise ValueError(f"{where}: unknown field {k!r}{hint}; not loading an adapter we cannot fully read")
  if config.get("peft_type", "LORA") != "LORA":
    raise ValueError(f"{where}: peft_type {config.get('peft_type')!r} is not supported; only LORA adapters are")
  for k, ok in _PLAIN_VALUES.items():
    if k in config and config[k] not in ok:
      raise ValueError(f"{where}: {k}={config[k]!r} ({_FEATURE[k]}) is a PEFT feature jax-lora does not implement; "
                       "only plain LoRA adapters load")
  init = config.get("init_lora_weights", True)
  if not any(init is v or (isinstance(v, str) and init == v) for v in _PLAIN_INITS):
    raise ValueError(f"{where}: init_lora_weights={init!r} means the base weights were rewritten too, which the "
                     "folder does not hold; save it converted to plain LoRA with PEFT's save_pretrained("
                     "..., path_initial_model_for_weight_conversion=...)")
  if config.get("bias", "none") not in _BIAS:
    raise ValueError(f"{where}: bias={config.get('bias')!r}; PEFT's values are {', '.join(_BIAS)}")
  for k in ("r", "lora_alpha"):
    v = config.get(k, 8)
    if isinstance(v, bool) or not isinstance(v, (int, float)) or v <= 0 or (k == "r" and v != int(v)):
      raise ValueError(f"{where}: {k}={v!r}; want a positive {'integer' if k == 'r' else 'number'}")
  for k in ("rank_pattern", "alpha_pattern"):
    if not isinstance(config.get(k) or {}, dict):
      raise ValueError(f"{where}: {k} must be a mapping of module patterns to values, got {config.get(k)!r}")
  tti = config.get("trainable_token_indices") or []
  ok_list = lambda v: isinstance(v, list) and all(isinstance(i, int) and not isinstance(i, bool) for i in v)  # noqa: E731
  if not (ok_list(tti) or (isinstance(tti, dict) and all(isinstance(k, str) and ok_list(v) for k, v in tti.items()))):
    raise ValueError(f"{where}: trainable_token_indices must be a list of token ids or a mapping of module names "
                     f"to lists, got {tti!r}")
  mts = config.get("modules_to_save") or []
  if not isinstance(mts, list) or not all(isinstance(m, str) for m in mts):
    raise ValueError(f"{where}: modules_to_save must be a list of module names, got {mts!r}")


def split_key(key: str) -> tuple[str, str, bool] | None:
  """``base_model.model.<module>[.base_layer].<weight|bias>`` → ``(module, param, via_base_layer)``."""
  m = _FULL.fullmatch(key)
  return None if m is None else (m.group(1), m.group(3), m.group(2) is not None)


def in_modules_to_save(module: str, names) -> bool:
  """PEFT's ``modules_to_save`` rule: a module whose dotted name *ends with* one of
  ``names`` (plain string suffix: ``"norm"`` also selects ``input_layernorm``)."""
  return any(module.endswith(n) for n in names)


def read_peft(folder: str) -> PeftAdapter:
  """Reads and validates a PEFT LoRA folder (config + safetensors), without a base model.

  Besides ``lora_A``/``lora_B`` the folder may hold whole tensors that replace the
  base's: trained biases (``bias="all"``/``"lora_only"``), ``modules_to_save``
  copies, and the ``base_layer.weight`` copy PEFT saves for a LoRA'd ``lm_head``.

  Raises:
    ValueError: missing files, a config field we do not understand or a feature we
      do not implement (DoRA, LoRA on embeddings, trainable tokens, pissa/olora
      bases, aLoRA, …), integer tensors, or tensors the config does not explain;
      the message names them.
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
  try:
    with open(cfg_path) as f:
      config = json.load(f)
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise ValueError(f"{cfg_path} is not valid JSON ({e})") from None
  if not isinstance(config, dict):
    raise ValueError(f"{cfg_path} must hold a JSON object")
  check_config(config, cfg_path)
  try:
    tensors = load_file(st_path)
  except Exception as e:  # noqa: BLE001 - safetensors raises various types
    raise ValueError(f"{st_path} is not a readable safetensors file ({e})") from None
  ints = [f"{k} ({v.dtype})" for k, v in tensors.items() if not is_floating(v)]
  if ints:
    raise ValueError(f"{st_path}: non-floating tensors {few(ints)}; adapter weights are float (a damaged header?)")
  unsupported = []
  lora_mods = {m.group(1) for k in tensors if (m := _lora_key(k))}
  mags = {k[len(PREFIX):-len(_MAG)] for k in tensors if k.startswith(PREFIX) and k.endswith(_MAG)}
  if mags and not config.get("use_dora"):
    raise ValueError(f"{st_path}: DoRA magnitude vectors but use_dora is not true in adapter_config.json")
  if config.get("use_dora") and mags != lora_mods:
    raise ValueError(f"{st_path}: use_dora needs a lora_magnitude_vector for every adapted module; "
                     f"missing or extra: {few(mags ^ lora_mods)}")
  other = [k for k in tensors if not _lora_key(k) and not k.endswith(_MAG)]
  if any(k.endswith(_TOK) for k in other) and not config.get("trainable_token_indices"):
    raise ValueError(f"{st_path}: trainable token rows but no trainable_token_indices in adapter_config.json")
  other = [k for k in other if not k.endswith(_TOK)]
  if any(".lora_B.bias" in k or ".lora_A.bias" in k for k in other):
    unsupported.append("LoRA biases")
  if unsupported:
    raise ValueError(f"{folder}: unsupported PEFT features: {'; '.join(unsupported)}; only plain LoRA "
                     "(+ trained biases, modules_to_save) can be loaded")
  bias, saved = config.get("bias", "none"), config.get("modules_to_save") or []
  unexplained = []
  for k in other:
    parts = split_key(k)
    if parts is None:
      unexplained.append(k)
      continue
    mod, param, via_base = parts
    explained = (in_modules_to_save(mod, saved)
                 or (param == "bias" and (bias == "all" or (bias == "lora_only" and mod in lora_mods)))
                 or (via_base and param == "weight" and mod in lora_mods))
    if not explained:
      unexplained.append(k)
  if unexplained:
    raise ValueError(f"{st_path}: tensors the adapter_config.json does not explain: {few(unexplained)} (bias="
                     f"{bias!r}, modules_to_save={saved!r}); keys must be 'base_model.model.<module>.lora_A|B.weight'")
  mods_a = {m.group(1) for k in tensors if (m := _lora_key(k)) and m.group(2) == "A"}
  mods_b = {m.group(1) for k in tensors if (m := _lora_key(k)) and m.group(2) == "B"}
  if mods_a != mods_b:
    raise ValueError(f"{st_path}: lora_A and lora_B do not pair up for modules {few(mods_a ^ mods_b)}")
  return PeftAdapter(config=config, tensors=tensors)


def is_floating(v) -> bool:
  """Whether an array's dtype is floating (bfloat16 included)."""
  return np.issubdtype(v.dtype, np.floating) or v.dtype.name == "bfloat16"


def full_tensors(adapter: PeftAdapter) -> dict[str, np.ndarray]:
  """Whole tensors the adapter replaces in the base, by base key (``model.norm.weight``…)."""
  out = {}
  for k, v in adapter.tensors.items():
    parts = None if _lora_key(k) else split_key(k)
    if parts is not None:
      out[f"{parts[0]}.{parts[1]}"] = v
  return out


def token_rows(adapter: PeftAdapter) -> dict[str, tuple[np.ndarray, np.ndarray]]:
  """PEFT's trainable tokens: ``{embedding key: (token ids, their new rows)}``; the rows
  replace the table's (``index_copy``), they are not added.

  Raises:
    ValueError: rows whose count does not match ``trainable_token_indices``.
  """
  tti = adapter.config.get("trainable_token_indices") or []
  out = {}
  for k, rows in adapter.tensors.items():
    if not (k.startswith(PREFIX) and k.endswith(_TOK)):
      continue
    mod = k[len(PREFIX):-len(_TOK)]
    if isinstance(tti, dict):
      ids = [v for n, v in tti.items() if mod == n or mod.endswith("." + n)]
      ids = ids[0] if len(ids) == 1 else None
    else:
      ids = tti
    if ids is None or rows.ndim != 2 or rows.shape[0] != len(ids):
      raise ValueError(f"{k}: {rows.shape[0] if rows.ndim else 0} rows do not match trainable_token_indices {tti!r}")
    out[f"{mod}.weight"] = (np.asarray(ids, np.int64), rows)
  return out


def resolve_keys(names, base_keys, model_type: str | None) -> tuple[dict[str, str], list[str]]:
  """``({name: base_key}, missing)``: PEFT names (``<module>.weight``) to a base's keys.

  The one rule for ``load_peft``, ``eval`` and ``jax-lora merge``: a name matches the base
  key spelled the same, or, for model families we know, the key that maps to the same
  parameter (e.g. GPT-2's ``transformer.h.0…`` and a bare ``h.0…`` checkpoint). Nothing
  is matched by suffix alone.
  """
  keys = set(base_keys)
  canon = {}
  if model_type is not None:
    for k in keys:
      try:
        canon.setdefault(_canonical(k, model_type), k)
      except ValueError:
        pass
  found, missing = {}, []
  for n in names:
    if n in keys:
      found[n] = n
      continue
    try:
      c = _canonical(n, model_type) if model_type is not None else None
    except ValueError:
      c = None
    if c is not None and c in canon:
      found[n] = canon[c]
    else:
      missing.append(n)
  return found, missing


def _canonical(key: str, model_type: str) -> str:
  from jax_lora.models.hf import hf_key_to_path
  return hf_key_to_path(key, model_type)


def adapter_modules(adapter: PeftAdapter) -> dict[str, dict[str, Any]]:
  """``{module: {"A": (r, in), "B": (out, r), "rank", "alpha", "rslora", "M", "embedding"}}`` in PEFT's
  layout (``M``: DoRA's magnitude (out,), or None; ``embedding``: LoRA on an embedding table,
  ``lora_embedding_A`` (r, vocab) / ``lora_embedding_B`` (d, r)).

  Raises:
    ValueError: if a factor's rank disagrees with ``r``/``rank_pattern``.
  """
  cfg = adapter.config
  r0, alpha0 = int(cfg.get("r", 8)), float(cfg.get("lora_alpha", 8))
  rp, ap = cfg.get("rank_pattern") or {}, cfg.get("alpha_pattern") or {}
  out = {}
  for key in sorted(adapter.tensors):
    m = _lora_key(key)
    if m is None or m.group(2) != "A":
      continue
    mod = m.group(1)
    a = adapter.tensors[key]
    emb = m.group(3) is None
    b = adapter.tensors[f"{PREFIX}{mod}.lora_embedding_B" if emb else f"{PREFIX}{mod}.lora_B.weight"]
    r = int(pattern_value(rp, mod, r0))
    if a.ndim != 2 or b.ndim != 2 or a.shape[0] != r or b.shape[1] != r:
      raise ValueError(f"adapter {mod!r}: lora_A {a.shape} / lora_B {b.shape} do not have rank {r} from "
                       "r/rank_pattern; the adapter_config.json does not describe these weights")
    mag = adapter.tensors.get(f"{PREFIX}{mod}{_MAG}")
    if mag is not None and mag.shape != (b.shape[0],):
      raise ValueError(f"adapter {mod!r}: lora_magnitude_vector {mag.shape} does not fit lora_B {b.shape}")
    out[mod] = dict(A=a, B=b, rank=r, alpha=float(pattern_value(ap, mod, alpha0)),
                    rslora=bool(cfg.get("use_rslora", False)), M=mag, embedding=emb)
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
  params = _with_full_tensors(folder, params, full_tensors(adapter), model_type)
  params = _with_token_rows(folder, params, token_rows(adapter), model_type)
  flat = leaves(params)
  dropout = float(adapter.config.get("lora_dropout", 0.0) or 0.0)
  paths, stacked, missing = {}, collections.defaultdict(dict), []
  for mod in mods:
    where = _locate(mod + ".weight", flat, model_type)
    if where is None:
      missing.append(mod)
    elif where[1] is None:
      paths[where[0]] = mod
    else:
      stacked[where[0]][where[1]] = mod
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
    m = None if es[0]["M"] is None else np.stack([e["M"] for e in es])
    new[p] = (a, b, m, es[0], "bio")
  if bad:
    raise ValueError(f"{folder}: adapter shapes do not fit the base: {'; '.join(bad[:3])}")
  for p, mod in paths.items():
    e = mods[mod]
    new[p] = (e["A"].T, e["B"].T, e["M"], e, "io")

  def f(path, w):
    if path not in new:
      return w
    a, b, m, e, lay = new[path]
    return LoraWeight(w=w, a=jnp.asarray(a, dtype), b=jnp.asarray(b, dtype), alpha=e["alpha"], rank=e["rank"],
                      layout=lay, path=path, rslora=e["rslora"], dropout=dropout,
                      m=None if m is None else jnp.asarray(m, dtype))

  return map_leaves(f, params)


def _locate(hf_key: str, flat: Mapping[str, Any], model_type: str) -> tuple[str, int | None] | None:
  """Our path for a PEFT/HF key: ``(path, None)``, ``(stacked_path, layer)`` under scan, or None."""
  try:
    p = _canonical(hf_key, model_type)
  except ValueError:
    return None
  if p in flat:
    return p, None
  m = re.search(r"/layers_(\d+)/", p)
  if m is not None:
    scanned = p[:m.start()] + "/layers/" + p[m.end():]
    if scanned in flat:
      return scanned, int(m.group(1))
  return None


def _with_full_tensors(folder: str, params: Any, tensors: Mapping[str, np.ndarray], model_type: str) -> Any:
  """``params`` with the adapter's whole tensors (biases, modules_to_save) put in place."""
  if not tensors:
    return params
  flat = leaves(params)
  new, missing, bad = collections.defaultdict(dict), [], []
  for key, v in tensors.items():
    where = _locate(key, flat, model_type)
    if where is None:
      missing.append(key)
      continue
    p, layer = where
    w = flat[p]
    if isinstance(w, LoraWeight):
      raise ValueError(f"{p!r} already has a LoRA adapter; load adapters onto the base params")
    want = tuple(w.shape[1:] if layer is not None else w.shape)
    got = _to_ours(key, v, model_type)
    if got.shape != want:
      bad.append(f"{key}: {got.shape} vs the base's {want}")
    new[p][layer] = got
  if missing:
    raise ValueError(f"{folder}: adapter tensors with no place in the base model: {few(missing)} (a tied lm_head "
                     "has none: untie it or drop it from modules_to_save)")
  if bad:
    raise ValueError(f"{folder}: adapter tensors do not fit the base: {'; '.join(bad[:3])}")

  def f(path, w):
    if path not in new:
      return w
    per = new[path]
    if None in per:
      return jnp.asarray(per[None], w.dtype)
    for i, v in per.items():
      w = w.at[i].set(jnp.asarray(v, w.dtype))
    return w

  return map_leaves(f, params)


def _with_token_rows(folder: str, params: Any, rows: Mapping[str, tuple], model_type: str) -> Any:
  """``params`` with PEFT's trainable token rows written into their embedding tables."""
  if not rows:
    return params
  flat = leaves(params)
  new = {}
  for key, (ids, r) in rows.items():
    where = _locate(key, flat, model_type)
    if where is None or where[1] is not None or len(flat[where[0]].shape) != 2:
      raise ValueError(f"{folder}: trainable tokens for {key!r}, which is no embedding table of the base")
    w = flat[where[0]]
    if isinstance(w, LoraWeight) or is_quantized(w):
      raise ValueError(f"{folder}: trainable tokens on {where[0]!r} need a plain float table")
    if r.shape[1] != w.shape[1] or ids.max(initial=0) >= w.shape[0] or ids.min(initial=0) < 0:
      raise ValueError(f"{folder}: trainable tokens {key!r} ({r.shape}, ids up to {ids.max()}) do not fit the "
                       f"table {tuple(w.shape)}")
    new[where[0]] = (ids, r)
  return map_leaves(lambda p, w: w.at[new[p][0]].set(jnp.asarray(new[p][1], w.dtype)) if p in new else w, params)


def _to_ours(key: str, v: np.ndarray, model_type: str) -> np.ndarray:
  """A whole HF tensor in our layout (kernels transposed as the model family loads them)."""
  from jax_lora.models.hf import family
  return np.asarray(family(model_type).to_flax(key, v)[1])


def _unstacked(lws: dict[str, LoraWeight]) -> dict[str, tuple]:
  """``{path: (a (in, r), b (r, out), lw, magnitude or None)}`` with scan-stacked ('bio') layers split per layer."""
  out = {}
  for p, lw in lws.items():
    a, b = np.asarray(lw.a, np.float32), np.asarray(lw.b, np.float32)
    m = None if lw.m is None else np.asarray(lw.m, np.float32)
    if lw.layout == "io":
      out[p] = (a, b, lw, m)
    elif lw.layout == "bio" and "/layers/" in p:
      for i in range(a.shape[0]):
        out[p.replace("/layers/", f"/layers_{i}/", 1)] = (a[i], b[i], lw, None if m is None else m[i])
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


def save_peft(folder: str, adapted: Any, model_type: str = "llama", base_model_name_or_path: str | None = None, *,
              bias: str = "none", modules_to_save: Sequence[str] = (),
              trainable_token_indices: Mapping[str, Sequence[int]] | None = None) -> None:
  """Writes our adapters as a PEFT folder that ``PeftModel.from_pretrained`` loads.

  ``r``/``lora_alpha`` are the most common rank/alpha; the others go to
  ``rank_pattern``/``alpha_pattern`` under full module names. Written
  atomically (temporary folder, then rename).

  Args:
    folder: output folder (replaced if it exists).
    adapted: a tree with :class:`LoraWeight` leaves (from ``init_lora``/``load_peft``).
    model_type: the base's Hugging Face ``model_type`` (key mapping).
    base_model_name_or_path: recorded in the config (PEFT loads the base separately).
    bias: "all" / "lora_only" also writes those (trained) biases, as PEFT's ``bias``.
    modules_to_save: PEFT module names (``"lm_head"``, ``"embed_tokens"``) whose whole
      (trained) weights are written, as PEFT's ``modules_to_save``.
    trainable_token_indices: ``{module name: token ids}`` whose embedding rows are written
      (PEFT's trainable tokens: the rows replace the base's on load).
  """
  from safetensors.numpy import save_file

  lws = lora_weights(adapted)
  token_lws = {p: lw for p, lw in lws.items() if lw.freeze_a}  # trainable tokens (fixed one-hot A)
  lws = {p: lw for p, lw in lws.items() if not lw.freeze_a}
  if not lws:
    raise ValueError("save_peft: the tree has no LoRA weights; pass the output of init_lora/load_peft")
  token_rows_out = {}
  for p, lw in token_lws.items():
    mod = path_to_module(p, model_type)
    ids = token_ids(lw)
    rows = np.asarray(materialize(lw.w), np.float32)[ids] + np.float32(lw.scale) * np.asarray(lw.b, np.float32)
    token_rows_out[f"{PREFIX}{mod}{_TOK}"] = np.ascontiguousarray(rows)
    trainable_token_indices = {**(trainable_token_indices or {}), mod.rsplit(".", 1)[-1]: ids}
  flat = _unstacked(lws)
  rs = {lw.rslora for lw in lws.values()}
  if len(rs) > 1:
    raise ValueError("save_peft: adapters mix rsLoRA and plain scaling; PEFT has one use_rslora per adapter")
  doras = {lw.m is not None for lw in lws.values()}
  if len(doras) > 1:
    raise ValueError("save_peft: adapters mix DoRA and plain LoRA; PEFT has one use_dora per adapter")
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
      "bias": bias,
      "use_dora": doras.pop(),
      "modules_to_save": list(modules_to_save) or None,
      "trainable_token_indices": {k: [int(i) for i in v] for k, v in trainable_token_indices.items()}
                                 if trainable_token_indices else None,
      "init_lora_weights": True,
      "inference_mode": True,
  }
  tensors = {}
  for m, (a, b, lw, mag) in entries.items():
    emb = lw.path.endswith("/embedding")
    tensors[f"{PREFIX}{m}.lora_embedding_A" if emb else f"{PREFIX}{m}.lora_A.weight"] = np.ascontiguousarray(a.T)
    tensors[f"{PREFIX}{m}.lora_embedding_B" if emb else f"{PREFIX}{m}.lora_B.weight"] = np.ascontiguousarray(b.T)
    if mag is not None:
      tensors[f"{PREFIX}{m}{_MAG}"] = np.ascontiguousarray(mag)
  tensors.update(_whole_tensors(adapted, model_type, bias, modules_to_save, set(entries)))
  done = {k.rsplit(".", 1)[-1] for k in (path_to_module(p, model_type) for p in token_lws)}
  tensors.update(_token_tensors(adapted, model_type, {k: v for k, v in (trainable_token_indices or {}).items()
                                                      if k not in done}))
  tensors.update(token_rows_out)
  with atomic_folder(folder) as tmp:
    with open(os.path.join(tmp, "adapter_config.json"), "w") as f:
      json.dump(config, f, indent=2)
    save_file(tensors, os.path.join(tmp, "adapter_model.safetensors"), metadata={"format": "pt"})


def _whole_tensors(adapted: Any, model_type: str, bias: str, modules_to_save: Sequence[str],
                   lora_mods: set[str]) -> dict[str, np.ndarray]:
  """PEFT keys → tensors for the trained biases and ``modules_to_save`` weights."""
  from jax_lora.models.hf import family

  if bias not in _BIAS:
    raise ValueError(f"save_peft: bias={bias!r}; PEFT's values are {', '.join(_BIAS)}")
  chosen = set(trainable_paths(adapted, bias))
  flat = {p: v.w if isinstance(v, LoraWeight) else v for p, v in leaves(adapted).items()}
  out, unmatched = {}, set(modules_to_save)
  for p in sorted(_unstacked_paths(set(flat), adapted)):
    m = re.search(r"/layers_(\d+)/", p)
    src = p if p in flat else p[:m.start()] + "/layers/" + p[m.end():]
    mod, param = family(model_type).path_to_hf_key(p).rsplit(".", 1)
    hit = [n for n in modules_to_save if in_modules_to_save(mod, (n,))]
    unmatched -= set(hit)
    if hit and mod not in lora_mods:
      key = f"{mod}.{param}"
    elif src in chosen:
      key = f"{mod}{'.base_layer' if mod in lora_mods else ''}.{param}"
    else:
      continue
    arr = np.asarray(materialize(flat[src]) if src == p else materialize(flat[src])[int(m.group(1))], np.float32)
    out[PREFIX + key] = np.ascontiguousarray(family(model_type).to_hf(p, arr)[1])
  if unmatched:
    raise ValueError(f"save_peft: modules_to_save {few(unmatched)} name no module of the model")
  return out


def _token_tensors(adapted: Any, model_type: str, tti: Mapping[str, Sequence[int]]) -> dict[str, np.ndarray]:
  from jax_lora.models.hf import family

  flat = leaves(adapted)
  out = {}
  for name, ids in tti.items():
    hits = [p for p in flat if len(getattr(flat[p], "shape", ())) == 2 and not isinstance(flat[p], LoraWeight)
            and (m := family(model_type).path_to_hf_key(p)[:-len(".weight")]) and (m == name or m.endswith("." + name))]
    if len(hits) != 1:
      raise ValueError(f"save_peft: trainable_token_indices {name!r} names {len(hits)} embedding tables; name one")
    mod = family(model_type).path_to_hf_key(hits[0])[:-len(".weight")]
    rows = np.asarray(materialize(flat[hits[0]]), np.float32)[np.asarray(ids, np.int64)]
    out[f"{PREFIX}{mod}{_TOK}"] = np.ascontiguousarray(rows)
  return out


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
