"""NNX models written the way Flax's examples and tunix write them: nnx.scan over
vmapped layers, nnx.remat, BatchNorm, Dropout, MultiHeadAttention (LinearGeneral
kernels). LoRA must stay unmerged (no fallback warning), equal the merged model in
values and A/B gradients, and the call must return BatchNorm / RNG state updates."""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jax_lora as jl
from jax_lora import tree as jtree

D, L = 16, 2


class Block(nnx.Module):
  def __init__(self, d, rngs):
    self.lin = nnx.Linear(d, d, rngs=rngs)
    self.bn = nnx.BatchNorm(d, rngs=rngs)
    self.drop = nnx.Dropout(0.3, rngs=rngs)

  def __call__(self, x):
    return x + self.drop(jax.nn.relu(self.bn(self.lin(x))))


class ScanModel(nnx.Module):
  """flax's "scan over layers" example, with remat inside the scanned body."""

  def __init__(self, d, n, rngs):
    @nnx.split_rngs(splits=n)
    @nnx.vmap(in_axes=(0,), out_axes=0)
    def make(rngs):
      return Block(d, rngs)

    self.blocks = make(rngs)
    self.head = nnx.Linear(d, 3, rngs=rngs)

  def __call__(self, x):
    @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=nnx.Carry)
    @nnx.remat
    def f(x, blk):
      return blk(x)

    return self.head(f(x, self.blocks))


class MLP(nnx.Module):
  def __init__(self, d, rngs):
    self.up = nnx.Linear(d, 2 * d, rngs=rngs)
    self.down = nnx.Linear(2 * d, d, rngs=rngs)

  def __call__(self, x):
    return self.down(jax.nn.gelu(self.up(x)))


class RematModel(nnx.Module):
  """tunix-style: each decoder block wrapped in nnx.remat, attention from LinearGeneral kernels."""

  def __init__(self, d, rngs):
    self.attn = nnx.MultiHeadAttention(num_heads=4, in_features=d, qkv_features=d, decode=False, rngs=rngs)
    self.mlps = nnx.List([MLP(d, rngs) for _ in range(L)])
    self.norm = nnx.BatchNorm(d, rngs=rngs)

  def __call__(self, x):
    x = x + self.attn(x)
    for m in self.mlps:
      x = x + nnx.remat(lambda mod, h: mod(h))(m, x)
    return self.norm(x)


def _bumped(adapted):
  """B = small random values, so LoRA changes the output."""
  def f(p, v):
    if isinstance(v, jl.LoraWeight):
      return jl.LoraWeight(w=v.w, a=v.a, b=0.1 * jax.random.normal(jax.random.key(len(p)), v.b.shape),
                           alpha=v.alpha, rank=v.rank, layout=v.layout, path=v.path)
    return v
  return jtree.map_leaves(f, adapted)


def _setup(model_cls, x):
  model = model_cls(D, L, nnx.Rngs(0)) if model_cls is ScanModel else model_cls(D, nnx.Rngs(0))
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  layouts = jl.nnx.infer_layouts(graphdef, params, x, others=(rest,))
  cfg = jl.LoraConfig(rank=2, alpha=4.0, layouts=layouts)
  return graphdef, params, rest, _bumped(jl.init_lora(params, cfg, jax.random.key(1))), layouts


def _plain(graphdef, params, rest, x):
  """The same call on the plain model (merged weights), with its state updates."""
  m = nnx.merge(graphdef, params, rest, copy=True)
  y = m(x)
  return y, nnx.split(m, nnx.Param, ...)[2]


@pytest.mark.parametrize("model_cls", [ScanModel, RematModel], ids=["scan_remat_bn_dropout", "mha_remat"])
def test_unmerged_equals_merged_with_state(model_cls):
  x = jax.random.normal(jax.random.key(5), (6, 5, D)) if model_cls is RematModel else jax.random.normal(
      jax.random.key(5), (6, D))
  graphdef, params, rest, ad, layouts = _setup(model_cls, x)
  if model_cls is ScanModel:
    assert layouts[r"blocks/lin/kernel"] == "bio" and layouts[r"head/kernel"] == "io"
  else:
    assert layouts[r"attn/query/kernel"] == "ioo" and layouts[r"attn/out/kernel"] == "iio"
  with warnings.catch_warnings():
    warnings.simplefilter("error")  # a merged fallback warns: there must be none
    y, (rest1,) = jl.nnx.apply_with_state(graphdef, ad, x, others=(rest,))
    y_again = jl.nnx.apply(graphdef, ad, x, others=(rest,))
  y_ref, rest_ref = _plain(graphdef, jl.merge(ad), rest, x)
  np.testing.assert_allclose(np.asarray(y), np.asarray(y_ref), atol=2e-5, rtol=1e-5)
  np.testing.assert_array_equal(np.asarray(y), np.asarray(y_again))  # same state in, same dropout
  # BatchNorm statistics and RNG counters come back, equal to the plain model's
  for (p, a), b in zip(jtree.leaves(rest1).items(), jtree.leaves(rest_ref).values()):
    if jnp.issubdtype(a.dtype, jnp.number):
      np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5, err_msg=p)
  moved = [p for p, a in jtree.leaves(rest1).items()
           if jnp.issubdtype(a.dtype, jnp.number) and not np.array_equal(np.asarray(a), np.asarray(jtree.leaves(rest)[p]))]
  assert any(p.endswith("mean") for p in moved)
  if model_cls is ScanModel:
    assert any("count" in p for p in moved)
    y2 = jl.nnx.apply(graphdef, ad, x, others=(rest1,))
    assert not np.allclose(np.asarray(y), np.asarray(y2))  # the next call draws new dropout masks


