"""The jax-lora command line against PEFT/transformers references (in-process, plus one real subprocess)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pytest

import torch
import transformers
import peft

from jax_lora_app.cli import main  # noqa: E402
from test_peft import TEXTS, peft_adapter, tiny_model, torch_loss  # noqa: E402


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
  d = tmp_path_factory.mktemp("cli")
  out = {}
  for kind in ("llama", "gpt2"):
    base = str(d / f"{kind}_base")
    tiny_model(base, kind, seed=3)
    adapter = str(d / f"{kind}_adapter")
    extra = dict(rank_pattern={"q_proj": 2}, alpha_pattern={"v_proj": 5.0}) if kind == "llama" else dict(use_rslora=True)
    pm = peft_adapter(base, adapter, kind, seed=4, **extra)
    out[kind] = (base, adapter, pm)
  data = d / "data.txt"
  data.write_text("\n".join(TEXTS) + "\n")
  jsonl = d / "data.jsonl"
  jsonl.write_text("\n".join(json.dumps({"text": t, "id": i}) for i, t in enumerate(TEXTS)) + "\n")
  out["txt"], out["jsonl"] = str(data), str(jsonl)
  return out


def run(capsys, *argv):
  rc = main(list(argv))
  cap = capsys.readouterr()
  return rc, cap.out, cap.err


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_eval_with_adapter_matches_peft(folders, capsys, kind):
  base, adapter, pm = folders[kind]
  rc, out, err = run(capsys, "eval", "--model", base, "--adapter", adapter, "--data", folders["txt"], "--batch-size", "2")
  assert rc == 0, err
  got = json.loads(out)
  want = torch_loss(pm, base, TEXTS)
  tok = transformers.AutoTokenizer.from_pretrained(base)
  assert got["tokens"] == sum(len(tok(t)["input_ids"]) - 1 for t in TEXTS)
  assert got["loss"] == pytest.approx(want, rel=1e-5)
  assert got["perplexity"] == pytest.approx(np.exp(want), rel=1e-5)


def test_eval_jsonl_base_model(folders, capsys):
  base, _, _ = folders["llama"]
  rc, out, err = run(capsys, "eval", "--model", base, "--data", folders["jsonl"])
  assert rc == 0, err
  ref = transformers.AutoModelForCausalLM.from_pretrained(base).eval()
  assert json.loads(out)["loss"] == pytest.approx(torch_loss(ref, base, TEXTS), rel=1e-5)


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_merge_equals_peft_merge_and_unload(folders, capsys, tmp_path, kind):
  base, adapter, _ = folders[kind]
  out = str(tmp_path / "merged")
  rc, _, err = run(capsys, "merge", "--base", base, "--adapter", adapter, "--out", out)
  assert rc == 0, err
  assert os.path.exists(os.path.join(out, "tokenizer.json"))
  pm = peft.PeftModel.from_pretrained(transformers.AutoModelForCausalLM.from_pretrained(base), adapter)
  want = pm.merge_and_unload().state_dict()
  got_model = transformers.AutoModelForCausalLM.from_pretrained(out)
  got = got_model.state_dict()
  assert set(got) == set(want)
  for k in want:
    np.testing.assert_allclose(got[k].numpy(), want[k].numpy(), atol=1e-6, rtol=0, err_msg=k)
  plain = transformers.AutoModelForCausalLM.from_pretrained(base).state_dict()
  assert max(float((want[k] - plain[k]).abs().max()) for k in want) > 1e-3  # the merge changed weights


def test_merge_bfloat16(folders, capsys, tmp_path):
  base, adapter, _ = folders["llama"]
  out = str(tmp_path / "bf16")
  rc, _, err = run(capsys, "merge", "--base", base, "--adapter", adapter, "--out", out, "--dtype", "bfloat16")
  assert rc == 0, err
  m = transformers.AutoModelForCausalLM.from_pretrained(out)
  assert m.config.dtype == torch.bfloat16 or str(m.config.dtype).endswith("bfloat16")
  from safetensors import safe_open
  with safe_open(os.path.join(out, "model.safetensors"), "pt") as f:
    assert all(f.get_tensor(k).dtype == torch.bfloat16 for k in f.keys())


def test_inspect_counts_match_peft(folders, capsys, tmp_path):
  base, _, _ = folders["llama"]
  cfg = tmp_path / "c.yaml"
  cfg.write_text("lora:\n  rank: 4\n  alpha: 8\n  targets: [q_proj, '.*/v_proj/kernel']\n")
  rc, out, err = run(capsys, "inspect", "--model", base, "--config", str(cfg))
  assert rc == 0, err
  pm = peft.get_peft_model(transformers.AutoModelForCausalLM.from_pretrained(base),
                           peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                           ))
  trainable, total = pm.get_nb_trainable_parameters()
  assert f"trainable params: {trainable:,} || all params: {total:,}" in out
  assert out.count("q_proj/kernel") == 2 and out.count("v_proj/kernel") == 2


@pytest.mark.parametrize("argv,match", [
    (["eval", "--model", "{base}", "--data", "/nonexistent.txt"], "does not exist"),
    (["merge", "--base", "{base}", "--adapter", "{other}", "--out", "{tmp}/m"], "not in the base|no '<module>.weight'|do not fit"),
    (["inspect", "--model", "{tmp}"], "config.json"),
    (["eval", "--model", "{base}", "--data", "{tmp}/x.csv"], ".txt"),
    (["inspect", "--model", "{base}", "--config", "{tmp}/bad.yaml"], "error"),
    (["merge", "--base", "{tmp}/badbase", "--adapter", "{other}", "--out", "{tmp}/m"], "error"),
])
def test_errors_are_one_line(folders, capsys, tmp_path, argv, match):
  base = folders["llama"][0]
  other = folders["gpt2"][1]
  (tmp_path / "x.csv").write_text("a\n")
  (tmp_path / "bad.yaml").write_text("lora: [unclosed\n")
  (tmp_path / "badbase").mkdir()
  (tmp_path / "badbase" / "config.json").write_text("{}")
  (tmp_path / "badbase" / "model.safetensors").write_bytes(b"not safetensors")
  argv = [a.format(base=base, other=other, tmp=tmp_path) for a in argv]
  rc, _, err = run(capsys, *argv)
  assert rc == 1
  assert len(err.strip().splitlines()) == 1
  import re
  assert re.search(match, err), err
  assert not os.path.exists(tmp_path / "m")


def test_bad_flag_exits_2(capsys):
  with pytest.raises(SystemExit) as e:
    main(["merge", "--base", "x"])
  assert e.value.code == 2
  assert len(capsys.readouterr().err.strip().splitlines()) == 1


def test_merge_is_atomic_on_failure(folders, capsys, tmp_path):
  base = folders["llama"][0]
  out = tmp_path / "keep"
  out.mkdir()
  (out / "marker").write_text("old")
  bad = tmp_path / "bad_adapter"
  shutil.copytree(folders["llama"][1], bad)
  (bad / "adapter_model.safetensors").write_bytes(b"garbage")
  rc, _, _ = run(capsys, "merge", "--base", base, "--adapter", str(bad), "--out", str(out))
  assert rc == 1 and (out / "marker").read_text() == "old"
  assert [p.name for p in tmp_path.iterdir() if ".tmp-" in p.name] == []


def test_console_script(folders, tmp_path):
  exe = shutil.which("jax-lora") or os.path.join(os.path.dirname(sys.executable), "jax-lora")
  if not os.path.exists(exe):
    pytest.skip("jax-lora console script not installed (pip install -e .)")
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "HF_HUB_OFFLINE": "1"}
  h = subprocess.run([exe, "--help"], capture_output=True, text=True, env=env, timeout=120)
  assert h.returncode == 0 and all(c in h.stdout for c in ("merge", "eval", "quantize", "inspect", "train"))
  base, adapter, _ = folders["gpt2"]
  out = str(tmp_path / "m")
  r = subprocess.run([exe, "merge", "--base", base, "--adapter", adapter, "--out", out], capture_output=True,
                     text=True, env=env, timeout=300)
  assert r.returncode == 0, r.stderr
  assert os.path.exists(os.path.join(out, "model.safetensors"))
  bad = subprocess.run([exe, "merge", "--base", base, "--adapter", folders["llama"][1], "--out", out + "2"],
                       capture_output=True, text=True, env=env, timeout=300)
  assert bad.returncode == 1 and len(bad.stderr.strip().splitlines()) == 1


def test_merge_gpt2_adapter_without_fan_in_fan_out_flag(folders, capsys, tmp_path):
  """PEFT forces fan_in_fan_out for Conv1D whatever the config says; so does merge."""
  base, adapter, _ = folders["gpt2"]
  edited = tmp_path / "adapter"
  shutil.copytree(adapter, edited)
  cfg = json.loads((edited / "adapter_config.json").read_text())
  cfg["fan_in_fan_out"] = False
  (edited / "adapter_config.json").write_text(json.dumps(cfg))
  outs = []
  for i, a in enumerate([adapter, str(edited)]):
    out = str(tmp_path / f"m{i}")
    assert run(capsys, "merge", "--base", base, "--adapter", a, "--out", out)[0] == 0
    outs.append(transformers.AutoModelForCausalLM.from_pretrained(out).state_dict())
  for k in outs[0]:
    assert torch.equal(outs[0][k], outs[1][k]), k


@pytest.fixture(scope="module")
def wide_llama(tmp_path_factory):
  """Tiny Llama whose linear input dims are multiples of the NF4 block (64)."""
  base = str(tmp_path_factory.mktemp("wide") / "base")
  tiny_model(base, "llama", seed=5, hidden_size=64, intermediate_size=128)
  return base


@pytest.mark.parametrize("double_quant", [False, True])
def test_quantize_matches_bitsandbytes(wide_llama, capsys, tmp_path, double_quant):
  import bitsandbytes.functional as bnbf
  from safetensors.torch import load_file
  base = wide_llama
  out = tmp_path / "q"
  rc, _, err = run(capsys, "quantize", "--model", base, "--out", str(out), *(["--double-quant"] if double_quant else []))
  assert rc == 0, err
  got, orig = load_file(str(out / "model.safetensors")), load_file(os.path.join(base, "model.safetensors"))
  linear = [k for k in orig if k.endswith("proj.weight")]
  assert len(linear) == 14
  for k in orig:
    if k not in linear:
      assert torch.equal(got[k], orig[k]), k  # other tensors as they were
      continue
    assert got[k].dtype == torch.uint8
    qs = bnbf.QuantState.from_dict({kk[len(k) + 1:]: v for kk, v in got.items() if kk.startswith(k + ".")}, "cpu")
    assert (qs.blocksize, qs.quant_type, qs.nested) == (64, "nf4", double_quant)
    ours = bnbf.dequantize_4bit(got[k], qs)
    ref_packed, ref_qs = bnbf.quantize_4bit(orig[k], blocksize=64, quant_type="nf4", compress_statistics=double_quant)
    ref = bnbf.dequantize_4bit(ref_packed, ref_qs)
    assert ours.shape == orig[k].shape
    np.testing.assert_allclose(ours.numpy(), ref.numpy(), atol=1e-6, err_msg=k)
  assert json.loads((out / "config.json").read_text())["quantization_config"]["bnb_4bit_quant_type"] == "nf4"
  # transformers + bitsandbytes load our folder on CPU and agree with their own NF4 quantization
  ids = torch.tensor([[1, 5, 9, 2, 7, 3]])
  ours_model = transformers.AutoModelForCausalLM.from_pretrained(str(out), device_map="cpu")
  ref_model = transformers.AutoModelForCausalLM.from_pretrained(base, device_map="cpu", quantization_config=transformers.BitsAndBytesConfig(
      load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=double_quant, bnb_4bit_compute_dtype=torch.float32))
  with torch.no_grad():
    np.testing.assert_allclose(ours_model(ids).logits.numpy(), ref_model(ids).logits.numpy(), atol=1e-5)


def test_train_and_compare_dispatch_to_the_app(monkeypatch, capsys):
  from jax_lora_app import compare, run as train_run

  seen = []
  monkeypatch.setattr(train_run, "main", lambda argv: seen.append(("train", argv)) or 3)
  monkeypatch.setattr(compare, "main", lambda argv: seen.append(("compare", argv)) or 0)
  assert main(["train", "cfg.yaml", "optim.lr=1e-3", "--dry-run"]) == 3
  assert main(["compare", "plan.yaml", "--only", "lora"]) == 0
  assert seen == [("train", ["cfg.yaml", "optim.lr=1e-3", "--dry-run"]), ("compare", ["plan.yaml", "--only", "lora"])]


def test_library_never_imports_the_app():
  code = ("import sys, jax_lora, jax_lora.models, jax_lora.peft, jax_lora.bnb, jax_lora.adapters, jax_lora.sharding; "
          "bad = [m for m in sys.modules if m.split('.')[0] in ('train', 'jax_lora_app', 'transformers', 'torch')]; "
          "assert not bad, bad")
  subprocess.run([sys.executable, "-c", code], check=True, env={**os.environ, "JAX_PLATFORMS": "cpu"})


def test_quantize_gpt2_conv1d_loads_in_transformers(capsys, tmp_path):
  base, out = str(tmp_path / "g"), str(tmp_path / "q")
  tiny_model(base, "gpt2", seed=6, n_embd=64)
  assert run(capsys, "quantize", "--model", base, "--out", out)[0] == 0
  ids = torch.tensor([[1, 5, 9, 2, 7, 3]])
  ours = transformers.AutoModelForCausalLM.from_pretrained(out, device_map="cpu")
  ref = transformers.AutoModelForCausalLM.from_pretrained(base, device_map="cpu", quantization_config=transformers.BitsAndBytesConfig(
      load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32))
  with torch.no_grad():
    np.testing.assert_allclose(ours(ids).logits.numpy(), ref(ids).logits.numpy(), atol=1e-5)
