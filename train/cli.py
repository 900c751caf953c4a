"""The ``jax-lora`` command: merge, eval, quantize, inspect, train, compare.

The app's entry point (installed as ``jax_lora_app``; the library ``jax_lora``
never imports it).

Every command exits 0 on success; on bad input it prints one line on stderr
and exits 1 (2 for a malformed command line, 130 when interrupted). Output
folders are written atomically (a temporary folder renamed into place) and
never replace the inputs or a folder of a user's files (``--overwrite`` allows
the latter), see :func:`jax_lora.files.output_folder`.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from collections.abc import Sequence
from typing import Any

__all__ = ["main", "build_parser", "read_texts", "model_folder", "evaluate", "inspect_model", "quantize_model", "merge",
           "check_safetensors", "os_error_line"]


# Top-level modules of the [hf] extra: the CLI names the extra when one is missing.
_HF_EXTRA = ("transformers", "tokenizers", "datasets", "gguf", "sacrebleu", "rouge_score", "matplotlib")


class CliError(ValueError):
  """Bad input found by the command line (printed as one line)."""


class _Parser(argparse.ArgumentParser):
  def error(self, message):  # one line on stderr, exit 2
    self.exit(2, f"{self.prog}: error: {message}\n")


# ----------------------------------------------------------------------------- eval


def read_texts(path: str) -> list[str]:
  """Texts of a .txt file (one per non-empty line) or a .jsonl file (a "text" field per line)."""
  if not os.path.isfile(path):
    raise CliError(f"data file {path} does not exist")
  ext = os.path.splitext(path)[1].lower()
  if ext not in (".txt", ".jsonl"):
    raise CliError(f"data file {path} must end in .txt (one text per line) or .jsonl (a 'text' field per line)")
  texts = []
  with open(path, encoding="utf-8") as f:
    for n, line in enumerate(f, 1):
      line = line.rstrip("\r\n")
      if not line.strip():
        continue
      if ext == ".txt":
        texts.append(line)
        continue
      try:
        row = json.loads(line)
      except json.JSONDecodeError as e:
        raise CliError(f"{path}:{n} is not valid JSON ({e.msg})") from None
      if not isinstance(row, dict) or not isinstance(row.get("text"), str):
        raise CliError(f"{path}:{n} has no string 'text' field")
      texts.append(row["text"])
  if not texts:
    raise CliError(f"data file {path} holds no texts")
  return texts


def _bucket(n: int, cap: int) -> int:
  """Padded length: the next multiple of 16 (few recompiles), at most ``cap``."""
  return min(cap, max(16, -(-n // 16) * 16))


def model_folder(name: str) -> str:
  """The HF folder for ``--model`` / ``--base``: an HF folder, a ``.gguf`` file or a shipped name, resolved
  by :func:`jax_lora.models.resolve_model` as a train config's ``model:`` is."""
  from jax_lora.models import resolve_model

  try:
    return resolve_model(name)
  except ValueError as e:
    raise CliError(str(e)) from None


