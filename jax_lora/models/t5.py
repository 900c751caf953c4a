"""T5 / FLAN-T5 encoder–decoder in Flax Linen, with Hugging Face parameter names.

Every projection is a plain ``nn.Dense`` named like the Hugging Face module, so
PEFT's ``target_modules=["q", "v"]`` is the LoRA target list ``("q", "v")`` and
selects the same modules (self- and cross-attention of both stacks):

- ``shared/embedding`` (the token embedding of both stacks)
- ``{encoder,decoder}/block_{i}/layer_0/SelfAttention/{q,k,v,o}/kernel``,
  ``.../block_0/layer_0/SelfAttention/relative_attention_bias/embedding`` (first block only)
- ``decoder/block_{i}/layer_1/EncDecAttention/{q,k,v,o}/kernel`` (cross-attention)
- ``.../layer_{1|2}/DenseReluDense/{wi,wo}/kernel`` (v1.0, ReLU) or
  ``{wi_0,wi_1,wo}`` (v1.1 / FLAN-T5, gated GELU)
- ``.../layer_{j}/layer_norm/weight``, ``{encoder,decoder}/final_layer_norm/weight``
- ``lm_head/kernel`` (untied head only)

T5 v1.0 ties the head to ``shared`` and scales the decoder output by
``d_model**-0.5`` first; v1.1 / FLAN-T5 have an untied ``lm_head`` and no scaling.
Attention is unscaled, with a learned relative-position bias (bucketed,
bidirectional in the encoder, causal in the decoder) from the first block of each
stack added to every block's self-attention scores; layer norms are scale-only.
Dropout (``dropout_rate``) is not applied: LoRA has its own dropout.

Relative positions are differences of slot indices, so left or right padding
gives the same logits at real tokens.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jax_lora.remat import check_policy, remat_module, tag_layer_input

__all__ = [
    "T5Config",
    "T5ForConditionalGeneration",
    "init_cache",
    "relative_position_bucket",
    "hf_key_to_path",
    "path_to_hf_key",
    "to_flax",
    "to_hf",
    "ignored_hf_keys",
    "config_for_state",
]

_ACTS = {  # feed_forward_proj → (gated, activation) as Hugging Face's T5Config reads it
    "relu": (False, jax.nn.relu),
    "gated-gelu": (True, lambda x: jax.nn.gelu(x, approximate=True)),  # HF: dense_act_fn "gelu_new"
}
_NEG = -1e30  # finite "minus infinity" for masked scores


@dataclasses.dataclass(frozen=True, kw_only=True)
class T5Config:
  """Architecture of a T5 encoder–decoder (T5 v1.0, T5 v1.1, FLAN-T5)."""

  vocab_size: int  # number of token embeddings (shared by encoder, decoder and tied head)
  d_model: int  # model width
  d_kv: int  # width of one attention head
  d_ff: int  # feed-forward width
  num_layers: int  # encoder blocks
  num_decoder_layers: int  # decoder blocks
  num_heads: int  # attention heads
  relative_attention_num_buckets: int = 32  # relative-position buckets
  relative_attention_max_distance: int = 128  # distance from which all positions share the last bucket
  layer_norm_epsilon: float = 1e-6  # epsilon of the scale-only layer norms
  feed_forward_proj: str = "relu"  # "relu" (v1.0: wi, wo) or "gated-gelu" (v1.1/FLAN: wi_0, wi_1, wo)
  tie_word_embeddings: bool = True  # the head is ``shared`` (else its own ``lm_head``)
  scale_decoder_outputs: bool = True  # multiply the decoder output by d_model**-0.5 before the head
  pad_token_id: int = 0  # padding id
  eos_token_id: int = 1  # end-of-sequence id
  decoder_start_token_id: int = 0  # first decoder input
  model_type: str = "t5"  # Hugging Face model_type
  attention: str = "auto"  # only "auto": the relative-position bias needs the plain attention; not saved
  # Gradient checkpointing of each block: "none", "full", "dots" or "offload" (see jax_lora.remat).
  # A training setting: never written to config.json.
  remat: str = "none"

  def __post_init__(self):
    if self.feed_forward_proj not in _ACTS:
      raise ValueError(f"feed_forward_proj {self.feed_forward_proj!r} is not supported; use one of {sorted(_ACTS)}")
    if self.attention != "auto":
      raise ValueError(f"T5 attention {self.attention!r} is not supported; T5 adds a relative-position bias "
                       "inside attention, so only attention='auto' (plain attention) is")
    check_policy(self.remat, "T5Config.remat")

  @property
  def is_encoder_decoder(self) -> bool:
    return True

  @classmethod
  def from_hf_config(cls, hf: Mapping[str, Any], **overrides) -> T5Config:
    """Builds the config from a Hugging Face T5 ``config.json`` dict.

    ``scale_decoder_outputs`` is read when present (transformers 5 writes it),
    else it follows ``tie_word_embeddings`` as in T5 v1.0 (tied, scaled) and v1.1 (untied, unscaled).
    """
    if hf.get("is_encoder_decoder", True) is False or hf.get("is_decoder"):
      raise ValueError("only T5 encoder–decoder configs are supported (is_encoder_decoder=true, is_decoder=false)")
    proj = hf.get("feed_forward_proj", "relu")
    if proj not in _ACTS:
      raise ValueError(f"feed_forward_proj {proj!r} is not supported; use one of {sorted(_ACTS)}")
    if not isinstance(hf.get("eos_token_id", 1), int):
      raise ValueError(f"eos_token_id {hf['eos_token_id']!r} is not supported; give one int in config.json")
    tie = bool(hf.get("tie_word_embeddings", True))
    scale = hf.get("scale_decoder_outputs")
    kw = dict(
        vocab_size=hf["vocab_size"],
        d_model=hf["d_model"],
        d_kv=hf["d_kv"],
        d_ff=hf["d_ff"],
        num_layers=hf["num_layers"],
        num_decoder_layers=hf.get("num_decoder_layers") or hf["num_layers"],
        num_heads=hf["num_heads"],
        relative_attention_num_buckets=hf.get("relative_attention_num_buckets", 32),
        relative_attention_max_distance=hf.get("relative_attention_max_distance", 128),
        layer_norm_epsilon=hf.get("layer_norm_epsilon", 1e-6),
        feed_forward_proj=proj,
        tie_word_embeddings=tie,
        scale_decoder_outputs=tie if scale is None else bool(scale),
        pad_token_id=hf.get("pad_token_id", 0),
        eos_token_id=hf.get("eos_token_id", 1),
        decoder_start_token_id=hf.get("decoder_start_token_id", hf.get("pad_token_id", 0)),
        model_type=hf.get("model_type", "t5"),
    )
    kw.update(overrides)
    return cls(**kw)

  def to_hf_config(self) -> dict[str, Any]:
    """A Hugging Face ``config.json`` dict for this architecture."""
    return {
        "architectures": ["T5ForConditionalGeneration"],
        "model_type": self.model_type,
        "is_encoder_decoder": True,
        "vocab_size": self.vocab_size,
        "d_model": self.d_model,
        "d_kv": self.d_kv,
        "d_ff": self.d_ff,
        "num_layers": self.num_layers,
        "num_decoder_layers": self.num_decoder_layers,
        "num_heads": self.num_heads,
        "relative_attention_num_buckets": self.relative_attention_num_buckets,
        "relative_attention_max_distance": self.relative_attention_max_distance,
        "layer_norm_epsilon": self.layer_norm_epsilon,
        "feed_forward_proj": self.feed_forward_proj,
        "dense_act_fn": "gelu_new" if self.feed_forward_proj == "gated-gelu" else "relu",
        "is_gated_act": _ACTS[self.feed_forward_proj][0],
        "tie_word_embeddings": self.tie_word_embeddings,
        "scale_decoder_outputs": self.scale_decoder_outputs,
        "pad_token_id": self.pad_token_id,
        "eos_token_id": self.eos_token_id,
        "decoder_start_token_id": self.decoder_start_token_id,
        "dropout_rate": 0.0,
    }


# ----------------------------------------------------------------------------- helpers


def relative_position_bucket(relative_position: np.ndarray, bidirectional: bool, num_buckets: int,
                             max_distance: int) -> np.ndarray:
  """Hugging Face's / Mesh TensorFlow's T5 bucket of ``memory - query`` positions, in numpy.

  The float32 operations are those of transformers' ``_relative_position_bucket``,
  so bucket edges round the same way. Small distances get a bucket each, larger
  ones logarithmic bins, everything from ``max_distance`` on the last bin.

  >>> relative_position_bucket(np.array([-200, -9, -1, 0, 1, 9, 200]), True, 32, 128).tolist()
  [15, 8, 1, 0, 17, 24, 31]
  """
  rel = np.asarray(relative_position, np.int64)
  out = np.zeros_like(rel)
  if bidirectional:
    num_buckets //= 2
    out += (rel > 0).astype(np.int64) * num_buckets
    n = np.abs(rel)
  else:
    n = -np.minimum(rel, 0)
  max_exact = num_buckets // 2
  with np.errstate(divide="ignore"):
    large = np.float32(max_exact) + (
        np.log(n.astype(np.float32) / np.float32(max_exact)) / np.float32(math.log(max_distance / max_exact))
        * np.float32(num_buckets - max_exact))
  large = np.minimum(np.where(n < max_exact, 0, large).astype(np.int64), num_buckets - 1)
  return out + np.where(n < max_exact, n, large)


def _project(layer: nn.Module, x: jax.Array) -> jax.Array:
  """A Dense on tokens flattened to (n, d) (XLA:CPU's fast GEMM path), leading axes restored."""
  return layer(x.reshape(-1, x.shape[-1])).reshape(*x.shape[:-1], -1)


def _logits_dtype(dtype) -> Any:
  return jnp.float64 if jnp.dtype(dtype) == jnp.float64 else jnp.float32


def _attend(q, k, v, bias, allowed):
  """Unscaled softmax attention: q (b, s, h, d), k/v (b, t, h, d), float32 bias (1|b, h, s, t), allowed (b, 1, s|1, t)."""
  scores = jnp.einsum("bshd,bthd->bhst", q, k)
  scores = scores.astype(jnp.promote_types(scores.dtype, jnp.float32))
  if bias is not None:
    scores = scores + bias.astype(scores.dtype)
  w = jax.nn.softmax(jnp.where(allowed, scores, _NEG), axis=-1).astype(v.dtype)
  return jnp.einsum("bhst,bthd->bshd", w, v)


# ----------------------------------------------------------------------------- modules


class T5LayerNorm(nn.Module):
  """Scale-only RMS layer norm (no mean, no bias), statistics in float32 (or wider); parameter ``weight``."""

  eps: float
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    w = self.param("weight", nn.initializers.ones, (x.shape[-1],), self.param_dtype)
    ft = jnp.promote_types(x.dtype, jnp.float32)
    xf = x.astype(ft)
    xf = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.eps)
    return (w.astype(ft) * xf).astype(self.dtype)


