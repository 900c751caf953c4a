"""Hugging Face folders ↔ our Flax models: configs, key names, safetensors.

``load_hf(folder)`` reads ``config.json`` and ``model.safetensors`` (or the
shards listed in ``model.safetensors.index.json``) and returns
``(model, params, config)``; ``save_hf`` writes the same layout back, so a
merged model can be loaded by transformers. Key names map one-to-one:
``model.layers.0.self_attn.q_proj.weight`` ↔ ``model/layers_0/self_attn/q_proj/kernel``.
"""

from __future__ import annotations

import json
import os
import types
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import traverse_util

from jax_lora.files import read_safetensors
from jax_lora.models import gpt2, llama, t5

__all__ = [
    "FAMILIES",
    "family",
    "config_from_hf",
    "model_from_config",
    "hf_key_to_path",
    "path_to_hf_key",
    "params_from_hf_state",
    "hf_state_from_params",
    "init_cache",
    "load_hf",
    "save_hf",
]

# model_type → module holding the model class, config class and the key mapping.
FAMILIES: dict[str, types.ModuleType] = {
    "llama": llama, "mistral": llama, "qwen2": llama, "qwen3": llama, "gemma2": llama, "gemma3_text": llama,
    "gpt2": gpt2, "t5": t5,
}
_CLASSES = {llama: (llama.LlamaConfig, llama.LlamaForCausalLM), gpt2: (gpt2.GPT2Config, gpt2.GPT2LMHeadModel),
            t5: (t5.T5Config, t5.T5ForConditionalGeneration)}


def family(model_type_or_config: str | Any) -> types.ModuleType:
  """The model module (``llama``, ``gpt2`` or ``t5``) for a model_type string or one of our configs."""
  mt = model_type_or_config if isinstance(model_type_or_config, str) else model_type_or_config.model_type
  if mt not in FAMILIES:
    raise ValueError(f"model_type {mt!r} is not supported; supported: {sorted(FAMILIES)}")
  return FAMILIES[mt]


def config_from_hf(hf: Mapping[str, Any], **overrides):
  """Our frozen config from a ``config.json`` dict, dispatched on ``model_type``."""
  return _CLASSES[family(hf.get("model_type", ""))][0].from_hf_config(hf, **overrides)


def model_from_config(config, dtype=jnp.float32, param_dtype=jnp.float32) -> nn.Module:
  """The Flax Linen model for one of our configs."""
  return _CLASSES[family(config)][1](config, dtype=dtype, param_dtype=param_dtype)


def init_cache(config, batch: int, max_len: int, dtype=jnp.float32):
  """Zero KV cache for ``batch`` sequences of up to ``max_len`` tokens."""
  return family(config).init_cache(config, batch, max_len, dtype)


def hf_key_to_path(key: str, model_type: str = "llama") -> str:
  """HF state-dict key → Flax parameter path, e.g. ``model.layers.0.mlp.up_proj.weight`` → ``model/layers_0/mlp/up_proj/kernel``."""
  return family(model_type).hf_key_to_path(key)


def path_to_hf_key(path: str, model_type: str = "llama") -> str:
  """Flax parameter path (unscanned) → HF state-dict key; inverse of :func:`hf_key_to_path`."""
  return family(model_type).path_to_hf_key(path)


def ignored_key(key: str, config) -> bool:
  if isinstance(config, gpt2.GPT2Config):
    return gpt2.ignored_hf_keys(key)
  if isinstance(config, t5.T5Config):
    return t5.ignored_hf_keys(key, config)
  return key.endswith("rotary_emb.inv_freq") or (config.tie_word_embeddings and key == "lm_head.weight")