def evaluate(model_dir: str, data: str, adapter: str | None = None, batch_size: int = 8) -> dict[str, Any]:
  """Mean next-token cross-entropy of each text (tokenized as ``tokenizer(text)``), no packing.

  ``model_dir``: an HF folder, a ``.gguf`` file or a shipped name (see :func:`model_folder`).
  An encoder–decoder model (T5) is evaluated on a ``{"prompt", "completion"}`` jsonl instead
  (:func:`evaluate_seq2seq`: the loss of the completion + EOS given the prompt); a .txt is refused.

  Returns:
    ``{"loss", "tokens", "perplexity", "texts"}``: loss is the sum of token
    cross-entropies over all predicted tokens divided by their number.
  """
  import jax
  import jax.numpy as jnp
  import numpy as np

  import jax_lora as jl
  from jax_lora.losses import token_nll
  from jax_lora.models import load_hf

  if batch_size < 1:
    raise CliError(f"--batch-size must be >= 1, got {batch_size}")
  model_dir = model_folder(model_dir)
  if _is_encoder_decoder(model_dir):
    return evaluate_seq2seq(model_dir, data, adapter, batch_size)
  texts = read_texts(data)
  tok = _tokenizer(model_dir)
  model, variables, config = load_hf(model_dir)
  params = variables["params"]
  if adapter is not None:
    check_safetensors(adapter)
    params = jl.load_peft(adapter, params, config.model_type)
  cap = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None) or 1 << 30
  seqs = [list(tok(t)["input_ids"]) for t in texts]
  too_long = [i for i, s in enumerate(seqs) if len(s) > cap]
  if too_long:
    raise CliError(f"text {too_long[0] + 1} has {len(seqs[too_long[0]])} tokens, more than the model's {cap} positions")

  @jax.jit
  def batch_loss(p, ids, mask):
    logits = jl.linen.apply(model, p, ids, mask)[0]
    return token_nll(logits[:, :-1], ids[:, 1:], mask[:, 1:] * mask[:, :-1])

  total, count = 0.0, 0
  for i in range(0, len(seqs), batch_size):
    chunk = seqs[i:i + batch_size]
    width = _bucket(max(len(s) for s in chunk), cap)
    ids = np.zeros((len(chunk), width), np.int32)
    mask = np.zeros((len(chunk), width), np.int32)
    for j, s in enumerate(chunk):
      ids[j, :len(s)] = s
      mask[j, :len(s)] = 1
    s_, n_ = batch_loss(params, jnp.asarray(ids), jnp.asarray(mask))
    total += float(s_)
    count += int(round(float(n_)))
  if count == 0:
    raise CliError(f"no token to predict in {data}: every text tokenizes to fewer than 2 tokens")
  loss = total / count
  if not math.isfinite(loss):
    raise CliError(f"the loss on {data} is {loss} (not finite): the model{' or adapter' if adapter else ''} "
                   "holds non-finite weights (a diverged training run?)")
  return {"loss": loss, "tokens": count, "perplexity": math.exp(min(loss, 700.0)), "texts": len(texts)}


def _is_encoder_decoder(model_dir: str) -> bool:
  """Whether ``model_dir``'s config.json names an encoder–decoder model (T5)."""
  path = os.path.join(model_dir, "config.json")
  if not os.path.isfile(path):
    return False
  with open(path, encoding="utf-8") as f:
    raw = json.load(f)
  return bool(raw.get("is_encoder_decoder")) or raw.get("model_type") == "t5"


def evaluate_seq2seq(model_dir: str, data: str, adapter: str | None = None, batch_size: int = 8) -> dict[str, Any]:
  """Mean loss of an encoder–decoder model (T5) on a ``{"prompt", "completion"}`` jsonl: the
  completion + EOS is the decoder target given the prompt, as ``jax-lora train`` tokenizes it
  (no truncation). Returns ``{"loss", "tokens", "perplexity", "texts"}``."""
  import jax
  import jax.numpy as jnp

  import jax_lora as jl
  from jax_lora.losses import token_nll
  from jax_lora.models import load_hf

  from . import data as td

  if not data.endswith(".jsonl"):
    raise CliError(f"{model_dir} is an encoder–decoder (T5) model: eval needs a .jsonl of {{\"prompt\", "
                   f"\"completion\"}} rows (loss on the completion), not {data}")
  tok = _tokenizer(model_dir)
  model, variables, config = load_hf(model_dir)
  try:
    examples = td.tokenize_seq2seq_rows(tok, td.load_rows(data), 1 << 30, config.decoder_start_token_id, where=data)
  except ValueError as e:
    raise CliError(str(e)) from None
  params = variables["params"]
  if adapter is not None:
    check_safetensors(adapter)
    params = jl.load_peft(adapter, params, config.model_type)
  pad = tok.pad_token_id if tok.pad_token_id is not None else config.pad_token_id

  @jax.jit
  def batch_loss(p, b):
    logits = jl.linen.apply(model, p, b["input_ids"], b["attention_mask"], b["decoder_input_ids"],
                            b["decoder_attention_mask"])[0]
    return token_nll(logits, b["labels"], b["loss_mask"])

  total = count = 0.0
  for b in td.eval_batches(examples, batch_size=batch_size, seq_len=1 << 30, pad_id=pad):
    s_, n_ = batch_loss(params, {k: jnp.asarray(v) for k, v in b.items()})
    total, count = total + float(s_), count + float(n_)
  loss = total / max(count, 1.0)
  if not math.isfinite(loss):
    raise CliError(f"the loss on {data} is {loss} (not finite): the model{' or adapter' if adapter else ''} "
                   "holds non-finite weights (a diverged training run?)")
  return {"loss": loss, "tokens": int(round(count)), "perplexity": math.exp(min(loss, 700.0)), "texts": len(examples)}