class T5Attention(nn.Module):
  """Projections ``q``, ``k``, ``v``, ``o`` and, in a stack's first block, ``relative_attention_bias``."""

  config: T5Config
  has_relative_attention_bias: bool = False
  bidirectional: bool = True
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  def setup(self):
    c, kw = self.config, dict(use_bias=False, dtype=self.dtype, param_dtype=self.param_dtype)
    inner = c.num_heads * c.d_kv
    self.q, self.k, self.v = nn.Dense(inner, **kw), nn.Dense(inner, **kw), nn.Dense(inner, **kw)
    self.o = nn.Dense(c.d_model, **kw)
    if self.has_relative_attention_bias:
      self.relative_attention_bias = nn.Embed(c.relative_attention_num_buckets, c.num_heads, dtype=self.dtype,
                                              param_dtype=self.param_dtype)

  def position_bias(self, s: int, t: int, index) -> jax.Array:
    """(1, h, s, t) float32 (or wider) bias for queries at slots index..index+s-1 over key slots 0..t-1."""
    c = self.config
    table = relative_position_bucket(np.arange(-(t - 1), t), self.bidirectional, c.relative_attention_num_buckets,
                                     c.relative_attention_max_distance)  # bucket of rel = i - (t - 1)
    rel = jnp.arange(t)[None, :] - (index + jnp.arange(s))[:, None]
    buckets = jnp.asarray(table, jnp.int32)[rel + (t - 1)]
    bias = self.relative_attention_bias(buckets)
    return jnp.transpose(bias.astype(jnp.promote_types(bias.dtype, jnp.float32)), (2, 0, 1))[None]

  def kv(self, x: jax.Array) -> dict[str, jax.Array]:
    """Keys and values (b, t, h, d) of ``x`` (the cross-attention cache of one block)."""
    c = self.config
    b, t, _ = x.shape
    return {"k": _project(self.k, x).reshape(b, t, c.num_heads, c.d_kv),
            "v": _project(self.v, x).reshape(b, t, c.num_heads, c.d_kv)}

  def __call__(self, x, allowed, bias, kv=None, cache=None, index=0):
    """``kv``: given keys/values (cross-attention), else from ``x``; ``cache``: self-attention slots to fill at ``index``."""
    c = self.config
    b, s, _ = x.shape
    q = _project(self.q, x).reshape(b, s, c.num_heads, c.d_kv)
    if kv is None:
      kv = self.kv(x)
      if cache is not None:
        kv = {n: jax.lax.dynamic_update_slice_in_dim(cache[n], kv[n].astype(cache[n].dtype), index, axis=1)
              for n in ("k", "v")}
        cache = kv
    k, v = kv["k"].astype(q.dtype), kv["v"].astype(q.dtype)
    if bias is None and self.has_relative_attention_bias:
      bias = self.position_bias(s, k.shape[1], index)
    out = _attend(q, k, v, bias, allowed)
    return _project(self.o, out.reshape(b, s, -1)), bias, cache


