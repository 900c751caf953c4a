"""DoRA (weight-decomposed LoRA) against its naive reference: init, forward, merge, QLoRA, training."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jax_lora as jl


def test_dora_init_equals_base_and_trains():
  """init_lora(use_dora=True): magnitude = column norms, the model equals the base; only A/B/m train."""
  w = jax.random.normal(jax.random.key(0), (6, 5))
  params = {"layer": {"kernel": w}}
  cfg = jl.LoraConfig(rank=2, alpha=4.0, targets=("layer",), use_dora=True)
  adapted = jl.init_lora(params, cfg, jax.random.key(1))
  lw = adapted["layer"]["kernel"]
  np.testing.assert_allclose(np.asarray(lw.m), np.linalg.norm(np.asarray(w), axis=0), rtol=1e-6)
  x = jax.random.normal(jax.random.key(2), (3, 6))
  np.testing.assert_allclose(np.asarray(jl.dot(x, lw)), np.asarray(x @ w), atol=1e-5)
  # with B != 0 the layer is m/‖W+sAB‖·(x@(W+sAB)), the naive reference
  b = jax.random.normal(jax.random.key(3), lw.b.shape)
  m = lw.m * 1.5
  lw2 = dataclasses.replace(lw, b=b, m=m)
  dense = w + lw2.scale * lw2.a @ b
  want = x @ dense * (m / jnp.linalg.norm(dense, axis=0))
  np.testing.assert_allclose(np.asarray(jl.dot(x, lw2)), np.asarray(want), atol=1e-5)
  np.testing.assert_allclose(np.asarray(jl.merge({"k": lw2})["k"]), np.asarray(dense * (m / jnp.linalg.norm(dense, axis=0))),
                             atol=1e-5)
  rep = jl.param_report(adapted)
  assert rep.trainable == 6 * 2 + 2 * 5 + 5
  with pytest.raises(ValueError, match="DoRA"):
    jl.unmerge(jl.merge(adapted), adapted)


def _naive(x, w, a, b, m, s):
  dense = w + s * a @ b
  return x @ dense * (m / jnp.linalg.norm(dense, axis=0))


def test_dora_on_a_quantized_base_equals_the_dequantized_one():
  w = jax.random.normal(jax.random.key(0), (128, 64))
  q = jl.quantize({"k": w}, jl.QuantConfig(block_size=64))
  cfg = jl.LoraConfig(rank=4, alpha=8.0, targets=("k",), use_dora=True)
  lw = jl.init_lora(q, cfg, jax.random.key(1))["k"]
  lw = dataclasses.replace(lw, b=0.1 * jax.random.normal(jax.random.key(2), lw.b.shape), m=lw.m * 1.3)
  x = jax.random.normal(jax.random.key(3), (5, 128))
  deq = jl.dequantize(q)["k"]
  np.testing.assert_allclose(np.asarray(lw.m / 1.3), np.linalg.norm(np.asarray(deq), axis=0), rtol=1e-5)
  np.testing.assert_allclose(np.asarray(jl.dot(x, lw)), np.asarray(_naive(x, deq, lw.a, lw.b, lw.m, lw.scale)),
                             atol=1e-4, rtol=1e-4)
  # gradients: the norm is a constant (DoRA paper §4.3, PEFT): compare with the naive one under stop_gradient
  def naive_loss(t):
    dense = deq + lw.scale * t["a"] @ t["b"]
    return jnp.sum(x @ dense * (t["m"] / jax.lax.stop_gradient(jnp.linalg.norm(dense, axis=0))))
  ours = jax.grad(lambda t: jnp.sum(jl.dot(x, dataclasses.replace(lw, a=t["a"], b=t["b"], m=t["m"]))))
  t = {"a": lw.a, "b": lw.b, "m": lw.m}
  for k in t:
    np.testing.assert_allclose(np.asarray(ours(t)[k]), np.asarray(jax.grad(naive_loss)(t)[k]), atol=1e-3, rtol=1e-4)


def test_dora_trains_only_its_factors():
  w = jax.random.normal(jax.random.key(0), (8, 4))
  x = jax.random.normal(jax.random.key(1), (16, 8))
  y = x @ (w * 0.5)  # a target that a rescaling of each column reaches: the magnitude must move
  adapted = jl.init_lora({"k": w}, jl.LoraConfig(rank=2, alpha=2.0, targets=("k",), use_dora=True), jax.random.key(2))
  trainable, frozen = jl.split(adapted)
  opt = optax.adam(0.05)
  state = opt.init(trainable)
  loss = lambda t: jnp.mean((jl.dot(x, jl.combine(t, frozen)["k"]) - y) ** 2)  # noqa: E731
  first = float(loss(trainable))
  for _ in range(100):
    g = jax.grad(loss)(trainable)
    u, state = opt.update(g, state, trainable)
    trainable = optax.apply_updates(trainable, u)
  assert float(loss(trainable)) < 0.05 * first
  out = jl.combine(trainable, frozen)["k"]
  np.testing.assert_array_equal(np.asarray(out.w), np.asarray(w))  # the base never moves
  assert float(jnp.abs(out.m - jnp.linalg.norm(w, axis=0)).max()) > 0.1
