"""Greedy and nucleus-sampled generation with a KV cache, compiled once per shape.

The prompt is prefilled in one call, then one token per step runs in a
``lax.while_loop`` that stops early when every row has produced EOS. Prompts may
be left- or right-padded: rows are left-aligned first, so every row's next token
goes into the same cache slot. Params are passed untouched to ``apply_fn``, so
``functools.partial(jax_lora.linen.apply, model)`` runs LoRA (or quantized)
params unmerged.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jax_lora.models.hf import init_cache

__all__ = ["generate", "sample_logits", "left_align", "decode_loop"]


def left_align(input_ids: np.ndarray, attention_mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Moves each row's padding to the left, keeping the order of its real tokens."""
  order = np.argsort(attention_mask, axis=1, kind="stable")
  return np.take_along_axis(input_ids, order, axis=1), np.take_along_axis(attention_mask, order, axis=1)


def sample_logits(logits: jax.Array, key: jax.Array, temperature: float, top_p: float) -> jax.Array:
  """Next tokens (b,) from (b, vocab) logits: argmax when temperature == 0, else nucleus sampling."""
  if temperature == 0.0:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  logits = logits.astype(jnp.float32) / temperature
  if top_p < 1.0:
    sorted_logits = jnp.sort(logits, axis=-1)[:, ::-1]
    probs = jax.nn.softmax(sorted_logits, axis=-1)
    # Keep the smallest prefix whose mass reaches top_p (the first token always stays).
    keep = (jnp.cumsum(probs, axis=-1) - probs) < top_p
    cutoff = jnp.min(jnp.where(keep, sorted_logits, jnp.inf), axis=-1, keepdims=True)
    logits = jnp.where(logits >= cutoff, logits, -jnp.inf)
  return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


@functools.lru_cache(maxsize=32)
def _compiled(apply_fn, config, cache_dtype, max_new: int, eos: int, pad: int, temperature: float, top_p: float):
  def run(params, ids, mask, key):
    b, s = ids.shape
    full_mask = jnp.concatenate([mask, jnp.ones((b, max_new), mask.dtype)], axis=1)
    cache = init_cache(config, b, s + max_new, cache_dtype)
    logits, cache = apply_fn(params, ids, attention_mask=full_mask, cache=cache, index=0)
    key, sub = jax.random.split(key)
    tok = sample_logits(logits[:, -1], sub, temperature, top_p)

    def step(prev, cache, i, key):
      logits, cache = apply_fn(params, prev, attention_mask=full_mask, cache=cache, index=s + i - 1)
      return sample_logits(logits[:, -1], key, temperature, top_p), cache

    return decode_loop(step, tok, cache, key, max_new, eos, pad)

  return jax.jit(run)


def decode_loop(step, tok, cache, key, max_new: int, eos: int, pad: int) -> jax.Array:
  """``(b, max_new)`` tokens: ``tok`` (b,) first, then ``step(prev (b, 1), cache, i, key) ->
  (tok, cache)`` for positions ``i = 1…`` until every row has emitted ``eos`` (then ``pad``).
  The one KV-cache decoding loop of :func:`generate` and ``generate_seq2seq``."""
  out = jnp.full((tok.shape[0], max_new), pad, jnp.int32).at[:, 0].set(tok)

  def cond(state):
    i, _, _, done, _ = state
    return (i < max_new) & ~jnp.all(done)

  def body(state):
    i, out, cache, done, key = state
    key, sub = jax.random.split(key)
    tok, cache = step(jax.lax.dynamic_slice_in_dim(out, i - 1, 1, axis=1), cache, i, sub)
    tok = jnp.where(done, pad, tok)
    out = jax.lax.dynamic_update_slice_in_dim(out, tok[:, None], i, axis=1)
    return i + 1, out, cache, done | (tok == eos), key

  return jax.lax.while_loop(cond, body, (jnp.int32(1), out, cache, tok == eos, key))[1]


def generate(
    model: nn.Module,
    params: Any,
    input_ids: Any,
    attention_mask: Any = None,
    *,
    max_new_tokens: int,
    eos_token_id: int | None = None,
    pad_token_id: int | None = None,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int = 0,
    apply_fn: Callable[..., Any] | None = None,
) -> np.ndarray:
  """Generates up to ``max_new_tokens`` tokens after each prompt.

  Args:
    model: one of our causal LMs (its ``config`` and ``dtype`` size the cache).
    params: what ``apply_fn`` takes, passed through untouched: the variables
      dict from ``load_hf`` for ``model.apply``, or the LoRA tree (``LoraWeight``
      or quantized leaves) for ``jax_lora.linen.apply``.
    input_ids: (b, s) prompt tokens, left- or right-padded.
    attention_mask: (b, s) 1 for real tokens, 0 for padding (default all ones).
    max_new_tokens: tokens to generate per row (the compiled loop's fixed length).
    eos_token_id: stops a row once produced (None: never stop early).
    pad_token_id: fills the rest of a finished row (default ``eos_token_id``, else 0).
    temperature: 0 for greedy decoding, else the softmax temperature.
    top_p: nucleus sampling mass (1.0 keeps every token).
    seed: PRNG seed for sampling.
    apply_fn: ``apply_fn(params, input_ids, attention_mask=, cache=, index=)``
      returning ``(logits, cache)``; default ``model.apply``. Pass
      ``functools.partial(jax_lora.linen.apply, model)`` for LoRA params. Keep
      one function object across calls: the compiled loop is cached on it.

  Returns:
    (b, max_new_tokens) int32 numpy array of new tokens; after EOS (which is
    included) each row holds ``pad_token_id``.
  """
  if max_new_tokens < 1:
    raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
  if temperature < 0 or not 0 < top_p <= 1:
    raise ValueError(f"need temperature >= 0 and 0 < top_p <= 1, got temperature={temperature}, top_p={top_p}")
  ids = np.asarray(input_ids, np.int32)
  if ids.ndim != 2:
    raise ValueError(f"input_ids must be (batch, seq), got shape {ids.shape}")
  mask = np.ones_like(ids) if attention_mask is None else np.asarray(attention_mask, np.int32)
  if mask.shape != ids.shape:
    raise ValueError(f"attention_mask shape {mask.shape} differs from input_ids shape {ids.shape}")
  if not mask.any(axis=1).all():
    raise ValueError("every row needs at least one real token (attention_mask row of all zeros)")
  ids, mask = left_align(ids, mask)
  eos = -1 if eos_token_id is None else int(eos_token_id)
  pad = pad_token_id if pad_token_id is not None else (eos_token_id if eos_token_id is not None else 0)
  fn = _compiled(
      apply_fn or model.apply, model.config, model.dtype, int(max_new_tokens), eos, int(pad), float(temperature), float(top_p)
  )
  return np.asarray(fn(params, jnp.asarray(ids), jnp.asarray(mask), jax.random.key(seed)))
