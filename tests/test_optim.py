"""Adafactor (the paper's optimizer) trains sharded: factored moments get valid shardings."""
import gin
import jax
import numpy as np
import pytest

from doremi_jax import sharding, steps, trainer as trainer_lib
from doremi_jax.model import TransformerConfig
from tests.batches import packed_batch

CFG = TransformerConfig(vocab_size=259, emb_dim=32, num_heads=2, head_dim=16, num_layers=2,
                        mlp_dim=64, max_len=64)


@pytest.fixture
def adafactor():
  gin.clear_config()
  gin.parse_config("make_optimizer.name = 'adafactor'")
  yield
  gin.clear_config()


def _proxy_losses(shape):
  mesh = sharding.make_mesh(shape, devices=jax.devices()[:int(np.prod(shape))])
  tr = trainer_lib.build_trainer(model_cfg=CFG, mesh=mesh, global_batch_size=8, seq_len=32,
                                 total_steps=10, step_cfg=steps.StepConfig(num_domains=3),
                                 ref_model_cfg=CFG)
  state = tr.init_fn(jax.random.key(0))
  ref = tr.init_fn(jax.random.key(1)).params
  rng, losses = np.random.default_rng(0), []
  for _ in range(3):
    state, m = tr.step_fn(state, ref, tr.make_batch(packed_batch(rng, 8, 32)))
    losses.append(float(m["loss"]))
  return np.array(losses), np.asarray(state.doremi.alpha_K)


def test_adafactor_sharded_equals_single_device(adafactor):  # pylint: disable=redefined-outer-name,unused-argument
  loss_1, alpha_1 = _proxy_losses((1, 1, 1))
  loss_8, alpha_8 = _proxy_losses((2, 2, 2))
  assert loss_1[-1] < loss_1[0]
  np.testing.assert_allclose(loss_8, loss_1, rtol=1e-5)
  np.testing.assert_allclose(alpha_8, alpha_1, rtol=1e-5)
