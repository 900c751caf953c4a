"""Scale-out: sharding rules for base weights, LoRA specs derived from them, and train steps.

GSPMD (``jax.jit`` with ``NamedSharding``) is the distributed engine; this module
only decides *where each array lives*:

* :class:`ShardingRules` map "/"-joined parameter paths (regex, first fullmatch
  wins) to ``PartitionSpec`` for the base weights. Presets: :func:`data_parallel`,
  :func:`fsdp`, :func:`tensor_parallel` (Megatron: q/k/v/gate/up column-parallel,
  o/down row-parallel) and :func:`fsdp_tp` for a 2-D mesh.
* A LoRA factor's spec is derived from its base kernel's spec
  (:func:`lora_specs`): A follows the input axes, B the output axes, the rank
  axis is replicated. Quantized bases are sharded only at block boundaries.
* :func:`make_train_step` builds a jitted step with in/out shardings and
  donation; :func:`make_pmap_train_step` is the ``jax.pmap`` data-parallel path.
* Optimizer state (and optionally the frozen base) can live in host memory
  (``memory_kind="pinned_host"``), the JAX analogue of QLoRA's paged optimizers.

A spec shorter than the array's rank is right-aligned: leading axes (e.g. the
layer axis of ``nn.scan``-stacked kernels) are replicated, so the same rules
serve unrolled and scanned models.
"""

from __future__ import annotations

import dataclasses
import math
import re
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from jax_lora._src.lora import LoraWeight
from jax_lora._src.tree import first_match, is_quantized, map_leaves

__all__ = ["ShardingRules", "as_spec", "data_parallel", "fsdp", "tensor_parallel", "fsdp_tp", "PRESETS", "fit_spec",
           "lora_specs", "param_specs", "COLUMN_PARALLEL", "ROW_PARALLEL"]

# Llama/Qwen2 and GPT-2 module names (Megatron column-/row-parallel split).
COLUMN_PARALLEL = ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj", "c_attn", "c_fc")
ROW_PARALLEL = ("o_proj", "down_proj", "c_proj")
_COL = r"(.*/)?(" + "|".join(COLUMN_PARALLEL) + r")/"
_ROW = r"(.*/)?(" + "|".join(ROW_PARALLEL) + r")/"


def as_spec(s: Any) -> P:
  if isinstance(s, P):
    return s
  if s is None:
    return P()
  return P(*[tuple(e) if isinstance(e, list) else e for e in s])


def _axes(entry) -> tuple[str, ...]:
  if entry is None:
    return ()
  return tuple(entry) if isinstance(entry, tuple) else (entry,)


@dataclasses.dataclass(frozen=True, kw_only=True)
class ShardingRules:
  """Ordered ``(regex, PartitionSpec)`` pairs over parameter paths; first fullmatch wins.

  Example:
    >>> from jax_lora.sharding import make_mesh
    >>> mesh = make_mesh({"data": 2, "model": 4})   # 8 devices (tests fake them on CPU)
    >>> rules = ShardingRules(rules=((r".*/q_proj/kernel", P(None, "model")),), batch=("data",))
    >>> rules.spec("layers_0/q_proj/kernel", (64, 128), mesh)
    P(None, 'model')
  """

  # (regex, PartitionSpec) pairs; unmatched paths are replicated. Specs shorter than
  # the array are right-aligned (leading, e.g. scanned layer, axes replicated).
  rules: tuple[tuple[str, P], ...] = ()
  # Mesh axes that split the leading (batch) axis of the input batch.
  batch: tuple[str, ...] = ()
  # A dimension the mesh axes do not divide: True raises, False replicates that
  # dimension with a warning naming the path.
  strict: bool = True

  def __post_init__(self):
    items = self.rules.items() if isinstance(self.rules, Mapping) else self.rules
    rules = tuple((str(pat), as_spec(s)) for pat, s in items)
    for pat, _ in rules:
      try:
        re.compile(pat)
      except re.error as e:
        raise ValueError(f"sharding rule {pat!r} is not a valid regular expression ({e}); fix the pattern") from None
    object.__setattr__(self, "rules", rules)
    object.__setattr__(self, "batch", tuple(_axes(self.batch) if not isinstance(self.batch, list) else self.batch))

  def raw_spec(self, path: str) -> P:
    """The matching rule's spec as written (``P()`` when nothing matches)."""
    s = first_match(path, self.rules)
    return P() if s is None else s

  def spec(self, path: str, shape: Sequence[int], mesh: Mesh) -> P:
    """Full-length spec for an array of ``shape`` at ``path``, checked against ``mesh``."""
    return fit_spec(self.raw_spec(path), tuple(shape), mesh, path, self.strict)

  def unused(self, paths: Sequence[str]) -> list[str]:
    """Rule patterns that match none of ``paths`` (a typo shards nothing)."""
    return [pat for pat, _ in self.rules if not any(re.fullmatch(pat, p) for p in paths)]


