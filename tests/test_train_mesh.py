"""`jax-lora train` with a `mesh` section: same losses as one device (8 fake CPU devices)."""

import json

import numpy as np
import pytest

from jax_lora_app import loop as tl


def _losses(out_dir):
  rows = [json.loads(l) for l in open(out_dir / "metrics.jsonl")]
  return [r["loss"] for r in rows if r.get("event") == "train"]


@pytest.mark.parametrize("mesh", [{"axes": {"data": 2, "model": 4}, "rules": "fsdp_tp"},
                                  {"axes": {"data": 8}, "rules": "data_parallel"}])
def test_mesh_section_matches_single_device(tiny, tmp_path, mesh):
  kw = dict(steps=4, eval_every=0, log_every=1, checkpoint_every=0, **{"eval.num_test": 0})
  tl.train(tiny.cfg(tmp_path / "one", **kw))
  tl.train(tiny.cfg(tmp_path / "mesh", mesh=mesh, **kw))
  one, sharded = _losses(tmp_path / "one"), _losses(tmp_path / "mesh")
  assert len(one) == 4
  np.testing.assert_allclose(sharded, one, rtol=1e-4)
