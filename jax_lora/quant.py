"""Block-wise quantization (NF4 with double quantization, int4, int8) and QLoRA helpers."""

from jax_lora._src.quant import QuantConfig
from jax_lora._src.quant import QuantizedArray
from jax_lora._src.quant import BitsReport
from jax_lora._src.quant import quantize
from jax_lora._src.quant import dequantize
from jax_lora._src.quant import quantize_array
from jax_lora._src.quant import bits_report
from jax_lora._src.quant import stored_bits
from jax_lora._src.quant import dynamic_map
from jax_lora._src.quant import NF4_CODE
from jax_lora._src.qlora import merge_quantized
from jax_lora._src.qlora import MergeError
from jax_lora._src.qlora import init_loftq
from jax_lora._src.qlora import loftq_init

__all__ = [
    "QuantConfig",
    "QuantizedArray",
    "BitsReport",
    "quantize",
    "dequantize",
    "quantize_array",
    "bits_report",
    "stored_bits",
    "dynamic_map",
    "NF4_CODE",
    "merge_quantized",
    "MergeError",
    "init_loftq",
    "loftq_init",
]
