"""LoRA core against naive references: the closed form x@W + (α/r)·x@A@B."""

import zlib
import dataclasses
import math
import warnings

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import jax_lora as jl
from jax_lora._src import fallback
import jax_lora.adapters  # noqa: F401 - jl.adapters

KEY = jax.random.key(0)


def randomize_b(adapted, key=KEY, scale=0.1):
  """B = 0 at init; tests need a non-zero update to be able to fail."""
  def f(x):
    if isinstance(x, jl.LoraWeight):
      k = jax.random.fold_in(key, zlib.crc32(x.path.encode()) % 1000)
      return dataclasses.replace(x, b=scale * jax.random.normal(k, x.b.shape, x.b.dtype))
    return x
  return jax.tree.map(f, adapted, is_leaf=lambda x: isinstance(x, jl.LoraWeight))


def close(a, b, tol=1e-5):
  np.testing.assert_allclose(np.asarray(a, np.float64), np.asarray(b, np.float64), rtol=tol, atol=tol)


# ---------------------------------------------------------------- plain functions


def mlp(params, x):
  h = jax.nn.relu(jl.dot(x, params["l1"]["kernel"]) + params["l1"]["bias"])
  return h @ params["l2"]["kernel"]


def mlp_params(key=KEY, d=16, h=32, o=8):
  k1, k2, k3 = jax.random.split(key, 3)
  return {"l1": {"kernel": jax.random.normal(k1, (d, h)) / 4, "bias": jax.random.normal(k3, (h,))},
          "l2": {"kernel": jax.random.normal(k2, (h, o)) / 6}}


def test_closed_form_plain_function():
  p = mlp_params()
  cfg = jl.LoraConfig(rank=4, alpha=8.0, targets=(r".*/kernel",))
  ad = randomize_b(jl.init_lora(p, cfg, KEY))
  x = jax.random.normal(KEY, (5, 16))
  l1, l2 = ad["l1"]["kernel"], ad["l2"]["kernel"]
  s = 8.0 / 4
  h = jax.nn.relu(x @ p["l1"]["kernel"] + s * (x @ l1.a) @ l1.b + p["l1"]["bias"])
  want = h @ p["l2"]["kernel"] + s * (h @ l2.a) @ l2.b
  close(jl.apply_fn(mlp, ad, x), want)
  close(jax.jit(lambda a, x: jl.apply_fn(mlp, a, x))(ad, x), want)


def test_init_equals_base_and_b_is_zero():
  p = mlp_params()
  ad = jl.init_lora(p, jl.LoraConfig.all_linear(rank=4), KEY)
  x = jax.random.normal(KEY, (5, 16))
  close(jl.apply_fn(mlp, ad, x), mlp(p, x), 1e-6)
  for lw in jl.adapters.lora_weights(ad).values():
    assert not np.any(np.asarray(lw.b))
    assert lw.alpha == 8.0 and lw.rank == 4  # stored with every adapter


def test_kaiming_and_gaussian_init_statistics():
  w = {"k": jnp.zeros((256, 64))}
  a = jl.init_lora(w, jl.LoraConfig(rank=8, targets=("k",)), KEY)["k"].a
  assert a.shape == (256, 8) and float(jnp.max(jnp.abs(a))) <= 1 / math.sqrt(256)
  g = jl.init_lora(w, jl.LoraConfig(rank=8, targets=("k",), init="gaussian"), KEY)["k"].a
  assert abs(float(jnp.std(g)) - 1 / 8) < 0.01


