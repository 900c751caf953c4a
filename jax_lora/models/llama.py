"""Llama-family decoder (Llama, SmolLM2, Mistral-like, Qwen2) in Flax Linen.

Every projection is a plain ``nn.Dense`` named like the Hugging Face module, so
LoRA targets are plain path patterns such as ``.*/(q_proj|v_proj)/kernel``:

- ``model/embed_tokens/embedding``
- ``model/layers_{i}/self_attn/{q,k,v,o}_proj/kernel`` (and ``bias`` when set)
- ``model/layers_{i}/mlp/{gate,up,down}_proj/kernel``
- ``model/layers_{i}/{input,post_attention}_layernorm/weight``, ``model/norm/weight``
- ``lm_head/kernel`` (untied embeddings only)

With ``scan_layers=True`` the decoder layers are one ``nn.scan`` module named
``model/layers`` whose parameters carry a leading layer axis
(``model/layers/self_attn/q_proj/kernel`` has shape (layers, in, out)).

Tokens are flattened to ``(batch*seq, d)`` before each projection: XLA:CPU
only takes its fast GEMM path for weight gradients that contract one axis.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jax_lora.models.attention import attend, check_implementation, dot_product_attention
from jax_lora.remat import check_policy, remat_module, tag_layer_input

__all__ = [
    "LlamaConfig",
    "LlamaForCausalLM",
    "init_cache",
    "hf_key_to_path",
    "path_to_hf_key",
    "to_flax",
    "to_hf",
    "stack_layers",
    "unstack_layers",
    "attend",
    "positions_from_mask",
    "positions_from_segments",
]

_ARCHITECTURES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM"}


@dataclasses.dataclass(frozen=True, kw_only=True)
class LlamaConfig:
  """Architecture of a Llama-family causal language model."""

  vocab_size: int  # number of token embeddings
  hidden_size: int  # model width d
  intermediate_size: int  # SwiGLU MLP width
  num_hidden_layers: int  # decoder layers
  num_attention_heads: int  # query heads
  num_key_value_heads: int  # key/value heads (GQA when fewer than query heads)
  head_dim: int  # width of one head
  rms_norm_eps: float = 1e-6  # RMSNorm epsilon
  rope_theta: float = 10000.0  # RoPE base frequency
  max_position_embeddings: int = 2048  # longest sequence the model was trained for
  tie_word_embeddings: bool = False  # lm_head shares the token embedding
  qkv_bias: bool = False  # biases on q/k/v projections (Qwen2, or Llama attention_bias)
  o_bias: bool = False  # bias on the output projection (Llama attention_bias)
  mlp_bias: bool = False  # biases on gate/up/down projections
  scan_layers: bool = False  # stack the layers with nn.scan (params get a leading layer axis)
  model_type: str = "llama"  # Hugging Face model_type this config came from / is saved as
  attention: str = "auto"  # training/scoring attention kernel (see models.attention); not saved to config.json
  # Gradient checkpointing of each decoder layer: "none", "full", "dots" or "offload" (see
  # jax_lora.remat). A training setting: never written to config.json.
  remat: str = "none"

  def __post_init__(self):
    check_implementation(self.attention)
    check_policy(self.remat, "LlamaConfig.remat")

  @classmethod
  def from_hf_config(cls, hf: Mapping[str, Any], **overrides) -> LlamaConfig:
    """Builds the config from a Hugging Face ``config.json`` dict (llama, qwen2, mistral).

    Args:
      hf: the parsed ``config.json``.
      **overrides: fields to set on top, e.g. ``scan_layers=True``.
    """
    rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type not in ("default", None):
      raise ValueError(f"rope type {rope_type!r} is not supported; only default RoPE is (no rope scaling)")
    theta = rope.get("rope_theta", hf.get("rope_theta", 10000.0))
    model_type = hf.get("model_type", "llama")
    window = hf.get("sliding_window")
    if window and (hf.get("use_sliding_window") or model_type == "mistral"):
      if window < hf.get("max_position_embeddings", 0):
        raise ValueError("sliding-window attention is not supported; set sliding_window=null in config.json")
    if hf.get("hidden_act", "silu") != "silu":
      raise ValueError(f"hidden_act {hf['hidden_act']!r} is not supported; Llama-family models use 'silu'")
    heads = hf["num_attention_heads"]
    attn_bias = bool(hf.get("attention_bias", False))
    kw = dict(
        vocab_size=hf["vocab_size"],
        hidden_size=hf["hidden_size"],
        intermediate_size=hf["intermediate_size"],
        num_hidden_layers=hf["num_hidden_layers"],
        num_attention_heads=heads,
        num_key_value_heads=hf.get("num_key_value_heads") or heads,
        head_dim=hf.get("head_dim") or hf["hidden_size"] // heads,
        rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
        rope_theta=float(theta),
        max_position_embeddings=hf.get("max_position_embeddings", 2048),
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
        qkv_bias=attn_bias or model_type == "qwen2",
        o_bias=attn_bias and model_type != "qwen2",
        mlp_bias=bool(hf.get("mlp_bias", False)),
        model_type=model_type,
    )
    kw.update(overrides)
    return cls(**kw)

  def to_hf_config(self) -> dict[str, Any]:
    """A Hugging Face ``config.json`` dict for this architecture."""
    out = {
        "architectures": [_ARCHITECTURES.get(self.model_type, "LlamaForCausalLM")],
        "model_type": self.model_type,
        "vocab_size": self.vocab_size,
        "hidden_size": self.hidden_size,
        "intermediate_size": self.intermediate_size,
        "num_hidden_layers": self.num_hidden_layers,
        "num_attention_heads": self.num_attention_heads,
        "num_key_value_heads": self.num_key_value_heads,
        "head_dim": self.head_dim,
        "hidden_act": "silu",
        "rms_norm_eps": self.rms_norm_eps,
        "rope_theta": self.rope_theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": self.rope_theta},
        "max_position_embeddings": self.max_position_embeddings,
        "tie_word_embeddings": self.tie_word_embeddings,
        "mlp_bias": self.mlp_bias,
    }
    if self.model_type == "qwen2":
      out["use_sliding_window"] = False
    else:
      if self.qkv_bias != self.o_bias:
        raise ValueError("Llama's attention_bias covers q, k, v and o together; use model_type='qwen2' for q/k/v only")
      out["attention_bias"] = self.qkv_bias
    return out


# ----------------------------------------------------------------------------- helpers


def positions_from_mask(mask: jax.Array) -> jax.Array:
  """Token positions from a (batch, seq) 1/0 padding mask (left or right padding)."""
  return jnp.maximum(jnp.cumsum(mask.astype(jnp.int32), axis=-1) - 1, 0)


def positions_from_segments(segments: jax.Array) -> jax.Array:
  """Positions that restart at 0 where each segment starts, for a (batch, seq) mask of
  segment ids (0 = padding, k > 0 = the k-th example packed in the row).

  A 1/0 mask gives the same positions as :func:`positions_from_mask` at every
  non-padding token (padding positions are unused).
  """
  seg = segments.astype(jnp.int32)
  idx = jnp.arange(seg.shape[-1], dtype=jnp.int32)
  prev = jnp.pad(seg[..., :-1], [(0, 0)] * (seg.ndim - 1) + [(1, 0)], constant_values=-1)
  starts = jnp.where((seg != prev) & (seg > 0), idx, 0)
  return idx - jax.lax.cummax(starts, axis=seg.ndim - 1)


def rope(x: jax.Array, positions: jax.Array, theta: float) -> jax.Array:
  """Rotary embedding in Hugging Face's ``rotate_half`` layout. x: (b, s, h, d); positions (b, s)."""
  d = x.shape[-1]
  inv = 1.0 / (theta ** (np.arange(0, d, 2, dtype=np.float32) / d))
  ang = positions.astype(jnp.float32)[..., None] * inv[None, None, :]  # (b, s, d/2)
  ang = jnp.concatenate([ang, ang], axis=-1)[:, :, None, :]
  cos, sin = jnp.cos(ang).astype(x.dtype), jnp.sin(ang).astype(x.dtype)
  x1, x2 = x[..., : d // 2], x[..., d // 2 :]
  return x * cos + jnp.concatenate([-x2, x1], axis=-1) * sin


def allowed_mask(mask: jax.Array, s: int, index) -> jax.Array:
  """(b, s, t) causal-and-padding mask for queries in slots index..index+s-1 over key slots 0..t-1.

  ``mask`` (b, t) is 0 at padding; without a cache (``s == t``) its positive
  values are segment ids and a query sees only keys of its own segment, so
  examples packed into one row do not attend to each other.
  """
  t = mask.shape[-1]
  qpos = index + jnp.arange(s)
  causal = jnp.arange(t)[None, :] <= qpos[:, None]
  allowed = causal[None] & (mask[:, None, :] > 0)
  if s == t:  # whole sequence at once (training / scoring): segments apply
    allowed &= mask[:, :, None] == mask[:, None, :]
  return allowed


def project(layer: nn.Module, x: jax.Array) -> jax.Array:
  """Applies a Dense to tokens flattened to (n, d), then restores the leading axes."""
  lead = x.shape[:-1]
  return layer(x.reshape(-1, x.shape[-1])).reshape(*lead, -1)


def cache_update(cache: dict, k: jax.Array, v: jax.Array, index) -> tuple[jax.Array, jax.Array, dict]:
  """Writes (b, s, kv, d) keys/values into the cache at slot ``index``; returns full k, v and the cache."""
  ck = jax.lax.dynamic_update_slice_in_dim(cache["k"], k.astype(cache["k"].dtype), index, axis=1)
  cv = jax.lax.dynamic_update_slice_in_dim(cache["v"], v.astype(cache["v"].dtype), index, axis=1)
  return ck, cv, {"k": ck, "v": cv}


def mask_and_positions(input_ids, attention_mask, cache, index):
  """The attention mask over key slots and the (b, s) positions of the given tokens."""
  b, s = input_ids.shape
  if cache is None:
    mask = jnp.ones((b, s), jnp.int32) if attention_mask is None else attention_mask
    if mask.shape != (b, s):
      raise ValueError(f"attention_mask has shape {mask.shape}; expected {(b, s)} like input_ids")
    return mask, positions_from_segments(mask)
  first = jax.tree.leaves(cache)[0]
  t = first.shape[-3]
  mask = jnp.ones((b, t), jnp.int32) if attention_mask is None else attention_mask
  if mask.shape != (b, t):
    raise ValueError(f"with a cache, attention_mask must cover all {t} cache slots: shape {(b, t)}, got {mask.shape}")
  positions = jax.lax.dynamic_slice_in_dim(positions_from_mask(mask), index, s, axis=1)
  return mask, positions


# ----------------------------------------------------------------------------- modules


class RMSNorm(nn.Module):
  """RMSNorm computed in float32 as Hugging Face does; parameter ``weight``."""

  eps: float  # added to the mean square
  dtype: Any = jnp.float32  # output dtype
  param_dtype: Any = jnp.float32  # weight dtype

  @nn.compact
  def __call__(self, x):
    w = self.param("weight", nn.initializers.ones, (x.shape[-1],), self.param_dtype)
    xf = x.astype(jnp.float32)
    xf = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.eps)
    return (w.astype(jnp.float32).reshape((1,) * (x.ndim - 1) + (-1,)) * xf).astype(self.dtype)


