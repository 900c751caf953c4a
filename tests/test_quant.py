"""Quantization tests: known answers, naive references, pytrees, bits, orbax, merging."""

import dataclasses
import warnings

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jax_lora as jl
from jax_lora import quant as Q


def naive_nf4(w_t: np.ndarray, block: int):
  """Reference NF4 on a (rows, K) float32 array: nearest code per value (argmin, ties low)."""
  x = w_t.astype(np.float32).reshape(-1, block)
  am = np.abs(x).max(1, keepdims=True)
  scaled = np.clip(x * (np.float32(1) / np.maximum(am, np.float32(1e-38))), -1, 1)
  codes = np.argmin(np.abs(scaled[..., None] - Q.NF4_CODE), axis=-1)
  deq = (Q.NF4_CODE[codes] * am).reshape(w_t.shape)
  return codes.reshape(w_t.shape), am.reshape(w_t.shape[0], -1), deq


def naive_int(w_t: np.ndarray, block: int, levels: int):
  x = w_t.astype(np.float32).reshape(-1, block)
  am = np.abs(x).max(1, keepdims=True)
  q = np.clip(np.round(x / np.maximum(am, 1e-38) * levels), -levels, levels)
  return (q / levels * am).reshape(w_t.shape)


def test_codebook_known_answers():
  # qwix's table: [-1, -.5, 0, .8, 1] -> [0, 2, 7, 14, 15]; padded to a 64-value block with zeros.
  w = np.zeros(64, np.float32)
  w[:5] = [-1, -0.5, 0, 0.8, 1]
  q = Q.quantize_array(w, "nf4", 64, double_quant=False)
  assert np.asarray(q.unpacked())[:5].tolist() == [0, 2, 7, 14, 15]
  # packing: first element in the high nibble
  assert int(q.codes[0]) == 0x02 and int(q.codes[1]) == 0x7E and int(q.codes[2]) == 0xF7
  np.testing.assert_array_equal(Q.NF4_CODE[[0, 7, 15]], [-1, 0, 1])


def test_layout_is_transposed_kernel():
  w = np.random.default_rng(0).standard_normal((128, 48)).astype(np.float32)  # Flax (in, out)
  q = Q.quantize_array(w, "nf4", 64, double_quant=False)
  assert q.codes.shape == (48, 64) and q.absmax.shape == (48, 2)  # (out, in/2), (out, in/block)
  codes, am, deq = naive_nf4(w.T, 64)
  np.testing.assert_array_equal(np.asarray(q.unpacked()), codes)
  np.testing.assert_array_equal(np.asarray(q.absmax), am)
  np.testing.assert_array_equal(np.asarray(q.dequantize()), deq.T)
  assert q.shape == (128, 48) and q.dtype == np.float32 and q.ndim == 2 and q.size == 128 * 48


@pytest.mark.parametrize("scheme,levels", [("int4", 7), ("int8", 127)])
def test_int_schemes_vs_naive(scheme, levels):
  w = np.random.default_rng(1).standard_normal((256, 32)).astype(np.float32)
  q = Q.quantize_array(w, scheme, 32, double_quant=False)
  np.testing.assert_allclose(np.asarray(q.dequantize()), naive_int(w.T, 32, levels).T, rtol=1e-6, atol=1e-7)
  assert q.codes.dtype == (jnp.uint8 if scheme == "int4" else jnp.int8)


def test_double_quant_close_to_single():
  w = np.random.default_rng(2).standard_normal((576, 192)).astype(np.float32)
  q1 = Q.quantize_array(w, double_quant=False)
  q2 = Q.quantize_array(w, double_quant=True)
  np.testing.assert_array_equal(np.asarray(q1.codes), np.asarray(q2.codes))
  rel = np.abs(np.asarray(q2.scales()) - np.asarray(q1.absmax)) / np.asarray(q1.absmax)
  assert rel.max() < 0.02  # 8-bit dynamic codes of absmax - mean


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16, jnp.float16])
def test_roundtrip_dtypes_and_stacked(dtype):
  w = jax.random.normal(jax.random.key(0), (3, 128, 16), dtype)  # scan-stacked (layers, in, out)
  q = Q.quantize_array(w, double_quant=False)  # (double quantization's offset is shared by all layers)
  assert q.axis == 1 and q.codes.shape == (3, 16, 64)
  d = q.dequantize()
  assert d.shape == w.shape and d.dtype == dtype
  for i in range(3):
    np.testing.assert_array_equal(np.asarray(d[i]), np.asarray(Q.quantize_array(w[i], double_quant=False).dequantize()))
  assert q.dequantize(jnp.bfloat16).dtype == jnp.bfloat16


