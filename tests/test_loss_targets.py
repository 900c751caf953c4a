"""The gathered (completion-only LM head) loss equals the full-logits reference."""

import jax
import jax.numpy as jnp
import numpy as np

from jax_lora.models import LlamaConfig, LlamaForCausalLM
from jax_lora_app.loop import next_token_loss, token_nll, with_loss_targets


def test_gathered_loss_equals_full_logits_loss():
  cfg = LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, head_dim=8, tie_word_embeddings=True)
  model = LlamaForCausalLM(cfg)
  rng = np.random.default_rng(0)
  ids = rng.integers(1, 97, size=(3, 24)).astype(np.int32)
  att = np.ones_like(ids)
  att[1, 18:] = 0  # right padding
  lm = np.zeros_like(ids)
  lm[0, 10:20] = 1
  lm[1, 5:18] = 1
  lm[2, 1:3] = 1
  params = model.init(jax.random.key(0), jnp.asarray(ids))["params"]
  logits, _ = model.apply({"params": params}, ids, att)
  s_ref, n_ref = next_token_loss(logits, jnp.asarray(ids), jnp.asarray(lm))
  # naive reference: log-softmax, loop over positions
  logp = np.asarray(jax.nn.log_softmax(logits, axis=-1), np.float64)
  naive = sum(-logp[i, t - 1, ids[i, t]] for i in range(3) for t in range(1, 24) if lm[i, t])
  np.testing.assert_allclose(float(s_ref), naive, rtol=1e-5)
  b = with_loss_targets({"input_ids": ids, "attention_mask": att, "loss_mask": lm}, bucket=8)
  assert b["logit_pos"].shape == (3, 16) and float(b["target_w"].sum()) == lm[:, 1:].sum()
  g_logits, _ = model.apply({"params": params}, ids, att, logits_index=jnp.asarray(b["logit_pos"]))
  s, n = token_nll(g_logits, jnp.asarray(b["target_ids"]), jnp.asarray(b["target_w"]))
  np.testing.assert_allclose(float(s), naive, rtol=1e-5)
  assert float(n) == float(n_ref)