def _dense(features: int, name: str, use_bias: bool, dtype, param_dtype) -> nn.Dense:
  return nn.Dense(features, use_bias=use_bias, dtype=dtype, param_dtype=param_dtype, name=name)


class LlamaAttention(nn.Module):
  config: LlamaConfig
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, positions, mask, cache=None, index=0):
    c = self.config
    b, s, _ = x.shape
    dt = (self.dtype, self.param_dtype)
    nq, nkv, hd = c.num_attention_heads, c.num_key_value_heads, c.head_dim
    q = project(_dense(nq * hd, "q_proj", c.qkv_bias, *dt), x).reshape(b, s, nq, hd)
    k = project(_dense(nkv * hd, "k_proj", c.qkv_bias, *dt), x).reshape(b, s, nkv, hd)
    v = project(_dense(nkv * hd, "v_proj", c.qkv_bias, *dt), x).reshape(b, s, nkv, hd)
    q, k = rope(q, positions, c.rope_theta), rope(k, positions, c.rope_theta)
    if cache is None:  # training / scoring: the mask holds segment ids
      out = dot_product_attention(q, k, v, mask, implementation=c.attention)
    else:
      k, v, cache = cache_update(cache, k, v, index)
      out = attend(q, k.astype(q.dtype), v.astype(q.dtype), allowed_mask(mask, s, index))
    out = project(_dense(c.hidden_size, "o_proj", c.o_bias, *dt), out.reshape(b, s, nq * hd))
    return out, cache


