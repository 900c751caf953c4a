"""One model resolver for every command: HF folders, .gguf files and shipped shortcuts."""

from __future__ import annotations

import json
import math
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import jax.numpy as jnp
import numpy as np
import pytest

import gguf
import torch
import transformers

from jax_lora.models import SHIPPED, load_pretrained, resolve_model
from jax_lora.models.gguf import unpermute_qk
from jax_lora.models.shipped import smollm2_gguf_path
from jax_lora_app.cli import main

TEXTS = ["The cat sat on the mat.", "Translate German to English.\nGerman: Guten Morgen.\nEnglish: Good morning."]
_COPY = ("tokenizer.ggml.model", "tokenizer.ggml.pre", "tokenizer.ggml.tokens", "tokenizer.ggml.token_type",
         "tokenizer.ggml.merges", "tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id",
         "tokenizer.ggml.padding_token_id", "tokenizer.ggml.add_bos_token")


def _permute_qk(w: np.ndarray, n_heads: int) -> np.ndarray:
  """llama.cpp's Q/K row order (inverse of unpermute_qk)."""
  d_out, d_in = w.shape
  return w.reshape(n_heads, 2, d_out // n_heads // 2, d_in).swapaxes(1, 2).reshape(d_out, d_in)


def write_tiny_gguf(path: str) -> transformers.LlamaForCausalLM:
  """A tiny random Llama as an F32 GGUF with SmolLM2's tokenizer (its 49,152 tokens); returns the torch model."""
  src = gguf.GGUFReader(smollm2_gguf_path())
  torch.manual_seed(0)
  m = transformers.LlamaForCausalLM(transformers.LlamaConfig(
      vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
      num_key_value_heads=2, max_position_embeddings=128, rope_theta=10000.0, rms_norm_eps=1e-5,
      tie_word_embeddings=True, bos_token_id=1, eos_token_id=2)).eval()
  with torch.no_grad():
    for p in m.parameters():
      p.add_(0.3 * torch.randn_like(p))
  w = gguf.GGUFWriter(path, "llama")
  w.add_block_count(2)
  w.add_context_length(128)
  w.add_embedding_length(64)
  w.add_feed_forward_length(128)
  w.add_head_count(4)
  w.add_head_count_kv(2)
  w.add_rope_freq_base(10000.0)
  w.add_layer_norm_rms_eps(1e-5)
  w.add_rope_dimension_count(16)
  for key in _COPY:
    f = src.fields[key]
    val = f.contents()
    kind = f.types[0]
    if kind == gguf.GGUFValueType.ARRAY:
      w.add_array(key, val)
    else:
      w.add_key_value(key, val, kind)
  names = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm", "self_attn.q_proj": "attn_q",
           "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
           "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}
  for key, t in m.state_dict().items():
    a = t.numpy().astype(np.float32)
    if key == "lm_head.weight":
      continue
    if key == "model.embed_tokens.weight":
      name = "token_embd.weight"
    elif key == "model.norm.weight":
      name = "output_norm.weight"
    else:
      _, _, i, rest = key.split(".", 3)
      mod = rest.rsplit(".", 1)[0]
      name = f"blk.{i}.{names[mod]}.weight"
      if mod == "self_attn.q_proj":
        a = _permute_qk(a, 4)
      elif mod == "self_attn.k_proj":
        a = _permute_qk(a, 2)
    w.add_tensor(name, a)
  w.write_header_to_file()
  w.write_kv_data_to_file()
  w.write_tensors_to_file()
  w.close()
  return m


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
  d = tmp_path_factory.mktemp("gguf")
  path = str(d / "tiny-llama.gguf")
  m = write_tiny_gguf(path)
  data = d / "data.jsonl"
  data.write_text("\n".join(json.dumps({"text": t}) for t in TEXTS) + "\n")
  return path, m, str(data)


@pytest.fixture
def cache(tmp_path, monkeypatch):
  monkeypatch.setenv("JAX_LORA_CACHE", str(tmp_path / "cache"))
  return str(tmp_path / "cache")


def run(capsys, *argv):
  rc = main(list(argv))
  cap = capsys.readouterr()
  return rc, cap.out, cap.err


def test_permute_is_the_inverse_of_unpermute():
  w = np.arange(8 * 3, dtype=np.float32).reshape(8, 3)
  np.testing.assert_array_equal(unpermute_qk(_permute_qk(w, 2), 2), w)


def test_gguf_loads_like_transformers(tiny_gguf, cache):
  """load_pretrained(<file>.gguf): the weights, logits and tokenizer transformers gets from the same file."""
  path, m, _ = tiny_gguf
  model, variables, config, tok = load_pretrained(path)
  ref = transformers.AutoModelForCausalLM.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path)).eval()
  ref_tok = transformers.AutoTokenizer.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path))
  ids = np.asarray([ref_tok(TEXTS[1])["input_ids"]])
  assert tok(TEXTS[1])["input_ids"] == ref_tok(TEXTS[1])["input_ids"]
  ours = np.asarray(model.apply(variables, jnp.asarray(ids))[0])
  with torch.no_grad():
    want = ref(torch.tensor(ids)).logits.numpy()
    orig = m(torch.tensor(ids)).logits.numpy()
  np.testing.assert_allclose(ours, want, atol=1e-4, rtol=0)
  np.testing.assert_allclose(ours, orig, atol=1e-4, rtol=0)  # the Q/K permutation undone
  folder = resolve_model(path)
  assert folder.startswith(cache) and resolve_model(path) == folder  # converted once, then reused


