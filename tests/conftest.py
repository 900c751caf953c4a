"""Test setup: CPU only, 8 fake devices for sharding tests, no hub access; shared fixtures."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import jax  # noqa: E402

jax.config.update("jax_num_cpu_devices", 8)

import json  # noqa: E402
from typing import NamedTuple  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402


class TinyTask(NamedTuple):
  """A random 2-layer Llama folder and copy-task jsonl splits (see the ``tiny`` fixture)."""

  folder: str
  files: dict

  def cfg(self, out_dir, **kw):
    """A validated train config on this task, with dotted-key overrides."""
    from jax_lora_app import config

    folder, files = self
    raw = {"model": folder, "data": {"train": files["train"], "validation": files["validation"], "test": files["test"]},
           "lora": {"rank": 4, "alpha": 8}, "optim": {"lr": 1e-2, "warmup_steps": 2}, "batch_size": 8, "seq_len": 16,
           "steps": 6, "eval_every": 3, "log_every": 3, "out_dir": str(out_dir), "checkpoint_every": 3,
           "eval": {"max_new_tokens": 4, "num_test": 4, "metrics": ["bleu", "rouge"], "batch_size": 4}}
    for k, v in kw.items():
      node = raw
      *parents, last = k.split(".")
      for p in parents:
        node = node.setdefault(p, {})
      node[last] = v
    return config.config_from_dict(raw)


WORDS = [f"w{i}" for i in range(40)]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
  """A random 2-layer Llama folder with a word-level tokenizer, and copy-task jsonl splits."""
  import torch
  import transformers
  from tokenizers import Tokenizer, models, pre_tokenizers

  root = tmp_path_factory.mktemp("tiny")
  vocab = {w: i for i, w in enumerate(["<pad>", "</s>", "<unk>", "copy", ":", *WORDS])}
  tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
  tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
  hf_tok = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="</s>", pad_token="<pad>", unk_token="<unk>")
  folder = root / "model"
  hf_tok.save_pretrained(folder)
  torch.manual_seed(0)
  cfg = transformers.LlamaConfig(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                 tie_word_embeddings=True, eos_token_id=1, pad_token_id=0, bos_token_id=1)
  transformers.LlamaForCausalLM(cfg).save_pretrained(folder)
  rng = np.random.default_rng(0)
  files = {}
  for split, n in [("train", 256), ("validation", 16), ("test", 4)]:
    path = root / f"{split}.jsonl"
    with open(path, "w") as f:
      for _ in range(n):
        words = " ".join(rng.choice(WORDS, size=int(rng.integers(2, 5))))
        f.write(json.dumps({"prompt": f"copy {words} :", "completion": f" {words}"}) + "\n")
    files[split] = str(path)
  return TinyTask(str(folder), files)