class T5DenseReluDense(nn.Module):
  """``wi``/``wo`` (ReLU) or ``wi_0``/``wi_1``/``wo`` (gated GELU)."""

  config: T5Config
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    c = self.config
    gated, act = _ACTS[c.feed_forward_proj]

    def dense(n, name):
      return nn.Dense(n, use_bias=False, dtype=self.dtype, param_dtype=self.param_dtype, name=name)

    if gated:
      h = act(_project(dense(c.d_ff, "wi_0"), x)) * _project(dense(c.d_ff, "wi_1"), x)
    else:
      h = act(_project(dense(c.d_ff, "wi"), x))
    return _project(dense(c.d_model, "wo"), h)


class T5LayerSelfAttention(nn.Module):
  config: T5Config
  has_relative_attention_bias: bool = False
  bidirectional: bool = True
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  def setup(self):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    self.SelfAttention = T5Attention(self.config, self.has_relative_attention_bias, self.bidirectional, **kw)
    self.layer_norm = T5LayerNorm(self.config.layer_norm_epsilon, **kw)

  def __call__(self, x, allowed, bias, cache, index):
    h, bias, cache = self.SelfAttention(self.layer_norm(x), allowed, bias, None, cache, index)
    return x + h, bias, cache


class T5LayerCrossAttention(nn.Module):
  config: T5Config
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  def setup(self):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    self.EncDecAttention = T5Attention(self.config, False, True, **kw)
    self.layer_norm = T5LayerNorm(self.config.layer_norm_epsilon, **kw)

  def __call__(self, x, allowed, kv):
    return x + self.EncDecAttention(self.layer_norm(x), allowed, None, kv)[0]


