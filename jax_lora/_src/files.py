"""Files: atomic writes of files and folders, and reading safetensors model folders.

Every output of jax_lora and its app is written to a temporary path beside the
target and renamed into place, so an interrupted write never leaves a
half-written file or folder behind. Only safetensors (and GGUF, orbax) are
read: never pickles.
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from typing import Any

__all__ = ["atomic_file", "write_text", "atomic_folder", "publish_folder", "weight_files", "read_safetensors"]


@contextlib.contextmanager
def atomic_file(path: str) -> Iterator[str]:
  """``with atomic_file(path) as tmp:`` write ``tmp``; on success it replaces ``path``.

  On an exception the temporary file is removed and ``path`` is untouched.
  """
  folder = os.path.dirname(os.path.abspath(path))
  os.makedirs(folder, exist_ok=True)
  base, ext = os.path.splitext(os.path.basename(path))
  fd, tmp = tempfile.mkstemp(prefix=f".{base}.tmp-", suffix=ext, dir=folder)
  os.close(fd)
  try:
    yield tmp
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.unlink(tmp)
    raise


def write_text(path: str, text: str) -> None:
  """Writes ``text`` (UTF-8) to ``path`` atomically."""
  with atomic_file(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
    f.write(text)


@contextlib.contextmanager
def atomic_folder(out: str) -> Iterator[str]:
  """``with atomic_folder(out) as tmp:`` write into ``tmp``; on success ``tmp`` replaces ``out``.

  On an exception the temporary folder is removed and ``out`` is untouched.
  """
  out = os.path.abspath(out)
  parent = os.path.dirname(out)
  os.makedirs(parent, exist_ok=True)
  if os.path.exists(out) and not os.path.isdir(out):
    raise ValueError(f"{out} exists and is not a folder; choose another output path")
  tmp = tempfile.mkdtemp(prefix="." + os.path.basename(out) + ".tmp-", dir=parent)
  os.chmod(tmp, 0o755)
  try:
    yield tmp
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  old = None
  if os.path.exists(out):
    old = tmp + ".old"
    os.rename(out, old)
  os.rename(tmp, out)
  if old:
    shutil.rmtree(old, ignore_errors=True)


def publish_folder(tmp: str, final: str) -> None:
  """Renames a finished temporary folder to ``final`` unless another process got there
  first (then the winner's folder is kept and ``tmp`` removed): for shared caches."""
  os.makedirs(os.path.dirname(os.path.abspath(final)), exist_ok=True)
  try:
    os.rename(tmp, final)
  except OSError:
    shutil.rmtree(tmp, ignore_errors=True)


def weight_files(folder: str) -> list[str]:
  """The safetensors files of a model folder: the index's shards, ``model.safetensors``,
  or else every ``*.safetensors`` file."""
  index = os.path.join(folder, "model.safetensors.index.json")
  if os.path.exists(index):
    with open(index) as f:
      return [os.path.join(folder, n) for n in sorted(set(json.load(f)["weight_map"].values()))]
  single = os.path.join(folder, "model.safetensors")
  if os.path.exists(single):
    return [single]
  found = sorted(glob.glob(os.path.join(folder, "*.safetensors")))
  if found:
    return found
  raise ValueError(f"{folder} has no model.safetensors (or shards); only safetensors checkpoints are read")


def read_safetensors(folder: str, framework: str = "numpy") -> dict[str, Any]:
  """``{key: array}`` of every tensor of a model folder (``framework``: "numpy", with
  bfloat16 via ml_dtypes, or "flax" for jax arrays)."""
  import numpy as np
  from safetensors import safe_open

  out = {}
  for path in weight_files(folder):
    with safe_open(path, framework="flax") as f:
      for k in f.keys():
        t = f.get_tensor(k)
        out[k] = np.asarray(t) if framework == "numpy" else t
  return out
