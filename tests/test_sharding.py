"""Sharded LoRA training equals the naive single-device loop, on 8 fake CPU devices."""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

import jax_lora as jl
import jax_lora.adapters  # noqa: F401 - jl.adapters
from jax_lora import sharding as sh

KEY = jax.random.key(0)
D, F, STEPS = 16, 32, 3
TARGETS = (r".*(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)/kernel",)


class Block(nn.Module):
  """A transformer-shaped block (attention + gated MLP) with Llama module names."""

  @nn.compact
  def __call__(self, x):
    q = nn.Dense(D, name="q_proj")(x)
    k = nn.Dense(D, name="k_proj")(x)
    v = nn.Dense(D, name="v_proj")(x)
    att = jax.nn.softmax(jnp.einsum("btd,bsd->bts", q, k) / 4.0, axis=-1)
    x = x + nn.Dense(D, use_bias=False, name="o_proj")(jnp.einsum("bts,bsd->btd", att, v))
    h = jax.nn.silu(nn.Dense(F, use_bias=False, name="gate_proj")(x)) * nn.Dense(F, use_bias=False, name="up_proj")(x)
    return x + nn.Dense(D, use_bias=False, name="down_proj")(h)


class Model(nn.Module):
  n_layers: int = 1

  @nn.compact
  def __call__(self, x):
    for i in range(self.n_layers):
      x = Block(name=f"layers_{i}")(x)
    return x


def randomize_b(adapted, scale=0.1):
  """B = 0 at init; a non-zero B makes A's gradient non-zero from step one."""
  def f(x):
    if isinstance(x, jl.LoraWeight):
      k = jax.random.fold_in(KEY, len(x.path))
      return dataclasses.replace(x, b=scale * jax.random.normal(k, x.b.shape, x.b.dtype))
    return x
  return jax.tree.map(f, adapted, is_leaf=lambda x: isinstance(x, jl.LoraWeight))


def make_batch(n=8, t=4):
  kx, ky = jax.random.split(jax.random.key(7))
  return {"x": jax.random.normal(kx, (n, t, D)), "y": jax.random.normal(ky, (n, t, D))}


def setup(model=None):
  model = model or Model()
  batch = make_batch()
  params = model.init(KEY, batch["x"])["params"]
  cfg = jl.LoraConfig(rank=4, alpha=8.0, targets=TARGETS, layouts=jl.linen.infer_layouts(model, params, batch["x"]))
  adapted = randomize_b(jl.init_lora(params, cfg, jax.random.key(1)))

  def loss_fn(ad, b):
    return jnp.mean((jl.linen.apply(model, ad, b["x"]) - b["y"]) ** 2)

  return model, adapted, batch, loss_fn


TX = optax.adamw(1e-3, weight_decay=0.01)


def naive_train(loss_fn, adapted, batch, steps=STEPS):
  """Reference: plain jax.grad + optax on one device, no sharding code involved."""
  tr, fr = jl.split(adapted)
  state = TX.init(tr)
  losses = []
  vg = jax.jit(jax.value_and_grad(lambda t, fr, b: loss_fn(jl.combine(t, fr), b)))
  for _ in range(steps):
    loss, g = vg(tr, fr, batch)
    up, state = TX.update(g, state, tr)
    tr = optax.apply_updates(tr, up)
    losses.append(float(loss))
  return np.array(losses), tr


def sharded_train(loss_fn, adapted, batch, mesh, rules, steps=STEPS, **kw):
  shard = sh.param_shardings(adapted, rules, mesh)
  tr_sh, fr_sh = jl.split(shard)
  tr, fr = jl.split(adapted)
  tr, fr = sh.place(tr, tr_sh), sh.place(fr, fr_sh)
  bsh = sh.batch_sharding(mesh, rules)
  state = sh.init_opt_state(TX, tr, tr_sh, mesh, memory_kind="pinned_host" if kw.get("offload_opt_state") else None)
  step = sh.make_train_step(loss_fn, TX, mesh, shard, bsh, **kw)
  batch = jax.device_put(batch, bsh)
  losses = []
  for _ in range(steps):
    tr, state, loss = step(tr, state, fr, batch)
    losses.append(float(loss))
  return np.array(losses), tr, state, fr


