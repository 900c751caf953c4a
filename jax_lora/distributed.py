"""Multi-process runs: jax.distributed on CPU (gloo) or accelerators, and per-process batches."""

from jax_lora._src.distributed import initialize
from jax_lora._src.distributed import global_batch
from jax_lora._src.distributed import local_batch_slice
from jax_lora._src.distributed import free_port

__all__ = [
    "initialize",
    "global_batch",
    "local_batch_slice",
    "free_port",
]
