"""Run unmodified Flax Linen models with LoRA unmerged and quantized bases dequantized in the step."""

from jax_lora._src.linen import apply
from jax_lora._src.linen import intercept
from jax_lora._src.linen import infer_layouts

__all__ = [
    "apply",
    "intercept",
    "infer_layouts",
]
