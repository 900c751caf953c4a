"""Run unmodified Flax NNX models with LoRA unmerged and quantized bases dequantized in the step."""

from jax_lora._src.nnx import apply

__all__ = [
    "apply",
]
