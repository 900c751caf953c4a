"""Llama-family decoders (Llama 2/3.x, SmolLM2, Mistral, Qwen2, Qwen3, Gemma 2/3 text) in Flax Linen.

One module covers the family; the config switches on what differs: RoPE scaling
(``linear``, ``llama3``, ``yarn``), sliding-window layers (Mistral, Qwen, Gemma's
interleaved local/global layers with their own RoPE bases), per-head q/k RMSNorm
(Qwen3, Gemma 3), Gemma's ``(1 + w)`` RMSNorm with pre/post norms around attention
and MLP, GeGLU, √d-scaled embeddings, ``query_pre_attn_scalar`` and logit soft-capping.

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
import functools
import math
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

_ARCHITECTURES = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
    "gemma2": "Gemma2ForCausalLM",
    "gemma3_text": "Gemma3ForCausalLM",
}
_GEMMA = ("gemma2", "gemma3_text")
_ACTIVATIONS = ("silu", "gelu_pytorch_tanh", "gelu")
# RoPE types we compute, each with the parameter keys it reads (besides rope_type/type/rope_theta).
ROPE_TYPES = {
    "default": frozenset(),
    "linear": frozenset({"factor"}),
    "llama3": frozenset({"factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"}),
    "yarn": frozenset({"factor", "original_max_position_embeddings", "attention_factor", "beta_fast", "beta_slow",
                       "mscale", "mscale_all_dim", "truncate"}),
}
_ROPE_COMMON = frozenset({"rope_type", "type", "rope_theta"})
LAYER_TYPES = ("full_attention", "sliding_attention")


@dataclasses.dataclass(frozen=True, kw_only=True)
class LlamaConfig:
  """Architecture of a Llama-family causal language model."""

  vocab_size: int  # number of token embeddings
  hidden_size: int  # model width d
  intermediate_size: int  # gated MLP width
  num_hidden_layers: int  # decoder layers
  num_attention_heads: int  # query heads
  num_key_value_heads: int  # key/value heads (GQA when fewer than query heads)
  head_dim: int  # width of one head
  rms_norm_eps: float = 1e-6  # RMSNorm epsilon
  rope_theta: float = 10000.0  # RoPE base frequency (global / full-attention layers)
  # RoPE scaling of the full-attention layers: one of ROPE_TYPES and its parameters as sorted (key, value) pairs.
  rope_type: str = "default"
  rope_scaling: tuple[tuple[str, Any], ...] = ()
  rope_local_theta: float | None = None  # RoPE base of sliding-window layers (Gemma), default rope_theta
  max_position_embeddings: int = 2048  # longest sequence the model was trained for
  tie_word_embeddings: bool = False  # lm_head shares the token embedding
  qkv_bias: bool = False  # biases on q/k/v projections (Qwen2, or Llama attention_bias)
  o_bias: bool = False  # bias on the output projection (Llama attention_bias)
  mlp_bias: bool = False  # biases on gate/up/down projections
  hidden_act: str = "silu"  # MLP gate activation: silu (SwiGLU), gelu_pytorch_tanh (GeGLU), gelu
  sliding_window: int | None = None  # a query sees keys less than this many tokens back, on sliding layers
  layer_types: tuple[str, ...] | None = None  # per layer "full_attention" / "sliding_attention" (None: all full)
  qk_norm: bool = False  # RMSNorm over each q and k head before RoPE (Qwen3, Gemma 3)
  norm_offset: float = 0.0  # RMSNorm scales by (norm_offset + weight): 1.0 for Gemma
  sandwich_norms: bool = False  # Gemma: norms after attention and MLP too (pre/post_feedforward_layernorm)
  embed_scale: bool = False  # Gemma: embeddings times sqrt(hidden_size), rounded to the embedding dtype
  query_pre_attn_scalar: float | None = None  # attention scale is this ** -0.5 (default head_dim)
  attn_logit_softcapping: float | None = None  # scores -> c * tanh(scores / c) (Gemma 2)
  final_logit_softcapping: float | None = None  # logits -> c * tanh(logits / c) (Gemma 2)
  scan_layers: bool = False  # stack the layers with nn.scan (params get a leading layer axis)
  model_type: str = "llama"  # Hugging Face model_type this config came from / is saved as
  attention: str = "auto"  # training/scoring attention kernel (see models.attention); not saved to config.json
  # Gradient checkpointing of each decoder layer: "none", "full", "dots" or "offload" (see
  # jax_lora.remat). A training setting: never written to config.json.
  remat: str = "none"

  def __post_init__(self):
    check_implementation(self.attention)
    check_policy(self.remat, "LlamaConfig.remat")
    if self.hidden_act not in _ACTIVATIONS:
      raise ValueError(f"hidden activation {self.hidden_act!r} is not supported; use one of {', '.join(_ACTIVATIONS)}")
    rope_frequencies(self.head_dim, self.rope_theta, self.rope_type, dict(self.rope_scaling))  # validates
    if self.layer_types is not None:
      bad = [t for t in self.layer_types if t not in LAYER_TYPES]
      if bad or len(self.layer_types) != self.num_hidden_layers:
        raise ValueError(f"layer_types must be {self.num_hidden_layers} of {LAYER_TYPES}, got {self.layer_types}")
    if self.attention == "xla" and self.attn_logit_softcapping is not None:
      raise ValueError("attention='xla' has no logit soft-capping (attn_logit_softcapping); use 'naive' or 'blockwise'")
    if self.sliding_window is not None and self.sliding_window < 1:
      raise ValueError(f"sliding_window must be >= 1 or None, got {self.sliding_window}")

  def layer_windows(self) -> tuple[int | None, ...]:
    """Each layer's sliding window (None for full attention)."""
    types = self.layer_types or ("full_attention",) * self.num_hidden_layers
    return tuple(self.sliding_window if t == "sliding_attention" else None for t in types)

  def layer_rope(self) -> tuple[np.ndarray, np.ndarray]:
    """Each layer's RoPE inverse frequencies (layers, head_dim/2) and cos/sin factor (layers,), float32."""
    glob = rope_frequencies(self.head_dim, self.rope_theta, self.rope_type, dict(self.rope_scaling))
    local = glob if self.rope_local_theta is None else rope_frequencies(self.head_dim, self.rope_local_theta, "default", {})
    per = [local if w is not None else glob for w in self.layer_windows()]
    return np.stack([p[0] for p in per]), np.asarray([p[1] for p in per], np.float32)

  @classmethod
  def from_hf_config(cls, hf: Mapping[str, Any], **overrides) -> LlamaConfig:
    """Builds the config from a Hugging Face ``config.json`` dict (llama, mistral, qwen2, qwen3,
    gemma2, gemma3_text); ``rope_parameters`` (transformers 5) or ``rope_scaling`` (older).

    Args:
      hf: the parsed ``config.json``.
      **overrides: fields to set on top, e.g. ``scan_layers=True``.
    """
    model_type = hf.get("model_type", "llama")
    if model_type not in _ARCHITECTURES:
      raise ValueError(f"model_type {model_type!r} is not a Llama-family type; supported: {sorted(_ARCHITECTURES)}")
    gemma = model_type in _GEMMA
    heads = hf["num_attention_heads"]
    n_layers = hf["num_hidden_layers"]
    window, layer_types = _sliding(hf, model_type, n_layers)
    rope_full, rope_local = _rope_sections(hf, model_type)
    theta = float(rope_full.get("rope_theta", hf.get("rope_theta", 1e6 if gemma else 10000.0)))
    rope_type = rope_full.get("rope_type", rope_full.get("type", "default"))
    if rope_type not in ROPE_TYPES:
      raise ValueError(f"rope type {rope_type!r} is not supported; supported: {', '.join(ROPE_TYPES)}")
    scaling = {k: v for k, v in rope_full.items() if k not in _ROPE_COMMON}
    if scaling.get("partial_rotary_factor", 1.0) == 1.0:
      scaling.pop("partial_rotary_factor", None)
    if rope_type in ("llama3", "yarn"):
      scaling.setdefault("original_max_position_embeddings", hf.get("max_position_embeddings", 2048))
    local_theta = None
    if rope_local is not None:
      local_type = rope_local.get("rope_type", rope_local.get("type", "default"))
      extra = sorted(set(rope_local) - _ROPE_COMMON)
      if local_type != "default" or extra:
        raise ValueError(f"RoPE of sliding layers {rope_local} is not supported; only default RoPE with a rope_theta")
      local_theta = float(rope_local.get("rope_theta", hf.get("rope_local_base_freq", 10000.0)))
    act = hf.get("hidden_activation") if gemma else hf.get("hidden_act", "silu")
    attn_bias = bool(hf.get("attention_bias", False))
    kw = dict(
        vocab_size=hf["vocab_size"],
        hidden_size=hf["hidden_size"],
        intermediate_size=hf["intermediate_size"],
        num_hidden_layers=n_layers,
        num_attention_heads=heads,
        num_key_value_heads=hf.get("num_key_value_heads") or heads,
        head_dim=hf.get("head_dim") or hf["hidden_size"] // heads,
        rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
        rope_theta=theta,
        rope_type=rope_type,
        rope_scaling=tuple(sorted(scaling.items())),
        rope_local_theta=local_theta,
        max_position_embeddings=hf.get("max_position_embeddings", 2048),
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", gemma)),
        qkv_bias=attn_bias or model_type == "qwen2",
        o_bias=attn_bias and model_type != "qwen2",
        mlp_bias=bool(hf.get("mlp_bias", False)),
        hidden_act=act or "gelu_pytorch_tanh",
        sliding_window=window,
        layer_types=layer_types,
        qk_norm=model_type in ("qwen3", "gemma3_text"),
        norm_offset=1.0 if gemma else 0.0,
        sandwich_norms=gemma,
        embed_scale=gemma,
        query_pre_attn_scalar=float(hf.get("query_pre_attn_scalar", 256)) if gemma else None,
        attn_logit_softcapping=hf.get("attn_logit_softcapping") if gemma else None,
        final_logit_softcapping=hf.get("final_logit_softcapping") if gemma else None,
        model_type=model_type,
    )
    kw.update(overrides)
    return cls(**kw)

  def to_hf_config(self) -> dict[str, Any]:
    """A Hugging Face ``config.json`` dict for this architecture."""
    gemma = self.model_type in _GEMMA
    rope = {"rope_type": self.rope_type, "rope_theta": self.rope_theta, **dict(self.rope_scaling)}
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
        "hidden_activation" if gemma else "hidden_act": self.hidden_act,
        "rms_norm_eps": self.rms_norm_eps,
        "rope_theta": self.rope_theta,
        "rope_parameters": rope,
        "max_position_embeddings": self.max_position_embeddings,
        "tie_word_embeddings": self.tie_word_embeddings,
    }
    if self.model_type not in _GEMMA + ("qwen2", "qwen3", "mistral"):
      out["mlp_bias"] = self.mlp_bias
    if self.layer_types is not None:
      out["layer_types"] = list(self.layer_types)
    if self.model_type in ("qwen2", "qwen3"):
      out["use_sliding_window"] = self.sliding_window is not None
      out["sliding_window"] = self.sliding_window
      out["max_window_layers"] = self.num_hidden_layers
    elif self.model_type == "mistral" or gemma:
      out["sliding_window"] = self.sliding_window
    if gemma:
      out["rope_parameters"] = {"full_attention": rope, "sliding_attention": {
          "rope_type": "default", "rope_theta": self.rope_theta if self.rope_local_theta is None else self.rope_local_theta}}
      out.pop("rope_theta")
      scalar = self.query_pre_attn_scalar
      out["query_pre_attn_scalar"] = int(scalar) if float(scalar).is_integer() else scalar
      out["attn_logit_softcapping"] = self.attn_logit_softcapping
      out["final_logit_softcapping"] = self.final_logit_softcapping
    if self.model_type != "qwen2":
      if self.qkv_bias != self.o_bias:
        raise ValueError("Llama's attention_bias covers q, k, v and o together; use model_type='qwen2' for q/k/v only")
      out["attention_bias"] = self.qkv_bias
    return out