class LlamaMLP(nn.Module):
  config: LlamaConfig
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    c = self.config
    dt = (c.mlp_bias, self.dtype, self.param_dtype)
    lead = x.shape[:-1]
    x = x.reshape(-1, x.shape[-1])
    h = nn.silu(_dense(c.intermediate_size, "gate_proj", *dt)(x)) * _dense(c.intermediate_size, "up_proj", *dt)(x)
    return _dense(c.hidden_size, "down_proj", *dt)(h).reshape(*lead, -1)


class LlamaDecoderLayer(nn.Module):
  """Pre-norm decoder layer. The (x, cache, ...) order lets nn.scan carry x and scan the cache."""

  config: LlamaConfig
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, cache, positions, mask, index):
    c, kw = self.config, dict(dtype=self.dtype, param_dtype=self.param_dtype)
    x = tag_layer_input(x)
    h = RMSNorm(c.rms_norm_eps, name="input_layernorm", **kw)(x)
    h, cache = LlamaAttention(c, name="self_attn", **kw)(h, positions, mask, cache, index)
    x = x + h
    h = RMSNorm(c.rms_norm_eps, name="post_attention_layernorm", **kw)(x)
    return x + LlamaMLP(c, name="mlp", **kw)(h), cache


class LlamaModel(nn.Module):
  config: LlamaConfig
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  def setup(self):
    c, kw = self.config, dict(dtype=self.dtype, param_dtype=self.param_dtype)
    self.embed_tokens = nn.Embed(c.vocab_size, c.hidden_size, name="embed_tokens", **kw)
    if c.scan_layers:
      scanned = nn.scan(
          remat_module(LlamaDecoderLayer, c.remat, scan=True),
          variable_axes={"params": 0},
          split_rngs={"params": True},
          in_axes=(0, nn.broadcast, nn.broadcast, nn.broadcast),
          length=c.num_hidden_layers,
      )
      self.layers = scanned(c, name="layers", **kw)
    else:
      layer = remat_module(LlamaDecoderLayer, c.remat)
      self.layers = [layer(c, name=f"layers_{i}", **kw) for i in range(c.num_hidden_layers)]
    self.norm = RMSNorm(c.rms_norm_eps, name="norm", **kw)

  def __call__(self, input_ids, mask, positions, cache=None, index=0):
    x = self.embed_tokens(input_ids)
    if self.config.scan_layers:
      x, cache = self.layers(x, cache, positions, mask, index)
    else:
      new = []
      for i, layer in enumerate(self.layers):
        x, ci = layer(x, None if cache is None else cache[i], positions, mask, index)
        new.append(ci)
      cache = None if cache is None else tuple(new)
    return self.norm(x), cache

  def logits_tied(self, x):
    return self.embed_tokens.attend(x)


