"""PEFT adapter folders both ways and multi-adapter combination, against PEFT + transformers."""

from __future__ import annotations

import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import torch
import transformers
import peft

import jax_lora as jl
import jax_lora.adapters  # noqa: F401 - jl.adapters  # noqa: E402
import jax_lora.peft  # noqa: E402
from jax_lora import adapters as jla  # noqa: E402
from jax_lora.models import load_hf  # noqa: E402
from jax_lora.peft import load_peft, save_peft  # noqa: E402

WORDS = "the a cat dog sat on mat ran fast slow red blue big small and then it was very happy sad".split()
TEXTS = ["the cat sat on the mat", "a dog ran fast", "the big red dog was very happy and then it sat",
         "blue", "small cat and big dog ran on the mat then sat"]


def save_tokenizer(folder: str) -> None:
  """A word-level tokenizer that adds <s> in front (like Llama's), saved as tokenizer.json."""
  from tokenizers import Tokenizer, models, pre_tokenizers, processors

  vocab = {t: i for i, t in enumerate(["<unk>", "<s>", "</s>", "<pad>", *WORDS])}
  tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
  tok.pre_tokenizer = pre_tokenizers.Whitespace()
  tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
  fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                              unk_token="<unk>", pad_token="<pad>")
  fast.save_pretrained(folder)


def tiny_model(folder: str, kind: str = "llama", seed: int = 0, **overrides):
  """Saves a tiny random transformers model (+ tokenizer) into ``folder``; returns the torch model."""
  torch.manual_seed(seed)
  if kind == "llama":
    cfg = transformers.LlamaConfig(**{**dict(vocab_size=32, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                             tie_word_embeddings=False), **overrides})
  else:
    cfg = transformers.GPT2Config(**{**dict(vocab_size=32, n_embd=32, n_layer=2, n_head=4, n_positions=64), **overrides})
  model = transformers.AutoModelForCausalLM.from_config(cfg).eval()
  model.save_pretrained(folder)
  save_tokenizer(folder)
  return model


def peft_adapter(base_folder: str, out: str, kind: str = "llama", seed: int = 1, **overrides):
  """Creates a PEFT adapter with non-zero B (init_lora_weights=False) and saves it; returns the PeftModel."""
  torch.manual_seed(seed)
  model = transformers.AutoModelForCausalLM.from_pretrained(base_folder).eval()
  targets = ["q_proj", "v_proj", "down_proj"] if kind == "llama" else ["c_attn", "c_fc"]
  kw = dict(r=4, lora_alpha=8, target_modules=targets, init_lora_weights=False, lora_dropout=0.0,
            task_type="CAUSAL_LM", fan_in_fan_out=(kind == "gpt2"))
  kw.update(overrides)
  pm = peft.get_peft_model(model, peft.LoraConfig(**kw)).eval()
  pm.save_pretrained(out)
  return pm


def torch_loss(model, folder: str, texts) -> float:
  tok = transformers.AutoTokenizer.from_pretrained(folder)
  tot, n = 0.0, 0
  with torch.no_grad():
    for t in texts:
      ids = torch.tensor([tok(t)["input_ids"]])
      if ids.shape[1] < 2:
        continue
      logits = model(input_ids=ids).logits.double()
      lp = torch.log_softmax(logits[0, :-1], -1)
      tot -= lp.gather(1, ids[0, 1:, None]).sum().item()
      n += ids.shape[1] - 1
  return tot / n


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
  d = tmp_path_factory.mktemp("llama")
  base = str(d / "base")
  tiny_model(base, "llama")
  adapter = str(d / "adapter")
  pm = peft_adapter(base, adapter, "llama", r=4, lora_alpha=8, rank_pattern={"v_proj": 2},
                    alpha_pattern={"down_proj": 3.0})
  return base, adapter, pm


@pytest.fixture(scope="module")
def gpt2(tmp_path_factory):
  d = tmp_path_factory.mktemp("gpt2")
  base = str(d / "base")
  tiny_model(base, "gpt2")
  adapter = str(d / "adapter")
  pm = peft_adapter(base, adapter, "gpt2", use_rslora=True)
  return base, adapter, pm


def _ids(n=2, s=7, vocab=32, seed=0):
  return np.random.default_rng(seed).integers(0, vocab, (n, s)).astype(np.int32)


def _logits(model, params, ids):
  return np.asarray(jl.linen.apply(model, params, jnp.asarray(ids))[0])


