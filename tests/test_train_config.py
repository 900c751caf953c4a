"""train.config: YAML loading, dotted overrides, validation errors that name the key and the fix."""

import dataclasses
import os

import pytest
import yaml

from jax_lora_app import config as tc

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _write(tmp_path, data, name="c.yaml"):
  p = tmp_path / name
  p.write_text(yaml.safe_dump(data))
  return str(p)


def _jsonl(tmp_path, name="train.jsonl"):
  p = tmp_path / name
  p.write_text('{"text": "hello world"}\n')
  return str(p)


def test_defaults_are_frozen_and_valid():
  cfg = tc.load_config(None, check_files=False)
  # no path: the shipped main job (configs/default.yaml), sized for under 15 min on 2 cores
  assert cfg == tc.load_config(os.path.join(REPO, "configs", "default.yaml"), check_files=False)
  assert cfg.steps == 120 and cfg.data.task == "de_en"
  with pytest.raises(dataclasses.FrozenInstanceError):
    cfg.seed = 3  # type: ignore[misc]


@pytest.mark.parametrize("name, model", [("default.yaml", "gemma3-270m"), ("gemma3_270m.yaml", "gemma3-270m"),
                                         ("smollm2_135m.yaml", "smollm2-135m"), ("wordnet_gloss.yaml", "smollm2-135m")])
def test_shipped_configs_load(name, model):
  cfg = tc.load_config(os.path.join(REPO, "configs", name))
  assert cfg.model == model and cfg.method == "lora" and cfg.data.task in ("de_en", "wordnet_gloss")
  assert cfg.lora.targets == ("all-linear",)


def test_default_is_the_gemma_job():
  """configs/default.yaml and configs/gemma3_270m.yaml are one job (only out_dir differs)."""
  a = tc.config_to_dict(tc.load_config(os.path.join(REPO, "configs", "default.yaml"), check_files=False))
  b = tc.config_to_dict(tc.load_config(os.path.join(REPO, "configs", "gemma3_270m.yaml"), check_files=False))
  assert a.pop("out_dir") == "runs/default" and b.pop("out_dir") == "runs/gemma3_270m"
  assert a == b


def test_yaml_values_and_overrides(tmp_path):
  train = _jsonl(tmp_path)
  path = _write(tmp_path, {"data": {"train": train}, "optim": {"lr": 0.01}, "lora": {"rank": 4}, "steps": 7})
  cfg = tc.load_config(path, ["optim.lr=1e-3", "lora.targets=[q_proj, v_proj]", "dtype=bfloat16",
                              "data.packing=true", "mesh={data: 2}"], check_files=False)
  assert cfg.optim.lr == 1e-3 and isinstance(cfg.optim.lr, float)
  assert cfg.lora.rank == 4 and cfg.steps == 7
  assert cfg.lora.targets == ("q_proj", "v_proj")
  assert cfg.dtype == "bfloat16" and cfg.data.packing is True and cfg.mesh == {"data": 2}
  assert cfg.data.train == train


def test_round_trip_through_dict(tmp_path):
  cfg = tc.load_config(os.path.join(REPO, "configs", "default.yaml"), ["lora.rank=4"])
  again = tc.config_from_dict(yaml.safe_load(yaml.safe_dump(tc.config_to_dict(cfg))))
  assert again == cfg


@pytest.mark.parametrize(
    "override, message",
    [
        ("optim.lrr=1", "unknown config key 'optim.lrr' (did you mean 'optim.lr'?)"),
        ("batchsize=4", "unknown config key 'batchsize' (did you mean 'batch_size'?)"),
        ("lora.rnak=4", "(did you mean 'lora.rank'?)"),
        ("lora.rank=0", "'lora.rank' must be a positive integer"),
        ("lora.rank=2.5", "'lora.rank' must be an integer"),
        ("optim.lr=-1", "'optim.lr' must be a positive number"),
        ("method=dora", "'method' must be one of lora, qlora, full"),
        ("dtype=float16", "'dtype' must be one of float32, bfloat16"),
        ("lora.dropout=1.5", "'lora.dropout' must be in [0, 1)"),
        ("optim.grad_accum=0", "'optim.grad_accum' must be >= 1"),
        ("data.task=summarize", "'data.task' must be one of de_en, wordnet_gloss"),
        ("data.train=/no/such/file.jsonl", "'data.train': file '/no/such/file.jsonl' does not exist"),
        ("model=/no/such/model", "'model'"),
        ("eval.metrics=[bleu, meteor]", "'eval.metrics' must be one of bleu, rouge"),
        ("data.packing=maybe", "'data.packing' must be true or false"),
        ("lora=3", "'lora' must be a mapping"),
        ("steps", "is not key=value"),
    ],
)
def test_bad_values_name_the_key(override, message):
  with pytest.raises(ValueError) as e:
    tc.load_config(os.path.join(REPO, "configs", "default.yaml"), [override])
  assert message in str(e.value)
  assert "\n" not in str(e.value)


def test_unknown_key_in_file(tmp_path):
  path = _write(tmp_path, {"data": {"task": "de_en"}, "optim": {"warmup": 3}})
  with pytest.raises(ValueError, match=r"unknown config key 'optim.warmup' \(did you mean 'optim.warmup_steps'\?\)"):
    tc.load_config(path)


def test_missing_train_data_without_task():
  with pytest.raises(ValueError, match="'data.train' is missing"):
    tc.config_from_dict({"data": {"task": None}}, check_files=False)


def test_missing_config_file():
  with pytest.raises(ValueError, match="does not exist"):
    tc.load_config("/no/such/config.yaml")


def test_lora_config_targets(tmp_path):
  import re

  import jax_lora as jl

  cfg = tc.config_from_dict({"data": {"task": "de_en"}, "lora": {"rank": 4, "alpha": 8, "targets": ["q_proj", "all-linear", ".*/o_proj/kernel"]}})
  lc = cfg.lora
  assert isinstance(lc, jl.LoraConfig) and lc.rank == 4 and lc.alpha == 8.0
  q, everything, o = lc.target_patterns
  assert everything == jl.LoraConfig.all_linear().targets[0]
  assert re.fullmatch(q, "model/layers_0/self_attn/q_proj/kernel") and not re.fullmatch(q, "model/layers_0/self_attn/k_proj/kernel")
  assert re.fullmatch(o, "model/layers_0/self_attn/o_proj/kernel")