class LlamaForCausalLM(nn.Module):
  """Llama-family causal LM.

  Call with ``input_ids`` (b, s) and an optional ``attention_mask`` of 1/0.
  Without a cache the mask is (b, s), and it may hold segment ids instead
  (0 = padding, 1, 2, ... = examples packed into the row): each example then
  attends only to itself and its positions restart at 0; attention then runs through
  :func:`jax_lora.models.attention.dot_product_attention` with ``config.attention``
  ("blockwise" keeps no (s x s) tensor per head). With a ``cache`` (from :func:`init_cache`)
  the mask covers all cache slots (b, t) and the tokens fill slots
  ``index..index+s-1``. Positions are counted from the mask, so left and right
  padding both work. Returns ``(logits, cache)``: float32 logits (b, s, vocab)
  and the updated cache (None when none was given).

  For a loss that never holds every position's logits at once (see
  :func:`jax_lora.losses.chunked_token_nll`), ``method="hidden_states"`` returns
  the final-norm hidden states and ``method="lm_logits"`` applies only the LM
  head (tied embedding or ``lm_head``) to hidden states.
  """

  config: LlamaConfig  # architecture
  dtype: Any = jnp.float32  # compute dtype (e.g. jnp.bfloat16)
  param_dtype: Any = jnp.float32  # parameter dtype at init

  def setup(self):
    c = self.config
    self.model = LlamaModel(c, dtype=self.dtype, param_dtype=self.param_dtype, name="model")
    if not c.tie_word_embeddings:
      self.lm_head = _dense(c.vocab_size, "lm_head", False, self.dtype, self.param_dtype)

  def __call__(self, input_ids, attention_mask=None, cache=None, index=0, logits_index=None):
    """``logits_index`` (b, k) int, optional: compute logits only at these positions
    (returns (b, k, vocab)); training on completions skips most of the LM head."""
    x, cache = self._trunk(input_ids, attention_mask, cache, index, logits_index)
    return self.lm_logits(x), cache

  def hidden_states(self, input_ids, attention_mask=None, logits_index=None):
    """Final-norm hidden states (b, s, d), or (b, k, d) at ``logits_index``; no LM head, no cache."""
    return self._trunk(input_ids, attention_mask, None, 0, logits_index)[0]

  def lm_logits(self, hidden):
    """The LM head alone: hidden states (..., d) -> logits (..., vocab), float32 (float64 for float64 models)."""
    lead = hidden.shape[:-1]
    x = hidden.reshape(-1, hidden.shape[-1])
    logits = self.model.logits_tied(x) if self.config.tie_word_embeddings else self.lm_head(x)
    return logits.reshape(*lead, -1).astype(logits_dtype(self.dtype))

  def _trunk(self, input_ids, attention_mask, cache, index, logits_index):
    mask, positions = mask_and_positions(input_ids, attention_mask, cache, index)
    x, cache = self.model(input_ids, mask, positions, cache, index)
    if logits_index is not None:
      x = jnp.take_along_axis(x, logits_index[..., None], axis=1)
    return x, cache


