"""NF4 quantization speed (vs bitsandbytes CPU and qwix) and stored bits per parameter.

Usage: python bench/bench_quant.py [--size 4096] [--rounds 5] [--no-smollm] [--json FILE]

All numbers come from one run on this machine:
  - seconds to NF4-quantize a size×size float32 matrix (block 64): ours (jitted,
    warm, with and without double quantization), qwix (``quantize_api(w, 'nf4')``
    jitted, warm; skipped if qwix is not installed) and bitsandbytes on CPU;
    ratios ours/qwix (target ≤ 1) and ours/bitsandbytes.
  - stored bits per parameter of SmolLM2-135M's linear weights (read from the
    shipped GGUF), measured from the arrays: ≤ 4.13 with double quantization,
    ≤ 4.51 without.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
import warnings

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
warnings.filterwarnings("ignore")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from bench.timing import write_json  # noqa: E402
from jax_lora import quant as Q  # noqa: E402


def _median(fn, rounds: int) -> float:
  ts = []
  for _ in range(rounds):
    t = time.perf_counter()
    jax.block_until_ready(fn())
    ts.append(time.perf_counter() - t)
  return statistics.median(ts)


def time_quantization(size: int, rounds: int) -> dict[str, float]:
  w = jax.random.normal(jax.random.key(0), (size, size), jnp.float32)
  out = {}
  for dq in (True, False):
    f = lambda: Q.quantize_array(w, "nf4", 64, double_quant=dq, check_finite=False).codes
    t = time.perf_counter()
    jax.block_until_ready(f())
    out[f"ours_dq={dq}_first_call_s"] = time.perf_counter() - t
    out[f"ours_dq={dq}_s"] = _median(f, rounds)
  try:
    from qwix._src.core import qarray
    qf = jax.jit(lambda w: qarray.quantize_api(w, "nf4", tiled_axes={0: 64}).qvalue)
    jax.block_until_ready(qf(w))
    out["qwix_s"] = _median(lambda: qf(w), rounds)
  except ImportError:
    pass
  try:
    import torch
    import bitsandbytes.functional as F
    tw = torch.from_numpy(np.asarray(w).T.copy())
    F.quantize_4bit(tw, blocksize=64, quant_type="nf4", compress_statistics=True)
    out["bitsandbytes_s"] = _median(
        lambda: F.quantize_4bit(tw, blocksize=64, quant_type="nf4", compress_statistics=True)[0], rounds)
  except ImportError:
    pass
  return out


def smollm_bits() -> dict[str, float]:
  from jax_lora.models.gguf import read_gguf
  from jax_lora.models.shipped import smollm2_gguf_path

  _, sd = read_gguf(smollm2_gguf_path())
  linear = {k: {"kernel": jnp.asarray(v.T)} for k, v in sd.items() if v.ndim == 2 and k.endswith("_proj.weight")}
  out = {"linear_tensors": len(linear), "linear_params": sum(v["kernel"].size for v in linear.values())}
  for dq in (True, False):
    rep = Q.bits_report(Q.quantize(linear, Q.QuantConfig(double_quant=dq, min_size=0)))
    out[f"bits_per_param_dq={dq}"] = rep.bits_per_param
  return out


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--size", type=int, default=4096)
  ap.add_argument("--rounds", type=int, default=5)
  ap.add_argument("--no-smollm", action="store_true", help="skip the SmolLM2 bits measurement")
  ap.add_argument("--json", default=None)
  a = ap.parse_args(argv)
  res = {"size": a.size, **time_quantization(a.size, a.rounds)}
  ours = res["ours_dq=True_s"]
  print(f"NF4 quantization of {a.size}x{a.size} (block 64), median of {a.rounds}:")
  print(f"  ours, double quant   {ours:8.4f} s   (first call with compile {res['ours_dq=True_first_call_s']:.3f} s)")
  print(f"  ours, no double quant{res['ours_dq=False_s']:8.4f} s")
  for k in ("qwix", "bitsandbytes"):
    if f"{k}_s" in res:
      res[f"ours/{k}"] = ours / res[f"{k}_s"]
      print(f"  {k:<20} {res[f'{k}_s']:8.4f} s   ours/{k} = {res[f'ours/{k}']:.3f}")
    else:
      print(f"  {k:<20} not installed, skipped")
  if not a.no_smollm:
    res.update(smollm_bits())
    print(f"SmolLM2-135M linear weights ({res['linear_tensors']} tensors, {res['linear_params']:,} params):")
    print(f"  stored bits/param with double quant    {res['bits_per_param_dq=True']:.4f}  (target <= 4.13)")
    print(f"  stored bits/param without double quant {res['bits_per_param_dq=False']:.4f}  (target <= 4.51)")
  write_json(a.json, res)
  return res


if __name__ == "__main__":
  main()
