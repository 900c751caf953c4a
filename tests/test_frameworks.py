"""Linen models written the way big_vision / flax examples write them (conv stem,
nn.scan + nn.remat over blocks of MultiHeadDotProductAttention (DenseGeneral
kernels) + MLP, a classifier head), and a tunix-style NNX model whose weights are
named ``w``: all-linear by tracing, traced layouts, zero fallbacks, unmerged ==
merged values and gradients, NF4 bits along the input axes."""

import re
import warnings

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jax_lora as jl
from jax_lora import adapters
from jax_lora import tree as jtree

D, H, L = 64, 4, 2


class Block(nn.Module):
  @nn.compact
  def __call__(self, x, _):
    y = nn.MultiHeadDotProductAttention(num_heads=H, name="attn")(nn.LayerNorm()(x))
    x = x + y
    h = nn.Dense(2 * D, name="up")(nn.LayerNorm()(x))
    return x + nn.Dense(D, name="down")(nn.gelu(h)), None


class ViT(nn.Module):
  @nn.compact
  def __call__(self, img):
    x = nn.Conv(D, (4, 4), strides=(4, 4), name="stem")(img)  # patch embedding
    x = x.reshape(x.shape[0], -1, D)
    blk = nn.remat(Block, prevent_cse=False)
    x, _ = nn.scan(blk, variable_axes={"params": 0}, split_rngs={"params": True}, length=L)(name="layers")(x, None)
    return nn.Dense(10, name="head")(x.mean(1))


IMG = jax.random.normal(jax.random.key(7), (2, 8, 8, 3))


def _vit():
  model = ViT()
  params = model.init(jax.random.key(0), IMG)["params"]
  run = lambda p: model.apply({"params": p}, IMG)
  return model, params, run


def _bump(ad):
  return jtree.map_leaves(lambda p, v: jl.LoraWeight(
      w=v.w, a=v.a, b=0.05 * jax.random.normal(jax.random.key(len(p)), v.b.shape), alpha=v.alpha, rank=v.rank,
      layout=v.layout, path=v.path) if isinstance(v, jl.LoraWeight) else v, ad)


def test_linen_all_linear_traced_targets_and_layouts():
  model, params, run = _vit()
  ad = jl.init_lora(params, jl.LoraConfig(rank=2, targets=("all-linear",)), jax.random.key(1), apply=run)
  lays = {p: v.layout for p, v in adapters.lora_weights(ad).items()}
  a = "layers/attn/"
  assert lays == {a + "query/kernel": "bioo", a + "key/kernel": "bioo", a + "value/kernel": "bioo",
                  a + "out/kernel": "biio", "layers/up/kernel": "bio", "layers/down/kernel": "bio"}  # no stem conv, no head
  inferred = jl.linen.infer_layouts(model, params, IMG)
  assert {k.replace("\\", ""): v for k, v in inferred.items()} == {**lays, "head/kernel": "io", "stem/kernel": "iiio"}


def test_linen_scan_remat_unmerged_equals_merged():
  model, params, run = _vit()
  ad = _bump(jl.init_lora(params, jl.LoraConfig(rank=2, alpha=4.0, targets=("all-linear",)), jax.random.key(1),
                          apply=run))
  trainable, frozen = jl.split(ad)

  def unmerged(t):
    return jnp.sum(jl.linen.apply(model, jl.combine(t, frozen), IMG) ** 2)

  def merged(t):
    return jnp.sum(model.apply({"params": jl.merge(jl.combine(t, frozen))}, IMG) ** 2)

  with warnings.catch_warnings():
    warnings.simplefilter("error")  # zero fallbacks
    lu, gu = jax.jit(jax.value_and_grad(unmerged))(trainable)
  lm, gm = jax.jit(jax.value_and_grad(merged))(trainable)
  np.testing.assert_allclose(float(lu), float(lm), rtol=1e-5)
  ga, gb = adapters.lora_weights(gu), adapters.lora_weights(gm)
  assert len(ga) == 6
  for p in ga:
    np.testing.assert_allclose(np.asarray(ga[p].a), np.asarray(gb[p].a), rtol=1e-4, atol=1e-5, err_msg=p)
    np.testing.assert_allclose(np.asarray(ga[p].b), np.asarray(gb[p].b), rtol=1e-4, atol=1e-5, err_msg=p)