def close_trees(a, b, rtol=1e-5):
  la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
  assert len(la) == len(lb) and la
  for x, y in zip(la, lb):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=rtol, atol=rtol * float(np.max(np.abs(y))))


MESHES = {
    "data8": ({"data": 8}, sh.data_parallel("data")),
    "fsdp8": ({"data": 8}, sh.fsdp("data")),
    "tp8": ({"model": 8}, sh.tensor_parallel("model")),
    "fsdp_tp_2x4": ({"data": 2, "model": 4}, sh.fsdp_tp()),
    "fsdp_tp_4x2": ({"data": 4, "model": 2}, sh.fsdp_tp()),
}


@pytest.fixture(scope="module")
def reference():
  model, adapted, batch, loss_fn = setup()
  losses, tr = naive_train(loss_fn, adapted, batch)
  return model, adapted, batch, loss_fn, losses, tr


@pytest.mark.parametrize("name", list(MESHES))
def test_lora_steps_on_meshes_equal_single_device(reference, name):
  _, adapted, batch, loss_fn, ref_losses, ref_tr = reference
  axes, rules = MESHES[name]
  mesh = sh.make_mesh(axes)
  losses, tr, state, _ = sharded_train(loss_fn, adapted, batch, mesh, rules)
  np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)
  assert losses[-1] < losses[0]
  close_trees(tr, ref_tr)
  # optimizer moments live exactly where their parameters live
  mu = state[0].mu
  for p, lw in jl.adapters.lora_weights(tr).items():
    m = jl.adapters.lora_weights(mu)[p]
    assert m.a.sharding.is_equivalent_to(lw.a.sharding, 3) and m.b.sharding.is_equivalent_to(lw.b.sharding, 3)


def test_pmap_steps_equal_single_device(reference):
  _, adapted, batch, loss_fn, ref_losses, ref_tr = reference
  tr, fr = jl.split(adapted)
  step = sh.make_pmap_train_step(loss_fn, TX)
  tr_r, st_r, fr_r = sh.replicate(tr), sh.replicate(TX.init(tr)), sh.replicate(fr)
  b = sh.shard_batch(batch)
  losses = []
  for _ in range(STEPS):
    tr_r, st_r, loss = step(tr_r, st_r, fr_r, b)
    losses.append(float(loss[0]))
  np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)
  close_trees(sh.unreplicate(tr_r), ref_tr)


def test_lora_specs_follow_the_kernel():
  a, b = sh.lora_specs(P("data", "model"), "io")
  assert a == P("data", None) and b == P(None, "model")
  a, b = sh.lora_specs(P(None, "data", "model"), "bio")  # scanned: layer axis kept on both
  assert a == P(None, "data", None) and b == P(None, None, "model")
  a, b = sh.lora_specs(P("x", None, "model"), "iio")
  assert a == P("x", None, None) and b == P(None, "model")


def test_tp_rules_are_megatron_and_fsdp_shrinks_base_bytes(reference):
  _, adapted, _, _, _, _ = reference
  mesh = sh.make_mesh({"data": 2, "model": 4})
  specs = sh.param_specs(adapted, sh.fsdp_tp(), mesh)
  lay = specs["layers_0"]
  assert lay["q_proj"]["kernel"].w == P("data", "model") and lay["q_proj"]["bias"] == P("model")
  assert lay["o_proj"]["kernel"].w == P("model", "data") and lay["down_proj"]["kernel"].a == P("model", None)
  assert lay["up_proj"]["kernel"].b == P(None, "model")
  _, fr = jl.split(adapted)
  kernels = {p: lw.w for p, lw in jl.adapters.lora_weights(fr).items()}
  full = sum(int(w.nbytes) for w in kernels.values())
  per_dev = {}
  for name in ("data8", "fsdp8", "fsdp_tp_2x4"):
    axes, rules = MESHES[name]
    m = sh.make_mesh(axes)
    shard = {p: s.w for p, s in jl.adapters.lora_weights(sh.param_shardings(adapted, rules, m)).items()}
    per_dev[name] = sh.bytes_per_device(sh.place(kernels, shard))
  print("base kernel bytes per device:", full, per_dev)
  assert per_dev["data8"] == full
  assert per_dev["fsdp8"] == full // 8 and per_dev["fsdp_tp_2x4"] == full // 8


