"""`jax-lora merge/quantize/eval` never destroy a user's files, never write NaN, fail in one line."""

from __future__ import annotations

import errno
import json
import os
import shutil
import stat
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pytest

from jax_lora.files import OUTPUT_MARK, clean_stale
from jax_lora_app.cli import main
from test_peft import TEXTS, peft_adapter, tiny_model


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
  d = tmp_path_factory.mktemp("safety")
  base, adapter = str(d / "base"), str(d / "adapter")
  tiny_model(base, "llama", seed=3)
  peft_adapter(base, adapter, "llama", seed=4)
  data = d / "data.txt"
  data.write_text("\n".join(TEXTS) + "\n")
  return base, adapter, str(data)


def run(capsys, *argv):
  rc = main(list(argv))
  cap = capsys.readouterr()
  return rc, cap.out, cap.err


def snapshot(folder):
  """{relative path: bytes} of every file under ``folder``."""
  out = {}
  for root, _, files in os.walk(folder):
    for f in files:
      p = os.path.join(root, f)
      out[os.path.relpath(p, folder)] = open(p, "rb").read()
  return out


def one_line(rc, err, match):
  assert rc == 1 and len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
  assert match in err, err


def test_merge_writes_marked_0644_output_and_replaces_its_own(pair, capsys, tmp_path):
  base, adapter, _ = pair
  out = tmp_path / "m"
  old = os.umask(0o022)
  try:
    assert run(capsys, "merge", "--base", base, "--adapter", adapter, "--out", str(out))[0] == 0
  finally:
    os.umask(old)
  assert (out / OUTPUT_MARK).exists()
  for f in os.listdir(out):
    assert stat.S_IMODE(os.stat(out / f).st_mode) == 0o644, f
  assert stat.S_IMODE(os.stat(out).st_mode) == 0o755
  # the same command again replaces its own earlier output
  assert run(capsys, "merge", "--base", base, "--adapter", adapter, "--out", str(out))[0] == 0
  assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]


@pytest.mark.parametrize("where", ["base", "inside_base", "adapter", "parent_of_adapter"])
def test_merge_out_overlapping_an_input_is_refused(pair, capsys, where):
  base, adapter, _ = pair
  out = {"base": base, "inside_base": os.path.join(base, "merged"), "adapter": adapter,
         "parent_of_adapter": os.path.dirname(adapter)}[where]
  before = snapshot(os.path.dirname(base))
  for extra in ([], ["--overwrite"]):  # --overwrite never allows it
    rc, out_, err = run(capsys, "merge", "--base", base, "--adapter", adapter, "--out", out, *extra)
    one_line(rc, err, "the input")
  assert snapshot(os.path.dirname(base)) == before


def test_users_folder_survives_merge_and_quantize(pair, capsys, tmp_path):
  base, adapter, _ = pair
  out = tmp_path / "mine"
  out.mkdir()
  (out / "notes.txt").write_text("my notes")
  (out / "model.safetensors").write_bytes(b"my own model")
  before = snapshot(out)
  one_line(*run(capsys, "merge", "--base", base, "--adapter", adapter, "--out", str(out))[::2], "--overwrite")
  one_line(*run(capsys, "quantize", "--model", base, "--out", str(out))[::2], "did not write")
  assert snapshot(out) == before
  # a merge output is not a quantize output, and a file added to it makes it the user's
  m = tmp_path / "merged"
  assert run(capsys, "merge", "--base", base, "--adapter", adapter, "--out", str(m))[0] == 0
  one_line(*run(capsys, "quantize", "--model", base, "--out", str(m))[::2], "jax-lora quantize did not write")
  (m / "README.md").write_text("my model card")
  one_line(*run(capsys, "merge", "--base", base, "--adapter", adapter, "--out", str(m))[::2], "README.md")
  assert (m / "README.md").read_text() == "my model card"
  # with the explicit flag the folder is replaced
  assert run(capsys, "merge", "--base", base, "--adapter", adapter, "--out", str(out), "--overwrite")[0] == 0
  assert not (out / "notes.txt").exists() and (out / OUTPUT_MARK).exists()


def test_overwrite_refuses_a_folder_with_subfolders(pair, capsys, tmp_path):
  base, adapter, _ = pair
  run_dir = tmp_path / "run"
  (run_dir / "checkpoints" / "3").mkdir(parents=True)
  (run_dir / "config.yaml").write_text("x: 1\n")
  rc, _, err = run(capsys, "merge", "--base", base, "--adapter", adapter, "--out", str(run_dir), "--overwrite")
  one_line(rc, err, "holds folders (checkpoints)")
  assert (run_dir / "checkpoints" / "3").is_dir()


