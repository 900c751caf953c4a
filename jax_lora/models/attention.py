"""Causal dot-product attention over packed segments, with a memory-lean blockwise kernel.

:func:`dot_product_attention` is the training / scoring path (no KV cache): queries
attend causally to keys of their own segment. ``implementation`` picks how:

- ``"naive"``: one (b, heads, s, s) float32 score tensor (the reference math);
- ``"blockwise"``: pure-JAX flash attention with a custom VJP: an online softmax over
  (block_q x block_k) tiles, saving only the output and a float32 logsumexp per query
  for the backward pass, which recomputes the scores tile by tile. Peak temporary
  memory grows like s * heads * (d + block), not s * s * heads;
- ``"xla"`` / ``"cudnn"``: :func:`jax.nn.dot_product_attention` with that
  implementation (see :func:`dot_product_attention` for what each can express);
- ``"auto"``: the rule in :func:`dot_product_attention`.

:func:`attend` is the plain masked attention the KV-cache (generation) path uses.

Every implementation honours a sliding ``window`` (a query sees keys fewer than
``window`` positions back, as transformers' sliding-window masks), a ``scale`` other
than 1/sqrt(d) and tanh ``softcap`` of the scores, or refuses in one line: ``"xla"``
takes no soft-capping, and ``"cudnn"`` computes windowed or soft-capped attention
with the CPU rule.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

__all__ = [
    "IMPLEMENTATIONS",
    "NAIVE_MAX_LEN",
    "attend",
    "check_implementation",
    "dot_product_attention",
]

IMPLEMENTATIONS = ("auto", "naive", "blockwise", "xla", "cudnn")  # accepted ``implementation`` names
NAIVE_MAX_LEN = 1024  # "auto" uses "naive" up to this sequence length (where it is fastest on CPU)
_NEG = -1e30  # finite "minus infinity": fully masked rows give uniform weights, not NaN
_CUDNN_DTYPES = (jnp.bfloat16, jnp.float16)  # what cuDNN flash attention takes


def attend(q: jax.Array, k: jax.Array, v: jax.Array, allowed: jax.Array, *, scale: float | None = None,
           softcap: float | None = None) -> jax.Array:
  """Scaled dot-product attention with grouped KV heads.

  Args:
    q: (b, s, h, d) queries.
    k: (b, t, kv, d) keys; h must be a multiple of kv.
    v: (b, t, kv, d) values.
    allowed: (b, s, t) boolean: query i may attend key j.
    scale: score scale (default 1/sqrt(d)).
    softcap: if set, scores become ``softcap * tanh(scores / softcap)`` before masking.

  Returns:
    (b, s, h, d) in q's dtype; scores and softmax in float32. A row with no allowed
    key gets uniform weights over all keys.
  """
  b, s, h, d = q.shape
  kv = k.shape[2]
  qg = q.reshape(b, s, kv, h // kv, d)
  scores = jnp.einsum("bskgd,btkd->bkgst", qg, k, preferred_element_type=jnp.float32) * _scale(scale, d)
  if softcap is not None:
    scores = jnp.tanh(scores / softcap) * softcap
  scores = jnp.where(allowed[:, None, None], scores, _NEG)
  probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
  out = jnp.einsum("bkgst,btkd->bskgd", probs, v)
  return out.reshape(b, s, h, d).astype(q.dtype)


def dot_product_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    segment_ids: jax.Array,
    *,
    implementation: str = "auto",
    block_q: int = 512,
    block_k: int = 512,
    window: int | jax.Array | None = None,
    scale: float | None = None,
    softcap: float | None = None,
) -> jax.Array:
  """Causal attention within segments: query i attends key j iff j <= i and both hold
  the same segment id > 0 (and i - j < ``window`` when a window is given).

  Scores and softmax are float32, scaled by 1/sqrt(d); grouped KV heads are never
  repeated (queries are reshaped to (kv, h // kv) groups). Padding queries
  (segment 0) attend to nothing and give 0, with finite (zero) gradients.

  ``implementation="auto"`` picks ``"cudnn"`` on a GPU for bfloat16/float16 with
  d <= 128 and d % 8 == 0; otherwise ``"naive"`` when s <= ``NAIVE_MAX_LEN`` (1024)
  and ``"blockwise"`` above it.

  ``"xla"`` passes the full (b, 1, s, s) boolean mask to XLA's attention (it
  materializes the scores like ``"naive"``). ``"cudnn"`` can express only causal
  attention over one right-padded example per row (``query_seq_lengths``): given
  concrete segment ids of another layout it raises ``ValueError``; given traced ones
  it checks at run time and computes such batches with ``"naive"`` (s <=
  ``NAIVE_MAX_LEN``) or ``"blockwise"`` instead (``jax.lax.cond``: both are compiled).

  Args:
    q: (b, s, h, d) queries.
    k: (b, s, kv, d) keys; h must be a multiple of kv.
    v: (b, s, kv, d) values.
    segment_ids: (b, s) int: 0 = padding, k > 0 = the k-th example packed into the
      row (a 1/0 padding mask is the one-segment case).
    implementation: one of :data:`IMPLEMENTATIONS`.
    block_q: query rows per tile (``"blockwise"``); s need not be a multiple.
    block_k: key columns per tile (``"blockwise"``).
    window: sliding window (an int, or a traced int32 scalar); None for full attention.
    scale: score scale (default 1/sqrt(d)).
    softcap: tanh soft-capping of the scores (Gemma 2); ``"xla"`` refuses it.

  Returns:
    (b, s, h, d) in q's dtype.

  >>> q = k = v = jnp.ones((1, 3, 2, 4))
  >>> dot_product_attention(q, k, v, jnp.asarray([[1, 1, 0]]), implementation="blockwise")[0, :, 0, 0]
  Array([1., 1., 0.], dtype=float32)
  """
  check_implementation(implementation)
  b, s, h, d = q.shape
  if k.shape != v.shape or k.shape[:2] != (b, s) or k.shape[3] != d or h % k.shape[2]:
    raise ValueError(f"k, v {k.shape}, {v.shape} do not fit q {q.shape}; expected (b, s, kv, d) with h % kv == 0")
  if segment_ids.shape != (b, s):
    raise ValueError(f"segment_ids has shape {segment_ids.shape}; expected {(b, s)} like q's first two axes")
  if block_q < 1 or block_k < 1:
    raise ValueError(f"block_q={block_q}, block_k={block_k}: blocks must be positive")
  segment_ids = segment_ids.astype(jnp.int32)
  k, v = k.astype(q.dtype), v.astype(q.dtype)
  impl = _choose(q, s) if implementation == "auto" else implementation
  kw = dict(scale=scale, softcap=softcap)
  if impl == "naive":
    out = attend(q, k, v, _allowed(segment_ids, segment_ids, 0, 0, window), **kw)
  elif impl == "blockwise":
    out = _blockwise(q, k, v, segment_ids, block_q, block_k, window, **kw)
  elif impl == "xla":
    if softcap is not None:
      raise ValueError("XLA attention has no logit soft-capping; use implementation='naive' or 'blockwise'")
    mask = _allowed(segment_ids, segment_ids, 0, 0, window)[:, None]
    out = jax.nn.dot_product_attention(q, k, v, mask=mask, scale=_scale(scale, d), implementation="xla")
  else:
    out = _cudnn(q, k, v, segment_ids, block_q, block_k, window, **kw)
  return jnp.where((segment_ids > 0)[:, :, None, None], out, 0).astype(q.dtype)


def check_implementation(name: str) -> None:
  """Raises ValueError unless ``name`` is one of :data:`IMPLEMENTATIONS`."""
  if name not in IMPLEMENTATIONS:
    raise ValueError(f"unknown attention implementation {name!r}; use one of {', '.join(IMPLEMENTATIONS)}")


def _choose(q: jax.Array, s: int) -> str:
  """The ``"auto"`` rule (see :func:`dot_product_attention`)."""
  d = q.shape[-1]
  if jax.default_backend() == "gpu" and q.dtype in _CUDNN_DTYPES and d <= 128 and d % 8 == 0:
    return "cudnn"
  return "naive" if s <= NAIVE_MAX_LEN else "blockwise"


def _scale(scale: float | None, d: int) -> float:
  return 1.0 / math.sqrt(d) if scale is None else scale


def _allowed(seg_q: jax.Array, seg_k: jax.Array, q0, k0, window=None) -> jax.Array:
  """(b, nq, nk) causal-and-segment mask for queries at positions q0.. and keys at k0..
  (within ``window`` positions when given)."""
  qpos = q0 + jnp.arange(seg_q.shape[1])
  kpos = k0 + jnp.arange(seg_k.shape[1])
  same = (seg_q[:, :, None] == seg_k[:, None, :]) & (seg_k[:, None, :] > 0)
  causal = kpos[None, None, :] <= qpos[None, :, None]
  if window is not None:
    causal &= (qpos[None, :, None] - kpos[None, None, :]) < window
  return same & causal


# ----------------------------------------------------------------------------- cuDNN


def _one_right_padded_example(seg: jax.Array) -> jax.Array:
  """Per-batch boolean: the row is 1...1 0...0 with at least one 1 (what query_seq_lengths
  expresses; an all-padding row is left to the fallback rather than a zero-length cuDNN row)."""
  n = jnp.sum(seg > 0, axis=1)
  ones_then_zeros = jnp.all(seg == (jnp.arange(seg.shape[1])[None] < n[:, None]).astype(seg.dtype), axis=1)
  return ones_then_zeros & (n > 0)


def _cudnn(q, k, v, seg, block_q, block_k, window=None, scale=None, softcap=None):
  def other(q, k, v, seg):  # packed or left-padded rows, windows, soft-capping: the CPU rule
    if q.shape[1] <= NAIVE_MAX_LEN:
      return attend(q, k, v, _allowed(seg, seg, 0, 0, window), scale=scale, softcap=softcap)
    return _blockwise(q, k, v, seg, block_q, block_k, window, scale=scale, softcap=softcap)

  if window is not None or softcap is not None:
    return other(q, k, v, seg)
  if q.dtype not in _CUDNN_DTYPES:
    raise ValueError(f"cuDNN attention takes bfloat16/float16, not {q.dtype}; use implementation='blockwise'")
  if not isinstance(seg, jax.core.Tracer) and not bool(jnp.all(_one_right_padded_example(seg))):
    raise ValueError("cuDNN attention expresses only one right-padded example per row; "
                     "for packed segments or left padding use implementation='blockwise'")

  def fast(q, k, v, seg):
    n = jnp.sum(seg > 0, axis=1).astype(jnp.int32)
    return jax.nn.dot_product_attention(q, k, v, is_causal=True, query_seq_lengths=n, key_value_seq_lengths=n,
                                        scale=_scale(scale, q.shape[-1]), implementation="cudnn")

  return jax.lax.cond(jnp.all(_one_right_padded_example(seg)), fast, other, q, k, v, seg)


# ----------------------------------------------------------------------------- blockwise


def _blockwise(q, k, v, seg, block_q, block_k, window=None, scale=None, softcap=None):
  """Pads s to whole blocks (segment 0), runs the custom-VJP kernel on grouped queries."""
  b, s, h, d = q.shape
  kv = k.shape[2]
  bq, bk = min(block_q, s), min(block_k, s)
  sq, sk = -(-s // bq) * bq, -(-s // bk) * bk
  qg = jnp.pad(q.reshape(b, s, kv, h // kv, d), [(0, 0), (0, sq - s), (0, 0), (0, 0), (0, 0)])
  kp = jnp.pad(k, [(0, 0), (0, sk - s), (0, 0), (0, 0)])
  vp = jnp.pad(v, [(0, 0), (0, sk - s), (0, 0), (0, 0)])
  seg_q = jnp.pad(seg, [(0, 0), (0, sq - s)])
  seg_k = jnp.pad(seg, [(0, 0), (0, sk - s)])
  win = jnp.asarray(_NO_WINDOW if window is None else window, jnp.int32)
  out = _flash(qg, kp, vp, seg_q, seg_k, win, bq, bk, _scale(scale, d), softcap)
  return out[:, :s].reshape(b, s, h, d)


_NO_WINDOW = 1 << 30  # the blockwise kernel's window when there is none


def _tile_scores(qi, kj, seg_qi, seg_kj, q0, k0, window, scale, softcap):
  """Masked float32 scores (b, kv, g, bq, bk) of one tile and its (b, 1, 1, bq, bk) mask."""
  scores = jnp.einsum("bqkgd,btkd->bkgqt", qi, kj, preferred_element_type=jnp.float32) * scale
  if softcap is not None:
    scores = jnp.tanh(scores / softcap) * softcap
  allowed = _allowed(seg_qi, seg_kj, q0, k0, window)[:, None, None]
  return jnp.where(allowed, scores, _NEG), allowed


def _first_q_block(j, bq, bk):
  """The first query block that can see key block j (causal skipping)."""
  return (j * bk) // bq


def _end_k_block(i, bq, bk, nk):
  """One past the last key block that query block i can see (causal skipping)."""
  return jnp.minimum(((i + 1) * bq - 1) // bk + 1, nk)


def _key_tile(k, v, seg_k, j, bk):
  """Keys, values and key segment ids of key block ``j`` (``bk`` positions)."""
  return tuple(jax.lax.dynamic_slice_in_dim(x, j * bk, bk, axis=1) for x in (k, v, seg_k))


@functools.partial(jax.custom_vjp, nondiff_argnums=(6, 7, 8, 9))
def _flash(q, k, v, seg_q, seg_k, window, bq, bk, scale, softcap):
  return _flash_forward(q, k, v, seg_q, seg_k, window, bq, bk, scale, softcap)[0]


def _flash_forward(q, k, v, seg_q, seg_k, window, bq, bk, scale, softcap):
  """Online-softmax forward. q (b, sq, kv, g, d); k, v (b, sk, kv, d). Returns out, lse (b, kv, g, sq)."""
  b, sq, kv, g, d = q.shape
  nq, nk = sq // bq, k.shape[1] // bk

  def q_block(i, carry):
    out, lse = carry
    qi = jax.lax.dynamic_slice_in_dim(q, i * bq, bq, axis=1)
    seg_qi = jax.lax.dynamic_slice_in_dim(seg_q, i * bq, bq, axis=1)

    def k_block(j, state):
      m, l, acc = state
      kj, vj, seg_kj = _key_tile(k, v, seg_k, j, bk)
      scores, allowed = _tile_scores(qi, kj, seg_qi, seg_kj, i * bq, j * bk, window, scale, softcap)
      m_new = jnp.maximum(m, scores.max(-1))
      p = jnp.where(allowed, jnp.exp(scores - m_new[..., None]), 0.0)
      corr = jnp.exp(m - m_new)
      pv = jnp.einsum("bkgqt,btkd->bkgqd", p.astype(v.dtype), vj, preferred_element_type=jnp.float32)
      return m_new, l * corr + p.sum(-1), acc * corr[..., None] + pv

    init = (jnp.full((b, kv, g, bq), _NEG, jnp.float32), jnp.zeros((b, kv, g, bq), jnp.float32),
            jnp.zeros((b, kv, g, bq, d), jnp.float32))
    m, l, acc = jax.lax.fori_loop(0, _end_k_block(i, bq, bk, nk), k_block, init)
    seen = l > 0
    oi = jnp.where(seen[..., None], acc / jnp.where(seen, l, 1.0)[..., None], 0.0)
    oi = jnp.transpose(oi, (0, 3, 1, 2, 4)).astype(q.dtype)  # (b, bq, kv, g, d)
    lse_i = jnp.where(seen, m + jnp.log(jnp.where(seen, l, 1.0)), 0.0)
    out = jax.lax.dynamic_update_slice_in_dim(out, oi, i * bq, axis=1)
    lse = jax.lax.dynamic_update_slice_in_dim(lse, lse_i, i * bq, axis=3)
    return out, lse

  init = (jnp.zeros(q.shape, q.dtype), jnp.zeros((b, kv, g, sq), jnp.float32))
  return jax.lax.fori_loop(0, nq, q_block, init)


def _flash_fwd(q, k, v, seg_q, seg_k, window, bq, bk, scale, softcap):
  out, lse = _flash_forward(q, k, v, seg_q, seg_k, window, bq, bk, scale, softcap)
  return out, (q, k, v, seg_q, seg_k, window, out, lse)


def _flash_bwd(bq, bk, scale, softcap, res, dout):
  """Recomputes each tile's probabilities from the logsumexp; key blocks outside, query blocks inside."""
  q, k, v, seg_q, seg_k, window, out, lse = res
  sq = q.shape[1]
  nq, nk = sq // bq, k.shape[1] // bk
  # D_i = sum_d dO_i * O_i: the softmax-backward term, (b, kv, g, sq).
  delta = jnp.einsum("bqkgd,bqkgd->bkgq", dout.astype(jnp.float32), out.astype(jnp.float32))

  def k_block(j, carry):
    dq, dk, dv = carry
    kj, vj, seg_kj = _key_tile(k, v, seg_k, j, bk)

    def q_block(i, state):
      dq, dkj, dvj = state
      qi = jax.lax.dynamic_slice_in_dim(q, i * bq, bq, axis=1)
      doi = jax.lax.dynamic_slice_in_dim(dout, i * bq, bq, axis=1)
      seg_qi = jax.lax.dynamic_slice_in_dim(seg_q, i * bq, bq, axis=1)
      lse_i = jax.lax.dynamic_slice_in_dim(lse, i * bq, bq, axis=3)
      delta_i = jax.lax.dynamic_slice_in_dim(delta, i * bq, bq, axis=3)
      scores, allowed = _tile_scores(qi, kj, seg_qi, seg_kj, i * bq, j * bk, window, scale, softcap)
      p = jnp.where(allowed, jnp.exp(scores - lse_i[..., None]), 0.0)
      dvj = dvj + jnp.einsum("bkgqt,bqkgd->btkd", p.astype(doi.dtype), doi, preferred_element_type=jnp.float32)
      dp = jnp.einsum("bqkgd,btkd->bkgqt", doi, vj, preferred_element_type=jnp.float32)
      ds = p * (dp - delta_i[..., None]) * scale
      if softcap is not None:  # d/dx c tanh(x / c) = 1 - tanh(x / c)^2
        ds = ds * (1.0 - jnp.square(jnp.where(allowed, scores, 0.0) / softcap))
      ds = ds.astype(q.dtype)
      dqi = jnp.einsum("bkgqt,btkd->bqkgd", ds, kj, preferred_element_type=jnp.float32)
      dq = jax.lax.dynamic_update_slice_in_dim(dq, jax.lax.dynamic_slice_in_dim(dq, i * bq, bq, axis=1) + dqi,
                                               i * bq, axis=1)
      dkj = dkj + jnp.einsum("bkgqt,bqkgd->btkd", ds, qi, preferred_element_type=jnp.float32)
      return dq, dkj, dvj

    zeros = jnp.zeros(kj.shape, jnp.float32)
    dq, dkj, dvj = jax.lax.fori_loop(_first_q_block(j, bq, bk), nq, q_block, (dq, zeros, zeros))
    dk = jax.lax.dynamic_update_slice_in_dim(dk, dkj, j * bk, axis=1)
    dv = jax.lax.dynamic_update_slice_in_dim(dv, dvj, j * bk, axis=1)
    return dq, dk, dv

  init = (jnp.zeros(q.shape, jnp.float32), jnp.zeros(k.shape, jnp.float32), jnp.zeros(v.shape, jnp.float32))
  dq, dk, dv = jax.lax.fori_loop(0, nk, k_block, init)
  return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), None, None, None


_flash.defvjp(_flash_fwd, _flash_bwd)
