"""Gradient checkpointing's recompute cost: LoRA / QLoRA step time with remat none / full / dots.

Usage: python bench/bench_remat.py [--steps 8] [--rounds 3] [--layers 4] [--json FILE]

Same 4-block Linen transformer and LoRA (all linear layers, r=8) as
``bench/bench_lora.py``; each block is wrapped with ``jax_lora.remat.remat_module``.
Prints median step times and the ratios remat full / none and dots / none (the
price of recomputing each block's forward pass in the backward pass), for LoRA
and for QLoRA (NF4, double quantization), plus each step's compiled temp memory.
"""

from __future__ import annotations

import dataclasses
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import optax  # noqa: E402

import jax_lora as jl  # noqa: E402
from bench.model import BenchConfig, Transformer, make, parse_args  # noqa: E402
from bench.timing import interleaved_medians, write_json  # noqa: E402


def build(cfg: BenchConfig, rank: int = 8):
  _, params, x, y = make(cfg)
  tx = optax.adamw(1e-4)
  lcfg = jl.LoraConfig(rank=rank, alpha=2.0 * rank, targets=(r"(.*/)?kernel",))  # every kernel, lm_head too
  cases, temps = {}, {}
  for base in ("lora", "qlora"):
    p = jl.quantize(params, jl.QuantConfig(min_size=0)) if base == "qlora" else params
    tr, fr = jl.split(jl.init_lora(p, lcfg, jax.random.key(1)))
    st = tx.init(tr)
    for remat in ("none", "full", "dots"):
      model = Transformer(dataclasses.replace(cfg, remat=remat))

      def step(tr, st, fr, x, model=model):
        loss, g = jax.value_and_grad(lambda t: jnp.mean((jl.linen.apply(model, jl.combine(t, fr), x) - y) ** 2))(tr)
        upd, st = tx.update(g, st, tr)
        return optax.apply_updates(tr, upd), st, loss

      fn = jax.jit(step)
      temps[f"{base}_{remat}"] = fn.lower(tr, st, fr, x).compile().memory_analysis().temp_size_in_bytes
      cases[f"{base}_{remat}"] = (fn, (tr, st, fr, x))
  return cases, temps


def main(argv=None):
  a, cfg = parse_args(__doc__.splitlines()[0], argv)
  cases, temps = build(cfg)
  med = interleaved_medians(cases, a.steps, a.rounds)
  print(f"jax {jax.__version__} on {jax.devices()[0].platform}; {cfg}")
  for k, v in med.items():
    print(f"{k:<12} {1e3 * v:8.1f} ms   temp {temps[k] / 2**20:8.1f} MiB")
  res = {"median_s": med, "temp_bytes": temps}
  for base in ("lora", "qlora"):
    for remat in ("full", "dots"):
      r = med[f"{base}_{remat}"] / med[f"{base}_none"]
      res[f"{base} {remat}/none"] = r
      print(f"{base} remat {remat} / none  {r:6.3f}")
  write_json(a.json, res)
  return res


if __name__ == "__main__":
  main()
