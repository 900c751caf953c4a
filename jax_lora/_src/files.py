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

__all__ = ["atomic_file", "write_text", "atomic_folder", "publish_folder", "weight_files", "read_safetensors",
           "OUTPUT_MARK", "output_folder", "check_output_folder", "foreign_files", "mark_output", "clean_stale",
           "file_mode", "require_finite", "open_safetensors", "read_mark"]

# Our outputs carry this file: which command wrote them and each file's (size, mtime_ns) then,
# so a later run tells its own earlier output (replaceable) from a user's files (never deleted).
OUTPUT_MARK = ".jax-lora-output.json"
# A temporary path of ours is stale when untouched this long (or a minute, once its writer has exited).
STALE_S = 3600


def file_mode(folder: bool = False) -> int:
  """The mode ``open()``/``mkdir`` give under the current umask (0644/0755 under umask 022)."""
  mask = os.umask(0)
  os.umask(mask)
  return (0o777 if folder else 0o666) & ~mask


def _tmp_prefix(name: str) -> str:
  """Temporary paths for target ``name`` are ``.<name>.tmp-<pid>-<random>``: beside the target, hidden."""
  return f".{name}.tmp-"


def _alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except OSError:  # another user's process
    return True
  return True


def _newest_mtime(path: str) -> float:
  t = os.lstat(path).st_mtime
  if os.path.isdir(path) and not os.path.islink(path):
    for e in os.scandir(path):
      t = max(t, e.stat(follow_symlinks=False).st_mtime)
  return t


def clean_stale(folder: str, name: str, now: float | None = None) -> list[str]:
  """Removes our own leftovers for target ``name`` in ``folder`` (``.<name>.tmp-*``, left by a
  killed write): only those untouched for a minute whose writer process has exited, or untouched
  for an hour. Returns the removed paths. Nothing else is ever touched."""
  import time

  now = time.time() if now is None else now
  prefix = _tmp_prefix(name)
  removed = []
  try:
    entries = os.listdir(folder)
  except OSError:
    return removed
  for e in entries:
    if not e.startswith(prefix):
      continue
    path = os.path.join(folder, e)
    pid = e[len(prefix):].split("-", 1)[0]
    try:
      age = now - _newest_mtime(path)
    except OSError:
      continue
    dead = pid.isdigit() and int(pid) != os.getpid() and not _alive(int(pid))
    if age > STALE_S or (dead and age > 60):
      if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path, ignore_errors=True)
      else:
        with contextlib.suppress(OSError):
          os.unlink(path)
      removed.append(path)
  return removed


@contextlib.contextmanager
def atomic_file(path: str) -> Iterator[str]:
  """``with atomic_file(path) as tmp:`` write ``tmp``; on success it replaces ``path``.

  On an exception the temporary file is removed and ``path`` is untouched. The file
  gets the mode a plain ``open()`` would (0644 under umask 022); stale temporary
  files of earlier killed writes to ``path`` are removed (:func:`clean_stale`).
  """
  folder = os.path.dirname(os.path.abspath(path))
  os.makedirs(folder, exist_ok=True)
  base, ext = os.path.splitext(os.path.basename(path))
  clean_stale(folder, base)
  fd, tmp = tempfile.mkstemp(prefix=f"{_tmp_prefix(base)}{os.getpid()}-", suffix=ext, dir=folder)
  os.close(fd)
  try:
    yield tmp
    os.chmod(tmp, file_mode())
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.unlink(tmp)
    raise