def test_remat_gives_same_steps(reference):
  _, adapted, batch, loss_fn, ref_losses, ref_tr = reference
  mesh = sh.make_mesh({"data": 2, "model": 4})
  losses, tr, _, _ = sharded_train(loss_fn, adapted, batch, mesh, sh.fsdp_tp(), remat=True,
                                   remat_policy=jax.checkpoint_policies.nothing_saveable)
  np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)
  close_trees(tr, ref_tr)


def test_host_offload_of_opt_state_and_base(reference):
  _, adapted, batch, loss_fn, ref_losses, ref_tr = reference
  mesh = sh.make_mesh({"data": 2, "model": 4})
  losses, tr, state, fr = sharded_train(loss_fn, adapted, batch, mesh, sh.fsdp_tp(), offload_opt_state=True)
  np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)
  close_trees(tr, ref_tr)
  assert {x.sharding.memory_kind for x in jax.tree.leaves(state)} == {"pinned_host"}
  shard = sh.param_shardings(adapted, sh.fsdp_tp(), mesh)
  with pytest.raises(ValueError, match="no memory kind 'hbm_nowhere'.*offload"):
    sh.with_memory_kind(shard, "hbm_nowhere")


def test_host_offload_of_frozen_base(reference):
  _, adapted, batch, loss_fn, ref_losses, ref_tr = reference
  mesh = sh.make_mesh({"data": 8})
  rules = sh.fsdp("data")
  shard = sh.param_shardings(adapted, rules, mesh)
  tr_sh, fr_sh = jl.split(shard)
  tr, fr = jl.split(adapted)
  tr, fr = sh.place(tr, tr_sh), sh.place(fr, sh.with_memory_kind(fr_sh, "pinned_host"))
  state = sh.init_opt_state(TX, tr, tr_sh, mesh)
  step = sh.make_train_step(loss_fn, TX, mesh, shard, sh.batch_sharding(mesh, rules), offload_frozen=True)
  for i in range(STEPS):
    tr, state, loss = step(tr, state, fr, batch)
    np.testing.assert_allclose(float(loss), ref_losses[i], rtol=1e-5)
  close_trees(tr, ref_tr)
  assert {x.sharding.memory_kind for x in jax.tree.leaves(fr)} == {"pinned_host"}


# ---------------------------------------------------------------- scanned layers


class ScanBody(nn.Module):
  @nn.compact
  def __call__(self, c, _):
    return Block(name="block")(c), None


class ScanModel(nn.Module):
  n_layers: int = 2
  remat: bool = False

  @nn.compact
  def __call__(self, x):
    body = nn.remat(ScanBody, prevent_cse=False) if self.remat else ScanBody
    return nn.scan(body, variable_axes={"params": 0}, split_rngs={"params": True}, length=self.n_layers)(
        name="layers")(x, None)[0]


def unstack(adapted_scan, n):
  """Unrolled twin: layers_i gets slice i of every stacked leaf (layouts drop the 'b')."""
  def sl(x, i):
    if isinstance(x, jl.LoraWeight):
      return dataclasses.replace(x, w=x.w[i], a=x.a[i], b=x.b[i], layout=x.layout[1:],
                                 path=x.path.replace("layers/block", f"layers_{i}"))
    return x[i]
  blk = adapted_scan["layers"]["block"]
  return {f"layers_{i}": jax.tree.map(lambda x: sl(x, i), blk, is_leaf=lambda x: isinstance(x, jl.LoraWeight))
          for i in range(n)}


@pytest.mark.parametrize("remat", [True])  # nn.remat inside nn.scan; plain jax.checkpoint: test_remat_gives_same_steps
def test_scanned_model_sharded_equals_unrolled(remat):
  model, adapted, batch, loss_fn = setup(ScanModel(remat=remat))
  assert jl.adapters.lora_weights(adapted)["layers/block/q_proj/kernel"].layout == "bio"
  mesh = sh.make_mesh({"data": 2, "model": 4})
  specs = sh.param_specs(adapted, sh.fsdp_tp(), mesh)
  assert specs["layers"]["block"]["q_proj"]["kernel"].a == P(None, "data", None)  # layer axis replicated
  losses, tr, _, _ = sharded_train(loss_fn, adapted, batch, mesh, sh.fsdp_tp())
  _, _, _, loss_u = setup(Model(n_layers=2))
  unrolled = unstack(adapted, 2)
  ref_losses, ref_tr = naive_train(loss_u, unrolled, batch)
  np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)
  close_trees(unstack(jl.combine(tr, jl.split(adapted)[1]), 2), jl.combine(ref_tr, jl.split(unrolled)[1]))


