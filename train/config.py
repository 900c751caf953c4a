"""The training job's configuration: frozen dataclasses, YAML loading, dotted overrides.

A config is a YAML mapping whose keys are the fields below (nested sections as
nested mappings). ``load_config(path, ["optim.lr=1e-3", "lora.rank=8"])`` reads
the file, applies ``key=value`` overrides (the value parsed as YAML), and
validates everything: an unknown key or a bad value raises a one-line
``ValueError`` naming the dotted key and the fix.

Data: give ``data.train`` / ``data.validation`` / ``data.test`` (local jsonl
files of ``{"text": ...}`` or ``{"prompt": ..., "completion": ...}`` rows), or
leave them out and name a shipped ``data.task`` (``de_en`` or
``wordnet_gloss``): its splits are then built once by :mod:`train.tasks` into
``data.cache_dir`` (default ``$JAX_LORA_DATA`` or ``~/.cache/jax_lora/data``),
in ``<cache_dir>/<task>-seed<data.split_seed>/``; see :func:`resolve_data`.
With ``data.train`` given, ``data.task`` is ignored.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import re
import types
import typing
from typing import Any

import yaml

from jax_lora import LoraConfig, QuantConfig
from jax_lora.models.attention import IMPLEMENTATIONS as _ATTENTION
from jax_lora.remat import POLICIES as _REMAT

__all__ = [
    "SHIPPED_MODELS",
    "DataConfig",
    "LORA_DEFAULTS",
    "QUANT_DEFAULTS",
    "lora_section",
    "quant_section",
    "OptimConfig",
    "EvalConfig",
    "TrainConfig",
    "load_config",
    "config_from_dict",
    "config_to_dict",
    "apply_overrides",
    "resolve_data",
    "resolve_model",
    "validate",
]

# Names of models that ship inside installed packages (resolved by resolve_model).
SHIPPED_MODELS = ("smollm2-135m", "gemma3-270m")
_METHODS = ("lora", "qlora", "full")
_DTYPES = ("float32", "bfloat16")
_SCHEDULES = ("cosine", "linear", "constant")
_METRICS = ("bleu", "rouge")
_OFFLOAD = ("none", "optimizer", "optimizer+base")


@dataclasses.dataclass(frozen=True, kw_only=True)
class DataConfig:
  """Where the examples come from and how they are batched."""

  # A shipped task ("de_en" or "wordnet_gloss", built offline) used when data.train is absent.
  task: str | None = "de_en"
  # jsonl files with {"text"} or {"prompt", "completion"} rows (relative to the working directory).
  train: str | None = None
  validation: str | None = None
  test: str | None = None
  # Where shipped tasks are built (None: $JAX_LORA_DATA or ~/.cache/jax_lora/data).
  cache_dir: str | None = None
  # Seed of the train/validation/test split of a shipped task (fixed so runs compare).
  split_seed: int = 0
  # Pack several examples into each seq_len row (True) or pad each to a length bucket (False).
  packing: bool = False
  # Padded lengths are multiples of this (fewer distinct shapes, fewer recompiles).
  bucket: int = 16


# The ``lora`` and ``quant`` sections are the library's own config types; a YAML
# section overrides these run defaults field by field.
LORA_DEFAULTS = LoraConfig(rank=16, alpha=32.0, targets=("all-linear",))
QUANT_DEFAULTS = QuantConfig(scheme="nf4", block_size=64, double_quant=True)
# YAML keys of the quant section and the QuantConfig field each sets ("type" is
# the documented spelling of "scheme").
_QUANT_KEYS = {"type": "scheme", "scheme": "scheme", "block_size": "block_size", "double_quant": "double_quant",
               "dq_block_size": "dq_block_size"}
# PEFT spellings accepted in a lora section (e.g. an adapter_config.json pasted in).
_PEFT_KEYS = {"r": "rank", "lora_alpha": "alpha", "lora_dropout": "dropout", "target_modules": "targets"}
# LoraConfig fields that a YAML lora section may set.
_LORA_KEYS = ("rank", "alpha", "targets", "dropout", "use_rslora", "init", "bias", "rank_pattern", "alpha_pattern",
              "use_dora", "modules_to_save", "trainable_token_indices")


@dataclasses.dataclass(frozen=True, kw_only=True)
class OptimConfig:
  """optax AdamW with warmup, a decay schedule, clipping and gradient accumulation."""

  # Optimizer (only "adamw").
  name: str = "adamw"
  # Peak learning rate.
  lr: float = 5e-4
  # Linear warmup steps from 0 to lr.
  warmup_steps: int = 10
  # Decay after warmup: "cosine" (to end_lr_ratio·lr), "linear" or "constant".
  schedule: str = "cosine"
  # Final learning rate as a fraction of lr.
  end_lr_ratio: float = 0.0
  # Decoupled weight decay.
  weight_decay: float = 0.0
  # Adam moment decay rates and epsilon.
  b1: float = 0.9
  b2: float = 0.999
  eps: float = 1e-8
  # Clip the global gradient norm to this (0 disables clipping).
  grad_clip: float = 1.0
  # Micro-batches accumulated per optimizer step (optax.MultiSteps).
  grad_accum: int = 1


@dataclasses.dataclass(frozen=True, kw_only=True)
class EvalConfig:
  """Generation-based evaluation on the test split (before and after training)."""

  # Tokens generated per test prompt (greedy).
  max_new_tokens: int = 48
  # How many test prompts to decode (0: none; they are the first num_test rows).
  num_test: int = 150
  # Scores of the decoded text: any of "bleu" (sacreBLEU) and "rouge" (ROUGE-1/2/L F).
  metrics: tuple[str, ...] = ("bleu",)
  # Prompts decoded together.
  batch_size: int = 16
  # Validation examples used for the validation loss (0: all).
  num_validation: int = 0


@dataclasses.dataclass(frozen=True, kw_only=True)
class TrainConfig:
  """One fine-tuning run."""

  # Local HF folder, a .gguf file, or a shipped model name ("smollm2-135m").
  model: str = "smollm2-135m"
  # Examples and batching.
  data: DataConfig = dataclasses.field(default_factory=DataConfig)
  # "lora", "qlora" (NF4 base + LoRA) or "full" (every parameter trains).
  method: str = "lora"
  # LoRA settings: jax_lora.LoraConfig fields (rank, alpha, targets, dropout, use_rslora,
  # init, bias, rank_pattern, alpha_pattern) over LORA_DEFAULTS.
  lora: LoraConfig = LORA_DEFAULTS
  # Base quantization for method "qlora": jax_lora.QuantConfig (type, block_size,
  # double_quant, dq_block_size) over QUANT_DEFAULTS.
  quant: QuantConfig = QUANT_DEFAULTS
  optim: OptimConfig = dataclasses.field(default_factory=OptimConfig)
  # Sequences per micro-batch.
  batch_size: int = 8
  # Longest sequence in tokens (longer examples are truncated).
  seq_len: int = 96
  # Optimizer steps; 0 means derive from epochs.
  steps: int = 0
  # Passes over the training split (used when steps is 0).
  epochs: float = 1.0
  # Validation loss every this many steps (0: only at the end).
  eval_every: int = 50
  # Print the training loss every this many steps.
  log_every: int = 10
  # Seed of LoRA init, dropout and the data order.
  seed: int = 0
  # Run folder: metrics, adapter, checkpoints.
  out_dir: str = "runs/default"
  # Save a resumable checkpoint every this many steps (0: only at the end).
  checkpoint_every: int = 0
  # Compute dtype of the model: "float32" or "bfloat16".
  dtype: str = "float32"
  # Tokens per chunk of the LM head + cross-entropy (0: the whole batch's loss positions at once;
  # N > 0: never more than N tokens' float32 logits, for large vocabularies and long contexts).
  loss_chunk: int = 0
  # Decode-and-score evaluation.
  eval: EvalConfig = dataclasses.field(default_factory=EvalConfig)
  # Device mesh for data/model parallel runs (None: one device; reserved for scale-out).
  mesh: dict | None = None
  # Gradient checkpointing of each decoder layer (set on the model config): "none" (keep every
  # activation), "full" (recompute the layer in the backward pass), "dots" (keep the matmul
  # outputs, recompute the rest) or "offload" (like full, layer inputs kept in host memory).
  remat: str = "none"
  # Host memory between steps: "none", "optimizer" (AdamW state in pinned host memory, moved to
  # the device inside each step) or "optimizer+base" (the frozen base too; lora/qlora only).
  offload: str = "none"
  # Attention of the training/scoring forward pass (set on the model config): "auto" (naive up to
  # 1024 tokens, blockwise flash-style above; cuDNN on GPU in bf16), "naive", "blockwise", "xla",
  # "cudnn". See jax_lora.models.attention.
  attention: str = "auto"


_SECTIONS = {"data": DataConfig, "optim": OptimConfig, "eval": EvalConfig}


def _all_keys(cls=TrainConfig, prefix: str = "") -> list[str]:
  keys = []
  for f in dataclasses.fields(cls):
    keys.append(prefix + f.name)
    if prefix == "" and f.name in _SECTIONS:
      keys.extend(_all_keys(_SECTIONS[f.name], f"{f.name}."))
    elif prefix == "" and f.name == "lora":
      keys.extend(f"lora.{k}" for k in _LORA_KEYS)
    elif prefix == "" and f.name == "quant":
      keys.extend(f"quant.{k}" for k in _QUANT_KEYS)
  return keys


def _pairs(key: str, value: Any, kind: type) -> tuple:
  """A ``{regex: value}`` mapping as ``((regex, value), ...)`` (rank/alpha patterns)."""
  if not isinstance(value, dict):
    raise ValueError(f"config key '{key}' must be a mapping of path regex to {kind.__name__}, got {value!r}")
  return tuple((str(k), _coerce(f"{key}.{k}", kind, v)) for k, v in value.items())


def lora_section(raw: Any, where: str = "lora", base: LoraConfig = LORA_DEFAULTS) -> LoraConfig:
  """The :class:`jax_lora.LoraConfig` of a YAML ``lora`` mapping, over ``base``.

  Keys are LoraConfig's fields (PEFT's ``r``/``lora_alpha``/``lora_dropout``/
  ``target_modules`` are accepted too); an unknown key or a bad value raises a
  one-line ValueError naming ``where.key``.
  """
  if not isinstance(raw, dict):
    raise ValueError(f"config key '{where}' must be a mapping, got {raw!r}")
  kw: dict[str, Any] = {}
  for k, v in raw.items():
    name = _PEFT_KEYS.get(k, k)
    key = f"{where}.{k}"
    if name not in _LORA_KEYS:
      raise _unknown(key)
    if name in ("rank_pattern", "alpha_pattern"):
      kw[name] = _pairs(key, v, int if name == "rank_pattern" else float)
    elif name == "trainable_token_indices":  # [ids] (embed_tokens) or {module: [ids]}; LoraConfig checks
      kw[name] = v
    else:
      kw[name] = _coerce(key, {"rank": int, "alpha": float, "dropout": float, "use_rslora": bool, "use_dora": bool,
                               "targets": tuple[str, ...], "modules_to_save": tuple[str, ...]}.get(name, str), v)
  try:
    return dataclasses.replace(base, **kw)
  except ValueError as e:
    raise _keyed(e, "LoraConfig", where) from None


def _keyed(e: ValueError, cls: str, where: str) -> ValueError:
  """The library's "LoraConfig.rank must ..." as "config key 'lora.rank' must ..."."""
  msg, n = re.subn(rf"{cls}\.(\w+)(=\S+)?", lambda m: f"config key '{where}.{m.group(1)}'", str(e))
  return ValueError(msg if n else f"config key '{where}': {e}")


