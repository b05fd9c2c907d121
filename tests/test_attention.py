"""Each attention implementation that runs on CPU equals the einsum reference."""
import dataclasses
import functools
import os

import flax.linen as nn
import gin
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from doremi_jax import attention
from doremi_jax import checkpoint as ckpt_lib
from doremi_jax import losses
from doremi_jax import model as model_lib
from doremi_jax import outputs
from doremi_jax import sharding
from doremi_jax import trainer as trainer_lib
from doremi_jax.model import Transformer, TransformerConfig
from tests import helpers

# "cudnn" needs a GPU: it is checked to refuse other platforms with a clear error.
ON_CPU = ("xla", "splash")
B, L, H, K = 4, 128, 2, 16  # L: splash's block size, so the kernel (not its fallback) runs
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


def _qkv(seed=0):
  rng = np.random.default_rng(seed)
  return tuple(jnp.asarray(rng.normal(size=(B, L, H, K)), jnp.float32) for _ in range(3))


def _segments():
  """Packed rows: several examples, a row ending in padding, one all padding."""
  seg = np.zeros((B, L), np.int32)
  seg[0] = np.repeat([1, 2, 3], [50, 40, 38])
  seg[1, :100] = np.repeat([1, 2], [7, 93])
  seg[2] = 1
  return jnp.asarray(seg)  # row 3: padding only


@functools.lru_cache(maxsize=None)
def _attend(impl):
  fn = lambda q, k, v, s: attention.self_attention(q, k, v, s, impl=impl, dtype=jnp.float32)
  return jax.jit(fn, compiler_options=FAST_COMPILE)


@functools.lru_cache(maxsize=None)
def _grads(impl):
  # A weighted sum so that every output element has its own cotangent.
  w = jnp.asarray(np.random.default_rng(9).normal(size=(B, L, H, K)), jnp.float32)
  loss = lambda q, k, v, s: jnp.sum(w * attention.self_attention(q, k, v, s, impl=impl, dtype=jnp.
                                                                 float32))
  return jax.jit(jax.grad(loss, argnums=(0, 1, 2)), compiler_options=FAST_COMPILE)


@pytest.mark.parametrize("impl", ON_CPU)
def test_equals_the_reference_on_packed_segments_with_gradients(impl):
  """Catches a mask that crosses examples or lets padding attend, a missing 1/sqrt(K) scale
  (splash does not scale), padding queries that are not zeroed, and a wrong backward."""
  q, k, v = _qkv()
  seg = _segments()
  want = _attend("einsum")(q, k, v, seg)
  got = _attend(impl)(q, k, v, seg)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  assert not np.asarray(got[3]).any()  # padding queries get zeros
  for g, w in zip(_grads(impl)(q, k, v, seg), _grads("einsum")(q, k, v, seg)):
    np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("impl", ("einsum",) + ON_CPU)
def test_causal_and_within_segment(impl):
  """Changing keys/values after position t, or in another example, changes nothing at t."""
  q, k, v = _qkv(1)
  seg = _segments()
  base = np.asarray(_attend(impl)(q, k, v, seg))
  t = 70  # row 0: inside example 2 (positions 50..89)
  k2, v2 = k.at[:, t + 1:].add(3.0), v.at[:, t + 1:].add(3.0)
  moved = np.asarray(_attend(impl)(q, k2, v2, seg))
  np.testing.assert_allclose(moved[:, :t + 1], base[:, :t + 1], rtol=1e-5, atol=1e-5)
  assert np.abs(moved[0, t + 1:] - base[0, t + 1:]).max() > 1e-2  # the change is visible later
  k3 = k.at[0, :50].add(3.0)  # example 1 of row 0
  np.testing.assert_allclose(
      np.asarray(_attend(impl)(q, k3, v, seg))[0, 50:], base[0, 50:], rtol=1e-5, atol=1e-5)


def test_cudnn_refuses_float32_and_a_cpu():
  q, k, v = _qkv()
  with pytest.raises(ValueError, match="'cudnn' computes in bfloat16 or float16, not float32"):
    attention.self_attention(q, k, v, _segments(), impl="cudnn", dtype=jnp.float32)
  q, k, v = (x.astype(jnp.bfloat16) for x in (q, k, v))
  with pytest.raises(ValueError, match="attention_impl='cudnn' needs a GPU"):
    attention.self_attention(q, k, v, _segments(), impl="cudnn", dtype=jnp.bfloat16)


