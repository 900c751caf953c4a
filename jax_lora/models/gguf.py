"""Llama- and Gemma-3-architecture GGUF files (llama.cpp) → our Flax models, and their tokenizer.

Tensors are dequantized to float with ``gguf.quants.dequantize`` (numpy, no
torch), renamed to Hugging Face keys and loaded through the same path as an HF
folder. llama.cpp stores the Q and K projection rows of Llama permuted for its RoPE
layout; :func:`unpermute_qk` undoes that, so the weights match transformers. For
Gemma 3 it stores every RMSNorm weight as ``1 + w``; the reader subtracts the 1
(as transformers does). Config fields the file does not hold take transformers'
defaults for the architecture.
"""

from __future__ import annotations

import os
import re
from typing import Any

import jax.numpy as jnp
import numpy as np

from jax_lora.files import publish_folder
from jax_lora.models import hf

__all__ = ["read_gguf", "unpermute_qk", "load_gguf", "tokenizer_from_gguf"]

_NAMES = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_GEMMA3_NAMES = {
    **_NAMES,
    "ffn_norm": "pre_feedforward_layernorm",
    "post_attention_norm": "post_attention_layernorm",
    "post_ffw_norm": "post_feedforward_layernorm",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
}
ARCHITECTURES = ("llama", "gemma3")  # GGUF general.architecture values we read


def _hf_key(name: str, arch: str = "llama") -> str:
  names = _GEMMA3_NAMES if arch == "gemma3" else _NAMES
  m = re.fullmatch(r"(blk\.(\d+)\.)?(\w+)\.(weight|bias)", name)
  if m is None or m.group(3) not in names:
    raise ValueError(f"unknown GGUF tensor {name!r} for architecture {arch!r}")
  prefix = f"model.layers.{m.group(2)}." if m.group(1) else ""
  return f"{prefix}{names[m.group(3)]}.{m.group(4)}"