def test_linen_qlora_bits_and_merge_runs_plain_model():
  model, params, run = _vit()
  ad = jl.init_lora(params, jl.LoraConfig(rank=2, targets=("all-linear",)), jax.random.key(1), apply=run)
  with warnings.catch_warnings():
    warnings.simplefilter("error")  # no padding warning
    q = jl.quantize(ad, jl.QuantConfig(min_size=4096))
  rep = jl.quant.bits_report(q)
  assert set(rep.per_leaf) == {f"layers/attn/{n}/kernel" for n in ("query", "key", "value", "out")} | {
      "layers/up/kernel", "layers/down/kernel"}
  assert max(rep.per_leaf.values()) <= 4.2, rep.per_leaf
  # the old default axis (-2) pads (layers, in, heads, head_dim) kernels 16x: > 4.2 bits
  with pytest.warns(UserWarning, match="padded by 1500%"):
    q_old = jl.quantize(params, jl.QuantConfig(axis=-2, targets=(r"layers/attn/query/kernel",)))
  assert jl.quant.bits_report(q_old).bits_per_param > 30
  # merge folds the adapters and dequantizes what has none: the plain model runs
  q2 = jl.quantize(ad, jl.QuantConfig(targets=(r"layers/.*/kernel", r"head/kernel"), min_size=0, block_size=2))
  out = model.apply({"params": jl.merge(q2)}, IMG)
  np.testing.assert_allclose(np.asarray(out), np.asarray(jl.linen.apply(model, q2, IMG)), atol=1e-4)


class TunixEinsum(nnx.Module):
  """tunix's layers: a parameter named ``w`` used through jnp.einsum."""

  def __init__(self, shape, rngs):
    self.w = nnx.Param(jax.random.normal(rngs.params(), shape) * 0.1)

  def __call__(self, eqn, x):
    return jnp.einsum(eqn, x, self.w.value)


