"""Blockwise (flash) attention against the naive reference: values, gradients, memory, models."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jax_lora as jl
from jax_lora.models import LlamaConfig, LlamaForCausalLM, llama
from jax_lora.models.attention import NAIVE_MAX_LEN, _one_right_padded_example, dot_product_attention

LAYOUTS = ("right_pad", "left_pad", "packed", "packed_left_pad", "empty", "full")  # one row each


def _segments(s: int, layouts=LAYOUTS) -> np.ndarray:
  """(len(layouts), s) segment ids, one row per layout."""
  rows = {
      "right_pad": np.r_[np.ones(s - s // 3), np.zeros(s // 3)],
      "left_pad": np.r_[np.zeros(s // 3), np.ones(s - s // 3)],
      "packed": np.r_[np.full(s // 4, 1), np.full(s // 2 - s // 4, 2), np.full(s - 3 - s // 2, 3), np.zeros(3)],
      "packed_left_pad": np.r_[np.zeros(2), np.full(s // 2 - 2, 1), np.full(s - s // 2, 2)],
      "empty": np.zeros(s),
      "full": np.ones(s),
  }
  return np.stack([rows[name] for name in layouts]).astype(np.int32)


def _inputs(seed, b, s, h, kv, d, dtype=jnp.float32):
  """q, k, v and w, the weights of a random linear functional of the output."""
  rng = np.random.RandomState(seed)
  q, k, v, w = (rng.standard_normal(shape).astype(np.float32) for shape in
                [(b, s, h, d), (b, s, kv, d), (b, s, kv, d), (b, s, h, d)])
  return jnp.asarray(q, dtype), jnp.asarray(k, dtype), jnp.asarray(v, dtype), jnp.asarray(w)


def _value_and_grads(impl, q, k, v, seg, w, **blocks):
  def loss(q, k, v):
    out = dot_product_attention(q, k, v, seg, implementation=impl, **blocks)
    return jnp.sum(w * out.astype(jnp.float32)), out

  (_, out), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))(q, k, v)
  return out, grads


def _assert_close(got, want, atol, relative=False):
  """Leaf by leaf within atol (times the leaf's largest |value| when ``relative``), all finite."""
  for g, r in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
    g, r = np.asarray(g, np.float32), np.asarray(r, np.float32)
    assert np.all(np.isfinite(g))
    np.testing.assert_allclose(g, r, atol=atol * (np.abs(r).max() if relative else 1.0), rtol=0)


CASES = [  # name, (s, h, kv, d), (block_q, block_k); every case runs all LAYOUTS
    ("gqa_kv2", (32, 4, 2, 8), (8, 8)),
    ("mqa_kv1_s37_not_a_block_multiple", (37, 4, 1, 8), (16, 8)),
    ("mha_kv4_s37_unequal_blocks", (37, 4, 4, 8), (8, 16)),
    ("blocks_longer_than_s", (20, 4, 2, 8), (64, 64)),
]


@pytest.mark.parametrize("shape,blocks", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_blockwise_equals_naive(shape, blocks):
  seg = jnp.asarray(_segments(shape[0]))
  q, k, v, w = _inputs(0, len(LAYOUTS), *shape)
  want, want_g = _value_and_grads("naive", q, k, v, seg, w)
  got, got_g = _value_and_grads("blockwise", q, k, v, seg, w, block_q=blocks[0], block_k=blocks[1])
  _assert_close(got, want, 1e-5)
  _assert_close(got_g, want_g, 1e-5)
  pad = ~np.asarray(seg > 0)  # padding queries (a whole row for "empty"): output 0, no gradient into q
  np.testing.assert_array_equal(np.asarray(got)[pad], 0.0)
  np.testing.assert_array_equal(np.asarray(got_g[0])[pad], 0.0)
  empty = LAYOUTS.index("empty")  # nothing attends to its keys either
  np.testing.assert_array_equal(np.asarray(got_g[1])[empty], 0.0)
  np.testing.assert_array_equal(np.asarray(got_g[2])[empty], 0.0)


def test_xla_equals_naive_packed():
  q, k, v, w = _inputs(1, len(LAYOUTS), 37, 4, 2, 8)
  seg = jnp.asarray(_segments(37))
  _assert_close(_value_and_grads("xla", q, k, v, seg, w), _value_and_grads("naive", q, k, v, seg, w), 1e-5)


@pytest.mark.parametrize("s,same_as", [(NAIVE_MAX_LEN, "naive"), (NAIVE_MAX_LEN + 1, "blockwise")],
                         ids=["at_threshold_naive", "above_threshold_blockwise"])
def test_auto_rule_on_cpu(s, same_as):
  """'auto' on CPU is bit-identical to 'naive' up to NAIVE_MAX_LEN and to 'blockwise' above it."""
  q, k, v, _ = _inputs(3, 1, s, 2, 1, 8)
  seg = jnp.asarray(_segments(s, ("packed",)))
  auto, same = (jax.jit(functools.partial(dot_product_attention, implementation=i))(q, k, v, seg)
                for i in ("auto", same_as))
  np.testing.assert_array_equal(auto, same)


def test_bfloat16_blockwise_close_to_naive():
  q, k, v, w = _inputs(4, len(LAYOUTS), 37, 4, 2, 16, jnp.bfloat16)
  seg = jnp.asarray(_segments(37))
  got = _value_and_grads("blockwise", q, k, v, seg, w, block_q=16, block_k=8)
  want = _value_and_grads("naive", q, k, v, seg, w)
  assert got[0].dtype == jnp.bfloat16 and got[1][0].dtype == jnp.bfloat16
  _assert_close(got, want, 0.1)


@pytest.mark.parametrize(
    "case,kwargs,match",
    [
        ("unknown_name", dict(implementation="flash"), "auto, naive, blockwise, xla, cudnn"),
        ("cudnn_float32", dict(implementation="cudnn"), "bfloat16"),
        ("zero_block", dict(implementation="blockwise", block_q=0), "positive"),
    ],
    ids=lambda x: x if isinstance(x, str) else "",
)
def test_invalid_inputs(case, kwargs, match):
  q, k, v, _ = _inputs(0, 1, 8, 2, 1, 8)
  with pytest.raises(ValueError, match=match):
    dot_product_attention(q, k, v, jnp.ones((1, 8), jnp.int32), **kwargs)


def test_cudnn_rejects_concrete_packed_segments():
  q, k, v, _ = _inputs(0, 1, 8, 2, 1, 8, jnp.bfloat16)
  seg = jnp.asarray([[1, 1, 1, 2, 2, 2, 0, 0]])
  with pytest.raises(ValueError, match="packed segments or left padding use implementation='blockwise'"):
    dot_product_attention(q, k, v, seg, implementation="cudnn")


CUDNN_ROWS = [  # segment ids, whether cuDNN's query_seq_lengths can express the row
    ([1, 1, 0, 0], True),
    ([1, 1, 1, 1], True),
    ([0, 0, 0, 0], False),
    ([0, 1, 1, 1], False),
    ([1, 1, 2, 2], False),
    ([1, 0, 1, 0], False),
    ([2, 2, 0, 0], False),
]


def test_cudnn_layout_guard_known_answers():
  """The run-time guard that sends rows cuDNN cannot express to the fallback."""
  seg = jnp.asarray([row for row, _ in CUDNN_ROWS], jnp.int32)
  np.testing.assert_array_equal(_one_right_padded_example(seg), [ok for _, ok in CUDNN_ROWS])


def test_cudnn_path_with_xla_stand_in(monkeypatch):
  """The "cudnn" plumbing on CPU: jax.nn.dot_product_attention(implementation="cudnn") is replaced
  by XLA's with the same causal + seq-length arguments, doubled so that the test sees which
  branch ran: right-padded rows take it (and equal naive), other layouts fall back to naive."""
  xla = jax.nn.dot_product_attention

  def stand_in(*args, implementation, **kwargs):
    assert implementation == "cudnn"
    return 2 * xla(*args, implementation="xla", **kwargs)

  monkeypatch.setattr(jax.nn, "dot_product_attention", stand_in)
  q, k, v, _ = _inputs(5, 2, 24, 4, 2, 8, jnp.bfloat16)
  for layouts, factor in [(("right_pad", "full"), 2.0), (("right_pad", "packed"), 1.0), (("left_pad", "full"), 1.0)]:
    seg = jnp.asarray(_segments(24, layouts))
    got = jax.jit(functools.partial(dot_product_attention, implementation="cudnn"))(q, k, v, seg)
    want = dot_product_attention(q, k, v, seg, implementation="naive")
    _assert_close(got, factor * want.astype(jnp.float32), 0.05)


def test_config_attention_field_validated_and_not_saved():
  kw = dict(vocab_size=8, hidden_size=8, intermediate_size=8, num_hidden_layers=1, num_attention_heads=2,
            num_key_value_heads=1, head_dim=4)
  assert LlamaConfig(**kw).attention == "auto"
  with pytest.raises(ValueError, match="unknown attention implementation 'flash'"):
    LlamaConfig(**kw, attention="flash")
  with pytest.raises(ValueError, match="unknown attention implementation"):
    jl.models.GPT2Config(vocab_size=8, n_positions=8, n_embd=8, n_layer=1, n_head=2, n_inner=8, attention="fast")
  cfg = LlamaConfig(**kw, attention="blockwise")
  assert "attention" not in cfg.to_hf_config()
  assert LlamaConfig.from_hf_config(cfg.to_hf_config()).attention == "auto"
  assert LlamaConfig.from_hf_config(cfg.to_hf_config(), attention="naive").attention == "naive"
  g = jl.models.GPT2Config(vocab_size=8, n_positions=8, n_embd=8, n_layer=1, n_head=2, n_inner=8, attention="naive")
  assert "attention" not in g.to_hf_config()


# ----------------------------------------------------------------------------- memory


def _attention_grad_temp_bytes(impl, b, s, h, kv, d, block):
  def loss(q, k, v, seg):
    return jnp.sum(dot_product_attention(q, k, v, seg, implementation=impl, block_q=block, block_k=block))

  S = jax.ShapeDtypeStruct
  args = (S((b, s, h, d), jnp.float32), S((b, s, kv, d), jnp.float32), S((b, s, kv, d), jnp.float32),
          S((b, s), jnp.int32))
  return jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(*args).compile().memory_analysis().temp_size_in_bytes


def test_blockwise_backward_keeps_no_s_by_s_tensor():
  """XLA's compiled temp memory for grad of attention at s=4096, 8 heads: naive needs more than
  one (h, s, s) float32 tensor, blockwise (256 blocks) less than a tenth of one."""
  b, s, h, d = 1, 4096, 8, 64
  hss = h * s * s * 4
  naive = _attention_grad_temp_bytes("naive", b, s, h, h, d, 256)
  blockwise = _attention_grad_temp_bytes("blockwise", b, s, h, h, d, 256)
  assert naive > hss, (naive, hss)
  assert blockwise < hss / 10, (blockwise, hss)


# ----------------------------------------------------------------------------- models


def _tiny_llama(scan_layers):
  return LlamaConfig(vocab_size=61, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                     num_key_value_heads=2, head_dim=8, scan_layers=scan_layers)


def _perturb(tree, seed, scale=0.1):
  rng = np.random.RandomState(seed)
  return jax.tree.map(lambda x: jnp.asarray(x + scale * rng.standard_normal(x.shape).astype(np.float32)), tree)


@pytest.mark.parametrize("scan_layers", [False, True], ids=["unrolled", "scan_layers"])
def test_llama_blockwise_equals_naive_logits_and_lora_grads(scan_layers, monkeypatch):
  b, s = 2, 37
  seg = jnp.asarray(_segments(s, ("packed", "packed_left_pad")))
  ids = jnp.asarray(np.random.RandomState(0).randint(1, 61, (b, s)), jnp.int32)
  base = _tiny_llama(scan_layers)
  shapes = jax.eval_shape(LlamaForCausalLM(base).init, jax.random.key(0), ids)["params"]
  params = _perturb(jax.tree.map(lambda x: np.zeros(x.shape, np.float32), shapes), 0, scale=0.3)  # no init compile
  layouts = jl.linen.infer_layouts(LlamaForCausalLM(base), params, ids)
  cfg = jl.LoraConfig(rank=2, alpha=4.0, targets=(r".*/(q_proj|k_proj|v_proj|o_proj)/kernel",), layouts=layouts)
  trainable, frozen = jl.split(jax.jit(functools.partial(jl.init_lora, config=cfg))(params, key=jax.random.key(2)))
  trainable = _perturb(trainable, 3)  # B != 0: every factor gets a gradient
  # Small blocks (the model calls dot_product_attention with the default 512).
  monkeypatch.setattr(llama, "dot_product_attention", functools.partial(dot_product_attention, block_q=8, block_k=16))

  def run(attention):
    model = LlamaForCausalLM(dataclasses.replace(base, attention=attention))

    def loss(t):
      logits, _ = jl.linen.apply(model, jl.combine(t, frozen), ids, seg)
      return jnp.sum(jnp.where(seg[..., None] > 0, jax.nn.log_softmax(logits), 0.0)), logits

    return jax.jit(jax.value_and_grad(loss, has_aux=True))(trainable)

  (_, want_logits), want_grads = run("naive")
  (_, got_logits), got_grads = run("blockwise")
  valid = np.asarray(seg > 0)
  np.testing.assert_allclose(np.asarray(got_logits)[valid], np.asarray(want_logits)[valid], atol=1e-4, rtol=0)
  assert len(jax.tree.leaves(want_grads)) == (4 if scan_layers else 8) * 2
  assert min(float(jnp.abs(g).max()) for g in jax.tree.leaves(want_grads)) > 0
  _assert_close(got_grads, want_grads, 1e-5, relative=True)

