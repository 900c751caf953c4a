"""Per-device bytes of a SmolLM2-135M-shaped base on 8 fake CPU devices, measured from the arrays.

Random weights with SmolLM2-135M's architecture (scan-stacked layers), LoRA on
all linear layers, float32 and NF4 (block 64, double quantization) bases, laid
out by each sharding preset; bytes are summed over device 0's shards.

  JAX_PLATFORMS=cpu python bench/bench_sharding.py
"""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402

jax.config.update("jax_num_cpu_devices", 8)

import jax.numpy as jnp  # noqa: E402

import jax_lora as jl  # noqa: E402
from jax_lora import quant  # noqa: E402
from jax_lora import sharding as sh  # noqa: E402
from jax_lora.models import LlamaConfig, LlamaForCausalLM  # noqa: E402

CFG = LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                  num_attention_heads=9, num_key_value_heads=3, head_dim=64, tie_word_embeddings=True,
                  scan_layers=True)
LAYOUT = "bio"


def build(mesh, rules):
  model = LlamaForCausalLM(CFG)
  tokens = jnp.zeros((1, 8), jnp.int32)
  abstract = jax.eval_shape(lambda: model.init(jax.random.key(0), tokens)["params"])
  shard = sh.param_shardings(abstract, rules, mesh)
  params = jax.jit(lambda: model.init(jax.random.key(0), tokens)["params"], out_shardings=shard)()
  return params


def report(name, tree):
  full = sum(int(x.nbytes) for x in jax.tree.leaves(tree))
  dev0 = sh.bytes_per_device(tree)
  print(f"{name:<34} total {full / 2**20:8.1f} MiB   device 0 {dev0 / 2**20:8.1f} MiB   ({full / dev0:4.2f}x less)")


def main():
  cfg = jl.LoraConfig(rank=16, alpha=32, targets=(r".*_proj/kernel",), layouts=((r".*", LAYOUT),))
  qcfg = quant.QuantConfig(block_size=64, targets=(r".*_proj/kernel",))
  for axes, rules_name, rules in [
      ({"data": 8}, "fsdp (in)", sh.fsdp("data")),
      ({"data": 8}, "fsdp (out)", sh.fsdp("data", kernel_dim="out")),
      ({"data": 2, "model": 4}, "fsdp_tp 2x4", sh.fsdp_tp()),
      ({"model": 8}, "tensor_parallel 8", sh.tensor_parallel("model")),
  ]:
    mesh = sh.make_mesh(axes)
    params = build(mesh, rules)
    report(f"float32 base, {rules_name}", params)
    adapted = jl.init_lora(params, cfg, jax.random.key(1))
    tr, _ = jl.split(adapted)
    tr = sh.place(tr, jl.split(sh.param_shardings(adapted, rules, mesh))[0])
    report(f"LoRA r=16 A/B, {rules_name}", tr)
    qad = quant.quantize(adapted, qcfg)
    try:
      qsh = sh.param_shardings(qad, rules, mesh)
    except ValueError as e:
      print(f"NF4 base, {rules_name}: not shardable: {str(e)[:150]}")
      continue
    _, fr = jl.split(sh.place(qad, qsh))
    report(f"NF4 base (+ norms/embed), {rules_name}", fr)


if __name__ == "__main__":
  main()
