"""One process of the 2-process LoRA training test (launched by tests/test_distributed.py).

Usage: python distributed_worker.py PROCESS_ID NUM_PROCESSES PORT OUT_DIR
Each process exposes 2 CPU devices; the 4 global devices form a (data=2, model=2)
mesh with FSDP×TP rules. Each process feeds its half of the global batch.
"""

import json
import time
import os
import sys

os.environ["JAX_PLATFORMS"] = "cpu"
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from jax_lora import distributed  # noqa: E402

T0 = time.time()
pid, nproc, port, out = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
distributed.initialize(f"127.0.0.1:{port}", nproc, pid, local_cpu_devices=2, timeout_s=60)

import jax  # noqa: E402
import numpy as np  # noqa: E402
import orbax.checkpoint as ocp  # noqa: E402
from jax.experimental import multihost_utils  # noqa: E402

import jax_lora as jl  # noqa: E402
from jax_lora import sharding as sh  # noqa: E402
from test_sharding import STEPS, TX, Model, setup  # noqa: E402

assert jax.process_count() == nproc and len(jax.devices()) == 2 * nproc, jax.devices()
model, adapted, batch, loss_fn = setup(Model(n_layers=1))
mesh = sh.make_mesh({"data": 2, "model": len(jax.devices()) // 2})
rules = sh.fsdp_tp()
shard = sh.param_shardings(adapted, rules, mesh)
tr_sh, fr_sh = jl.split(shard)
tr, fr = jl.split(adapted)
tr, fr = sh.place(tr, tr_sh), sh.place(fr, fr_sh)
bsh = sh.batch_sharding(mesh, rules)
rows = distributed.local_batch_slice(batch["x"].shape[0])
gbatch = distributed.global_batch({k: np.asarray(v)[rows] for k, v in batch.items()}, bsh)
state = sh.init_opt_state(TX, tr, tr_sh, mesh)
step = sh.make_train_step(loss_fn, TX, mesh, shard, bsh)
losses = []
for _ in range(STEPS):
  tr, state, loss = step(tr, state, fr, gbatch)
  losses.append(float(loss))

T1 = time.time()
ckpt = ocp.StandardCheckpointer()
ckpt.save(os.path.join(out, "ckpt"), tr)  # every process writes its shards
ckpt.wait_until_finished()
final = multihost_utils.process_allgather(tr, tiled=True)
if pid == 0:
  with open(os.path.join(out, "result.json"), "w") as f:
    json.dump({"losses": losses, "devices": len(jax.devices()), "local": len(jax.local_devices()),
               "train_s": T1 - T0, "total_s": time.time() - T0}, f)
  np.savez(os.path.join(out, "final.npz"), *[np.asarray(x) for x in jax.tree.leaves(final)])
multihost_utils.sync_global_devices("done")
jax.distributed.shutdown()
