"""Several adapters on one base: extract/attach, PEFT's add_weighted_adapter, an adapter bank."""

from jax_lora._src.adapt import lora_weights
from jax_lora._src.adapters import extract
from jax_lora._src.adapters import attach
from jax_lora._src.adapters import strip
from jax_lora._src.adapters import combine_adapters
from jax_lora._src.adapters import AdapterBank

__all__ = [
    "lora_weights",
    "extract",
    "attach",
    "strip",
    "combine_adapters",
    "AdapterBank",
]