def quant_section(raw: Any, where: str = "quant", base: QuantConfig = QUANT_DEFAULTS) -> QuantConfig:
  """The :class:`jax_lora.QuantConfig` of a YAML ``quant`` mapping, over ``base``."""
  if not isinstance(raw, dict):
    raise ValueError(f"config key '{where}' must be a mapping, got {raw!r}")
  kw: dict[str, Any] = {}
  for k, v in raw.items():
    key = f"{where}.{k}"
    if k not in _QUANT_KEYS:
      raise _unknown(key)
    kw[_QUANT_KEYS[k]] = _coerce(key, {"double_quant": bool, "type": str, "scheme": str}.get(k, int), v)
  try:
    return dataclasses.replace(base, **kw)
  except ValueError as e:
    raise _keyed(e, "QuantConfig", where) from None


def _unknown(key: str) -> ValueError:
  close = difflib.get_close_matches(key, _all_keys(), n=1, cutoff=0.6)
  hint = f" (did you mean '{close[0]}'?)" if close else f"; known keys: {', '.join(_all_keys())}"
  return ValueError(f"unknown config key '{key}'{hint}")


def _coerce(key: str, tp: Any, value: Any) -> Any:
  """Checks ``value`` against the field type ``tp`` (ints may stand for floats, lists for tuples)."""
  origin = typing.get_origin(tp)
  if origin in (typing.Union, types.UnionType):
    args = typing.get_args(tp)
    if value is None and type(None) in args:
      return None
    inner = [a for a in args if a is not type(None)]
    return _coerce(key, inner[0], value)
  if tp is bool:
    if isinstance(value, bool):
      return value
    raise ValueError(f"config key '{key}' must be true or false, got {value!r}")
  if tp is int:
    if isinstance(value, int) and not isinstance(value, bool):
      return value
    raise ValueError(f"config key '{key}' must be an integer, got {value!r}")
  if tp is float:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
      return float(value)
    if isinstance(value, str):  # YAML 1.1 reads "1e-3" (no dot) as a string
      try:
        return float(value)
      except ValueError:
        pass
    raise ValueError(f"config key '{key}' must be a number, got {value!r}")
  if tp is str:
    if isinstance(value, str):
      return value
    raise ValueError(f"config key '{key}' must be a string, got {value!r}")
  if origin is tuple:
    if isinstance(value, str):
      value = [value]
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
      raise ValueError(f"config key '{key}' must be a list of strings, got {value!r}")
    return tuple(value)
  if tp is dict or origin is dict:
    if isinstance(value, dict):
      return value
    raise ValueError(f"config key '{key}' must be a mapping, got {value!r}")
  raise TypeError(f"unsupported field type {tp!r} for '{key}'")


