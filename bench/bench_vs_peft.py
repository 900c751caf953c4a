"""Training step time: jax-lora vs PEFT + PyTorch on the same model, batch and CPU.

Usage: python bench/bench_vs_peft.py [--steps 5] [--rounds 2] [--batch 8] [--seq 96] [--rank 16]

SmolLM2-135M-Instruct (the shipped GGUF, dequantized to fp32 and written once as
an HF folder), LoRA r=16 α=32 on all 7 linear projections, AdamW, prompt/completion
rows with the loss on the last 40% of tokens; both sides run the LM head only where
the loss needs it (PEFT: transformers' ``logits_to_keep`` over the trained suffix;
jax-lora: at the loss positions, as `jax-lora train` does). Both sides
run in this process, interleaved in rounds (drift cancels); prints median
step times and the ratio ours / PEFT (target < 1).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402

from bench.timing import interleaved_medians  # noqa: E402

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def torch_side(folder, ids, mask, loss_mask, rank, alpha, lr):
  import torch
  from peft import LoraConfig, get_peft_model
  from transformers import AutoModelForCausalLM

  torch.manual_seed(0)
  model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
  model = get_peft_model(model, LoraConfig(r=rank, lora_alpha=alpha, target_modules=TARGETS, lora_dropout=0.0,
                                           task_type="CAUSAL_LM"))
  model.train()
  opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
  ids_t, mask_t = torch.tensor(ids), torch.tensor(mask)
  # The same saving as ours: the LM head only where the loss needs it. Logits at t
  # predict token t+1, so keeping the last `keep` positions covers every loss token.
  first = int(np.argmax(np.asarray(loss_mask).any(0)))
  keep = ids_t.shape[1] - first + 1
  targets = ids_t[:, -keep + 1:]
  labels = torch.where(torch.tensor(loss_mask)[:, -keep + 1:] > 0, targets, torch.tensor(-100))  # prompt ignored

  def step():
    logits = model(input_ids=ids_t, attention_mask=mask_t, logits_to_keep=keep).logits[:, :-1]
    loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1),
                                             ignore_index=-100)
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return float(loss.detach())

  return step


def jax_side(folder, ids, mask, loss_mask, rank, alpha, lr):
  import jax
  import jax.numpy as jnp
  import optax

  import jax_lora as jl
  from jax_lora.models import load_hf

  model, variables, _ = load_hf(folder, dtype=jnp.float32)
  params = variables["params"]
  cfg = jl.LoraConfig(rank=rank, alpha=alpha, targets=(r".*/(" + "|".join(TARGETS) + r")/kernel",))
  tr, fr = jl.split(jl.init_lora(params, cfg, jax.random.key(0)))
  tx = optax.adamw(lr)
  st = tx.init(tr)
  from jax_lora_app.loop import token_nll, with_loss_targets

  batch = {k: jnp.asarray(v) for k, v in with_loss_targets(
      {"input_ids": ids, "attention_mask": mask, "loss_mask": loss_mask}).items()}

  @jax.jit
  def step_fn(tr, st):
    def loss_fn(t):  # the LM head runs only where the loss needs it (as `jax-lora train` does)
      logits, _ = jl.linen.apply(model, jl.combine(t, fr), batch["input_ids"], batch["attention_mask"],
                                 logits_index=batch["logit_pos"])
      s, n = token_nll(logits, batch["target_ids"], batch["target_w"])
      return s / n
    loss, g = jax.value_and_grad(loss_fn)(tr)
    upd, st = tx.update(g, st, tr)
    return optax.apply_updates(tr, upd), st, loss

  state = {"tr": tr, "st": st}

  def step():
    state["tr"], state["st"], loss = step_fn(state["tr"], state["st"])
    return float(jax.block_until_ready(loss))

  return step


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--steps", type=int, default=5)
  ap.add_argument("--rounds", type=int, default=2)
  ap.add_argument("--batch", type=int, default=8)
  ap.add_argument("--seq", type=int, default=96)
  ap.add_argument("--rank", type=int, default=16)
  ap.add_argument("--cache", default=None, help="where the HF folder is materialized (default: jax_lora's cache)")
  a = ap.parse_args(argv)
  import torch

  from jax_lora.models.shipped import smollm2_hf_folder

  torch.set_num_threads(os.cpu_count() or 2)
  folder = smollm2_hf_folder(a.cache)
  rng = np.random.default_rng(0)
  ids = rng.integers(3, 49152, size=(a.batch, a.seq)).astype(np.int64)
  mask = np.ones_like(ids)
  # prompt/completion rows like the default task: loss on the last 40% of each row
  loss_mask = np.zeros_like(ids)
  loss_mask[:, int(0.6 * a.seq):] = 1
  sides = {"peft_torch": torch_side(folder, ids, mask, loss_mask, a.rank, 2 * a.rank, 3e-4),
           "jax_lora": jax_side(folder, ids, mask, loss_mask, a.rank, 2 * a.rank, 3e-4)}
  first_torch = sides["peft_torch"]()
  t0 = time.perf_counter()
  first_jax = sides["jax_lora"]()  # compile
  compile_s = time.perf_counter() - t0
  med = interleaved_medians({k: (step, ()) for k, step in sides.items()}, a.steps, a.rounds)
  print(f"SmolLM2-135M, LoRA r={a.rank} all linear, batch {a.batch} x seq {a.seq}, fp32, AdamW")
  print(f"jax-lora compile (excluded): {compile_s:.1f} s")
  print(f"first-step loss (same weights, same batch): peft_torch {first_torch:.5f}, jax_lora {first_jax:.5f}")
  for k, v in med.items():
    print(f"{k:<12} median step {v:.3f} s")
  print(f"jax_lora / peft_torch step time: {med['jax_lora'] / med['peft_torch']:.3f}  (target < 1)")


if __name__ == "__main__":
  main()
