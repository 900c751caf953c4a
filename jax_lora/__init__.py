"""jax_lora: LoRA and QLoRA for JAX/Flax parameter pytrees."""

from jax_lora import linen
from jax_lora import nnx
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
from jax_lora.optim import lora_optimizer
from jax_lora.paths import path_str

__all__ = [
    "ALL_LINEAR",
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
