"""The training loop: LoRA / full fine-tuning of a causal LM or a T5 with optax, resumable.

Only the trainable half of ``jax_lora.split`` is differentiated (LoRA A/B; the
base gets no gradient and no optimizer state). AdamW with warmup and a
cosine/linear/constant decay, global-norm clipping, and gradient accumulation
through ``optax.MultiSteps``. Every ``micro-step`` reads ``Batcher.batch_at``,
so a run resumed from a checkpoint sees the same batches as an uninterrupted one.

Files in ``out_dir``: ``config.yaml`` (the resolved config), ``metrics.jsonl``
(one JSON object per log/eval event), ``checkpoints/`` (orbax, resumable),
``adapter/`` (PEFT LoRA folder) or ``model/`` (full fine-tuning, HF folder),
``results.json`` (validation loss and test scores before and after),
``.jax-lora-output.json`` (what the run wrote: see :mod:`.outdir`, which refuses a
user's files and a changed config before anything runs).
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import functools
import json
import math
import os
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import tqdm

import jax_lora as jl
from jax_lora.losses import chunked_token_nll, token_nll
from jax_lora.files import write_text
from jax_lora.tree import flat_paths

from . import data as td
from . import metrics as tm
from .config import OptimConfig, TrainConfig, config_to_dict, resolve_data, resolve_model

__all__ = [
    "lr_schedule",
    "build_optimizer",
    "next_token_loss",
    "make_loss_fn",
    "make_train_step",
    "offload_state",
    "load_model",
    "generate_texts",
    "train",
    "TrainingStopped",
]


def lr_schedule(o: OptimConfig, total_steps: int) -> optax.Schedule:
  """Linear warmup from 0 to ``o.lr`` over ``o.warmup_steps``, then the decay ``o.schedule``."""
  warmup = min(o.warmup_steps, max(total_steps - 1, 0))
  decay = max(total_steps - warmup, 1)
  end = o.lr * o.end_lr_ratio
  if o.schedule == "cosine":
    after = optax.cosine_decay_schedule(o.lr, decay, alpha=o.end_lr_ratio)
  elif o.schedule == "linear":
    after = optax.linear_schedule(o.lr, end, decay)
  else:
    after = optax.constant_schedule(o.lr)
  if warmup == 0:
    return after
  return optax.join_schedules([optax.linear_schedule(0.0, o.lr, warmup), after], [warmup])


def build_optimizer(o: OptimConfig, total_steps: int) -> optax.GradientTransformation:
  """Clip → AdamW(schedule), wrapped in ``optax.MultiSteps`` when ``o.grad_accum > 1``.

  ``total_steps`` counts optimizer updates; with accumulation each update
  takes ``o.grad_accum`` micro-batches (the schedule advances per update).
  """
  parts = [optax.clip_by_global_norm(o.grad_clip)] if o.grad_clip > 0 else []
  parts.append(optax.adamw(lr_schedule(o, total_steps), b1=o.b1, b2=o.b2, eps=o.eps, weight_decay=o.weight_decay))
  tx = optax.chain(*parts)
  return optax.MultiSteps(tx, every_k_schedule=o.grad_accum) if o.grad_accum > 1 else tx


def next_token_loss(logits: jax.Array, input_ids: jax.Array, loss_mask: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Summed next-token cross-entropy over target tokens, and their count.

  Token ``t`` (with ``loss_mask[t] == 1``) is predicted from ``logits[t - 1]``.
  """
  return token_nll(logits[:, :-1], input_ids[:, 1:], loss_mask[:, 1:])


