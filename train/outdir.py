"""A training run's ``out_dir``: what is ours, what is the user's, and whether a re-run resumes.

``jax-lora train`` records what it writes in ``out_dir/.jax-lora-output.json``
(:data:`jax_lora.files.OUTPUT_MARK`): each file's size and mtime when written;
``metrics.jsonl`` and ``checkpoints/`` as ours whatever they hold;
``adapter/``/``model/`` carry their own record. Before anything runs,
:func:`prepare` refuses an ``out_dir`` holding a file the run did not write (or
one changed since, e.g. an edited ``report.md`` or a README added to
``adapter/``): such files are never overwritten or deleted, even by ``--fresh``.
A re-run whose config differs from the checkpointed run's ``config.yaml`` is
refused with one line listing the differing keys, unless ``on_change`` is
"resume" (``--resume-changed``: continue the checkpoint under the new config) or
"fresh" (``--fresh``: delete that run's own outputs and start from step 0).
"""

from __future__ import annotations

import os
import shutil
from typing import Any

from jax_lora.files import OUTPUT_MARK, foreign_files, mark_output, read_mark

__all__ = ["FILES", "MANAGED", "IGNORED_KEYS", "ON_CHANGE", "config_diff", "prepare", "record"]

# Files a run writes at the top of out_dir (each recorded with its size and mtime).
FILES = ("config.yaml", "before.json", "results.json", "report.md", "curves.png")
# Entries that are the run's whatever they hold: the appended log, orbax's folder, the exports.
MANAGED = ("metrics.jsonl", "checkpoints", "adapter", "model")
# What each export folder holds (a folder of a run written before records existed).
_EXPORTS = {"adapter": ("adapter_config.json", "adapter_model.safetensors"), "model": ("config.json", "model.safetensors")}
# Keys that change how a run computes, not what it computes: they may differ on resume.
IGNORED_KEYS = ("out_dir", "log_every", "eval_every", "checkpoint_every", "remat", "attention", "offload", "loss_chunk")
# What a re-run with another config does: refuse (the default), resume anyway, or start over.
ON_CHANGE = ("refuse", "resume", "fresh")


def _flat(d: dict, prefix: str = "") -> dict[str, Any]:
  """Dotted keys of a nested config mapping (rank/alpha patterns and the mesh stay whole values)."""
  out: dict[str, Any] = {}
  for k, v in d.items():
    if isinstance(v, dict) and not k.endswith("_pattern") and k != "mesh":
      out.update(_flat(v, f"{prefix}{k}."))
    else:
      out[f"{prefix}{k}"] = v
  return out


def _defaults() -> dict[str, Any]:
  from .config import TrainConfig, config_to_dict

  return _flat(config_to_dict(TrainConfig()))


def config_diff(old: dict, new: dict) -> list[str]:
  """``["optim.lr 0.01 → 0.001", ...]``: dotted keys whose values differ (``IGNORED_KEYS`` aside).

  A key that ``old`` lacks (a run folder of a version before that key existed) counts as the
  key's default: new keys default to what older versions did, so adding one to the config
  does not make every older run folder "changed".
  """
  a, b, d = _flat(old), _flat(new), _defaults()
  absent = "(absent)"
  out = []
  for k in sorted(set(a) | set(b)):
    if k in IGNORED_KEYS:
      continue
    va, vb = a.get(k, d.get(k, absent)), b.get(k, absent)
    if va != vb and not (isinstance(va, (list, tuple)) and isinstance(vb, (list, tuple)) and list(va) == list(vb)):
      out.append(f"{k} {va!r} → {vb!r}")
  return out


def _foreign(out_dir: str) -> list[str]:
  """Entries of ``out_dir`` the run did not write or that changed since (export folders looked into)."""
  found = foreign_files(out_dir, "train")
  for sub in ("adapter", "model"):
    path = os.path.join(out_dir, sub)
    if sub not in found and os.path.isdir(path):
      found += [f"{sub}/{n}" for n in foreign_files(path, "train")]
  return found


def _adopt_legacy(out_dir: str) -> bool:
  """Records a run folder written before records existed (only our own names in it) as ours."""
  names = set(os.listdir(out_dir))
  if not names <= set(FILES) | set(MANAGED) or "config.yaml" not in names:
    return False
  for sub, expected in _EXPORTS.items():
    path = os.path.join(out_dir, sub)
    if sub in names and (not os.path.isdir(path) or not set(os.listdir(path)) <= set(expected)):
      return False
  for sub in _EXPORTS:
    if sub in names:
      mark_output(os.path.join(out_dir, sub), "train")
  mark_output(out_dir, "train", [n for n in FILES if n in names], MANAGED)
  return True


def _few(names: list[str], n: int = 4) -> str:
  return ", ".join(names[:n]) + (f" and {len(names) - n} more" if len(names) > n else "")


def prepare(out_dir: str, config: dict, on_change: str = "refuse") -> list[str]:
  """Checks ``out_dir`` before a run and returns the config differences being resumed over.

  Args:
    out_dir: the run folder (created when absent).
    config: the new run's resolved config (``config_to_dict``).
    on_change: "refuse", "resume" or "fresh" (see the module docstring).

  Raises:
    ValueError: one line: a user's file in ``out_dir``, or a changed config with "refuse".
  """
  if on_change not in ON_CHANGE:
    raise ValueError(f"on_change must be one of {', '.join(ON_CHANGE)}, got {on_change!r}")
  if os.path.exists(out_dir) and not os.path.isdir(out_dir):
    raise ValueError(f"out_dir {out_dir} exists and is not a folder; choose another out_dir")
  os.makedirs(out_dir, exist_ok=True)
  entries = [n for n in os.listdir(out_dir) if n != OUTPUT_MARK]
  if not entries:
    mark_output(out_dir, "train", [], MANAGED)
    return []
  if read_mark(out_dir) is None and not _adopt_legacy(out_dir):
    raise ValueError(f"out_dir {out_dir} is not empty and is not a jax-lora training run ({_few(sorted(entries))}); "
                     "choose a new or empty out_dir (a user's files are never overwritten)")
  foreign = _foreign(out_dir)
  if foreign:
    raise ValueError(f"out_dir {out_dir} holds files jax-lora train did not write or that changed since it wrote "
                     f"them ({_few(foreign)}); move them out or choose another out_dir (they are never overwritten)")
  diff = []
  old_cfg = os.path.join(out_dir, "config.yaml")
  if os.path.exists(old_cfg):
    import yaml

    with open(old_cfg, encoding="utf-8") as f:
      diff = config_diff(yaml.safe_load(f) or {}, config)
  if on_change == "fresh":
    for n in entries:  # all ours (checked above)
      p = os.path.join(out_dir, n)
      shutil.rmtree(p) if os.path.isdir(p) and not os.path.islink(p) else os.unlink(p)
    os.unlink(os.path.join(out_dir, OUTPUT_MARK))
    mark_output(out_dir, "train", [], MANAGED)
    return []
  if diff and on_change == "refuse":
    raise ValueError(f"out_dir {out_dir} holds a run with another config ({'; '.join(diff)}); re-run with its "
                     "config to resume it, pass --resume-changed to continue it under the new config, --fresh to "
                     "delete its outputs and start over, or choose another out_dir")
  return diff


def record(out_dir: str, *names: str) -> None:
  """Records files of ``out_dir`` (as they are now) as written by this run."""
  mark_output(out_dir, "train", list(names), MANAGED)
