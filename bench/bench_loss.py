"""XLA temp memory of LM head + cross-entropy + backward: plain vs chunked (jax_lora.losses).

Usage: python bench/bench_loss.py [--d 4096] [--vocab 128256] [--tokens 2048 8192] [--chunks 1024 4096]
                                  [--json FILE]

Nothing runs: each loss is ``jax.jit(jax.value_and_grad(mean_loss, argnums=...))``, with
gradients w.r.t. the hidden states only (a frozen head, as in LoRA without an
lm_head adapter) or w.r.t. the head kernel too (full fine-tuning), lowered for
abstract float32 arguments and compiled; the table gives
``compiled.memory_analysis().temp_size_in_bytes`` (the scratch XLA plans for the step,
on this backend), the float32 logits a plain loss materializes (N x V x 4 bytes), and
the compile time. Defaults: a Llama-3.1-8B-like head (d=4096, V=128256, untied).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import warnings

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
warnings.filterwarnings("ignore")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from bench.timing import write_json  # noqa: E402
from jax_lora.losses import chunked_token_nll  # noqa: E402

GIB = 2**30


def temp_bytes(n: int, d: int, vocab: int, chunk: int, argnums: tuple[int, ...]) -> tuple[int, float]:
  """(temp bytes, compile seconds) of value_and_grad of the token-mean loss; chunk 0 = plain."""

  def mean_loss(kernel, hidden, targets, weights):
    s, cnt = chunked_token_nll(lambda w, h: h @ w, kernel, hidden, targets, weights, chunk=chunk)
    return s / cnt

  args = (jax.ShapeDtypeStruct((d, vocab), jnp.float32), jax.ShapeDtypeStruct((n, d), jnp.float32),
          jax.ShapeDtypeStruct((n,), jnp.int32), jax.ShapeDtypeStruct((n,), jnp.float32))
  t = time.perf_counter()
  compiled = jax.jit(jax.value_and_grad(mean_loss, argnums=argnums)).lower(*args).compile()
  return compiled.memory_analysis().temp_size_in_bytes, time.perf_counter() - t


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--d", type=int, default=4096)
  p.add_argument("--vocab", type=int, default=128256)
  p.add_argument("--tokens", type=int, nargs="+", default=[2048, 8192])
  p.add_argument("--chunks", type=int, nargs="+", default=[1024, 4096])
  p.add_argument("--json", default=None)
  a = p.parse_args(argv)
  rows = []
  print(f"LM head + cross-entropy, value_and_grad, float32, d={a.d}, V={a.vocab}, backend {jax.default_backend()}\n")
  print("| tokens N | grads w.r.t. | loss | temp GiB | N x V x 4 (logits) GiB | temp / logits | compile s |")
  print("|---:|---|---|---:|---:|---:|---:|")
  for n in a.tokens:
    logits = n * a.vocab * 4
    for wrt, argnums in (("hidden", (1,)), ("kernel + hidden", (0, 1))):
      for chunk in [0, *a.chunks]:
        if chunk >= n:  # one chunk: the plain loss
          continue
        tb, ct = temp_bytes(n, a.d, a.vocab, chunk, argnums)
        name = "plain" if chunk == 0 else f"chunked {chunk}"
        rows.append({"tokens": n, "grads": wrt, "chunk": chunk, "temp_bytes": tb, "logits_bytes": logits,
                     "compile_s": round(ct, 2)})
        print(f"| {n} | {wrt} | {name} | {tb / GIB:.3f} | {logits / GIB:.3f} | {tb / logits:.3f} | {ct:.1f} |",
              flush=True)
  if a.json:
    write_json(a.json, {"d": a.d, "vocab": a.vocab, "backend": jax.default_backend(), "rows": rows})
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