# ---------------------------------------------------------------- config and errors


def test_mesh_from_config():
  mesh, rules = sh.mesh_from_config({"axes": {"data": 2, "model": 4}, "rules": "fsdp_tp"})
  assert dict(mesh.shape) == {"data": 2, "model": 4} and rules.batch == ("data",)
  assert all(t == jax.sharding.AxisType.Auto for t in mesh.axis_types)
  assert rules.raw_spec("layers_0/q_proj/kernel") == P("data", "model")
  mesh, rules = sh.mesh_from_config({"axes": {"data": -1}, "rules": "data_parallel"})
  assert mesh.shape["data"] == 8 and rules.raw_spec("x/kernel") == P()
  mesh, rules = sh.mesh_from_config({"axes": {"data": 8}, "rules": [[".*/kernel", ["data", None]]], "batch": ["data"]})
  assert rules.raw_spec("a/kernel") == P("data", None) and rules.batch == ("data",)
  _, rules = sh.mesh_from_config({"axes": {"data": 8}, "rules": "fsdp", "kernel_dim": "out"})
  assert rules.raw_spec("a/kernel") == P(None, "data")


@pytest.mark.parametrize("cfg,msg", [
    ({"axes": {"data": 3}}, "need 3 devices but 8"),
    ({"axes": {"data": 8}, "rules": "zero3"}, "not a preset"),
    ({"axes": {"data": 8}, "rules": "fsdp_tp"}, "needs a 2-D mesh"),
    ({"axes": {"data": 8}, "mesh": 1}, "unknown keys"),
    ({"axes": {"data": 8}, "batch": ["dp"]}, "not a mesh axis"),
    ({"axes": {"data": 8}, "rules": "fsdp", "kernel_dim": "rows"}, "kernel_dim must be 'in' or 'out'"),
])
def test_bad_mesh_config(cfg, msg):
  with pytest.raises(ValueError, match=msg):
    sh.mesh_from_config(cfg)


def test_indivisible_dimension_errors_or_replicates():
  mesh = sh.make_mesh({"data": 8})
  rules = sh.ShardingRules(rules=((r"w", P("data", None)),))
  with pytest.raises(ValueError, match=r"'w': dimension 0 of shape \(12, 16\).*not divisible.*strict=False"):
    rules.spec("w", (12, 16), mesh)
  lax = dataclasses.replace(rules, strict=False)
  with pytest.warns(UserWarning, match="replicating"):
    assert lax.spec("w", (12, 16), mesh) == P(None, None)
  with pytest.raises(ValueError, match="mesh axis 'model'"):
    sh.ShardingRules(rules=((r"w", P("model")),)).spec("w", (16,), mesh)
  with pytest.raises(ValueError, match="has 2 entries"):
    sh.ShardingRules(rules=((r"w", P("data", None)),)).spec("w", (16,), mesh)
  assert sh.ShardingRules(rules=((r"w", P("data", None)),)).unused(["v"]) == ["w"]


def test_pmap_batch_must_divide():
  with pytest.raises(ValueError, match="not divisible by 8 devices"):
    sh.shard_batch({"x": jnp.zeros((6, 2))}, 8)


# ---------------------------------------------------------------- QLoRA (NF4 bases)


def quantized(adapted, block_size, double_quant=True):
  import jax_lora.quant as quant
  cfg = quant.QuantConfig(block_size=block_size, double_quant=double_quant, dq_block_size=4, targets=TARGETS)
  return quant.quantize(adapted, cfg)


QMESHES = {  # NF4 blocks of 2 fit every shard of these meshes (16 inputs / 8 = 2)
    "data8": ({"data": 8}, sh.data_parallel("data")),
    "fsdp8": ({"data": 8}, sh.fsdp("data")),
    "fsdp_tp_2x4": ({"data": 2, "model": 4}, sh.fsdp_tp()),
    "fsdp_tp_4x2": ({"data": 4, "model": 2}, sh.fsdp_tp()),
}