def with_loss_targets(batch: dict, bucket: int = 16) -> dict:
  """Adds ``logit_pos``/``target_ids``/``target_w`` (b, k): the positions whose next
  token is trained on, packed to the left and padded to a multiple of ``bucket``.

  With them the model computes the LM head only where the loss needs it (the
  completion tokens), instead of at every position: on SmolLM2 the 49k-way head
  is a fifth of the model's FLOPs. Encoder–decoder batches (with ``labels``) come back
  unchanged: their decoder positions are all targets but the padding.
  """
  if "labels" in batch:
    return batch
  ids, lm = np.asarray(batch["input_ids"]), np.asarray(batch["loss_mask"])
  b, s = ids.shape
  tgt = lm[:, 1:] > 0
  k = min(s - 1, max(bucket, -(-int(tgt.sum(1).max()) // bucket) * bucket))
  pos, tid, w = np.zeros((b, k), np.int32), np.zeros((b, k), np.int32), np.zeros((b, k), np.float32)
  for i in range(b):
    p = np.nonzero(tgt[i])[0]
    pos[i, :len(p)], tid[i, :len(p)], w[i, :len(p)] = p, ids[i, p + 1], 1.0
  return {**batch, "logit_pos": pos, "target_ids": tid, "target_w": w}


def make_loss_fn(model: Any, method: str, loss_chunk: int = 0) -> Callable[..., tuple[jax.Array, jax.Array]]:
  """``loss(trainable, frozen, batch, rng) -> (sum_nll, count)`` for ``method``.

  LoRA: ``jax_lora.linen.apply`` on ``combine(trainable, frozen)`` (LoRA kept
  unmerged, dropout from ``rng``). Full: ``model.apply`` on the params.
  ``loss_chunk > 0``: the model's ``hidden_states`` at the loss positions, then
  the LM head and cross-entropy ``loss_chunk`` tokens at a time
  (:func:`jax_lora.losses.chunked_token_nll`), so no (tokens x vocab) logits of
  the whole batch exist; 0 computes the head at all loss positions at once.
  Encoder–decoder models (``model.config.is_encoder_decoder``, T5) are called with the
  encoder ids and mask and the decoder inputs and mask of a seq2seq batch, and the loss is
  :func:`jax_lora.losses.token_nll` of their logits on ``labels`` weighted by ``loss_mask``.
  """
  seq2seq = bool(getattr(getattr(model, "config", None), "is_encoder_decoder", False))
  if loss_chunk > 0 and not all(callable(getattr(model, m, None)) for m in ("hidden_states", "lm_logits")):
    raise ValueError(f"loss_chunk > 0 needs a model with hidden_states/lm_logits methods; "
                     f"{type(model).__name__} has none, set loss_chunk: 0")

  def run(params, *args, dropout_rng=None, **kw):
    if method == "full":
      return model.apply({"params": params}, *args, **kw)
    return jl.linen.apply(model, params, *args, dropout_rng=dropout_rng, **kw)

  def loss(trainable, frozen, batch, rng):
    gathered = "logit_pos" in batch
    kw = {"logits_index": batch["logit_pos"]} if gathered else {}
    params = trainable if method == "full" else jl.combine(trainable, frozen)
    rng = None if method == "full" else rng
    if seq2seq:
      args = (batch["input_ids"], batch["attention_mask"], batch["decoder_input_ids"], batch["decoder_attention_mask"])
      if loss_chunk > 0:
        h = run(params, *args, method="hidden_states", dropout_rng=rng)
        return chunked_token_nll(lambda p, x, key=None: run(p, x, method="lm_logits", dropout_rng=key), params, h,
                                 batch["labels"], batch["loss_mask"], chunk=loss_chunk, rng=rng)
      logits, _ = run(params, *args, dropout_rng=rng)
      return token_nll(logits, batch["labels"], batch["loss_mask"])
    if loss_chunk > 0:
      h = run(params, batch["input_ids"], batch["attention_mask"], method="hidden_states", dropout_rng=rng, **kw)
      if gathered:
        targets, weights = batch["target_ids"], batch["target_w"]
      else:
        h, targets, weights = h[:, :-1], batch["input_ids"][:, 1:], batch["loss_mask"][:, 1:]

      def head(p, x, key=None):
        return run(p, x, method="lm_logits", dropout_rng=key)

      return chunked_token_nll(head, params, h, targets, weights, chunk=loss_chunk, rng=rng)
    logits, _ = run(params, batch["input_ids"], batch["attention_mask"], dropout_rng=rng, **kw)
    if gathered:
      return token_nll(logits, batch["target_ids"], batch["target_w"])
    return next_token_loss(logits, batch["input_ids"], batch["loss_mask"])

  return loss


def make_train_step(loss_fn: Callable, tx: optax.GradientTransformation,
                    put_batch: Callable | None = None, loss_bucket: int = 16,
                    offload: dict[str, Any] | None = None) -> Callable:
  """Jitted ``step(trainable, opt_state, frozen, batch, rng) -> (trainable, opt_state, loss)``.

  The gradient is of the token-mean loss of the batch, taken w.r.t. ``trainable`` only.
  A step whose loss, gradients or new parameters are not all finite changes nothing
  (``trainable`` and ``opt_state`` come back as they were) and sets ``step.finite``
  (a device bool, the last call's) to False: the caller stops with the last good state.
  Each batch shape is compiled ahead of time, once (``jit(...).lower(...).compile()``);
  after a call, ``step.compile_s`` is the seconds that call spent compiling (0.0 when
  it reused an executable), so step times can leave compiles out.
  """

  def mean_loss(trainable, frozen, batch, rng):
    s, n = loss_fn(trainable, frozen, batch, rng)
    return s / jnp.maximum(n, 1.0)

  @functools.partial(jax.jit, donate_argnums=(0, 1))
  def jitted(trainable, opt_state, frozen, batch, rng):
    if offload:
      opt_state = jax.device_put(opt_state, offload["opt"][0])
      if offload.get("frozen"):
        frozen = jax.device_put(frozen, offload["frozen"][0])
    loss, grads = jax.value_and_grad(mean_loss)(trainable, frozen, batch, rng)
    updates, new_state = tx.update(grads, opt_state, trainable)
    new = optax.apply_updates(trainable, updates)
    ok = jnp.isfinite(loss) & _all_finite(grads) & _all_finite(new)
    new, new_state = jax.tree.map(lambda n, o: jnp.where(ok, n, o), (new, new_state), (trainable, opt_state))
    if offload:
      new_state = jax.device_put(new_state, offload["opt"][1])
    return new, new_state, loss, ok

  executables: dict[Any, Any] = {}

  def step(trainable, opt_state, frozen, batch, rng):
    batch = with_loss_targets(batch, loss_bucket)  # one k for most batches: few recompiles
    if put_batch is not None:  # on a mesh: split the batch over the data axes
      batch = put_batch(batch)
    key = tuple((k, tuple(v.shape), str(v.dtype)) for k, v in sorted(batch.items()))
    step.compile_s = 0.0
    if key not in executables:
      t = time.perf_counter()
      executables[key] = jitted.lower(trainable, opt_state, frozen, batch, rng).compile()
      step.compile_s = time.perf_counter() - t
    trainable, opt_state, loss, step.finite = executables[key](trainable, opt_state, frozen, batch, rng)
    return trainable, opt_state, loss

  step.jitted = jitted
  step.compile_s = 0.0
  step.finite = True
  return step


def _all_finite(tree) -> jax.Array:
  """True when every floating leaf of ``tree`` is finite (integer leaves, e.g. counters, pass)."""
  flags = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.inexact)]
  return jnp.all(jnp.stack(flags)) if flags else jnp.asarray(True)


class TrainingStopped(ValueError):
  """A run that stopped early on purpose (divergence, Ctrl-C): its message is the one line to
  print, ``exit_code`` the command's status (1; 130 for Ctrl-C)."""

  def __init__(self, message: str, exit_code: int = 1):
    super().__init__(message)
    self.exit_code = exit_code


def offload_state(kind: str, opt_state, frozen):
  """Moves the optimizer state (``kind`` "optimizer") and the frozen base ("optimizer+base")
  to pinned host memory; returns ``(opt_state, frozen, offload)`` for :func:`make_train_step`.

  Raises a one-line ValueError when the backend has no host memory.
  """
  if kind == "none":
    return opt_state, frozen, None
  from jax_lora.sharding import with_memory_kind

  def move(tree):
    dev = jax.tree.map(lambda x: x.sharding, tree)
    host = with_memory_kind(dev, "pinned_host")
    return jax.device_put(tree, host), (dev, host)

  opt_state, opt_sh = move(opt_state)
  fr_sh = None
  if kind == "optimizer+base" and frozen is not None:
    frozen, fr_sh = move(frozen)
  return opt_state, frozen, {"opt": opt_sh, "frozen": fr_sh}


def load_model(name: str, dtype: str, **overrides):
  """``(model, params, model_config, tokenizer, folder)`` of an HF folder, .gguf file or shipped name.

  ``overrides``: model config fields to set (e.g. ``remat="full"``). Loading goes through
  :func:`jax_lora.models.load_pretrained`, as every ``jax-lora`` command does.
  """
  from jax_lora.models import load_pretrained

  path = resolve_model(name)
  model, params, config, tok = load_pretrained(path, dtype=jnp.dtype(dtype), **overrides)
  if isinstance(params, dict) and set(params) == {"params"}:
    params = params["params"]
  return model, params, config, tok, path


def generate_texts(model: Any, gen_params: Any, apply_fn: Callable | None, tokenizer: Any, prompts: Sequence[str],
                   *, max_new_tokens: int, batch_size: int, bucket: int = 16) -> list[str]:
  """Greedy continuations of ``prompts``, cut at EOS / the first newline.

  All prompts are padded to one length and every batch has ``batch_size``
  rows (the last one filled with repeats), so the decoding loop compiles once
  per call site; batches hold prompts of similar length (the loop stops when
  every row has produced EOS). Encoder–decoder models (T5) decode with
  :func:`jax_lora.models.generate_seq2seq` (the prompt is the encoder input).
  """
  from jax_lora.models import generate_seq2seq
  from jax_lora.models.generate import generate

  if getattr(model.config, "is_encoder_decoder", False):
    generate = generate_seq2seq

  eos = tokenizer.eos_token_id
  pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
  ids, mask = td.encode_prompts(tokenizer, prompts, pad_id=pad, bucket=bucket)
  order = np.argsort(mask.sum(1), kind="stable")
  out: list[str] = [""] * len(prompts)
  for i in range(0, len(order), batch_size):
    idx = list(order[i:i + batch_size])
    rows = idx + [idx[0]] * (batch_size - len(idx))  # fixed batch shape
    toks = generate(model, gen_params, ids[rows], mask[rows], max_new_tokens=max_new_tokens, eos_token_id=eos,
                    pad_token_id=pad, apply_fn=apply_fn)
    for j, text in zip(idx, tm.decode_generated(tokenizer, toks[: len(idx)], eos)):
      out[j] = text
  return out


def _validation_loss(loss_fn: Callable, trainable, frozen, batches) -> float:
  fn = _validation_loss.cache.get(loss_fn)
  if fn is None:
    fn = _validation_loss.cache[loss_fn] = jax.jit(lambda t, f, b: loss_fn(t, f, b, None))
  tot = cnt = 0.0
  for b in batches:
    s, n = fn(trainable, frozen, b)
    tot, cnt = tot + float(s), cnt + float(n)
  return tot / max(cnt, 1.0)


_validation_loss.cache = {}


def _log(out_dir: str, record: dict) -> None:
  if not sys.stderr.isatty():  # plain lines when not on a terminal (a progress bar otherwise)
    print(json.dumps(record), flush=True)
  with open(os.path.join(out_dir, "metrics.jsonl"), "a", encoding="utf-8") as f:
    f.write(json.dumps(record) + "\n")


def _checkpointer(out_dir: str):
  import orbax.checkpoint as ocp

  # synchronous: every save is waited for anyway, and a failed write (disk full) is then one
  # exception in this thread instead of tracebacks from background threads
  return ocp.CheckpointManager(os.path.abspath(os.path.join(out_dir, "checkpoints")),
                               options=ocp.CheckpointManagerOptions(max_to_keep=2, enable_async_checkpointing=False),
                               item_handlers=ocp.StandardCheckpointHandler())


def _by_path(tree) -> dict[str, Any]:
  """``tree``'s array leaves as a nested dict keyed by their path components (what a
  checkpoint stores: a leaf is found again by its path, not by its position)."""
  from flax import traverse_util

  return traverse_util.unflatten_dict({tuple(p.split("/")): x for p, x in flat_paths(tree).items()})


def _from_paths(tree, stored: dict) -> Any:
  from flax import traverse_util

  flat = traverse_util.flatten_dict(stored)
  return jax.tree.unflatten(jax.tree.structure(tree), [flat[tuple(p.split("/"))] for p in flat_paths(tree)])


def _save(mngr, step: int, trainable, opt_state) -> None:
  import orbax.checkpoint as ocp

  try:
    mngr.save(step, args=ocp.args.StandardSave({"trainable": _by_path(trainable), "opt_state": _by_path(opt_state)}))
    mngr.wait_until_finished()
  except Exception as e:  # orbax/tensorstore wrap a full disk in their own exception types
    if _disk_full(e):
      raise OSError(errno.ENOSPC, "No space left on device", str(mngr.directory)) from None
    raise


def _disk_full(e: BaseException | None) -> bool:
  """Whether ``e`` or an exception it was raised from is a full disk (ENOSPC)."""
  seen = 0
  while e is not None and seen < 20:
    if (isinstance(e, OSError) and e.errno == errno.ENOSPC) or "No space left on device" in str(e):
      return True
    e, seen = e.__cause__ or e.__context__, seen + 1
  return False


def _restore(mngr, trainable, opt_state, changed: Sequence[str] = ()):
  """``(step, trainable, opt_state)`` from the latest checkpoint, or ``(0, ...)`` unchanged.

  ``changed``: the config keys that differ from the checkpointed run (named when it does not fit)."""
  import orbax.checkpoint as ocp

  step = mngr.latest_step()
  if step is None:
    return 0, trainable, opt_state
  target = {"trainable": _by_path(trainable), "opt_state": _by_path(opt_state)}
  abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target)
  why = f"changed: {'; '.join(changed)}" if changed else None
  mismatch = _shape_mismatch(mngr, step, abstract)
  if mismatch:  # found from the metadata: no restore started (orbax would leave half-read arrays behind)
    raise ValueError(f"the checkpoint at step {step} in {mngr.directory} does not fit this config's parameters "
                     f"({why or mismatch}); pass --fresh to start over or choose a new out_dir")
  try:
    got = mngr.restore(step, args=ocp.args.StandardRestore(abstract))
    return step, _from_paths(trainable, got["trainable"]), _from_paths(opt_state, got["opt_state"])
  except Exception as e:  # noqa: BLE001 - orbax/tensorstore raise many types for a mismatch
    if isinstance(e, OSError) and e.errno is not None:
      raise
    raise ValueError(f"the checkpoint at step {step} in {mngr.directory} does not fit this config's parameters "
                     f"({why or type(e).__name__}); pass --fresh to start over or choose a new out_dir") from None


