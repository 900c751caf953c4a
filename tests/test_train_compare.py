"""`jax-lora compare`: base vs LoRA vs QLoRA vs full in one table, and a rank sweep (tiny model)."""

import json
import os

import numpy as np
import pytest
import yaml

from jax_lora_app import compare as tcmp
from jax_lora_app import config as tc
from jax_lora_app import loop as tl


def _plan(tiny, tmp_path, body):
  base = tmp_path / "base.yaml"
  cfg = tiny.cfg(tmp_path / "unused", steps=4, eval_every=0, log_every=2, checkpoint_every=0,
             **{"quant.block_size": 32})
  base.write_text(yaml.safe_dump(tc.config_to_dict(cfg)))
  plan = tmp_path / "plan.yaml"
  plan.write_text(yaml.safe_dump({"base": str(base), "out_dir": str(tmp_path / "out"), **body}, sort_keys=False))
  return str(plan)


def test_compare_methods_one_table(tiny, tmp_path, capsys):
  runs = {"lora": {"method": "lora"}, "qlora": {"method": "qlora"}, "full": {"method": "full", "optim.lr": 1e-3}}
  plan = _plan(tiny, tmp_path, {"runs": runs})
  assert tcmp.main([plan]) == 0
  out = tmp_path / "out"
  table = (out / "compare.md").read_text()
  assert table in capsys.readouterr().out
  got = json.loads((out / "compare.json").read_text())
  assert got["kind"] == "compare" and [r["name"] for r in got["runs"]] == ["lora", "qlora", "full"]
  by = {r["name"]: r for r in got["runs"]}
  for name, row in by.items():  # the table reports exactly what each run wrote
    res = json.loads((out / name / "results.json").read_text())
    assert row["after"]["bleu"] == res["after"]["bleu"] and row["trainable_params"] == res["trainable_params"]
    assert row["after"]["validation_loss"] < row["before"]["validation_loss"]
  assert by["full"]["trainable_params"] == by["full"]["total_params"]
  assert 0 < by["lora"]["trainable_pct"] < 100 and by["lora"]["trainable_params"] == by["qlora"]["trainable_params"]
  # LoRA and full start from the same model: one shared "before"; QLoRA's quantized base differs.
  assert by["full"]["before"] == by["lora"]["before"]
  assert by["qlora"]["before"]["validation_loss"] != by["lora"]["before"]["validation_loss"]
  lines = table.splitlines()
  assert lines[2].startswith("| base (untrained) |") and len(lines) == 6
  assert all(line.count("|") == lines[0].count("|") for line in lines)
  full_gain = by["full"]["after"]["bleu"] - by["lora"]["before"]["bleu"]
  assert ("% of full's gain" in lines[0]) == (full_gain != 0)  # the column exists iff there is a gain to divide by
  # A second call reads the finished runs instead of training again.
  stamp = os.path.getmtime(out / "lora" / "metrics.jsonl")
  assert tcmp.main([plan]) == 0
  assert os.path.getmtime(out / "lora" / "metrics.jsonl") == stamp
  # ... but never the results of another config.
  assert tcmp.main([plan, "optim.lr=0.5"]) == 1
  assert "holds a finished run of another config (optim.lr " in capsys.readouterr().err
  # Keys that change how a run computes, not what (log_every, ...), still read the finished run back.
  assert tcmp.main([plan, "log_every=3"]) == 0
  assert os.path.getmtime(out / "lora" / "metrics.jsonl") == stamp


def test_shared_before_equals_own_evaluation(tiny, tmp_path):
  plan = _plan(tiny, tmp_path, {"runs": {"lora": {"method": "lora"}, "full": {"method": "full"}}})
  assert tcmp.main([plan]) == 0
  shared = json.loads((tmp_path / "out" / "full" / "results.json").read_text())["before"]
  own = tl.train(tiny.cfg(tmp_path / "own", method="full", steps=1, eval_every=0, checkpoint_every=0))["before"]
  assert shared["bleu"] == pytest.approx(own["bleu"])
  assert shared["validation_loss"] == pytest.approx(own["validation_loss"], rel=1e-6)


def test_rank_sweep(tiny, tmp_path):
  plan = _plan(tiny, tmp_path, {"sweep": {"key": "lora.rank", "values": [1, 4], "alpha_ratio": 2}})
  assert tcmp.main([plan, "steps=3"]) == 0
  out = tmp_path / "out"
  rows = json.loads((out / "sweep.json").read_text())["runs"]
  assert [(r["name"], r["rank"], r["alpha"], r["steps"]) for r in rows] == [("rank1", 1, 2.0, 3), ("rank4", 4, 8.0, 3)]
  assert rows[1]["trainable_params"] == 4 * rows[0]["trainable_params"]
  assert all(np.isfinite(r["after"]["validation_loss"]) for r in rows)
  assert (out / "sweep.png").stat().st_size > 1000 and "| rank4 | lora | 4 |" in (out / "sweep.md").read_text()


@pytest.mark.parametrize("body, message", [
    ({"runs": {"a": {"optim.lrr": 1}}}, "run 'a': unknown config key 'optim.lrr'"),
    ({"runs": {"a": {}}, "sweep": {"key": "lora.rank", "values": [1]}}, "exactly one of 'runs'"),
    ({"sweep": {"key": "optim.lr", "values": [1e-3], "alpha_ratio": 2}}, "alpha_ratio only applies"),
    ({"sweep": {"key": "lora.rank", "values": []}}, "non-empty 'values'"),
    ({"runs": {"a": {}}, "extra": 1}, "unknown plan key(s) extra"),
])
def test_bad_plans_fail_before_training(tiny, tmp_path, capsys, body, message):
  plan = _plan(tiny, tmp_path, body)
  assert tcmp.main([plan]) == 1
  err = capsys.readouterr().err.strip()
  assert message in err and len(err.splitlines()) == 1
  assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("plan, base_model, n", [("compare.yaml", "gemma3-270m", 3), ("rank_sweep.yaml", "gemma3-270m", 5),
                                                 ("compare_smollm2_135m.yaml", "smollm2-135m", 3),
                                                 ("rank_sweep_smollm2_135m.yaml", "smollm2-135m", 5)])
def test_shipped_plans_are_valid(plan, base_model, n):
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  kind, out_dir, runs = tcmp.load_plan(os.path.join(repo, "configs", plan), check_files=False)
  assert out_dir == os.path.join("runs", plan[:-len(".yaml")]) and len(runs) == n
  assert {r.config.model for r in runs} == {base_model}
  if kind == "sweep":  # alpha = 2 * rank: the update scale alpha/rank stays that of the base config
    assert all(r.config.lora.alpha == 2 * r.config.lora.rank for r in runs)
