"""online_step on the fake 8-device mesh: the parameters take exactly train_step's update, the
excess is the DoReMi proxy's, the weights in flight shift, and sharded equals one device."""
import functools

import jax
import numpy as np
import pytest

from doremi_jax import doremi
from doremi_jax import mixing
from doremi_jax import sharding
from doremi_jax import steps
from doremi_jax import trainer as trainer_lib
from doremi_jax import mixing_log
from tests import helpers

CFG = helpers.TINY_CFG
B, L, K = 8, 32, 3
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


def _mesh(shape):
  return sharding.make_mesh(shape, devices=jax.devices()[:int(np.prod(shape))])


@functools.lru_cache(maxsize=None)
def _trainer(kind, mesh_shape=(1, 1, 1), accum=1):
  online = {
      "train": None,
      "odm": mixing.OnlineConfig(method="odm"),
      "doremi": mixing.OnlineConfig(method="doremi")
  }.get(kind)
  proxy = kind == "proxy"
  step_cfg = steps.StepConfig(num_domains=K, online=online, accum_steps=accum,
                              doremi=doremi.DoReMiConfig() if proxy else None)
  ref = CFG if kind in ("proxy", "doremi") else None
  return trainer_lib.build_trainer(model_cfg=CFG, mesh=_mesh(mesh_shape), global_batch_size=B,
                                   seq_len=L, total_steps=10, step_cfg=step_cfg, ref_model_cfg=ref)


@functools.lru_cache(maxsize=None)
def _host_init():
  tr = _trainer("train")
  init = lambda s: tr.init_fn.lower(jax.random.key(s)).compile(FAST_COMPILE)(jax.random.key(s))
  return jax.tree.map(np.asarray, init(0)), jax.tree.map(np.asarray, init(1).params)


def _run(kind, n=3, mesh_shape=(1, 1, 1), initial=(0.2, 0.3, 0.5), accum=1):
  tr = _trainer(kind, mesh_shape, accum)
  state0, ref = _host_init()
  if kind in ("odm", "doremi"):
    state = state0.replace(
        mixing=mixing_log.initial_state(tr.step_cfg.online, initial, tr.state_shardings.mixing))
  elif kind == "proxy":
    state = state0.replace(doremi=jax.tree.map(np.array, doremi.init_state(K)))
  else:
    state = state0
  state = jax.device_put(state, tr.state_shardings)
  ref = jax.device_put(ref, tr.ref_shardings) if tr.is_doremi else None
  step = tr.step_fn.lower(*trainer_lib.abstract_step_args(tr)).compile(FAST_COMPILE)
  out = []
  for i in range(n):
    b = helpers.packed_batch(np.random.default_rng(i), B, L, num_domains=K)
    state, m = step(*trainer_lib.step_args(tr, state, tr.make_batch(b), ref))
    out.append(jax.tree.map(np.asarray, m))
  return jax.tree.map(np.asarray, state), out


@pytest.mark.parametrize("kind", ["odm", "doremi"])
def test_online_step_updates_parameters_exactly_as_train_step(kind):
  (s_train, m_train), (s_online, m_online) = _run("train"), _run(kind)
  for a, b in zip(jax.tree.leaves(s_train.params), jax.tree.leaves(s_online.params)):
    np.testing.assert_array_equal(a, b)
  for a, b in zip(m_train, m_online):
    for key in ("loss", "grad_norm", "domain_loss_sums", "domain_token_counts"):
      np.testing.assert_array_equal(a[key], b[key])


def test_online_doremi_excess_is_the_proxys_and_weights_arrive_two_steps_later():
  _, proxy = _run("proxy", n=1)
  state, online = _run("doremi", n=3)
  # Same parameters and reference at step 0: the same per-domain clipped excess.
  np.testing.assert_allclose(online[0]["domain_excess"], proxy[0]["domain_excess"], rtol=1e-6)
  np.testing.assert_allclose(online[0]["sampling_weights"], [0.2, 0.3, 0.5], rtol=1e-6)
  np.testing.assert_allclose(online[1]["sampling_weights"], [0.2, 0.3, 0.5], rtol=1e-6)
  # Step 2's batch is drawn with step 0's update; the state holds the two in flight.
  np.testing.assert_array_equal(online[2]["sampling_weights"], online[0]["next_sampling_weights"])
  np.testing.assert_array_equal(state.mixing.pending_K, online[1]["next_sampling_weights"])
  np.testing.assert_array_equal(state.mixing.next_K, online[2]["next_sampling_weights"])
  for m in online:  # the flag is the per-domain comparison of the two mean losses
    present = m["domain_token_counts"] > 0
    want = bool(np.all((m["domain_loss_sums"] < m["domain_ref_loss_sums"])[present]))
    assert bool(m["reference_beaten"]) == want
  w = online[0]["next_sampling_weights"]
  assert abs(w.sum() - 1) < 1e-6 and w.min() >= 1e-3 / K - 1e-7


def test_odm_weights_stay_above_the_exploration_floor():
  _, out = _run("odm", n=3)
  for t, m in enumerate(out, start=1):
    w = m["next_sampling_weights"]
    assert abs(w.sum() - 1) < 1e-6
    assert w.min() >= float(mixing.exploration(t + 1, K)) - 1e-6


@pytest.mark.parametrize("kind", ["odm", "doremi"])
def test_online_step_sharded_equals_one_device(kind):
  (s1, m1), (s8, m8) = _run(kind), _run(kind, mesh_shape=(2, 2, 2))
  for a, b in zip(m1, m8):
    for key in ("loss", "next_sampling_weights", "sampling_weights"):
      np.testing.assert_allclose(a[key], b[key], rtol=1e-5, atol=1e-6, err_msg=key)
  np.testing.assert_allclose(s1.mixing.next_K, s8.mixing.next_K, rtol=1e-5, atol=1e-7)


def test_online_doremi_accumulation_equals_full_batch():
  (_, full), (_, accum) = _run("doremi"), _run("doremi", accum=2)
  for a, b in zip(full, accum):
    for key in ("loss", "domain_excess", "next_sampling_weights"):
      np.testing.assert_allclose(a[key], b[key], rtol=1e-5, atol=1e-6, err_msg=key)