def test_merge_equals_unmerged_and_roundtrip():
  p = mlp_params()
  ad = randomize_b(jl.init_lora(p, jl.LoraConfig(rank=4, alpha=16, targets=(r".*/kernel",)), KEY))
  x = jax.random.normal(KEY, (5, 16))
  merged = jl.merge(ad)
  close(mlp(merged, x), jl.apply_fn(mlp, ad, x), 1e-5)
  # naive merge reference
  lw = ad["l1"]["kernel"]
  close(merged["l1"]["kernel"], p["l1"]["kernel"] + 4.0 * lw.a @ lw.b)
  back = jl.unmerge(merged, ad)
  for path, lw in jl.adapters.lora_weights(back).items():
    close(lw.w, jl.adapters.lora_weights(ad)[path].w, 1e-6)


def test_merge_keeps_base_dtype():
  p = {"k": jnp.ones((8, 8), jnp.bfloat16)}
  ad = randomize_b(jl.init_lora(p, jl.LoraConfig(rank=2, targets=("k",)), KEY))
  assert jl.merge(ad)["k"].dtype == jnp.bfloat16


def test_split_combine_exact():
  p = mlp_params()
  ad = randomize_b(jl.init_lora(p, jl.LoraConfig(rank=4, targets=(r"l1/kernel",), bias="lora_only"), KEY))
  tr, fr = jl.split(ad, bias="lora_only")
  assert tr["l1"]["kernel"].w is None and fr["l1"]["kernel"].a is None
  assert tr["l1"]["bias"] is not None and fr["l1"]["bias"] is None and tr["l2"]["kernel"] is None
  back = jl.combine(tr, fr)
  assert jax.tree.structure(back) == jax.tree.structure(ad)
  for x, y in zip(jax.tree.leaves(back), jax.tree.leaves(ad)):
    assert x is y
  assert len(jax.tree.leaves(tr)) == 3  # a, b, bias


@pytest.mark.parametrize("shape,rank,want", [((512, 512), 1, 1024), ((512, 64), 8, 4608)])
def test_parameter_counts_from_the_paper(shape, rank, want):
  ad = jl.init_lora({"w": jnp.zeros(shape)}, jl.LoraConfig(rank=rank, targets=("w",)), KEY)
  rep = jl.param_report(ad)
  assert rep.trainable == want
  assert rep.total == want + shape[0] * shape[1]
  assert "trainable params: " in str(rep) and "w" in rep.table()


def test_rslora_and_patterns():
  p = {"a": {"kernel": jnp.zeros((16, 16))}, "b": {"kernel": jnp.zeros((16, 16))}}
  cfg = jl.LoraConfig(rank=4, alpha=8, targets=(".*/kernel",), use_rslora=True,
                      rank_pattern={"a/.*": 2}, alpha_pattern={"b/.*": 32})
  ad = jl.init_lora(p, cfg, KEY)
  assert ad["a"]["kernel"].rank == 2 and ad["a"]["kernel"].a.shape == (16, 2)
  assert ad["a"]["kernel"].scale == pytest.approx(8 / math.sqrt(2))
  assert ad["b"]["kernel"].scale == pytest.approx(32 / 2)


def test_pissa_preserves_output_and_uses_principal_directions():
  p = mlp_params()
  ad = jl.init_lora(p, jl.LoraConfig(rank=4, alpha=4, targets=(r".*/kernel",), init="pissa"), KEY)
  x = jax.random.normal(KEY, (5, 16))
  close(jl.apply_fn(mlp, ad, x), mlp(p, x), 1e-4)
  lw = ad["l1"]["kernel"]
  s_full = np.linalg.svd(np.asarray(p["l1"]["kernel"]), compute_uv=False)
  s_res = np.linalg.svd(np.asarray(lw.w), compute_uv=False)
  np.testing.assert_allclose(s_res[:4], s_full[4:8], rtol=1e-4)  # top-4 moved into A·B


# ---------------------------------------------------------------- Linen


class Block(nn.Module):
  @nn.compact
  def __call__(self, x):
    h = nn.Dense(32, name="q_proj")(x)
    h = nn.DenseGeneral((4, 8), name="heads")(h)                     # kernel (32, 4, 8)
    h = nn.Einsum((4, 8, 16), "btnh,nhd->btd", name="out_proj")(h)  # kernel (4, 8, 16)
    return x + nn.Dense(16, use_bias=False, name="mlp")(jax.nn.gelu(h))