@pytest.mark.parametrize("which", ["llama", "gpt2"])
def test_import_matches_peft_logits(which, request):
  base, adapter, pm = request.getfixturevalue(which)
  model, variables, config = load_hf(base)
  adapted = load_peft(adapter, variables["params"], config.model_type)
  ids = _ids()
  ours = _logits(model, adapted, ids)
  with torch.no_grad():
    ref = pm(input_ids=torch.tensor(ids, dtype=torch.long)).logits.numpy()
    plain = pm.get_base_model()
    with pm.disable_adapter():
      base_logits = plain(input_ids=torch.tensor(ids, dtype=torch.long)).logits.numpy()
  assert np.abs(ref - base_logits).max() > 1e-3  # the adapter really changes the model
  np.testing.assert_allclose(ours, ref, atol=2e-5, rtol=1e-5)


def test_scanned_layers_import_and_export(tmp_path):
  base, adapter = str(tmp_path / "base"), str(tmp_path / "adapter")
  tiny_model(base, "llama")
  pm = peft_adapter(base, adapter, "llama", alpha_pattern={"down_proj": 3.0})
  model, variables, config = load_hf(base, scan_layers=True)
  adapted = load_peft(adapter, variables["params"], config.model_type)
  assert jl.adapters.lora_weights(adapted)["model/layers/mlp/down_proj/kernel"].layout == "bio"
  ids = _ids(seed=2)
  with torch.no_grad():
    ref = pm(input_ids=torch.tensor(ids, dtype=torch.long)).logits.numpy()
  np.testing.assert_allclose(_logits(model, adapted, ids), ref, atol=2e-5, rtol=1e-5)
  out = str(tmp_path / "re")
  save_peft(out, adapted, config.model_type)
  from safetensors.numpy import load_file
  a, b = load_file(os.path.join(adapter, "adapter_model.safetensors")), load_file(os.path.join(out, "adapter_model.safetensors"))
  assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
  meta = json.load(open(os.path.join(out, "adapter_config.json")))
  assert meta["target_modules"] == ["down_proj", "q_proj", "v_proj"]
  assert set(meta["alpha_pattern"].values()) == {3.0} and meta["lora_alpha"] == 8.0
  # an adapter on only some layers cannot be stacked: clear error
  partial = str(tmp_path / "partial")
  peft_adapter(base, partial, "llama", layers_to_transform=[0])
  with pytest.raises(ValueError, match="scan_layers=False"):
    load_peft(partial, variables["params"], config.model_type)


def test_import_reads_patterns(llama):
  base, adapter, _ = llama
  _, variables, config = load_hf(base)
  lws = jl.adapters.lora_weights(load_peft(adapter, variables["params"], config.model_type))
  assert len(lws) == 6
  assert lws["model/layers_0/self_attn/v_proj/kernel"].rank == 2
  assert lws["model/layers_0/self_attn/q_proj/kernel"].rank == 4
  assert lws["model/layers_1/mlp/down_proj/kernel"].alpha == 3.0
  assert lws["model/layers_1/self_attn/q_proj/kernel"].alpha == 8.0


def test_export_loads_in_peft_with_equal_logits(tmp_path):
  base = str(tmp_path / "base")
  hf = tiny_model(base, "llama")
  model, variables, config = load_hf(base)
  cfg = jl.LoraConfig(rank=4, alpha=8.0, targets=(r".*/(q_proj|o_proj|up_proj)/kernel",),
                      rank_pattern={r".*layers_1/self_attn/o_proj/kernel": 2},
                      alpha_pattern={r".*up_proj/kernel": 5.0})
  adapted = jl.init_lora(variables["params"], cfg, jax.random.key(0))
  # non-zero B so the adapter matters
  adapted = jax.tree.map(lambda x: x, adapted)
  lws = jl.adapters.lora_weights(adapted)
  flat = {p: lw for p, lw in lws.items()}
  keys = jax.random.split(jax.random.key(1), len(flat))
  import dataclasses
  repl = {p: dataclasses.replace(lw, b=0.1 * jax.random.normal(k, lw.b.shape)) for (p, lw), k in zip(flat.items(), keys)}
  from jax_lora.tree import map_leaves
  adapted = map_leaves(lambda p, v: repl.get(p, v), adapted)
  out = str(tmp_path / "ours")
  save_peft(out, adapted, config.model_type, base_model_name_or_path=base)
  meta = json.load(open(os.path.join(out, "adapter_config.json")))
  assert meta["target_modules"] == ["o_proj", "q_proj", "up_proj"]
  assert meta["rank_pattern"] == {"model.layers.1.self_attn.o_proj": 2}
  pm = peft.PeftModel.from_pretrained(hf, out).eval()
  ids = _ids(seed=3)
  with torch.no_grad():
    ref = pm(input_ids=torch.tensor(ids, dtype=torch.long)).logits.numpy()
  np.testing.assert_allclose(_logits(model, adapted, ids), ref, atol=2e-5, rtol=1e-5)
  # and back: re-importing gives the same factors
  again = jl.adapters.lora_weights(load_peft(out, variables["params"], config.model_type))
  for p, lw in jl.adapters.lora_weights(adapted).items():
    np.testing.assert_array_equal(np.asarray(again[p].b), np.asarray(lw.b))
    assert (again[p].rank, again[p].alpha) == (lw.rank, lw.alpha)