def _tokenizer(model_dir: str):
  os.environ.setdefault("HF_HUB_OFFLINE", "1")
  try:
    import transformers
  except ImportError:
    raise CliError("eval needs transformers for the tokenizer: pip install 'jax-lora[hf]'") from None
  names = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "spiece.model", "vocab.json")
  if os.path.isdir(model_dir) and not any(os.path.isfile(os.path.join(model_dir, n)) for n in names):
    # transformers 5 would build an empty tokenizer of the model type (T5: sentinels only) and score garbage
    raise CliError(f"{model_dir} has no tokenizer files ({', '.join(names)}); copy the base model's tokenizer into it")
  try:
    return transformers.AutoTokenizer.from_pretrained(model_dir)
  except Exception as e:  # noqa: BLE001 - transformers raises many types
    raise CliError(f"cannot load a tokenizer from {model_dir} ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None


# ----------------------------------------------------------------------------- inspect


def _read_yaml_lora(path: str | None):
  """The ``lora`` section of a YAML file (a train config), read as ``jax-lora train`` reads it."""
  import jax_lora as jl

  from .config import lora_section, read_yaml_mapping

  if path is None:
    return jl.LoraConfig.all_linear()
  doc = read_yaml_mapping(path, "config file", "a mapping with a 'lora' section")
  return lora_section(doc.get("lora") or {}, where=f"{path}: lora")


def _shapes(model_dir: str):
  """``(config, {flax path: shape})`` from config.json and the safetensors headers (no tensor
  read; a T5's ``shared``/``lm_head`` are compared to tell a tied head, as transformers does).
  A folder with config.json and no safetensors: the shapes of the model's ``init`` under
  ``jax.eval_shape`` (nothing is computed or allocated)."""
  import glob

  import numpy as np
  from safetensors import safe_open

  from jax_lora.files import weight_files
  from jax_lora.models import hf, t5

  cfg_path = os.path.join(model_dir, "config.json")
  if not os.path.isfile(cfg_path):
    raise CliError(f"{model_dir} has no config.json; pass a Hugging Face model folder")
  with open(cfg_path) as f:
    config = hf.config_from_hf(json.load(f))
  if not glob.glob(os.path.join(model_dir, "*.safetensors")) and not glob.glob(os.path.join(model_dir, "*.bin")):
    import jax
    import jax.numpy as jnp
    from flax import traverse_util

    model = hf.model_from_config(config)
    tree = jax.eval_shape(model.init, jax.random.key(0), jnp.ones((1, 1), jnp.int32))["params"]
    return config, {"/".join(k): tuple(v.shape) for k, v in traverse_util.flatten_dict(tree).items()}
  files = weight_files(model_dir)
  if isinstance(config, t5.T5Config):
    head = {}
    for path in files:
      with safe_open(path, framework="numpy") as f:
        head.update({k: f.get_tensor(k) for k in ("shared.weight", "lm_head.weight") if k in f.keys()})
    config = t5.config_for_state(config, head)
  fam = hf.family(config)
  shapes = {}
  for path in files:
    with safe_open(path, framework="numpy") as f:
      for k in f.keys():
        if hf.ignored_key(k, config):
          continue
        shape = tuple(f.get_slice(k).get_shape())
        p, view = fam.to_flax(k, np.broadcast_to(np.zeros((), np.float32), shape))
        shapes[p] = tuple(view.shape)
  return config, shapes


def inspect_model(model_dir: str, config_yaml: str | None = None):
  """:class:`jax_lora.ParamReport` of LoRA (from the YAML's ``lora`` section, default all-linear) on a model folder."""
  import jax
  from flax import traverse_util

  import jax_lora as jl

  cfg = _read_yaml_lora(config_yaml)
  _, shapes = _shapes(model_folder(model_dir))
  params = traverse_util.unflatten_dict({p: jax.ShapeDtypeStruct(s, "float32") for p, s in shapes.items()}, sep="/")
  # shapes only: init_lora traced abstractly (no weights are read or made)
  tree = jax.eval_shape(lambda p: jl.init_lora(p, cfg, jax.random.key(0)), params)
  return jl.param_report(tree, bias=cfg.bias, modules_to_save=cfg.modules_to_save)


# ----------------------------------------------------------------------------- quantize


def quantize_model(model_dir: str, out: str, double_quant: bool = False, overwrite: bool = False) -> dict[str, Any]:
  """Writes the model's linear weights in bitsandbytes' NF4 safetensors layout (others unchanged).

  ``out`` is written by :func:`jax_lora.files.output_folder`: never the model's own
  folder, a non-empty folder only when it is an earlier ``quantize`` output (or ``overwrite``).
  """
  from jax_lora import bnb
  from jax_lora.files import CONV1D_MODEL_TYPES, check_output_folder, copy_side_files, output_folder
  from jax_lora.files import read_safetensors, save_tensors

  model_dir = model_folder(model_dir)
  cfg_path = os.path.join(model_dir, "config.json")
  if not os.path.isfile(cfg_path):
    raise CliError(f"{model_dir} has no config.json; pass a Hugging Face model folder")
  check_output_folder(out, "quantize", (model_dir,), overwrite)  # before the slow part
  with open(cfg_path) as f:
    hf_config = json.load(f)
  tensors = read_safetensors(model_dir)
  linear = _linear_keys(tensors, hf_config)
  if not linear:
    raise CliError(f"{model_dir}: found no linear weights to quantize")
  if hf_config.get("model_type") in CONV1D_MODEL_TYPES:
    # Conv1D stores (in, out); bitsandbytes (as transformers quantizes it) stores (out, in)
    tensors = {k: (v.T if k in set(linear) else v) for k, v in tensors.items()}
  out_tensors, qconfig = bnb.quantize_state_dict(tensors, linear, blocksize=64, double_quant=double_quant)
  with output_folder(out, "quantize", (model_dir,), overwrite) as tmp:
    copy_side_files(model_dir, tmp)
    cfg = dict(hf_config)
    cfg["quantization_config"] = qconfig
    with open(os.path.join(tmp, "config.json"), "w") as f:
      json.dump(cfg, f, indent=2)
    save_tensors(os.path.join(tmp, "model.safetensors"), out_tensors)
  return {"quantized": len(linear), "double_quant": double_quant}


def _linear_keys(tensors, hf_config) -> list[str]:
  """HF keys of the linear layers' weights (2-D ``*.weight`` mapped to a Flax ``kernel``), head excluded."""
  from jax_lora.models import hf

  config = hf.config_from_hf(hf_config)
  keys = []
  for k, v in tensors.items():
    if hf.ignored_key(k, config) or v.ndim != 2 or not k.endswith(".weight"):
      continue
    if k.startswith("lm_head"):  # bitsandbytes/transformers keep the head in full precision
      continue
    if hf.hf_key_to_path(k, config.model_type).endswith("/kernel"):
      keys.append(k)
  return sorted(keys)


# ----------------------------------------------------------------------------- entry point


_OVERWRITE_HELP = ("replace a non-empty --out that this command did not write (its files are deleted); "
                   "without it such a folder is refused. An earlier output of the same command is always replaced")


def os_error_line(e: OSError) -> str:
  """One line for an OSError: disk full and permission problems say what to do."""
  import errno

  where = f" writing {e.filename}" if getattr(e, "filename", None) else ""
  if e.errno == errno.ENOSPC:
    return f"no space left on the device{where}; free space or write to another disk (nothing half-written was kept)"
  if e.errno == errno.EDQUOT:
    return f"disk quota exceeded{where}; free space or write to another disk"
  if e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
    return f"no permission{where} ({e.strerror}); choose a writable folder"
  return " ".join(str(e).split()) or type(e).__name__


def merge(base: str, adapter: str, out: str, dtype: str | None = None, overwrite: bool = False) -> None:
  """``jax-lora merge``: :func:`jax_lora.peft.merge_adapter_files` into a safe output folder.

  ``out`` may not be (or lie inside, or contain) ``base`` or ``adapter``; a non-empty
  ``out`` is replaced only when it is an earlier ``merge`` output or with ``overwrite``;
  a merged tensor with NaN/inf is refused (nothing is written).
  """
  from jax_lora.files import check_output_folder, output_folder
  from jax_lora.peft import merge_adapter_files

  check_output_folder(out, "merge", (base, adapter), overwrite)
  check_safetensors(adapter)
  with output_folder(out, "merge", (base, adapter), overwrite) as tmp:
    merge_adapter_files(base, adapter, tmp, dtype)


def check_safetensors(folder: str) -> None:
  """Opens every safetensors file of ``folder`` (headers only): a truncated or garbage
  file is a one-line error naming it."""
  import glob

  from jax_lora.files import open_safetensors

  for path in sorted(glob.glob(os.path.join(folder, "*.safetensors"))):
    with open_safetensors(path):
      pass


def build_parser() -> argparse.ArgumentParser:
  p = _Parser(prog="jax-lora", description="LoRA/QLoRA for JAX: merge, evaluate, quantize and inspect models.")
  sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)
  m = sub.add_parser("merge", help="fold a PEFT adapter into an HF model folder (safetensors only)")
  m.add_argument("--base", required=True, help="Hugging Face model folder, .gguf file or shipped name (smollm2-135m, gemma3-270m)")
  m.add_argument("--adapter", required=True, help="PEFT LoRA adapter folder")
  m.add_argument("--out", required=True, help="output model folder (written atomically)")
  m.add_argument("--dtype", choices=["float32", "bfloat16"], default=None, help="cast floating tensors")
  m.add_argument("--overwrite", action="store_true", help=_OVERWRITE_HELP)
  e = sub.add_parser("eval", help="mean next-token loss / perplexity of a text file (T5: of prompt/completion rows)")
  e.add_argument("--model", required=True, help="Hugging Face model folder, .gguf file or shipped name (smollm2-135m, gemma3-270m)")
  e.add_argument("--adapter", default=None, help="PEFT LoRA adapter folder")
  e.add_argument("--data", required=True, help=".txt (one text per line) or .jsonl with a 'text' field; "
                 "an encoder-decoder (T5) model: .jsonl with 'prompt' and 'completion' fields")
  e.add_argument("--batch-size", type=int, default=8, help="texts per batch (padded)")
  q = sub.add_parser("quantize", help="write linear weights in bitsandbytes NF4 safetensors layout")
  q.add_argument("--model", required=True, help="Hugging Face model folder, .gguf file or shipped name (smollm2-135m, gemma3-270m)")
  q.add_argument("--out", required=True, help="output folder (written atomically)")
  q.add_argument("--double-quant", action="store_true", help="also quantize the absmax statistics")
  q.add_argument("--overwrite", action="store_true", help=_OVERWRITE_HELP)
  i = sub.add_parser("inspect", help="table of LoRA-targeted modules and parameter counts")
  i.add_argument("--model", required=True, help="Hugging Face model folder, .gguf file or shipped name (smollm2-135m, gemma3-270m)")
  i.add_argument("--config", default=None, help="YAML with a 'lora' section (default: all linear, r=8)")
  sub.add_parser("train", help="fine-tune (see 'jax-lora train --help')", add_help=False)
  sub.add_parser("compare", help="several training runs, one table (see 'jax-lora compare --help')", add_help=False)
  return p


