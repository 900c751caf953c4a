"""Parameter trees: "/"-joined paths, regex targeting, and maps over leaves.

The bottom layer of jax_lora: it imports nothing else of the package.

Every pattern in jax_lora (LoRA targets, rank/alpha patterns, quantization
targets, sharding rules) is matched with ``re.fullmatch`` against these strings,
e.g. ``"model/layers_0/self_attn/q_proj/kernel"``.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import zlib
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import jax

__all__ = [
    "path_str",
    "flat_paths",
    "match_paths",
    "first_match",
    "is_node",
    "is_quantized",
    "materialize",
    "is_variable",
    "is_leaf",
    "map_leaves",
    "leaves",
    "path_key",
    "base_of",
    "with_base",
]


def _key_name(k: Any) -> str:
  if isinstance(k, jax.tree_util.DictKey):
    return str(k.key)
  if isinstance(k, jax.tree_util.GetAttrKey):
    return k.name
  if isinstance(k, jax.tree_util.SequenceKey):
    return str(k.idx)
  if isinstance(k, jax.tree_util.FlattenedIndexKey):
    return str(k.key)
  return str(k)


def path_str(keypath: Sequence[Any]) -> str:
  """Joins a JAX key path (or a tuple of names) with "/".

  >>> path_str((jax.tree_util.DictKey("dense"), jax.tree_util.DictKey("kernel")))
  'dense/kernel'
  """
  return "/".join(_key_name(k) for k in keypath)


def flat_paths(tree: Any, is_leaf: Callable[[Any], bool] | None = None) -> dict[str, Any]:
  """Returns ``{path: leaf}`` for every leaf of ``tree`` (in tree order)."""
  flat, _ = jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_leaf)
  return {path_str(kp): leaf for kp, leaf in flat}


def first_match(path: str, patterns: Mapping[str, Any] | Iterable[tuple[str, Any]]):
  """Value of the first ``(pattern, value)`` whose pattern fullmatches ``path``, else None."""
  items = patterns.items() if isinstance(patterns, Mapping) else patterns
  for pattern, value in items:
    if re.fullmatch(pattern, path):
      return value
  return None


def match_paths(paths: Iterable[str], patterns: Sequence[str], what: str = "target") -> list[str]:
  """Paths that fullmatch any pattern; raises if a pattern matches nothing.

  A typo in a pattern must never silently train (or quantize) nothing, so every
  pattern has to match at least one path; the error lists the closest paths.
  """
  paths = list(paths)
  for p in patterns:
    try:
      re.compile(p)
    except re.error as e:
      raise ValueError(f"{what} pattern {p!r} is not a valid regular expression ({e}); fix the pattern") from None
  matched = [p for p in paths if any(re.fullmatch(pat, p) for pat in patterns)]
  for pat in patterns:
    if not any(re.fullmatch(pat, p) for p in paths):
      close = difflib.get_close_matches(pat, paths, n=3, cutoff=0.3) or paths[:3]
      raise ValueError(
          f"{what} pattern {pat!r} matches no parameter path (patterns are fullmatched against "
          f"'/'-joined paths); close matches: {close}"
      )
  return matched


# ----------------------------------------------------------------------------- tree maps
#
# jax_lora's own pytree nodes (LoraWeight, QuantizedArray) set ``jax_lora_node = True``:
# maps over parameter trees treat them as single leaves, so a function sees a whole
# adapter or quantized kernel at its path. flax.nnx Variables are unwrapped for the
# function and re-wrapped around its result.


def is_node(x: Any) -> bool:
  """True for jax_lora's own pytree nodes (LoRA weights, quantized arrays)."""
  return getattr(type(x), "jax_lora_node", False)


def is_quantized(x: Any) -> bool:
  """True for quantized base weights (a jax_lora node with ``dequantize``, e.g. NF4)."""
  return is_node(x) and hasattr(x, "dequantize")


def materialize(w: Any, dtype=None) -> jax.Array:
  """A float array for ``w`` (dequantized if quantized), optionally cast."""
  if is_quantized(w):
    return w.dequantize(dtype)
  return w if dtype is None else w.astype(dtype)


def is_variable(x: Any) -> bool:
  """True for flax.nnx Variables (Param, ...), which wrap a value."""
  return hasattr(x, "get_raw_value") and hasattr(x, "replace") and type(x).__module__.startswith("flax.nnx")


def is_leaf(x: Any) -> bool:
  """Leaves of parameter-tree maps: jax_lora nodes, nnx Variables and None placeholders."""
  return x is None or is_node(x) or is_variable(x)


def _value(x):
  return x.get_value() if is_variable(x) else x


def map_leaves(fn: Callable[..., Any], tree: Any, *rest: Any) -> Any:
  """Maps ``fn(path, value, *rest_values)`` over leaves (see :func:`is_leaf`).

  ``None`` (in ``tree`` or returned by ``fn``) is a placeholder and stays ``None``,
  so partitions keep the tree's structure (equinox-style).
  """

  def f(kp, x, *xs):
    if x is None:
      return None
    out = fn(path_str(kp), _value(x), *[_value(y) for y in xs])
    if out is None:
      return None
    return x.replace(out) if is_variable(x) else out

  return jax.tree_util.tree_map_with_path(f, tree, *rest, is_leaf=is_leaf)


def leaves(tree: Any) -> dict[str, Any]:
  """``{path: value}`` of every non-None leaf (see :func:`is_leaf`), in tree order."""
  flat, _ = jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_leaf)
  return {path_str(kp): _value(x) for kp, x in flat if x is not None}


def path_key(key: jax.Array, path: str) -> jax.Array:
  """A PRNG key for ``path``: ``fold_in(key, crc32(path))`` (stable across processes)."""
  return jax.random.fold_in(key, zlib.crc32(path.encode()) & 0x7FFFFFFF)


def base_of(x: Any) -> Any:
  """The base weight of a node that wraps one (a LoRA weight's ``w``), else ``x`` itself."""
  return x.w if getattr(type(x), "wraps_base", False) else x


def with_base(x: Any, w: Any) -> Any:
  """``x`` with its base weight replaced by ``w`` (``w`` itself if ``x`` wraps none)."""
  return dataclasses.replace(x, w=w) if getattr(type(x), "wraps_base", False) else w