def test_roundtrip_gpt2_fan_in_fan_out(gpt2, tmp_path):
  base, adapter, pm = gpt2
  _, variables, config = load_hf(base)
  adapted = load_peft(adapter, variables["params"], config.model_type)
  out = str(tmp_path / "re")
  save_peft(out, adapted, config.model_type)
  meta = json.load(open(os.path.join(out, "adapter_config.json")))
  assert meta["fan_in_fan_out"] and meta["use_rslora"]
  from safetensors.numpy import load_file
  a, b = load_file(os.path.join(adapter, "adapter_model.safetensors")), load_file(os.path.join(out, "adapter_model.safetensors"))
  assert a.keys() == b.keys()
  for k in a:
    np.testing.assert_array_equal(a[k], b[k])


def _write_adapter(folder, config, tensors):
  from safetensors.numpy import save_file
  os.makedirs(folder, exist_ok=True)
  json.dump(config, open(os.path.join(folder, "adapter_config.json"), "w"))
  save_file(tensors, os.path.join(folder, "adapter_model.safetensors"))


_GOOD = {"base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": np.zeros((2, 32), np.float32),
         "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight": np.zeros((32, 2), np.float32)}


@pytest.mark.parametrize("case,config,tensors,match", [
    ("unknown_module", {"r": 2}, {"base_model.model.model.layers.9.self_attn.q_proj.lora_A.weight": np.zeros((2, 32), np.float32),
                                  "base_model.model.model.layers.9.self_attn.q_proj.lora_B.weight": np.zeros((32, 2), np.float32)},
     "not in the base"),
    ("wrong_prefix", {"r": 2}, {"model.layers.0.self_attn.q_proj.lora_A.weight": np.zeros((2, 32), np.float32)},
     "lora_A|B.weight"),
    ("shape", {"r": 2}, {"base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": np.zeros((2, 31), np.float32),
                         "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight": np.zeros((32, 2), np.float32)},
     "do not fit"),
    ("rank", {"r": 4}, {"base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": np.zeros((2, 32), np.float32),
                        "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight": np.zeros((32, 2), np.float32)},
     "rank 4"),
    ("dora_without_magnitude", {"r": 2, "use_dora": True}, _GOOD, "lora_magnitude_vector"),
    ("unexplained_whole_tensor", {"r": 2}, {"base_model.model.lm_head.weight": np.zeros((32, 32), np.float32)},
     "does not explain"),
    ("typo", {"r": 2, "lora_alpah": 32}, _GOOD, r"unknown field 'lora_alpah' \(did you mean 'lora_alpha'"),
    ("future_field", {"r": 2, "shiny_new_config": {}}, _GOOD, "unknown field 'shiny_new_config'"),
    ("pissa", {"r": 2, "init_lora_weights": "pissa"}, _GOOD, "init_lora_weights='pissa'"),
    ("olora", {"r": 2, "init_lora_weights": "olora"}, _GOOD, "init_lora_weights='olora'"),
    ("alora", {"r": 2, "alora_invocation_tokens": [5, 6]}, _GOOD, "aLoRA"),
    ("trainable_tokens", {"r": 2, "trainable_token_indices": "1,2"}, _GOOD, "trainable_token_indices must be"),
    ("token_rows_unexplained", {"r": 2}, {**_GOOD, "base_model.model.model.embed_tokens.token_adapter."
                                           "trainable_tokens_delta": np.zeros((2, 32), np.float32)},
     "no trainable_token_indices"),
    ("bias_value", {"r": 2, "bias": "some"}, _GOOD, "bias='some'"),
    ("rank_zero", {"r": 0}, _GOOD, "r=0"),
    ("int_header", {"r": 2}, {k: v.astype(np.int32) for k, v in _GOOD.items()}, "non-floating"),
    ("unpaired", {"r": 2}, {"base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": np.zeros((2, 32), np.float32)},
     "pair up"),
])
def test_import_errors(llama, tmp_path, case, config, tensors, match):
  base = llama[0]
  _, variables, cfg = load_hf(base)
  folder = str(tmp_path / case)
  _write_adapter(folder, {"peft_type": "LORA", **config}, tensors)
  with pytest.raises(ValueError, match=match):
    load_peft(folder, variables["params"], cfg.model_type)


