"""jax_lora in 40 lines: adapt an unmodified Flax Linen model, train only A/B, merge.

Run: .venv/bin/python examples/quickstart.py
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

import jax_lora as jl


class MLP(nn.Module):  # any Linen model; nothing LoRA-specific inside
  @nn.compact
  def __call__(self, x):
    x = nn.gelu(nn.Dense(256, name="up_proj")(x))
    return nn.Dense(16, name="down_proj")(x)


model = MLP()
x = jax.random.normal(jax.random.key(0), (64, 16))
y = jnp.sin(x)
params = model.init(jax.random.key(1), x)["params"]

config = jl.LoraConfig.all_linear(rank=4, alpha=8)           # every Dense kernel
adapted = jl.init_lora(params, config, jax.random.key(2))     # B = 0: same outputs as the base
print(jl.param_report(adapted))                               # trainable params: ... || trainable%: ...

trainable, frozen = jl.split(adapted)                         # A/B only  |  the frozen base
tx = optax.adamw(3e-3)
opt_state = tx.init(trainable)                                # Adam moments for A/B only


@jax.jit
def step(trainable, opt_state):
  def loss_fn(t):  # gradient w.r.t. the LoRA tree only; the base is a constant
    out = jl.linen.apply(model, jl.combine(t, frozen), x)    # x@W + s·(x@A)@B, unmerged
    return jnp.mean((out - y) ** 2)
  loss, grads = jax.value_and_grad(loss_fn)(trainable)
  updates, opt_state = tx.update(grads, opt_state, trainable)
  return optax.apply_updates(trainable, updates), opt_state, loss


for i in range(201):
  trainable, opt_state, loss = step(trainable, opt_state)
  if i % 50 == 0:
    print(f"step {i:3d} loss {float(loss):.4f}")

merged = jl.merge(jl.combine(trainable, frozen))              # W + s·A@B: a plain params tree
print("max |merged - unmerged|:",
      float(jnp.max(jnp.abs(model.apply({"params": merged}, x) - jl.linen.apply(model, jl.combine(trainable, frozen), x)))))
