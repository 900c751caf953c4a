"""The benchmark model: pre-LN transformer blocks written with plain Flax Linen layers.

Nothing in it knows about LoRA: jax_lora intercepts its ``nn.Dense`` calls.
Tokens are flattened to (batch·seq, d) before every projection (on XLA:CPU a
weight gradient that contracts two axes falls off the fast GEMM path; this
helps the full fine-tuning baseline as much as LoRA).
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp

from jax_lora.remat import remat_module


@dataclasses.dataclass(frozen=True)
class BenchConfig:
  layers: int = 4
  d_model: int = 512
  heads: int = 8
  mlp_ratio: int = 4
  batch: int = 8
  seq: int = 128
  dtype: str = "float32"
  remat: str = "none"  # per-block gradient checkpointing (jax_lora.remat policy name)


class Block(nn.Module):
  cfg: BenchConfig

  @nn.compact
  def __call__(self, x):  # x: (N, d) with N = batch·seq
    c = self.cfg
    b, t, h = c.batch, c.seq, c.heads
    hd = c.d_model // h
    y = nn.LayerNorm(name="ln1")(x)
    q = nn.Dense(c.d_model, name="q_proj")(y).reshape(b, t, h, hd)
    k = nn.Dense(c.d_model, name="k_proj")(y).reshape(b, t, h, hd)
    v = nn.Dense(c.d_model, name="v_proj")(y).reshape(b, t, h, hd)
    s = jnp.einsum("bqhd,bkhd->bhqk", q, k) / jnp.sqrt(hd).astype(x.dtype)
    mask = jnp.tril(jnp.ones((t, t), bool))
    p = jax.nn.softmax(jnp.where(mask, s, jnp.finfo(s.dtype).min), axis=-1)
    o = jnp.einsum("bhqk,bkhd->bqhd", p, v).reshape(b * t, c.d_model)
    x = x + nn.Dense(c.d_model, name="o_proj")(o)
    y = nn.LayerNorm(name="ln2")(x)
    y = nn.Dense(c.mlp_ratio * c.d_model, name="up_proj")(y)
    return x + nn.Dense(c.d_model, name="down_proj")(jax.nn.gelu(y))


class Transformer(nn.Module):
  cfg: BenchConfig

  @nn.compact
  def __call__(self, x):  # (batch, seq, d)
    c = self.cfg
    h = x.reshape(-1, c.d_model)
    block = remat_module(Block, c.remat)
    for i in range(c.layers):
      h = block(c, name=f"layers_{i}")(h)
    return nn.LayerNorm(name="ln_f")(h).reshape(x.shape)


def make(cfg: BenchConfig = BenchConfig(), seed: int = 0):
  """Returns (model, params, x, y) with a regression target."""
  model = Transformer(cfg)
  kx, ky, kp = jax.random.split(jax.random.key(seed), 3)
  x = jax.random.normal(kx, (cfg.batch, cfg.seq, cfg.d_model), jnp.dtype(cfg.dtype))
  y = jax.random.normal(ky, x.shape, x.dtype)
  params = model.init(kp, x)["params"]
  return model, params, x, y


def parse_args(description: str, argv=None):
  """``(args, BenchConfig)`` from the options every core-model benchmark takes: timed calls
  per case per round, interleaved rounds, the model's size, and a JSON output path."""
  import argparse

  ap = argparse.ArgumentParser(description=description)
  ap.add_argument("--steps", type=int, default=8, help="timed calls per case per round")
  ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds (drift cancels)")
  ap.add_argument("--layers", type=int, default=4)
  ap.add_argument("--d-model", type=int, default=512)
  ap.add_argument("--batch", type=int, default=8)
  ap.add_argument("--seq", type=int, default=128)
  ap.add_argument("--json", default=None, help="also write results here")
  a = ap.parse_args(argv)
  return a, BenchConfig(layers=a.layers, d_model=a.d_model, batch=a.batch, seq=a.seq)
