"""SIGKILL mid-run, re-run: resumes from the newest complete checkpoint and ends at the same loss."""

import json
import os
import signal
import subprocess
import sys
import time

import yaml

from jax_lora_app import config as tc
from jax_lora_app import loop as tl

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _final_loss(out_dir):
  rows = [json.loads(l) for l in open(os.path.join(out_dir, "metrics.jsonl"))]
  return [r for r in rows if r["event"] == "train"][-1]["loss"], [r for r in rows if r["event"] == "after"][-1]


def test_sigkill_then_resume_matches_uninterrupted(tiny, tmp_path):
  kw = dict(steps=30, log_every=5, eval_every=0, checkpoint_every=2, **{"eval.num_test": 0})
  ref_dir, run_dir = tmp_path / "ref", tmp_path / "killed"
  tl.train(tiny.cfg(ref_dir, **kw))
  cfg = tiny.cfg(run_dir, **kw)
  path = tmp_path / "cfg.yaml"
  path.write_text(yaml.safe_dump(tc.config_to_dict(cfg)))
  env = dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS="cpu")
  proc = subprocess.Popen([sys.executable, "-m", "train", str(path)], cwd=REPO, env=env,
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  ckpt = run_dir / "checkpoints"
  try:
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
      done = [d for d in os.listdir(ckpt) if d.isdigit()] if ckpt.exists() else []
      if done:
        break
      time.sleep(0.05)
    assert proc.poll() is None, "the run finished before it could be killed; make it longer"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
  finally:
    if proc.poll() is None:
      proc.kill()
  assert proc.returncode == -signal.SIGKILL
  killed_at = max(int(d) for d in os.listdir(ckpt) if d.isdigit())
  assert killed_at < 30
  res = tl.train(cfg)  # the same command again: resumes
  assert res["steps_run"] < 30
  loss, after = _final_loss(run_dir)
  ref_loss, ref_after = _final_loss(ref_dir)
  assert loss == ref_loss
  assert abs(after["val_loss"] - ref_after["val_loss"]) <= 1e-6
