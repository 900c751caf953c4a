"""`jax-lora train` / eval / merge / inspect on a tiny random T5 (encoder–decoder) folder."""

import json
import os

import jax
import numpy as np
import pytest
import torch
import transformers
from conftest import WORDS, TinyTask

import jax_lora as jl
from jax_lora.models import hf
from jax_lora_app import cli, loop


def _t5_config(vocab):
  return transformers.T5Config(vocab_size=vocab, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_decoder_layers=2,
                               num_heads=4, relative_attention_num_buckets=8, relative_attention_max_distance=20,
                               feed_forward_proj="gated-gelu", tie_word_embeddings=False, decoder_start_token_id=0,
                               pad_token_id=0, eos_token_id=1)


@pytest.fixture(scope="module")
def t5_task(tmp_path_factory):
  """A random FLAN-shaped (gated GELU, untied head) T5 folder with a word-level tokenizer
  (<pad> 0, </s> 1 as T5's), and copy-task prompt/completion splits."""
  from tokenizers import Tokenizer, models, pre_tokenizers

  root = tmp_path_factory.mktemp("t5")
  vocab = {w: i for i, w in enumerate(["<pad>", "</s>", "<unk>", "copy", ":", *WORDS])}
  tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
  tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
  folder = root / "model"
  transformers.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="</s>", pad_token="<pad>",
                                       unk_token="<unk>").save_pretrained(folder)
  torch.manual_seed(0)
  m = transformers.T5ForConditionalGeneration(_t5_config(len(vocab)))
  with torch.no_grad():  # transformers 5 ties at init; FLAN checkpoints carry their own head
    m.lm_head.weight = torch.nn.Parameter(torch.randn_like(m.shared.weight) * 32**-0.5)
  m.save_pretrained(folder)
  rng = np.random.default_rng(0)
  files = {}
  for split, n in [("train", 64), ("validation", 8), ("test", 4)]:
    files[split] = str(root / f"{split}.jsonl")
    with open(files[split], "w") as f:
      for _ in range(n):
        words = " ".join(rng.choice(WORDS, size=int(rng.integers(2, 5))))
        f.write(json.dumps({"prompt": f"copy {words} :", "completion": f" {words}"}) + "\n")
  return TinyTask(str(folder), files)


def _cfg(task, out_dir, **kw):
  return task.cfg(out_dir, **{"batch_size": 4, "steps": 4, "eval_every": 0, "checkpoint_every": 0,
                              "eval.num_test": 2, "eval.batch_size": 2, "eval.metrics": ["bleu"],
                              "optim.lr": 3e-2, "lora.targets": ["q", "v"], **kw})


def _batch(folder, n=3):
  """Encoder ids/mask, decoder inputs and labels of the first ``n`` validation rows (the app's data path)."""
  from jax_lora_app import data as td

  tok = transformers.AutoTokenizer.from_pretrained(folder)
  rows = td.load_rows(os.path.join(os.path.dirname(folder), "validation.jsonl"))[:n]
  b = td.eval_batches(td.tokenize_seq2seq_rows(tok, rows, 16, 0), batch_size=n, seq_len=16, pad_id=0)[0]
  return b


def _torch_logits(m, b):
  with torch.no_grad():
    return m(input_ids=torch.tensor(b["input_ids"]), attention_mask=torch.tensor(b["attention_mask"]),
             decoder_input_ids=torch.tensor(b["decoder_input_ids"]),
             decoder_attention_mask=torch.tensor(b["decoder_attention_mask"])).logits.numpy()


@pytest.fixture(scope="module")
def lora_run(t5_task, tmp_path_factory):
  out = tmp_path_factory.mktemp("lora")
  return out, loop.train(_cfg(t5_task, out))