def _shape_mismatch(mngr, step: int, abstract) -> str | None:
  """The first path whose stored shape/dtype differs from ``abstract``'s (or is missing), or None."""
  from flax import traverse_util

  try:
    stored = traverse_util.flatten_dict(dict(mngr.item_metadata(step)))
  except Exception:  # noqa: BLE001 - no readable metadata: let restore decide
    return None
  want = traverse_util.flatten_dict(abstract)
  for k in sorted(set(want) | set(stored)):
    a, b = want.get(k), stored.get(k)
    if a is None or b is None:
      return f"{'/'.join(k)} is {'missing from the checkpoint' if b is None else 'not in this config'}"
    if tuple(a.shape) != tuple(getattr(b, "shape", ())) or str(a.dtype) != str(getattr(b, "dtype", a.dtype)):
      return f"{'/'.join(k)}: checkpoint {tuple(b.shape)} {b.dtype}, config {tuple(a.shape)} {a.dtype}"
  return None


def _shard(cfg: TrainConfig, tx, trainable, frozen, opt_state):
  """Places the training state on the config's ``mesh`` (jit then partitions the step, GSPMD).

  Base kernels, A/B (A follows the kernel's input axis, B its output axis) and
  optimizer moments (like their parameters) follow ``jax_lora.sharding`` rules;
  batches are split over the data axes.
  """
  from jax_lora import sharding as shd

  mesh, rules = shd.mesh_from_config(cfg.mesh)
  if frozen is None:  # full fine-tuning: every parameter is trainable
    tr_sh, fr_sh = shd.param_shardings(trainable, rules, mesh), None
  else:
    tr_sh, fr_sh = jl.split(shd.param_shardings(jl.combine(trainable, frozen), rules, mesh), bias=cfg.lora.bias,
                            modules_to_save=cfg.lora.modules_to_save)
  trainable = shd.place(trainable, tr_sh)
  frozen = None if frozen is None else shd.place(frozen, fr_sh)
  opt_state = shd.place(opt_state, shd.opt_state_shardings(tx, opt_state, tr_sh, mesh))
  data = shd.batch_sharding(mesh, rules)
  return trainable, frozen, opt_state, lambda batch: jax.device_put(batch, data)


