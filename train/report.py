"""``report.md`` and ``curves.png`` for a training run (written atomically)."""

from __future__ import annotations

import json
import os
from typing import Any

from jax_lora.files import atomic_file, write_text

__all__ = ["write_report", "write_curves", "read_metrics"]

_METRICS = ("validation_loss", "bleu", "rouge1", "rouge2", "rougeL")


def read_metrics(out_dir: str) -> list[dict]:
  path = os.path.join(out_dir, "metrics.jsonl")
  if not os.path.exists(path):
    return []
  with open(path, encoding="utf-8") as f:
    return [json.loads(line) for line in f if line.strip()]


def write_report(cfg: Any, results: dict) -> str:
  """Summary of a run: parameters, times, metrics before/after, sample outputs."""
  rows = read_metrics(cfg.out_dir)
  setup = next((r for r in rows if r.get("event") == "setup"), {})
  steps = [r for r in rows if r.get("event") == "train" and "step_time_s" in r]
  before, after = results.get("before", {}), results.get("after", {})
  total = setup.get("total_params")
  lines = [f"# Training report: {cfg.method} on {setup.get('model', cfg.model)}", "",
           f"- trainable parameters: {results.get('trainable_params', 0):,}"
           + (f" of {total:,} ({100 * results['trainable_params'] / total:.2f}%)" if total else ""),
           f"- steps: {results.get('steps_run', 0)} run of {results.get('steps', 0)}, batch {cfg.batch_size}, "
           f"seq_len {cfg.seq_len}, lr {cfg.optim.lr}",
           f"- training time: {results.get('train_s', 0)} s (compiles {results.get('compile_s', 0)} s)"]
  if setup.get("no_target_examples"):
    lines.append(f"- {setup['no_target_examples']} of {setup.get('train_examples')} training examples have their whole "
                 f"completion beyond seq_len {cfg.seq_len} (no loss from them; raise seq_len to use them)")
  if steps:
    st = [r["step_time_s"] for r in steps]
    tps = [r["tokens_per_s"] for r in steps]
    lines.append(f"- step time (jitted step, blocked, compiles excluded): median {sorted(st)[len(st) // 2]:.3f} s, "
                 f"{sorted(tps)[len(tps) // 2]:.0f} tokens/s")
  lines += ["", "| metric | before | after |", "|---|---|---|"]
  for k in _METRICS:
    if k in before or k in after:
      fmt = lambda v: "—" if v is None else f"{v:.4f}" if k == "validation_loss" else f"{v:.2f}"
      lines.append(f"| {k} | {fmt(before.get(k))} | {fmt(after.get(k))} |")
  refs = results.get("references", [])
  if after.get("samples"):
    lines += ["", "## Samples (after)", ""]
    for i, hyp in enumerate(after["samples"]):
      ref = refs[i] if i < len(refs) else ""
      lines.append(f"- {hyp!r} (reference: {ref!r})")
  text = "\n".join(lines) + "\n"
  path = os.path.join(cfg.out_dir, "report.md")
  write_text(path, text)
  return path


def write_curves(out_dir: str) -> str:
  """Training/validation loss vs step and the task metric before/after, as a PNG."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  rows = read_metrics(out_dir)
  train = [(r["step"], r["loss"]) for r in rows if r.get("event") == "train"]
  val = [(r["step"], r["val_loss"]) for r in rows if r.get("event") in ("validation", "before", "after")
         and "val_loss" in r]
  marks = {}
  for r in rows:
    if r.get("event") in ("before", "after"):
      for k in ("bleu", "rouge1", "rougeL"):
        if k in r:
          marks.setdefault(k, []).append((r.get("step", 0), r[k]))
  fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
  if train:
    ax1.plot(*zip(*train), label="train loss")
  if val:
    ax1.plot(*zip(*sorted(set(val))), "o-", label="validation loss")
  ax1.set_xlabel("step")
  ax1.set_ylabel("loss")
  ax1.legend()
  for k, pts in marks.items():
    ax2.plot(*zip(*pts), "o-", label=k)
  ax2.set_xlabel("step")
  ax2.set_ylabel("score (before → after)")
  if marks:
    ax2.legend()
  fig.tight_layout()
  path = os.path.join(out_dir, "curves.png")
  with atomic_file(path) as tmp:
    fig.savefig(tmp, format="png", dpi=100)
  plt.close(fig)
  return path