def _linen_naive(p, ad, x):
  """Closed form for Block, written out by hand."""
  def lin(name, h, eq):
    w = p[name]["kernel"]
    lw = ad[name]["kernel"]
    a, b, s = lw.a, lw.b, lw.scale
    base = jnp.einsum(eq[0], h, w)
    delta = s * jnp.einsum(eq[2], jnp.einsum(eq[1], h, a), b)
    bias = p[name].get("bias", 0.0)
    if name == "out_proj":
      bias = bias[None, None]
    return base + delta + bias
  h = lin("q_proj", x, ("btd,de->bte", "btd,dr->btr", "btr,re->bte"))
  h = lin("heads", h, ("bte,enh->btnh", "bte,er->btr", "btr,rnh->btnh"))
  h = lin("out_proj", h, ("btnh,nhd->btd", "btnh,nhr->btr", "btr,rd->btd"))
  return x + lin("mlp", jax.nn.gelu(h), ("btd,de->bte", "btd,dr->btr", "btr,re->bte"))


def _linen_setup(rank=3, alpha=6.0):
  m = Block()
  x = jax.random.normal(KEY, (2, 5, 16))
  p = m.init(KEY, x)["params"]
  cfg = jl.LoraConfig(rank=rank, alpha=alpha, targets=(r".*/kernel",), layouts=jl.linen.infer_layouts(m, p, x))
  ad = randomize_b(jl.init_lora(p, cfg, jax.random.key(1)))
  return m, p, ad, x


def test_linen_dense_densegeneral_einsum_closed_form():
  m, p, ad, x = _linen_setup()
  assert dict(jl.LoraConfig(layouts=jl.linen.infer_layouts(m, p, x)).layouts)["heads/kernel"] == "ioo"
  got = jl.linen.apply(m, ad, x)
  close(got, _linen_naive(p, ad, x), 1e-4)
  close(got, m.apply({"params": jl.merge(ad)}, x), 1e-4)
  close(jax.jit(lambda a, x: jl.linen.apply(m, a, x))(ad, x), got, 1e-5)


def test_linen_no_dense_delta_in_the_step():
  """The jitted forward never materializes an (in, out) ΔW: no rank-r outer product of A and B."""
  m, p, ad, x = _linen_setup()
  tr, fr = jl.split(ad)
  step = lambda t, x: jax.grad(lambda t: jnp.sum(jl.linen.apply(m, jl.combine(t, fr), x)))(t)
  jaxpr = jax.make_jaxpr(step)(tr, x)
  ab_pairs = {(tuple(lw.a.reshape(-1, 3).shape), tuple(lw.b.reshape(3, -1).shape)) for lw in jl.adapters.lora_weights(ad).values()}
  n_dots = 0
  for eqn in jaxpr.jaxpr.eqns:
    if eqn.primitive.name == "dot_general":
      n_dots += 1
      shapes = tuple(tuple(v.aval.shape) for v in eqn.invars)
      assert shapes not in ab_pairs, f"dense A@B formed: {shapes}"
  assert n_dots >= 12


def test_linen_gradients_match_merged():
  m, p, ad, x = _linen_setup()
  tr, fr = jl.split(ad)
  def loss_unmerged(t):
    return jnp.sum(jl.linen.apply(m, jl.combine(t, fr), x) ** 2)
  def loss_merged(t):
    return jnp.sum(m.apply({"params": jl.merge(jl.combine(t, fr))}, x) ** 2)
  g1, g2 = jax.grad(loss_unmerged)(tr), jax.grad(loss_merged)(tr)
  for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g2)):
    close(a, b, 2e-4)