def test_switch_and_weighted_combination(llama, tmp_path):
  base, adapter1, _ = llama
  adapter2 = str(tmp_path / "a2")
  peft_adapter(base, adapter2, "llama", seed=7, r=4, lora_alpha=16, target_modules=["q_proj", "k_proj"])
  model, variables, config = load_hf(base)
  params = variables["params"]
  bank = jla.AdapterBank.from_base(params)
  bank = bank.add("one", jla.extract(load_peft(adapter1, params, config.model_type)))
  bank = bank.add_peft("two", adapter2, config.model_type)
  ids = _ids(seed=5)
  # switching reuses the same base arrays (no reload) and matches a fresh load
  p2 = bank.use("two")
  assert jl.adapters.lora_weights(p2)["model/layers_0/self_attn/k_proj/kernel"].w is params["model"]["layers_0"]["self_attn"]["k_proj"]["kernel"]
  np.testing.assert_allclose(_logits(model, p2, ids), _logits(model, load_peft(adapter2, params, config.model_type), ids),
                             atol=1e-6)
  np.testing.assert_allclose(_logits(model, bank.use(None), ids), _logits(model, params, ids), atol=0)
  # PEFT's add_weighted_adapter is the reference
  pm = peft.PeftModel.from_pretrained(transformers.AutoModelForCausalLM.from_pretrained(base), adapter1,
                                      adapter_name="one").eval()
  pm.load_adapter(adapter2, adapter_name="two")
  for how, w in [("cat", [0.7, 0.4]), ("linear", [0.5, -0.3])]:
    if how == "linear":  # PEFT's linear needs equal ranks and targets
      a1 = str(tmp_path / "a1b")
      peft_adapter(base, a1, "llama", seed=9, r=4, lora_alpha=8, target_modules=["q_proj", "k_proj"])
      pm.load_adapter(a1, adapter_name="one_b")
      names = ["one_b", "two"]
      bank = bank.add("one_b", jla.extract(load_peft(a1, params, config.model_type)))
    else:
      names = ["one", "two"]
    pm.add_weighted_adapter(names, w, f"mix_{how}", combination_type=how)
    pm.set_adapter(f"mix_{how}")
    with torch.no_grad():
      ref = pm(input_ids=torch.tensor(ids, dtype=torch.long)).logits.numpy()
    mixed = jla.combine_adapters([bank.adapters[n] for n in names], w, how)
    np.testing.assert_allclose(_logits(model, jla.attach(params, mixed), ids), ref, atol=2e-5, rtol=1e-5)
  with pytest.raises(ValueError, match="same rank"):
    jla.combine_adapters([bank.adapters["one"], bank.adapters["two"]], [1.0, 1.0], "linear")
  with pytest.raises(ValueError, match="no adapter named"):
    bank.use("three")


def test_every_peft_config_field_is_classified():
  """A PEFT upgrade that adds a LoraConfig field fails here until we decide what it means."""
  import dataclasses
  fields = {f.name for f in dataclasses.fields(peft.LoraConfig)}
  assert fields <= jax_lora.peft.KNOWN_CONFIG_FIELDS, sorted(fields - jax_lora.peft.KNOWN_CONFIG_FIELDS)


def _train_everything(pm, seed=3):
  """Stands in for training: every trainable PEFT tensor (A/B, biases, saved modules) moves."""
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for _, p in pm.named_parameters():
      if p.requires_grad:
        p.add_(0.1 * torch.randn(p.shape, generator=g))


