"""PEFT's trainable tokens as a LoRA with a fixed one-hot A: init, unmerged lookup and tied head,
training moves only the chosen rows, PEFT parity both ways, and the trainer's export."""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax

import jax_lora as jl
import jax_lora.adapters  # noqa: F401 - jl.adapters

IDS = (1, 4, 6)


def test_init_lookup_attend_and_training_touch_only_the_rows():
  table = jax.random.normal(jax.random.key(0), (9, 5))
  cfg = jl.LoraConfig(rank=2, targets=("proj",), trainable_token_indices={"emb": list(IDS)})
  params = {"emb": {"embedding": table}, "proj": {"kernel": jax.random.normal(jax.random.key(1), (5, 5))}}
  adapted = jl.init_lora(params, cfg, jax.random.key(2))
  tok = adapted["emb"]["embedding"]
  assert tok.freeze_a and tok.rank == 3 and jl.adapters.lora_weights(adapted)["proj/kernel"].rank == 2
  ids = jnp.array([[0, 1, 4, 8]])
  np.testing.assert_array_equal(np.asarray(jl.embed(ids, tok)), np.asarray(table[ids]))  # init: the base
  x = jax.random.normal(jax.random.key(3), (2, 5))
  trainable, frozen = jl.split(adapted)
  assert trainable["emb"]["embedding"].a is None  # A never trains

  def loss(t):
    full = jl.combine(t, frozen)
    h = jl.embed(ids, full["emb"]["embedding"]) @ full["proj"]["kernel"].w
    logits = jax_lora_attend(x, full["emb"]["embedding"])
    return jnp.sum(h ** 2) + jnp.sum(jax.nn.log_softmax(logits)[:, 4])

  opt = optax.adamw(0.1, weight_decay=0.1)
  state = opt.init(trainable)
  for _ in range(3):
    g = jax.grad(loss)(trainable)
    u, state = opt.update(g, state, trainable)
    trainable = optax.apply_updates(trainable, u)
  merged = np.asarray(jl.merge(jl.combine(trainable, frozen))["emb"]["embedding"])
  moved = np.abs(merged - np.asarray(table)).max(axis=1) > 0
  assert moved.tolist() == [i in IDS for i in range(9)]  # exactly the chosen rows, weight decay or not
  full = jl.combine(trainable, frozen)["emb"]["embedding"]
  np.testing.assert_allclose(np.asarray(jl.embed(ids, full)), merged[np.asarray(ids)], atol=1e-6)
  np.testing.assert_allclose(np.asarray(jax_lora_attend(x, full)), np.asarray(x) @ merged.T, atol=1e-5)


def jax_lora_attend(x, table):
  from jax_lora._src.lora import attend  # the tied head's op (what Linen nn.Embed.attend runs)
  return attend(x, table)


def test_train_trainable_tokens_exports_what_peft_loads(tiny, tmp_path):
  """A run with lora.trainable_token_indices on the tiny tied model: the exported adapter loads in
  PEFT with equal logits (PEFT applies the rows to the tied head too); only those rows moved."""
  import peft
  import torch
  import transformers

  from jax_lora_app import loop
  from jax_lora.models import load_hf

  cfg = tiny.cfg(tmp_path / "run", **{"lora.trainable_token_indices": [5, 6], "steps": 4, "eval.num_test": 0})
  loop.train(cfg)
  adapter = os.path.join(cfg.out_dir, "adapter")
  meta = json.load(open(os.path.join(adapter, "adapter_config.json")))
  assert meta["trainable_token_indices"] == {"embed_tokens": [5, 6]}
  model, variables, mcfg = load_hf(tiny.folder)
  ours = jl.load_peft(adapter, variables["params"], mcfg.model_type)
  before = np.asarray(variables["params"]["model"]["embed_tokens"]["embedding"])
  after = np.asarray(ours["model"]["embed_tokens"]["embedding"])
  assert (np.abs(after - before).max(axis=1) > 0).nonzero()[0].tolist() == [5, 6]
  ids = np.arange(3, 13, dtype=np.int32)[None]
  got = np.asarray(jl.linen.apply(model, ours, jnp.asarray(ids))[0])
  pm = peft.PeftModel.from_pretrained(transformers.AutoModelForCausalLM.from_pretrained(tiny.folder), adapter).eval()
  with torch.no_grad():
    ref = pm(input_ids=torch.tensor(ids, dtype=torch.long)).logits.numpy()
  np.testing.assert_allclose(got, ref, atol=2e-5, rtol=1e-5)