def test_padding_when_block_does_not_divide():
  w = np.random.default_rng(3).standard_normal((100, 8)).astype(np.float32)
  q = Q.quantize_array(w, "nf4", 64, double_quant=False)
  assert q.padded == 128 and q.codes.shape == (8, 64)
  ref = np.pad(w.T, ((0, 0), (0, 28)))
  np.testing.assert_array_equal(np.asarray(q.dequantize()), naive_nf4(ref, 64)[2][:, :100].T)


def test_zero_blocks_and_bad_input():
  z = Q.quantize_array(np.zeros((128, 4), np.float32))
  np.testing.assert_array_equal(np.asarray(z.dequantize()), 0)
  bad = np.ones((64, 4), np.float32)
  bad[3, 1] = np.nan
  with pytest.raises(ValueError, match="NaN or inf"):
    Q.quantize_array(bad)
  bad[3, 1] = np.inf
  with pytest.raises(ValueError, match="NaN or inf"):
    Q.quantize_array(bad)
  with pytest.raises(ValueError, match="float arrays"):
    Q.quantize_array(np.ones((64, 4), np.int32))
  with pytest.raises(ValueError, match="block_size"):
    Q.quantize_array(np.ones((64, 4), np.float32), block_size=63)
  with pytest.raises(ValueError, match="scheme"):
    Q.QuantConfig(scheme="fp4")


def _params():
  k = jax.random.split(jax.random.key(0), 4)
  return {"embed": {"embedding": jax.random.normal(k[0], (512, 64))},
          "layer": {"q_proj": {"kernel": jax.random.normal(k[1], (64, 128)), "bias": jnp.zeros(128)},
                    "norm": {"scale": jnp.ones(64)}},
          "small": {"kernel": jax.random.normal(k[2], (8, 8))}}


def test_quantize_pytree_targets():
  p = _params()
  q = Q.quantize(p, Q.QuantConfig())
  assert isinstance(q["layer"]["q_proj"]["kernel"], Q.QuantizedArray)
  for path in (("embed", "embedding"), ("layer", "norm", "scale"), ("small", "kernel"), ("layer", "q_proj", "bias")):
    leaf = q
    for s in path:
      leaf = leaf[s]
    assert not isinstance(leaf, Q.QuantizedArray), path
  q2 = Q.quantize(p, Q.QuantConfig(targets=(r".*/kernel",), scheme="int8", double_quant=False))
  assert isinstance(q2["small"]["kernel"], Q.QuantizedArray)
  with pytest.raises(ValueError, match="matches no parameter path"):
    Q.quantize(p, Q.QuantConfig(targets=(r".*/k_proj/kernel",)))
  back = Q.dequantize(q)
  assert jax.tree.structure(back) == jax.tree.structure(p)
  err = np.abs(np.asarray(back["layer"]["q_proj"]["kernel"]) - np.asarray(p["layer"]["q_proj"]["kernel"]))
  assert err.max() < 0.5 and err.mean() < 0.1


