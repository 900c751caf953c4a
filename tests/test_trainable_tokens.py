"""PEFT's trainable tokens as a LoRA with a fixed one-hot A: init, unmerged lookup and tied head,
training moves only the chosen rows (the trainer's export against PEFT: test_train_peft_features)."""

from __future__ import annotations

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

