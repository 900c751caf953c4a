"""Parameter paths: "/"-joined names for pytree leaves, and regex targeting.

Every pattern in jax_lora (LoRA targets, rank/alpha patterns, quantization
targets, sharding rules) is matched with ``re.fullmatch`` against these strings,
e.g. ``"model/layers_0/self_attn/q_proj/kernel"``.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import jax

__all__ = ["path_str", "flat_paths", "match_paths", "first_match"]


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