def unpermute_qk(w: np.ndarray, n_heads: int) -> np.ndarray:
  """Undoes llama.cpp's Q/K row permutation; ``n_heads`` is the KV head count for K."""
  d_out = w.shape[0]
  rest = w.shape[1:]
  return w.reshape(n_heads, d_out // n_heads // 2, 2, *rest).swapaxes(1, 2).reshape(d_out, *rest)


def _field(reader, key: str, default: Any = None) -> Any:
  f = reader.fields.get(key)
  return default if f is None else f.contents()


def _f32(x: float) -> float:
  return float(str(np.float32(x)))  # 9.9999997e-06 stored as float32 → 1e-05


def read_gguf(path: str) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
  """Reads a Llama or Gemma 3 GGUF: (HF-style config dict, HF state dict of float32 numpy arrays)."""
  import gguf

  if not os.path.exists(path):
    raise ValueError(f"GGUF file {path} does not exist")
  reader = gguf.GGUFReader(path)
  arch = _field(reader, "general.architecture")
  if arch not in ARCHITECTURES:
    raise ValueError(f"GGUF architecture {arch!r} is not supported; supported: {', '.join(ARCHITECTURES)}")

  def meta(k, default=None):
    return _field(reader, f"{arch}.{k}", default)

  heads, kv_heads = int(meta("attention.head_count")), int(meta("attention.head_count_kv", meta("attention.head_count")))
  state = {}
  for t in reader.tensors:
    w = np.asarray(gguf.quants.dequantize(t.data, t.tensor_type), np.float32)
    key = _hf_key(t.name, arch)
    if arch == "gemma3":
      if key.endswith("norm.weight"):
        w = w - np.float32(1.0)
    elif ".q_proj." in key:
      w = unpermute_qk(w, heads)
    elif ".k_proj." in key:
      w = unpermute_qk(w, kv_heads)
    state[key] = w
  d = int(meta("embedding_length"))
  if arch == "gemma3":
    return _gemma3_config(reader, meta, state, heads, kv_heads, d), state
  config = {
      "model_type": "llama",
      "architectures": ["LlamaForCausalLM"],
      "vocab_size": int(state["model.embed_tokens.weight"].shape[0]),
      "hidden_size": d,
      "intermediate_size": int(meta("feed_forward_length")),
      "num_hidden_layers": int(meta("block_count")),
      "num_attention_heads": heads,
      "num_key_value_heads": kv_heads,
      "head_dim": int(meta("rope.dimension_count", d // heads)),
      "rms_norm_eps": _f32(meta("attention.layer_norm_rms_epsilon", 1e-5)),
      "rope_theta": _f32(meta("rope.freq_base", 10000.0)),
      "max_position_embeddings": int(meta("context_length", 2048)),
      "tie_word_embeddings": "lm_head.weight" not in state,
      "hidden_act": "silu",
      "bos_token_id": _field(reader, "tokenizer.ggml.bos_token_id"),
      "eos_token_id": _field(reader, "tokenizer.ggml.eos_token_id"),
      "pad_token_id": _field(reader, "tokenizer.ggml.padding_token_id"),
  }
  if meta("rope.scaling.type") not in (None, "none"):
    raise ValueError(f"RoPE scaling {meta('rope.scaling.type')!r} in {path} is not supported")
  return config, state


def _gemma3_config(reader, meta, state, heads: int, kv_heads: int, d: int) -> dict[str, Any]:
  """``Gemma3ForCausalLM`` config.json fields; transformers' Gemma3TextConfig defaults where the file is silent."""
  known = {"general.", "tokenizer.", "GGUF.", "gemma3.context_length", "gemma3.embedding_length", "gemma3.block_count",
           "gemma3.feed_forward_length", "gemma3.attention.head_count", "gemma3.attention.head_count_kv",
           "gemma3.attention.key_length", "gemma3.attention.value_length", "gemma3.attention.layer_norm_rms_epsilon",
           "gemma3.rope.freq_base", "gemma3.attention.sliding_window"}
  unknown = [k for k in reader.fields if not any(k == n or (n.endswith(".") and k.startswith(n)) for n in known)]
  if unknown:
    raise ValueError(f"GGUF field {unknown[0]!r} is not understood for Gemma 3; only plain Gemma 3 text models load")
  n_layers = int(meta("block_count"))
  return {
      "model_type": "gemma3_text",
      "architectures": ["Gemma3ForCausalLM"],
      "vocab_size": int(state["model.embed_tokens.weight"].shape[0]),
      "hidden_size": d,
      "intermediate_size": int(meta("feed_forward_length")),
      "num_hidden_layers": n_layers,
      "num_attention_heads": heads,
      "num_key_value_heads": kv_heads,
      "head_dim": int(meta("attention.key_length", 256)),
      "rms_norm_eps": _f32(meta("attention.layer_norm_rms_epsilon", 1e-6)),
      "max_position_embeddings": int(meta("context_length", 131072)),
      "sliding_window": int(meta("attention.sliding_window", 4096)),
      "layer_types": ["sliding_attention" if (i + 1) % 6 else "full_attention" for i in range(n_layers)],
      "rope_parameters": {"full_attention": {"rope_type": "default", "rope_theta": _f32(meta("rope.freq_base", 1e6))},
                          "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0}},
      "query_pre_attn_scalar": 256,
      "hidden_activation": "gelu_pytorch_tanh",
      "tie_word_embeddings": "lm_head.weight" not in state,
      "attn_logit_softcapping": None,
      "final_logit_softcapping": None,
      "bos_token_id": _field(reader, "tokenizer.ggml.bos_token_id"),
      "eos_token_id": _field(reader, "tokenizer.ggml.eos_token_id"),
      "pad_token_id": _field(reader, "tokenizer.ggml.padding_token_id"),
  }


def load_gguf(path: str, dtype=jnp.float32, param_dtype=None, **overrides):
  """Loads a Llama- or Gemma-3-architecture GGUF file as ``(model, variables, config)`` like ``load_hf``.

  Args:
    path: the ``.gguf`` file (quantized tensors are dequantized to float).
    dtype: compute dtype (and params dtype unless ``param_dtype`` is given).
    param_dtype: dtype to store the params in.
    **overrides: config fields to change, e.g. ``scan_layers=True``.
  """
  hf_config, state = read_gguf(path)
  config = hf.config_from_hf(hf_config, **overrides)
  param_dtype = dtype if param_dtype is None else param_dtype
  params = hf.params_from_hf_state(state, config, param_dtype)
  return hf.model_from_config(config, dtype, param_dtype), params, config


def tokenizer_from_gguf(path: str, cache_dir: str | None = None):
  """The GGUF's tokenizer as a ``transformers.PreTrainedTokenizerFast``.

  Args:
    path: the ``.gguf`` file.
    cache_dir: if given, the converted tokenizer is saved there once and later
      calls load it from there (much faster than converting again).
  """
  from transformers import AutoTokenizer

  if cache_dir is not None and os.path.exists(os.path.join(cache_dir, "tokenizer.json")):
    return AutoTokenizer.from_pretrained(cache_dir)
  tok = AutoTokenizer.from_pretrained(os.path.dirname(os.path.abspath(path)), gguf_file=os.path.basename(path))
  if cache_dir is not None:
    tmp = f"{cache_dir}.tmp{os.getpid()}"
    tok.save_pretrained(tmp)
    publish_folder(tmp, cache_dir)
  return tok
