"""Compiled peak memory of full / LoRA / QLoRA training steps, from abstract params (no weights).

Usage:
  python bench/bench_memory.py --only shapes=1b-8l methods=full,lora,qlora seqs=512 [--scan] [--remat full]
  python bench/bench_memory.py --only shapes=8b methods=qlora seqs=2048,8192 --remat full
  python bench/bench_memory.py --max-context --only shapes=8b methods=qlora --remat full
  options: --attention auto|naive|blockwise (the model's training attention), --loss-chunk N (LM head +
           loss in chunks of N tokens, jax_lora.losses), --batch, --rank, --dtype, --json PATH

Nothing is allocated: the params come from ``jax.eval_shape(model.init, ...)``,
the LoRA/QLoRA trees from ``jax.eval_shape`` over ``jl.init_lora`` /
``jl.quantize``, the AdamW state from ``jax.eval_shape(tx.init, ...)``. The step
is train/loop.py's (``make_loss_fn`` + ``make_train_step``: LoRA through
``jl.linen.apply`` on ``combine(trainable, frozen)``, grads of the trainable
half only, trainable and optimizer state donated), lowered and compiled for the
default backend; peak = arguments + outputs - aliased + temporaries from
``compiled.memory_analysis()``. float32 everywhere unless ``--dtype bfloat16``.

Shapes: ``1b-8l`` (Llama-3.2-1B cut to 8 layers, the issue's baseline), ``1b``
(16 layers), ``8b`` (Llama-3.1-8B), ``70b`` (Llama-2-70B). LoRA r=16 on every
linear kernel (lm_head too when untied); QLoRA = NF4, block 64, double quant, on
the adapted kernels (as train/loop.py does).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

import jax_lora as jl
import jax_lora.adapters  # noqa: F401 - jl.adapters  # noqa: E402
from jax_lora.models.llama import LlamaConfig, LlamaForCausalLM  # noqa: E402

__all__ = ["SHAPES", "llama_config", "step_memory", "max_context"]

GIB = 1024**3
GB = 1000**3

_1B = dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_attention_heads=32,
           num_key_value_heads=8, head_dim=64, tie_word_embeddings=True, rope_theta=500000.0)
SHAPES = {
    "1b-8l": dict(_1B, num_hidden_layers=8),
    "1b": dict(_1B, num_hidden_layers=16),
    "8b": dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
               num_attention_heads=32, num_key_value_heads=8, head_dim=128, rope_theta=500000.0),
    "70b": dict(vocab_size=32000, hidden_size=8192, intermediate_size=28672, num_hidden_layers=80,
                num_attention_heads=64, num_key_value_heads=8, head_dim=128),
}


# LoRA targets of these measurements: every kernel.
EVERY_KERNEL = r"(.*/)?kernel"


def llama_config(shape: str, *, scan: bool = False, remat: str = "none", attention: str = "auto",
                 max_len: int = 2048) -> LlamaConfig:
  """The :class:`LlamaConfig` of a named shape with the memory options."""
  return LlamaConfig(**SHAPES[shape], scan_layers=scan, max_position_embeddings=max_len, remat=remat,
                     attention=attention)


def _loss_fn(model, method: str, loss_chunk: int):
  from jax_lora_app.loop import make_loss_fn

  return make_loss_fn(model, method, loss_chunk=loss_chunk)


def abstract_state(cfg: LlamaConfig, method: str, seq: int, *, batch: int = 1, rank: int = 16,
                   dtype=jnp.float32, tx=None, dropout: float = 0.0, compute_dtype=None):
  """``(model, trainable, opt_state, frozen, batch)`` as ShapeDtypeStructs (nothing allocated)."""
  import optax

  from jax_lora.quant import QuantConfig

  tx = optax.adamw(1e-4) if tx is None else tx
  model = LlamaForCausalLM(cfg, dtype=dtype, param_dtype=jnp.float32)
  ids = jax.ShapeDtypeStruct((batch, seq), jnp.int32)
  params = jax.eval_shape(model.init, jax.random.key(0), ids)["params"]
  if method == "full":
    trainable, frozen = params, None
  else:
    layouts = jl.linen.infer_layouts(model, params, ids) if cfg.scan_layers else None
    # every linear kernel, the untied lm_head's too (the README's tables were measured so;
    # the "all-linear" shorthand leaves the head out, as PEFT's)
    lcfg = jl.LoraConfig(rank=rank, alpha=2.0 * rank, targets=(EVERY_KERNEL,), layouts=layouts, dropout=dropout)
    adapted = jax.eval_shape(lambda p: jl.init_lora(p, lcfg, jax.random.key(0)), params)
    if method == "qlora":
      paths = tuple(re.escape(p) for p, v in jl.adapters.lora_weights(adapted).items())
      qcfg = QuantConfig(scheme="nf4", block_size=64, double_quant=True, targets=paths, compute_dtype=compute_dtype)
      adapted = jax.eval_shape(lambda a: jl.quantize(a, qcfg), adapted)
    trainable, frozen = jl.split(adapted)
  opt_state = jax.eval_shape(tx.init, trainable)
  b = {"input_ids": ids, "attention_mask": ids, "loss_mask": ids}
  return model, trainable, opt_state, frozen, b


def step_memory(cfg: LlamaConfig, method: str, seq: int, *, batch: int = 1, rank: int = 16, dtype=jnp.float32,
                loss_chunk: int = 0, dropout: float = 0.0) -> dict:
  """Compiled memory (bytes) of one train/loop.py step; ``peak`` = args + outputs - aliased + temps."""
  import optax

  from jax_lora_app.loop import make_train_step

  tx = optax.adamw(1e-4)
  model, tr, st, fr, b = abstract_state(cfg, method, seq, batch=batch, rank=rank, dtype=dtype, tx=tx,
                                        dropout=dropout)
  step = make_train_step(_loss_fn(model, method, loss_chunk), tx).jitted
  t = time.perf_counter()
  compiled = step.lower(tr, st, fr, b, jax.random.key(0)).compile()
  m = compiled.memory_analysis()
  out = {k: int(getattr(m, f"{k}_size_in_bytes")) for k in ("argument", "output", "alias", "temp")}
  out["peak"] = out["argument"] + out["output"] - out["alias"] + out["temp"]
  out["host_temp"] = int(getattr(m, "host_temp_size_in_bytes", 0))  # e.g. remat="offload" residuals
  out["compile_s"] = round(time.perf_counter() - t, 1)
  return out


def max_context(cfg_fn, method: str, budget_bytes: float, *, lo: int = 512, hi: int = 131072, quantum: int = 512,
                **kw) -> tuple[int, dict]:
  """Longest seq (a multiple of ``quantum``) whose step fits ``budget_bytes``, by bisection (0 if none)."""
  best, best_m = 0, {}
  m = step_memory(cfg_fn(lo), method, lo, **kw)
  if m["peak"] > budget_bytes:
    return 0, m
  best, best_m = lo, m
  a, b = lo // quantum, hi // quantum
  while b - a > 1:
    mid = (a + b) // 2
    m = step_memory(cfg_fn(mid * quantum), method, mid * quantum, **kw)
    print(f"  seq {mid * quantum}: {m['peak'] / GIB:.2f} GiB", file=sys.stderr, flush=True)
    if m["peak"] <= budget_bytes:
      a, best, best_m = mid, mid * quantum, m
    else:
      b = mid
  return best, best_m


def _parse_only(items):
  out = {"shapes": ["1b-8l"], "methods": ["full", "lora", "qlora"], "seqs": [512]}
  for it in items or []:
    k, _, v = it.partition("=")
    if k not in out or not v:
      raise SystemExit(f"--only {it!r}: use shapes=..., methods=... or seqs=... (comma separated)")
    out[k] = [int(x) for x in v.split(",")] if k == "seqs" else v.split(",")
  for s in out["shapes"]:
    if s not in SHAPES:
      raise SystemExit(f"unknown shape {s!r}; use one of {', '.join(SHAPES)}")
  for m in out["methods"]:
    if m not in ("full", "lora", "qlora"):
      raise SystemExit(f"unknown method {m!r}; use full, lora or qlora")
  return out


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--only", nargs="*", help="shapes=1b-8l,8b methods=full,lora,qlora seqs=512,2048")
  ap.add_argument("--scan", action="store_true", help="scan_layers=True")
  ap.add_argument("--remat", default="none", help="model remat policy: none|full|dots|offload")
  ap.add_argument("--attention", default="auto", help="model attention: auto|naive|blockwise")
  ap.add_argument("--loss-chunk", type=int, default=0, help="LM head + loss in chunks of this many tokens (0: off)")
  ap.add_argument("--batch", type=int, default=1)
  ap.add_argument("--rank", type=int, default=16)
  ap.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
  ap.add_argument("--max-context", action="store_true", help="bisect the longest seq fitting 24/48/80 GB")
  ap.add_argument("--budgets", default="24,48,80", help="GB (10^9 bytes) budgets for --max-context")
  ap.add_argument("--json", default=None)
  a = ap.parse_args(argv)
  only = _parse_only(a.only)
  dtype = jnp.dtype(a.dtype)
  kw = dict(batch=a.batch, rank=a.rank, dtype=dtype, loss_chunk=a.loss_chunk)
  print(f"jax {jax.__version__} on {jax.devices()[0].platform}; batch {a.batch}, LoRA r={a.rank}, {a.dtype}, "
        f"scan={a.scan}, remat={a.remat}, attention={a.attention}, loss_chunk={a.loss_chunk}", flush=True)
  rows = []
  if a.max_context:
    print("| shape | method | budget | longest seq | peak GiB |\n|---|---|---|---|---|", flush=True)
    for shape in only["shapes"]:
      for method in only["methods"]:
        for gb in (float(x) for x in a.budgets.split(",")):
          fn = lambda s, shape=shape: llama_config(shape, scan=a.scan, remat=a.remat, attention=a.attention,
                                                   max_len=s)
          seq, m = max_context(fn, method, gb * GB, **kw)
          rows.append(dict(shape=shape, method=method, budget_gb=gb, max_seq=seq, **m))
          print(f"| {shape} | {method} | {gb:g} GB | {seq} | {m['peak'] / GIB:.2f} |", flush=True)
  else:
    print("| shape | seq | method | peak GiB | args | out | alias | temp GiB | host temp GiB | compile s |\n"
          "|---|---|---|---|---|---|---|---|---|---|", flush=True)
    for shape in only["shapes"]:
      for seq in only["seqs"]:
        for method in only["methods"]:
          cfg = llama_config(shape, scan=a.scan, remat=a.remat, attention=a.attention, max_len=seq)
          m = step_memory(cfg, method, seq, **kw)
          rows.append(dict(shape=shape, seq=seq, method=method, **m))
          g = {k: m[k] / GIB for k in ("peak", "argument", "output", "alias", "temp")}
          print(f"| {shape} | {seq} | {method} | {g['peak']:.2f} | {g['argument']:.2f} | {g['output']:.2f} | "
                f"{g['alias']:.2f} | {g['temp']:.2f} | {m['host_temp'] / GIB:.2f} | {m['compile_s']} |", flush=True)
    peaks = {(r["shape"], r["seq"], r["method"]): r["peak"] for r in rows}
    for (shape, seq, method), p in peaks.items():
      if method == "qlora" and (shape, seq, "lora") in peaks:
        print(f"{shape} seq {seq}: qlora/lora = {p / peaks[shape, seq, 'lora']:.3f}")
      if method == "lora" and (shape, seq, "full") in peaks:
        print(f"{shape} seq {seq}: lora/full = {p / peaks[shape, seq, 'full']:.3f}")
  if a.json:
    with open(a.json, "w") as f:
      json.dump(dict(args=vars(a), rows=rows), f, indent=1)
  return rows


if __name__ == "__main__":
  main()