class T5LayerFF(nn.Module):
  config: T5Config
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  def setup(self):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    self.DenseReluDense = T5DenseReluDense(self.config, **kw)
    self.layer_norm = T5LayerNorm(self.config.layer_norm_epsilon, **kw)

  def __call__(self, x):
    return x + self.DenseReluDense(self.layer_norm(x))


class T5Block(nn.Module):
  """``layer_0`` self-attention, (decoder) ``layer_1`` cross-attention, then the feed-forward layer."""

  config: T5Config
  is_decoder: bool = False
  has_relative_attention_bias: bool = False
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  def setup(self):
    c, kw = self.config, dict(dtype=self.dtype, param_dtype=self.param_dtype)
    layers = [T5LayerSelfAttention(c, self.has_relative_attention_bias, not self.is_decoder, **kw)]
    if self.is_decoder:
      layers.append(T5LayerCrossAttention(c, **kw))
    layers.append(T5LayerFF(c, **kw))
    self.layer = layers

  def __call__(self, x, bias, allowed, cross_allowed, cross_kv, cache, index):
    """Positional arguments only (checkpointed by jax_lora.remat); returns (x, position bias, cache)."""
    x = tag_layer_input(x)
    x, bias, cache = self.layer[0](x, allowed, bias, cache, index)
    if self.is_decoder:
      x = self.layer[1](x, cross_allowed, cross_kv)
    return self.layer[-1](x), bias, cache

  def cross_kv(self, encoder_hidden):
    return self.layer[1].EncDecAttention.kv(encoder_hidden)


