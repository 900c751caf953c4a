"""LoRA configuration."""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Mapping
from typing import Literal

from jax_lora._src.tree import first_match

__all__ = ["LoraConfig", "ALL_LINEAR", "target_pattern", "is_all_linear"]

# "all-linear" by name, when no model is traced: every Flax linear kernel (Linen
# nn.Dense/DenseGeneral/Einsum and NNX Linear/LinearGeneral/Einsum all name their
# weight "kernel") except an untied lm_head's: PEFT's all-linear leaves the output
# layer out, and the same words mean the same modules here. With
# init_lora(..., apply=...) all-linear is found by tracing instead (also no output layer).
ALL_LINEAR = r"(?!(.*/)?lm_head/)(.*/)?kernel"


def target_pattern(target: str) -> str:
  """The path regex of one ``LoraConfig.targets`` entry.

  ``"all-linear"`` (or ``"all_linear"``) is :data:`ALL_LINEAR` (see
  :func:`is_all_linear` for the traced rule); a bare name
  such as ``"q_proj"`` (letters, digits, ``_``) means the kernel of every module
  of that name, or every leaf of that name, anywhere in the tree (as PEFT's
  ``target_modules`` names do); anything else is a regex fullmatched against
  "/"-joined paths.

  >>> target_pattern("q_proj")
  '(.*/)?q_proj(/kernel|/embedding)?'
  """
  if target in ("all-linear", "all_linear"):
    return ALL_LINEAR
  if re.fullmatch(r"\w+", target):
    return rf"(.*/)?{target}(/kernel|/embedding)?"
  return target


def is_all_linear(target: str) -> bool:
  """Whether a ``targets`` entry is the all-linear shorthand (or its :data:`ALL_LINEAR` regex)."""
  return target in ("all-linear", "all_linear", ALL_LINEAR)


def _freeze_mapping(m) -> tuple[tuple[str, float], ...]:
  if m is None:
    return ()
  items = m.items() if isinstance(m, Mapping) else m
  return tuple((str(k), v) for k, v in items)