@pytest.mark.parametrize("model_cls", [ScanModel, RematModel], ids=["scan_remat_bn_dropout", "mha_remat"])
def test_grads_unmerged_equal_merged_under_jit(model_cls):
  x = jax.random.normal(jax.random.key(5), (6, 5, D)) if model_cls is RematModel else jax.random.normal(
      jax.random.key(5), (6, D))
  graphdef, params, rest, ad, _ = _setup(model_cls, x)
  trainable, frozen = jl.split(ad)

  @jax.jit
  def unmerged(t):
    return jnp.sum(jl.nnx.apply(graphdef, jl.combine(t, frozen), x, others=(rest,)) ** 2)

  @jax.jit
  def merged(t):
    return jnp.sum(nnx.merge(graphdef, jl.merge(jl.combine(t, frozen)), rest, copy=True)(x) ** 2)

  with warnings.catch_warnings():
    warnings.simplefilter("error")
    lu, gu = jax.value_and_grad(unmerged)(trainable)
  lm, gm = jax.value_and_grad(merged)(trainable)
  np.testing.assert_allclose(float(lu), float(lm), rtol=1e-5)
  ga, gb = jtree.leaves(gu), jtree.leaves(gm)
  assert ga.keys() == gb.keys() and ga
  for p in ga:
    np.testing.assert_allclose(np.asarray(ga[p].a), np.asarray(gb[p].a), atol=1e-4, rtol=1e-4, err_msg=p)
    np.testing.assert_allclose(np.asarray(ga[p].b), np.asarray(gb[p].b), atol=1e-4, rtol=1e-4, err_msg=p)


def test_unmerged_step_has_no_dense_delta():
  """The scanned kernels run unmerged: the jaxpr never holds a (layers, D, D) float product of A and B."""
  x = jax.random.normal(jax.random.key(5), (6, D))
  graphdef, params, rest, ad, _ = _setup(ScanModel, x)
  text = str(jax.make_jaxpr(lambda a: jl.nnx.apply(graphdef, a, x, others=(rest,)))(ad))
  merged_text = str(jax.make_jaxpr(lambda a: nnx.merge(graphdef, jl.merge(a), rest, copy=True)(x))(ad))
  assert "f32[2,16,16] = dot_general" in merged_text  # merging forms the stacked dense delta A@B...
  assert "f32[2,16,16] = dot_general" not in text and "f32[16,16] = dot_general" not in text  # ...unmerged never
  # a rank-2 product x@A exists inside the scan: LoRA is computed on activations
  assert "f32[6,2] = dot_general" in text


def test_quantized_nnx_state_bits_and_apply():
  x = jax.random.normal(jax.random.key(5), (6, 5, 64))
  model = nnx.MultiHeadAttention(num_heads=4, in_features=64, qkv_features=64, decode=False, rngs=nnx.Rngs(0))
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  layouts = jl.nnx.infer_layouts(graphdef, params, x, others=(rest,))
  with warnings.catch_warnings():
    warnings.simplefilter("error")  # no padding warning: blocks run along the input axes
    q = jl.quantize(jl.init_lora(params, jl.LoraConfig(rank=2, layouts=layouts), jax.random.key(1)))
  rep = jl.quant.bits_report(q)
  assert rep.quantized_params == 4 * 64 * 64 and max(rep.per_leaf.values()) <= 4.2
  assert jl.quant.bits_report(nnx.state(model)).quantized_params == 0  # RNG-free float state: no crash
  y = jl.nnx.apply(graphdef, q, x, others=(rest,))
  y_ref = nnx.merge(graphdef, jl.merge(q), rest, copy=True)(x)
  np.testing.assert_allclose(np.asarray(y), np.asarray(y_ref), atol=1e-5)
  rep = jl.param_report(q)
  assert rep.total == 4 * (64 * 64 + 64) + 4 * 2 * (2 * 64)  # kernels + biases + A/B; no RNG leaves counted


class ConvStem(nnx.Module):
  def __init__(self, rngs):
    self.stem = nnx.Conv(3, 8, (3, 3), strides=(2, 2), rngs=rngs)
    self.head = nnx.Linear(8, 4, rngs=rngs)

  def __call__(self, x):
    return self.head(jax.nn.relu(self.stem(x)).mean((1, 2)))


def test_nnx_conv_lora_unmerged_equals_merged():
  x = jax.random.normal(jax.random.key(3), (2, 8, 8, 3))
  graphdef, params = nnx.split(ConvStem(nnx.Rngs(0)))
  cfg = jl.LoraConfig(rank=2, alpha=4.0, targets=("stem", "head"), layouts={"stem/kernel": "iiio"})
  ad = _bumped(jl.init_lora(params, cfg, jax.random.key(1)))
  trainable, frozen = jl.split(ad)
  unmerged = lambda t: jnp.sum(jl.nnx.apply(graphdef, jl.combine(t, frozen), x) ** 2)
  merged = lambda t: jnp.sum(nnx.merge(graphdef, jl.merge(jl.combine(t, frozen)), copy=True)(x) ** 2)
  with warnings.catch_warnings():
    warnings.simplefilter("error")  # the conv runs unmerged: no fallback
    lu, gu = jax.value_and_grad(unmerged)(trainable)
  lm, gm = jax.value_and_grad(merged)(trainable)
  np.testing.assert_allclose(float(lu), float(lm), rtol=1e-5)
  for name in ("a", "b"):
    np.testing.assert_allclose(np.asarray(getattr(gu["stem"]["kernel"].get_value(), name)),
                               np.asarray(getattr(gm["stem"]["kernel"].get_value(), name)), rtol=1e-4, atol=1e-5)
