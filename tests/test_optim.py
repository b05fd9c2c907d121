"""Adafactor (the paper's optimizer) trains sharded: factored moments get valid shardings."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from doremi_jax import optim, sharding, steps, trainer as trainer_lib
from tests import helpers

CFG = helpers.TINY_CFG


def _proxy_losses(shape):
  mesh = sharding.make_mesh(shape, devices=jax.devices()[:int(np.prod(shape))])
  tr = trainer_lib.build_trainer(model_cfg=CFG, mesh=mesh, global_batch_size=8, seq_len=32,
                                 total_steps=10, step_cfg=steps.StepConfig(num_domains=3),
                                 opt_cfg=optim.OptimizerConfig(name="adafactor"), ref_model_cfg=CFG)
  state = tr.init_fn(jax.random.key(0))
  ref = tr.init_fn(jax.random.key(1)).params
  rng, losses = np.random.default_rng(0), []
  for _ in range(3):
    state, m = tr.step_fn(state, ref, tr.make_batch(helpers.packed_batch(rng, 8, 32)))
    losses.append(float(m["loss"]))
  return np.array(losses), np.asarray(state.doremi.alpha_K)


def test_adafactor_sharded_equals_single_device():
  loss_1, alpha_1 = _proxy_losses((1, 1, 1))
  loss_8, alpha_8 = _proxy_losses((2, 2, 2))
  assert loss_1[-1] < loss_1[0]
  np.testing.assert_allclose(loss_8, loss_1, rtol=1e-5)
  np.testing.assert_allclose(alpha_8, alpha_1, rtol=1e-5)


@pytest.mark.parametrize("name", optim.OPTIMIZERS)
@pytest.mark.parametrize("step", [0, 50])
def test_zero_gradient_step_decays_by_lr_times_wd(name, step):
  """Decoupled decay scaled by the scheduled lr: with a zero gradient one step moves a weight
  w by -lr_t * wd * w for both optimizers (optax.adafactor's weight_decay_rate moves it by
  -wd * w whatever the learning rate)."""
  cfg = optim.OptimizerConfig(name=name, weight_decay=0.01)
  tx, schedule = optim.make_optimizer(cfg, total_steps=100)
  params = {"w": jnp.full((4, 3), 2.0), "b": jnp.array([-1.0, 0.5])}
  zeros = jax.tree.map(jnp.zeros_like, params)
  state = tx.init(params)
  for _ in range(step):  # advance the schedule with zero gradients
    _, state = tx.update(zeros, state, params)
  updates, _ = tx.update(zeros, state, params)
  lr = float(schedule(step))
  for key in params:
    np.testing.assert_allclose(updates[key], -lr * 0.01 * params[key], rtol=1e-5, atol=0)
  assert lr < 1.1e-3  # the move is 1e-5 * w at most: 1000x weaker than optax's unscaled form


def test_adafactor_follows_the_authors_settings():
  """Update clipping at RMS 1.0 and a first moment with beta1 0.9 (HF Adafactor)."""
  cfg = optim.OptimizerConfig(name="adafactor", weight_decay=0.0, clip_norm=0.0,
                              warmup_fraction=0.0)
  tx, schedule = optim.make_optimizer(cfg, total_steps=10)
  params = {"w": jnp.ones((3,))}
  state = tx.init(params)
  grads = {"w": jnp.array([1.0, -1.0, 1e-6])}
  updates, state = tx.update(grads, state, params)
  u = -np.asarray(updates["w"]) / float(schedule(0))
  # One step: the factored RMS makes the update sign-like; beta1 0.9 keeps 10% of it.
  assert np.sqrt(np.mean((u / 0.1)**2)) <= 1.0 + 1e-5
  np.testing.assert_allclose(u[:2] / 0.1, [1.0, -1.0], rtol=0.05)