def _build(cls, raw: Any, prefix: str):
  if raw is None:
    raw = {}
  if not isinstance(raw, dict):
    raise ValueError(f"config key '{prefix.rstrip('.') or '<top>'}' must be a mapping, got {raw!r}")
  hints = typing.get_type_hints(cls)
  names = {f.name for f in dataclasses.fields(cls)}
  kwargs = {}
  for k, v in raw.items():
    key = f"{prefix}{k}"
    if k not in names:
      raise _unknown(key)
    if prefix == "" and k in _SECTIONS:
      kwargs[k] = _build(_SECTIONS[k], v, f"{k}.")
    elif prefix == "" and k == "lora":
      kwargs[k] = lora_section(v or {})
    elif prefix == "" and k == "quant":
      kwargs[k] = quant_section(v or {})
    else:
      kwargs[k] = _coerce(key, hints[k], v)
  return cls(**kwargs)


def _check(ok: bool, message: str) -> None:
  if not ok:
    raise ValueError(message)


def _choice(key: str, value: Any, allowed: tuple[str, ...]) -> None:
  _check(value in allowed, f"config key '{key}' must be one of {', '.join(allowed)}; got {value!r}")


def validate(cfg: TrainConfig, check_files: bool = True) -> TrainConfig:
  """Checks values (ranges, choices, files); returns ``cfg`` or raises a one-line ValueError."""
  from . import tasks

  _choice("method", cfg.method, _METHODS)
  _choice("dtype", cfg.dtype, _DTYPES)
  if check_files and cfg.model not in SHIPPED_MODELS:
    _check(os.path.exists(cfg.model),
           f"config key 'model': {cfg.model!r} is neither a shipped model ({', '.join(SHIPPED_MODELS)}) "
           "nor an existing HF folder or .gguf file; fix the path")
  d = cfg.data
  paths = {s: getattr(d, s) for s in ("train", "validation", "test")}
  if d.task is not None:
    _choice("data.task", d.task, tasks.TASKS)
  if d.train is None and d.task is None:
    _check(paths["train"] is not None, "config key 'data.train' is missing; give a jsonl path or set data.task to de_en or wordnet_gloss")
  if check_files:
    for s, p in paths.items():
      if p is not None:
        _check(os.path.isfile(p), f"config key 'data.{s}': file {p!r} does not exist; fix the path or remove the key")
  _check(d.bucket >= 1, f"config key 'data.bucket' must be >= 1, got {d.bucket}")
  # lora and quant are validated by jax_lora.LoraConfig / QuantConfig themselves
  o = cfg.optim
  _choice("optim.name", o.name, ("adamw",))
  _check(o.lr > 0 and math.isfinite(o.lr), f"config key 'optim.lr' must be a positive number, got {o.lr}")
  _check(o.warmup_steps >= 0, f"config key 'optim.warmup_steps' must be >= 0, got {o.warmup_steps}")
  _choice("optim.schedule", o.schedule, _SCHEDULES)
  _check(0 <= o.end_lr_ratio <= 1, f"config key 'optim.end_lr_ratio' must be in [0, 1], got {o.end_lr_ratio}")
  _check(o.weight_decay >= 0, f"config key 'optim.weight_decay' must be >= 0, got {o.weight_decay}")
  _check(0 <= o.b1 < 1 and 0 <= o.b2 < 1, f"config keys 'optim.b1'/'optim.b2' must be in [0, 1), got {o.b1}, {o.b2}")
  _check(o.eps > 0, f"config key 'optim.eps' must be positive, got {o.eps}")
  _check(o.grad_clip >= 0, f"config key 'optim.grad_clip' must be >= 0 (0 disables clipping), got {o.grad_clip}")
  _check(o.grad_accum >= 1, f"config key 'optim.grad_accum' must be >= 1, got {o.grad_accum}")
  _check(cfg.batch_size >= 1, f"config key 'batch_size' must be >= 1, got {cfg.batch_size}")
  _check(cfg.seq_len >= 2, f"config key 'seq_len' must be >= 2, got {cfg.seq_len}")
  _check(cfg.steps >= 0, f"config key 'steps' must be >= 0 (0: use epochs), got {cfg.steps}")
  _check(cfg.steps > 0 or cfg.epochs > 0, f"config key 'epochs' must be > 0 when steps is 0, got {cfg.epochs}")
  for k in ("eval_every", "checkpoint_every"):
    _check(getattr(cfg, k) >= 0, f"config key '{k}' must be >= 0 (0: only at the end), got {getattr(cfg, k)}")
  _check(cfg.loss_chunk >= 0, f"config key 'loss_chunk' must be >= 0 (0: no chunking), got {cfg.loss_chunk}")
  _check(cfg.log_every >= 1, f"config key 'log_every' must be >= 1, got {cfg.log_every}")
  _choice("remat", cfg.remat, _REMAT)
  _choice("attention", cfg.attention, _ATTENTION)
  _choice("offload", cfg.offload, _OFFLOAD)
  _check(cfg.offload != "optimizer+base" or cfg.method != "full",
         "config key 'offload': 'optimizer+base' needs method lora or qlora (full fine-tuning has no frozen base); "
         "use offload: optimizer")
  e = cfg.eval
  _check(e.max_new_tokens >= 1, f"config key 'eval.max_new_tokens' must be >= 1, got {e.max_new_tokens}")
  _check(e.num_test >= 0, f"config key 'eval.num_test' must be >= 0, got {e.num_test}")
  _check(e.batch_size >= 1, f"config key 'eval.batch_size' must be >= 1, got {e.batch_size}")
  _check(e.num_validation >= 0, f"config key 'eval.num_validation' must be >= 0, got {e.num_validation}")
  for m in e.metrics:
    _choice("eval.metrics", m, _METRICS)
  return cfg