class T5Stack(nn.Module):
  """``block_{i}`` and ``final_layer_norm``; the embedding is the parent's ``shared``."""

  config: T5Config
  is_decoder: bool = False
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  def setup(self):
    c, kw = self.config, dict(dtype=self.dtype, param_dtype=self.param_dtype)
    n = c.num_decoder_layers if self.is_decoder else c.num_layers
    block = remat_module(T5Block, c.remat)
    self.block = [block(c, self.is_decoder, i == 0, **kw) for i in range(n)]
    self.final_layer_norm = T5LayerNorm(c.layer_norm_epsilon, **kw)

  def __call__(self, x, allowed, cross_allowed=None, encoder_hidden=None, cross=None, cache=None, index=0):
    bias, new = None, []
    for i, blk in enumerate(self.block):
      kv = None
      if self.is_decoder:
        kv = cross[i] if cross is not None else blk.cross_kv(encoder_hidden)
      x, bias, ci = blk(x, bias, allowed, cross_allowed, kv, None if cache is None else cache[i], index)
      new.append(ci)
    return self.final_layer_norm(x), (None if cache is None else tuple(new))

  def cross_kv(self, encoder_hidden):
    return tuple(blk.cross_kv(encoder_hidden) for blk in self.block)


def _ones_like_ids(ids, mask, what):
  if mask is None:
    return jnp.ones(ids.shape, jnp.int32)
  if mask.shape != ids.shape:
    raise ValueError(f"{what} has shape {mask.shape}; expected {ids.shape} like its input ids")
  return mask


