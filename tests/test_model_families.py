"""Llama 3.x RoPE scaling, Qwen3, Mistral/Qwen sliding windows, Gemma 2/3 against transformers."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import torch
import transformers

import jax_lora as jl
from jax_lora.models import generate, hf
from jax_lora.models.attention import dot_product_attention

VOCAB = 97
_BASE = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=64)
_LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
           "original_max_position_embeddings": 8, "rope_theta": 500000.0}
TINY = {
    "llama3": lambda: transformers.LlamaForCausalLM(transformers.LlamaConfig(**_BASE, rope_parameters=_LLAMA3)),
    "llama-linear": lambda: transformers.LlamaForCausalLM(
        transformers.LlamaConfig(**_BASE, rope_parameters={"rope_type": "linear", "factor": 4.0, "rope_theta": 100.0})),
    "llama-yarn": lambda: transformers.LlamaForCausalLM(transformers.LlamaConfig(
        **_BASE, rope_parameters={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16,
                                  "rope_theta": 1000.0})),
    "qwen3": lambda: transformers.Qwen3ForCausalLM(transformers.Qwen3Config(
        **_BASE, head_dim=24, use_sliding_window=True, sliding_window=4, max_window_layers=1, tie_word_embeddings=True)),
    "mistral": lambda: transformers.MistralForCausalLM(transformers.MistralConfig(**_BASE, sliding_window=3)),
    "gemma3": lambda: transformers.Gemma3ForCausalLM(transformers.Gemma3TextConfig(
        **{**_BASE, "num_hidden_layers": 4}, head_dim=32, sliding_window=3, sliding_window_pattern=2,
        query_pre_attn_scalar=20, final_logit_softcapping=3.0, attn_logit_softcapping=None,
        rope_parameters={"full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1000.0},
                         "sliding_attention": {"rope_type": "default", "rope_theta": 10.0}})),
    "gemma2": lambda: transformers.Gemma2ForCausalLM(transformers.Gemma2Config(
        **_BASE, head_dim=16, sliding_window=3, query_pre_attn_scalar=12, attn_logit_softcapping=2.0,
        final_logit_softcapping=5.0)),
}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
  out = {}
  torch.manual_seed(0)
  for name, make in TINY.items():
    m = make().eval()
    with torch.no_grad():  # larger than init so that every weight matters
      for p in m.parameters():
        p.add_(0.3 * torch.randn_like(p))
    folder = str(tmp_path_factory.mktemp(name))
    m.save_pretrained(folder)
    out[name] = (m, folder)
  return out


def _batch(seed=0, b=3, s=11):
  ids = np.random.RandomState(seed).randint(3, VOCAB, (b, s))
  mask = np.ones((b, s), np.int64)
  mask[1, :3] = 0
  mask[2, -4:] = 0
  return ids, mask


def _torch_logits(m, ids, mask):
  pos = np.maximum(mask.cumsum(1) - 1, 0)
  with torch.no_grad():
    return m(torch.tensor(ids), attention_mask=torch.tensor(mask), position_ids=torch.tensor(pos)).logits.numpy()


def _ours(model, params, ids, mask):
  return np.asarray(jax.jit(model.apply)(params, jnp.asarray(ids), jnp.asarray(mask))[0])


@pytest.mark.parametrize("name", sorted(TINY))
def test_logits_match_transformers(tiny, name):
  m, folder = tiny[name]
  model, params, config = hf.load_hf(folder)
  ids, mask = _batch()
  # the left-padded row: transformers' sliding mask counts slots, ours too; compare real tokens only
  valid = mask.astype(bool)
  np.testing.assert_allclose(_ours(model, params, ids, mask)[valid], _torch_logits(m, ids, mask)[valid], atol=1e-4, rtol=0)


@pytest.mark.parametrize("name", ["llama3", "gemma3"])
def test_float64_tighter(tiny, name):
  m, folder = tiny[name]
  model, params, config = hf.load_hf(folder)
  ids, _ = _batch(1)
  mask = np.ones_like(ids)  # transformers' eager float64 Gemma 2 turns padding rows into NaN
  valid = mask.astype(bool)
  with jax.enable_x64(True):
    model64 = hf.model_from_config(config, jnp.float64, jnp.float64)
    p64 = jax.tree.map(lambda x: jnp.asarray(x, jnp.float64), params)
    ours = _ours(model64, p64, ids, mask)
  want = _torch_logits(m.double(), ids, mask)
  m.float()
  assert ours.dtype == np.float64
  # RoPE angles and RMSNorm stay float32 on both sides; the rest is float64
  np.testing.assert_allclose(ours[valid], want[valid], atol=1e-5, rtol=0)


def test_config_fields(tiny):
  c = hf.load_hf(tiny["gemma3"][1])[2]
  assert c.layer_types == ("sliding_attention", "full_attention") * 2 and c.sliding_window == 3
  assert (c.rope_type, c.rope_theta, c.rope_local_theta) == ("linear", 1000.0, 10.0)
  assert c.qk_norm and c.sandwich_norms and c.embed_scale and c.norm_offset == 1.0 and c.tie_word_embeddings
  q = hf.load_hf(tiny["qwen3"][1])[2]
  assert q.qk_norm and not q.qkv_bias and q.head_dim == 24 and q.layer_windows() == (None, 4, 4)
  assert hf.load_hf(tiny["mistral"][1])[2].layer_windows() == (3, 3, 3)


@pytest.mark.parametrize("name, impl", [("qwen3", "naive"), ("gemma3", "blockwise"), ("mistral", "xla"),
                                        ("gemma2", "blockwise"), ("gemma2", "xla")])
def test_packed_windows_every_implementation(tiny, name, impl):
  """Two examples packed in one row give each example's own logits, with windows and soft-caps."""
  _, folder = tiny[name]
  if impl == "xla" and name == "gemma2":
    with pytest.raises(ValueError, match="soft-capping"):
      hf.load_hf(folder, attention=impl)
    return
  model, params, config = hf.load_hf(folder, attention=impl)
  ids = np.random.RandomState(2).randint(3, VOCAB, (1, 13))
  seg = np.array([[1] * 7 + [2] * 5 + [0]])
  packed = _ours(model, params, ids, seg)[0]
  ref_model, ref_params, _ = hf.load_hf(folder, attention="naive")
  for sid, (a, b) in {1: (0, 7), 2: (7, 12)}.items():
    alone = _ours(ref_model, ref_params, ids[:, a:b], np.ones((1, b - a), np.int64))[0]
    np.testing.assert_allclose(packed[a:b], alone, atol=2e-5, rtol=0)


