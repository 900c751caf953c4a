"""Atomic writes and safetensors model folders (never pickles)."""

from jax_lora._src.files import atomic_file
from jax_lora._src.files import write_text
from jax_lora._src.files import atomic_folder
from jax_lora._src.files import publish_folder
from jax_lora._src.files import weight_files
from jax_lora._src.files import read_safetensors
from jax_lora._src.files import open_safetensors
from jax_lora._src.files import OUTPUT_MARK
from jax_lora._src.files import output_folder
from jax_lora._src.files import check_output_folder
from jax_lora._src.files import foreign_files
from jax_lora._src.files import mark_output
from jax_lora._src.files import read_mark
from jax_lora._src.files import clean_stale
from jax_lora._src.files import file_mode
from jax_lora._src.files import require_finite
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
    "open_safetensors",
    "OUTPUT_MARK",
    "output_folder",
    "check_output_folder",
    "foreign_files",
    "mark_output",
    "read_mark",
    "clean_stale",
    "file_mode",
    "require_finite",
    "copy_side_files",
    "save_tensors",
    "SIDE_FILES",
    "CONV1D_MODEL_TYPES",
]
