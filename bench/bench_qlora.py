"""QLoRA (NF4 base, double quantization) vs LoRA training step on the core benchmark model.

Usage: python bench/bench_qlora.py [--steps 8] [--rounds 3] [--layers 4] [--json FILE]

Same 4-block Linen transformer as ``bench/bench_lora.py``, same LoRA (all linear
layers, r=8), one process; the base kernels are NF4-quantized (block 64, double
quantization) and dequantized inside the jitted step. Prints the median step
times and qlora / lora (target ≤ 1.15), plus the forward-only ratio.
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import optax  # noqa: E402

import jax_lora as jl  # noqa: E402
from bench.timing import interleaved_medians, write_json  # noqa: E402
from bench.model import BenchConfig, make, parse_args  # noqa: E402
from jax_lora import quant as Q  # noqa: E402


def build(cfg: BenchConfig, rank: int = 8):
  model, params, x, y = make(cfg)
  tx = optax.adamw(1e-4)
  lcfg = jl.LoraConfig(rank=rank, alpha=2.0 * rank, targets=(r"(.*/)?kernel",))  # every kernel, lm_head too

  @jax.jit
  def step(tr, st, fr, x):
    loss, g = jax.value_and_grad(lambda t: jnp.mean((jl.linen.apply(model, jl.combine(t, fr), x) - y) ** 2))(tr)
    upd, st = tx.update(g, st, tr)
    return optax.apply_updates(tr, upd), st, loss

  fwd = jax.jit(lambda t, f, x: jl.linen.apply(model, jl.combine(t, f), x))

  def parts(p):
    tr, fr = jl.split(jl.init_lora(p, lcfg, jax.random.key(1)))
    return tr, fr, tx.init(tr)

  tr, fr, st = parts(params)
  qtr, qfr, qst = parts(Q.quantize(params, Q.QuantConfig(min_size=0)))
  return {
      "lora": (step, (tr, st, fr, x)),
      "qlora": (step, (qtr, qst, qfr, x)),
      "fwd_lora": (fwd, (tr, fr, x)),
      "fwd_qlora": (fwd, (qtr, qfr, x)),
  }, Q.bits_report(qfr)


def main(argv=None):
  a, cfg = parse_args(__doc__.splitlines()[0], argv)
  cases, bits = build(cfg)
  med = interleaved_medians(cases, a.steps, a.rounds)
  print(f"jax {jax.__version__} on {jax.devices()[0].platform}; {cfg}")
  for k, v in med.items():
    print(f"{k:<12} {1e3 * v:8.1f} ms")
  r = med["qlora"] / med["lora"]
  rf = med["fwd_qlora"] / med["fwd_lora"]
  print(f"qlora / lora         {r:6.3f}  target <= 1.15: {'PASS' if r <= 1.15 else 'FAIL'}")
  print(f"fwd qlora / fwd lora {rf:6.3f}")
  print(f"stored bits/param of the quantized kernels: {bits.bits_per_param:.4f}")
  res = {"median_s": med, "qlora/lora": r, "fwd_qlora/fwd_lora": rf, "bits_per_param": bits.bits_per_param}
  write_json(a.json, res)
  return res


if __name__ == "__main__":
  main()
