"""Flax Linen causal LMs and T5 with Hugging Face parameter names, their loaders and generation.

:func:`load_pretrained` takes what every command takes: an HF folder, a ``.gguf`` file
or a shipped shortcut (``smollm2-135m``, ``gemma3-270m``).
"""

from jax_lora.models.generate import generate
from jax_lora.models.gguf import load_gguf
from jax_lora.models.gguf import tokenizer_from_gguf
from jax_lora.models.gpt2 import GPT2Config
from jax_lora.models.gpt2 import GPT2LMHeadModel
from jax_lora.models.hf import config_from_hf
from jax_lora.models.hf import hf_key_to_path
from jax_lora.models.hf import hf_state_from_params
from jax_lora.models.hf import init_cache
from jax_lora.models.hf import load_hf
from jax_lora.models.hf import model_from_config
from jax_lora.models.hf import path_to_hf_key
from jax_lora.models.hf import save_hf
from jax_lora.models.llama import LlamaConfig
from jax_lora.models.llama import LlamaForCausalLM
from jax_lora.models.seq2seq import generate_seq2seq
from jax_lora.models.shipped import SHIPPED
from jax_lora.models.shipped import gemma3_270m_gguf_path
from jax_lora.models.shipped import gguf_hf_folder
from jax_lora.models.shipped import load_pretrained
from jax_lora.models.shipped import resolve_model
from jax_lora.models.shipped import shipped_hf_folder
from jax_lora.models.shipped import smollm2_gguf_path
from jax_lora.models.shipped import smollm2_hf_folder
from jax_lora.models.t5 import T5Config
from jax_lora.models.t5 import T5ForConditionalGeneration

__all__ = [
    "SHIPPED",
    "GPT2Config",
    "GPT2LMHeadModel",
    "LlamaConfig",
    "LlamaForCausalLM",
    "T5Config",
    "T5ForConditionalGeneration",
    "config_from_hf",
    "gemma3_270m_gguf_path",
    "generate",
    "generate_seq2seq",
    "gguf_hf_folder",
    "hf_key_to_path",
    "hf_state_from_params",
    "init_cache",
    "load_gguf",
    "load_hf",
    "load_pretrained",
    "model_from_config",
    "path_to_hf_key",
    "resolve_model",
    "save_hf",
    "shipped_hf_folder",
    "smollm2_gguf_path",
    "smollm2_hf_folder",
    "tokenizer_from_gguf",
]