def test_blockwise_window_softcap_gradients_match_naive():
  ks = jax.random.split(jax.random.key(0), 4)
  q = jax.random.normal(ks[0], (2, 10, 4, 8))
  k, v = jax.random.normal(ks[1], (2, 10, 2, 8)), jax.random.normal(ks[2], (2, 10, 2, 8))
  seg = jnp.asarray([[1] * 6 + [2] * 4, [1] * 8 + [0] * 2])
  w = jax.random.normal(ks[3], (2, 10, 4, 8))

  def loss(impl, q, k, v):
    out = dot_product_attention(q, k, v, seg, implementation=impl, block_q=3, block_k=4, window=3, scale=0.3,
                                softcap=1.5)
    return jnp.sum(out * w)

  value_grad = jax.jit(jax.value_and_grad(loss, argnums=(1, 2, 3)), static_argnums=0)
  ref_value, ref = value_grad("naive", q, k, v)
  value, got = value_grad("blockwise", q, k, v)
  np.testing.assert_allclose(value, ref_value, rtol=1e-5)
  for a, b in zip(got, ref):
    np.testing.assert_allclose(a, b, atol=2e-5)


@pytest.mark.parametrize("name", ["gemma3", "mistral"])
def test_scan_layers_same_logits(tiny, name):
  _, folder = tiny[name]
  model, params, _ = hf.load_hf(folder)
  smodel, sparams, _ = hf.load_hf(folder, scan_layers=True)
  ids, mask = _batch(3)
  np.testing.assert_allclose(_ours(smodel, sparams, ids, mask), _ours(model, params, ids, mask), atol=1e-5)