def _sliding(hf: Mapping[str, Any], model_type: str, n_layers: int) -> tuple[int | None, tuple[str, ...] | None]:
  """(sliding_window, layer_types) as transformers builds them for each model type."""
  window = hf.get("sliding_window")
  types = hf.get("layer_types")
  if model_type in ("llama",):
    return None, None
  if model_type in ("qwen2", "qwen3"):
    if not hf.get("use_sliding_window", False) or window is None:
      return None, None
    if types is None:
      start = hf.get("max_window_layers", 28)
      types = ["sliding_attention" if i >= start else "full_attention" for i in range(n_layers)]
  elif model_type == "mistral":
    if window is None:
      return None, None
    types = ["sliding_attention"] * n_layers  # MistralForCausalLM slides every layer (layer_types ignored)
  else:  # gemma
    if hf.get("use_bidirectional_attention"):
      raise ValueError("use_bidirectional_attention=true (an embedding model) is not supported; causal LMs only")
    if types is None:
      every = hf.get("sliding_window_pattern", hf.get("_sliding_window_pattern", 2 if model_type == "gemma2" else 6))
      types = ["sliding_attention" if (i + 1) % every else "full_attention" for i in range(n_layers)]
    if window is None:
      return None, None
  types = tuple(types)
  bad = sorted(set(types) - set(LAYER_TYPES))
  if bad:
    raise ValueError(f"layer type {bad[0]!r} is not supported; supported: {', '.join(LAYER_TYPES)}")
  return int(window), (types if "sliding_attention" in types else None)


