"""`jax-lora train` never destroys a user's files, never resumes a changed config silently,
stops on divergence without exporting NaN, and fails in one line (tiny model, faults patched in)."""

from __future__ import annotations

import errno
import json
import os
import signal
import stat
import sys

import numpy as np
import pytest
import yaml

from jax_lora.files import OUTPUT_MARK
from jax_lora_app import config as tc
from jax_lora_app import data as td
from jax_lora_app import loop as tl
from jax_lora_app.run import main

FAST = {"eval.num_test": 0, "eval_every": 0, "data.validation": None}


def cli(capsys, tmp_path, cfg, *flags):
  path = tmp_path / "cfg.yaml"
  path.write_text(yaml.safe_dump(tc.config_to_dict(cfg)))
  rc = main([str(path), *flags])
  err = capsys.readouterr().err
  assert "Traceback" not in err and len(err.strip().splitlines()) <= 1, err
  return rc, err


def listing(folder):
  return sorted(os.path.relpath(os.path.join(r, f), folder) for r, _, fs in os.walk(folder) for f in fs)


def test_ctrl_c_resume_users_files_and_changed_config(tiny, tmp_path, capsys, monkeypatch):
  out = tmp_path / "run"
  cfg = tiny.cfg(out, steps=2, checkpoint_every=0, **FAST)
  real = td.Batcher.batch_at

  def batch_at(self, step):
    if step == 0:
      os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C during step 1
    return real(self, step)

  monkeypatch.setattr(td.Batcher, "batch_at", batch_at)
  rc, err = cli(capsys, tmp_path, cfg)
  assert rc == 130 and "interrupted at step 1 of 2" in err and "re-run the same command to resume" in err, err
  assert tl._checkpointer(str(out)).latest_step() == 1 and not (out / "adapter").exists()
  monkeypatch.setattr(td.Batcher, "batch_at", real)
  # the same command again resumes from the checkpoint the interruption saved
  old = os.umask(0o022)
  try:
    assert cli(capsys, tmp_path, cfg)[0] == 0
  finally:
    os.umask(old)
  assert json.loads((out / "results.json").read_text())["steps_run"] == 1
  assert all(stat.S_IMODE(os.stat(out / "adapter" / f).st_mode) == 0o644 for f in os.listdir(out / "adapter"))
  # a changed config: one line naming the keys, nothing touched
  before = {p: (out / p).read_bytes() for p in listing(out)}
  rc, err = cli(capsys, tmp_path, tiny.cfg(out, steps=2, checkpoint_every=0, **FAST, **{"optim.lr": 0.5}))
  assert rc == 1 and "optim.lr 0.01 → 0.5" in err and "--resume-changed" in err and "--fresh" in err
  assert {p: (out / p).read_bytes() for p in listing(out)} == before
  # a user's file in adapter/ and an edited report.md: refused before anything runs, never touched
  (out / "adapter" / "README.md").write_text("my model card")
  (out / "report.md").write_text("my notes")
  for flags in ([], ["--fresh"], ["--resume-changed"]):
    rc, err = cli(capsys, tmp_path, cfg, *flags)
    assert rc == 1 and "adapter/README.md" in err and "report.md" in err, err
  assert (out / "adapter" / "README.md").read_text() == "my model card" and (out / "report.md").read_text() == "my notes"
  os.unlink(out / "adapter" / "README.md")
  os.unlink(out / "report.md")
  # --resume-changed: continues the checkpoint at step 2 under the new config (3 steps)
  more = tiny.cfg(out, steps=3, checkpoint_every=0, **FAST)
  assert cli(capsys, tmp_path, more)[0] == 1
  assert cli(capsys, tmp_path, more, "--resume-changed")[0] == 0
  assert json.loads((out / "results.json").read_text())["steps_run"] == 1
  # a changed rank cannot resume: the same one line, not an orbax traceback
  r2 = tiny.cfg(out, steps=2, checkpoint_every=0, **FAST, **{"lora.rank": 2})
  rc, err = cli(capsys, tmp_path, r2, "--resume-changed")
  assert rc == 1 and "does not fit" in err and "lora.rank 4 → 2" in err
  # --fresh: starts over (its own outputs deleted)
  assert cli(capsys, tmp_path, r2, "--fresh")[0] == 0
  assert json.loads((out / "results.json").read_text())["steps_run"] == 2
  assert sorted(os.listdir(out / "checkpoints")) == ["2"]


