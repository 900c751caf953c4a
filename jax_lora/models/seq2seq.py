"""Encoder–decoder generation (T5): greedy or nucleus sampling, compiled once per shape.

The encoder runs once, every decoder block's cross-attention keys/values are
computed once from its output, and the decoder then runs one token per step
with a self-attention KV cache inside a ``lax.while_loop`` that stops when
every row has produced EOS. Params are passed untouched to ``apply_fn``, so
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

from jax_lora.models.generate import decode_loop, sample_logits
from jax_lora.models.hf import init_cache

__all__ = ["generate_seq2seq"]


@functools.lru_cache(maxsize=32)
def _compiled(apply_fn, config, cache_dtype, max_new: int, eos: int, pad: int, temperature: float, top_p: float):
  def run(params, ids, mask, key):
    b = ids.shape[0]
    enc = apply_fn(params, ids, mask, method="encode")
    cross = apply_fn(params, enc, method="cross_kv")  # once: every step reuses these keys/values
    cache = init_cache(config, b, max_new, cache_dtype)

    def step(prev, cache, i, key):
      logits, cache = apply_fn(params, prev, None, mask, None, cache, cross, i, method="decode")
      return sample_logits(logits[:, -1], key, temperature, top_p), cache

    key, sub = jax.random.split(key)
    start = jnp.full((b, 1), config.decoder_start_token_id, jnp.int32)
    tok, cache = step(start, cache, 0, sub)
    return decode_loop(step, tok, cache, key, max_new, eos, pad)

  return jax.jit(run)


def generate_seq2seq(
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
  """Generates up to ``max_new_tokens`` decoder tokens for each encoder input.

  Args:
    model: an encoder–decoder model (:class:`jax_lora.models.T5ForConditionalGeneration`);
      its ``config`` gives ``decoder_start_token_id`` and sizes the cache.
    params: what ``apply_fn`` takes, untouched (``{"params": tree}`` for
      ``model.apply``, the LoRA tree for ``jax_lora.linen.apply``).
    input_ids: (b, s) encoder tokens, left- or right-padded.
    attention_mask: (b, s) 1 for real tokens, 0 for padding (default all ones).
    max_new_tokens: decoder tokens per row (the compiled loop's fixed length).
    eos_token_id: stops a row once produced (default ``config.eos_token_id``).
    pad_token_id: fills the rest of a finished row (default ``config.pad_token_id``).
    temperature: 0 for greedy decoding, else the softmax temperature.
    top_p: nucleus sampling mass (1.0 keeps every token).
    seed: PRNG seed for sampling.
    apply_fn: ``apply_fn(params, *args, method=...)``; default ``model.apply``. Keep one
      function object across calls: the compiled loop is cached on it.

  Returns:
    (b, max_new_tokens) int32 numpy array (the start token not included); after
    EOS (included) each row holds ``pad_token_id``.
  """
  config = model.config
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
  eos = config.eos_token_id if eos_token_id is None else eos_token_id
  pad = config.pad_token_id if pad_token_id is None else pad_token_id
  fn = _compiled(apply_fn or model.apply, config, model.dtype, int(max_new_tokens), int(eos), int(pad),
                 float(temperature), float(top_p))
  return np.asarray(fn(params, jnp.asarray(ids), jnp.asarray(mask), jax.random.key(seed)))
