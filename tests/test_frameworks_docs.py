"""Runs every Python block of README.md's "Your framework" section (Linen, NNX, Equinox,
plain functions), each in a fresh namespace: the examples there must work as written."""

import pathlib
import re

import pytest

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def _blocks():
  text = README.read_text()
  start = text.index("## Your framework")
  section = text[start:text.index("\n## ", start + 1)]
  return re.findall(r"### (\w[\w ]*)\n.*?```python\n(.*?)```", section, flags=re.S)


def test_one_example_per_framework():
  assert [name for name, _ in _blocks()] == ["Linen", "NNX", "Equinox", "Plain functions"]


@pytest.mark.parametrize("name,code", _blocks(), ids=[n for n, _ in _blocks()])
def test_readme_example_runs(name, code):
  exec(compile(code, f"README.md ({name})", "exec"), {"__name__": "__readme__"})