class TunixLM(nnx.Module):
  def __init__(self, rngs):
    self.embedder = nnx.Embed(50, D, rngs=rngs)
    self.q = TunixEinsum((D, H, D // H), rngs)
    self.o = TunixEinsum((H, D // H, D), rngs)
    self.mlp = nnx.Linear(D, D, rngs=rngs)
    self.lm_head = TunixEinsum((D, 50), rngs)

  def __call__(self, ids):
    x = self.embedder(ids)
    x = x + self.o("btnh,nhd->btd", self.q("btd,dnh->btnh", x))
    x = x + self.mlp(x)
    return self.lm_head("btd,dv->btv", x)


def test_all_linear_on_tunix_style_w_params():
  ids = jnp.arange(10).reshape(2, 5)
  graphdef, state = nnx.split(TunixLM(nnx.Rngs(0)))
  run = lambda s: nnx.merge(graphdef, s)(ids)
  ad = jl.init_lora(state, jl.LoraConfig(rank=2, targets=("all-linear",)), jax.random.key(1), apply=run)
  lays = {p: v.layout for p, v in adapters.lora_weights(ad).items()}
  assert lays == {"q/w": "ioo", "o/w": "iio", "mlp/kernel": "io"}  # lm_head and the embedding excluded
  assert "lm_head/w" not in lays
  # the name rule without a trace: kernel leaves only (tunix's 'w' would be missed)
  named = jl.init_lora({"w": jnp.ones((4, 8)), "mlp": {"kernel": jnp.ones((4, 4))}},
                       jl.LoraConfig(rank=1, targets=("all-linear",)), jax.random.key(0))
  assert list(adapters.lora_weights(named)) == ["mlp/kernel"]
  # jnp.einsum on a LoRA weight cannot run unmerged: merged per call, exact, with a warning
  ad = _bump(ad)
  with warnings.catch_warnings(record=True) as w:
    warnings.simplefilter("always")
    y = jl.nnx.apply(graphdef, ad, ids)
  assert any("q/w" in str(x.message) for x in w) and not any("mlp/kernel" in str(x.message) for x in w)
  np.testing.assert_allclose(np.asarray(y), np.asarray(nnx.merge(graphdef, jl.merge(ad))(ids)), atol=1e-5)


def test_conv_lora_unmerged_equals_merged():
  """PEFT's Conv LoRA on the patch-embedding stem: conv(x, W) + s·conv(x, A) @ B, no merged fallback."""
  model, params, run = _vit()
  cfg = jl.LoraConfig(rank=2, alpha=4.0, targets=("all-linear", "stem"), layouts={"stem/kernel": "iiio"})
  ad = _bump(jl.init_lora(params, cfg, jax.random.key(1), apply=run))
  assert ad["stem"]["kernel"].a.shape == (4, 4, 3, 2) and ad["stem"]["kernel"].b.shape == (2, D)
  trainable, frozen = jl.split(ad)

  def unmerged(t):
    return jnp.sum(jl.linen.apply(model, jl.combine(t, frozen), IMG) ** 2)

  def merged(t):
    return jnp.sum(model.apply({"params": jl.merge(jl.combine(t, frozen))}, IMG) ** 2)

  with warnings.catch_warnings():
    warnings.simplefilter("error")
    lu, gu = jax.jit(jax.value_and_grad(unmerged))(trainable)
  lm, gm = jax.jit(jax.value_and_grad(merged))(trainable)
  np.testing.assert_allclose(float(lu), float(lm), rtol=1e-5)
  for name in ("a", "b"):
    np.testing.assert_allclose(np.asarray(getattr(gu["stem"]["kernel"], name)),
                               np.asarray(getattr(gm["stem"]["kernel"], name)), rtol=1e-4, atol=1e-5)
  # unmerged: the stem's conv runs on W and on the rank-2 A, never on W + s·A@B
  text = str(jax.make_jaxpr(unmerged)(trainable))
  assert re.search(r"f32\[2,2,2,2\] = conv_general_dilated", text)  # conv(x, A): rank-2 output channels


class BNNet(nn.Module):
  @nn.compact
  def __call__(self, x, train: bool):
    h = nn.BatchNorm(use_running_average=not train)(nn.Dense(32, name="up")(x))
    return nn.Dense(4, name="out")(nn.Dropout(0.5, deterministic=not train)(nn.relu(h)))


def test_linen_batchnorm_dropout_state_returned():
  model, x = BNNet(), jax.random.normal(jax.random.key(2), (8, 16))
  variables = model.init(jax.random.key(0), x, train=False)
  ad = _bump(jl.init_lora(variables["params"], jl.LoraConfig(rank=2, targets=("all-linear",)), jax.random.key(1),
                          apply=lambda p: model.apply({**variables, "params": p}, x, train=False)))
  assert list(adapters.lora_weights(ad)) == ["up/kernel"]
  kw = dict(mutable=["batch_stats"], rngs={"dropout": jax.random.key(3)})
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    y, upd = jl.linen.apply(model, ad, x, True, variables={"batch_stats": variables["batch_stats"]}, **kw)
  y_ref, upd_ref = model.apply({"params": jl.merge(ad), "batch_stats": variables["batch_stats"]}, x, True, **kw)
  np.testing.assert_allclose(np.asarray(y), np.asarray(y_ref), atol=1e-5)
  for a, b in zip(jax.tree.leaves(upd), jax.tree.leaves(upd_ref)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6)
  assert not np.allclose(np.asarray(upd["batch_stats"]["BatchNorm_0"]["mean"]), 0)