def test_unknown_impl_is_a_config_error():
  with pytest.raises(ValueError, match="attention_impl='flash': use one of einsum, xla"):
    TransformerConfig(attention_impl="flash")


def test_splash_at_other_lengths_is_the_reference():
  """Below/off its block size splash takes the einsum path (decoding's short buffers)."""
  q, k, v = (x[:, :40] for x in _qkv())
  seg = _segments()[:, :40]
  np.testing.assert_array_equal(
      attention.self_attention(q, k, v, seg, impl="splash", dtype=jnp.float32),
      attention.self_attention(q, k, v, seg, impl="einsum", dtype=jnp.float32))


CFG = helpers.TINY_CFG  # 2 heads: one per model shard below


def _loss_and_grad_on_mesh(cfg, mesh, params, batch):
  model = Transformer(cfg)

  def loss(p, batch):
    logits = model.apply({"params": p}, batch["inputs"], batch["segment_ids"], batch["positions"])
    _, per_tok, mask = losses.per_token_loss(logits, batch["targets"], batch["loss_mask"])
    return losses.masked_mean(per_tok, mask)

  fn = trainer_lib.in_mesh(jax.value_and_grad(loss), mesh, sharding.DEFAULT_RULES)
  repl, data = sharding.replicated(mesh), sharding.batch_sharding(mesh)
  return jax.jit(fn, in_shardings=(repl, data), out_shardings=repl,
                 compiler_options=FAST_COMPILE)(params, batch)


def test_splash_sharded_over_batch_and_heads_equals_the_reference_on_one_device():
  """Splash runs under shard_map over the mesh in context: batch over (data, fsdp), heads
  over model. Catches wrong in/out specs (heads or rows mixed up across shards)."""
  rng = np.random.default_rng(3)
  batch = helpers.packed_batch(rng, 4, L, vocab=CFG.vocab_size)
  dummy = jnp.zeros((1, L), jnp.int32)
  params = nn.meta.unbox(Transformer(CFG).init(jax.random.key(0), dummy, dummy, dummy))["params"]
  one = sharding.make_mesh((1, 1, 1), devices=jax.devices()[:1])
  want_loss, want_grad = _loss_and_grad_on_mesh(CFG, one, params, batch)
  mesh = sharding.make_mesh((2, 2, 2), devices=jax.devices()[:8])
  splash = dataclasses.replace(CFG, attention_impl="splash")
  got_loss, got_grad = _loss_and_grad_on_mesh(splash, mesh, params, batch)
  np.testing.assert_allclose(got_loss, want_loss, rtol=1e-5)
  for g, w in zip(jax.tree.leaves(got_grad), jax.tree.leaves(want_grad)):
    np.testing.assert_allclose(g, w, rtol=1e-3, atol=1e-5)


def test_the_kernel_is_not_part_of_a_runs_identity(tmp_path):
  """A run saved with one kernel resumes, or serves as reference, with another (a TPU run
  resumed on GPUs), and a run info from before attention_impl existed still matches; a
  config rebuilt from a run info takes the kernel from the current gin bindings. Catches
  the kernel becoming part of the model checked on resume."""
  saved = dataclasses.asdict(TransformerConfig(attention_impl="splash"))
  info_path = os.path.join(tmp_path, outputs.RUN_INFO)
  outputs.write_json(info_path, {"kind": "reference", "model": saved})
  now = {"kind": "reference", "model": dataclasses.asdict(TransformerConfig())}
  ckpt_lib.check_run_info(str(tmp_path), now)
  older = {k: v for k, v in saved.items() if k != "attention_impl"}
  outputs.write_json(info_path, {"kind": "reference", "model": older})
  ckpt_lib.check_run_info(str(tmp_path), now)
  other = {"kind": "reference", "model": dataclasses.asdict(TransformerConfig(emb_dim=128))}
  with pytest.raises(ValueError, match="holds a checkpoint of a different model"):
    ckpt_lib.check_run_info(str(tmp_path), other)
  assert model_lib.config_from_info(saved).attention_impl == "einsum"  # the default
  gin.clear_config()
  try:
    gin.bind_parameter("TransformerConfig.attention_impl", "xla")
    assert model_lib.config_from_info(saved) == TransformerConfig(attention_impl="xla")
  finally:
    gin.clear_config()