def _rope_sections(hf: Mapping[str, Any], model_type: str) -> tuple[dict, dict | None]:
  """(RoPE parameters of full-attention layers, of sliding layers or None when they share them)."""
  rope = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
  if model_type not in _GEMMA:
    if set(rope) & set(LAYER_TYPES):
      raise ValueError(f"per-layer-type rope_parameters are not supported for {model_type}")
    return rope, None
  if set(rope) & set(LAYER_TYPES):  # transformers 5: {"full_attention": {...}, "sliding_attention": {...}}
    unknown = sorted(set(rope) - set(LAYER_TYPES))
    if unknown:
      raise ValueError(f"rope_parameters key {unknown[0]!r} is not supported next to per-layer-type sections")
    full = dict(rope.get("full_attention") or {})
    local = dict(rope.get("sliding_attention") or {})
    full.setdefault("rope_theta", hf.get("rope_theta", 1e6))
    local.setdefault("rope_theta", hf.get("rope_local_base_freq", 10000.0))
    return full, local
  # older Gemma configs: rope_scaling applies to global layers, rope_local_base_freq to local ones
  full = {**rope, "rope_theta": rope.get("rope_theta", hf.get("rope_theta", 1e6 if model_type == "gemma3_text" else 10000.0))}
  if model_type == "gemma2":
    return full, None
  return full, {"rope_type": "default", "rope_theta": hf.get("rope_local_base_freq", 10000.0)}