def test_quantize_under_jit_and_dequantize_in_jit():
  w = jax.random.normal(jax.random.key(1), (128, 32))
  q = jax.jit(lambda w: Q.quantize_array(w))(w)
  eager = Q.quantize_array(w)
  for a, b in zip(jax.tree.leaves(q), jax.tree.leaves(eager)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  # under jit XLA may fuse code·nested_absmax + offset into one FMA: 1-ulp differences
  np.testing.assert_allclose(np.asarray(jax.jit(lambda q: q.dequantize())(q)), np.asarray(eager.dequantize()), rtol=1e-6)


def test_bits_measured_from_arrays():
  w = {"a": {"kernel": jnp.ones((576, 1536))}}
  n = 576 * 1536
  nblk = n // 64
  r1 = Q.bits_report(Q.quantize(w, Q.QuantConfig(double_quant=False)))
  assert r1.quantized_bits == n * 4 + nblk * 32
  assert r1.bits_per_param == pytest.approx(4.5)
  r2 = Q.bits_report(Q.quantize(w, Q.QuantConfig()))
  assert r2.quantized_bits == n * 4 + nblk * 8 + -(-nblk // 256) * 32 + 32
  assert r2.bits_per_param < 4.13


def test_orbax_roundtrip_exact(tmp_path):
  import orbax.checkpoint as ocp
  tree = Q.quantize(_params(), Q.QuantConfig(min_size=64))
  path = tmp_path / "ckpt"
  with ocp.StandardCheckpointer() as ckpt:
    ckpt.save(path, tree)
  with ocp.StandardCheckpointer() as ckpt:
    back = ckpt.restore(path, jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), tree))
  assert jax.tree.structure(back) == jax.tree.structure(tree)
  for a, b in zip(jax.tree.leaves(tree), jax.tree.leaves(back)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  k = back["layer"]["q_proj"]["kernel"]
  np.testing.assert_array_equal(np.asarray(k.dequantize()), np.asarray(tree["layer"]["q_proj"]["kernel"].dequantize()))


def _adapted():
  p = {"dense": {"kernel": jax.random.normal(jax.random.key(3), (128, 64)), "bias": jnp.zeros(64)}}
  q = Q.quantize(p, Q.QuantConfig(min_size=1))
  ad = jl.init_lora(q, jl.LoraConfig(rank=4, alpha=8.0, targets=(r"dense/kernel",)), jax.random.key(4))
  lw = ad["dense"]["kernel"]
  lw = dataclasses.replace(lw, b=jax.random.normal(jax.random.key(5), lw.b.shape) * 0.1)
  return p, {"dense": {"kernel": lw, "bias": p["dense"]["bias"]}}


def test_merge_quantized_onto_dequant():
  _, ad = _adapted()
  lw = ad["dense"]["kernel"]
  want = np.asarray(lw.w.dequantize()) + 2.0 * np.asarray(lw.a) @ np.asarray(lw.b)
  merged, rep = Q.merge_quantized(ad, requantize=False)
  np.testing.assert_allclose(np.asarray(merged["dense"]["kernel"]), want, rtol=1e-5, atol=1e-5)
  assert rep == {}
  rq, rep = Q.merge_quantized(ad, requantize=True)
  k = rq["dense"]["kernel"]
  assert isinstance(k, Q.QuantizedArray) and k.double_quant
  err = np.asarray(k.dequantize()) - want
  e = rep["dense/kernel"]
  assert e.max_abs == pytest.approx(np.abs(err).max(), rel=1e-5)
  assert e.rel_frobenius == pytest.approx(np.linalg.norm(err) / np.linalg.norm(want), rel=1e-4)
  assert 0 < e.rel_frobenius < 0.2


def test_linen_apply_with_quantized_base():
  _, ad = _adapted()
  x = jax.random.normal(jax.random.key(6), (5, 128))
  lw = ad["dense"]["kernel"]
  y = jl.linen.apply(nn.Dense(64), ad["dense"], x)
  w = lw.w.dequantize(jnp.float32)
  want = x @ w + 2.0 * (x @ lw.a) @ lw.b
  np.testing.assert_allclose(np.asarray(y, np.float32), np.asarray(want), rtol=2e-2, atol=2e-2)


def test_shard_specs_cut_at_blocks():
  from jax.sharding import PartitionSpec as P
  q = Q.quantize_array(jnp.ones((256, 64)))
  s = q.shard_specs(P(None, "model"), {"model": 4})
  assert s.codes == P("model", None) and s.absmax_codes == P("model", None) and s.nested_absmax == P()
  assert q.shard_specs(P("model", None), {"model": 4}).codes == P(None, "model")
  with pytest.raises(ValueError, match="blocks"):
    q.shard_specs(P("model", None), {"model": 8})


def test_loftq_reduces_quantization_error():
  from jax_lora import quant as loftq
  k = jax.random.split(jax.random.key(7), 3)
  # a weight with a strong low-rank part, like trained layers
  w = jax.random.normal(k[0], (256, 128)) * 0.1 + jax.random.normal(k[1], (256, 4)) @ jax.random.normal(k[2], (4, 128))
  plain = np.linalg.norm(np.asarray(w - Q.quantize_array(w).dequantize()))
  errs = []
  for n in (1, 3):
    q, a, b = loftq.loftq_init(w, 8, n_iter=n, scale=2.0)
    assert a.shape == (256, 8) and b.shape == (8, 128)
    errs.append(np.linalg.norm(np.asarray(w - q.dequantize() - 2.0 * a @ b)))
  assert errs[0] < plain and errs[1] <= errs[0] * 1.01
  with pytest.raises(ValueError, match="rank"):
    loftq.loftq_init(w, 0)
  p = {"dense": {"kernel": w, "bias": jnp.zeros(128)}}
  ad = loftq.init_loftq(p, jl.LoraConfig(rank=8, alpha=16.0, targets=(r"dense/kernel",)), Q.QuantConfig(min_size=1),
                        jax.random.key(0), n_iter=2)
  lw = ad["dense"]["kernel"]
  assert isinstance(lw.w, Q.QuantizedArray)
  merged = np.asarray(jl.merge(ad)["dense"]["kernel"])
  assert np.linalg.norm(merged - np.asarray(w)) < plain


def test_stacked_kernel_slices_like_nn_scan():
  """nn.scan slices every data field of a stacked kernel; each slice must equal that layer quantized alone."""
  from jax_lora.quant import quantize_array
  w = jax.random.normal(jax.random.key(3), (3, 128, 48))
  for dq in (False, True):
    q = quantize_array(w, block_size=64, double_quant=dq, dq_block_size=8)
    for i in range(3):
      layer = jax.tree.map(lambda x: x[i], q)
      alone = quantize_array(w[i], block_size=64, double_quant=dq, dq_block_size=8)
      np.testing.assert_allclose(np.asarray(layer.dequantize()), np.asarray(alone.dequantize()), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(np.asarray(q.dequantize()[1]), np.asarray(quantize_array(w[1], block_size=64, double_quant=dq, dq_block_size=8).dequantize()), rtol=1e-6, atol=1e-7)


def test_multi_axis_blocks_equal_flattened_kernel():
  """(heads, head_dim, out) blocked along heads·head_dim == the (heads·head_dim, out) kernel quantized."""
  w = jax.random.normal(jax.random.key(4), (4, 16, 32))
  q = Q.quantize_array(w, axis=(0, 1))
  flat = Q.quantize_array(w.reshape(64, 32))
  assert q.axes == (0, 1) and q.padded == 64 and q.codes.shape == flat.codes.shape == (32, 32)
  np.testing.assert_array_equal(np.asarray(q.codes), np.asarray(flat.codes))
  np.testing.assert_array_equal(np.asarray(q.dequantize()), np.asarray(flat.dequantize()).reshape(4, 16, 32))


@pytest.mark.parametrize("shape,layout,axes", [
    ((64, 4, 16), "ioo", 0),          # DenseGeneral q/k/v (in, heads, head_dim)
    ((4, 16, 64), "iio", (0, 1)),     # DenseGeneral out (heads, head_dim, out)
    ((3, 64, 32), "bio", 1),          # nn.scan-stacked (layers, in, out)
    ((64, 3, 32), "ibo", 0),          # t5x (in, layers, out)
    ((64, 128), "oi", 1),             # Equinox / PyTorch (out, in)
], ids=["mha_qkv", "mha_out", "scan_stack", "t5x_stack", "torch_oi"])
def test_default_axis_is_the_input_axes(shape, layout, axes):
  w = jax.random.normal(jax.random.key(0), shape)
  with warnings.catch_warnings():
    warnings.simplefilter("error")  # no padding warning
    by_layout = Q.quantize({"k": {"kernel": w}}, Q.QuantConfig(layouts={"k/kernel": layout}))["k"]["kernel"]
    adapted = jl.init_lora({"k": {"kernel": w}}, jl.LoraConfig(rank=2, layouts={"k/kernel": layout}), jax.random.key(1))
    via_lora = Q.quantize(adapted)["k"]["kernel"].w
  assert by_layout.axis == via_lora.axis == axes
  assert Q.bits_report({"k": by_layout}).bits_per_param <= 4.2
  if layout != "oi":  # without a layout the guess finds the same axes
    assert Q.quantize({"k": {"kernel": w}})["k"]["kernel"].axis == axes
  err = np.abs(np.asarray(by_layout.dequantize()) - np.asarray(w))
  assert err.max() < 0.6 and err.mean() < 0.1


def test_padding_warns_and_merge_dequantizes_unadapted():
  p = {"a": {"kernel": jnp.ones((100, 48))}, "lm_head": {"kernel": jnp.ones((64, 80))}}
  with pytest.warns(UserWarning, match=r"'a/kernel' .* padded by 28%"):
    q = Q.quantize(p)
  ad = jl.init_lora(q, jl.LoraConfig(rank=2, targets=("a",)), jax.random.key(0))
  merged = jl.merge(ad)
  assert all(isinstance(v, jax.Array) for v in jax.tree.leaves(merged))  # lm_head dequantized too
  np.testing.assert_array_equal(np.asarray(merged["lm_head"]["kernel"]), np.asarray(q["lm_head"]["kernel"].dequantize()))
  plain, _ = Q.merge_quantized(ad)
  assert all(isinstance(v, jax.Array) for v in jax.tree.leaves(plain))
  kept, _ = Q.merge_quantized(ad, requantize=True)
  assert isinstance(kept["lm_head"]["kernel"], Q.QuantizedArray)


def test_bits_and_param_report_skip_non_arrays():
  tree = {"k": {"kernel": jnp.ones((64, 64))}, "rng": jax.random.key(0), "count": jnp.zeros((), jnp.uint32),
          "fn": jax.nn.relu}
  q = Q.quantize(tree, Q.QuantConfig(targets=("k/kernel",)))
  rep = Q.bits_report(q)
  assert (rep.quantized_params, rep.float_params, rep.float_bits) == (4096, 2, 64 + 32)  # a key (its 2 uint32) + the counter
  assert jl.param_report(q).total == 4096  # keys, counters and functions are not parameters