def _prepare(cfg: TrainConfig, model, params):
  """``(trainable, frozen, gen_params, gen_apply)`` for the method."""
  if cfg.method == "full":
    return params, None, {"params": params}, None
  adapted = jl.init_lora(params, cfg.lora, jax.random.key(cfg.seed))
  if cfg.method == "qlora":  # the adapted base kernels to NF4, whatever their size (A/B stay float)
    import re

    from jax_lora.adapters import lora_weights

    adapted_paths = tuple(re.escape(p) for p in lora_weights(adapted))
    qcfg = dataclasses.replace(cfg.quant, targets=adapted_paths, compute_dtype=jnp.dtype(cfg.dtype))
    adapted = jl.quantize(adapted, qcfg)
  trainable, frozen = jl.split(adapted, bias=cfg.lora.bias, modules_to_save=cfg.lora.modules_to_save)
  return trainable, frozen, None, functools.partial(jl.linen.apply, model)


def _test_scores(cfg, model, gen_params, gen_apply, tok, test_rows) -> tuple[dict, list[str]]:
  prompts = [r["prompt"] for r in test_rows]
  refs = [r["completion"].strip() for r in test_rows]
  hyps = generate_texts(model, gen_params, gen_apply, tok, prompts, max_new_tokens=cfg.eval.max_new_tokens,
                        batch_size=cfg.eval.batch_size, bucket=cfg.data.bucket)
  return tm.score(cfg.eval.metrics, hyps, refs), hyps