class T5ForConditionalGeneration(nn.Module):
  """T5 encoder–decoder LM.

  ``model.apply(variables, input_ids, attention_mask, decoder_input_ids,
  decoder_attention_mask)`` returns ``(logits, None)``: float32 logits
  (b, t, vocab) of the decoder inputs (the targets shifted right behind
  ``decoder_start_token_id``); the masks are 1/0 padding masks (default all
  ones). Without ``decoder_input_ids`` the decoder reads one start token.
  ``logits_index`` (b, k) computes the head only at those decoder positions.

  Pieces for generation and chunked losses: ``method="encode"`` (encoder
  hidden states), ``"cross_kv"`` (every decoder block's cross-attention keys
  and values, computed once), ``"decode"`` (decoder with an optional
  self-attention cache from :func:`init_cache`, returns ``(logits, cache)``),
  ``"hidden_states"`` and ``"lm_logits"`` (the head alone).
  """

  config: T5Config  # architecture
  dtype: Any = jnp.float32  # compute dtype
  param_dtype: Any = jnp.float32  # parameter dtype at init

  def setup(self):
    c, kw = self.config, dict(dtype=self.dtype, param_dtype=self.param_dtype)
    self.shared = nn.Embed(c.vocab_size, c.d_model, **kw)
    self.encoder = T5Stack(c, False, **kw)
    self.decoder = T5Stack(c, True, **kw)
    if not c.tie_word_embeddings:
      self.lm_head = nn.Dense(c.vocab_size, use_bias=False, **kw)

  def __call__(self, input_ids, attention_mask=None, decoder_input_ids=None, decoder_attention_mask=None,
               logits_index=None):
    h = self.hidden_states(input_ids, attention_mask, decoder_input_ids, decoder_attention_mask, logits_index)
    return self.lm_logits(h), None

  def encode(self, input_ids, attention_mask=None):
    """Encoder output (b, s, d) after the final layer norm."""
    mask = _ones_like_ids(input_ids, attention_mask, "attention_mask")
    return self.encoder(self.shared(input_ids), (mask > 0)[:, None, None, :])[0]

  def cross_kv(self, encoder_hidden):
    """Per decoder block ``{"k", "v"}`` (b, s, h, d) of the encoder output: the cross-attention cache."""
    return self.decoder.cross_kv(encoder_hidden)

  def decode(self, decoder_input_ids, encoder_hidden=None, attention_mask=None, decoder_attention_mask=None,
             cache=None, cross=None, index=0, logits_index=None):
    """Decoder logits and the updated cache.

    Args:
      decoder_input_ids: (b, s) tokens; with a cache they fill slots ``index..index+s-1``.
      encoder_hidden: (b, S, d) from ``encode`` (unused when ``cross`` is given).
      attention_mask: (b, S) encoder padding mask.
      decoder_attention_mask: (b, s) decoder padding mask, or (b, t) over all cache slots.
      cache: self-attention cache from :func:`init_cache` (None: no cache).
      cross: cross-attention keys/values from ``cross_kv`` (None: computed from ``encoder_hidden``).
      index: first cache slot of ``decoder_input_ids``.
      logits_index: (b, k) decoder positions to compute logits at.
    """
    h, cache = self._decoder(decoder_input_ids, encoder_hidden, attention_mask, decoder_attention_mask, cache, cross,
                             index, logits_index)
    return self.lm_logits(h), cache

  def hidden_states(self, input_ids, attention_mask=None, decoder_input_ids=None, decoder_attention_mask=None,
                    logits_index=None):
    """Decoder final-norm hidden states (b, t, d), or (b, k, d) at ``logits_index``; no head."""
    if decoder_input_ids is None:
      decoder_input_ids = jnp.full((input_ids.shape[0], 1), self.config.decoder_start_token_id, jnp.int32)
    enc = self.encode(input_ids, attention_mask)
    return self._decoder(decoder_input_ids, enc, attention_mask, decoder_attention_mask, None, None, 0,
                         logits_index)[0]

  def lm_logits(self, hidden):
    """The head alone: (..., d) → (..., vocab) float32 (``d_model**-0.5`` scaling first when configured)."""
    c = self.config
    lead = hidden.shape[:-1]
    x = hidden.reshape(-1, hidden.shape[-1])
    if c.scale_decoder_outputs:
      x = x * jnp.asarray(c.d_model**-0.5, x.dtype)
    logits = self.shared.attend(x) if c.tie_word_embeddings else self.lm_head(x)
    return logits.reshape(*lead, -1).astype(_logits_dtype(self.dtype))

  def _decoder(self, ids, encoder_hidden, attention_mask, decoder_attention_mask, cache, cross, index, logits_index):
    b, s = ids.shape
    ref = cross[0]["k"] if cross is not None else encoder_hidden
    enc_mask = jnp.ones(ref.shape[:2], jnp.int32) if attention_mask is None else attention_mask
    if enc_mask.shape != ref.shape[:2]:
      raise ValueError(f"attention_mask has shape {enc_mask.shape}; expected {ref.shape[:2]} like the encoder input")
    t = s if cache is None else cache[0]["k"].shape[1]
    dmask = jnp.ones((b, t), jnp.int32) if decoder_attention_mask is None else decoder_attention_mask
    if dmask.shape != (b, t):
      raise ValueError(f"decoder_attention_mask has shape {dmask.shape}; expected {(b, t)} "
                       f"({'all cache slots' if cache is not None else 'like decoder_input_ids'})")
    causal = jnp.arange(t)[None, :] <= (index + jnp.arange(s))[:, None]
    allowed = causal[None, None] & (dmask > 0)[:, None, None, :]
    cross_allowed = (enc_mask > 0)[:, None, None, :]
    x, cache = self.decoder(self.shared(ids), allowed, cross_allowed, encoder_hidden, cross, cache, index)
    if logits_index is not None:
      x = jnp.take_along_axis(x, logits_index[..., None], axis=1)
    return x, cache