def test_lora_run_lowers_loss_generates_and_exports_a_peft_seq2seq_adapter(t5_task, lora_run):
  import peft

  out, res = lora_run
  before, after = res["before"], res["after"]
  assert after["validation_loss"] < before["validation_loss"] - 0.1, (before, after)
  assert "bleu" in after and len(after["samples"]) == 2  # generation through generate_seq2seq
  with open(out / "adapter" / "adapter_config.json") as f:
    meta = json.load(f)
  assert (meta["task_type"], sorted(meta["target_modules"])) == ("SEQ_2_SEQ_LM", ["q", "v"])
  pm = peft.PeftModel.from_pretrained(transformers.T5ForConditionalGeneration.from_pretrained(t5_task.folder),
                                      str(out / "adapter")).eval()
  assert type(pm).__name__ == "PeftModelForSeq2SeqLM"
  model, params, config = hf.load_hf(t5_task.folder)
  adapted = jl.load_peft(str(out / "adapter"), params["params"], config.model_type)
  b = _batch(t5_task.folder)
  ours = np.asarray(jax.jit(lambda p: jl.linen.apply(model, p, b["input_ids"], b["attention_mask"],
                                                     b["decoder_input_ids"], b["decoder_attention_mask"])[0])(adapted))
  ref = _torch_logits(pm, b)
  valid = b["decoder_attention_mask"].astype(bool)
  np.testing.assert_allclose(ours[valid], ref[valid], atol=1e-4, rtol=0)
  # the training loss is transformers' seq2seq loss (labels, -100 on padding) of the same rows
  with torch.no_grad():
    ref_loss = pm(input_ids=torch.tensor(b["input_ids"]), attention_mask=torch.tensor(b["attention_mask"]),
                  labels=torch.tensor(np.where(b["loss_mask"] > 0, b["labels"], -100).astype(np.int64))).loss.item()
  s, n = loop.make_loss_fn(model, "lora")(*jl.split(adapted), {k: np.asarray(v) for k, v in b.items()}, None)
  assert abs(float(s / n) - ref_loss) < 1e-4
  # jax-lora eval (prompt/completion jsonl) and merge (files only) on the exported adapter
  ev = cli.evaluate(t5_task.folder, t5_task.files["validation"], adapter=str(out / "adapter"), batch_size=4)
  assert abs(ev["loss"] - after["validation_loss"]) < 1e-4 and ev["texts"] == 8
  cli.merge(t5_task.folder, str(out / "adapter"), str(out / "merged"))
  merged = transformers.T5ForConditionalGeneration.from_pretrained(str(out / "merged")).eval()
  np.testing.assert_allclose(_torch_logits(merged, b)[valid], ref[valid], atol=1e-4, rtol=0)


def test_qlora_and_full_runs_export(t5_task, tmp_path):
  q = loop.train(_cfg(t5_task, tmp_path / "q", method="qlora", steps=2, **{"eval.num_test": 0}))
  assert np.isfinite(q["after"]["validation_loss"]) and os.path.isfile(tmp_path / "q" / "adapter" / "adapter_model.safetensors")
  full = loop.train(_cfg(t5_task, tmp_path / "f", method="full", steps=2, **{"eval.num_test": 0, "optim.lr": 1e-3}))
  assert full["after"]["validation_loss"] < full["before"]["validation_loss"]
  back = transformers.T5ForConditionalGeneration.from_pretrained(str(tmp_path / "f" / "model")).eval()
  assert back.lm_head.weight is not back.shared.weight  # the untied head stays untied
  ev = cli.evaluate(str(tmp_path / "f" / "model"), t5_task.files["validation"], batch_size=8)
  assert abs(ev["loss"] - full["after"]["validation_loss"]) < 1e-4


def test_seq2seq_refusals(t5_task, tmp_path):
  with pytest.raises(ValueError, match="data.packing is not supported for encoder–decoder"):
    loop.train(_cfg(t5_task, tmp_path / "p", **{"data.packing": True}))
  txt = tmp_path / "t.txt"
  txt.write_text("copy w1 w2\n")
  with pytest.raises(cli.CliError, match="prompt.*completion"):
    cli.evaluate(t5_task.folder, str(txt))
  text_rows = tmp_path / "text.jsonl"
  text_rows.write_text(json.dumps({"text": "copy w1"}) + "\n")
  with pytest.raises(cli.CliError, match="not 'text' rows"):
    cli.evaluate(t5_task.folder, str(text_rows))


def test_inspect_config_only_folder_equals_weights_folder(t5_task, tmp_path):
  """A config.json alone (no safetensors) is sized with jax.eval_shape; the weights folder's untied head
  (transformers 5 wrote tie_word_embeddings=true) counts once, as in the checkpoint."""
  with open(os.path.join(t5_task.folder, "config.json")) as f:
    raw = json.load(f)
  (tmp_path / "config.json").write_text(json.dumps({**raw, "tie_word_embeddings": False}))
  with_weights = cli.inspect_model(t5_task.folder)
  config_only = cli.inspect_model(str(tmp_path))
  n = sum(p.numel() for p in transformers.T5ForConditionalGeneration.from_pretrained(t5_task.folder).parameters())
  assert (with_weights.total, with_weights.trainable) == (config_only.total, config_only.trainable)
  assert with_weights.total - with_weights.trainable == n and with_weights.trainable > 0  # base + LoRA
