"""GPT-2 causal LM in Flax Linen, with Hugging Face parameter names.

Parameter paths: ``transformer/wte/embedding``, ``transformer/wpe/embedding``,
``transformer/h_{i}/ln_1/{scale,bias}``, ``transformer/h_{i}/attn/c_attn/{kernel,bias}``,
``transformer/h_{i}/attn/c_proj/...``, ``transformer/h_{i}/ln_2/...``,
``transformer/h_{i}/mlp/{c_fc,c_proj}/...``, ``transformer/ln_f/...``. The LM head
is tied to ``wte``. GPT-2's Conv1D weights are stored (in, out), which is already
the Flax kernel layout: nothing is transposed on load.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jax_lora.models.attention import attend, check_implementation, dot_product_attention
from jax_lora.models.llama import allowed_mask, cache_update, logits_dtype, mask_and_positions, project
from jax_lora.remat import check_policy, remat_module, tag_layer_input

__all__ = [
    "GPT2Config",
    "GPT2LMHeadModel",
    "init_cache",
    "hf_key_to_path",
    "path_to_hf_key",
    "to_flax",
    "to_hf",
    "ignored_hf_keys",
]

_ACTS = {
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "relu": jax.nn.relu,
}


@dataclasses.dataclass(frozen=True, kw_only=True)
class GPT2Config:
  """Architecture of a GPT-2 model."""

  vocab_size: int  # number of token embeddings
  n_positions: int  # number of learned position embeddings
  n_embd: int  # model width
  n_layer: int  # transformer blocks
  n_head: int  # attention heads
  n_inner: int  # MLP width (HF default 4 * n_embd)
  layer_norm_epsilon: float = 1e-5  # LayerNorm epsilon
  activation_function: str = "gelu_new"  # MLP activation (gelu_new, gelu, relu)
  model_type: str = "gpt2"  # Hugging Face model_type
  attention: str = "auto"  # training/scoring attention kernel (see models.attention); not saved to config.json
  # Gradient checkpointing of each block: "none", "full", "dots" or "offload" (see jax_lora.remat).
  # A training setting: never written to config.json.
  remat: str = "none"

  def __post_init__(self):
    check_implementation(self.attention)
    check_policy(self.remat, "GPT2Config.remat")

  @property
  def head_dim(self) -> int:
    return self.n_embd // self.n_head

  @classmethod
  def from_hf_config(cls, hf: Mapping[str, Any], **overrides) -> GPT2Config:
    """Builds the config from a Hugging Face GPT-2 ``config.json`` dict."""
    if hf.get("scale_attn_by_inverse_layer_idx"):
      raise ValueError("scale_attn_by_inverse_layer_idx=true is not supported; only standard GPT-2 attention is")
    if not hf.get("scale_attn_weights", True):
      raise ValueError("scale_attn_weights=false is not supported; only standard GPT-2 attention is")
    act = hf.get("activation_function", "gelu_new")
    if act not in _ACTS:
      raise ValueError(f"activation_function {act!r} is not supported; use one of {sorted(_ACTS)}")
    kw = dict(
        vocab_size=hf["vocab_size"],
        n_positions=hf.get("n_positions", 1024),
        n_embd=hf["n_embd"],
        n_layer=hf["n_layer"],
        n_head=hf["n_head"],
        n_inner=hf.get("n_inner") or 4 * hf["n_embd"],
        layer_norm_epsilon=hf.get("layer_norm_epsilon", 1e-5),
        activation_function=act,
    )
    kw.update(overrides)
    return cls(**kw)

  def to_hf_config(self) -> dict[str, Any]:
    """A Hugging Face ``config.json`` dict for this architecture."""
    return {
        "architectures": ["GPT2LMHeadModel"],
        "model_type": "gpt2",
        "vocab_size": self.vocab_size,
        "n_positions": self.n_positions,
        "n_embd": self.n_embd,
        "n_layer": self.n_layer,
        "n_head": self.n_head,
        "n_inner": self.n_inner,
        "layer_norm_epsilon": self.layer_norm_epsilon,
        "activation_function": self.activation_function,
        "tie_word_embeddings": True,
    }


def _dense(features, name, dtype, param_dtype):
  return nn.Dense(features, dtype=dtype, param_dtype=param_dtype, name=name)


class GPT2Attention(nn.Module):
  config: GPT2Config
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, mask, cache=None, index=0):
    c = self.config
    b, s, d = x.shape
    qkv = project(_dense(3 * d, "c_attn", self.dtype, self.param_dtype), x)
    q, k, v = (t.reshape(b, s, c.n_head, c.head_dim) for t in jnp.split(qkv, 3, axis=-1))
    if cache is None:  # training / scoring: the mask holds segment ids
      out = dot_product_attention(q, k, v, mask, implementation=c.attention)
    else:
      k, v, cache = cache_update(cache, k, v, index)
      out = attend(q, k.astype(q.dtype), v.astype(q.dtype), allowed_mask(mask, s, index))
    out = out.reshape(b, s, d)
    return project(_dense(d, "c_proj", self.dtype, self.param_dtype), out), cache


class GPT2MLP(nn.Module):
  config: GPT2Config
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    c = self.config
    h = _ACTS[c.activation_function](project(_dense(c.n_inner, "c_fc", self.dtype, self.param_dtype), x))
    return project(_dense(c.n_embd, "c_proj", self.dtype, self.param_dtype), h)


class GPT2Block(nn.Module):
  config: GPT2Config
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, mask, cache=None, index=0):
    c, kw = self.config, dict(dtype=self.dtype, param_dtype=self.param_dtype)
    x = tag_layer_input(x)
    h, cache = GPT2Attention(c, name="attn", **kw)(
        nn.LayerNorm(c.layer_norm_epsilon, name="ln_1", **kw)(x), mask, cache, index
    )
    x = x + h
    return x + GPT2MLP(c, name="mlp", **kw)(nn.LayerNorm(c.layer_norm_epsilon, name="ln_2", **kw)(x)), cache


class GPT2Model(nn.Module):
  config: GPT2Config
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  def setup(self):
    c, kw = self.config, dict(dtype=self.dtype, param_dtype=self.param_dtype)
    self.wte = nn.Embed(c.vocab_size, c.n_embd, name="wte", **kw)
    self.wpe = nn.Embed(c.n_positions, c.n_embd, name="wpe", **kw)
    block = remat_module(GPT2Block, c.remat)
    self.h = [block(c, name=f"h_{i}", **kw) for i in range(c.n_layer)]
    self.ln_f = nn.LayerNorm(c.layer_norm_epsilon, name="ln_f", **kw)

  def __call__(self, input_ids, mask, positions, cache=None, index=0):
    x = self.wte(input_ids) + self.wpe(positions)
    new = []
    for i, block in enumerate(self.h):
      x, ci = block(x, mask, None if cache is None else cache[i], index)
      new.append(ci)
    return self.ln_f(x), (None if cache is None else tuple(new))

  def logits(self, x):
    return self.wte.attend(x)


class GPT2LMHeadModel(nn.Module):
  """GPT-2 with a tied LM head; same call convention as :class:`LlamaForCausalLM`.

  ``model.apply(params, input_ids, attention_mask=None, cache=None, index=0)``
  returns ``(float32 logits (b, s, vocab), cache)``. ``method="hidden_states"``
  (final-norm hidden states) and ``method="lm_logits"`` (the tied head alone)
  split the two for chunked losses, as in :class:`LlamaForCausalLM`.
  """

  config: GPT2Config  # architecture
  dtype: Any = jnp.float32  # compute dtype
  param_dtype: Any = jnp.float32  # parameter dtype at init

  def setup(self):
    self.transformer = GPT2Model(self.config, dtype=self.dtype, param_dtype=self.param_dtype, name="transformer")

  def __call__(self, input_ids, attention_mask=None, cache=None, index=0, logits_index=None):
    x, cache = self._trunk(input_ids, attention_mask, cache, index, logits_index)
    return self.lm_logits(x), cache

  def hidden_states(self, input_ids, attention_mask=None, logits_index=None):
    """Final-norm hidden states (b, s, d), or (b, k, d) at ``logits_index``; no LM head, no cache."""
    return self._trunk(input_ids, attention_mask, None, 0, logits_index)[0]

  def lm_logits(self, hidden):
    """The tied LM head alone: hidden states (..., d) -> float32 logits (..., vocab)."""
    lead = hidden.shape[:-1]
    logits = self.transformer.logits(hidden.reshape(-1, hidden.shape[-1]))
    return logits.reshape(*lead, -1).astype(logits_dtype(self.dtype))

  def _trunk(self, input_ids, attention_mask, cache, index, logits_index):
    mask, positions = mask_and_positions(input_ids, attention_mask, cache, index)
    x, cache = self.transformer(input_ids, mask, positions, cache, index)
    if logits_index is not None:  # logits only where needed (see LlamaForCausalLM)
      x = jnp.take_along_axis(x, logits_index[..., None], axis=1)
    return x, cache


def init_cache(config: GPT2Config, batch: int, max_len: int, dtype=jnp.float32):
  """Zero key/value cache: a tuple of per-layer {"k", "v"} arrays (b, t, heads, head_dim)."""
  shape = (batch, max_len, config.n_head, config.head_dim)
  return tuple({"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)} for _ in range(config.n_layer))


def hf_key_to_path(key: str) -> str:
  """Hugging Face GPT-2 key → Flax path.

  >>> hf_key_to_path("transformer.h.0.attn.c_attn.weight")
  'transformer/h_0/attn/c_attn/kernel'
  """
  m = re.fullmatch(r"transformer\.(h\.(\d+)\.)?([\w.]+)\.(weight|bias)", key)
  if m is None:
    raise ValueError(f"unknown GPT-2 parameter key {key!r}; expected 'transformer.<module>.weight|bias'")
  prefix = f"transformer/h_{m.group(2)}/" if m.group(1) else "transformer/"
  module, kind = m.group(3), m.group(4)
  if kind == "bias":
    leaf = "bias"
  elif module in ("wte", "wpe"):
    leaf = "embedding"
  elif module.startswith("ln"):
    leaf = "scale"
  else:
    leaf = "kernel"
  return prefix + module.replace(".", "/") + "/" + leaf


def path_to_hf_key(path: str) -> str:
  """Flax path → Hugging Face GPT-2 key; inverse of :func:`hf_key_to_path`."""
  parts = path.split("/")
  leaf = {"kernel": "weight", "embedding": "weight", "scale": "weight", "bias": "bias"}.get(parts[-1])
  if leaf is None:
    raise ValueError(f"unknown parameter leaf in {path!r}; expected kernel, bias, embedding or scale")
  mods = [re.sub(r"^h_(\d+)$", r"h.\1", p) for p in parts[:-1]]
  return ".".join([*mods, leaf])


def to_flax(key: str, array):
  """HF (key, tensor) → (Flax path, array); Conv1D weights are already (in, out)."""
  return hf_key_to_path(key), array


def to_hf(path: str, array):
  """Flax (path, array) → HF (key, tensor)."""
  return path_to_hf_key(path), array


def ignored_hf_keys(key: str) -> bool:
  """Keys in GPT-2 checkpoints that hold no parameters (old attention-mask buffers, tied head)."""
  return key == "lm_head.weight" or bool(re.search(r"\.attn\.(bias|masked_bias)$", key))

