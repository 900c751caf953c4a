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
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jax_lora.lora import LoraWeight, _map, combine, is_quantized, split
from jax_lora.paths import first_match

__all__ = [
    "ShardingRules",
    "data_parallel",
    "fsdp",
    "tensor_parallel",
    "fsdp_tp",
    "PRESETS",
    "make_mesh",
    "mesh_from_config",
    "lora_specs",
    "param_specs",
    "param_shardings",
    "batch_sharding",
    "opt_state_shardings",
    "place",
    "with_memory_kind",
    "make_train_step",
    "init_opt_state",
    "fit_spec",
    "make_pmap_train_step",
    "replicate",
    "unreplicate",
    "shard_batch",
    "bytes_per_device",
]

# Llama/Qwen2 and GPT-2 module names (Megatron column-/row-parallel split).
COLUMN_PARALLEL = ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj", "c_attn", "c_fc")
ROW_PARALLEL = ("o_proj", "down_proj", "c_proj")
_COL = r"(.*/)?(" + "|".join(COLUMN_PARALLEL) + r")/"
_ROW = r"(.*/)?(" + "|".join(ROW_PARALLEL) + r")/"


def _as_spec(s: Any) -> P:
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
    >>> rules = ShardingRules(rules=((r".*/q_proj/kernel", P(None, "model")),), batch=("data",))
    >>> rules.spec("layers_0/q_proj/kernel", (64, 128), mesh)
    PartitionSpec(None, 'model')
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
    rules = tuple((str(pat), _as_spec(s)) for pat, s in items)
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


# ---------------------------------------------------------------- meshes


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
    out = ShardingRules(rules=tuple((pat, _as_spec(s)) for pat, s in rules), batch=(), strict=strict)
  if "batch" in config:
    out = dataclasses.replace(out, batch=tuple(config["batch"]))
  for a in out.batch:
    if a not in names:
      raise ValueError(f"mesh batch axis {a!r} is not a mesh axis {names}")
  return mesh, out


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
      return dataclasses.replace(v, w=w_spec, a=None if v.a is None else a_spec, b=None if v.b is None else b_spec)
    if is_quantized(v):
      return base_spec(path, v)[0]
    return rules.spec(path, tuple(getattr(v, "shape", None) or np.shape(v)), mesh)

  return _map(f, adapted)


def _lora_kernel_shape(v: LoraWeight) -> tuple[int, ...]:
  """The base kernel's shape recovered from A and B (for trainable-only trees)."""
  nb = v.layout.count("b")
  ins = list(v.a.shape[nb:-1])
  outs = list(v.b.shape[nb + 1:])
  batch = list(v.a.shape[:nb])
  return tuple(batch.pop(0) if c == "b" else ins.pop(0) if c == "i" else outs.pop(0) for c in v.layout)


def _to_sharding(mesh: Mesh, memory_kind: str | None):
  def f(s):
    return NamedSharding(mesh, s, memory_kind=memory_kind)
  return f


def param_shardings(adapted: Any, rules: ShardingRules, mesh: Mesh, memory_kind: str | None = None) -> Any:
  """``NamedSharding`` tree for ``adapted`` (split it with ``jl.split`` like the params)."""
  specs = param_specs(adapted, rules, mesh)
  return jax.tree.map(_to_sharding(mesh, memory_kind), specs, is_leaf=lambda x: isinstance(x, P))


def batch_sharding(mesh: Mesh, rules: ShardingRules | Sequence[str] = ("data",)) -> NamedSharding:
  """Sharding of the batch: leading axis split over ``rules.batch`` (or the given axes)."""
  axes = rules.batch if isinstance(rules, ShardingRules) else tuple(rules)
  for a in axes:
    if a not in mesh.shape:
      raise ValueError(f"batch axis {a!r} is not a mesh axis {tuple(mesh.axis_names)}")
  return NamedSharding(mesh, P(axes if len(axes) > 1 else (axes[0] if axes else None)))


def opt_state_shardings(optimizer: optax.GradientTransformation, opt_state: Any, trainable_shardings: Any,
                        mesh: Mesh, memory_kind: str | None = None) -> Any:
  """Shards optimizer state like its parameters (Adam moments of A like A, ...).

  Non-parameter state (step counts, scalars) is replicated.
  """
  shardings = with_memory_kind(trainable_shardings, memory_kind) if memory_kind else trainable_shardings
  rep = NamedSharding(mesh, P(), memory_kind=memory_kind)
  return optax.tree_map_params(optimizer, lambda _, s: s, opt_state, shardings,
                               transform_non_params=lambda _: rep, is_leaf=lambda x: x is None)