def test_linen_scan_stacked_layers_equal_unrolled():
  class ScanBody(nn.Module):
    @nn.compact
    def __call__(self, c, _):
      return Block(name="block")(c), None

  class Model(nn.Module):
    @nn.compact
    def __call__(self, x):
      return nn.scan(ScanBody, variable_axes={"params": 0}, split_rngs={"params": True}, length=3)(
          name="layers")(x, None)[0]

  m = Model()
  x = jax.random.normal(KEY, (2, 5, 16))
  p = m.init(KEY, x)["params"]
  layouts = jl.linen.infer_layouts(m, p, x)
  assert dict(jl.LoraConfig(layouts=layouts).layouts)["layers/block/q_proj/kernel"] == "bio"
  ad = randomize_b(jl.init_lora(p, jl.LoraConfig(rank=2, targets=(r".*/kernel",), layouts=layouts), KEY))
  got = jl.linen.apply(m, ad, x)
  # unrolled reference: layer i uses slice i of every stacked leaf
  ref = x
  for i in range(3):
    sl = jax.tree.map(lambda v: v[i], ad["layers"]["block"])
    pl = jax.tree.map(lambda v: v[i], p["layers"]["block"])
    ref = _linen_naive(pl, sl, ref)
  close(got, ref, 1e-4)
  close(got, m.apply({"params": jl.merge(ad)}, x), 1e-4)


class Custom(nn.Module):
  """Uses its weight with a raw matmul: not interceptable."""
  @nn.compact
  def __call__(self, x):
    w = self.param("kernel", nn.initializers.lecun_normal(), (x.shape[-1], 8))
    return nn.Dense(4, name="head")(jnp.tanh(jnp.einsum("bi,io->bo", x, w)))


def test_linen_fallback_merges_and_warns_once():
  m = Custom()
  x = jax.random.normal(KEY, (3, 16))
  p = m.init(KEY, x)["params"]
  ad = randomize_b(jl.init_lora(p, jl.LoraConfig(rank=2, targets=(r"(.*/)?kernel",)), KEY))
  fallback._warned.clear()
  with pytest.warns(UserWarning, match=r"'kernel' is not used through an interceptable layer"):
    got = jl.linen.apply(m, ad, x)
  close(got, m.apply({"params": jl.merge(ad)}, x), 1e-5)
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    jl.linen.apply(m, ad, x)  # said once, not again
  # gradients still reach A/B through the merged fallback
  tr, fr = jl.split(ad)
  g = jax.grad(lambda t: jnp.sum(jl.linen.apply(m, jl.combine(t, fr), x)))(tr)
  assert float(jnp.abs(g["kernel"].a).sum()) > 0


def test_plain_function_fallback_on_unsupported_use():
  def f(params, x):
    return jl.dot(x, params["a"]) @ params["b"].T  # .T on a LoraWeight is not supported
  p = {"a": jax.random.normal(KEY, (8, 8)), "b": jax.random.normal(KEY, (4, 8))}
  ad = randomize_b(jl.init_lora(p, jl.LoraConfig(rank=2, targets=("a", "b")), KEY))
  x = jnp.ones((2, 8))
  fallback._warned.clear()
  with pytest.warns(UserWarning, match="'b'"):
    got = jl.apply_fn(f, ad, x)
  merged = jl.merge(ad)
  close(got, (x @ merged["a"]) @ merged["b"].T, 1e-5)


def test_dropout_only_on_lora_branch():
  p = mlp_params()
  ad = randomize_b(jl.init_lora(p, jl.LoraConfig(rank=4, targets=(r"l1/kernel",), dropout=0.5), KEY), scale=1.0)
  x = jax.random.normal(KEY, (64, 16))
  y0 = jl.apply_fn(mlp, ad, x)
  y1 = jl.apply_fn(mlp, ad, x, dropout_rng=jax.random.key(3))
  y2 = jl.apply_fn(mlp, ad, x, dropout_rng=jax.random.key(4))
  assert not np.allclose(y1, y0) and not np.allclose(y1, y2)
  # base path is untouched: with B = 0 dropout changes nothing
  ad0 = jl.init_lora(p, jl.LoraConfig(rank=4, targets=(r"l1/kernel",), dropout=0.5), KEY)
  close(jl.apply_fn(mlp, ad0, x, dropout_rng=jax.random.key(3)), mlp(p, x), 1e-6)


