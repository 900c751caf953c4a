"""Run unmodified Flax NNX models with LoRA unmerged and quantized bases dequantized in the step."""

from jax_lora._src.nnx import apply
from jax_lora._src.nnx import apply_with_state
from jax_lora._src.nnx import infer_layouts

__all__ = [
    "apply",
    "apply_with_state",
    "infer_layouts",
]