def main(argv: Sequence[str] | None = None) -> int:
  """Runs ``jax-lora``; returns the exit status."""
  argv = list(sys.argv[1:] if argv is None else argv)
  try:
    if argv and argv[0] == "train":
      from . import run
      return int(run.main(argv[1:]) or 0)
    if argv and argv[0] == "compare":
      from . import compare
      return int(compare.main(argv[1:]) or 0)
    args = build_parser().parse_args(argv)
    if args.command == "merge":
      merge(model_folder(args.base), args.adapter, args.out, args.dtype, args.overwrite)
      print(json.dumps({"merged": args.out}))
    elif args.command == "eval":
      print(json.dumps(evaluate(args.model, args.data, args.adapter, args.batch_size), allow_nan=False))
    elif args.command == "quantize":
      print(json.dumps({"out": args.out, **quantize_model(args.model, args.out, args.double_quant, args.overwrite)}))
    elif args.command == "inspect":
      print(inspect_model(args.model, args.config).table())
    return 0
  except ModuleNotFoundError as e:  # the app's own stack (transformers, datasets, ...) is an extra
    hint = " install the checkpoint/data stack: pip install 'jax-lora[hf]'" if e.name in _HF_EXTRA else ""
    print(f"jax-lora: error: {e};{hint}" if hint else f"jax-lora: error: {e}", file=sys.stderr)
    return 1
  except KeyboardInterrupt:
    print("jax-lora: interrupted; no output was written (outputs appear only when complete)", file=sys.stderr)
    return 130
  except OSError as e:
    print(f"jax-lora: error: {os_error_line(e)}", file=sys.stderr)
    return 1
  except ValueError as e:  # bad input: the message says what to fix
    msg = " ".join(str(e).split()) or type(e).__name__
    print(f"jax-lora: error: {msg}", file=sys.stderr)
    return 1
  except Exception as e:  # noqa: BLE001 - the contract is one line on stderr, whatever failed
    msg = " ".join(str(e).split())
    print(f"jax-lora: error: {type(e).__name__}: {msg}", file=sys.stderr)
    return 1


if __name__ == "__main__":
  sys.exit(main())
