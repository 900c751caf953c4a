"""jax_lora: LoRA and QLoRA for JAX/Flax parameter pytrees.

The core, at the top level: configure (:class:`LoraConfig`), adapt a parameter
tree (:func:`init_lora`), train only A/B (and DoRA magnitudes; :func:`split`/:func:`combine`,
:func:`lora_optimizer`), run plain functions unmerged (:func:`dot`, :func:`embed`,
:func:`apply_fn`), quantize the base (:class:`QuantConfig`, :func:`quantize`,
:func:`dequantize`), fold adapters in and out (:func:`merge`, :func:`unmerge`),
and exchange adapters with PEFT (:func:`load_peft`, :func:`save_peft`).
Integrations and interop live in submodules: ``jax_lora.linen``,
``jax_lora.nnx``, ``jax_lora.quant``, ``jax_lora.peft``, ``jax_lora.remat``,
``jax_lora.sharding``, ``jax_lora.models`` (and ``adapters``, ``bnb``, ``losses``,
``files``, ``tree``, ``distributed``).

>>> import jax, jax.numpy as jnp, jax_lora as jl
>>> params = {"dense": {"kernel": jnp.ones((4, 3))}}
>>> adapted = jl.init_lora(params, jl.LoraConfig(rank=2, alpha=4), jax.random.key(0))
>>> trainable, frozen = jl.split(adapted)
>>> print(jl.param_report(adapted))
trainable params: 14 || all params: 26 || trainable%: 53.8462
>>> bool(jnp.allclose(jl.merge(jl.combine(trainable, frozen))["dense"]["kernel"], 1.0))
True
"""

from jax_lora import linen
from jax_lora import models
from jax_lora import nnx
from jax_lora import peft
from jax_lora import quant
from jax_lora import remat
from jax_lora import sharding
from jax_lora._src.adapt import combine
from jax_lora._src.adapt import init_lora
from jax_lora._src.adapt import merge
from jax_lora._src.adapt import param_report
from jax_lora._src.adapt import split
from jax_lora._src.adapt import unmerge
from jax_lora._src.config import LoraConfig
from jax_lora._src.functional import apply_fn
from jax_lora._src.lora import LoraWeight
from jax_lora._src.lora import dot
from jax_lora._src.lora import embed
from jax_lora._src.optim import lora_optimizer
from jax_lora._src.peft import load_peft
from jax_lora._src.peft import save_peft
from jax_lora._src.quant import QuantConfig
from jax_lora._src.quant import dequantize
from jax_lora._src.quant import quantize

__all__ = [
    "LoraConfig",
    "LoraWeight",
    "init_lora",
    "split",
    "combine",
    "merge",
    "unmerge",
    "param_report",
    "lora_optimizer",
    "dot",
    "embed",
    "apply_fn",
    "QuantConfig",
    "quantize",
    "dequantize",
    "load_peft",
    "save_peft",
    "linen",
    "nnx",
    "quant",
    "peft",
    "remat",
    "sharding",
    "models",
]

__version__ = "0.1.0"
