"""Multi-process helpers: start JAX's distributed runtime and feed each process its batch slice.

Every process runs the same program (SPMD, multi-controller). Parameters are
built identically everywhere (same seed) and placed with
:func:`jax_lora.sharding.place`; each process loads only its part of the global
batch and :func:`global_batch` assembles the global array from those parts.
"""

from __future__ import annotations

import socket
from typing import Any

import jax
import numpy as np
from jax.sharding import Sharding

__all__ = ["initialize", "global_batch", "local_batch_slice", "free_port"]


def free_port() -> int:
  """A TCP port on 127.0.0.1 that is free right now (for a local coordinator)."""
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def initialize(coordinator_address: str, num_processes: int, process_id: int, *,
               local_cpu_devices: int | None = None, timeout_s: int = 60) -> None:
  """``jax.distributed.initialize`` that also works on CPU-only hosts.

  On CPU, cross-process collectives need an implementation ("gloo", bundled
  with jaxlib); ``local_cpu_devices`` sets how many CPU devices each process
  exposes. Call this before any other JAX operation.

  Args:
    coordinator_address: "host:port" of process 0 (e.g. "127.0.0.1:12345").
    num_processes: total number of processes.
    process_id: this process's index in ``[0, num_processes)``.
    local_cpu_devices: CPU devices per process (None: leave JAX's default).
    timeout_s: how long to wait for the other processes to join.
  """
  if not 0 <= process_id < num_processes:
    raise ValueError(f"process_id {process_id} is not in [0, {num_processes}); give each process its own index")
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  if local_cpu_devices is not None:
    jax.config.update("jax_num_cpu_devices", int(local_cpu_devices))
  jax.distributed.initialize(coordinator_address=coordinator_address, num_processes=num_processes,
                             process_id=process_id, initialization_timeout=timeout_s)


def local_batch_slice(global_batch_size: int) -> slice:
  """Rows of the global batch that this process loads (contiguous, equal parts)."""
  n, i = jax.process_count(), jax.process_index()
  if global_batch_size % n:
    raise ValueError(f"global batch size {global_batch_size} is not divisible by {n} processes; use a multiple of {n}")
  per = global_batch_size // n
  return slice(i * per, (i + 1) * per)


def global_batch(local: Any, sharding: Sharding) -> Any:
  """Assembles global arrays from each process's rows (``jax.make_array_from_process_local_data``)."""
  return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), local)
