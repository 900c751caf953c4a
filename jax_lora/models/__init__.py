"""Flax Linen causal LMs with Hugging Face parameter names, and their loaders."""

from jax_lora.models.generate import generate
from jax_lora.models.gpt2 import GPT2Config
from jax_lora.models.gpt2 import GPT2LMHeadModel
from jax_lora.models.hf import hf_key_to_path
from jax_lora.models.hf import init_cache
from jax_lora.models.hf import load_hf
from jax_lora.models.hf import path_to_hf_key
from jax_lora.models.hf import save_hf
from jax_lora.models.llama import LlamaConfig
from jax_lora.models.llama import LlamaForCausalLM

__all__ = [
    "GPT2Config",
    "GPT2LMHeadModel",
    "LlamaConfig",
    "LlamaForCausalLM",
    "generate",
    "hf_key_to_path",
    "init_cache",
    "load_hf",
    "path_to_hf_key",
    "save_hf",
]