def fit_spec(spec: P, shape: tuple[int, ...], mesh: Mesh, path: str = "", strict: bool = True) -> P:
  """Right-aligns ``spec`` to ``shape`` and checks axis names and divisibility."""
  entries = list(spec)
  if len(entries) > len(shape):
    extra = entries[:len(entries) - len(shape)]
    if any(e is not None for e in extra):
      raise ValueError(f"sharding spec {spec} for {path!r} has {len(entries)} entries but the array has shape "
                       f"{shape}; write a rule for this path with at most {len(shape)} entries")
    entries = entries[len(entries) - len(shape):]
  entries = [None] * (len(shape) - len(entries)) + entries
  used: set[str] = set()
  out = []
  for dim, (n, e) in enumerate(zip(shape, entries)):
    names = _axes(e)
    for a in names:
      if a not in mesh.shape:
        raise ValueError(f"sharding spec {spec} for {path!r} names mesh axis {a!r} but the mesh has axes "
                         f"{tuple(mesh.axis_names)}; rename the axis in the rules or the mesh")
      if a in used:
        raise ValueError(f"sharding spec {spec} for {path!r} uses mesh axis {a!r} twice; use each axis once")
      used.add(a)
    size = math.prod(mesh.shape[a] for a in names)
    if names and n % size:
      msg = (f"{path!r}: dimension {dim} of shape {shape} (size {n}) is not divisible by mesh axes {names} "
             f"(size {size})")
      if strict:
        raise ValueError(msg + "; change the mesh or the rule, or use strict=False to replicate it")
      warnings.warn(msg + "; replicating that dimension", stacklevel=3)
      e = None
    out.append(e)
  return P(*out)


def data_parallel(axis: str = "data") -> ShardingRules:
  """Every weight replicated; the batch split over ``axis``."""
  return ShardingRules(rules=(), batch=(axis,))


def fsdp(axis: str = "data", *, kernel_dim: str = "in", strict: bool = True) -> ShardingRules:
  """ZeRO-3 style: kernels sharded on one axis, embeddings on the feature axis.

  ``kernel_dim="in"`` splits the input axis of (in, out) kernels; "out" splits the
  output axis, which never cuts NF4 blocks (they run along the input axis), so
  QLoRA bases shard whenever the output width divides the mesh.
  """
  if kernel_dim not in ("in", "out"):
    raise ValueError(f"fsdp kernel_dim must be 'in' or 'out', got {kernel_dim!r}")
  kspec = P(axis, None) if kernel_dim == "in" else P(None, axis)
  return ShardingRules(rules=((r"(.*/)?kernel", kspec), (r"(.*/)?embedding", P(None, axis))),
                       batch=(axis,), strict=strict)


def tensor_parallel(axis: str = "model", *, strict: bool = True) -> ShardingRules:
  """Megatron: q/k/v/gate/up (c_attn/c_fc) split on outputs, o/down (c_proj) on inputs.

  Column-parallel biases are split like their outputs; everything else is
  replicated. The batch is not split (combine with :func:`fsdp_tp` for that).
  """
  return ShardingRules(rules=(
      (_COL + "kernel", P(None, axis)),
      (_COL + "bias", P(axis)),
      (_ROW + "kernel", P(axis, None)),
      (r"(.*/)?embedding", P(None, axis)),
  ), batch=(), strict=strict)


def fsdp_tp(data: str = "data", model: str = "model", *, strict: bool = True) -> ShardingRules:
  """2-D mesh: tensor parallel over ``model`` plus FSDP of the other kernel axis over ``data``."""
  return ShardingRules(rules=(
      (_COL + "kernel", P(data, model)),
      (_COL + "bias", P(model)),
      (_ROW + "kernel", P(model, data)),
      (r"(.*/)?kernel", P(data, None)),
      (r"(.*/)?embedding", P(None, model)),
  ), batch=(data,), strict=strict)


