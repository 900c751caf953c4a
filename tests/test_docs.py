"""Every docstring example of the library runs and prints what it shows (doctest)."""

import doctest
import importlib
import pkgutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jax_lora

MODULES = sorted(m.name for m in pkgutil.walk_packages(jax_lora.__path__, "jax_lora."))


def test_every_module_is_listed():
  assert {"jax_lora._src.lora", "jax_lora._src.adapt", "jax_lora.models.llama"} <= set(MODULES)


@pytest.mark.parametrize("name", ["jax_lora", *MODULES])
def test_docstring_examples_run(name):
  module = importlib.import_module(name)
  globs = {**vars(module), "jax": jax, "jnp": jnp, "np": np}
  result = doctest.testmod(module, globs=globs, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE,
                           report=False)
  assert result.failed == 0, f"{result.failed} of {result.attempted} docstring examples of {name} failed (run doctest)"