def logits_dtype(dtype) -> Any:
  """float64 logits for a float64 model, else float32."""
  return jnp.float64 if jnp.dtype(dtype) == jnp.float64 else jnp.float32


def init_cache(config: LlamaConfig, batch: int, max_len: int, dtype=jnp.float32):
  """Zero key/value cache: per-layer {"k", "v"} of (b, t, kv, d) in a tuple, or stacked when scanned."""
  shape = (batch, max_len, config.num_key_value_heads, config.head_dim)
  if config.scan_layers:
    shape = (config.num_hidden_layers, *shape)
    return {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)}
  return tuple({"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)} for _ in range(config.num_hidden_layers))


# ----------------------------------------------------------------------------- HF names

_LINEAR = re.compile(r"(self_attn/[qkvo]_proj|mlp/(gate|up|down)_proj|lm_head)/kernel")


def hf_key_to_path(key: str) -> str:
  """Hugging Face state-dict key → Flax parameter path (unscanned layout).

  >>> hf_key_to_path("model.layers.0.self_attn.q_proj.weight")
  'model/layers_0/self_attn/q_proj/kernel'
  """
  m = re.fullmatch(r"(model\.layers\.(\d+)\.)?([\w.]+)\.(weight|bias)", key)
  if m is None:
    raise ValueError(f"unknown Llama parameter key {key!r}; expected '<module>.weight' or '<module>.bias'")
  prefix = f"model/layers_{m.group(2)}/" if m.group(1) else ""
  module, kind = m.group(3).replace(".", "/"), m.group(4)
  if kind == "bias":
    leaf = "bias"
  elif module.endswith("embed_tokens"):
    leaf = "embedding"
  elif module.endswith("norm"):
    leaf = "weight"
  else:
    leaf = "kernel"
  return f"{prefix}{module}/{leaf}"


def path_to_hf_key(path: str) -> str:
  """Flax parameter path → Hugging Face key; inverse of :func:`hf_key_to_path`.

  >>> path_to_hf_key("model/layers_0/self_attn/q_proj/kernel")
  'model.layers.0.self_attn.q_proj.weight'
  """
  parts = path.split("/")
  leaf = {"kernel": "weight", "embedding": "weight", "weight": "weight", "bias": "bias"}.get(parts[-1])
  if leaf is None:
    raise ValueError(f"unknown parameter leaf in {path!r}; expected kernel, bias, embedding or weight")
  mods = [re.sub(r"^layers_(\d+)$", r"layers.\1", p) for p in parts[:-1]]
  return ".".join([*mods, leaf])


def to_flax(key: str, array):
  """HF (key, tensor) → (Flax path, array): Linear weights (out, in) become (in, out) kernels."""
  path = hf_key_to_path(key)
  return path, (array.T if _LINEAR.search(path) else array)


def to_hf(path: str, array):
  """Flax (path, array) → HF (key, tensor); inverse of :func:`to_flax`."""
  return path_to_hf_key(path), (array.T if _LINEAR.search(path) else array)


def stack_layers(flat: Mapping[str, Any], num_layers: int) -> dict[str, Any]:
  """``{path: array}`` with ``model/layers_{i}/…`` → scanned ``model/layers/…`` stacked on axis 0."""
  out, groups = {}, {}
  for path, a in flat.items():
    m = re.fullmatch(r"model/layers_(\d+)/(.+)", path)
    if m is None:
      out[path] = a
    else:
      groups.setdefault(m.group(2), {})[int(m.group(1))] = a
  for rest, per in groups.items():
    if sorted(per) != list(range(num_layers)):
      raise ValueError(f"layers for {rest!r} are {sorted(per)}; expected 0..{num_layers - 1}")
    xp = np if isinstance(per[0], np.ndarray) else jnp
    out[f"model/layers/{rest}"] = xp.stack([per[i] for i in range(num_layers)])
  return out


def unstack_layers(flat: Mapping[str, Any]) -> dict[str, Any]:
  """Inverse of :func:`stack_layers`."""
  out = {}
  for path, a in flat.items():
    m = re.fullmatch(r"model/layers/(.+)", path)
    if m is None:
      out[path] = a
    else:
      for i in range(a.shape[0]):
        out[f"model/layers_{i}/{m.group(1)}"] = a[i]
  return out