def init_cache(config: T5Config, batch: int, max_len: int, dtype=jnp.float32):
  """Zero decoder self-attention cache: per decoder block {"k", "v"} of (b, max_len, heads, d_kv)."""
  shape = (batch, max_len, config.num_heads, config.d_kv)
  return tuple({"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)} for _ in range(config.num_decoder_layers))


# ----------------------------------------------------------------------------- HF names

_HF_KEY = re.compile(
    r"shared\.weight|lm_head\.weight|(encoder|decoder)\.final_layer_norm\.weight"
    r"|(encoder|decoder)\.block\.\d+\.layer\.\d+\.(layer_norm"
    r"|(SelfAttention|EncDecAttention)\.(q|k|v|o|relative_attention_bias)"
    r"|DenseReluDense\.(wi|wi_0|wi_1|wo))\.weight")
_PATH = re.compile(
    r"shared/embedding|lm_head/kernel|(encoder|decoder)/final_layer_norm/weight"
    r"|(encoder|decoder)/block_\d+/layer_\d+/(layer_norm/weight"
    r"|(SelfAttention|EncDecAttention)/((q|k|v|o)/kernel|relative_attention_bias/embedding)"
    r"|DenseReluDense/(wi|wi_0|wi_1|wo)/kernel)")


def hf_key_to_path(key: str) -> str:
  """Hugging Face T5 state-dict key → Flax parameter path.

  >>> hf_key_to_path("decoder.block.0.layer.1.EncDecAttention.q.weight")
  'decoder/block_0/layer_1/EncDecAttention/q/kernel'
  """
  if not _HF_KEY.fullmatch(key):
    raise ValueError(f"unknown T5 parameter key {key!r}; expected e.g. 'encoder.block.0.layer.0.SelfAttention.q.weight'")
  mods = re.sub(r"\.(block|layer)\.(\d+)", r"/\1_\2", key[: -len(".weight")]).replace(".", "/")
  leaf = mods.rsplit("/", 1)[-1]
  kind = "embedding" if leaf in ("shared", "relative_attention_bias") else "weight" if "layer_norm" in leaf else "kernel"
  return f"{mods}/{kind}"


def path_to_hf_key(path: str) -> str:
  """Flax parameter path → Hugging Face key; inverse of :func:`hf_key_to_path`.

  >>> path_to_hf_key("encoder/block_1/layer_1/DenseReluDense/wi_0/kernel")
  'encoder.block.1.layer.1.DenseReluDense.wi_0.weight'
  """
  if not _PATH.fullmatch(path):
    raise ValueError(f"unknown T5 parameter path {path!r}; expected e.g. 'encoder/block_0/layer_0/SelfAttention/q/kernel'")
  mods = re.sub(r"(block|layer)_(\d+)", r"\1.\2", path.rsplit("/", 1)[0]).replace("/", ".")
  return f"{mods}.weight"


def to_flax(key: str, array):
  """HF (key, tensor) → (Flax path, array): Linear weights (out, in) become (in, out) kernels."""
  path = hf_key_to_path(key)
  return path, (array.T if path.endswith("/kernel") else array)


def to_hf(path: str, array):
  """Flax (path, array) → HF (key, tensor); inverse of :func:`to_flax`."""
  return path_to_hf_key(path), (array.T if path.endswith("/kernel") else array)


# Keys transformers ties to ``shared`` or never uses (old checkpoints hold them).
_TIED_EMBEDS = ("encoder.embed_tokens.weight", "decoder.embed_tokens.weight")
_UNUSED = ("decoder.block.0.layer.1.EncDecAttention.relative_attention_bias.weight",)


def ignored_hf_keys(key: str, config: T5Config) -> bool:
  """Checkpoint keys that are not parameters of ours (copies of ``shared``, an unused bias, a tied head)."""
  return key in _TIED_EMBEDS or key in _UNUSED or (config.tie_word_embeddings and key == "lm_head.weight")


def config_for_state(config: T5Config, state: Mapping[str, Any]) -> T5Config:
  """The config as transformers 5 resolves it against the weights: a checkpoint ``lm_head.weight``
  that differs from ``shared.weight`` unties the head, a missing one ties it.

  Raises:
    ValueError: ``encoder/decoder.embed_tokens.weight`` present but different from ``shared.weight``.
  """
  shared = state.get("shared.weight")
  for k in _TIED_EMBEDS:
    if k in state and shared is not None and not np.array_equal(np.asarray(state[k]), np.asarray(shared)):
      raise ValueError(f"checkpoint {k} differs from shared.weight; T5 shares one embedding, so this is not a T5 "
                       "checkpoint we can load")
  head = state.get("lm_head.weight")
  if head is None:
    return dataclasses.replace(config, tie_word_embeddings=True) if not config.tie_word_embeddings else config
  if config.tie_word_embeddings and shared is not None and not np.array_equal(np.asarray(head), np.asarray(shared)):
    return dataclasses.replace(config, tie_word_embeddings=False)
  return config
