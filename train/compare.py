"""``jax-lora compare PLAN.yaml [key=value ...]``: one table over several training runs.

A plan is a YAML file with ``base`` (a train config) and either

* ``runs``: ``{name: {dotted.key: value, ...}}`` — e.g. LoRA vs QLoRA vs full
  fine-tuning on the same data budget (``configs/compare.yaml``), written to
  ``compare.md`` / ``compare.json``; or
* ``sweep``: ``{key: dotted.key, values: [...], alpha_ratio: float}`` — one run
  per value, e.g. LoRA ranks with ``lora.alpha = alpha_ratio * rank``
  (``configs/rank_sweep.yaml``), written to ``sweep.md`` / ``sweep.json`` /
  ``sweep.png``.

Optional ``out_dir`` (default ``runs/<plan file name>``): run ``NAME`` trains in
``out_dir/NAME`` with the ordinary ``jax-lora train`` outputs. Command-line
overrides apply to every run (e.g. ``steps=100``). All configs are validated
before anything trains; a run whose ``results.json`` already exists is read, not
trained again (after checking that its ``config.yaml`` is this run's config), so
an interrupted comparison continues where it stopped.

The untrained model is evaluated once and shared by the runs that start from
it unchanged (LoRA with B = 0 at init, full fine-tuning); QLoRA runs evaluate
their quantized base themselves, so the table shows what quantization costs.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from collections.abc import Sequence
from typing import Any

import yaml

from jax_lora.files import atomic_file, write_text

from .config import TrainConfig, config_to_dict, load_config, read_yaml_mapping
from .outdir import config_diff

__all__ = ["Run", "load_plan", "run_plan", "table", "main"]

_PLAN_KEYS = ("base", "runs", "sweep", "out_dir")
_SWEEP_KEYS = ("key", "values", "alpha_ratio")
_NOT_SCORES = ("validation_loss", "val_loss", "eval_s", "samples")


@dataclasses.dataclass(frozen=True)
class Run:
  """One run of a plan: its name, its validated config, and the swept key and value (if any)."""

  name: str
  config: TrainConfig
  value: Any = None
  key: str | None = None


def _base_path(plan_path: str, base: Any) -> str:
  """``base`` as given (relative to the working directory), else relative to the plan file or its parent."""
  if not isinstance(base, str) or not base:
    raise ValueError(f"{plan_path}: 'base' must be the path of a train config, e.g. base: configs/default.yaml")
  here = os.path.dirname(os.path.abspath(plan_path))
  for cand in (base, os.path.join(here, base), os.path.join(os.path.dirname(here), base)):
    if os.path.isfile(cand):
      return cand
  raise ValueError(f"{plan_path}: base config {base!r} does not exist; give a path relative to the working directory")


def _overrides(name: str, mapping: Any) -> list[str]:
  if mapping is None:
    return []
  if not isinstance(mapping, dict):
    raise ValueError(f"run {name!r} must map dotted keys to values, e.g. {name}: {{method: lora}}")
  return [f"{k}={json.dumps(v)}" for k, v in mapping.items()]


def load_plan(path: str, overrides: Sequence[str] = (), only: Sequence[str] = (),
              check_files: bool = True) -> tuple[str, str, list[Run]]:
  """Reads and validates a plan.

  Args:
    path: the plan YAML.
    overrides: ``key=value`` train-config overrides applied to every run
      (``out_dir=...`` sets the plan's output folder instead).
    only: names of the runs to keep (all when empty).
    check_files: verify data files and model paths exist.

  Returns:
    ``(kind, out_dir, runs)`` with kind ``"compare"`` or ``"sweep"``.

  Raises:
    ValueError: an unknown plan key, a bad run or sweep, or a run config that
      ``jax-lora train`` would reject (named with its run).
  """
  raw = read_yaml_mapping(path, "plan file", "a mapping with 'base' and 'runs' or 'sweep'")
  unknown = sorted(set(raw) - set(_PLAN_KEYS))
  if unknown:
    raise ValueError(f"{path}: unknown plan key(s) {', '.join(unknown)}; a plan has {', '.join(_PLAN_KEYS)}")
  if ("runs" in raw) == ("sweep" in raw):
    raise ValueError(f"{path}: give exactly one of 'runs' (named runs) or 'sweep' (one key over values)")
  base = _base_path(path, raw.get("base"))
  out_dir = str(raw.get("out_dir") or os.path.join("runs", os.path.splitext(os.path.basename(path))[0]))
  shared = []
  for o in overrides:
    if o.partition("=")[0].strip() == "out_dir":
      out_dir = o.partition("=")[2].strip()
    else:
      shared.append(o)
  named: list[tuple[str, Any, list[str]]] = []
  if "runs" in raw:
    kind = "compare"
    if not isinstance(raw["runs"], dict) or not raw["runs"]:
      raise ValueError(f"{path}: 'runs' must map run names to overrides, e.g. runs: {{lora: {{method: lora}}}}")
    for name, mapping in raw["runs"].items():
      named.append((str(name), None, _overrides(str(name), mapping)))
  else:
    kind = "sweep"
    sw = raw["sweep"]
    if not isinstance(sw, dict) or "key" not in sw or not isinstance(sw.get("values"), list) or not sw["values"]:
      raise ValueError(f"{path}: 'sweep' needs 'key' and a non-empty 'values' list, e.g. {{key: lora.rank, values: [4, 8]}}")
    bad = sorted(set(sw) - set(_SWEEP_KEYS))
    if bad:
      raise ValueError(f"{path}: unknown sweep key(s) {', '.join(bad)}; a sweep has {', '.join(_SWEEP_KEYS)}")
    ratio = sw.get("alpha_ratio")
    if ratio is not None and sw["key"] != "lora.rank":
      raise ValueError(f"{path}: sweep.alpha_ratio only applies to key lora.rank, not {sw['key']!r}")
    for v in sw["values"]:
      extra = [f"lora.alpha={float(ratio) * v}"] if ratio is not None else []
      named.append((f"{sw['key'].rsplit('.', 1)[-1]}{v}", v, [f"{sw['key']}={json.dumps(v)}", *extra]))
  if only:
    missing = sorted(set(only) - {n for n, _, _ in named})
    if missing:
      raise ValueError(f"no run named {', '.join(missing)} in {path}; its runs are {', '.join(n for n, _, _ in named)}")
    named = [r for r in named if r[0] in only]
  runs = []
  for name, value, ovr in named:
    try:
      cfg = load_config(base, [*shared, *ovr, f"out_dir={json.dumps(os.path.join(out_dir, name))}"],
                        check_files=check_files)
    except ValueError as e:
      raise ValueError(f"run {name!r}: {e}") from None
    runs.append(Run(name, cfg, value, None if kind == "compare" else raw["sweep"]["key"]))
  return kind, out_dir, runs


def _starts_from_base(cfg: TrainConfig) -> bool:
  """The untrained run computes exactly the base model (so it can share the base's scores)."""
  return cfg.method == "full" or (cfg.method == "lora" and cfg.lora.init in ("kaiming", "gaussian"))


def _before_key(cfg: TrainConfig) -> str:
  d = config_to_dict(cfg)
  return json.dumps({k: d[k] for k in ("model", "dtype", "data", "seq_len", "eval")}, sort_keys=True)


def _results(cfg: TrainConfig) -> dict | None:
  """The finished results in ``cfg.out_dir``, if that run had this config (``out_dir`` aside)."""
  path = os.path.join(cfg.out_dir, "results.json")
  if not os.path.exists(path):
    return None
  with open(os.path.join(cfg.out_dir, "config.yaml"), encoding="utf-8") as f:
    ran = yaml.safe_load(f) or {}
  diff = config_diff(ran, config_to_dict(cfg))  # the rule of a resumed run: out_dir, log_every, ... aside
  if diff:
    raise ValueError(f"{cfg.out_dir} holds a finished run of another config ({'; '.join(diff)}); "
                     "delete that folder or set another out_dir")
  with open(path, encoding="utf-8") as f:
    res = json.load(f)
  return res if res.get("steps") and res.get("after") else None


def run_plan(runs: Sequence[Run]) -> list[dict[str, Any]]:
  """Trains every run (or reads its finished ``results.json``); one summary dict per run."""
  from .loop import train

  shared: dict[str, dict] = {}
  out = []
  for r in runs:
    res = _results(r.config)
    if res is None:
      key = _before_key(r.config) if _starts_from_base(r.config) else None
      print(f"== {r.name}: training in {r.config.out_dir}", file=sys.stderr, flush=True)
      res = train(r.config, before=shared.get(key) if key else None)
      if key:
        shared.setdefault(key, res["before"])
    elif _starts_from_base(r.config):
      shared.setdefault(_before_key(r.config), res["before"])
    out.append(_summary(r, res))
  return out


def _summary(r: Run, res: dict) -> dict[str, Any]:
  from .report import read_metrics

  cfg = r.config
  metrics = read_metrics(cfg.out_dir)
  total = next((m.get("total_params") for m in metrics if m.get("event") == "setup"), None)
  step_times = sorted(m["step_time_s"] for m in metrics if m.get("event") == "train" and "step_time_s" in m)
  before, after = res.get("before", {}), res.get("after", {})
  return {"name": r.name, "value": r.value, "method": cfg.method,
          "rank": None if cfg.method == "full" else cfg.lora.rank,
          "alpha": None if cfg.method == "full" else cfg.lora.alpha,
          "trainable_params": res.get("trainable_params"), "total_params": total,
          "trainable_pct": None if not total else 100.0 * res["trainable_params"] / total,
          "steps": res.get("steps"), "train_s": res.get("train_s"),
          "step_time_s": step_times[len(step_times) // 2] if step_times else None,
          "before": {k: v for k, v in before.items() if k not in ("samples", "val_loss")},
          "after": {k: v for k, v in after.items() if k not in ("samples", "val_loss")},
          "out_dir": cfg.out_dir}


def _score_keys(rows: Sequence[dict]) -> list[str]:
  keys: list[str] = []
  for row in rows:
    for k in row["after"]:
      if k not in _NOT_SCORES and k not in keys:
        keys.append(k)
  return keys


def table(kind: str, rows: Sequence[dict]) -> str:
  """The markdown table of a plan's results (``kind`` ``"compare"`` or ``"sweep"``).

  ``train s`` is the whole training phase (compiles and validation included),
  ``step s`` the median jitted step (compiles excluded, as in ``metrics.jsonl``).
  The first score (BLEU, or ROUGE-1 for summarization-style data) decides the
  gain column: after training minus the untrained base model (for QLoRA too,
  whose own quantized starting point is shown in its before → after cells). In
  a comparison with a ``full`` run, each gain is also a share of full
  fine-tuning's gain.
  """
  scores = _score_keys(rows)
  main = scores[0] if scores else None
  fmt = lambda v, p=2: "—" if v is None else f"{v:.{p}f}"
  line = lambda cells: "| " + " | ".join(cells) + " |"
  base = next((r["before"] for r in rows if r["method"] in ("lora", "full")), None)

  def gain(r):
    start = (base or r["before"]).get(main)
    return None if main is None or start is None or main not in r["after"] else r["after"][main] - start

  full = next((r for r in rows if r["method"] == "full"), None) if kind == "compare" else None
  full_gain = gain(full) if full is not None else None
  head = ["run", "method", "rank", "trainable", "% of params", "train s", "step s", "val loss"]
  head += [f"{k} before → after" for k in scores] + ([f"{main} gain"] if main else [])
  head += ["% of full's gain"] if full_gain else []
  lines = [line(head), "|" + "---|" * len(head)]
  if base is not None:
    cells = ["base (untrained)", "—", "—", "0", "0.00", "—", "—", fmt(base.get("validation_loss"), 4)]
    cells += [fmt(base.get(k)) for k in scores]
    lines.append(line(cells + ["—"] * (len(head) - len(cells))))
  for r in rows:
    a, b = r["after"], r["before"]
    vl = fmt(a.get("validation_loss"), 4)
    if r["method"] == "qlora":  # from its own (quantized) untrained model
      vl = f"{fmt(b.get('validation_loss'), 4)} → {vl}"
    cells = [r["name"], r["method"], "—" if r["rank"] is None else str(r["rank"]), f"{r['trainable_params']:,}",
             fmt(r["trainable_pct"]), fmt(r["train_s"], 0), fmt(r["step_time_s"], 3), vl]
    cells += [f"{fmt(b.get(k))} → {fmt(a.get(k))}" for k in scores]
    cells += [fmt(gain(r))] if main else []
    if full_gain:
      g = gain(r)
      cells.append("—" if g is None else f"{100.0 * g / full_gain:.0f}%")
    lines.append(line(cells))
  return "\n".join(lines) + "\n"


def _sweep_plot(rows: Sequence[dict], key: str, path: str) -> None:
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  scores = _score_keys(rows)
  xs = [r["value"] for r in rows]
  fig, axes = plt.subplots(1, 1 + bool(scores), figsize=(5 * (1 + bool(scores)), 3.5))
  axes = axes if scores else [axes]
  axes[0].plot(xs, [r["after"].get("validation_loss") for r in rows], "o-")
  axes[0].set(xlabel=key, ylabel="validation loss (after)")
  if scores:
    axes[1].plot(xs, [r["after"].get(scores[0]) for r in rows], "o-", label="after")
    axes[1].axhline(rows[0]["before"].get(scores[0], 0.0), ls="--", c="gray", label="before")
    axes[1].set(xlabel=key, ylabel=scores[0])
    axes[1].legend()
  for ax in axes:
    if all(isinstance(x, (int, float)) and x > 0 for x in xs):
      ax.set_xscale("log", base=2)
  fig.tight_layout()
  with atomic_file(path) as tmp:
    fig.savefig(tmp, format="png", dpi=100)
  plt.close(fig)


def write_outputs(kind: str, out_dir: str, rows: Sequence[dict], sweep_key: str | None = None) -> dict[str, str]:
  """Writes ``<kind>.md`` and ``<kind>.json`` (and ``sweep.png``) in ``out_dir``; returns their paths."""
  os.makedirs(out_dir, exist_ok=True)
  paths = {"md": os.path.join(out_dir, f"{kind}.md"), "json": os.path.join(out_dir, f"{kind}.json")}
  write_text(paths["md"], table(kind, rows))
  write_text(paths["json"], json.dumps({"kind": kind, "runs": list(rows)}, indent=1))
  if kind == "sweep":
    paths["png"] = os.path.join(out_dir, "sweep.png")
    _sweep_plot(rows, sweep_key or "value", paths["png"])
  return paths


def main(argv: Sequence[str] | None = None) -> int:
  """``jax-lora compare PLAN.yaml [key=value ...] [--only NAME ...] [--dry-run]``; returns the exit status."""
  p = argparse.ArgumentParser(prog="jax-lora compare",
                              description="Train several configs on the same budget and write one table.")
  p.add_argument("plan", help="plan YAML: base + runs (e.g. configs/compare.yaml) or base + sweep (configs/rank_sweep.yaml)")
  p.add_argument("overrides", nargs="*", help="key=value train-config overrides for every run (e.g. steps=100)")
  p.add_argument("--only", nargs="+", default=(), metavar="NAME", help="run only these runs of the plan")
  p.add_argument("--dry-run", action="store_true", help="validate the plan and list its runs, then exit")
  args = p.parse_args(list(sys.argv[1:] if argv is None else argv))
  try:
    kind, out_dir, runs = load_plan(args.plan, args.overrides, args.only)
  except ValueError as e:
    print(f"jax-lora compare: error: {e}", file=sys.stderr)
    return 1
  if args.dry_run:
    for r in runs:
      print(json.dumps({"run": r.name, "out_dir": r.config.out_dir, "method": r.config.method,
                        "rank": r.config.lora.rank, "alpha": r.config.lora.alpha, "steps": r.config.steps}))
    return 0
  try:
    rows = run_plan(runs)
    paths = write_outputs(kind, out_dir, rows, runs[0].key if runs else None)
  except KeyboardInterrupt:
    print("jax-lora compare: error: interrupted; re-run the same command to resume (finished runs are reused)",
          file=sys.stderr)
    return 130
  except OSError as e:
    from .cli import os_error_line

    print(f"jax-lora compare: error: {os_error_line(e)}", file=sys.stderr)
    return 1
  except ValueError as e:  # a bad run config or data, a diverged or interrupted run: one line
    print(f"jax-lora compare: error: {' '.join(str(e).split())}", file=sys.stderr)
    return getattr(e, "exit_code", 1)
  print(table(kind, rows), end="")
  print(json.dumps({"written": paths}))
  return 0


if __name__ == "__main__":
  sys.exit(main())