def test_out_dir_with_a_users_files_is_refused(tiny, tmp_path, capsys):
  out = tmp_path / "project"
  out.mkdir()
  (out / "report.md").write_text("mine")
  rc, err = cli(capsys, tmp_path, tiny.cfg(out, steps=1, **FAST))
  assert rc == 1 and "not a jax-lora training run" in err
  assert listing(out) == ["report.md"]


def test_divergence_stops_keeps_last_good_checkpoint_exports_nothing(tiny, tmp_path, capsys):
  out = tmp_path / "nan"
  cfg = tiny.cfg(out, steps=8, checkpoint_every=1, **FAST, **{"optim.lr": 1e30, "optim.warmup_steps": 0,
                                                                 "optim.grad_clip": 0.0})
  rc, err = cli(capsys, tmp_path, cfg)
  assert rc == 1 and "training diverged at step" in err and "last finite loss" in err, err
  step = int(err.split("diverged at step ")[1].split(":")[0])
  assert step < 8
  assert not (out / "adapter").exists() and not (out / "results.json").exists()
  rows = [json.loads(l) for l in open(out / "metrics.jsonl")]
  assert rows[-1]["event"] == "diverged" and rows[-1]["step"] == step
  # every kept checkpoint is finite
  mngr = tl._checkpointer(str(out))
  assert mngr.all_steps() and max(mngr.all_steps()) < step
  restored = mngr.restore(max(mngr.all_steps()))
  assert all(np.isfinite(np.asarray(x)).all() for x in __import__("jax").tree.leaves(restored["trainable"]))


def test_seq_len_shorter_than_prompts_refused_before_training(tiny, tmp_path, capsys):
  out = tmp_path / "short"
  rc, err = cli(capsys, tmp_path, tiny.cfg(out, steps=2, seq_len=4, **FAST))
  assert rc == 1 and "seq_len 4 cuts off the whole completion of" in err and "train.jsonl" in err, err
  assert "of 256 examples" in err and not (out / "checkpoints").exists()


def test_few_cut_examples_kept_and_counted_many_refused(tiny):
  from transformers import AutoTokenizer

  tok = AutoTokenizer.from_pretrained(tiny.folder)
  short = {"prompt": "copy w1 :", "completion": " w1"}
  long = {"prompt": "copy " + " ".join(["w2"] * 12) + " :", "completion": " w2"}
  ex = td.tokenize_rows(tok, [short] * 97 + [long] * 3, 8, where="x.jsonl")
  assert td.no_target(ex) == 3 and len(ex) == 100 and max(len(e) for e in ex) == 8
  with pytest.raises(ValueError, match=r"cuts off the whole completion of 6 of 100 examples in x.jsonl.*at least 15"):
    td.tokenize_rows(tok, [short] * 94 + [long] * 6, 8, where="x.jsonl")


@pytest.mark.parametrize("case", ["empty_train", "empty_validation", "bad_line", "array_line"])
def test_bad_data_is_one_line(tiny, tmp_path, capsys, case):
  bad = tmp_path / "bad.jsonl"
  lines = open(tiny.files["train"]).read().splitlines()
  bad.write_text({"empty_train": "", "empty_validation": "\n\n",
                  "bad_line": "\n".join(lines[:2] + ["", '{"prompt": "copy w1 :", "completion": '] + lines[2:]),
                  "array_line": "\n".join(lines[:4] + ['["x"]'])}[case])
  key = "data.validation" if case == "empty_validation" else "data.train"
  rc, err = cli(capsys, tmp_path, tiny.cfg(tmp_path / "r", steps=1, **{**FAST, key: str(bad)}))
  want = {"empty_train": "holds no rows", "empty_validation": "holds no rows", "bad_line": f"{bad}:4 is not valid JSON",
          "array_line": f"{bad}:5 is a JSON list"}[case]
  assert rc == 1 and want in err, err


def test_disk_full_and_missing_extra_are_one_line(tiny, tmp_path, capsys, monkeypatch):
  out = tmp_path / "full"

  def full(out_dir, record):
    raise OSError(errno.ENOSPC, "No space left on device", os.path.join(out_dir, "metrics.jsonl"))

  monkeypatch.setattr(tl, "_log", full)
  rc, err = cli(capsys, tmp_path, tiny.cfg(out, steps=2, **FAST))
  assert rc == 1 and "no space left on the device" in err and "metrics.jsonl" in err, err
  monkeypatch.setitem(sys.modules, "transformers", None)
  rc, err = cli(capsys, tmp_path, tiny.cfg(tmp_path / "nohf", steps=2, **FAST))
  assert rc == 1 and "pip install 'jax-lora[hf]'" in err, err