@pytest.mark.parametrize("kw", [
    dict(bias="all", modules_to_save=["lm_head"]),
    dict(bias="lora_only", modules_to_save=["embed_tokens"]),
    dict(target_modules=["q_proj", "v_proj", "lm_head"]),
    dict(target_modules=["q_proj", "embed_tokens"]),
    dict(trainable_token_indices=[1, 2, 5]),
], ids=["bias_all+lm_head", "lora_only+embed", "lora_on_lm_head", "lora_on_embedding", "trainable_tokens"])
def test_whole_tensors_match_peft(tmp_path, kw):
  """Trained biases, modules_to_save, LoRA on an untied lm_head or on the embedding, trainable tokens:
  load (unmerged: no fallback merge), merge on files and save back, against PEFT."""
  from jax_lora.peft import merge_adapter_files
  from safetensors.numpy import load_file
  base, adapter = str(tmp_path / "base"), str(tmp_path / "adapter")
  tiny_model(base, "llama", attention_bias=True, mlp_bias=True)
  torch.manual_seed(1)
  kk = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False, task_type="CAUSAL_LM")
  pm = peft.get_peft_model(transformers.AutoModelForCausalLM.from_pretrained(base), peft.LoraConfig(**{**kk, **kw}))
  _train_everything(pm)
  pm.eval().save_pretrained(adapter)
  ids = _ids(seed=4)
  with torch.no_grad():
    ref = pm(input_ids=torch.tensor(ids, dtype=torch.long)).logits.numpy()
  model, variables, config = load_hf(base)
  plain = _logits(model, variables["params"], ids)
  adapted = load_peft(adapter, variables["params"], config.model_type)
  import warnings
  with warnings.catch_warnings():
    warnings.simplefilter("error")  # a merged fallback warns: every adapter must run unmerged
    ours = _logits(model, adapted, ids)
  assert np.abs(ours - plain).max() > 1e-2
  np.testing.assert_allclose(ours, ref, atol=2e-5, rtol=1e-5)
  # jax-lora merge on the files == PEFT's merge_and_unload
  merged = str(tmp_path / "merged")
  merge_adapter_files(base, adapter, merged)
  got = load_file(os.path.join(merged, "model.safetensors"))
  want = {k: v.numpy() for k, v in pm.merge_and_unload().state_dict().items()}
  assert set(got) == set(want)
  for k in got:
    np.testing.assert_allclose(got[k], want[k], atol=2e-6, err_msg=k)
  # saved back with the same bias/modules_to_save: PEFT loads it with equal logits
  out = str(tmp_path / "ours")
  tti = {"embed_tokens": kw["trainable_token_indices"]} if "trainable_token_indices" in kw else None
  save_peft(out, adapted, config.model_type, bias=kw.get("bias", "none"), modules_to_save=kw.get("modules_to_save", ()),
            trainable_token_indices=tti)
  again = peft.PeftModel.from_pretrained(transformers.AutoModelForCausalLM.from_pretrained(base), out).eval()
  with torch.no_grad():
    back = again(input_ids=torch.tensor(ids, dtype=torch.long)).logits.numpy()
  np.testing.assert_allclose(back, ref, atol=2e-5, rtol=1e-5)


