"""`jax-lora train` with PEFT features beyond plain LoRA: the exported adapter is what PEFT loads."""

from __future__ import annotations

import json
import os

import jax.numpy as jnp
import numpy as np

import jax_lora as jl
import jax_lora.adapters  # noqa: F401 - jl.adapters


def _train_and_load(tiny, tmp_path, **overrides):
  """Trains the tiny task 4 steps with ``overrides``; returns (adapter folder, its config, our
  params with the adapter loaded, the base params, model)."""
  from jax_lora_app import loop
  from jax_lora.models import load_hf

  cfg = tiny.cfg(tmp_path / "run", **{"steps": 4, "eval.num_test": 0, **overrides})
  loop.train(cfg)
  adapter = os.path.join(cfg.out_dir, "adapter")
  meta = json.load(open(os.path.join(adapter, "adapter_config.json")))
  model, variables, mcfg = load_hf(tiny.folder)
  return adapter, meta, jl.load_peft(adapter, variables["params"], mcfg.model_type), variables["params"], model


def _assert_peft_logits_equal(tiny, adapter, model, ours):
  import peft
  import torch
  import transformers

  ids = np.arange(3, 13, dtype=np.int32)[None]
  got = np.asarray(jl.linen.apply(model, ours, jnp.asarray(ids))[0])
  pm = peft.PeftModel.from_pretrained(transformers.AutoModelForCausalLM.from_pretrained(tiny.folder), adapter).eval()
  with torch.no_grad():
    ref = pm(input_ids=torch.tensor(ids, dtype=torch.long)).logits.numpy()
  np.testing.assert_allclose(got, ref, atol=2e-5, rtol=1e-5)


def _leaf(tree, module):
  from jax_lora.tree import leaves
  (v,) = [np.asarray(x) for p, x in leaves(tree).items() if p.rsplit("/", 1)[0] == module]
  return v


def test_train_dora_exports_an_adapter_peft_loads(tiny, tmp_path):
  adapter, meta, ours, _, model = _train_and_load(tiny, tmp_path, **{"lora.use_dora": True})
  assert meta["use_dora"] is True
  lws = jl.adapters.lora_weights(ours)
  base_norms = {p: np.linalg.norm(np.asarray(lw.w), axis=0) for p, lw in lws.items()}
  assert max(float(np.abs(np.asarray(lw.m) - base_norms[p]).max()) for p, lw in lws.items()) > 1e-4  # m trained
  _assert_peft_logits_equal(tiny, adapter, model, ours)


def test_train_modules_to_save_exports_them_whole(tiny, tmp_path):
  """lora.modules_to_save: [norm] trains the final norm whole beside A/B; PEFT loads the export equal."""
  adapter, meta, ours, base, model = _train_and_load(tiny, tmp_path, **{"lora.modules_to_save": ["norm"]})
  assert meta["modules_to_save"] == ["norm"]
  assert float(np.abs(_leaf(ours, "model/norm") - _leaf(base, "model/norm")).max()) > 1e-4  # the norm trained
  _assert_peft_logits_equal(tiny, adapter, model, ours)


def test_train_trainable_tokens_exports_what_peft_loads(tiny, tmp_path):
  """lora.trainable_token_indices on the tiny tied model: only those rows move, and PEFT (which
  applies them to the tied head too) loads the export with equal logits."""
  adapter, meta, ours, base, model = _train_and_load(tiny, tmp_path, **{"lora.trainable_token_indices": [5, 6]})
  assert meta["trainable_token_indices"] == {"embed_tokens": [5, 6]}
  moved = np.abs(_leaf(ours, "model/embed_tokens") - _leaf(base, "model/embed_tokens")).max(axis=1) > 0
  assert moved.nonzero()[0].tolist() == [5, 6]
  _assert_peft_logits_equal(tiny, adapter, model, ours)
