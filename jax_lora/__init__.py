"""jax_lora: LoRA and QLoRA for JAX/Flax parameter pytrees."""

from jax_lora import adapters
from jax_lora import linen
from jax_lora import models
from jax_lora import nnx
from jax_lora import peft
from jax_lora import quant
from jax_lora import remat
from jax_lora import sharding
from jax_lora.adapters import AdapterBank
from jax_lora.adapters import combine_adapters
from jax_lora.config import ALL_LINEAR
from jax_lora.config import LoraConfig
from jax_lora.functional import apply_fn
from jax_lora.lora import LoraWeight
from jax_lora.lora import ParamReport
from jax_lora.lora import combine
from jax_lora.lora import init_lora
from jax_lora.lora import lora_weights
from jax_lora.lora import merge
from jax_lora.lora import param_report
from jax_lora.lora import split
from jax_lora.lora import unmerge
from jax_lora.ops import dot
from jax_lora.loftq import init_loftq
from jax_lora.optim import lora_optimizer
from jax_lora.paths import path_str
from jax_lora.peft import load_peft
from jax_lora.peft import save_peft
from jax_lora.quant import QuantConfig
from jax_lora.quant import QuantizedArray
from jax_lora.quant import bits_report
from jax_lora.quant import dequantize
from jax_lora.quant import merge_quantized
from jax_lora.quant import quantize

__all__ = [
    "ALL_LINEAR",
    "AdapterBank",
    "QuantConfig",
    "QuantizedArray",
    "adapters",
    "bits_report",
    "combine_adapters",
    "dequantize",
    "init_loftq",
    "load_peft",
    "merge_quantized",
    "models",
    "peft",
    "quant",
    "quantize",
    "remat",
    "save_peft",
    "sharding",
    "LoraConfig",
    "LoraWeight",
    "ParamReport",
    "apply_fn",
    "combine",
    "dot",
    "init_lora",
    "linen",
    "lora_optimizer",
    "lora_weights",
    "merge",
    "nnx",
    "param_report",
    "path_str",
    "split",
    "unmerge",
]

__version__ = "0.1.0"
