"""Device meshes, from code or from a train config's ``mesh`` section (axes with
``AxisType.Auto``, so sharded contractions need no explicit annotations)."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import AxisType, Mesh

from jax_lora._src.sharding_rules import PRESETS, ShardingRules, as_spec, data_parallel, fsdp, fsdp_tp, tensor_parallel

__all__ = ["make_mesh", "mesh_from_config"]


def make_mesh(axes: Mapping[str, int], devices: Sequence[Any] | None = None) -> Mesh:
  """A mesh with ``Auto`` axes (GSPMD propagates shardings; no explicit-axis typing).

  ``jax.make_mesh`` defaults to Explicit axes, under which ``x @ w`` with a
  sharded contracting dimension is a type error; LoRA steps mix shardings
  freely, so every axis here is ``AxisType.Auto``. One size may be -1 (the rest).
  """
  devices = list(jax.devices() if devices is None else devices)
  names = tuple(axes)
  sizes = [int(s) for s in axes.values()]
  if sizes.count(-1) > 1:
    raise ValueError(f"mesh axes {dict(axes)}: at most one size may be -1")
  if -1 in sizes:
    rest = math.prod(s for s in sizes if s != -1)
    if rest <= 0 or len(devices) % rest:
      raise ValueError(f"mesh axes {dict(axes)} cannot fill {len(devices)} devices; give sizes whose product divides it")
    sizes[sizes.index(-1)] = len(devices) // rest
  if any(s <= 0 for s in sizes):
    raise ValueError(f"mesh axis sizes must be positive, got {dict(axes)}")
  if math.prod(sizes) != len(devices):
    raise ValueError(f"mesh axes {dict(zip(names, sizes))} need {math.prod(sizes)} devices but {len(devices)} are "
                     "available; make the sizes multiply to the device count (or use -1 for one axis)")
  return Mesh(np.asarray(devices, dtype=object).reshape(sizes), names, axis_types=(AxisType.Auto,) * len(names))


def mesh_from_config(config: Mapping[str, Any], devices: Sequence[Any] | None = None) -> tuple[Mesh, ShardingRules]:
  """The training script's ``mesh`` section → ``(Mesh, ShardingRules)``.

  Config keys: ``axes`` ({name: size}, in mesh order; one size may be -1),
  ``rules`` (a preset name: "data_parallel", "fsdp", "tensor_parallel",
  "fsdp_tp"; or a list of [regex, [axis-or-null, ...]] pairs), optional
  ``batch`` (mesh axes splitting the batch, for custom rules), ``strict`` and
  ``kernel_dim`` ("in" or "out": the kernel axis the "fsdp" preset splits; "out"
  never cuts NF4 blocks). Presets use the first mesh axis as data/FSDP axis and
  the last as model axis.

  Example:
    >>> mesh, rules = mesh_from_config({"axes": {"data": 2, "model": 4}, "rules": "fsdp_tp"})
  """
  unknown = set(config) - {"axes", "rules", "batch", "strict", "kernel_dim"}
  if unknown:
    raise ValueError(f"mesh config has unknown keys {sorted(unknown)}; use axes, rules, batch, strict, kernel_dim")
  axes = config.get("axes") or {"data": -1}
  if not isinstance(axes, Mapping):
    raise ValueError(f"mesh.axes must be a mapping {{name: size}}, got {axes!r}")
  mesh = make_mesh(axes, devices)
  names = tuple(mesh.axis_names)
  strict = bool(config.get("strict", True))
  rules = config.get("rules", "data_parallel")
  if isinstance(rules, str):
    if rules not in PRESETS:
      raise ValueError(f"mesh.rules {rules!r} is not a preset; use one of {sorted(PRESETS)} or a list of [regex, spec]")
    if rules == "data_parallel":
      out = data_parallel(names[0])
      out = dataclasses.replace(out, batch=names)  # replicated weights: every axis splits the batch
    elif rules == "fsdp":
      out = fsdp(names[0], kernel_dim=config.get("kernel_dim", "in"), strict=strict)
    elif rules == "tensor_parallel":
      out = tensor_parallel(names[-1], strict=strict)
      out = dataclasses.replace(out, batch=names[:-1])
    else:
      if len(names) != 2:
        raise ValueError(f"mesh.rules 'fsdp_tp' needs a 2-D mesh (data, model), got axes {names}")
      out = fsdp_tp(names[0], names[1], strict=strict)
  else:
    out = ShardingRules(rules=tuple((pat, as_spec(s)) for pat, s in rules), batch=(), strict=strict)
  if "batch" in config:
    out = dataclasses.replace(out, batch=tuple(config["batch"]))
  for a in out.batch:
    if a not in names:
      raise ValueError(f"mesh batch axis {a!r} is not a mesh axis {names}")
  return mesh, out