def with_memory_kind(shardings: Any, memory_kind: str) -> Any:
  """The same shardings in another memory (e.g. ``"pinned_host"`` for host offload).

  Raises a clear error when the backend has no such memory.
  """
  leaves = [s for s in jax.tree.leaves(shardings) if isinstance(s, jax.sharding.Sharding)]
  if leaves:
    dev = min(leaves[0].device_set, key=lambda d: d.id)  # any sharding: Named or single-device
    kinds = [m.kind for m in dev.addressable_memories()]
    if memory_kind not in kinds:
      raise ValueError(f"the {dev.platform} backend has no memory kind {memory_kind!r} (it has {kinds}); "
                       "host offload is unavailable here: keep the optimizer state on device (offload off)")
  return jax.tree.map(lambda s: s.with_memory_kind(memory_kind), shardings)


def place(tree: Any, shardings: Any) -> Any:
  """Puts ``tree`` on the mesh; works with several processes (each supplies its own shards).

  Every process must hold the same full values (e.g. params from the same seed).
  """

  def put(x, s):
    if x is None:
      return None
    if jax.process_count() == 1:
      # Steps donate their inputs: never hand back a buffer the caller still holds
      # (device_put may reuse the source buffer, even with may_alias=False on CPU).
      return jax.device_put(jnp.array(x, copy=True) if isinstance(x, jax.Array) else x, s)
    host = np.asarray(x)
    return jax.make_array_from_callback(host.shape, s, lambda idx: host[idx])

  return jax.tree.map(put, tree, shardings, is_leaf=lambda x: x is None)


# ---------------------------------------------------------------- train steps


def _loss_and_grad(loss_fn, remat: bool, policy):
  def f(trainable, frozen, batch):
    return loss_fn(combine(trainable, frozen), batch)

  if remat:
    f = jax.checkpoint(f, policy=policy)
  return jax.value_and_grad(f)


def make_train_step(loss_fn: Callable[[Any, Any], jax.Array], optimizer: optax.GradientTransformation, mesh: Mesh,
                    param_shardings: Any, batch_sharding: Any, *, donate: bool = True, remat: bool = False,
                    remat_policy: Callable | None = None, offload_opt_state: bool = False,
                    offload_frozen: bool = False, bias: str = "none"):
  """A jitted LoRA step ``(trainable, opt_state, frozen, batch) -> (trainable, opt_state, loss)``.

  Only ``trainable`` (``jl.split(adapted)[0]``) is differentiated; the frozen
  base gets no gradient and no optimizer state. In and out shardings match, so
  steps chain without resharding; ``trainable`` and ``opt_state`` are donated.

  Args:
    loss_fn: ``loss_fn(adapted, batch) -> scalar`` (mean over the global batch).
    optimizer: an optax transformation over the trainable tree.
    mesh: the device mesh (Auto axes, see :func:`make_mesh`).
    param_shardings: :func:`param_shardings` of the *full* adapted tree.
    batch_sharding: sharding (or prefix tree of shardings) for the batch.
    donate: donate trainable and optimizer-state buffers.
    remat: wrap the loss in ``jax.checkpoint`` (recompute activations in the backward).
    remat_policy: a ``jax.checkpoint_policies`` policy for ``remat``.
    offload_opt_state: keep optimizer state in host memory (``pinned_host``) between steps.
    offload_frozen: keep the frozen base in host memory; copied to device inside the step.
    bias: as in ``jl.split`` (which biases train).

  The opt_state shardings are derived from the first ``opt_state`` passed in
  (:func:`opt_state_shardings`); create it with :func:`init_opt_state`.
  """
  tr_sh, fr_sh = split(param_shardings, bias=bias)
  if offload_frozen:
    fr_dev, fr_sh = fr_sh, with_memory_kind(fr_sh, "pinned_host")
  vg = _loss_and_grad(loss_fn, remat, remat_policy)
  rep = NamedSharding(mesh, P())
  cache: dict[Any, Callable] = {}

  def build(opt_state):
    opt_dev = opt_state_shardings(optimizer, opt_state, tr_sh, mesh)
    opt_sh = with_memory_kind(opt_dev, "pinned_host") if offload_opt_state else opt_dev

    def body(trainable, opt_state, frozen, batch):
      if offload_opt_state:
        opt_state = jax.device_put(opt_state, opt_dev)
      if offload_frozen:
        frozen = jax.device_put(frozen, fr_dev)
      loss, grads = vg(trainable, frozen, batch)
      updates, opt_state = optimizer.update(grads, opt_state, trainable)
      return optax.apply_updates(trainable, updates), opt_state, loss

    return jax.jit(body, in_shardings=(tr_sh, opt_sh, fr_sh, batch_sharding), out_shardings=(tr_sh, opt_sh, rep),
                   donate_argnums=(0, 1) if donate else ())

  def step(trainable, opt_state, frozen, batch):
    key = jax.tree.structure(opt_state)
    if key not in cache:
      cache[key] = build(opt_state)
    return cache[key](trainable, opt_state, frozen, batch)

  step.build = build  # for .lower()/.compile() inspection
  return step


