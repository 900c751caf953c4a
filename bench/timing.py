"""Timing shared by the benchmarks: interleaved rounds, medians, results as JSON."""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Callable, Mapping
from typing import Any

import jax


def call_times(fn: Callable, args: tuple = (), steps: int = 5) -> list[float]:
  """Seconds of ``steps`` calls of ``fn(*args)``, result blocked on, after one untimed warm-up call."""
  jax.block_until_ready(fn(*args))
  ts = []
  for _ in range(steps):
    t = time.perf_counter()
    jax.block_until_ready(fn(*args))
    ts.append(time.perf_counter() - t)
  return ts


def interleaved_medians(cases: Mapping[str, tuple[Callable, tuple]], steps: int, rounds: int) -> dict[str, float]:
  """Median seconds per call of each ``name: (fn, args)``, measured in ``rounds`` interleaved
  rounds so that machine drift hits every case alike."""
  times: dict[str, list[float]] = {k: [] for k in cases}
  for _ in range(rounds):
    for name, (fn, args) in cases.items():
      times[name] += call_times(fn, args, steps)
  return {k: statistics.median(v) for k, v in times.items()}


def write_json(path: str | None, results: Any) -> None:
  """Writes ``results`` to ``path`` (if given)."""
  if path:
    with open(path, "w") as f:
      json.dump(results, f, indent=1)
