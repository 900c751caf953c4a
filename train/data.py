"""Tokenized examples and batches for causal-LM fine-tuning.

Rows are ``{"text": ...}`` (loss on every token) or ``{"prompt": ...,
"completion": ...}`` (loss on the completion and the EOS appended to it only,
like TRL's prompt-completion format). An example is ``(ids, loss_mask)``:
``loss_mask[t] = 1`` means token ``t`` is a training target, predicted from
tokens ``< t`` (so ``loss_mask[0]`` is always 0; the loss shifts by one).

Batches are numpy dicts with ``input_ids``, ``attention_mask``, ``loss_mask``,
right-padded. Encoder–decoder models (T5) take ``{"prompt", "completion"}`` rows
only (:func:`tokenize_seq2seq_rows`): the prompt is the encoder input, the
completion + EOS the decoder target (``labels``, weighted by ``loss_mask``), and
``decoder_input_ids`` are the labels shifted right after the decoder start token;
packing is refused for them. In packed rows ``attention_mask`` holds segment ids (0 = padding,
1, 2, ... = the examples of the row): the models then keep each example's
attention to itself and restart its positions at 0, so packing changes no loss. The training order is a
pure function of ``(seed, step)``: :meth:`Batcher.batch_at` gives the batch of
any step without replaying earlier ones, so a resumed run sees exactly the
batches an uninterrupted run would.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Sequence
from typing import Any

import numpy as np

__all__ = [
    "Example",
    "load_rows",
    "tokenize_row",
    "tokenize_rows",
    "tokenize_seq2seq_rows",
    "no_target",
    "MAX_CUT",
    "pad_batch",
    "seq2seq_batch",
    "pack_rows",
    "Batcher",
    "eval_batches",
    "encode_prompts",
    "padded_length",
]


@dataclasses.dataclass(frozen=True)
class Example:
  """One tokenized example."""

  # Token ids, int32, length <= seq_len.
  ids: np.ndarray
  # 1 where the token is a training target (predicted from the tokens before it), int32;
  # encoder–decoder examples: the weight of each ``labels`` token.
  loss_mask: np.ndarray
  # Encoder–decoder examples only: the decoder target (completion + EOS) and the decoder
  # inputs (the start token, then ``labels[:-1]``), int32; ``ids`` is then the encoder input.
  labels: np.ndarray | None = None
  decoder_ids: np.ndarray | None = None

  def __len__(self) -> int:
    return len(self.ids)


def load_rows(path: str) -> list[dict[str, str]]:
  """Rows of a jsonl file, loaded with HF ``datasets`` and checked for one of the two formats.

  The format is ``prompt``/``completion`` when the rows have both keys, else ``text``;
  every row must then have string values for those keys.

  Raises:
    ValueError: one line naming the file (and ``path:line`` where a line is at fault): a
      line that is not a JSON object, a row without the format's string fields, or a
      file with no rows.
  """
  import datasets

  if not os.path.isfile(path):
    raise ValueError(f"data file {path} does not exist")
  lines = _row_lines(path)  # line numbers of the non-blank lines; names a malformed one
  if not lines:
    raise ValueError(f"{path} holds no rows; give a jsonl file with one JSON object per line")
  quiet = datasets.utils.are_progress_bars_disabled()
  datasets.utils.disable_progress_bars()  # errors stay one line; the run has its own progress
  try:
    ds = datasets.load_dataset("json", data_files=path, split="train")
  except Exception as e:  # noqa: BLE001 - datasets/pyarrow raise many types; say which file
    raise ValueError(f"{path}: HF datasets cannot read it as jsonl ({type(e).__name__}: {e})") from None
  finally:
    if not quiet:
      datasets.utils.enable_progress_bars()
  cols = set(ds.column_names)
  if {"prompt", "completion"} <= cols:
    keys = ("prompt", "completion")
  elif "text" in cols:
    keys = ("text",)
  else:
    raise ValueError(f"{path}: rows need a 'text' field or 'prompt' and 'completion' fields; found {sorted(cols)}")
  columns = {k: ds[k] for k in keys}
  rows = []
  for i in range(len(ds)):
    row = {k: columns[k][i] for k in keys}
    if not all(isinstance(v, str) for v in row.values()):
      where = f"{path}:{lines[i]}" if len(lines) == len(ds) else f"{path}: row {i + 1}"
      raise ValueError(f"{where} has no string {' and '.join(repr(k) for k in keys)} field; every row needs them")
    rows.append(row)
  return rows


def _row_lines(path: str) -> list[int]:
  """Line numbers of the non-blank lines, each checked to be one JSON object (one line naming
  ``path:line`` otherwise: ``datasets``' own errors do not say where)."""
  out = []
  with open(path, encoding="utf-8") as f:
    try:
      for n, line in enumerate(f, 1):
        if not line.strip():
          continue
        try:
          row = json.loads(line)
        except json.JSONDecodeError as e:
          raise ValueError(f"{path}:{n} is not valid JSON ({e.msg} at column {e.colno}); "
                           "each line must be one JSON object") from None
        if not isinstance(row, dict):
          raise ValueError(f"{path}:{n} is a JSON {type(row).__name__}, not an object; "
                           "each line must be one JSON object like {\"text\": ...}")
        out.append(n)
    except UnicodeDecodeError as e:
      raise ValueError(f"{path} is not UTF-8 text ({e.reason} at byte {e.start}); save it as UTF-8") from None
  return out


def _encode(tokenizer: Any, text: str, special: bool) -> list[int]:
  return list(tokenizer(text, add_special_tokens=special)["input_ids"])


def tokenize_row(tokenizer: Any, row: dict[str, str], seq_len: int) -> Example:
  """Tokenizes one row and truncates it to ``seq_len`` tokens (keeping the start).

  ``text`` rows: ``tokenizer(text)`` + EOS, loss on every token after the first.
  ``prompt``/``completion`` rows: ``tokenizer(prompt)`` then the completion
  tokenized without special tokens, then EOS; loss on the completion and EOS.

  Args:
    tokenizer: a Hugging Face tokenizer (``tokenizer(text, add_special_tokens=)``
      returning ``{"input_ids": ...}``, and ``eos_token_id``).
    row: ``{"text"}`` or ``{"prompt", "completion"}``.
    seq_len: the longest example kept.
  """
  eos = tokenizer.eos_token_id
  if eos is None:
    raise ValueError("the tokenizer has no eos_token_id; set one (e.g. tokenizer.eos_token = '</s>')")
  if "prompt" in row:
    prompt = _encode(tokenizer, row["prompt"], True)
    target = _encode(tokenizer, row["completion"], False) + [eos]
    ids, mask = prompt + target, [0] * len(prompt) + [1] * len(target)
  elif "text" in row:
    ids = _encode(tokenizer, row["text"], True) + [eos]
    mask = [1] * len(ids)
  else:
    raise ValueError(f"row needs 'text' or 'prompt'+'completion', got keys {sorted(row)}")
  mask[0] = 0  # nothing predicts the first token
  return Example(np.asarray(ids[:seq_len], np.int32), np.asarray(mask[:seq_len], np.int32))


# Largest share of examples whose whole completion may fall beyond seq_len (kept: no loss, no gradient).
MAX_CUT = 0.05


def tokenize_rows(tokenizer: Any, rows: Sequence[dict[str, str]], seq_len: int, where: str | None = None) -> list[Example]:
  """:func:`tokenize_row` for every row.

  With ``where`` (the file's name): when more than :data:`MAX_CUT` of the rows lose
  every target token to ``seq_len`` (a prompt of ``seq_len`` tokens or more: the whole
  completion cut off, nothing to learn), they are refused with one line counting
  them, before any training. Fewer stay in (they add no loss and no gradient) and
  are counted by :func:`no_target`.
  """
  out = [tokenize_row(tokenizer, r, 1 << 30) for r in rows]
  if where is not None:
    cut = [e for e in out if e.loss_mask[:seq_len].sum() == 0]
    if len(cut) > MAX_CUT * len(out):
      need = max(int(np.nonzero(e.loss_mask)[0][0]) + 1 for e in cut if e.loss_mask.any())
      raise ValueError(f"seq_len {seq_len} cuts off the whole completion of {len(cut)} of {len(out)} examples in "
                       f"{where} (their prompts fill seq_len); raise seq_len to at least {need} (the longest "
                       f"example has {max(len(e) for e in out)} tokens) or shorten those prompts")
  return [Example(e.ids[:seq_len], e.loss_mask[:seq_len]) for e in out]


def tokenize_seq2seq_rows(tokenizer: Any, rows: Sequence[dict[str, str]], seq_len: int, decoder_start_id: int,
                          where: str | None = None) -> list[Example]:
  """Encoder–decoder examples: ``tokenizer(prompt)`` is the encoder input, the completion
  tokenized without special tokens + EOS the decoder target (loss on every target token),
  each truncated to ``seq_len`` tokens; the decoder inputs are the target shifted right
  after ``decoder_start_id`` (transformers' ``_shift_right``).

  Raises:
    ValueError: one line: ``text`` rows (a seq2seq model needs a prompt and a target), or a
      tokenizer without ``eos_token_id``.
  """
  eos = tokenizer.eos_token_id
  if eos is None:
    raise ValueError("the tokenizer has no eos_token_id; set one (e.g. tokenizer.eos_token = '</s>')")
  out = []
  for row in rows:
    if "prompt" not in row or "completion" not in row:
      raise ValueError(f"{where or 'the data'}: an encoder–decoder (T5) model trains on {{\"prompt\", \"completion\"}} "
                       "rows (encoder input, decoder target), not 'text' rows; convert the file")
    ids = _encode(tokenizer, row["prompt"], True)[:seq_len]
    labels = (_encode(tokenizer, row["completion"], False) + [eos])[:seq_len]
    out.append(Example(np.asarray(ids, np.int32), np.ones(len(labels), np.int32), np.asarray(labels, np.int32),
                       np.asarray([decoder_start_id] + labels[:-1], np.int32)))
  return out


def no_target(examples: Sequence[Example]) -> int:
  """How many examples have no target token (their completion cut off by seq_len)."""
  return sum(1 for e in examples if not e.loss_mask.any())


def padded_length(n: int, bucket: int, seq_len: int) -> int:
  """``n`` rounded up to a multiple of ``bucket``, at most ``seq_len``."""
  return min(seq_len, max(bucket, -(-n // bucket) * bucket))


def pad_batch(examples: Sequence[Example], length: int, pad_id: int) -> dict[str, np.ndarray]:
  """Right-pads examples to ``length``: ``input_ids``, ``attention_mask``, ``loss_mask`` (b, length)."""
  b = len(examples)
  ids = np.full((b, length), pad_id, np.int32)
  att = np.zeros((b, length), np.int32)
  loss = np.zeros((b, length), np.int32)
  for i, ex in enumerate(examples):
    n = len(ex)
    ids[i, :n], att[i, :n], loss[i, :n] = ex.ids, 1, ex.loss_mask
  return {"input_ids": ids, "attention_mask": att, "loss_mask": loss}


def seq2seq_batch(examples: Sequence[Example], length: int, target_length: int, pad_id: int) -> dict[str, np.ndarray]:
  """Right-padded encoder–decoder batch: ``input_ids``/``attention_mask`` (b, length) and
  ``decoder_input_ids``/``decoder_attention_mask``/``labels``/``loss_mask`` (b, target_length)."""
  out = pad_batch([Example(e.ids, np.zeros_like(e.ids)) for e in examples], length, pad_id)
  del out["loss_mask"]
  b = len(examples)
  dec = {k: np.full((b, target_length), pad_id if k in ("decoder_input_ids", "labels") else 0, np.int32)
         for k in ("decoder_input_ids", "decoder_attention_mask", "labels", "loss_mask")}
  for i, e in enumerate(examples):
    n = len(e.labels)
    dec["decoder_input_ids"][i, :n], dec["decoder_attention_mask"][i, :n] = e.decoder_ids, 1
    dec["labels"][i, :n], dec["loss_mask"][i, :n] = e.labels, e.loss_mask
  return {**out, **dec}


def _batch(examples: Sequence[Example], bucket: int, seq_len: int, pad_id: int) -> dict[str, np.ndarray]:
  """``examples`` padded to a multiple of ``bucket`` (at most ``seq_len``): :func:`pad_batch`, or
  :func:`seq2seq_batch` for encoder–decoder examples."""
  length = padded_length(max(len(e) for e in examples), bucket, seq_len)
  if examples[0].labels is None:
    return pad_batch(examples, length, pad_id)
  target = padded_length(max(len(e.labels) for e in examples), bucket, seq_len)
  return seq2seq_batch(examples, length, target, pad_id)


def pack_rows(examples: Sequence[Example], seq_len: int) -> list[list[int]]:
  """Greedy packing in the given order: indices of the examples placed in each row.

  A row is closed when the next example does not fit; examples are never split.
  """
  rows, cur, used = [], [], 0
  for i, ex in enumerate(examples):
    if cur and used + len(ex) > seq_len:
      rows.append(cur)
      cur, used = [], 0
    cur.append(i)
    used += len(ex)
  if cur:
    rows.append(cur)
  return rows


def _packed_batch(examples: Sequence[Sequence[Example]], seq_len: int, pad_id: int) -> dict[str, np.ndarray]:
  b = len(examples)
  out = pad_batch([Example(np.zeros(0, np.int32), np.zeros(0, np.int32))] * b, seq_len, pad_id)
  for i, row in enumerate(examples):
    at = 0
    for j, ex in enumerate(row, 1):
      n = len(ex)
      out["input_ids"][i, at:at + n] = ex.ids
      out["attention_mask"][i, at:at + n] = j  # segment id: example j attends only to itself
      out["loss_mask"][i, at:at + n] = ex.loss_mask  # loss_mask[0] == 0: no target across examples
      at += n
  return out


class Batcher:
  """Training batches whose order is a pure function of ``(seed, step)``.

  Epoch ``e`` shuffles the examples with ``np.random.default_rng([seed, e])``.
  Bucketing (``packing=False``): each window of ``window`` batches of the
  shuffled order is sorted by length and cut into batches (similar lengths
  pad little), the epoch's batches are shuffled, and each is padded to a
  multiple of ``bucket`` tokens. The ``len % batch_size`` examples left over
  differ each epoch. Packing (``packing=True``): the shuffled examples are
  packed greedily into ``seq_len`` rows, ``batch_size`` rows a batch.

  Example:
    >>> batches = Batcher(examples, batch_size=8, seq_len=96, pad_id=2, seed=0)
    >>> batch = batches.batch_at(123)   # same arrays in every run with seed 0
  """

  def __init__(self, examples: Sequence[Example], *, batch_size: int, seq_len: int, pad_id: int, seed: int = 0,
               packing: bool = False, bucket: int = 16, window: int = 32):
    if len(examples) < batch_size:
      raise ValueError(f"{len(examples)} training examples are fewer than batch_size={batch_size}; lower batch_size")
    if packing and examples[0].labels is not None:
      raise ValueError("data.packing is not supported for encoder–decoder (T5) models; set data.packing: false")
    self.examples = list(examples)
    self.lengths = np.asarray([len(e) for e in self.examples])
    self.batch_size, self.seq_len, self.pad_id, self.seed = batch_size, seq_len, pad_id, seed
    self.packing, self.bucket, self.window = packing, bucket, window
    self._epochs: dict[int, list[list[int]]] = {}
    self._starts = [0]  # first step of each epoch (packing: epochs differ in length)

  def _epoch(self, e: int) -> list[list[Any]]:
    """The batches of epoch ``e``: lists of example indices (packing: lists of rows)."""
    if e not in self._epochs:
      rng = np.random.default_rng([self.seed, e])
      perm = rng.permutation(len(self.examples))
      bs = self.batch_size
      if self.packing:
        rows = [[int(perm[i]) for i in r] for r in pack_rows([self.examples[i] for i in perm], self.seq_len)]
        batches = [rows[i:i + bs] for i in range(0, len(rows) - bs + 1, bs)]
        if not batches:
          raise ValueError(f"the training data packs into {len(rows)} rows, fewer than batch_size={bs}; lower batch_size")
      else:
        usable = perm[: len(perm) - len(perm) % bs]
        batches = []
        w = bs * self.window
        for i in range(0, len(usable), w):
          chunk = usable[i:i + w]
          chunk = chunk[np.argsort(self.lengths[chunk], kind="stable")]
          batches += [[int(j) for j in chunk[k:k + bs]] for k in range(0, len(chunk), bs)]
        order = rng.permutation(len(batches))
        batches = [batches[i] for i in order]
      if len(self._epochs) > 4:
        self._epochs.pop(min(self._epochs))
      self._epochs[e] = batches
    return self._epochs[e]

  def steps_per_epoch(self, epoch: int = 0) -> int:
    """Batches in ``epoch`` (the same for every epoch unless packing)."""
    return len(self._epoch(epoch))

  def _locate(self, step: int) -> tuple[int, int]:
    if not self.packing:
      n = self.steps_per_epoch()
      return step // n, step % n
    while self._starts[-1] <= step:
      self._starts.append(self._starts[-1] + len(self._epoch(len(self._starts) - 1)))
    e = int(np.searchsorted(self._starts, step, side="right")) - 1
    return e, step - self._starts[e]

  def batch_at(self, step: int) -> dict[str, np.ndarray]:
    """The batch of optimizer micro-step ``step`` (0-based)."""
    if step < 0:
      raise ValueError(f"step must be >= 0, got {step}")
    e, i = self._locate(step)
    idx = self._epoch(e)[i]
    if self.packing:
      return _packed_batch([[self.examples[j] for j in row] for row in idx], self.seq_len, self.pad_id)
    return _batch([self.examples[j] for j in idx], self.bucket, self.seq_len, self.pad_id)

  def num_steps(self, steps: int, epochs: float) -> int:
    """``steps`` if positive, else the steps of ``epochs`` passes (epoch 0's length)."""
    return steps if steps > 0 else max(1, math.ceil(epochs * self.steps_per_epoch()))


def eval_batches(examples: Sequence[Example], *, batch_size: int, seq_len: int, pad_id: int,
                 bucket: int = 16) -> list[dict[str, np.ndarray]]:
  """All examples once, sorted by length, in fixed-shape batches for evaluation.

  The last batch is filled up with copies of the first example whose
  ``loss_mask`` is zero, so every batch has ``batch_size`` rows and adds no loss.
  """
  order = np.argsort([len(e) for e in examples], kind="stable")
  out = []
  for i in range(0, len(order), batch_size):
    chunk = [examples[j] for j in order[i:i + batch_size]]
    filler = dataclasses.replace(examples[order[0]], loss_mask=np.zeros_like(examples[order[0]].loss_mask))
    chunk += [filler] * (batch_size - len(chunk))
    out.append(_batch(chunk, bucket, seq_len, pad_id))
  return out


def encode_prompts(tokenizer: Any, prompts: Sequence[str], *, pad_id: int, bucket: int = 16,
                   max_len: int | None = None) -> tuple[np.ndarray, np.ndarray]:
  """Right-padded ``(input_ids, attention_mask)`` of prompts for generation.

  Prompts are tokenized like the prompts of training rows; long ones keep
  their last ``max_len`` tokens (the instruction's end is what matters).
  """
  enc = [_encode(tokenizer, p, True) for p in prompts]
  if max_len is not None:
    enc = [e[-max_len:] for e in enc]
  length = -(-max(len(e) for e in enc) // bucket) * bucket
  ids = np.full((len(enc), length), pad_id, np.int32)
  mask = np.zeros((len(enc), length), np.int32)
  for i, e in enumerate(enc):
    ids[i, :len(e)], mask[i, :len(e)] = e, 1
  return ids, mask