def init_opt_state(optimizer: optax.GradientTransformation, trainable: Any, trainable_shardings: Any, mesh: Mesh,
                   memory_kind: str | None = None) -> Any:
  """``optimizer.init(trainable)`` created directly with parameter-like shardings."""
  abstract = jax.eval_shape(optimizer.init, trainable)
  sh = opt_state_shardings(optimizer, abstract, trainable_shardings, mesh)
  state = jax.jit(optimizer.init, out_shardings=sh)(trainable)
  return jax.device_put(state, with_memory_kind(sh, memory_kind)) if memory_kind else state


def make_pmap_train_step(loss_fn: Callable[[Any, Any], jax.Array], optimizer: optax.GradientTransformation, *,
                         axis_name: str = "devices", donate: bool = True, remat: bool = False,
                         remat_policy: Callable | None = None):
  """The ``jax.pmap`` data-parallel step for code that still uses pmap.

  Arguments carry a leading device axis: trainable/opt_state/frozen from
  :func:`replicate`, the batch from :func:`shard_batch`. Gradients and the loss
  are averaged across devices with ``jax.lax.pmean``, so with equal per-device
  batches the step equals the single-device step on the whole batch.
  """
  vg = _loss_and_grad(loss_fn, remat, remat_policy)

  def body(trainable, opt_state, frozen, batch):
    loss, grads = vg(trainable, frozen, batch)
    grads = jax.lax.pmean(grads, axis_name)
    updates, opt_state = optimizer.update(grads, opt_state, trainable)
    return optax.apply_updates(trainable, updates), opt_state, jax.lax.pmean(loss, axis_name)

  return jax.pmap(body, axis_name=axis_name, donate_argnums=(0, 1) if donate else ())


def replicate(tree: Any, devices: Sequence[Any] | None = None) -> Any:
  """Copies every leaf onto each local device (leading device axis) for pmap."""
  devices = list(jax.local_devices() if devices is None else devices)
  mesh = Mesh(np.asarray(devices, dtype=object), ("devices",), axis_types=(AxisType.Auto,))
  s = NamedSharding(mesh, P("devices"))
  return jax.tree.map(lambda x: jax.device_put(jnp.broadcast_to(x, (len(devices),) + tuple(np.shape(x))), s), tree)


def unreplicate(tree: Any) -> Any:
  """The first device's copy of a replicated tree."""
  return jax.tree.map(lambda x: x[0], tree)


def shard_batch(batch: Any, n: int | None = None) -> Any:
  """Splits the leading axis of every batch leaf into ``(n, b/n, ...)`` for pmap."""
  n = jax.local_device_count() if n is None else n

  def f(x):
    if x.shape[0] % n:
      raise ValueError(f"batch size {x.shape[0]} is not divisible by {n} devices; use a multiple of {n}")
    return x.reshape((n, x.shape[0] // n) + tuple(x.shape[1:]))

  return jax.tree.map(f, batch)


def bytes_per_device(tree: Any, device: Any = None) -> int:
  """Bytes that ``device`` (default: the first local one) holds for the arrays of ``tree``."""
  device = jax.local_devices()[0] if device is None else device
  total = 0
  for x in jax.tree.leaves(tree):
    for s in getattr(x, "addressable_shards", ()):
      if s.device == device:
        total += s.data.nbytes
  return total