@pytest.mark.parametrize("name", ["qwen3", "gemma3"])
def test_greedy_generation_equals_transformers(tiny, name):
  """KV-cache generation (windows apply over cache slots) gives transformers' greedy tokens."""
  m, folder = tiny[name]
  model, params, _ = hf.load_hf(folder)
  ids = np.random.RandomState(4).randint(3, VOCAB, (2, 6))
  ours = generate(model, params, ids, max_new_tokens=8)
  with torch.no_grad():
    want = m.generate(torch.tensor(ids), attention_mask=torch.ones_like(torch.tensor(ids)), max_new_tokens=8,
                      do_sample=False, eos_token_id=None, pad_token_id=0)[:, 6:].numpy()
  np.testing.assert_array_equal(ours, want)


def test_save_hf_round_trips_through_transformers(tiny, tmp_path):
  for name in ("gemma3", "qwen3"):
    m, folder = tiny[name]
    _, params, config = hf.load_hf(folder)
    hf.save_hf(str(tmp_path / name), params, config)
    back = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / name)).eval()
    ids, mask = _batch(5)
    valid = mask.astype(bool)
    np.testing.assert_allclose(_torch_logits(back, ids, mask)[valid], _torch_logits(m, ids, mask)[valid], atol=1e-5)


@pytest.mark.parametrize("case, match", [
    ({"rope_parameters": {"rope_type": "dynamic", "factor": 2.0}}, "rope type 'dynamic'"),
    ({"rope_parameters": {"rope_type": "longrope", "short_factor": [1.0]}}, "rope type 'longrope'"),
    ({"rope_parameters": {"rope_type": "linear", "factor": 2.0, "mystery": 1}}, "'mystery'"),
    ({"rope_parameters": {"rope_type": "llama3", "factor": 2.0}}, "needs 'low_freq_factor'"),
    ({"rope_parameters": {"rope_type": "default", "partial_rotary_factor": 0.5}}, "'partial_rotary_factor'"),
    ({"hidden_act": "relu"}, "'relu'"),
])
def test_unknown_rope_and_fields_are_refused(case, match):
  cfg = {"model_type": "llama", "vocab_size": 10, "hidden_size": 8, "intermediate_size": 8, "num_hidden_layers": 1,
         "num_attention_heads": 2, **case}
  with pytest.raises(ValueError, match=match):
    hf.config_from_hf(cfg)


def _peft_model(m):
  import peft

  cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "gate_proj", "down_proj"],
                        init_lora_weights=False)
  torch.manual_seed(1)
  return peft.get_peft_model(m, cfg).eval()


@pytest.mark.parametrize("name", ["gemma3", "qwen3"])
def test_peft_adapter_load_save_merge(tiny, tmp_path, name):
  """A PEFT adapter on Gemma 3 / Qwen3 loads, runs unmerged with PEFT's logits, saves back and merges."""
  m, folder = tiny[name]
  import copy

  pm = _peft_model(copy.deepcopy(m))
  pm.save_pretrained(str(tmp_path / "adapter"))
  ids, mask = _batch(6)
  valid = mask.astype(bool)
  want = _torch_logits(pm, ids, mask)
  model, variables, config = hf.load_hf(folder)
  adapted = jl.load_peft(str(tmp_path / "adapter"), variables["params"], config.model_type)
  got = np.asarray(jax.jit(functools.partial(jl.linen.apply, model))(adapted, jnp.asarray(ids), jnp.asarray(mask))[0])
  np.testing.assert_allclose(got[valid], want[valid], atol=1e-4)
  jl.save_peft(str(tmp_path / "again"), adapted, config.model_type)
  import peft

  back = peft.PeftModel.from_pretrained(copy.deepcopy(m), str(tmp_path / "again")).eval()
  np.testing.assert_allclose(_torch_logits(back, ids, mask)[valid], want[valid], atol=1e-5)
  merged = jl.merge(adapted)
  np.testing.assert_allclose(_ours(model, {"params": merged}, ids, mask)[valid], want[valid], atol=1e-4)
