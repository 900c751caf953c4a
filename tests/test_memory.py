"""Memory at scale: no float copy of a quantized base across the step, remat policies, bf16 compute.

Memory is read from XLA's compiled step (``memory_analysis``) on abstract params,
through bench/bench_memory.py's ``step_memory`` (train/loop.py's step).
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jax_lora as jl
import jax_lora.adapters  # noqa: F401 - jl.adapters
from jax_lora._src import remat as _remat_impl
from bench.bench_memory import step_memory
from jax_lora.models.gpt2 import GPT2Config, GPT2LMHeadModel
from jax_lora.models.llama import LlamaConfig, LlamaForCausalLM

# Big enough kernels that their float copies dominate the step's temporaries.
MEM = LlamaConfig(vocab_size=128, hidden_size=128, intermediate_size=512, num_hidden_layers=2, num_attention_heads=2,
                  num_key_value_heads=1, head_dim=64, tie_word_embeddings=True)
TINY = LlamaConfig(vocab_size=61, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2, head_dim=8)


def _float_kernel_bytes(c: LlamaConfig) -> int:
  d, f, kv = c.hidden_size, c.intermediate_size, c.num_key_value_heads * c.head_dim
  q = c.num_attention_heads * c.head_dim
  return 4 * c.num_hidden_layers * (2 * d * q + 2 * d * kv + 3 * d * f)


@pytest.mark.parametrize("scan,remat,dropout", [(False, "none", 0.0), (True, "full", 0.0), (False, "none", 0.1)])
def test_qlora_step_holds_no_float_base(scan, remat, dropout):
  """QLoRA's compiled temporaries exceed LoRA's by far less than the float kernels' bytes.

  Before the fix (forward and backward dequantizations merged by XLA, or the
  code look-ups hoisted), every float kernel was alive at once: the excess was
  ~the whole float base (unrolled), failing this bound.
  """
  cfg = dataclasses.replace(MEM, scan_layers=scan, remat=remat)
  lora = step_memory(cfg, "lora", 64, rank=8, dropout=dropout)
  qlora = step_memory(cfg, "qlora", 64, rank=8, dropout=dropout)
  excess = qlora["temp"] - lora["temp"]
  assert excess <= 0.25 * _float_kernel_bytes(cfg), (excess, lora, qlora)
  assert qlora["peak"] < lora["peak"]


def test_full_remat_lowers_temp_memory():
  cfg = dataclasses.replace(MEM, num_hidden_layers=4)
  none = step_memory(cfg, "lora", 256, rank=8)
  full = step_memory(dataclasses.replace(cfg, remat="full"), "lora", 256, rank=8)
  assert full["temp"] < 0.75 * none["temp"], (none, full)


def _lora(model, ids, quantized=False, layouts=()):
  params = model.init(jax.random.key(0), ids)["params"]
  ad = jl.init_lora(params, jl.LoraConfig.all_linear(rank=4, alpha=8.0, layouts=layouts), jax.random.key(1))
  if quantized:
    ad = jl.quantize(ad, jl.QuantConfig(targets=tuple(jl.adapters.lora_weights(ad)), block_size=8, dq_block_size=4))
  tr, fr = jl.split(ad)
  keys = iter(jax.random.split(jax.random.key(2), 64))
  tr = jax.tree.map(lambda x: x + 0.05 * jax.random.normal(next(keys), x.shape, x.dtype), tr)  # B != 0
  return tr, fr


def _logits_and_grads(model, tr, fr, ids):
  def loss(t):
    logits, _ = jl.linen.apply(model, jl.combine(t, fr), ids)
    return jnp.mean(jnp.sin(logits)), logits

  (_, logits), g = jax.jit(jax.value_and_grad(loss, has_aux=True))(tr)
  return logits, g


def _close(a, b):
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("scan,quantized,policies", [(False, False, ("full", "dots", "offload")), (True, False, ("full",)),
                                                     (False, True, ("full",))])
def test_remat_policies_match_no_remat(scan, quantized, policies):
  ids = jax.random.randint(jax.random.key(5), (2, 8), 0, TINY.vocab_size)
  cfg = dataclasses.replace(TINY, scan_layers=scan)
  m0 = LlamaForCausalLM(cfg)
  layouts = ()
  if scan:
    layouts = jl.linen.infer_layouts(m0, m0.init(jax.random.key(0), ids)["params"], ids)
  tr, fr = _lora(m0, ids, quantized, layouts)
  ref = _logits_and_grads(m0, tr, fr, ids)
  for policy in policies:
    got = _logits_and_grads(LlamaForCausalLM(dataclasses.replace(cfg, remat=policy)), tr, fr, ids)
    _close(got, ref)


def test_gpt2_remat_matches():
  cfg = GPT2Config(vocab_size=61, n_positions=16, n_embd=32, n_layer=2, n_head=4, n_inner=64)
  ids = jax.random.randint(jax.random.key(5), (2, 8), 0, 61)
  tr, fr = _lora(GPT2LMHeadModel(cfg), ids)
  ref = _logits_and_grads(GPT2LMHeadModel(cfg), tr, fr, ids)
  _close(_logits_and_grads(GPT2LMHeadModel(dataclasses.replace(cfg, remat="full")), tr, fr, ids), ref)


def test_remat_config_and_policies(monkeypatch):
  with pytest.raises(ValueError, match="LlamaConfig.remat='sometimes' is unknown"):
    dataclasses.replace(TINY, remat="sometimes")
  with pytest.raises(ValueError, match="GPT2Config.remat"):
    GPT2Config(vocab_size=8, n_positions=8, n_embd=8, n_layer=1, n_head=1, n_inner=8, remat="all")
  assert "remat" not in dataclasses.replace(TINY, remat="full").to_hf_config()
  assert jl.remat.remat_policy("none") is None
  assert jl.remat.remat_policy("full") is jax.checkpoint_policies.nothing_saveable
  assert jl.remat.remat_policy("dots") is jax.checkpoint_policies.dots_with_no_batch_dims_saveable
  assert jl.remat.remat_policy("offload") is not None  # XLA:CPU has pinned_host memory in jax 0.10
  monkeypatch.setattr(_remat_impl, "_host_memory_ok", lambda: (False, "tpu (memory kinds ['device'])"))
  with pytest.raises(ValueError, match=r"remat='offload' needs host memory .* tpu .* use remat='full' instead"):
    jl.remat.remat_policy("offload")


def test_checkpoint_helper_with_lora_and_quantized_kernels():
  x = jax.random.normal(jax.random.key(0), (4, 16))
  w = jax.random.normal(jax.random.key(1), (16, 16))
  lw = jl.init_lora({"k": {"kernel": w}}, jl.LoraConfig.all_linear(rank=2), jax.random.key(2))["k"]["kernel"]
  lw = dataclasses.replace(lw, b=jnp.ones_like(lw.b), w=jl.quant.quantize_array(w, block_size=8, dq_block_size=4))

  def f(ab, lw, x):
    lw = dataclasses.replace(lw, a=ab[0], b=ab[1])
    return jnp.sum(jnp.tanh(jl.dot(jl.dot(x, lw), lw)))

  want = jax.jit(jax.grad(f))((lw.a, lw.b), lw, x)
  got = jax.jit(jax.grad(jl.remat.checkpoint(f, "full")))((lw.a, lw.b), lw, x)
  _close(got, want)


def test_nf4_bf16_compute_trains_float32_adapters():
  """QuantConfig.compute_dtype=bfloat16: the base matmuls run in bf16, A/B and their grads stay float32."""
  ids = jax.random.randint(jax.random.key(5), (2, 8), 0, TINY.vocab_size)
  model = LlamaForCausalLM(TINY)  # float32 layers: the quantized kernels' own compute dtype wins
  params = model.init(jax.random.key(0), ids)["params"]
  ad = jl.init_lora(params, jl.LoraConfig.all_linear(rank=4), jax.random.key(1))
  # the adapted kernels and lm_head (all-linear leaves the output layer out, as PEFT): every base matmul is NF4
  q = jl.QuantConfig(targets=(*jl.adapters.lora_weights(ad), "lm_head/kernel"), block_size=8, dq_block_size=4,
                     compute_dtype=jnp.bfloat16)
  tr, fr = jl.split(jl.quantize(ad, q))
  assert all(v.w.compute_dtype == jnp.bfloat16 for v in jl.adapters.lora_weights(fr).values())

  def loss(t):
    logits, _ = jl.linen.apply(model, jl.combine(t, fr), ids)
    return jnp.mean(logits.astype(jnp.float32) ** 2)

  g = jax.jit(jax.grad(loss))(tr)
  assert {x.dtype for x in jax.tree.leaves(g)} == {jnp.dtype(jnp.float32)}
  assert all(bool(jnp.isfinite(x).all()) for x in jax.tree.leaves(g))
  eqns = []

  def walk(jaxpr):
    for e in jaxpr.eqns:
      eqns.append(e)
      for sub in jax.core.jaxprs_in_params(e.params):
        walk(sub)

  walk(jax.make_jaxpr(jax.grad(loss))(tr).jaxpr)
  d = TINY.hidden_size
  base = [e for e in eqns if e.primitive.name == "dot_general" and d in e.invars[1].aval.shape
          and min(e.invars[1].aval.shape) > 4]
  assert base and {e.invars[0].aval.dtype for e in base} == {jnp.dtype(jnp.bfloat16)}
  with pytest.raises(ValueError, match="compute_dtype"):
    jl.QuantConfig(compute_dtype=jnp.int8)


def test_quantized_kernel_without_lora_grads_match_dequantized():
  """A quantized kernel without LoRA (``_qmm``: re-dequantized in the backward pass) differentiates like its float copy."""
  x = jax.random.normal(jax.random.key(0), (4, 16))
  q = jl.quant.quantize_array(jax.random.normal(jax.random.key(1), (16, 8)), block_size=8, dq_block_size=4)
  w = q.dequantize()
  f = lambda x, k: jnp.sum(jnp.sin(jl.dot(x, k)))
  _close(jax.jit(jax.value_and_grad(f))(x, q), jax.value_and_grad(f)(x, w))
