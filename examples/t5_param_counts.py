"""Trainable LoRA parameters of FLAN-T5-base, from its config alone (no weights, shapes only).

Run: PYTHONPATH=. .venv/bin/python examples/t5_param_counts.py

The config dict is google/flan-t5-base's config.json (architecture fields);
the model is traced with ``jax.eval_shape`` and ``init_lora`` runs on abstract
shapes, so nothing is downloaded or allocated.
"""

import jax
import jax.numpy as jnp

import jax_lora as jl
from jax_lora.models import hf

FLAN_T5_BASE = {  # google/flan-t5-base config.json (architecture fields)
    "model_type": "t5", "vocab_size": 32128, "d_model": 768, "d_kv": 64, "d_ff": 2048, "num_layers": 12,
    "num_decoder_layers": 12, "num_heads": 12, "relative_attention_num_buckets": 32,
    "relative_attention_max_distance": 128, "feed_forward_proj": "gated-gelu", "tie_word_embeddings": False,
    "layer_norm_epsilon": 1e-6, "decoder_start_token_id": 0, "pad_token_id": 0, "eos_token_id": 1,
}
TARGETS = {  # row label → LoraConfig.targets
    "q,v (the seeds' target_modules)": ("q", "v"),
    "all-linear (every linear but the head, as PEFT's)": ("all-linear",),
}


def abstract_params(config_dict):
  """The parameter tree of a T5 config as ShapeDtypeStructs."""
  config = hf.config_from_hf(config_dict)
  model = hf.model_from_config(config)
  ids = jnp.zeros((1, 1), jnp.int32)
  return jax.eval_shape(lambda: model.init(jax.random.key(0), ids, None, ids))["params"]


def count(params, targets, rank):
  """``jl.param_report`` of LoRA ``rank`` on ``targets``, traced on shapes."""
  cfg = jl.LoraConfig(rank=rank, alpha=2 * rank, targets=targets)
  return jl.param_report(jax.eval_shape(lambda p: jl.init_lora(p, cfg, jax.random.key(0)), params))


def table(config_dict=FLAN_T5_BASE, ranks=(4, 8, 16)) -> str:
  params = abstract_params(config_dict)
  base = sum(int(x.size) for x in jax.tree.leaves(params))
  lines = [f"FLAN-T5-base: {base:,} parameters", "", "| targets | " + " | ".join(f"r={r}" for r in ranks) + " |",
           "|---|" + "---|" * len(ranks)]
  for label, targets in TARGETS.items():
    cells = []
    for r in ranks:
      rep = count(params, targets, r)
      cells.append(f"{rep.trainable:,} ({100 * rep.trainable / rep.total:.2f}%)")
    lines.append(f"| {label} | " + " | ".join(cells) + " |")
  return "\n".join(lines)


if __name__ == "__main__":
  print(table())
