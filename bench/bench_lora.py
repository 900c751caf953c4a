"""LoRA vs full fine-tuning step time on one model, one process, one run.

Usage: python bench/bench_lora.py [--steps 8] [--rounds 3] [--layers 4] [--json FILE]

Prints median step times and ratios against baselines measured in the same
run (the machine is shared and noisy; absolute times drift, ratios less so):
  lora / full             target <= 0.80
  no-weight-grad / full   the ceiling for any frozen-base method
  merge-every-step / full what forming W + s·BA in the step costs
  fwd lora / fwd base     target <= 1.05;  fwd merged / fwd base ~ 1.00
  lora r=64 / lora r=4    target <= 1.15
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import optax  # noqa: E402

import jax_lora as jl  # noqa: E402
from bench.model import BenchConfig, make, parse_args  # noqa: E402
from bench.timing import interleaved_medians, write_json  # noqa: E402


def build(cfg: BenchConfig):
  model, params, x, y = make(cfg)
  tx = optax.adamw(1e-4)

  def mse(out):
    return jnp.mean((out - y) ** 2)

  @jax.jit
  def full_step(p, st, x):
    loss, g = jax.value_and_grad(lambda p: mse(model.apply({"params": p}, x)))(p)
    upd, st = tx.update(g, st, p)
    return optax.apply_updates(p, upd), st, loss

  @jax.jit
  def no_weight_grad_step(p, x):
    # the same backward pass with no weight gradient at all: d loss / d x only
    return jax.value_and_grad(lambda x: mse(model.apply({"params": p}, x)))(x)

  def lora_parts(rank):
    ad = jl.init_lora(params, jl.LoraConfig(rank=rank, alpha=2.0 * rank, targets=(r"(.*/)?kernel",)),  # every kernel
                      jax.random.key(1))
    tr, fr = jl.split(ad)
    return tr, fr, tx.init(tr)

  @jax.jit
  def lora_step(tr, st, fr, x):
    loss, g = jax.value_and_grad(lambda t: mse(jl.linen.apply(model, jl.combine(t, fr), x)))(tr)
    upd, st = tx.update(g, st, tr)
    return optax.apply_updates(tr, upd), st, loss

  @jax.jit
  def merge_step(tr, st, fr, x):
    loss, g = jax.value_and_grad(
        lambda t: mse(model.apply({"params": jl.merge(jl.combine(t, fr))}, x)))(tr)
    upd, st = tx.update(g, st, tr)
    return optax.apply_updates(tr, upd), st, loss

  fwd_base = jax.jit(lambda p, x: model.apply({"params": p}, x))
  fwd_lora = jax.jit(lambda t, f, x: jl.linen.apply(model, jl.combine(t, f), x))

  tr8, fr8, st8 = lora_parts(8)
  tr4, fr4, st4 = lora_parts(4)
  tr64, fr64, st64 = lora_parts(64)
  merged = jax.jit(jl.merge)(jl.combine(tr8, fr8))
  cases = {
      "full": (full_step, (params, tx.init(params), x)),
      "lora_r8": (lora_step, (tr8, st8, fr8, x)),
      "no_weight_grad": (no_weight_grad_step, (params, x)),
      "merge_every_step": (merge_step, (tr8, st8, fr8, x)),
      "lora_r4": (lora_step, (tr4, st4, fr4, x)),
      "lora_r64": (lora_step, (tr64, st64, fr64, x)),
      "fwd_base": (fwd_base, (params, x)),
      "fwd_lora": (fwd_lora, (tr8, fr8, x)),
      "fwd_merged": (fwd_base, (merged, x)),
  }
  return cases


RATIOS = [
    ("lora_r8 / full", "lora_r8", "full", 0.80),
    ("no_weight_grad / full", "no_weight_grad", "full", None),
    ("merge_every_step / full", "merge_every_step", "full", None),
    ("fwd_lora / fwd_base", "fwd_lora", "fwd_base", 1.05),
    ("fwd_merged / fwd_base", "fwd_merged", "fwd_base", None),
    ("lora_r64 / lora_r4", "lora_r64", "lora_r4", 1.15),
]


def main(argv=None):
  a, cfg = parse_args(__doc__.splitlines()[0], argv)
  med = interleaved_medians(build(cfg), a.steps, a.rounds)
  print(f"jax {jax.__version__} on {jax.devices()[0].platform}; {cfg}")
  print(f"{'case':<20} {'median ms':>10}")
  for k, v in med.items():
    print(f"{k:<20} {1e3 * v:>10.1f}")
  print()
  results = {"median_s": med, "ratios": {}}
  for label, num, den, target in RATIOS:
    r = med[num] / med[den]
    results["ratios"][label] = r
    verdict = "" if target is None else (f"  target <= {target:.2f}: " + ("PASS" if r <= target else "FAIL"))
    print(f"{label:<26} {r:6.3f}{verdict}")
  write_json(a.json, results)
  return results


if __name__ == "__main__":
  main()