@dataclasses.dataclass(frozen=True)
class _Data:
  """A run's tokenized data: the training batcher, validation batches, test rows."""

  batcher: Any
  train_examples: int
  # Training examples with no target token (their completion beyond seq_len; kept, no loss).
  no_target: int
  val_batches: list
  test_rows: list


def _load_data(cfg: TrainConfig, tok, decoder_start: int | None = None) -> _Data:
  """``decoder_start``: the decoder start token of an encoder–decoder model (None: causal LM)."""
  paths = resolve_data(cfg)
  pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
  if decoder_start is not None and cfg.data.packing:
    raise ValueError("data.packing is not supported for encoder–decoder (T5) models; set data.packing: false")

  def tokenize(rows, where):
    if decoder_start is None:
      return td.tokenize_rows(tok, rows, cfg.seq_len, where=where)
    return td.tokenize_seq2seq_rows(tok, rows, cfg.seq_len, decoder_start, where=where)

  train_ex = tokenize(td.load_rows(paths["train"]), paths["train"])
  batcher = td.Batcher(train_ex, batch_size=cfg.batch_size, seq_len=cfg.seq_len, pad_id=pad, seed=cfg.seed,
                       packing=cfg.data.packing, bucket=cfg.data.bucket)
  val_batches = []
  if paths["validation"]:
    val_rows = td.load_rows(paths["validation"])
    if cfg.eval.num_validation:
      val_rows = val_rows[: cfg.eval.num_validation]
    val_batches = td.eval_batches(tokenize(val_rows, paths["validation"]),
                                  batch_size=cfg.batch_size,
                                  seq_len=cfg.seq_len, pad_id=pad, bucket=cfg.data.bucket)
  test_rows = []
  if paths["test"] and cfg.eval.num_test:
    test_rows = [r for r in td.load_rows(paths["test"]) if "prompt" in r][: cfg.eval.num_test]
  return _Data(batcher, len(train_ex), td.no_target(train_ex), val_batches, test_rows)


