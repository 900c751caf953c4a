"""Gradient checkpointing (rematerialization) policies for LoRA/QLoRA models and users' own layers."""

from jax_lora._src.remat import LAYER_INPUT
from jax_lora._src.remat import POLICIES
from jax_lora._src.remat import check_policy
from jax_lora._src.remat import checkpoint
from jax_lora._src.remat import remat_module
from jax_lora._src.remat import remat_policy
from jax_lora._src.remat import tag_layer_input

__all__ = [
    "POLICIES",
    "LAYER_INPUT",
    "remat_policy",
    "check_policy",
    "tag_layer_input",
    "remat_module",
    "checkpoint",
]
