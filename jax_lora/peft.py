"""PEFT LoRA adapter folders: read, load onto params, save, and merge into HF model folders."""

from jax_lora._src.peft import load_peft
from jax_lora._src.peft import save_peft
from jax_lora._src.peft import read_peft
from jax_lora._src.peft import PeftAdapter
from jax_lora._src.peft import adapter_modules
from jax_lora._src.peft import module_to_path
from jax_lora._src.peft import path_to_module
from jax_lora._src.peft import check_config
from jax_lora._src.peft import full_tensors
from jax_lora._src.peft import resolve_keys
from jax_lora._src.peft import KNOWN_CONFIG_FIELDS
from jax_lora._src.merge_files import merge_adapter_files
from jax_lora._src.merge_files import merged_tensors

__all__ = [
    "load_peft",
    "save_peft",
    "read_peft",
    "PeftAdapter",
    "adapter_modules",
    "module_to_path",
    "path_to_module",
    "check_config",
    "full_tensors",
    "resolve_keys",
    "KNOWN_CONFIG_FIELDS",
    "merge_adapter_files",
    "merged_tensors",
]