def _metrics_row(event: str, step: int, scores: dict) -> dict:
  """A metrics.jsonl row from evaluation scores (the validation loss is ``val_loss`` there)."""
  row = {"event": event, "step": step}
  for k, v in scores.items():
    if k != "samples":
      row["val_loss" if k == "validation_loss" else k] = v
  return row


def _write_json(path: str, obj: Any) -> None:
  write_text(path, json.dumps(obj, indent=1))


def train(cfg: TrainConfig, before: dict[str, Any] | None = None, on_change: str = "refuse") -> dict[str, Any]:
  """Runs one fine-tuning job (resuming from ``out_dir/checkpoints`` if present).

  Args:
    cfg: the run's config.
    before: the untrained model's scores when the caller already has them (a
      comparison reuses one evaluation of the base model for every run that
      starts from it); None evaluates them here.
    on_change: when ``out_dir`` holds a run with another config: "refuse" (one
      line listing the differing keys), "resume" (continue its checkpoint under
      ``cfg``) or "fresh" (delete its outputs, start over); see :mod:`.outdir`.

  Returns:
    The results dict also written to ``out_dir/results.json``.

  Raises:
    ValueError: one line: bad data, a user's file in ``out_dir``, a changed config;
      :class:`TrainingStopped` when the loss diverged or the run was interrupted.
  """
  import yaml

  from . import outdir

  changed = outdir.prepare(cfg.out_dir, config_to_dict(cfg), on_change)
  write_text(os.path.join(cfg.out_dir, "config.yaml"), yaml.safe_dump(config_to_dict(cfg), sort_keys=False))
  outdir.record(cfg.out_dir, "config.yaml")
  t0 = time.perf_counter()
  model, params, mcfg, tok, model_path = load_model(cfg.model, cfg.dtype, remat=cfg.remat, attention=cfg.attention)
  data = _load_data(cfg, tok, mcfg.decoder_start_token_id if getattr(mcfg, "is_encoder_decoder", False) else None)
  steps = data.batcher.num_steps(cfg.steps, cfg.epochs / cfg.optim.grad_accum)
  trainable, frozen, _, gen_apply = _prepare(cfg, model, params)
  del params
  tx = build_optimizer(cfg.optim, steps)
  loss_fn = make_loss_fn(model, cfg.method, cfg.loss_chunk)
  mngr = _checkpointer(cfg.out_dir)
  start, trainable, opt_state = _restore(mngr, trainable, tx.init(trainable), changed)
  put_batch = None
  if cfg.mesh:
    trainable, frozen, opt_state, put_batch = _shard(cfg, tx, trainable, frozen, opt_state)
  opt_state, frozen, offload = offload_state(cfg.offload, opt_state, frozen)
  fr_dev = (offload or {}).get("frozen")
  frozen_on_device = (lambda: frozen) if fr_dev is None else (lambda: jax.device_put(frozen, fr_dev[0]))
  step_fn = make_train_step(loss_fn, tx, put_batch, loss_bucket=max(16, cfg.seq_len // 2), offload=offload)
  n_train = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(trainable))
  _log(cfg.out_dir, {"event": "setup", "model": model_path, "method": cfg.method,
                     "train_examples": data.train_examples, "no_target_examples": data.no_target,
                     "steps": steps, "trainable_params": n_train,
                     "resumed_from": start,
                     "total_params": n_train if frozen is None else jl.param_report(jl.combine(trainable, frozen)).total,
                     "setup_s": round(time.perf_counter() - t0, 1)})

  def evaluate(trainable) -> dict[str, Any]:
    """Validation loss and test-set scores of ``trainable`` (before / after training)."""
    out: dict[str, Any] = {}
    if data.val_batches:
      out["validation_loss"] = _validation_loss(loss_fn, trainable, frozen_on_device(), data.val_batches)
    if data.test_rows:
      t = time.perf_counter()
      gen_params = {"params": trainable} if cfg.method == "full" else jl.combine(trainable, frozen_on_device())
      scores, hyps = _test_scores(cfg, model, gen_params, gen_apply, tok, data.test_rows)
      out.update(scores, eval_s=round(time.perf_counter() - t, 1), samples=hyps[:5])
    return out

  results: dict[str, Any] = {"steps": steps, "trainable_params": n_train}
  before_path = os.path.join(cfg.out_dir, "before.json")
  if start == 0 or not os.path.exists(before_path):
    before = evaluate(trainable) if before is None else before
    _write_json(before_path, before)
    outdir.record(cfg.out_dir, "before.json")
    _log(cfg.out_dir, _metrics_row("before", 0, before))
  with open(before_path, encoding="utf-8") as f:
    results["before"] = json.load(f)

  t_train = time.perf_counter()
  trainable, opt_state, compile_s = _run_steps(cfg, data, step_fn, loss_fn, mngr, trainable, frozen, opt_state,
                                               start, steps, frozen_on_device)
  train_s = time.perf_counter() - t_train
  after = evaluate(trainable)
  results.update(after=after, train_s=round(train_s, 1), steps_run=steps - start,
                 s_per_step=round(train_s / max(steps - start, 1), 3),
                 references=[r["completion"].strip() for r in data.test_rows[:5]], compile_s=round(compile_s, 1))
  _export(cfg, model, mcfg, trainable, frozen_on_device(), model_path, tok)
  _log(cfg.out_dir, {**_metrics_row("after", steps, after), "train_s": results["train_s"],
                     "compile_s": results["compile_s"]})
  _write_json(os.path.join(cfg.out_dir, "results.json"), results)
  outdir.record(cfg.out_dir, "results.json")
  from .report import write_curves, write_report

  write_report(cfg, results)
  outdir.record(cfg.out_dir, "report.md")
  write_curves(cfg.out_dir)
  outdir.record(cfg.out_dir, "curves.png")
  return results


def _run_steps(cfg: TrainConfig, data: _Data, step_fn, loss_fn, mngr, trainable, frozen, opt_state,
               start: int, steps: int, frozen_on_device: Callable):
  """Optimizer steps ``start..steps``: logging, validation, checkpoints. Returns
  ``(trainable, opt_state, compile seconds)``. ``frozen_on_device()`` is the frozen
  base for validation (a device copy when it is offloaded to host memory).

  Raises :class:`TrainingStopped` when a step's loss or gradients are not finite
  (nothing of that step is kept or saved) and on Ctrl-C (at the end of the step
  running then, after saving a checkpoint of it)."""
  accum = cfg.optim.grad_accum
  base_key = jax.random.key(cfg.seed + 1)
  losses, timed, tokens, compile_s = [], [], 0, 0.0
  t_train = time.perf_counter()
  schedule = lr_schedule(cfg.optim, steps)
  bar = tqdm.tqdm(total=steps, initial=start, desc="train", unit="step") if sys.stderr.isatty() else None
  last_finite, saved = None, mngr.latest_step()
  with _sigint_flag() as interrupted:
    for step in range(start, steps):
      for k in range(accum):
        micro = step * accum + k
        batch = {n: jnp.asarray(v) for n, v in data.batcher.batch_at(micro).items()}
        t = time.perf_counter()
        trainable, opt_state, loss = step_fn(trainable, opt_state, frozen, batch, jax.random.fold_in(base_key, micro))
        jax.block_until_ready(loss)
        dt = time.perf_counter() - t
        if not bool(step_fn.finite):
          if bar is not None:
            bar.close()
          _diverged(cfg, mngr, step + 1, float(loss), last_finite, saved)
        last_finite = (step + 1, float(loss))
        if step_fn.compile_s:  # this call compiled: report it apart
          compile_s += dt
          _log(cfg.out_dir, {"event": "compile", "step": step + 1, "compile_s": round(dt, 2),
                             "shape": list(batch["input_ids"].shape)})
        else:
          timed.append(dt)
          tokens += int((np.asarray(batch["attention_mask"]) > 0).sum())
        losses.append(loss)
      done = step + 1
      if bar is not None:
        bar.update(1)
        bar.set_postfix(loss=f"{float(loss):.3f}")
      if done % cfg.log_every == 0 or done == steps:
        row = {"event": "train", "step": done, "loss": round(float(np.mean([float(x) for x in losses])), 4),
               "lr": float(schedule(done - 1)), "elapsed_s": round(time.perf_counter() - t_train, 1)}
        if timed:  # the jitted step alone, result blocked on; compiles excluded
          row.update(step_time_s=round(float(np.mean(timed)) * accum, 4), tokens_per_s=round(tokens / sum(timed), 1))
        losses, timed, tokens = [], [], 0
        _log(cfg.out_dir, row)
      if data.val_batches and ((cfg.eval_every and done % cfg.eval_every == 0) or done == steps):
        vl = _validation_loss(loss_fn, trainable, frozen_on_device(), data.val_batches)
        _log(cfg.out_dir, {"event": "validation", "step": done, "val_loss": round(vl, 4)})
      if (cfg.checkpoint_every and done % cfg.checkpoint_every == 0) or done == steps:
        _save(mngr, done, trainable, opt_state)
        saved = done
      if interrupted() and done < steps:
        if bar is not None:
          bar.close()
        if saved != done:
          _save(mngr, done, trainable, opt_state)
        _log(cfg.out_dir, {"event": "interrupted", "step": done})
        raise TrainingStopped(f"interrupted at step {done} of {steps} (checkpoint saved); "
                              "re-run the same command to resume", exit_code=130)
  if bar is not None:
    bar.close()
  return trainable, opt_state, compile_s


def _diverged(cfg: TrainConfig, mngr, step: int, loss: float, last_finite, saved) -> None:
  """Logs and raises the one line of a run whose step ``step`` was not finite."""
  _log(cfg.out_dir, {"event": "diverged", "step": step, "loss": loss if math.isfinite(loss) else str(loss)})
  what = f"the loss is {loss}" if not math.isfinite(loss) else f"the gradients or updated weights are not finite (loss {loss:.4g})"
  last = f"last finite loss {last_finite[1]:.4g} at step {last_finite[0]}" if last_finite else "no finite step before it"
  kept = f"the last checkpoint with finite weights (step {saved}) is kept" if saved else "no checkpoint was written"
  raise TrainingStopped(f"training diverged at step {step}: {what} ({last}); {kept} and nothing was exported; "
                        "lower optim.lr (or raise optim.warmup_steps) and re-run with --resume-changed or --fresh")


@contextlib.contextmanager
def _sigint_flag():
  """``with _sigint_flag() as interrupted:``: a first Ctrl-C sets ``interrupted()`` (the loop
  stops at the end of its step, after a checkpoint); a second one interrupts at once.
  Outside the main thread, Ctrl-C behaves as usual."""
  import signal
  import threading

  hit = []
  if threading.current_thread() is not threading.main_thread():
    yield lambda: False
    return

  def handler(signum, frame):
    hit.append(True)
    signal.signal(signal.SIGINT, signal.default_int_handler)

  previous = signal.signal(signal.SIGINT, handler)
  try:
    yield lambda: bool(hit)
  finally:
    signal.signal(signal.SIGINT, previous)


def _export(cfg: TrainConfig, model, mcfg, trainable, frozen, model_path: str, tokenizer: Any = None) -> None:
  """Writes ``adapter/`` (PEFT) for LoRA, ``model/`` (HF, with the run's tokenizer) for full fine-tuning, through
  :func:`jax_lora.files.output_folder` (replaces only the run's own earlier export; refuses
  NaN/inf weights)."""
  from jax_lora.files import output_folder

  from . import outdir

  name = "model" if cfg.method == "full" else "adapter"
  with output_folder(os.path.join(cfg.out_dir, name), "train") as tmp:
    if cfg.method == "full":
      from jax_lora.models.hf import save_hf

      save_hf(tmp, trainable, mcfg)
      if tokenizer is not None:  # a folder that `jax-lora eval` / transformers load as is
        tokenizer.save_pretrained(tmp)
    else:
      jl.save_peft(tmp, jl.combine(trainable, frozen), model_type=getattr(mcfg, "model_type", "llama"),
                   base_model_name_or_path=model_path, bias=cfg.lora.bias,
                   modules_to_save=cfg.lora.modules_to_save)
  outdir.record(cfg.out_dir)