PRESETS: dict[str, Callable[..., ShardingRules]] = {
    "data_parallel": data_parallel, "fsdp": fsdp, "tensor_parallel": tensor_parallel, "fsdp_tp": fsdp_tp}


# ---------------------------------------------------------------- spec derivation


def lora_specs(kernel_spec: P, layout: str) -> tuple[P, P]:
  """``(A spec, B spec)`` from a full-length base-kernel spec and its 'b'/'i'/'o' layout.

  A is ``(*batch, *in, r)`` and follows the kernel's batch and input axes; B is
  ``(*batch, r, *out)`` and follows batch and output axes; ``r`` is replicated.
  """
  spec = list(kernel_spec) + [None] * (len(layout) - len(kernel_spec))
  if len(spec) != len(layout):
    raise ValueError(f"kernel spec {kernel_spec} has more entries than layout {layout!r} has axes")
  pick = lambda c: [s for s, l in zip(spec, layout) if l == c]
  return P(*pick("b"), *pick("i"), None), P(*pick("b"), None, *pick("o"))


def _quantized_specs(q: Any, kernel_spec: P, path: str, mesh: Mesh, strict: bool) -> Any:
  """Specs for a quantized array's fields, cut only at quantization-block boundaries.

  The quantized array must describe itself (see ``jax_lora.quant``): it exposes
  ``shard_specs(kernel_spec, axis_sizes)`` returning a node of the same type with
  a ``PartitionSpec`` (or ``None`` for static/absent data) per array field, and
  raising ``ValueError`` when a block would straddle two shards.
  """
  sizes = {a: mesh.shape[a] for a in mesh.axis_names}
  fn = getattr(q, "shard_specs", None)
  if fn is None:
    # Unknown layout: replicating is always correct (never cuts a block).
    warnings.warn(f"{path!r}: quantized array {type(q).__name__} has no shard_specs(); replicating it", stacklevel=3)
    return jax.tree.map(lambda _: P(), q)
  try:
    return fn(kernel_spec, sizes)
  except ValueError as e:
    if strict:
      raise ValueError(f"{path!r}: {e}") from None
    warnings.warn(f"{path!r}: {e}; replicating it", stacklevel=3)
    return fn(P(*([None] * len(kernel_spec))), sizes)


def param_specs(adapted: Any, rules: ShardingRules, mesh: Mesh) -> Any:
  """A ``PartitionSpec`` tree shaped like ``adapted`` (LoraWeight/quantized nodes kept).

  Base kernels take their rule's spec; A/B are derived from it (:func:`lora_specs`);
  quantized bases get specs per field, cut at block boundaries.
  """

  def base_spec(path, w):
    spec = rules.spec(path, w.shape, mesh)
    if is_quantized(w):
      return _quantized_specs(w, spec, path, mesh, rules.strict), spec
    return spec, spec

  def f(path, v):
    if isinstance(v, LoraWeight):
      w_spec, k_spec = base_spec(path, v.w) if v.w is not None else (None, P(*([None] * len(v.layout))))
      if v.w is None:
        k_spec = rules.spec(path, _lora_kernel_shape(v), mesh)
      a_spec, b_spec = lora_specs(k_spec, v.layout)
      return dataclasses.replace(v, w=w_spec, a=None if v.a is None else a_spec, b=None if v.b is None else b_spec,
                                 m=None if v.m is None else P())
    if is_quantized(v):
      return base_spec(path, v)[0]
    return rules.spec(path, tuple(getattr(v, "shape", None) or np.shape(v)), mesh)

  return map_leaves(f, adapted)


def _lora_kernel_shape(v: LoraWeight) -> tuple[int, ...]:
  """The base kernel's shape recovered from A and B (for trainable-only trees)."""
  nb = v.layout.count("b")
  ins = list(v.a.shape[nb:-1])
  outs = list(v.b.shape[nb + 1:])
  batch = list(v.a.shape[:nb])
  return tuple(batch.pop(0) if c == "b" else ins.pop(0) if c == "i" else outs.pop(0) for c in v.layout)