def test_cli_eval_inspect_quantize_accept_gguf(tiny_gguf, cache, capsys, tmp_path):
  path, m, data = tiny_gguf
  rc, out, err = run(capsys, "eval", "--model", path, "--data", data)
  assert rc == 0, err
  got = json.loads(out)
  tok = transformers.AutoTokenizer.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path))
  total, n = 0.0, 0
  for t in TEXTS:
    ids = torch.tensor([tok(t)["input_ids"]])
    with torch.no_grad():
      loss = m(ids, labels=ids).loss.item()
    total += loss * (ids.shape[1] - 1)
    n += ids.shape[1] - 1
  assert got["tokens"] == n and math.isclose(got["loss"], total / n, rel_tol=1e-4)
  rc, out, err = run(capsys, "inspect", "--model", path)
  assert rc == 0 and "q_proj" in out, err
  rc, out, err = run(capsys, "quantize", "--model", path, "--out", str(tmp_path / "q"))
  assert rc == 0 and json.loads(out)["quantized"] == 14, err


def test_cli_shortcuts_and_unknown_names(capsys, tmp_path):
  """``--model smollm2-135m`` (the cached shipped folder); an unknown name: one line listing the shortcuts."""
  rc, out, err = run(capsys, "inspect", "--model", "smollm2-135m")
  assert rc == 0 and "q_proj" in out, err
  data = tmp_path / "x.txt"
  data.write_text("hello\n")
  for cmd in (["eval", "--data", str(data)], ["inspect"], ["quantize", "--out", str(tmp_path / "o")]):
    rc, out, err = run(capsys, cmd[0], "--model", "no-such-model", *cmd[1:])
    assert rc == 1 and err.count("\n") == 1 and all(s in err for s in SHIPPED), err
  rc, out, err = run(capsys, "merge", "--base", "no-such-model", "--adapter", "a", "--out", "o")
  assert rc == 1 and "gemma3-270m" in err


def test_cli_eval_smollm2_shortcut(tiny_gguf, capsys):
  _, _, data = tiny_gguf
  rc, out, err = run(capsys, "eval", "--model", "smollm2-135m", "--data", data)
  assert rc == 0, err
  got = json.loads(out)
  assert got["texts"] == 2 and 0 < got["loss"] < 10


def test_concurrent_callers_convert_once(tmp_path, monkeypatch):
  """Two processes or test workers asking for the same cached folder: one conversion, the other waits."""
  import threading
  import time

  from jax_lora.models import shipped

  calls = []

  def fake_convert(path, final, tokenizer_cache, dtype):
    calls.append(path)
    time.sleep(0.3)  # the second caller arrives while this one converts
    os.makedirs(final)
    for name in shipped._FILES:
      open(os.path.join(final, name), "w").close()

  monkeypatch.setattr(shipped, "_convert", fake_convert)
  src = tmp_path / "m.gguf"
  src.write_bytes(b"GGUF")
  out = []
  threads = [threading.Thread(target=lambda: out.append(shipped.gguf_hf_folder(str(src), str(tmp_path / "c"))))
             for _ in range(2)]
  for t in threads:
    t.start()
  for t in threads:
    t.join()
  assert len(calls) == 1 and len(out) == 2 and out[0] == out[1] and os.path.isdir(out[0])