@pytest.fixture(scope="module")
def qreference():
  _, adapted, batch, loss_fn = setup()
  qad = quantized(adapted, 2)
  return batch, loss_fn, (qad,) + naive_train(loss_fn, qad, batch), adapted


@pytest.mark.parametrize("name", list(QMESHES))
def test_qlora_steps_on_meshes_equal_single_device(qreference, name):
  batch, loss_fn, (qad, ref_losses, ref_tr), _ = qreference
  axes, rules = QMESHES[name]
  mesh = sh.make_mesh(axes)
  losses, tr, _, fr = sharded_train(loss_fn, qad, batch, mesh, rules)
  np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)
  close_trees(tr, ref_tr)
  q = fr["layers_0"]["q_proj"]["kernel"].w
  full = sum(int(x.nbytes) for x in jax.tree.leaves(q))
  got = sh.bytes_per_device(q)
  print(f"{name}: q_proj NF4 bytes per device {got} of {full}")
  if name == "fsdp8":  # codes and absmax codes split 8 ways; the nested constants stay replicated
    assert got == (q.codes.nbytes + q.absmax_codes.nbytes) // 8 + q.nested_absmax.nbytes + q.offset.nbytes


def test_qlora_pmap_equals_single_device(qreference):
  batch, loss_fn, (qad, ref_losses, ref_tr), _ = qreference
  tr, fr = jl.split(qad)
  step = sh.make_pmap_train_step(loss_fn, TX)
  tr_r, st_r, fr_r = sh.replicate(tr), sh.replicate(TX.init(tr)), sh.replicate(fr)
  losses = []
  for _ in range(STEPS):
    tr_r, st_r, loss = step(tr_r, st_r, fr_r, sh.shard_batch(batch))
    losses.append(float(loss[0]))
  np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)
  close_trees(sh.unreplicate(tr_r), ref_tr)


def test_quantized_specs_cut_only_at_block_boundaries(qreference):
  _, _, (qad, _, _), adapted = qreference
  mesh = sh.make_mesh({"data": 2, "model": 4})
  specs = sh.param_specs(qad, sh.fsdp_tp(), mesh)
  q = specs["layers_0"]["q_proj"]["kernel"].w  # kernel P(data, model); stored as (out, in)
  assert q.codes == P("model", "data") and q.absmax_codes == P("model", "data") and q.nested_absmax == P()
  q4 = quantized(adapted, 4)
  with pytest.raises(ValueError, match=r"layers_0/.*cuts 4-value blocks"):
    sh.param_specs(q4, sh.fsdp("data"), sh.make_mesh({"data": 8}))  # 16 inputs / 8 = 2 < 4
  with pytest.warns(UserWarning, match="replicating"):
    lax = sh.param_specs(q4, sh.fsdp("data", strict=False), sh.make_mesh({"data": 8}))
  assert lax["layers_0"]["q_proj"]["kernel"].w.codes == P(None, None)
  out = sh.param_specs(q4, sh.fsdp("data", kernel_dim="out"), sh.make_mesh({"data": 8}))  # never cuts blocks
  assert out["layers_0"]["q_proj"]["kernel"].w.codes == P("data", None)
  assert out["layers_0"]["q_proj"]["kernel"].b == P(None, "data")


@pytest.mark.parametrize("double_quant", [False, True])
def test_scanned_qlora_equals_unrolled(double_quant):
  import jax_lora.quant as quant
  model, adapted, batch, loss_fn = setup(ScanModel(remat=True))
  cfg = quant.QuantConfig(block_size=4, double_quant=double_quant, dq_block_size=4, targets=TARGETS)
  qscan = quant.quantize(adapted, cfg)  # NF4 on the stacked (layers, in, out) kernels
  mesh = sh.make_mesh({"data": 2, "model": 4})
  losses, tr, _, _ = sharded_train(loss_fn, qscan, batch, mesh, sh.fsdp_tp())
  _, _, _, loss_u = setup(Model(n_layers=2))
  unrolled = unstack(adapted, 2)
  qunrolled = quant.quantize(unrolled, cfg)  # each layer quantized on its own
  ref_losses, ref_tr = naive_train(loss_u, qunrolled, batch)
  np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)
  close_trees(unstack(jl.combine(tr, jl.split(adapted)[1]), 2), jl.combine(ref_tr, jl.split(unrolled)[1]))