def params_from_hf_state(state: Mapping[str, Any], config, dtype=jnp.float32) -> dict:
  """Nested Flax params from an HF state dict ``{key: array}``; every parameter must be present.

  The result is a variables dict ``{"params": tree}`` for ``model.apply``;
  ``jax_lora.init_lora`` and ``jax_lora.linen.apply`` take ``tree`` itself.

  Args:
    state: HF keys → arrays (numpy or jax).
    config: our config (decides the family and ``scan_layers``).
    dtype: dtype of the returned arrays.

  Raises:
    ValueError: when keys are missing or unknown (the message lists a few).
  """
  fam = family(config)
  if isinstance(config, t5.T5Config) and t5.config_for_state(config, state) != config:
    raise ValueError("the checkpoint's lm_head.weight does not fit tie_word_embeddings in the T5 config; use "
                     "jax_lora.models.t5.config_for_state(config, state) first (load_hf does)")
  flat = {}
  for key, arr in state.items():
    if ignored_key(key, config):
      continue
    if not jnp.issubdtype(arr.dtype, jnp.floating):
      raise ValueError(f"checkpoint tensor {key!r} is {arr.dtype}, not floating (a damaged safetensors header?); "
                       f"a {config.model_type} checkpoint holds float weights")
    path, arr = fam.to_flax(key, arr)
    flat[path] = jnp.asarray(arr, dtype)
  model = model_from_config(_unscanned(config))
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 1), jnp.int32)))
  want = {"/".join(k): v.shape for k, v in traverse_util.flatten_dict(shapes["params"]).items()}
  missing, unknown = sorted(set(want) - set(flat)), sorted(set(flat) - set(want))
  if missing or unknown:
    raise ValueError(
        f"checkpoint does not match the {config.model_type} config: missing {missing[:4]} "
        f"({len(missing)}), unexpected {unknown[:4]} ({len(unknown)}); check config.json against the weights"
    )
  bad = [p for p in want if tuple(flat[p].shape) != tuple(want[p])]
  if bad:
    raise ValueError(f"shape mismatch for {bad[0]}: checkpoint {flat[bad[0]].shape}, config {want[bad[0]]}")
  if getattr(config, "scan_layers", False):
    flat = llama.stack_layers(flat, config.num_hidden_layers)
  return {"params": traverse_util.unflatten_dict(flat, sep="/")}


def hf_state_from_params(params: Mapping[str, Any], config) -> dict[str, jax.Array]:
  """HF state dict ``{key: array}`` from our params (plain arrays; merge LoRA first).

  ``params`` is a variables dict ``{"params": tree}`` or the tree itself.
  """
  fam = family(config)
  tree = params["params"] if set(params) == {"params"} else params
  flat = {"/".join(k): v for k, v in traverse_util.flatten_dict(dict(tree)).items()}
  if getattr(config, "scan_layers", False):
    flat = llama.unstack_layers(flat)
  return dict(fam.to_hf(p, a) for p, a in flat.items())


def _unscanned(config):
  return config.__class__(**{**config.__dict__, "scan_layers": False}) if getattr(config, "scan_layers", False) else config


def load_hf(folder: str, dtype=jnp.float32, param_dtype=None, **overrides):
  """Loads a local Hugging Face causal-LM (or T5 encoder–decoder) folder.

  Args:
    folder: directory with ``config.json`` and safetensors weights.
    dtype: compute dtype of the model (and the params, unless ``param_dtype`` is given).
    param_dtype: dtype to store the params in (default: ``dtype``).
    **overrides: config fields to change, e.g. ``scan_layers=True``.

  Returns:
    ``(model, variables, config)``: ``variables`` is ``{"params": tree}``, and
    ``model.apply(variables, input_ids, attention_mask)`` returns ``(logits, cache)``.
  """
  path = os.path.join(folder, "config.json")
  if not os.path.exists(path):
    raise ValueError(f"{folder} has no config.json; pass a Hugging Face model folder")
  with open(path) as f:
    config = config_from_hf(json.load(f), **overrides)
  param_dtype = dtype if param_dtype is None else param_dtype
  state = read_safetensors(folder, framework="flax")
  if isinstance(config, t5.T5Config):  # transformers 5 decides T5's head tying from the weights
    config = t5.config_for_state(config, state)
  params = params_from_hf_state(state, config, param_dtype)
  return model_from_config(config, dtype, param_dtype), params, config


def save_hf(folder: str, params: Mapping[str, Any], config, dtype=None, extra_config: Mapping[str, Any] | None = None) -> None:
  """Writes ``config.json`` and ``model.safetensors`` that transformers can load.

  Args:
    folder: output directory (created).
    params: our params (plain arrays: merge LoRA weights first).
    config: our config.
    dtype: dtype to save in (default: as stored); "torch_dtype" in config.json follows it.
    extra_config: more config.json fields (e.g. bos/eos token ids).
  """
  from safetensors.flax import save_file

  state = hf_state_from_params(params, config)
  arrays = {k: jnp.asarray(v, dtype) for k, v in state.items()}
  os.makedirs(folder, exist_ok=True)
  hf = {**config.to_hf_config(), **(extra_config or {})}
  hf["dtype"] = jnp.dtype(next(iter(arrays.values())).dtype).name
  with open(os.path.join(folder, "config.json"), "w") as f:
    json.dump(hf, f, indent=2)
  save_file(arrays, os.path.join(folder, "model.safetensors"), metadata={"format": "pt"})

