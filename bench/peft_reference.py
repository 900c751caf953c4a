"""The PEFT + PyTorch reference run of a `jax-lora train` config, on the same data and test prompts.

Usage: python bench/peft_reference.py [CONFIG.yaml] [key=value ...] [--out runs/peft_reference.json]

Trains the config's LoRA recipe with PEFT + PyTorch (CPU) instead of jax-lora:
the same HF model folder, tokenization (train.data), batch order
(train.data.Batcher with the config's seed), token-mean loss on the completion
tokens (labels -100 elsewhere), AdamW with the same warmup/decay schedule,
weight decay and gradient clipping, then greedy decoding of the same test
prompts (left-padded HF ``generate``, cut at EOS / newline like `jax-lora
train`) scored with the same sacreBLEU call. Prints and writes the BLEU before
and after, validation loss and the training time, so the two libraries' gains
are compared on one test set, not on two different splits.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402

# `all-linear` on a Llama: the 7 projections (the LM head is tied to the embedding).
ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _generate(model, tok, prompts, max_new_tokens, batch_size):
  import torch

  from jax_lora_app import metrics as tm

  tok.padding_side = "left"
  pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
  out = []
  model.eval()
  for i in range(0, len(prompts), batch_size):
    enc = tok(prompts[i:i + batch_size], return_tensors="pt", padding=True)
    with torch.no_grad():
      gen = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=tok.eos_token_id,
                           pad_token_id=pad)
    out += tm.decode_generated(tok, gen[:, enc["input_ids"].shape[1]:].numpy(), tok.eos_token_id)
  return out


def _val_loss(model, batches):
  import torch

  model.eval()
  tot = cnt = 0.0
  with torch.no_grad():
    for b in batches:
      ids, att, lm = (torch.tensor(b[k], dtype=torch.long) for k in ("input_ids", "attention_mask", "loss_mask"))
      logits = model(input_ids=ids, attention_mask=att).logits[:, :-1].float()
      nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), ids[:, 1:], reduction="none")
      w = lm[:, 1:].float()
      tot, cnt = tot + float((nll * w).sum()), cnt + float(w.sum())
  return tot / max(cnt, 1.0)


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("config", nargs="?", default=None, help="train config (default: configs/default.yaml)")
  ap.add_argument("overrides", nargs="*", help="key=value overrides, as for jax-lora train")
  ap.add_argument("--out", default="runs/peft_reference.json", help="where the results JSON is written")
  a = ap.parse_args(argv)
  if a.config is not None and "=" in a.config:
    a.overrides, a.config = [a.config, *a.overrides], None
  import torch
  from peft import LoraConfig, get_peft_model
  from transformers import AutoModelForCausalLM, AutoTokenizer

  from jax_lora_app import data as td
  from jax_lora_app import metrics as tm
  from jax_lora_app.config import load_config, resolve_data, resolve_model
  from jax_lora_app.loop import lr_schedule

  cfg = load_config(a.config, a.overrides)
  if cfg.method != "lora" or cfg.optim.grad_accum != 1 or cfg.data.packing:
    raise SystemExit("peft_reference: the reference covers method=lora without grad_accum or packing")
  if tuple(cfg.lora.targets) != ("all-linear",):
    raise SystemExit("peft_reference: the reference covers lora.targets=[all-linear]")
  torch.set_num_threads(os.cpu_count() or 2)
  torch.manual_seed(cfg.seed)
  folder = resolve_model(cfg.model)
  tok = AutoTokenizer.from_pretrained(folder)
  pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
  paths = resolve_data(cfg)
  train_ex = td.tokenize_rows(tok, td.load_rows(paths["train"]), cfg.seq_len)
  batcher = td.Batcher(train_ex, batch_size=cfg.batch_size, seq_len=cfg.seq_len, pad_id=pad, seed=cfg.seed,
                       bucket=cfg.data.bucket)
  val_rows = td.load_rows(paths["validation"])[: cfg.eval.num_validation or None]
  val = td.eval_batches(td.tokenize_rows(tok, val_rows, cfg.seq_len), batch_size=cfg.batch_size,
                        seq_len=cfg.seq_len, pad_id=pad, bucket=cfg.data.bucket)
  test = td.load_rows(paths["test"])[: cfg.eval.num_test]
  prompts, refs = [r["prompt"] for r in test], [r["completion"].strip() for r in test]

  model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
  model = get_peft_model(model, LoraConfig(r=cfg.lora.rank, lora_alpha=cfg.lora.alpha, target_modules=ALL_LINEAR,
                                           lora_dropout=cfg.lora.dropout, use_rslora=cfg.lora.use_rslora,
                                           task_type="CAUSAL_LM"))
  res = {"config": a.config or "configs/default.yaml", "overrides": a.overrides, "steps": cfg.steps,
         "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad)}
  t = time.perf_counter()
  res["before"] = {"validation_loss": _val_loss(model, val),
                   "bleu": tm.bleu(_generate(model, tok, prompts, cfg.eval.max_new_tokens, cfg.eval.batch_size), refs)}
  res["before"]["eval_s"] = round(time.perf_counter() - t, 1)
  print(json.dumps({"event": "before", **res["before"]}), flush=True)

  o = cfg.optim
  schedule = lr_schedule(o, cfg.steps)
  opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=o.lr, betas=(o.b1, o.b2), eps=o.eps,
                          weight_decay=o.weight_decay)
  sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: float(schedule(step)) / o.lr)
  t0, times = time.perf_counter(), []
  for step in range(cfg.steps):
    model.train()
    b = batcher.batch_at(step)
    ids = torch.tensor(b["input_ids"], dtype=torch.long)
    labels = torch.where(torch.tensor(b["loss_mask"]) > 0, ids, torch.tensor(-100))
    ts = time.perf_counter()
    loss = model(input_ids=ids, attention_mask=torch.tensor(b["attention_mask"], dtype=torch.long), labels=labels).loss
    loss.backward()
    if o.grad_clip > 0:
      torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], o.grad_clip)
    opt.step()
    sched.step()
    opt.zero_grad(set_to_none=True)
    times.append(time.perf_counter() - ts)
    if (step + 1) % cfg.log_every == 0:
      print(json.dumps({"event": "train", "step": step + 1, "loss": round(loss.item(), 4),
                        "step_time_s": round(float(np.median(times[-cfg.log_every:])), 3)}), flush=True)
  res["train_s"] = round(time.perf_counter() - t0, 1)
  res["median_step_s"] = round(float(np.median(times)), 3)
  t = time.perf_counter()
  hyps = _generate(model, tok, prompts, cfg.eval.max_new_tokens, cfg.eval.batch_size)
  res["after"] = {"validation_loss": _val_loss(model, val), "bleu": tm.bleu(hyps, refs),
                  "eval_s": round(time.perf_counter() - t, 1), "samples": hyps[:5]}
  res["bleu_gain"] = res["after"]["bleu"] - res["before"]["bleu"]
  print(json.dumps({"event": "after", **{k: v for k, v in res["after"].items() if k != "samples"},
                    "bleu_gain": res["bleu_gain"], "train_s": res["train_s"]}), flush=True)
  os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
  tmp = a.out + ".tmp"
  with open(tmp, "w", encoding="utf-8") as f:
    json.dump(res, f, indent=1)
  os.replace(tmp, a.out)


if __name__ == "__main__":
  main()
