"""Scale-out: sharding rules for base weights, LoRA specs derived from them, placement and train steps.

GSPMD (``jax.jit`` with ``NamedSharding``) is the distributed engine; these functions decide
where each array lives. Rules map "/"-joined parameter paths (regex, first fullmatch wins) to
``PartitionSpec``s; a LoRA factor follows its kernel (A the input axes, B the output axes, rank
replicated); quantized bases are cut only at block boundaries."""

from jax_lora._src.sharding_rules import ShardingRules
from jax_lora._src.sharding_rules import PRESETS
from jax_lora._src.sharding_rules import data_parallel
from jax_lora._src.sharding_rules import fsdp
from jax_lora._src.sharding_rules import tensor_parallel
from jax_lora._src.sharding_rules import fsdp_tp
from jax_lora._src.sharding_rules import fit_spec
from jax_lora._src.sharding_rules import lora_specs
from jax_lora._src.sharding_rules import param_specs
from jax_lora._src.mesh import make_mesh
from jax_lora._src.mesh import mesh_from_config
from jax_lora._src.placement import param_shardings
from jax_lora._src.placement import batch_sharding
from jax_lora._src.placement import opt_state_shardings
from jax_lora._src.placement import with_memory_kind
from jax_lora._src.placement import place
from jax_lora._src.placement import bytes_per_device
from jax_lora._src.train_step import make_train_step
from jax_lora._src.train_step import init_opt_state
from jax_lora._src.train_step import make_pmap_train_step
from jax_lora._src.train_step import replicate
from jax_lora._src.train_step import unreplicate
from jax_lora._src.train_step import shard_batch

__all__ = [
    "ShardingRules",
    "PRESETS",
    "data_parallel",
    "fsdp",
    "tensor_parallel",
    "fsdp_tp",
    "fit_spec",
    "lora_specs",
    "param_specs",
    "make_mesh",
    "mesh_from_config",
    "param_shardings",
    "batch_sharding",
    "opt_state_shardings",
    "with_memory_kind",
    "place",
    "bytes_per_device",
    "make_train_step",
    "init_opt_state",
    "make_pmap_train_step",
    "replicate",
    "unreplicate",
    "shard_batch",
]
