"""jax_lora.losses.chunked_token_nll equals the plain loss (values, gradients) and bounds the logits memory."""

import dataclasses
import functools
import os
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jax_lora as jl
from jax_lora.losses import chunked_token_nll, token_nll
from jax_lora.models import LlamaConfig, LlamaForCausalLM
from jax_lora.models.gpt2 import GPT2Config, GPT2LMHeadModel

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _close(got, want, rtol=2e-5, atol=2e-6):
  for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=rtol, atol=atol)


def _both(head, params, h, t, w, chunk, rng=None):
  """(value, (d params, d hidden)) of the token-mean loss, chunked and plain."""

  def mean(chunked):
    def f(p, x):
      if chunked:
        s, n = chunked_token_nll(head, p, x, t, w, chunk=chunk, rng=rng)
      else:
        s, n = token_nll(head(p, x), t, w)
      return s / n
    return jax.jit(jax.value_and_grad(f, argnums=(0, 1)))(params, h)

  return mean(True), mean(False)


def _apply(model, params, *args, **kw):
  """``model.apply`` jitted (one compile instead of many eager ops)."""
  return jax.jit(lambda p, *a: model.apply({"params": p}, *a, **kw))(params, *args)


def _data(n, d, v, seed=0):
  r = np.random.default_rng(seed)
  h = jnp.asarray(r.normal(size=(n, d)), jnp.float32)
  t = jnp.asarray(r.integers(0, v, size=n), jnp.int32)
  w = jnp.asarray(r.random(n) < 0.7, jnp.float32)  # about 30% zero weights
  return h, t, w


@functools.cache
def _tiny_llama(tied: bool):
  cfg = LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                    num_key_value_heads=2, head_dim=8, tie_word_embeddings=tied)
  model = LlamaForCausalLM(cfg)
  ids = jnp.asarray(np.random.default_rng(1).integers(1, 97, size=(3, 20)), jnp.int32)
  return model, jax.jit(model.init)(jax.random.key(0), ids)["params"], ids


def test_dense_head_uneven_chunks_and_zero_weights():
  h, t, w = _data(300, 16, 500)  # 300 = 2 chunks of 128 + 44
  r = np.random.default_rng(2)
  params = {"kernel": jnp.asarray(r.normal(size=(16, 500)) * 0.3, jnp.float32),
            "bias": jnp.asarray(r.normal(size=(500,)), jnp.float32)}
  head = lambda p, x: x @ p["kernel"] + p["bias"]
  (v, g), (v_ref, g_ref) = _both(head, params, h, t, w, chunk=128)
  _close(v, v_ref)
  _close(g, g_ref)
  assert float(jnp.abs(g[1][np.asarray(w) == 0]).max()) == 0.0  # zero-weight tokens get no gradient
  s, n = chunked_token_nll(head, params, h, t, w, chunk=128)
  assert float(n) == float(w.sum())


@pytest.mark.parametrize("chunk", [0, -1, 300, 1000])
def test_chunk_off_or_whole_is_plain(chunk):
  h, t, w = _data(300, 8, 50)
  k = jnp.ones((8, 50)) * 0.1
  s, n = chunked_token_nll(lambda p, x: x @ p, k, h, t, w, chunk=chunk)
  s_ref, n_ref = token_nll(h @ k, t, w)
  _close((s, n), (s_ref, n_ref))


def test_leading_axes_are_flattened_and_shapes_checked():
  h, t, w = _data(24, 8, 50)
  k = jnp.ones((8, 50)) * 0.1
  s, _ = chunked_token_nll(lambda p, x: x @ p, k, h.reshape(2, 12, 8), t.reshape(2, 12), w.reshape(2, 12), chunk=5)
  _close(s, token_nll(h @ k, t, w)[0])
  with pytest.raises(ValueError, match="one target and one weight per hidden row"):
    chunked_token_nll(lambda p, x: x @ p, k, h, t[:-1], w, chunk=5)


