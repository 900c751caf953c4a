"""`jax-lora train` with PEFT features beyond plain LoRA: the exported adapter is what PEFT loads."""

from __future__ import annotations

import json
import os

import jax.numpy as jnp
import numpy as np


def test_train_dora_exports_an_adapter_peft_loads(tiny, tmp_path):
  import peft
  import torch
  import transformers

  from jax_lora_app import loop
  import jax_lora as jl
  import jax_lora.adapters  # noqa: F401 - jl.adapters
  from jax_lora.models import load_hf

  cfg = tiny.cfg(tmp_path / "run", **{"lora.use_dora": True, "steps": 4, "eval.num_test": 0})
  loop.train(cfg)
  adapter = os.path.join(cfg.out_dir, "adapter")
  assert json.load(open(os.path.join(adapter, "adapter_config.json")))["use_dora"] is True
  model, variables, mcfg = load_hf(tiny.folder)
  ours = jl.load_peft(adapter, variables["params"], mcfg.model_type)
  lws = jl.adapters.lora_weights(ours)
  base_norms = {p: np.linalg.norm(np.asarray(lw.w), axis=0) for p, lw in lws.items()}
  assert max(float(np.abs(np.asarray(lw.m) - base_norms[p]).max()) for p, lw in lws.items()) > 1e-4  # m trained
  ids = np.arange(3, 13, dtype=np.int32)[None]
  got = np.asarray(jl.linen.apply(model, ours, jnp.asarray(ids))[0])
  pm = peft.PeftModel.from_pretrained(transformers.AutoModelForCausalLM.from_pretrained(tiny.folder), adapter).eval()
  with torch.no_grad():
    ref = pm(input_ids=torch.tensor(ids, dtype=torch.long)).logits.numpy()
  np.testing.assert_allclose(got, ref, atol=2e-5, rtol=1e-5)


def test_train_modules_to_save_exports_them_whole(tiny, tmp_path):
  """lora.modules_to_save: [norm] trains the final norm whole beside A/B; PEFT loads the export equal."""
  import peft
  import torch
  import transformers

  from jax_lora_app import loop
  import jax_lora as jl
  from jax_lora.models import load_hf

  cfg = tiny.cfg(tmp_path / "run", **{"lora.modules_to_save": ["norm"], "steps": 4, "eval.num_test": 0})
  loop.train(cfg)
  adapter = os.path.join(cfg.out_dir, "adapter")
  meta = json.load(open(os.path.join(adapter, "adapter_config.json")))
  assert meta["modules_to_save"] == ["norm"]
  model, variables, mcfg = load_hf(tiny.folder)
  ours = jl.load_peft(adapter, variables["params"], mcfg.model_type)
  before = jax_tree_leaf(variables["params"], "model/norm")
  after = jax_tree_leaf(ours, "model/norm")
  assert float(np.abs(after - before).max()) > 1e-4  # the norm trained
  ids = np.arange(3, 13, dtype=np.int32)[None]
  got = np.asarray(jl.linen.apply(model, ours, jnp.asarray(ids))[0])
  pm = peft.PeftModel.from_pretrained(transformers.AutoModelForCausalLM.from_pretrained(tiny.folder), adapter).eval()
  with torch.no_grad():
    ref = pm(input_ids=torch.tensor(ids, dtype=torch.long)).logits.numpy()
  np.testing.assert_allclose(got, ref, atol=2e-5, rtol=1e-5)


def jax_tree_leaf(tree, module):
  from jax_lora.tree import leaves
  (v,) = [np.asarray(x) for p, x in leaves(tree).items() if p.rsplit("/", 1)[0] == module]
  return v
