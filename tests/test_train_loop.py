"""train.loop on a tiny random Llama saved by transformers: learning, exact resume, methods, CLI."""

import json
import os

import numpy as np
import pytest

from jax_lora_app import config as tc
from jax_lora_app import loop as tl



def _adapter(out_dir):
  from safetensors.numpy import load_file

  return load_file(os.path.join(out_dir, "adapter", "adapter_model.safetensors"))


def test_lora_learns_and_resumes_exactly(tiny, tmp_path):
  res = tl.train(tiny.cfg(tmp_path / "a", steps=6))
  assert res["after"]["validation_loss"] < res["before"]["validation_loss"] - 0.1
  assert {"bleu", "rouge1", "rouge2", "rougeL"} <= set(res["after"])
  events = [json.loads(l)["event"] for l in open(tmp_path / "a" / "metrics.jsonl")]
  assert events.count("validation") == 2 and events.count("train") == 2
  # Interrupted after step 3: drop the step-6 checkpoint and outputs, train again, same adapter.
  import shutil

  shutil.copytree(tmp_path / "a", tmp_path / "b")
  shutil.rmtree(tmp_path / "b" / "checkpoints" / "6")
  shutil.rmtree(tmp_path / "b" / "adapter")
  res_b = tl.train(tiny.cfg(tmp_path / "b", steps=6))
  assert res_b["steps_run"] == 3
  a, b = _adapter(tmp_path / "a"), _adapter(tmp_path / "b")
  assert a.keys() == b.keys() and len(a) == 2 * 7 * 2
  for k in a:
    np.testing.assert_array_equal(a[k], b[k])


def test_gradient_accumulation_matches_big_batch(tiny, tmp_path):
  """2 micro-batches of 4 with MultiSteps = the mean of the two micro-batch gradients (AdamW step 1)."""
  import jax
  import jax.numpy as jnp
  import optax

  import jax_lora as jl
  from jax_lora_app import data as td

  cfg = tiny.cfg(tmp_path, **{"optim.grad_accum": 2, "optim.warmup_steps": 0, "optim.schedule": "constant"})
  model, params, _, tok, _ = tl.load_model(cfg.model, "float32")
  tr, fr = jl.split(jl.init_lora(params, cfg.lora, jax.random.key(0)))
  tr = jax.tree.map(lambda x: x + 0.01, tr)  # nonzero B so A gets gradients too
  ex = td.tokenize_rows(tok, td.load_rows(tiny[1]["train"])[:8], 16)
  b1, b2 = td.pad_batch(ex[:4], 16, 0), td.pad_batch(ex[4:], 16, 0)
  loss_fn = tl.make_loss_fn(model, "lora")
  tx = tl.build_optimizer(cfg.optim, 10)
  step = tl.make_train_step(loss_fn, tx)
  t1, s1 = jax.tree.map(jnp.copy, tr), tx.init(tr)
  t1, s1, _ = step(t1, s1, fr, b1, None)
  t1, s1, _ = step(t1, s1, fr, b2, None)

  def mean_loss(t, b):
    s, n = loss_fn(t, fr, b, None)
    return s / n

  g = jax.tree.map(lambda x, y: (x + y) / 2, jax.grad(mean_loss)(tr, b1), jax.grad(mean_loss)(tr, b2))
  ref_tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(cfg.optim.lr, weight_decay=0.0))
  upd, _ = ref_tx.update(g, ref_tx.init(tr), tr)
  ref = optax.apply_updates(tr, upd)
  for x, y in zip(jax.tree.leaves(t1), jax.tree.leaves(ref)):
    np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6)