@pytest.mark.parametrize("tied", [True, False], ids=["tied_embedding", "untied_lm_head"])
def test_llama_head_methods_and_chunked_grads(tied):
  model, params, ids = _tiny_llama(tied)
  logits, _ = _apply(model, params, ids)
  h = _apply(model, params, ids, method="hidden_states")
  assert h.shape == (3, 20, 32)
  _close(_apply(model, params, h, method="lm_logits"), logits, rtol=1e-6, atol=1e-6)
  hf = h.reshape(-1, 32)
  t, w = ids.reshape(-1), jnp.asarray(np.arange(60) % 4 != 0, jnp.float32)
  head = lambda p, x: model.apply({"params": p}, x, method="lm_logits")
  (v, g), (v_ref, g_ref) = _both(head, params, hf, t, w, chunk=16)
  _close(v, v_ref)
  _close(g, g_ref)
  key = ("model", "embed_tokens", "embedding") if tied else ("lm_head", "kernel")
  grad = g[0]
  for k in key:
    grad = grad[k]
  assert float(jnp.abs(grad).max()) > 0


def test_gpt2_head_methods():
  cfg = GPT2Config(vocab_size=61, n_positions=32, n_embd=16, n_layer=1, n_head=2, n_inner=32)
  model = GPT2LMHeadModel(cfg)
  ids = jnp.asarray(np.random.default_rng(0).integers(0, 61, size=(2, 10)), jnp.int32)
  params = jax.jit(model.init)(jax.random.key(0), ids)["params"]
  logits, _ = _apply(model, params, ids)
  pos = jnp.asarray([[1, 4, 7], [0, 2, 9]], jnp.int32)
  h = _apply(model, params, ids, method="hidden_states", logits_index=pos)
  want = jnp.take_along_axis(logits, pos[..., None], axis=1)
  _close(_apply(model, params, h, method="lm_logits"), want, rtol=1e-6, atol=1e-6)


def _lora_lm_head(params, quant=False):
  lcfg = jl.LoraConfig(rank=4, alpha=8, targets=(r"lm_head/kernel", r".*/q_proj/kernel"))
  adapted = jl.init_lora(params, lcfg, jax.random.key(1))
  if quant:
    adapted = jl.quantize(adapted, jl.QuantConfig(scheme="nf4", block_size=16, targets=(r"lm_head/kernel",),
                                                  compute_dtype=jnp.float32))
  # nonzero B, so A gets a gradient too
  adapted["lm_head"]["kernel"] = dataclasses.replace(adapted["lm_head"]["kernel"],
                                                     b=jnp.full(adapted["lm_head"]["kernel"].b.shape, 0.05))
  return jl.split(adapted)


@pytest.mark.parametrize("quant", [False, True], ids=["lora", "qlora_nf4"])
def test_lora_lm_head_unmerged_chunked_grads(quant):
  model, params, ids = _tiny_llama(tied=False)
  trainable, frozen = _lora_lm_head(params, quant)
  t, w = ids.reshape(-1), jnp.asarray(np.arange(60) % 3 != 0, jnp.float32)

  def loss(chunk):
    def f(tr):
      adapted = jl.combine(tr, frozen)
      h = jl.linen.apply(model, adapted, ids, method="hidden_states").reshape(-1, 32)
      head = lambda p, x: jl.linen.apply(model, p, x, method="lm_logits")
      s, n = chunked_token_nll(head, adapted, h, t, w, chunk=chunk)
      return s / n
    return jax.jit(jax.value_and_grad(f))(trainable)

  with warnings.catch_warnings():
    warnings.simplefilter("error")  # a merged (not unmerged) LoRA kernel would warn
    (v, g), (v_ref, g_ref) = loss(16), loss(0)
  _close(v, v_ref)
  _close(g, g_ref)
  lw = g["lm_head"]["kernel"]
  assert float(jnp.abs(lw.a).max()) > 0 and float(jnp.abs(lw.b).max()) > 0


@pytest.mark.parametrize("method,gathered", [("lora", True), ("full", False)],
                         ids=["lora_loss_positions", "full_all_positions"])