def _set_dotted(tree: dict, key: str, value: Any) -> None:
  parts = key.split(".")
  node = tree
  for i, p in enumerate(parts[:-1]):
    sub = node.get(p)
    if sub is None:
      sub = node[p] = {}
    if not isinstance(sub, dict):
      raise ValueError(f"override '{key}': '{'.'.join(parts[:i + 1])}' is not a section")
    node = sub
  node[parts[-1]] = value


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
  """Returns a copy of ``raw`` with each ``dotted.key=value`` set (value parsed as YAML)."""
  import copy

  out = copy.deepcopy(raw)
  known = set(_all_keys())
  for item in overrides:
    key, sep, text = item.partition("=")
    key = key.strip()
    if not sep or not key:
      raise ValueError(f"override {item!r} is not key=value; write e.g. optim.lr=1e-3")
    if key not in known and not key.startswith("mesh."):
      raise _unknown(key)
    try:
      value = yaml.safe_load(text)
    except yaml.YAMLError:
      raise ValueError(f"override {item!r}: the value is not valid YAML; quote it") from None
    _set_dotted(out, key, value)
  return out


def config_from_dict(raw: dict | None, check_files: bool = True) -> TrainConfig:
  """Builds and validates a :class:`TrainConfig` from a nested mapping."""
  return validate(_build(TrainConfig, raw or {}, ""), check_files=check_files)