def rope_frequencies(head_dim: int, theta: float, rope_type: str, params: Mapping[str, Any]) -> tuple[np.ndarray, float]:
  """RoPE inverse frequencies (head_dim/2,) float32 and the cos/sin factor, as transformers computes them.

  ``rope_type`` is one of :data:`ROPE_TYPES`; ``params`` holds its parameters
  (``factor``, ...). An unknown type or parameter is an error naming it.

  >>> inv, factor = rope_frequencies(4, 10000.0, "linear", {"factor": 2.0})
  >>> inv.tolist(), factor
  ([0.5, 0.004999999888241291], 1.0)
  """
  if rope_type not in ROPE_TYPES:
    raise ValueError(f"rope type {rope_type!r} is not supported; supported: {', '.join(ROPE_TYPES)}")
  unknown = sorted(set(params) - ROPE_TYPES[rope_type] - _ROPE_COMMON)
  if unknown:
    raise ValueError(f"rope parameter {unknown[0]!r} is not supported for rope type {rope_type!r}")
  need = {"linear": ("factor",), "llama3": ("factor", "low_freq_factor", "high_freq_factor",
                                            "original_max_position_embeddings"),
          "yarn": ("factor", "original_max_position_embeddings")}.get(rope_type, ())
  missing = [k for k in need if params.get(k) is None]
  if missing:
    raise ValueError(f"rope type {rope_type!r} needs {missing[0]!r} in rope_parameters")
  d = head_dim
  exps = np.arange(0, d, 2, dtype=np.float32) / np.float32(d)
  pos_freqs = np.float32(theta) ** exps
  inv = (np.float32(1.0) / pos_freqs).astype(np.float32)
  if rope_type == "default":
    return inv, 1.0
  factor = float(params["factor"])
  if rope_type == "linear":
    return (inv / np.float32(factor)).astype(np.float32), 1.0
  if rope_type == "llama3":
    low, high = float(params["low_freq_factor"]), float(params["high_freq_factor"])
    old = float(params["original_max_position_embeddings"])
    low_wavelen, high_wavelen = old / low, old / high
    wavelen = (np.float32(2 * math.pi) / inv).astype(np.float32)
    inv_l = np.where(wavelen > low_wavelen, inv / np.float32(factor), inv).astype(np.float32)
    smooth = ((np.float32(old) / wavelen - np.float32(low)) / np.float32(high - low)).astype(np.float32)
    smoothed = (1 - smooth) * inv_l / np.float32(factor) + smooth * inv_l
    medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
    return np.where(medium, smoothed, inv_l).astype(np.float32), 1.0
  # yarn
  orig = params["original_max_position_embeddings"]
  attn = params.get("attention_factor")

  def get_mscale(scale, m=1.0):
    return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

  if attn is None:
    m, m_all = params.get("mscale"), params.get("mscale_all_dim")
    attn = float(get_mscale(factor, m) / get_mscale(factor, m_all)) if m and m_all else get_mscale(factor)
  beta_fast, beta_slow = params.get("beta_fast") or 32, params.get("beta_slow") or 1

  def corr_dim(rot):
    return (d * math.log(orig / (rot * 2 * math.pi))) / (2 * math.log(theta))

  lo, hi = corr_dim(beta_fast), corr_dim(beta_slow)
  if params.get("truncate", True):
    lo, hi = math.floor(lo), math.ceil(hi)
  lo, hi = max(lo, 0), min(hi, d - 1)
  if lo == hi:
    hi += 0.001
  ramp = np.clip((np.arange(d // 2, dtype=np.float32) - np.float32(lo)) / np.float32(hi - lo), 0, 1).astype(np.float32)
  extra = (1 - ramp).astype(np.float32)
  interp = (np.float32(1.0) / (np.float32(factor) * pos_freqs)).astype(np.float32)
  return (interp * (1 - extra) + inv * extra).astype(np.float32), float(attn)


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


def rope(x: jax.Array, positions: jax.Array, inv_freq, factor=1.0) -> jax.Array:
  """Rotary embedding in Hugging Face's ``rotate_half`` layout. x: (b, s, h, d); positions (b, s);
  ``inv_freq`` (d/2,) from :func:`rope_frequencies`; cos and sin are multiplied by ``factor`` (YaRN)."""
  d = x.shape[-1]
  ang = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq, jnp.float32)[None, None, :]  # (b, s, d/2)
  ang = jnp.concatenate([ang, ang], axis=-1)[:, :, None, :]
  cos, sin = jnp.cos(ang) * factor, jnp.sin(ang) * factor
  cos, sin = cos.astype(x.dtype), sin.astype(x.dtype)
  x1, x2 = x[..., : d // 2], x[..., d // 2 :]
  return x * cos + jnp.concatenate([-x2, x1], axis=-1) * sin


def allowed_mask(mask: jax.Array, s: int, index, window=None) -> jax.Array:
  """(b, s, t) causal-and-padding mask for queries in slots index..index+s-1 over key slots 0..t-1.

  ``mask`` (b, t) is 0 at padding; without a cache (``s == t``) its positive
  values are segment ids and a query sees only keys of its own segment, so
  examples packed into one row do not attend to each other. With a ``window``
  a query sees only keys fewer than ``window`` slots back.
  """
  t = mask.shape[-1]
  qpos = index + jnp.arange(s)
  causal = jnp.arange(t)[None, :] <= qpos[:, None]
  if window is not None:
    causal &= qpos[:, None] - jnp.arange(t)[None, :] < window
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
  """RMSNorm computed in float32 as Hugging Face does; parameter ``weight``, scale ``offset + weight``."""

  eps: float  # added to the mean square
  dtype: Any = jnp.float32  # output dtype
  param_dtype: Any = jnp.float32  # weight dtype
  offset: float = 0.0  # 1.0 for Gemma's (1 + w) norms (weight initialized to 0)

  @nn.compact
  def __call__(self, x):
    init = nn.initializers.zeros if self.offset else nn.initializers.ones
    w = self.param("weight", init, (x.shape[-1],), self.param_dtype)
    xf = x.astype(jnp.float32)
    xf = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.eps)
    scale = w.astype(jnp.float32) + self.offset if self.offset else w.astype(jnp.float32)
    return (scale.reshape((1,) * (x.ndim - 1) + (-1,)) * xf).astype(self.dtype)


def _dense(features: int, name: str, use_bias: bool, dtype, param_dtype) -> nn.Dense:
  return nn.Dense(features, use_bias=use_bias, dtype=dtype, param_dtype=param_dtype, name=name)


_NO_WINDOW = 1 << 30  # a window no sequence reaches (scanned layers mixing sliding and full attention)


def layer_info(config: LlamaConfig, i: int) -> dict[str, Any]:
  """Layer ``i``'s RoPE inverse frequencies, cos/sin factor and sliding window (None: full attention)."""
  inv, factor = config.layer_rope()
  return {"inv_freq": inv[i], "factor": float(factor[i]), "window": config.layer_windows()[i]}


def _scanned_info(config: LlamaConfig) -> dict[str, Any] | None:
  """Per-layer info stacked for ``nn.scan``; None when every layer is the same (then it stays static)."""
  inv, factor = config.layer_rope()
  windows = config.layer_windows()
  if len(set(windows)) == 1 and (inv == inv[0]).all() and (factor == factor[0]).all():
    return None
  return {"inv_freq": jnp.asarray(inv), "factor": jnp.asarray(factor),
          "window": jnp.asarray([_NO_WINDOW if w is None else w for w in windows], jnp.int32)}


class LlamaAttention(nn.Module):
  config: LlamaConfig
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, positions, mask, cache, index, layer):
    c = self.config
    b, s, _ = x.shape
    dt = (self.dtype, self.param_dtype)
    nq, nkv, hd = c.num_attention_heads, c.num_key_value_heads, c.head_dim
    q = project(_dense(nq * hd, "q_proj", c.qkv_bias, *dt), x).reshape(b, s, nq, hd)
    k = project(_dense(nkv * hd, "k_proj", c.qkv_bias, *dt), x).reshape(b, s, nkv, hd)
    v = project(_dense(nkv * hd, "v_proj", c.qkv_bias, *dt), x).reshape(b, s, nkv, hd)
    if c.qk_norm:
      q = RMSNorm(c.rms_norm_eps, *dt, offset=c.norm_offset, name="q_norm")(q)
      k = RMSNorm(c.rms_norm_eps, *dt, offset=c.norm_offset, name="k_norm")(k)
    q, k = (rope(t, positions, layer["inv_freq"], layer["factor"]) for t in (q, k))
    scale = None if c.query_pre_attn_scalar is None else c.query_pre_attn_scalar ** -0.5
    kw = dict(scale=scale, softcap=c.attn_logit_softcapping)
    if cache is None:  # training / scoring: the mask holds segment ids
      out = dot_product_attention(q, k, v, mask, implementation=c.attention, window=layer["window"], **kw)
    else:
      k, v, cache = cache_update(cache, k, v, index)
      out = attend(q, k.astype(q.dtype), v.astype(q.dtype), allowed_mask(mask, s, index, layer["window"]), **kw)
    out = project(_dense(c.hidden_size, "o_proj", c.o_bias, *dt), out.reshape(b, s, nq * hd))
    return out, cache


_ACT = {"silu": nn.silu, "gelu_pytorch_tanh": functools.partial(nn.gelu, approximate=True),
        "gelu": functools.partial(nn.gelu, approximate=False)}


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
    act = _ACT[c.hidden_act]
    h = act(_dense(c.intermediate_size, "gate_proj", *dt)(x)) * _dense(c.intermediate_size, "up_proj", *dt)(x)
    return _dense(c.hidden_size, "down_proj", *dt)(h).reshape(*lead, -1)


class LlamaDecoderLayer(nn.Module):
  """Pre-norm decoder layer. The (x, cache, ...) order lets nn.scan carry x and scan the cache.

  ``layer`` (RoPE frequencies and window) is passed when scanned over mixed layers;
  otherwise it is the static :func:`layer_info` of ``layer_idx``.
  """

  config: LlamaConfig
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  layer_idx: int = 0

  @nn.compact
  def __call__(self, x, cache, positions, mask, index, layer=None):
    c, kw = self.config, dict(dtype=self.dtype, param_dtype=self.param_dtype)
    if layer is None:
      layer = layer_info(c, self.layer_idx)
    norm = functools.partial(RMSNorm, c.rms_norm_eps, offset=c.norm_offset, **kw)
    x = tag_layer_input(x)
    h = norm(name="input_layernorm")(x)
    h, cache = LlamaAttention(c, name="self_attn", **kw)(h, positions, mask, cache, index, layer)
    if c.sandwich_norms:  # Gemma: post_attention_layernorm normalizes the attention output
      x = x + norm(name="post_attention_layernorm")(h)
      h = LlamaMLP(c, name="mlp", **kw)(norm(name="pre_feedforward_layernorm")(x))
      return x + norm(name="post_feedforward_layernorm")(h), cache
    x = x + h
    h = norm(name="post_attention_layernorm")(x)
    return x + LlamaMLP(c, name="mlp", **kw)(h), cache


class LlamaModel(nn.Module):
  config: LlamaConfig
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  def setup(self):
    c, kw = self.config, dict(dtype=self.dtype, param_dtype=self.param_dtype)
    self.embed_tokens = nn.Embed(c.vocab_size, c.hidden_size, name="embed_tokens", **kw)
    if c.scan_layers:
      self.scanned_info = _scanned_info(c)
      scanned = nn.scan(
          remat_module(LlamaDecoderLayer, c.remat, scan=True),
          variable_axes={"params": 0},
          split_rngs={"params": True},
          in_axes=(0, nn.broadcast, nn.broadcast, nn.broadcast, 0),
          length=c.num_hidden_layers,
      )
      self.layers = scanned(c, name="layers", **kw)
    else:
      layer = remat_module(LlamaDecoderLayer, c.remat)
      self.layers = [layer(c, name=f"layers_{i}", layer_idx=i, **kw) for i in range(c.num_hidden_layers)]
    self.norm = RMSNorm(c.rms_norm_eps, name="norm", offset=c.norm_offset, **kw)

  def __call__(self, input_ids, mask, positions, cache=None, index=0):
    x = self.embed_tokens(input_ids)
    if self.config.embed_scale:  # Gemma: sqrt(d) rounded to the embedding dtype, as transformers does
      x = x * jnp.asarray(self.config.hidden_size ** 0.5, self.param_dtype).astype(x.dtype)
    if self.config.scan_layers:
      x, cache = self.layers(x, cache, positions, mask, index, self.scanned_info)
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
    logits = logits.reshape(*lead, -1).astype(logits_dtype(self.dtype))
    cap = self.config.final_logit_softcapping
    return logits if cap is None else jnp.tanh(logits / cap) * cap

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
