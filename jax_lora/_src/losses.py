"""Token cross-entropy without the (tokens x vocab) logits: the LM head in chunks.

With a 128k-262k vocabulary the float32 logits of a whole batch dwarf the rest
of a step (8192 tokens x 128256 x 4 bytes = 4.2 GB, and as much again for their
gradient). :func:`chunked_token_nll` runs the LM head and the cross-entropy on
``chunk`` tokens at a time inside a ``lax.scan`` whose body is rematerialized
(``jax.checkpoint``): the forward keeps only the running sums, the backward
recomputes one chunk's logits at a time. Values and gradients (w.r.t. the
hidden states and the head's parameters) equal :func:`token_nll` on the full
logits, up to float32 summation order.

Memory (XLA:CPU compiled temp bytes of value-and-grad, ``bench/bench_loss.py``):
about two (chunk, V) float32 buffers when the head kernel is frozen (LoRA);
when the kernel is differentiated too (full fine-tuning, tied embeddings) about
one chunk plus one extra (d, V) float32 buffer for summing the kernel gradient
over chunks, so chunking pays off there once N is well above d.
The plain loss needs two (N, V) buffers: logits and their gradient.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

__all__ = ["token_nll", "chunked_token_nll"]


def token_nll(logits: jax.Array, targets: jax.Array, weights: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Summed weighted cross-entropy and the weight sum.

  Computes ``sum((logsumexp(logits) - logits[target]) * w)`` in float32 without
  materializing a log-softmax array.

  Args:
    logits: (..., V) logits, any float dtype (cast to float32).
    targets: (...) int target ids.
    weights: (...) per-position weights (0 drops a position).

  Returns:
    ``(sum_nll, weight_sum)``, float32 scalars.
  """
  logits = logits.astype(jnp.float32)
  nll = jax.nn.logsumexp(logits, axis=-1) - jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
  w = weights.astype(jnp.float32)
  return jnp.sum(nll * w), jnp.sum(w)


def chunked_token_nll(head: Callable[..., jax.Array], head_params: Any, hidden: jax.Array, targets: jax.Array,
                      weights: jax.Array, *, chunk: int = 1024,
                      rng: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
  """:func:`token_nll` of ``head(head_params, hidden)``, ``chunk`` tokens at a time.

  Neither the forward nor the backward pass holds more than one chunk's
  (chunk, V) logits: the tokens are padded (weight 0) to a multiple of
  ``chunk`` and scanned over, and each chunk's head + cross-entropy is
  recomputed in the backward pass instead of saved. The price is one more
  head matmul per chunk in the backward pass. Chunks take every m-th token
  (m = number of chunks), so when the tokens are sharded over a data mesh axis
  each chunk is too (no gathers, no replicated head compute).

  Example:

  >>> import jax, jax.numpy as jnp
  >>> w = jax.random.normal(jax.random.key(0), (16, 1000)) * 0.1
  >>> h = jax.random.normal(jax.random.key(1), (300, 16))
  >>> t = jnp.arange(300) % 1000
  >>> head = lambda p, x: x @ p
  >>> s, n = chunked_token_nll(head, w, h, t, jnp.ones(300), chunk=128)
  >>> s_ref, _ = token_nll(head(w, h), t, jnp.ones(300))
  >>> bool(jnp.allclose(s, s_ref, rtol=1e-5)), float(n)
  (True, 300.0)

  With a Flax model that has ``hidden_states``/``lm_logits`` methods (e.g.
  :class:`jax_lora.models.LlamaForCausalLM`), LoRA kept unmerged:
  ``h = jax_lora.linen.apply(model, params, ids, mask, method="hidden_states")`` and
  ``head = lambda p, x: jax_lora.linen.apply(model, p, x, method="lm_logits")``.

  Args:
    head: pure function ``head(head_params, h) -> logits (n, V)`` for ``h`` (n, d)
      (``head(head_params, h, key)`` when ``rng`` is given). It may run a Linen
      module with LoRA or quantized kernels inside ``head_params``.
    head_params: any pytree; gradients flow to it as through the plain loss.
    hidden: (N, d) hidden states, or (..., d) (flattened).
    targets: (N,) (or (...)) int target ids.
    weights: (N,) (or (...)) float weights; 0 drops a token.
    chunk: tokens per chunk; ``chunk <= 0`` or ``chunk >= N`` computes the plain
      loss in one piece.
    rng: optional PRNG key (e.g. for LoRA dropout inside the head): chunk ``i``
      gets ``jax.random.fold_in(rng, i)`` as ``head``'s third argument.

  Returns:
    ``(sum_nll, weight_sum)`` float32 scalars, as :func:`token_nll` returns.
  """
  d = hidden.shape[-1]
  hidden = hidden.reshape(-1, d)
  n = hidden.shape[0]
  targets, weights = targets.reshape(-1), weights.reshape(-1)
  if targets.shape != (n,) or weights.shape != (n,):
    raise ValueError(f"chunked_token_nll: hidden has {n} tokens but targets {targets.shape} and weights "
                     f"{weights.shape}; give one target and one weight per hidden row")

  def call(p, h, i):
    return head(p, h) if rng is None else head(p, h, jax.random.fold_in(rng, i))

  if chunk <= 0 or chunk >= n:
    return token_nll(call(head_params, hidden, 0), targets, weights)
  m = -(-n // chunk)
  pad = m * chunk - n
  w = weights.astype(jnp.float32)

  def strided(x):  # chunk i holds rows i, i + m, i + 2m, ...: on a data-sharded N every device has a share
    return jnp.swapaxes(jnp.pad(x, [(0, pad)] + [(0, 0)] * (x.ndim - 1)).reshape(chunk, m, *x.shape[1:]), 0, 1)

  xs = (strided(hidden), strided(targets), strided(w), jnp.arange(m))

  @jax.checkpoint  # save nothing from the body: the backward recomputes one chunk's logits
  def chunk_nll(p, h, t, wc, i):
    return token_nll(call(p, h, i), t, wc)[0]

  def step(total, x):
    return total + chunk_nll(head_params, *x), None

  total, _ = jax.lax.scan(step, jnp.zeros((), jnp.float32), xs)
  return total, jnp.sum(w)