def test_non_finite_gradient_step_changes_nothing():
  import jax.numpy as jnp
  import optax

  def loss_fn(trainable, frozen, batch, rng):  # finite loss, infinite gradient at w == 0
    return jnp.sum(jnp.sqrt(jnp.abs(trainable["w"]))), jnp.asarray(1.0)

  step = tl.make_train_step(loss_fn, optax.adam(0.1))
  batch = {"input_ids": np.ones((1, 4), np.int32), "attention_mask": np.ones((1, 4), np.int32),
           "loss_mask": np.ones((1, 4), np.int32)}
  w = {"w": jnp.asarray([0.0, 1.0])}
  new, state, loss = step(w, optax.adam(0.1).init(w), None, batch, None)
  assert not bool(step.finite) and np.isfinite(float(loss))
  np.testing.assert_array_equal(new["w"], [0.0, 1.0])
  assert int(state[0].count) == 0  # the optimizer state did not advance either
  w = {"w": jnp.asarray([4.0, 1.0])}
  new, _, _ = step(w, optax.adam(0.1).init(w), None, batch, None)
  assert bool(step.finite) and not np.array_equal(new["w"], [4.0, 1.0])


def test_run_folder_of_an_older_version_is_adopted(tmp_path):
  from jax_lora_app import outdir

  cfg = {"optim": {"lr": 0.01}, "lora": {"rank": 4, "rank_pattern": {}}, "out_dir": "a"}
  run = tmp_path / "old"
  (run / "adapter").mkdir(parents=True)
  (run / "config.yaml").write_text(yaml.safe_dump(cfg))
  (run / "adapter" / "adapter_config.json").write_text("{}")
  (run / "metrics.jsonl").write_text("")
  assert outdir.prepare(str(run), {**cfg, "out_dir": "b", "log_every": 5}) == []
  assert (run / OUTPUT_MARK).exists() and (run / "adapter" / OUTPUT_MARK).exists()
  assert outdir.prepare(str(run), {**cfg, "lora": {"rank": 8, "rank_pattern": {"q": 2}}}, "resume") == [
      "lora.rank 4 → 8", "lora.rank_pattern {} → {'q': 2}"]
  other = tmp_path / "other"
  (other / "adapter").mkdir(parents=True)
  (other / "config.yaml").write_text(yaml.safe_dump(cfg))
  (other / "adapter" / "README.md").write_text("mine")
  with pytest.raises(ValueError, match="is not a jax-lora training run"):
    outdir.prepare(str(other), cfg)
  assert not (other / OUTPUT_MARK).exists()


def test_key_added_since_a_run_counts_as_its_default():
  """A run folder written before ``lora.use_dora`` / ``lora.modules_to_save`` existed resumes without
  --resume-changed when the new config keeps their defaults; a non-default value is a change."""
  from jax_lora_app import config as tc
  from jax_lora_app import outdir

  new = tc.config_to_dict(tc.load_config(None, check_files=False))
  old = json.loads(json.dumps(new))
  del old["lora"]["use_dora"], old["lora"]["modules_to_save"]
  assert outdir.config_diff(old, new) == []
  dora = json.loads(json.dumps(new))
  dora["lora"]["use_dora"] = True
  assert outdir.config_diff(old, dora) == ["lora.use_dora False → True"]
  assert outdir.config_diff(new, {k: v for k, v in new.items() if k != "seed"}) == ["seed 0 → '(absent)'"]


def test_checkpoint_disk_full_is_an_oserror():
  class Full:
    directory = "/x/checkpoints"

    def save(self, *a, **k):
      try:
        raise OSError(errno.ENOSPC, "No space left on device")
      except OSError as e:
        raise RuntimeError("tensorstore write failed") from e

  with pytest.raises(OSError) as e:
    tl._save(Full(), 1, {"a": np.zeros(2)}, {"b": np.zeros(2)})
  assert e.value.errno == errno.ENOSPC and e.value.filename == "/x/checkpoints"