def test_packed_batch_loss_equals_separate_examples(tiny):
  """The training loss of a packed batch = the loss of the same examples padded one per row."""
  import jax

  import jax_lora as jl
  from jax_lora_app import data as td

  cfg = tiny.cfg("unused")
  model, params, _, tok, _ = tl.load_model(cfg.model, "float32")
  tr, fr = jl.split(jl.init_lora(params, cfg.lora, jax.random.key(0)))
  tr = jax.tree.map(lambda x: x + 0.05, tr)  # B != 0: the adapter changes the loss too
  ex = td.tokenize_rows(tok, td.load_rows(tiny[1]["train"])[:64], 16)
  batcher = td.Batcher(ex, batch_size=4, seq_len=32, pad_id=0, seed=0, packing=True)
  packed = batcher.batch_at(0)
  members = [ex[i] for row in batcher._epoch(0)[0] for i in row]
  assert len(members) > 4 and packed["attention_mask"].max() > 1  # rows really hold several examples
  loss_fn = tl.make_loss_fn(model, "lora")
  s_packed, n_packed = loss_fn(tr, fr, tl.with_loss_targets(packed), None)
  s_alone, n_alone = loss_fn(tr, fr, td.pad_batch(members, 16, 0), None)
  assert float(n_packed) == float(n_alone)
  np.testing.assert_allclose(float(s_packed), float(s_alone), rtol=1e-5)


def test_schedule_warmup_then_cosine():
  o = tc.OptimConfig(lr=1.0, warmup_steps=4, schedule="cosine", end_lr_ratio=0.1)
  s = tl.lr_schedule(o, 14)
  assert [float(s(i)) for i in range(5)] == pytest.approx([0, 0.25, 0.5, 0.75, 1.0])
  assert float(s(9)) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + np.cos(np.pi * 5 / 10)))
  assert float(s(14)) == pytest.approx(0.1)


@pytest.mark.parametrize("method", ["qlora", "full"])
def test_other_methods_run(tiny, tmp_path, method):
  extra = {"quant.block_size": 32} if method == "qlora" else {}
  res = tl.train(tiny.cfg(tmp_path, method=method, steps=3, **{"eval.num_test": 0}, **extra))
  assert np.isfinite(res["after"]["validation_loss"])
  assert os.path.isdir(tmp_path / ("model" if method == "full" else "adapter"))


def test_loss_chunk_run_matches_unchunked(tiny, tmp_path):
  """loss_chunk (LM head + loss in chunks of 8 tokens) trains to the same weights as the default path."""
  kw = {"steps": 1, "eval_every": 0, "checkpoint_every": 0, "eval.num_test": 0}
  plain = tl.train(tiny.cfg(tmp_path / "plain", **kw))
  chunked = tl.train(tiny.cfg(tmp_path / "chunked", loss_chunk=8, **kw))
  assert chunked["before"]["validation_loss"] == pytest.approx(plain["before"]["validation_loss"], rel=1e-5)
  assert chunked["after"]["validation_loss"] == pytest.approx(plain["after"]["validation_loss"], rel=1e-4)


def test_remat_and_offload_train_like_the_default(tiny, tmp_path):
  """remat=full + offload=optimizer+base change where things live, not the math (checkpoint included)."""
  kw = {"method": "qlora", "quant.block_size": 32, "steps": 3, "eval.num_test": 0, "attention": "blockwise"}
  ref = tl.train(tiny.cfg(tmp_path / "ref", **kw))
  got = tl.train(tiny.cfg(tmp_path / "mem", remat="full", offload="optimizer+base", **kw))
  np.testing.assert_allclose(got["after"]["validation_loss"], ref["after"]["validation_loss"], rtol=1e-4)
  with pytest.raises(ValueError, match="'remat' must be one of none, full, dots, offload"):
    tiny.cfg(tmp_path, remat="all")
  with pytest.raises(ValueError, match="'optimizer\\+base' needs method lora or qlora"):
    tiny.cfg(tmp_path, method="full", offload="optimizer+base")


def test_cli_errors_and_dry_run(tiny, tmp_path, capsys):
  from jax_lora_app.run import main

  assert main([os.path.join(os.path.dirname(__file__), "..", "configs", "default.yaml"), "optim.lrr=1"]) == 1
  assert "unknown config key 'optim.lrr' (did you mean 'optim.lr'?)" in capsys.readouterr().err
  assert main(["--dry-run", "lora.rank=4"]) == 0
  assert "rank: 4" in capsys.readouterr().out
