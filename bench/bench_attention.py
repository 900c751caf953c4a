"""Compiled temporary memory of value_and_grad of one attention call, naive vs blockwise.

A Llama-3.1-8B-shaped attention layer (32 query heads, 8 KV heads, head_dim 128),
batch 1, float32, segment ids, blocks 512. Nothing is run: XLA compiles the
gradient for abstract inputs (``jax.ShapeDtypeStruct``) and reports
``memory_analysis().temp_size_in_bytes`` (scratch beyond inputs and outputs).
One (h, s, s) float32 score tensor is given for scale.

  JAX_PLATFORMS=cpu python bench/bench_attention.py
"""

from __future__ import annotations

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax
import jax.numpy as jnp

from jax_lora.models.attention import dot_product_attention

HEADS, KV_HEADS, HEAD_DIM, BATCH = 32, 8, 128, 1
LENGTHS = (2048, 8192, 32768, 65536)
IMPLEMENTATIONS = ("naive", "xla", "blockwise")


def temp_bytes(implementation: str, s: int) -> int:
  """XLA's temp bytes for value_and_grad (w.r.t. q, k, v) of sum(attention output)."""

  def loss(q, k, v, seg):
    return jnp.sum(dot_product_attention(q, k, v, seg, implementation=implementation))

  spec = jax.ShapeDtypeStruct
  args = (spec((BATCH, s, HEADS, HEAD_DIM), jnp.float32), spec((BATCH, s, KV_HEADS, HEAD_DIM), jnp.float32),
          spec((BATCH, s, KV_HEADS, HEAD_DIM), jnp.float32), spec((BATCH, s), jnp.int32))
  compiled = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2))).lower(*args).compile()
  return compiled.memory_analysis().temp_size_in_bytes


def main() -> None:
  print(f"value_and_grad of attention, b={BATCH}, h={HEADS}, kv={KV_HEADS}, d={HEAD_DIM}, float32, "
        f"blocks 512, backend {jax.default_backend()}\n")
  print("| s | (h, s, s) f32 | " + " | ".join(f"{name} temp" for name in IMPLEMENTATIONS) + " |")
  print("|---:|---:|" + "---:|" * len(IMPLEMENTATIONS))
  for s in LENGTHS:
    cells = [f"{temp_bytes(name, s) / 2**20:,.0f} MiB" for name in IMPLEMENTATIONS]
    print(f"| {s} | {HEADS * s * s * 4 / 2**20:,.0f} MiB | " + " | ".join(cells) + " |")


if __name__ == "__main__":
  main()