def write_text(path: str, text: str) -> None:
  """Writes ``text`` (UTF-8) to ``path`` atomically."""
  with atomic_file(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
    f.write(text)


def _set_modes(folder: str) -> None:
  """Every file under ``folder`` gets the mode ``open()`` gives (some writers make 0600 files)."""
  fm, dm = file_mode(), file_mode(folder=True)
  os.chmod(folder, dm)
  for root, dirs, files in os.walk(folder):
    for d in dirs:
      os.chmod(os.path.join(root, d), dm)
    for f in files:
      os.chmod(os.path.join(root, f), fm)


@contextlib.contextmanager
def atomic_folder(out: str) -> Iterator[str]:
  """``with atomic_folder(out) as tmp:`` write into ``tmp``; on success ``tmp`` replaces ``out``.

  On an exception the temporary folder is removed and ``out`` is untouched. A
  library primitive: an existing ``out`` is replaced whatever it holds (the
  ``jax-lora`` commands use :func:`output_folder`, which refuses a user's folder).
  """
  out = os.path.abspath(out)
  parent = os.path.dirname(out)
  os.makedirs(parent, exist_ok=True)
  if os.path.exists(out) and not os.path.isdir(out):
    raise ValueError(f"{out} exists and is not a folder; choose another output path")
  clean_stale(parent, os.path.basename(out))
  tmp = tempfile.mkdtemp(prefix=f"{_tmp_prefix(os.path.basename(out))}{os.getpid()}-", dir=parent)
  try:
    yield tmp
    _set_modes(tmp)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  _swap(tmp, out)


def _swap(tmp: str, out: str) -> None:
  """Renames ``tmp`` to ``out``; a previous ``out`` is renamed aside first, then removed."""
  old = None
  if os.path.exists(out):
    old = tmp + ".old"
    os.rename(out, old)
  os.rename(tmp, out)
  if old:
    shutil.rmtree(old, ignore_errors=True)


def _stat(path: str) -> list[int]:
  st = os.stat(path)
  return [st.st_size, st.st_mtime_ns]


def read_mark(folder: str) -> dict | None:
  """The :data:`OUTPUT_MARK` record of ``folder`` (None when absent or unreadable)."""
  try:
    with open(os.path.join(folder, OUTPUT_MARK), encoding="utf-8") as f:
      mark = json.load(f)
  except (OSError, ValueError):
    return None
  return mark if isinstance(mark, dict) and isinstance(mark.get("files"), dict) else None


def mark_output(folder: str, command: str, names: list[str] | None = None, managed: tuple[str, ...] = ()) -> None:
  """Records in ``folder/OUTPUT_MARK`` that ``command`` wrote ``names`` (default: every file
  there) as they are now, keeping the earlier records of the same command; ``managed``
  names are ours whatever they become (appended logs, checkpoint folders)."""
  if names is None:
    names = [n for n in os.listdir(folder) if n != OUTPUT_MARK and os.path.isfile(os.path.join(folder, n))]
  prev = read_mark(folder)
  files: dict[str, Any] = dict(prev["files"]) if prev and prev.get("written_by") == f"jax-lora {command}" else {}
  files.update({n: _stat(os.path.join(folder, n)) for n in names if os.path.isfile(os.path.join(folder, n))})
  files.update({n: "managed" for n in managed})
  files = {n: files[n] for n in sorted(files)}
  write_text(os.path.join(folder, OUTPUT_MARK), json.dumps({"written_by": f"jax-lora {command}", "files": files},
                                                           indent=1))


def foreign_files(folder: str, command: str) -> list[str]:
  """Entries of ``folder`` that ``jax-lora command`` did not write, or that changed since
  (per its :data:`OUTPUT_MARK`); ``[]`` for a folder wholly ours or empty."""
  names = sorted(n for n in os.listdir(folder) if n != OUTPUT_MARK)
  mark = read_mark(folder)
  if mark is None or mark.get("written_by") != f"jax-lora {command}":
    return names
  files = mark["files"]
  out = []
  for n in names:
    rec = files.get(n)
    if rec == "managed":
      continue
    path = os.path.join(folder, n)
    if rec is None or not os.path.isfile(path) or _stat(path) != rec:
      out.append(n)
  return out


def _few(names: list[str], n: int = 3) -> str:
  return ", ".join(names[:n]) + (f" and {len(names) - n} more" if len(names) > n else "")


def check_output_folder(out: str, command: str, inputs: tuple[str, ...] = (), overwrite: bool = False) -> None:
  """Refuses (one-line ValueError) an output folder that would destroy something.

  ``out`` may not be, lie inside or contain any of ``inputs`` (whatever ``overwrite``
  says). An existing non-empty ``out`` must be a previous output of the same command
  with no file added or changed since; else it is refused unless ``overwrite``, which
  replaces a folder of plain files (never one with subfolders, e.g. a run folder).
  """
  real = os.path.realpath(out)
  for inp in inputs:
    if inp is None:
      continue
    ri = os.path.realpath(inp)
    how = ("is" if real == ri else "is inside" if real.startswith(ri.rstrip(os.sep) + os.sep)
           else "contains" if ri.startswith(real.rstrip(os.sep) + os.sep) else None)
    if how:
      raise ValueError(f"the output folder {out} {how} the input {inp}; write the output to another folder")
  if not os.path.exists(out):
    return
  if not os.path.isdir(out):
    raise ValueError(f"{out} exists and is not a folder; choose another output folder")
  foreign = foreign_files(out, command)
  if not foreign:
    return
  if not overwrite:
    raise ValueError(f"{out} is not empty and holds files jax-lora {command} did not write ({_few(foreign)}); "
                     "choose a new or empty folder, or pass --overwrite to replace its contents")
  subdirs = [n for n in foreign if os.path.isdir(os.path.join(out, n))]
  if subdirs:
    raise ValueError(f"{out} holds folders ({_few(subdirs)}); --overwrite only replaces a folder of plain files, "
                     "choose another output folder")


@contextlib.contextmanager
def output_folder(out: str, command: str, inputs: tuple[str, ...] = (), overwrite: bool = False) -> Iterator[str]:
  """``with output_folder(out, "merge", inputs=(base, adapter)) as tmp:`` write into ``tmp``.

  The safe writer of the ``jax-lora`` commands: :func:`check_output_folder` first;
  then ``tmp`` (a hidden sibling of ``out``) is filled, its safetensors checked
  finite (:func:`require_finite`), its files given normal modes, marked as
  ``command``'s output (:data:`OUTPUT_MARK`), and renamed into place. On any error
  ``out`` is untouched and ``tmp`` removed.
  """
  out = os.path.abspath(out)
  check_output_folder(out, command, inputs, overwrite)
  with atomic_folder(out) as tmp:
    yield tmp
    require_finite(tmp)
    mark_output(tmp, command)


def require_finite(folder: str) -> None:
  """Raises a one-line ValueError naming the first floating tensor with a NaN/inf in
  ``folder``'s safetensors files (read one tensor at a time)."""
  import numpy as np
  for path in sorted(glob.glob(os.path.join(folder, "*.safetensors"))):
    with open_safetensors(path) as f:
      for k in f.keys():
        t = np.asarray(f.get_tensor(k))
        if t.dtype.kind == "f" or t.dtype.name == "bfloat16":
          bad = ~np.isfinite(t.astype(np.float32))
          if bad.any():
            raise ValueError(f"refusing to write {os.path.basename(path)}: tensor {k} has {int(bad.sum())} "
                             "non-finite values (NaN/inf); the inputs hold non-finite weights or the cast overflowed")


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
  bfloat16 via ml_dtypes, or "flax" for jax arrays).

  Raises:
    ValueError: a file that is not valid safetensors (truncated, garbage), naming it.
  """
  import numpy as np

  out = {}
  for path in weight_files(folder):
    with open_safetensors(path) as f:
      for k in f.keys():
        t = f.get_tensor(k)
        out[k] = np.asarray(t) if framework == "numpy" else t
  return out


@contextlib.contextmanager
def open_safetensors(path: str, framework: str = "flax") -> Iterator[Any]:
  """``safetensors.safe_open`` whose failures (truncated file, garbage header) are one-line
  ValueErrors naming ``path``."""
  from safetensors import safe_open

  try:
    f = safe_open(path, framework=framework)
  except FileNotFoundError:
    raise ValueError(f"{path} does not exist") from None
  except Exception as e:  # noqa: BLE001 - safetensors raises its own SafetensorError and others
    msg = " ".join(str(e).split()) or type(e).__name__
    raise ValueError(f"{path} is not a valid safetensors file ({msg}); re-download or re-save it") from None
  with f:
    yield f
