"""NF4 against bitsandbytes itself (CPU), and its safetensors layout both ways."""

import dataclasses
import warnings

import numpy as np
import pytest

warnings.filterwarnings("ignore")
import torch
import bitsandbytes.functional as F

import jax.numpy as jnp  # noqa: E402

from jax_lora import bnb  # noqa: E402
from jax_lora import quant as Q  # noqa: E402

SHAPES = [(256, 128), (576, 576), (1536, 576), (64, 4096)]  # PyTorch (out, in)


def _bnb(w: np.ndarray, dq: bool):
  return F.quantize_4bit(torch.from_numpy(w), blocksize=64, quant_type="nf4", compress_statistics=dq)


def test_dynamic_map_matches_bitsandbytes():
  np.testing.assert_array_equal(Q.dynamic_map(), F.create_dynamic_map(signed=True).numpy())


def _ulps(a, b):
  return np.abs(a.view(np.int32).astype(np.int64) - b.view(np.int32).astype(np.int64))


@pytest.mark.parametrize("dq", [True, False], ids=["double_quant", "plain"])
@pytest.mark.parametrize("shape", SHAPES)
def test_nf4_bytes_and_values_match_bitsandbytes(shape, dq):
  w = np.random.default_rng(sum(shape)).standard_normal(shape).astype(np.float32)
  packed, state = _bnb(w, dq=dq)
  q = Q.quantize_array(w.T, "nf4", 64, double_quant=dq)  # Flax kernel (in, out)
  ours, theirs = np.asarray(q.codes).reshape(-1), packed.numpy().reshape(-1)
  same = np.stack([(ours >> 4) == (theirs >> 4), (ours & 15) == (theirs & 15)], -1).reshape(shape)
  assert same.mean() >= 0.99999
  ref = F.dequantize_4bit(packed, state).numpy()
  got = np.asarray(q.dequantize()).T
  if dq:
    # absmax reconstruction: codes equal; offset = mean(absmax) may differ by 1 ulp (float32
    # summation order), so the reconstruction agrees to 1e-6 relative, not bit for bit.
    np.testing.assert_array_equal(np.asarray(q.absmax_codes).reshape(-1), state.absmax.numpy())
    am_ref = (F.dequantize_blockwise(state.absmax, state.state2) + state.offset).numpy()
    np.testing.assert_allclose(np.asarray(q.scales()).reshape(-1), am_ref, rtol=1e-6, atol=0)
    np.testing.assert_allclose(got[same], ref[same], rtol=1e-6, atol=0)
    # with bitsandbytes' own absmax our dequantization is within 1 ulp
    got = np.asarray(dataclasses.replace(q, absmax=jnp.asarray(am_ref.reshape(q.absmax_codes.shape)), absmax_codes=None,
                                         nested_absmax=None, offset=None).dequantize()).T
  else:
    np.testing.assert_array_equal(np.asarray(q.absmax).reshape(-1), state.absmax.numpy())
  assert _ulps(ref, got)[same].max() <= 1


def test_bf16_input_matches_bitsandbytes():
  w = torch.randn(128, 256, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
  packed, state = F.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=False)
  q = Q.quantize_array(jnp.asarray(w.float().numpy().T, jnp.bfloat16), double_quant=False)
  np.testing.assert_array_equal(np.asarray(q.codes).reshape(-1), packed.numpy().reshape(-1))
  np.testing.assert_array_equal(np.asarray(q.absmax).reshape(-1), state.absmax.numpy())


@pytest.mark.parametrize("dq", [True, False])
def test_read_bitsandbytes_layout(dq):
  w = np.random.default_rng(7).standard_normal((192, 320)).astype(np.float32)
  packed, state = _bnb(w, dq)
  sd = {"weight": packed.numpy(), **{f"weight.{k}": v.numpy() for k, v in state.as_dict(packed=True).items()}}
  q = bnb.from_bnb(sd, "weight")
  assert q.shape == (320, 192) and q.double_quant == dq
  np.testing.assert_array_equal(np.asarray(q.dequantize()).T, F.dequantize_4bit(packed, state).numpy())
  assert list(bnb.read_nf4_tensors(sd)) == ["weight"]


@pytest.mark.parametrize("dq", [True, False])
def test_write_bitsandbytes_layout(dq):
  w = np.random.default_rng(8).standard_normal((320, 192)).astype(np.float32)  # Flax (in, out)
  q = Q.quantize_array(w, double_quant=dq)
  sd = bnb.to_bnb(q, "layer.weight")
  if dq:
    assert {"layer.weight.nested_absmax", "layer.weight.nested_quant_map"} <= set(sd)
  state = F.QuantState.from_dict({k[len("layer.weight."):]: torch.from_numpy(v) for k, v in sd.items()
                                  if k != "layer.weight"}, device=torch.device("cpu"))
  ref = F.dequantize_4bit(torch.from_numpy(sd["layer.weight"]), state).numpy()
  np.testing.assert_array_equal(ref, np.asarray(q.dequantize()).T)
  # and the file round trip through our reader is exact
  back = bnb.from_bnb(sd, "layer.weight")
  np.testing.assert_array_equal(np.asarray(back.dequantize()), np.asarray(q.dequantize()))


def test_safetensors_file_roundtrip(tmp_path):
  from safetensors.numpy import load_file, save_file
  w = np.random.default_rng(9).standard_normal((64, 128)).astype(np.float32)  # torch (out, in)
  sd, qcfg = bnb.quantize_state_dict({"l.weight": w, "l.bias": np.zeros(64, np.float32)}, ["l.weight"])
  assert qcfg["bnb_4bit_quant_type"] == "nf4" and qcfg["bnb_4bit_use_double_quant"]
  save_file(sd, str(tmp_path / "m.safetensors"))
  loaded = load_file(str(tmp_path / "m.safetensors"))
  packed, state = _bnb(w, dq=True)
  np.testing.assert_array_equal(loaded["l.weight"].reshape(-1), packed.numpy().reshape(-1))
  np.testing.assert_array_equal(loaded["l.weight.absmax"], state.absmax.numpy())


def test_reader_refusals():
  w = np.random.default_rng(1).standard_normal((8, 96)).astype(np.float32)  # in=96: blocks straddle rows
  packed, state = _bnb(w, dq=False)
  sd = {"weight": packed.numpy(), **{f"weight.{k}": v.numpy() for k, v in state.as_dict(packed=True).items()}}
  with pytest.raises(ValueError, match="not a multiple of block"):
    bnb.from_bnb(sd)
  with pytest.raises(ValueError, match="lacks"):
    bnb.from_bnb({"weight": packed.numpy()})
  with pytest.raises(ValueError, match="padded"):
    bnb.to_bnb(Q.quantize_array(w.T))
