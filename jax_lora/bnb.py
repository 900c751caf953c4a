"""bitsandbytes' NF4 safetensors layout, both ways."""

from jax_lora._src.bnb import to_bnb
from jax_lora._src.bnb import from_bnb
from jax_lora._src.bnb import read_nf4_tensors
from jax_lora._src.bnb import quantize_state_dict

__all__ = [
    "to_bnb",
    "from_bnb",
    "read_nf4_tensors",
    "quantize_state_dict",
]