def test_one_resolver_for_load_and_merge(llama, tmp_path):
  """An adapter saved from the bare LlamaModel (modules 'layers.0…', no 'model.') fits neither way."""
  from jax_lora.peft import merge_adapter_files
  base = llama[0]
  folder = str(tmp_path / "bare")
  _write_adapter(folder, {"peft_type": "LORA", "r": 2},
                 {"base_model.model.layers.0.self_attn.q_proj.lora_A.weight": np.ones((2, 32), np.float32),
                  "base_model.model.layers.0.self_attn.q_proj.lora_B.weight": np.ones((32, 2), np.float32)})
  _, variables, cfg = load_hf(base)
  with pytest.raises(ValueError, match="not in the base"):
    load_peft(folder, variables["params"], cfg.model_type)
  with pytest.raises(ValueError, match="not in the base"):
    merge_adapter_files(base, folder, str(tmp_path / "m"))
  assert not os.path.exists(tmp_path / "m")


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_dora_matches_peft(tmp_path, kind):
  """DoRA: PEFT's adapter loads with equal logits and A/B/magnitude gradients; merges (ours, files) and
  saves back equal PEFT."""
  from jax_lora.peft import merge_adapter_files
  from safetensors.numpy import load_file
  base, adapter = str(tmp_path / "base"), str(tmp_path / "adapter")
  tiny_model(base, kind)
  pm = peft_adapter(base, adapter, kind, use_dora=True)
  _train_everything(pm)  # magnitudes move away from ‖W + s·BA‖ as after training
  pm.save_pretrained(adapter)
  ids = _ids(seed=6)
  probe = np.random.default_rng(0).standard_normal((*ids.shape, 32)).astype(np.float32)
  out = pm(input_ids=torch.tensor(ids, dtype=torch.long)).logits
  (out * torch.tensor(probe)).sum().backward()
  ref = out.detach().numpy()
  model, variables, config = load_hf(base)
  adapted = load_peft(adapter, variables["params"], config.model_type)
  lws = jl.adapters.lora_weights(adapted)
  assert all(lw.m is not None for lw in lws.values()) and len(lws) == (6 if kind == "llama" else 4)
  np.testing.assert_allclose(_logits(model, adapted, ids), ref, atol=2e-5, rtol=1e-5)
  # gradients of A, B and the magnitude equal PEFT's (the norm is not differentiated in either)
  trainable, frozen = jl.split(adapted)
  loss = lambda t: jnp.sum(jl.linen.apply(model, jl.combine(t, frozen), jnp.asarray(ids))[0] * probe)
  grads = jl.adapters.lora_weights(jax.grad(loss)(trainable))
  tmods = dict(pm.named_modules())
  for p, g in grads.items():
    mod = tmods["base_model.model." + jax_lora.peft.path_to_module(p, config.model_type)]
    np.testing.assert_allclose(np.asarray(g.a).T, mod.lora_A["default"].weight.grad.numpy(), atol=1e-4, rtol=1e-3)
    np.testing.assert_allclose(np.asarray(g.b).T, mod.lora_B["default"].weight.grad.numpy(), atol=1e-4, rtol=1e-3)
    np.testing.assert_allclose(np.asarray(g.m), mod.lora_magnitude_vector["default"].weight.grad.numpy(),
                               atol=1e-4, rtol=1e-3)
  # merged in the library == unmerged
  np.testing.assert_allclose(_logits(model, jl.merge(adapted), ids), ref, atol=2e-5, rtol=1e-5)
  # merged on the files == PEFT's merge_and_unload
  merged = str(tmp_path / "merged")
  merge_adapter_files(base, adapter, merged)
  got = load_file(os.path.join(merged, "model.safetensors"))
  want = {k: v.detach().numpy() for k, v in pm.merge_and_unload().state_dict().items()}
  for k in got:
    np.testing.assert_allclose(got[k], want[k], atol=2e-6, err_msg=k)
  # saved back: PEFT loads it with equal logits, and the files hold the same tensors
  back = str(tmp_path / "ours")
  save_peft(back, adapted, config.model_type)
  assert json.load(open(os.path.join(back, "adapter_config.json")))["use_dora"] is True
  a, b = load_file(os.path.join(adapter, "adapter_model.safetensors")), load_file(os.path.join(back, "adapter_model.safetensors"))
  assert a.keys() == b.keys()
  again = peft.PeftModel.from_pretrained(transformers.AutoModelForCausalLM.from_pretrained(base), back).eval()
  with torch.no_grad():
    np.testing.assert_allclose(again(input_ids=torch.tensor(ids, dtype=torch.long)).logits.numpy(), ref,
                               atol=2e-5, rtol=1e-5)


def test_lora_on_tied_embedding_is_refused(tmp_path):
  """PEFT applies embedding LoRA to the lookup only but merges it into the tied head too: refuse."""
  base, adapter = str(tmp_path / "base"), str(tmp_path / "adapter")
  tiny_model(base, "llama", tie_word_embeddings=True)
  peft_adapter(base, adapter, "llama", target_modules=["q_proj", "embed_tokens"])
  model, variables, config = load_hf(base)
  adapted = load_peft(adapter, variables["params"], config.model_type)
  with pytest.raises(ValueError, match="tied embeddings"):
    _logits(model, adapted, _ids())


def test_merge_refuses_integer_base_weights(llama, tmp_path):
  """A base whose safetensors header says I32 where the weights are F32 is refused, not merged as ints."""
  from safetensors.numpy import load_file, save_file
  from jax_lora.peft import merge_adapter_files
  import shutil
  base, adapter, _ = llama
  bad = str(tmp_path / "bad")
  shutil.copytree(base, bad)
  st = os.path.join(bad, "model.safetensors")
  t = load_file(st)
  t["model.norm.weight"] = t["model.norm.weight"].view(np.int32)
  save_file(t, st)
  with pytest.raises(ValueError, match="non-floating weights 'model.norm.weight"):
    merge_adapter_files(bad, adapter, str(tmp_path / "m"))
