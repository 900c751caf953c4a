"""Several adapters on one frozen base: detach, attach, switch, combine.

An *adapter* is ``{path: LoraWeight}`` with ``w=None`` (the factors and their
static alpha/rank only). Attaching one to the base params gives an adapted
tree whose base arrays are the very same objects, so switching tasks never
reloads or copies the base.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import jax.numpy as jnp

from jax_lora._src.adapt import lora_weights
from jax_lora._src.lora import LoraWeight
from jax_lora._src.tree import leaves, map_leaves

__all__ = ["extract", "attach", "strip", "combine_adapters", "AdapterBank"]

Adapter = dict[str, LoraWeight]


def extract(adapted: Any) -> Adapter:
  """The adapter of an adapted tree: ``{path: LoraWeight}`` without the base weights."""
  out = {p: dataclasses.replace(lw, w=None) for p, lw in lora_weights(adapted).items()}
  if not out:
    raise ValueError("extract: the tree has no LoRA weights; pass an adapted tree (init_lora/load_peft)")
  return out


def strip(adapted: Any) -> Any:
  """The base params of an adapted tree (each LoraWeight replaced by its ``w``)."""
  return map_leaves(lambda p, v: v.w if isinstance(v, LoraWeight) else v, adapted)


def attach(params: Any, adapter: Mapping[str, LoraWeight] | None) -> Any:
  """Puts ``adapter`` onto base ``params`` (no copy of the base); None returns ``params``.

  Raises:
    ValueError: if an adapter path is not a kernel of ``params`` or its shape differs.
  """
  if not adapter:
    return params
  flat = leaves(params)
  missing = sorted(p for p in adapter if p not in flat)
  if missing:
    raise ValueError(f"attach: adapter paths not in the base params: {missing[:3]}; wrong base?")
  for p, lw in adapter.items():
    w = flat[p]
    if isinstance(w, LoraWeight):
      raise ValueError(f"attach: {p!r} already has a LoRA adapter; attach to the base params (see strip)")
    if lw.a.shape[:-1] != tuple(s for s, c in zip(w.shape, lw.layout) if c in "bi"):
      raise ValueError(f"attach: adapter A {tuple(lw.a.shape)} does not fit kernel {p!r} {tuple(w.shape)}")
  return map_leaves(lambda p, v: dataclasses.replace(adapter[p], w=v) if p in adapter else v, params)


def _scale(lw: LoraWeight) -> float:
  return lw.scale


def combine_adapters(adapters: Sequence[Mapping[str, LoraWeight]], weights: Sequence[float],
                     how: Literal["linear", "cat"] = "cat") -> Adapter:
  """Weighted combination of adapters, as PEFT's ``add_weighted_adapter``.

  ``"cat"``: A and B are concatenated along the rank (rank = sum of ranks), giving
  exactly ``ΔW = Σ wᵢ·ΔWᵢ``. ``"linear"``: ``A = Σ sign(wᵢsᵢ)·√|wᵢsᵢ|·Aᵢ``,
  ``B = Σ √|wᵢsᵢ|·Bᵢ`` (all ranks equal; cross terms included, as in PEFT).
  The result has ``alpha = rank`` and no rsLoRA, so its scale is 1.

  Args:
    adapters: adapters from :func:`extract` (modules may differ; each module
      combines the adapters that have it).
    weights: one weight per adapter.
    how: "cat" or "linear".
  """
  if len(adapters) != len(weights) or not adapters:
    raise ValueError(f"combine_adapters: got {len(adapters)} adapters and {len(weights)} weights; give one weight each")
  if how not in ("cat", "linear"):
    raise ValueError(f"combine_adapters: how must be 'cat' or 'linear', got {how!r}")
  dora = sorted(p for ad in adapters for p, lw in ad.items() if lw.m is not None)
  if dora:
    raise ValueError(f"combine_adapters: {dora[0]!r} is a DoRA adapter; weighted combinations are defined for plain "
                     "LoRA only (as in PEFT)")
  if how == "linear":
    ranks = {lw.rank for ad in adapters for lw in ad.values()}
    if len(ranks) > 1:
      raise ValueError(f"combine_adapters('linear') needs the same rank everywhere, got ranks {sorted(ranks)}; use 'cat'")
  out = {}
  for p in sorted({p for ad in adapters for p in ad}):
    parts = [(ad[p], float(wt)) for ad, wt in zip(adapters, weights) if p in ad]
    lay = parts[0][0].layout
    if any(lw.layout != lay for lw, _ in parts):
      raise ValueError(f"combine_adapters: adapters disagree on the layout of {p!r}")
    nb = lay.count("b")
    if how == "cat":
      a = jnp.concatenate([lw.a.astype(jnp.float32) * (wt * _scale(lw)) for lw, wt in parts], axis=-1)
      b = jnp.concatenate([lw.b.astype(jnp.float32) for lw, _ in parts], axis=nb)
    else:
      ws = [wt * _scale(lw) for lw, wt in parts]
      a = sum(lw.a.astype(jnp.float32) * (math.copysign(math.sqrt(abs(s)), s)) for (lw, _), s in zip(parts, ws))
      b = sum(lw.b.astype(jnp.float32) * math.sqrt(abs(s)) for (lw, _), s in zip(parts, ws))
    r = int(a.shape[-1])
    out[p] = dataclasses.replace(parts[0][0], a=a, b=b, rank=r, alpha=float(r), rslora=False, w=None)
  return out


@dataclasses.dataclass(frozen=True, kw_only=True)
class AdapterBank:
  """Named adapters over one base; ``use(name)`` gives the adapted tree for that task.

  Example:
    >>> import jax_lora as jl
    >>> params = {"w": jnp.ones((4, 4))}
    >>> cfg = jl.LoraConfig(rank=2, targets=("w",))
    >>> a1, a2 = (jl.init_lora(params, cfg, jax.random.key(i)) for i in (1, 2))
    >>> bank = AdapterBank.from_base(params).add("sql", extract(a1)).add("chat", extract(a2))
    >>> jl.dot(jnp.ones((1, 4)), bank.use("sql")["w"]).shape   # the "sql" adapter, unmerged
    (1, 4)
  """

  base: Any  # the frozen base params, shared by every adapted tree
  adapters: Mapping[str, Adapter] = dataclasses.field(default_factory=dict)  # name -> adapter

  @classmethod
  def from_base(cls, params: Any) -> "AdapterBank":
    """A bank with no adapters over ``params`` (a tree that already has adapters is stripped)."""
    return cls(base=strip(params))

  def add(self, name: str, adapter: Mapping[str, LoraWeight]) -> "AdapterBank":
    """A bank with ``adapter`` added under ``name`` (checked against the base now)."""
    attach(self.base, adapter)
    return dataclasses.replace(self, adapters={**self.adapters, name: dict(adapter)})

  def add_peft(self, name: str, folder: str, model_type: str = "llama") -> "AdapterBank":
    """A bank with the PEFT adapter folder ``folder`` added under ``name``."""
    from jax_lora._src.peft import full_tensors, load_peft, read_peft
    whole = full_tensors(read_peft(folder))
    if whole:
      raise ValueError(f"{folder}: the adapter also replaces whole tensors ({', '.join(sorted(whole)[:3])}), which "
                       "adapters sharing one base cannot; load it with jax_lora.peft.load_peft instead")
    return self.add(name, extract(load_peft(folder, self.base, model_type)))

  def remove(self, name: str) -> "AdapterBank":
    """A bank without adapter ``name``."""
    self._get(name)
    return dataclasses.replace(self, adapters={k: v for k, v in self.adapters.items() if k != name})

  def _get(self, name: str) -> Adapter:
    if name not in self.adapters:
      raise ValueError(f"no adapter named {name!r}; have {sorted(self.adapters)}")
    return self.adapters[name]

  def use(self, name: str | None) -> Any:
    """The adapted tree for ``name`` (None: the plain base)."""
    return self.base if name is None else attach(self.base, self._get(name))

  def mix(self, names: Sequence[str], weights: Sequence[float], how: Literal["linear", "cat"] = "cat") -> Adapter:
    """Weighted combination of named adapters (see :func:`combine_adapters`)."""
    return combine_adapters([self._get(n) for n in names], weights, how)