def _nan_adapter(adapter, dst):
  from safetensors.numpy import load_file, save_file

  shutil.copytree(adapter, dst)
  st = os.path.join(dst, "adapter_model.safetensors")
  t = load_file(st)
  k = sorted(t)[0]
  t[k] = np.full_like(t[k], np.nan)
  save_file(t, st, metadata={"format": "pt"})
  return str(dst)


def test_nan_adapter_merge_refused_eval_refused(pair, capsys, tmp_path):
  base, adapter, data = pair
  bad = _nan_adapter(adapter, tmp_path / "nan_adapter")
  out = tmp_path / "m"
  one_line(*run(capsys, "merge", "--base", base, "--adapter", bad, "--out", str(out))[::2], "non-finite")
  assert not out.exists() and [p.name for p in tmp_path.iterdir()] == ["nan_adapter"]
  rc, stdout, err = run(capsys, "eval", "--model", base, "--adapter", bad, "--data", data)
  one_line(rc, err, "not finite")
  assert stdout == ""


def test_eval_output_is_strict_json(pair, capsys):
  base, adapter, data = pair
  rc, stdout, _ = run(capsys, "eval", "--model", base, "--adapter", adapter, "--data", data)
  assert rc == 0
  json.loads(stdout, parse_constant=lambda c: pytest.fail(f"bare {c} in eval output"))


@pytest.mark.parametrize("damage", ["truncated", "garbage"])
@pytest.mark.parametrize("which", ["base", "adapter"])
def test_broken_safetensors_named(pair, capsys, tmp_path, damage, which):
  base, adapter, data = pair
  b, a = tmp_path / "base", tmp_path / "adapter"
  shutil.copytree(base, b)
  shutil.copytree(adapter, a)
  st = (b / "model.safetensors") if which == "base" else (a / "adapter_model.safetensors")
  raw = st.read_bytes()
  st.write_bytes(raw[: len(raw) // 2] if damage == "truncated" else b"\x07garbage" * 9)
  rc, _, err = run(capsys, "merge", "--base", str(b), "--adapter", str(a), "--out", str(tmp_path / "m"))
  one_line(rc, err, str(st))
  rc, _, err = run(capsys, "eval", "--model", str(b), "--adapter", str(a), "--data", data)
  one_line(rc, err, str(st))


def test_disk_full_and_ctrl_c_are_one_line(pair, capsys, tmp_path, monkeypatch):
  from jax_lora._src import merge_files

  base, adapter, _ = pair
  out = tmp_path / "m"

  def full(path, tensors):
    with open(path, "wb") as f:
      f.write(b"partial")
    raise OSError(errno.ENOSPC, "No space left on device", path)

  monkeypatch.setattr(merge_files, "save_tensors", full)
  one_line(*run(capsys, "merge", "--base", base, "--adapter", adapter, "--out", str(out))[::2], "no space left")
  assert list(tmp_path.iterdir()) == []  # neither the output nor a temporary folder

  def interrupt(path, tensors):
    raise KeyboardInterrupt

  monkeypatch.setattr(merge_files, "save_tensors", interrupt)
  rc, _, err = run(capsys, "merge", "--base", base, "--adapter", adapter, "--out", str(out))
  assert rc == 130 and len(err.strip().splitlines()) == 1 and "interrupted" in err
  assert list(tmp_path.iterdir()) == []


def test_stale_temporaries_cleaned_on_next_write(pair, capsys, tmp_path):
  base, adapter, _ = pair
  dead = tmp_path / ".m.tmp-99999999-abcd"  # a killed merge's leftover (pid gone)
  (dead / "x").mkdir(parents=True)
  old_file = tmp_path / ".m.tmp-12-zz.old"
  old_file.mkdir()
  fresh = tmp_path / f".m.tmp-{os.getpid()}-live"  # a write in progress (this process): kept
  fresh.mkdir()
  other = tmp_path / ".other.tmp-99999999-abcd"  # another target's: not ours to judge now
  other.mkdir()
  mine = tmp_path / "m.tmp-notes"  # a user's file that merely looks alike
  mine.write_text("keep")
  past = time.time() - 2 * 3600
  for p in (dead, dead / "x", old_file, other):
    os.utime(p, (past, past))
  assert run(capsys, "merge", "--base", base, "--adapter", adapter, "--out", str(tmp_path / "m"))[0] == 0
  assert not dead.exists() and not old_file.exists()
  assert fresh.exists() and other.exists() and mine.read_text() == "keep"
  # a recent leftover of an exited writer waits a minute; an hour-old one goes whatever its pid
  recent = tmp_path / ".k.tmp-99999999-q"
  recent.mkdir()
  assert clean_stale(str(tmp_path), "k") == []
  assert clean_stale(str(tmp_path), "k", now=time.time() + 61) == [str(recent)]
