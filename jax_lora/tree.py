"""Parameter paths, regex targets and maps over parameter trees (LoRA weights and quantized arrays are single leaves)."""

from jax_lora._src.tree import path_str
from jax_lora._src.tree import flat_paths
from jax_lora._src.tree import match_paths
from jax_lora._src.tree import first_match
from jax_lora._src.tree import map_leaves
from jax_lora._src.tree import leaves
from jax_lora._src.tree import is_quantized
from jax_lora._src.tree import materialize

__all__ = [
    "path_str",
    "flat_paths",
    "match_paths",
    "first_match",
    "map_leaves",
    "leaves",
    "is_quantized",
    "materialize",
]