# ---------------------------------------------------------------- NNX


class NNXModel(nnx.Module):
  def __init__(self, rngs):
    self.q = nnx.Linear(16, 32, rngs=rngs)
    self.heads = nnx.LinearGeneral(32, (4, 8), rngs=rngs)
    self.out = nnx.Einsum("btnh,nhd->btd", (4, 8, 16), (16,), rngs=rngs)

  def __call__(self, x):
    return self.out(self.heads(self.q(x)))


def test_nnx_linear_general_einsum_closed_form():
  model = NNXModel(nnx.Rngs(0))
  graphdef, state = nnx.split(model)
  cfg = jl.LoraConfig(rank=2, alpha=4, targets=(r".*/kernel",),
                      layouts={"heads/kernel": "ioo", "out/kernel": "iio"})
  ad = randomize_b(jl.init_lora(state, cfg, KEY))
  x = jax.random.normal(KEY, (2, 5, 16))
  got = jl.nnx.apply(graphdef, ad, x)
  want = nnx.merge(graphdef, jl.merge(ad))(x)
  close(got, want, 1e-4)
  # naive closed form for the first layer
  lw = jl.adapters.lora_weights(ad)["q/kernel"]
  want_q = x @ lw.w + lw.scale * (x @ lw.a) @ lw.b + state["q"]["bias"].get_value()
  close(jl.nnx.apply(graphdef, ad, x, method="q"), want_q, 1e-5)
  rep = jl.param_report(ad)
  assert rep.trainable == (16 * 2 + 2 * 32) + (32 * 2 + 2 * 32) + (32 * 2 + 2 * 16)
  # jit + grad w.r.t. the LoRA half only
  tr, fr = jl.split(ad)
  g = jax.jit(jax.grad(lambda t: jnp.sum(jl.nnx.apply(graphdef, jl.combine(t, fr), x) ** 2)))(tr)
  assert jl.adapters.lora_weights(g)["q/kernel"].a.shape == (16, 2)


# ---------------------------------------------------------------- optax


def test_lora_optimizer_state_only_for_ab_and_training_step():
  p = mlp_params()
  ad = jl.init_lora(p, jl.LoraConfig(rank=4, alpha=8, targets=(r".*/kernel",)), KEY)
  tx = jl.lora_optimizer(optax.adam(1e-2))
  st = tx.init(ad)
  n_state = sum(x.size for x in jax.tree.leaves(st) if hasattr(x, "size") and x.ndim > 0)
  assert n_state == 2 * jl.param_report(ad).trainable  # mu and nu of A/B only
  # the recommended step: differentiate the trainable half only
  tr, fr = jl.split(ad)
  opt = optax.adam(1e-2)
  ost = opt.init(tr)
  x = jax.random.normal(KEY, (32, 16))
  y = jax.random.normal(jax.random.key(9), (32, 8))

  @jax.jit
  def step(tr, ost):
    loss, g = jax.value_and_grad(lambda t: jnp.mean((jl.apply_fn(mlp, jl.combine(t, fr), x) - y) ** 2))(tr)
    upd, ost = opt.update(g, ost, tr)
    return optax.apply_updates(tr, upd), ost, loss

  losses = []
  for _ in range(30):
    tr, ost, loss = step(tr, ost)
    losses.append(float(loss))
  assert losses[-1] < 0.8 * losses[0]
  # the full-tree wrapper leaves the base bit-identical
  upd, _ = tx.update(jax.tree.map(jnp.ones_like, ad), st, ad)
  new = optax.apply_updates(ad, upd)
  assert np.array_equal(new["l1"]["bias"], p["l1"]["bias"])
  assert np.array_equal(jl.adapters.lora_weights(new)["l1/kernel"].w, p["l1"]["kernel"])


