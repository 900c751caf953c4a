"""The shipped Gemma-3-270M (``gemma3-270m``): converted from its GGUF, against transformers.

The converted folder's weights were checked once against transformers loading the GGUF
itself (``from_pretrained(folder, gguf_file=...)``: identical tensors, float32 logits within
4.3e-5 on a translation prompt); that load takes minutes here, so these tests run
transformers on the converted folder (the same tensors) instead.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import jax.numpy as jnp
import numpy as np
import pytest

import torch
import transformers

from jax_lora.models import generate, load_pretrained, resolve_model

PROMPTS = ["Translate German to English.\nGerman: Der Hund schläft im Garten.\nEnglish:",
           "Translate German to English.\nGerman: Ich habe heute keine Zeit.\nEnglish:"]


@pytest.fixture(scope="module")
def gemma():
  """(our model, variables, config, tokenizer, transformers model); the folder is cached once per machine."""
  model, variables, config, tok = load_pretrained("gemma3-270m")
  ref = transformers.AutoModelForCausalLM.from_pretrained(resolve_model("gemma3-270m"), dtype=torch.float32).eval()
  return model, variables, config, tok, ref


def test_config(gemma):
  _, _, c, tok, ref = gemma
  assert (c.model_type, c.num_hidden_layers, c.hidden_size, c.vocab_size) == ("gemma3_text", 18, 640, 262144)
  assert (c.num_attention_heads, c.num_key_value_heads, c.head_dim, c.sliding_window) == (4, 1, 256, 512)
  assert c.layer_types == (("sliding_attention",) * 5 + ("full_attention",)) * 3
  assert (c.rope_theta, c.rope_local_theta, c.query_pre_attn_scalar) == (1e6, 1e4, 256.0)
  assert isinstance(ref, transformers.Gemma3ForCausalLM) and tok.bos_token_id == 2


def test_logits_match_transformers(gemma):
  model, variables, _, tok, ref = gemma
  ids = np.asarray([tok(PROMPTS[0])["input_ids"]])
  assert ids[0, 0] == tok.bos_token_id
  with torch.no_grad():
    want = ref(torch.tensor(ids)).logits.numpy()
  ours = np.asarray(model.apply(variables, jnp.asarray(ids))[0])
  np.testing.assert_allclose(ours, want, atol=1e-4, rtol=0)


def test_greedy_translation_equals_transformers(gemma):
  model, variables, _, tok, ref = gemma
  tok.padding_side = "left"
  enc = tok(PROMPTS, return_tensors="np", padding=True)
  ours = generate(model, variables, enc["input_ids"], enc["attention_mask"], max_new_tokens=10,
                  eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
  with torch.no_grad():
    want = ref.generate(torch.tensor(enc["input_ids"]), attention_mask=torch.tensor(enc["attention_mask"]),
                        max_new_tokens=10, do_sample=False, eos_token_id=tok.eos_token_id,
                        pad_token_id=tok.pad_token_id)[:, enc["input_ids"].shape[1]:].numpy()
  np.testing.assert_array_equal(ours[:, :want.shape[1]], want)
  texts = [tok.decode(r, skip_special_tokens=True) for r in ours]
  assert "dog" in texts[0].lower()  # it translates: "The dog is sleeping in the garden."
