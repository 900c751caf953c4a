"""Two processes with jax.distributed on 127.0.0.1 train like one process."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import orbax.checkpoint as ocp

import jax_lora as jl
import jax_lora.adapters  # noqa: F401 - jl.adapters
from jax_lora import distributed
from test_sharding import Model, naive_train, setup

WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "distributed_worker.py")


def run_workers(out, n=2, timeout=150):
  port = distributed.free_port()
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""}
  env["PYTHONPATH"] = os.pathsep.join([os.path.dirname(os.path.dirname(WORKER)), env.get("PYTHONPATH", "")])
  procs = [subprocess.Popen([sys.executable, WORKER, str(i), str(n), str(port), str(out)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for i in range(n)]
  logs = []
  try:
    for p in procs:
      logs.append(p.communicate(timeout=timeout)[0])
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
        p.wait()
  for p, log in zip(procs, logs):
    assert p.returncode == 0, f"worker failed ({p.returncode}):\n{log[-3000:]}"


def test_two_processes_match_single_process(tmp_path):
  run_workers(tmp_path)
  res = json.loads((tmp_path / "result.json").read_text())
  assert res["devices"] == 4 and res["local"] == 2
  _, adapted, batch, loss_fn = setup(Model(n_layers=1))
  ref_losses, ref_tr = naive_train(loss_fn, adapted, batch)
  np.testing.assert_allclose(res["losses"], ref_losses, rtol=1e-5)
  final = np.load(tmp_path / "final.npz")
  got = [final[f"arr_{i}"] for i in range(len(final.files))]
  want = jax.tree.leaves(ref_tr)
  assert len(got) == len(want)
  for g, w in zip(got, want):
    np.testing.assert_allclose(g, np.asarray(w), rtol=1e-5, atol=1e-5 * float(np.max(np.abs(w))))
  # the orbax checkpoint written by both processes restores in one process
  dev = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=dev), ref_tr)
  restored = ocp.StandardCheckpointer().restore(tmp_path / "ckpt", target)
  for g, w in zip(jax.tree.leaves(restored), want):
    np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-5, atol=1e-5 * float(np.max(np.abs(w))))
  assert isinstance(jl.adapters.lora_weights(restored)["layers_0/q_proj/kernel"], jl.LoraWeight)


def test_initialize_rejects_bad_process_id():
  import pytest
  with pytest.raises(ValueError, match="process_id 2 is not in"):
    distributed.initialize("127.0.0.1:1", 2, 2)