# ---------------------------------------------------------------- bad input


def test_pattern_matching_nothing_lists_close_matches():
  with pytest.raises(ValueError, match=r"matches no parameter path.*l1/kernel"):
    jl.init_lora(mlp_params(), jl.LoraConfig(targets=("l1/kernal",)), KEY)


@pytest.mark.parametrize("kwargs,msg", [
    (dict(rank=0), "rank must be a positive int"),
    (dict(rank=-2), "rank must be a positive int"),
    (dict(alpha=0), "alpha must be a positive"),
    (dict(dropout=1.0), "dropout"),
    (dict(init="xavier"), "init must be"),
    (dict(layouts={"x": "iq"}), "layouts"),
])
def test_bad_config(kwargs, msg):
  with pytest.raises(ValueError, match=msg):
    jl.LoraConfig(**kwargs)


def test_rank_too_large_names_path():
  with pytest.raises(ValueError, match=r"rank 16 for 'l2/kernel' exceeds min\(d_in, d_out\) = min\(32, 8\)"):
    jl.init_lora(mlp_params(), jl.LoraConfig(rank=16, targets=(r".*/kernel",)), KEY)


def test_bias_target_and_3d_without_layout_are_errors():
  with pytest.raises(ValueError, match="needs a kernel with >= 2 axes"):
    jl.init_lora(mlp_params(), jl.LoraConfig(targets=(r".*",)), KEY)
  with pytest.raises(ValueError, match="layouts"):
    jl.init_lora({"k": jnp.zeros((4, 4, 4))}, jl.LoraConfig(rank=2, targets=("k",)), KEY)


def test_unmerge_shape_mismatch():
  ad = jl.init_lora(mlp_params(), jl.LoraConfig(rank=2, targets=(r"l1/kernel",)), KEY)
  bad = jl.merge(ad)
  bad["l1"]["kernel"] = jnp.zeros((3, 3))
  with pytest.raises(ValueError, match=r"'l1/kernel' has shape \(3, 3\)"):
    jl.unmerge(bad, ad)


def test_adapter_input_mismatch_is_clear():
  ad = jl.init_lora(mlp_params(), jl.LoraConfig(rank=2, targets=(r"l1/kernel",)), KEY)
  with pytest.raises(ValueError, match="do not match"):
    jl.dot(jnp.ones((2, 7)), ad["l1"]["kernel"])


class HandWritten(nn.Module):
  """A custom layer that uses the exported helper: stays unmerged, no warning."""
  @nn.compact
  def __call__(self, x):
    w = self.param("kernel", nn.initializers.lecun_normal(), (x.shape[-1], 8))
    return nn.Dense(4, name="head")(jnp.tanh(jl.dot(x, w)))


def test_linen_hand_written_layer_with_dot_stays_unmerged():
  m = HandWritten()
  x = jax.random.normal(KEY, (3, 16))
  p = m.init(KEY, x)["params"]
  ad = randomize_b(jl.init_lora(p, jl.LoraConfig(rank=2, targets=(r"(.*/)?kernel",)), KEY))
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    got = jl.linen.apply(m, ad, x)
  close(got, m.apply({"params": jl.merge(ad)}, x), 1e-5)
  tr, fr = jl.split(ad)
  jaxpr = jax.make_jaxpr(jax.grad(lambda t: jnp.sum(jl.linen.apply(m, jl.combine(t, fr), x))))(tr)
  shapes = [tuple(tuple(v.aval.shape) for v in e.invars) for e in jaxpr.jaxpr.eqns if e.primitive.name == "dot_general"]
  assert ((16, 2), (2, 8)) not in shapes  # no dense A@B