def test_train_loss_chunked_equals_unchunked(method, gathered):
  from jax_lora_app.loop import make_loss_fn, with_loss_targets

  model, params, ids = _tiny_llama(tied=False)
  ids = np.asarray(ids)
  att = np.ones_like(ids)
  att[1, 15:] = 0
  lm = np.zeros_like(ids)
  lm[0, 5:15], lm[1, 3:15], lm[2, 10:20] = 1, 1, 1
  batch = {"input_ids": ids, "attention_mask": att, "loss_mask": lm}
  if gathered:
    batch = with_loss_targets(batch, bucket=8)
  batch = {k: jnp.asarray(v) for k, v in batch.items()}
  if method == "full":
    trainable, frozen = params, None
  else:
    trainable, frozen = _lora_lm_head(params)

  def run(chunk):
    fn = make_loss_fn(model, method, chunk)
    def mean(tr):
      s, n = fn(tr, frozen, batch, None)
      return s / n
    return jax.jit(jax.value_and_grad(mean))(trainable)

  (v, g), (v_ref, g_ref) = run(7), run(0)
  _close(v, v_ref)
  _close(g, g_ref)


def test_train_loss_chunked_with_lora_dropout_runs():
  from jax_lora_app.loop import make_loss_fn, with_loss_targets

  model, params, ids = _tiny_llama(tied=False)
  adapted = jl.init_lora(params, jl.LoraConfig(rank=4, alpha=8, targets=(r"lm_head/kernel",), dropout=0.5),
                         jax.random.key(1))
  trainable, frozen = jl.split(adapted)
  ids = np.asarray(ids)
  batch = with_loss_targets({"input_ids": ids, "attention_mask": np.ones_like(ids), "loss_mask": np.ones_like(ids)},
                            bucket=8)
  s, n = jax.jit(make_loss_fn(model, "lora", 16))(trainable, frozen, batch, jax.random.key(3))
  assert np.isfinite(float(s)) and float(n) == 3 * 19


def test_loss_chunk_config_is_validated():
  from jax_lora_app import config as tc

  assert tc.TrainConfig().loss_chunk == 0
  cfg = tc.load_config(os.path.join(REPO, "configs", "default.yaml"), ["loss_chunk=512"], check_files=False)
  assert cfg.loss_chunk == 512
  with pytest.raises(ValueError, match="'loss_chunk' must be >= 0") as e:
    tc.load_config(os.path.join(REPO, "configs", "default.yaml"), ["loss_chunk=-1"], check_files=False)
  assert "\n" not in str(e.value)


def _temp_bytes(chunk, n, d, v):
  def f(k, h, t, w):
    s, cnt = chunked_token_nll(lambda p, x: x @ p, k, h, t, w, chunk=chunk)
    return s / cnt
  args = (jax.ShapeDtypeStruct((d, v), jnp.float32), jax.ShapeDtypeStruct((n, d), jnp.float32),
          jax.ShapeDtypeStruct((n,), jnp.int32), jax.ShapeDtypeStruct((n,), jnp.float32))
  fn = jax.jit(jax.value_and_grad(f, argnums=(0, 1)))
  return fn.lower(*args).compile().memory_analysis().temp_size_in_bytes


def test_compiled_temp_memory_bounded_by_chunk():
  n, d, v = 8192, 256, 32768
  logits_bytes = n * v * 4  # 1 GiB of float32 logits
  plain, chunked = _temp_bytes(0, n, d, v), _temp_bytes(1024, n, d, v)
  assert plain > logits_bytes
  assert chunked < logits_bytes / 3  # about two (1024, V) float32 buffers: logits and their gradient


def test_data_sharded_tokens_need_no_gather():
  """Tokens sharded over a data axis: each chunk stays sharded (strided chunks), same value."""
  import re

  from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

  mesh = Mesh(np.array(jax.devices()[:4]), ("data",))
  h, t, w = _data(512, 16, 64)
  k = jnp.asarray(np.random.default_rng(3).normal(size=(16, 64)), jnp.float32)
  rows = NamedSharding(mesh, P("data"))
  h, t, w = jax.device_put(h, rows), jax.device_put(t, rows), jax.device_put(w, rows)
  k = jax.device_put(k, NamedSharding(mesh, P()))

  def f(p, x):
    s, n = chunked_token_nll(lambda q, y: y @ q, p, x, t, w, chunk=128)
    return s / n

  fn = jax.jit(jax.value_and_grad(f, argnums=(0, 1)))
  hlo = fn.lower(k, h).compile().as_text()
  assert not re.search(r"all-gather(-start)?\(", hlo)
  (v, g), (v_ref, g_ref) = fn(k, h), jax.value_and_grad(lambda p, x: token_nll(x @ p, t, w)[0] / w.sum(), (0, 1))(k, h)
  _close(v, v_ref)
  _close(g, g_ref)
