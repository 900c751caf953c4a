"""An Equinox LM written the Equinox way (eqx.nn.Linear computes ``weight @ x`` on
one example, the model is vmapped): all-linear found by tracing (``weight`` leaves,
the vocab head excluded), init equals the base, unmerged equals merged in values
and A/B gradients, no merged fallback, NF4 bits on an Equinox tree."""

import warnings

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

import jax_lora as jl
from jax_lora import adapters
from jax_lora import tree as jtree

V, D = 64, 64


class Block(eqx.Module):
  ln: eqx.nn.LayerNorm
  up: eqx.nn.Linear
  down: eqx.nn.Linear

  def __init__(self, d, key):
    k1, k2 = jax.random.split(key)
    self.ln = eqx.nn.LayerNorm(d)
    self.up = eqx.nn.Linear(d, 2 * d, key=k1)
    self.down = eqx.nn.Linear(2 * d, d, key=k2)

  def __call__(self, x):
    return x + self.down(jax.nn.gelu(self.up(self.ln(x))))


class LM(eqx.Module):
  emb: eqx.nn.Embedding
  blocks: list
  head: eqx.nn.Linear

  def __init__(self, key, n=2):
    ks = jax.random.split(key, n + 2)
    self.emb = eqx.nn.Embedding(V, D, key=ks[0])
    self.blocks = [Block(D, k) for k in ks[1:-1]]
    self.head = eqx.nn.Linear(D, V, use_bias=False, key=ks[-1])

  def __call__(self, ids):
    x = jax.vmap(self.emb)(ids)
    for b in self.blocks:
      x = jax.vmap(b)(x)
    return jax.vmap(self.head)(x)


IDS = jnp.arange(12) % V


def _adapted(model):
  return jl.init_lora(model, jl.LoraConfig(rank=4, alpha=8.0, targets=("all-linear",)), jax.random.key(1),
                      apply=lambda m: m(IDS))


def test_all_linear_traced_on_equinox():
  ad = _adapted(LM(jax.random.key(0)))
  lw = {p: v for p, v in jtree.leaves(ad).items() if isinstance(v, jl.LoraWeight)}
  assert sorted(lw) == sorted(f"blocks/{i}/{n}/weight" for i in range(2) for n in ("up", "down"))  # no head, no embedding
  assert {v.layout for v in lw.values()} == {"oi"}  # (out, in): weight @ x
  assert lw["blocks/0/up/weight"].a.shape == (D, 4) and lw["blocks/0/up/weight"].b.shape == (4, 2 * D)


def test_equinox_unmerged_equals_merged_values_and_grads():
  model = LM(jax.random.key(0))
  ad = _adapted(model)
  with warnings.catch_warnings():
    warnings.simplefilter("error")  # zero fallbacks: every weight @ x runs unmerged
    y0 = jl.apply_fn(lambda m, i: m(i), ad, IDS)
  np.testing.assert_allclose(np.asarray(y0), np.asarray(model(IDS)), atol=1e-6)  # B = 0: the base (x@W.T vs W@x order)
  ad = jtree.map_leaves(lambda p, v: jl.LoraWeight(
      w=v.w, a=v.a, b=0.1 * jax.random.normal(jax.random.key(len(p)), v.b.shape), alpha=v.alpha, rank=v.rank,
      layout=v.layout, path=v.path) if isinstance(v, jl.LoraWeight) else v, ad)
  trainable, frozen = jl.split(ad)

  def unmerged(t):
    return jnp.mean(jl.apply_fn(lambda m, i: m(i), jl.combine(t, frozen), IDS) ** 2)

  def merged(t):
    return jnp.mean(jl.merge(jl.combine(t, frozen))(IDS) ** 2)

  with warnings.catch_warnings():
    warnings.simplefilter("error")
    lu, gu = jax.jit(jax.value_and_grad(unmerged))(trainable)
  lm, gm = jax.jit(jax.value_and_grad(merged))(trainable)
  np.testing.assert_allclose(float(lu), float(lm), rtol=1e-5)
  ga, gb = adapters.lora_weights(gu), adapters.lora_weights(gm)
  assert ga.keys() == gb.keys() and len(ga) == 4
  for p in ga:
    np.testing.assert_allclose(np.asarray(ga[p].a), np.asarray(gb[p].a), rtol=1e-4, atol=1e-6, err_msg=p)
    np.testing.assert_allclose(np.asarray(ga[p].b), np.asarray(gb[p].b), rtol=1e-4, atol=1e-6, err_msg=p)
  # the unmerged step never forms a dense (out, in) delta: only rank-4 products of A and B
  text = str(jax.make_jaxpr(unmerged)(trainable))
  assert "f32[128,64] = dot_general" not in text and "f32[64,128] = dot_general" not in text


def test_equinox_bits_and_param_report():
  ad = _adapted(LM(jax.random.key(0)))
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    q = jl.quantize(ad)  # the adapted bases, whatever they are named; blocks along 'in'
  rep = jl.quant.bits_report(q)
  assert rep.quantized_params == 4 * 2 * D * D and max(rep.per_leaf.values()) <= 4.2
  pr = jl.param_report(ad)
  n_lora = 4 * (4 * D + 4 * 2 * D)
  n_base = V * D + 2 * (2 * D + 2 * D * D + 2 * D + 2 * D * D + D) + D * V
  assert (pr.trainable, pr.total) == (n_lora, n_base + n_lora)
  y = jl.apply_fn(lambda m, i: m(i), q, IDS)
  np.testing.assert_allclose(np.asarray(y), np.asarray(jl.merge(q)(IDS)), atol=1e-5)