@dataclasses.dataclass(frozen=True, kw_only=True)
class LoraConfig:
  """What to adapt and how. Frozen and hashable (usable as a jit static arg).

  Example:
    >>> cfg = LoraConfig(rank=8, alpha=16, targets=("q_proj", "v_proj"))
    >>> cfg.target_patterns
    ('(.*/)?q_proj(/kernel|/embedding)?', '(.*/)?v_proj(/kernel|/embedding)?')
  """

  # Rank r of the update B·A (A: in→r, B: r→out).
  rank: int = 8
  # Scale numerator: ΔW is multiplied by alpha/rank (alpha/sqrt(rank) with rsLoRA).
  alpha: float = 8.0
  # What to adapt: path regexes fullmatched against "/"-joined parameter paths, bare
  # module names ("q_proj": that module's kernel anywhere) or "all-linear"; each
  # must match something (see target_pattern).
  targets: tuple[str, ...] = (ALL_LINEAR,)
  # Dropout probability on the LoRA branch input (PEFT's lora_dropout).
  dropout: float = 0.0
  # rsLoRA: scale alpha/sqrt(rank) instead of alpha/rank.
  use_rslora: bool = False
  # Per-path rank overrides: (regex, rank) pairs, first fullmatch wins.
  rank_pattern: tuple[tuple[str, int], ...] = ()
  # Per-path alpha overrides: (regex, alpha) pairs, first fullmatch wins.
  alpha_pattern: tuple[tuple[str, float], ...] = ()
  # A init: "kaiming" (PEFT default, uniform ±1/sqrt(in)), "gaussian" (N(0, 1/r)),
  # or "pissa" (top-r SVD of W moved into A·B, base becomes the residual).
  init: Literal["kaiming", "gaussian", "pissa"] = "kaiming"
  # Which biases train: "none", "all", or "lora_only" (biases of adapted modules).
  bias: Literal["none", "all", "lora_only"] = "none"
  # Axis layouts for kernels that are not plain 2-D (in, out): (regex, layout) pairs,
  # layout one letter per kernel axis: 'i' input, 'o' output, 'b' batch/stacked
  # (e.g. "bio" for scan-stacked Dense kernels, "iio" for DenseGeneral(axis=(-2,-1))).
  layouts: tuple[tuple[str, str], ...] = ()
  # dtype of A and B (None: float32).
  dtype: str | None = None
  # DoRA (weight-decomposed LoRA, PEFT's use_dora): a trainable magnitude per output,
  # initialised to the kernel's column norms ‖W‖ over its input axes.
  use_dora: bool = False
  # Modules trained whole beside the adapters (PEFT's modules_to_save: "lm_head",
  # "embed_tokens" when adding tokens); bare names match the module anywhere.
  modules_to_save: tuple[str, ...] = ()
  # PEFT's trainable tokens: (table module name, token ids) pairs ("embed_tokens": [ids]; a bare
  # list means embed_tokens). Only those rows of the table train (see init_lora).
  trainable_token_indices: tuple[tuple[str, tuple[int, ...]], ...] = ()

  def __post_init__(self):
    object.__setattr__(self, "rank_pattern", _freeze_mapping(self.rank_pattern))
    object.__setattr__(self, "alpha_pattern", _freeze_mapping(self.alpha_pattern))
    object.__setattr__(self, "layouts", _freeze_mapping(self.layouts))
    if isinstance(self.targets, str):
      object.__setattr__(self, "targets", (self.targets,))
    object.__setattr__(self, "targets", tuple(self.targets))
    if isinstance(self.modules_to_save, str):
      object.__setattr__(self, "modules_to_save", (self.modules_to_save,))
    object.__setattr__(self, "modules_to_save", tuple(self.modules_to_save or ()))
    tti = self.trainable_token_indices or ()
    if isinstance(tti, Mapping):
      tti = tuple(tti.items())
    elif tti and all(isinstance(i, int) for i in tti):
      tti = (("embed_tokens", tuple(tti)),)
    tti = tuple((str(k), tuple(v)) for k, v in tti)
    for name, ids in tti:
      if (not re.fullmatch(r"\w+", name) or not ids or len(set(ids)) != len(ids)
              or not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in ids)):
        raise ValueError(f"LoraConfig.trainable_token_indices[{name!r}]={list(ids)!r}: give a bare module name "
                         "and distinct non-negative token ids")
    object.__setattr__(self, "trainable_token_indices", tti)
    if not isinstance(self.rank, int) or self.rank <= 0:
      raise ValueError(f"LoraConfig.rank must be a positive integer, got {self.rank!r}")
    if not (isinstance(self.alpha, (int, float)) and self.alpha > 0 and math.isfinite(self.alpha)):
      raise ValueError(f"LoraConfig.alpha must be a positive number, got {self.alpha!r}")
    if not 0.0 <= self.dropout < 1.0:
      raise ValueError(f"LoraConfig.dropout must be in [0, 1), got {self.dropout!r}")
    if self.init not in ("kaiming", "gaussian", "pissa"):
      raise ValueError(f"LoraConfig.init must be 'kaiming', 'gaussian' or 'pissa', got {self.init!r}")
    if self.bias not in ("none", "all", "lora_only"):
      raise ValueError(f"LoraConfig.bias must be 'none', 'all' or 'lora_only', got {self.bias!r}")
    if not self.targets:
      raise ValueError("LoraConfig.targets is empty; give at least one path regex, e.g. ALL_LINEAR")
    for pat, r in self.rank_pattern:
      if not isinstance(r, int) or r <= 0:
        raise ValueError(f"LoraConfig.rank_pattern[{pat!r}] must be a positive int, got {r!r}")
    for pat, a in self.alpha_pattern:
      if not (isinstance(a, (int, float)) and a > 0):
        raise ValueError(f"LoraConfig.alpha_pattern[{pat!r}] must be a positive number, got {a!r}")
    for pat, lay in self.layouts:
      if not lay or set(lay) - set("bio") or "i" not in lay or "o" not in lay:
        raise ValueError(f"LoraConfig.layouts[{pat!r}]={lay!r}: use one of 'b','i','o' per kernel axis, with at least one 'i' and one 'o'")

  @property
  def target_patterns(self) -> tuple[str, ...]:
    """``targets`` as path regexes (shorthands expanded, see :func:`target_pattern`)."""
    return tuple(target_pattern(t) for t in self.targets)

  @classmethod
  def all_linear(cls, **kwargs) -> "LoraConfig":
    """Preset targeting every linear kernel (the QLoRA paper's recommendation)."""
    return cls(targets=(ALL_LINEAR,), **kwargs)

  def rank_for(self, path: str) -> int:
    r = first_match(path, self.rank_pattern)
    return self.rank if r is None else r

  def alpha_for(self, path: str) -> float:
    a = first_match(path, self.alpha_pattern)
    return float(self.alpha if a is None else a)

  def layout_for(self, path: str, ndim: int, default: str | None = None) -> str:
    lay = first_match(path, self.layouts)
    if lay is None and default is not None and len(default) == ndim:
      return default
    if lay is None:
      if ndim != 2:
        raise ValueError(
            f"kernel {path!r} has {ndim} axes; say which are input/output/stacked with "
            f"LoraConfig(layouts={{{path!r}: '...'}}) using 'i','o','b' per axis (e.g. 'bio'), "
            "or use jax_lora.linen.infer_layouts(model, ...) / jax_lora.nnx.infer_layouts, or pass "
            "init_lora(..., apply=...) to read layouts from a trace"
        )
      return "io"
    if len(lay) != ndim:
      raise ValueError(f"layout {lay!r} for {path!r} has {len(lay)} letters but the kernel has {ndim} axes")
    return lay
