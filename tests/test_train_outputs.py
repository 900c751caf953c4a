"""The output-directory contract: metrics.jsonl keys, report.md, curves.png."""

import json

from jax_lora_app import loop as tl


def test_metrics_rows_report_and_curves(tiny, tmp_path):
  out = tmp_path / "run"
  tl.train(tiny.cfg(out, steps=6, log_every=2, eval_every=3))
  rows = [json.loads(l) for l in open(out / "metrics.jsonl")]
  train = [r for r in rows if r["event"] == "train"]
  assert [r["step"] for r in train] == [2, 4, 6]
  timed = [r for r in train if "step_time_s" in r]
  assert timed, "every logged window was a compile"
  for r in timed:
    assert {"step", "loss", "lr", "step_time_s", "tokens_per_s"} <= set(r) and r["step_time_s"] > 0
  assert any(r["event"] == "compile" and r["compile_s"] > 0 for r in rows)  # reported apart
  evals = [r for r in rows if "val_loss" in r]
  assert {r["event"] for r in evals} >= {"before", "validation", "after"}
  assert all("bleu" in r for r in rows if r["event"] in ("before", "after"))
  report = (out / "report.md").read_text()
  assert "trainable parameters" in report and "| bleu |" in report and "%" in report
  png = (out / "curves.png").read_bytes()
  assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
