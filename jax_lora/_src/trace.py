"""Which parameters a function uses as matmul operands, found by tracing it.

``matmul_params(f, params, *rest)`` traces ``f(params, *rest)`` to a jaxpr
(shapes only) and follows every float leaf of ``params`` through casts,
transposes, ``pjit``/``remat``/``custom_vjp`` calls and ``scan`` slicing to the
``dot_general`` operands it becomes, whatever the leaf is named (Flax
``kernel``, Equinox ``weight``, tunix ``w``). The layout of each is one letter
per axis: 'i' the axes the matmul contracts, 'o' the others, 'b' the axes a
``scan`` slices (stacked layers) or that the matmul batches over.
``output_params`` names the output layer: the matmul whose result is the
function's output up to casts, reshapes and adding a constant or a bias (an
untied ``lm_head``, a classifier head, a tied embedding used as ``h @ E.T``).
Convolutions and other uses are not matmuls and are not reported.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from jax_lora._src.fallback import plain_shapes
from jax_lora._src.tree import is_leaf, is_variable, path_str

__all__ = ["matmul_params", "output_params", "trace_params"]

# ops whose output axes are the input's (elementwise on one traced operand)
_SAME = {"convert_element_type", "copy", "copy_p", "reduce_precision", "optimization_barrier",
         "sharding_constraint", "neg", "tanh", "logistic", "abs", "sign", "exp", "log", "sqrt", "rsqrt",
         "add", "sub", "mul", "div", "max", "min", "select_n", "integer_pow", "pow", "erf", "square"}
_SHAPE = {"reshape", "squeeze", "expand_dims", "broadcast_in_dim", "transpose"}


def _sub_jaxprs(eqn):
  """(jaxpr, in-offset) pairs for call-like primitives whose inner invars follow eqn.invars."""
  p = eqn.params
  name = eqn.primitive.name
  if name == "scan":
    return []
  if name == "while":
    body = p["body_jaxpr"]
    return [(getattr(body, "jaxpr", body), p["cond_nconsts"])]
  if name == "cond":
    return [(getattr(b, "jaxpr", b), 1) for b in p["branches"]]
  out = []
  for v in p.values():
    j = getattr(v, "jaxpr", v)
    if isinstance(j, jax.extend.core.Jaxpr) and len(j.invars) == len(eqn.invars):
      out.append((j, 0))
      break
  return out


class _Walk:
  def __init__(self, n):
    self.layouts: dict[int, str] = {}
    self.outputs: set[int] = set()
    self.n = n

  def run(self, jaxpr, origin: dict, tags: dict) -> list:
    """Walks ``jaxpr``; ``origin``: var -> (param index, param axis per var axis, stacked axes);
    ``tags``: var -> frozenset of params whose matmul output the var is. Returns outvar tags."""
    for eqn in jaxpr.eqns:
      name = eqn.primitive.name
      ins = [origin.get(v) if not isinstance(v, jax.extend.core.Literal) else None for v in eqn.invars]
      tin = [tags.get(v, frozenset()) if not isinstance(v, jax.extend.core.Literal) else frozenset()
             for v in eqn.invars]
      if name == "dot_general":
        (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
        out_tag = set()
        for o, con, bat in ((ins[0], lc, lb), (ins[1], rc, rb)):
          if o is None:
            continue
          idx, axes, stacked = o
          lay = ["o"] * (len(axes) + len(stacked))
          for a in stacked:
            lay[a] = "b"
          for d, a in enumerate(axes):
            if a is not None:
              lay[a] = "i" if d in con else "b" if d in bat else "o"
          self.layouts.setdefault(idx, "".join(lay))
          out_tag.add(idx)
        for v in eqn.outvars:
          tags[v] = frozenset(out_tag)
        continue
      if name == "scan":
        body = eqn.params["jaxpr"]
        nc, ncar = eqn.params["num_consts"], eqn.params["num_carry"]
        sub_origin, sub_tags = {}, {}
        for k, (bv, o) in enumerate(zip(body.jaxpr.invars, ins)):
          if o is not None:
            if k >= nc + ncar:  # xs: sliced along axis 0
              idx, axes, stacked = o
              o = (idx, axes[1:], stacked + ((axes[0],) if axes[0] is not None else ()))
            sub_origin[bv] = o
        outs = self.run(body.jaxpr, sub_origin, sub_tags)
        for v, t in zip(eqn.outvars, outs):
          tags[v] = t
        continue
      subs = _sub_jaxprs(eqn)
      if subs:
        for j, off in subs:
          sub_origin = {bv: o for bv, o in zip(j.invars, ins[off:]) if o is not None}
          sub_tags = {bv: t for bv, t in zip(j.invars, tin[off:]) if t}
          outs = self.run(j, sub_origin, sub_tags)
          for v, t in zip(eqn.outvars, outs):
            tags[v] = tags.get(v, frozenset()) | t
        continue
      # provenance of a parameter through casts and transposes
      src = [o for o in ins if o is not None]
      if len(eqn.outvars) == 1 and len(src) == 1:
        o = src[0]
        if name in ("convert_element_type", "copy", "copy_p", "reduce_precision", "sharding_constraint"):
          origin[eqn.outvars[0]] = o
        elif name == "transpose":
          idx, axes, stacked = o
          origin[eqn.outvars[0]] = (idx, tuple(axes[p] for p in eqn.params["permutation"]), stacked)
      # output-layer tags: one traced operand, the others constants or parameters (bias)
      if name in _SAME or name in _SHAPE:
        nonempty = [t for t in tin if t]
        if len(nonempty) == 1:
          for v in eqn.outvars:
            tags[v] = nonempty[0]
    return [tags.get(v, frozenset()) if not isinstance(v, jax.extend.core.Literal) else frozenset()
            for v in jaxpr.outvars]


def trace_params(f, params: Any, *rest) -> tuple[dict[str, str], set[str]]:
  """``({path: layout}, output paths)`` of ``params``' leaves used as matmul operands in
  ``f(params, *rest)`` (see the module docstring). LoRA and quantized leaves are traced
  as float kernels of their shape."""
  shapes = plain_shapes(params)
  flat, treedef = jax.tree_util.tree_flatten_with_path(shapes, is_leaf=is_leaf)
  paths = [path_str(kp) for kp, _ in flat]
  objs = [x for _, x in flat]
  vals = [x.get_value() if is_variable(x) else x for x in objs]
  traced = [i for i, v in enumerate(vals) if hasattr(v, "shape") and hasattr(v, "dtype")
            and jnp.issubdtype(v.dtype, jnp.inexact)]

  def g(tv, rest):
    vs = list(vals)
    for i, v in zip(traced, tv):
      vs[i] = v
    tree = treedef.unflatten([o.replace(v) if is_variable(o) else v for o, v in zip(objs, vs)])
    return f(tree, *rest)

  args = [jax.ShapeDtypeStruct(vals[i].shape, vals[i].dtype) for i in traced]
  closed = jax.make_jaxpr(g)(args, rest)
  jaxpr = closed.jaxpr
  w = _Walk(len(traced))
  origin = {v: (k, tuple(range(len(v.aval.shape))), ()) for k, v in enumerate(jaxpr.invars[:len(traced)])}
  outs = w.run(jaxpr, origin, {})
  layouts = {paths[traced[k]]: lay for k, lay in w.layouts.items()}
  out_params = {paths[traced[k]] for t in outs for k in t}
  return layouts, out_params


def matmul_params(f, params: Any, *rest) -> dict[str, str]:
  """``{path: layout}`` of every float leaf of ``params`` used as a matmul operand in ``f(params, *rest)``.

  >>> import jax.numpy as jnp
  >>> p = {"w": jnp.ones((3, 4)), "emb": jnp.ones((5, 3)), "head": {"weight": jnp.ones((2, 4))}}
  >>> matmul_params(lambda p, x: p["head"]["weight"] @ (x @ p["w"]).T, p, jnp.ones((7, 3)))
  {'head/weight': 'oi', 'w': 'io'}
  """
  return dict(sorted(trace_params(f, params, *rest)[0].items()))


def output_params(f, params: Any, *rest) -> set[str]:
  """Paths of the output layer(s): matmul parameters whose product is ``f``'s output
  up to casts, reshapes and adding a constant or bias."""
  return trace_params(f, params, *rest)[1]