def config_to_dict(cfg: TrainConfig) -> dict:
  """The nested mapping of ``cfg`` (tuples as lists), fit for ``yaml.safe_dump``."""

  def plain(x):
    if isinstance(x, dict):
      return {k: plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
      return [plain(v) for v in x]
    return x

  out = {}
  for f in dataclasses.fields(cfg):
    v = getattr(cfg, f.name)
    if f.name == "lora":
      v = {k: dict(getattr(v, k)) if k.endswith("_pattern") else getattr(v, k) for k in _LORA_KEYS}
    elif f.name == "quant":
      v = {"type": v.scheme, "block_size": v.block_size, "double_quant": v.double_quant,
           "dq_block_size": v.dq_block_size}
    elif dataclasses.is_dataclass(v):
      v = dataclasses.asdict(v)
    out[f.name] = v
  return plain(out)


# The main job's config (German→English LoRA on the shipped Gemma-3-270M), read when no path is given.
# It ships inside the package (configs/ of the repo is a link to it).
DEFAULT_CONFIG = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs", "default.yaml")


def read_yaml_mapping(path: str, what: str, expected: str) -> dict:
  """The mapping in a YAML file; a one-line ValueError naming ``what`` if the file is
  missing, not YAML, or not ``expected`` (a mapping)."""
  if not os.path.isfile(path):
    raise ValueError(f"{what} {path!r} does not exist")
  with open(path, encoding="utf-8") as f:
    try:
      raw = yaml.safe_load(f) or {}
    except yaml.YAMLError as e:
      raise ValueError(f"{what} {path!r} is not valid YAML: {str(e).splitlines()[0]}") from None
  if not isinstance(raw, dict):
    raise ValueError(f"{what} {path!r} must hold {expected}")
  return raw


def load_config(path: str | None, overrides: list[str] | tuple[str, ...] = (), check_files: bool = True) -> TrainConfig:
  """Reads a YAML config (or the defaults when ``path`` is None) and applies overrides.

  Args:
    path: YAML file, or None for the packaged default config (the main job).
    overrides: ``"key=value"`` strings with dotted keys for nested sections,
      e.g. ``["optim.lr=1e-3", "lora.targets=[q_proj]"]``; values are parsed as YAML.
    check_files: verify that data files and the model path exist.

  Returns:
    The validated, frozen config.

  Raises:
    ValueError: unknown key (with the closest known key), bad value, missing file.
  """
  if path is None:
    path = DEFAULT_CONFIG  # `jax-lora train` with no argument runs the shipped default job
  raw = read_yaml_mapping(path, "config file", "a mapping of keys to values")
  return config_from_dict(apply_overrides(raw, list(overrides)), check_files=check_files)


def resolve_data(cfg: TrainConfig) -> dict[str, str | None]:
  """Paths of the train/validation/test jsonl files, building a shipped task if needed.

  With ``data.train`` given, the files are exactly ``data.train``/``validation``/``test``
  (the latter two may be None). Without it, all three come from the shipped
  ``data.task`` (built once into ``data.cache_dir``) unless given explicitly.
  """
  d = cfg.data
  paths = {"train": d.train, "validation": d.validation, "test": d.test}
  if d.train is None:
    from . import tasks

    built = tasks.build_task(d.task, d.cache_dir, d.split_seed)
    paths = {k: v if v is not None else built[k] for k, v in paths.items()}
  return paths


def resolve_model(name: str) -> str:
  """The HF folder for ``model``: a shipped name or a ``.gguf`` file becomes its cached converted
  folder (:func:`jax_lora.models.resolve_model`, the one resolver every command uses)."""
  from jax_lora.models import resolve_model as resolve

  return resolve(name)
