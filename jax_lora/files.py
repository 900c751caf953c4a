"""Atomic writes and safetensors model folders (never pickles)."""

from jax_lora._src.files import atomic_file
from jax_lora._src.files import write_text
from jax_lora._src.files import atomic_folder
from jax_lora._src.files import publish_folder
from jax_lora._src.files import weight_files
from jax_lora._src.files import read_safetensors
from jax_lora._src.merge_files import copy_side_files
from jax_lora._src.merge_files import save_tensors
from jax_lora._src.merge_files import SIDE_FILES
from jax_lora._src.merge_files import CONV1D_MODEL_TYPES

__all__ = [
    "atomic_file",
    "write_text",
    "atomic_folder",
    "publish_folder",
    "weight_files",
    "read_safetensors",
    "copy_side_files",
    "save_tensors",
    "SIDE_FILES",
    "CONV1D_MODEL_TYPES",
]
