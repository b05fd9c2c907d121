"""Mixtures that change during a run: schedules, the online methods' math, and the sampler.

Hand-computed cases for ODM's policy and reward update and for online DoReMi's weights, a
two-stage schedule's per-step composition, no repeats within a pass across a change, host
slices and resume across a change, and the bad-input errors.
"""
import json
import logging
import math
import types

import jax.numpy as jnp
import numpy as np
import pytest

import data_pipelines
from data_pipelines import sources
from doremi_jax import data
from doremi_jax import doremi
from doremi_jax import mixing
from doremi_jax import mixing_log
from doremi_jax import schedule

L = 64
DOMS = ["aa", "bb", "cc"]


def _docs(prefix, n):
  return [f"{prefix} {i} " + "y" * (7 * i % 90 + 5) for i in range(n)]


@pytest.fixture(scope="module")
def packed(tmp_path_factory):
  docs = {"aa": _docs("aa", 30), "bb": _docs("bb", 20), "cc": _docs("cc", 25)}

  def make(d):
    return sources.generator_source(lambda split: iter(d if split == "train" else d[:2]),
                                    fingerprint=str(hash(tuple(d))))

  data_pipelines.register_domain_set("mixsched", {k: make(v) for k, v in docs.items()})
  return data.PackedDomains.build("mixsched_natural", "train", L,
                                  cache_dir=str(tmp_path_factory.mktemp("packed")))


# ------------------------------------------------------------------------------- ODM math


def test_odm_exploration_schedule_by_hand():
  k = 4
  # eps_t = min(1/K, sqrt(ln K / (K t))): 1/K until t > ln K / (K (1/K)^2) = K ln K = 5.55.
  for t, want in [(1, 0.25), (5, 0.25), (6, math.sqrt(math.log(4) / 24)),
                  (100, math.sqrt(math.log(4) / 400))]:
    np.testing.assert_allclose(float(mixing.exploration(t, k)), want, rtol=1e-6)
  assert float(mixing.exploration(3, k, fixed=0.05)) == pytest.approx(0.05)


def test_odm_policy_by_hand():
  cfg = mixing.OnlineConfig(method="odm")
  reward = jnp.array([1.0, 2.0, 0.5, 4.0])
  t = 50
  eps, lr = math.sqrt(math.log(4) / (4 * 50)), math.sqrt(math.log(4) / (4 * 49))
  e = np.exp(lr * np.array([1.0, 2.0, 0.5, 4.0]))
  want = (1 - 4 * eps) * e / e.sum() + eps
  got = np.asarray(mixing.odm_policy(reward, t, cfg))
  np.testing.assert_allclose(got, want, rtol=1e-5)
  assert got.min() >= eps - 1e-7 and abs(got.sum() - 1) < 1e-6  # the exploration floor


def test_odm_step_by_hand():
  cfg = mixing.OnlineConfig(method="odm", reward_smoothing=0.9)
  state = mixing.OdmState(reward_K=jnp.array([1.0, 2.0, 3.0]), num_updates=jnp.array(9, jnp.int32))
  pi = jnp.array([0.5, 0.3, 0.2])
  # Domain 0: 2 rows, 10 tokens, loss sum 30 (mean 3); domain 1: 1 row, mean 4; domain 2 absent.
  new, policy = mixing.odm_step(state, jnp.array([30.0, 20.0, 0.0]), jnp.array([10.0, 5.0, 0.0]),
                                jnp.array([2.0, 1.0, 0.0]), pi, cfg)
  want = [0.81 * 1.0 + 0.19 * 3 / 0.5, 0.9 * 2.0 + 0.1 * 4 / 0.3, 3.0]
  np.testing.assert_allclose(np.asarray(new.reward_K), want, rtol=1e-6)
  assert int(new.num_updates) == 10
  np.testing.assert_allclose(
      np.asarray(policy), np.asarray(mixing.odm_policy(new.reward_K, 11, cfg)))


def test_online_doremi_is_the_papers_update_and_shifts_the_weights_in_flight():
  cfg = mixing.OnlineConfig(method="doremi", eta=1.0, smoothing=1e-3)
  init = mixing.init_state(cfg, [0.2, 0.3, 0.5])
  np.testing.assert_allclose(np.asarray(init.pending_K), [0.2, 0.3, 0.5], rtol=1e-6)
  ex, counts = jnp.array([4.0, 0.0, 0.0]), jnp.array([8.0, 0.0, 4.0])  # domain 1 absent
  got = mixing.step(init, cfg, loss_sums_K=None, counts_K=counts, rows_K=None, excess_sums_K=ex)
  want = doremi.step(init.method, ex, counts, eta=1.0, smoothing=1e-3)
  np.testing.assert_allclose(np.asarray(got.next_K), np.asarray(want.alpha_K), rtol=1e-6)
  # By hand: lambda = [0.5, initial 0 kept for the absent domain, 0].
  a = np.array([0.2, 0.3, 0.5]) * np.exp([0.5, 0.0, 0.0])
  np.testing.assert_allclose(np.asarray(got.next_K), 0.999 * a / a.sum() + 0.001 / 3, rtol=1e-6)
  # The batch after next is drawn with the new weights; the next one with the old next_K.
  np.testing.assert_allclose(np.asarray(got.pending_K), np.asarray(init.next_K))


def test_rows_per_domain():
  ids = jnp.array([[1, 1, 0], [3, 3, 3], [0, 0, 0], [1, 0, 0]])
  np.testing.assert_array_equal(np.asarray(mixing.rows_per_domain(ids, 3)), [2, 0, 1])


@pytest.mark.parametrize("kwargs,match", [
    ({
        "method": "greedy"
    }, "method='greedy'"),
    ({
        "method": "odm",
        "reward_smoothing": 1.0
    }, "reward_smoothing=1.0"),
    ({
        "method": "odm",
        "learning_rate": 0.0
    }, "learning_rate=0.0"),
    ({
        "method": "odm",
        "exploration": 0.5
    }, r"exploration=0.5: the floor must be in \(0, 1/K\)"),
    ({
        "method": "doremi",
        "eta": -1.0
    }, "eta=-1.0"),
    ({
        "method": "doremi",
        "smoothing": 1.0
    }, "smoothing c=1.0"),
])
def test_online_config_errors(kwargs, match):
  with pytest.raises(ValueError, match=match):
    mixing.OnlineConfig(**kwargs).validate(num_domains=3)


# ------------------------------------------------------------------------------- schedules


def test_schedule_stages_and_interpolation_by_hand():
  a, b = {"aa": 1.0, "bb": 1.0, "cc": 2.0}, {"cc": 1.0}
  stages = schedule.MixtureSchedule([(0, a), (10, b)]).resolve(DOMS, train_steps=20)
  np.testing.assert_allclose(stages.probs(9), [0.25, 0.25, 0.5])
  np.testing.assert_allclose(stages.probs(10), [0, 0, 1])
  np.testing.assert_allclose(stages.probs(19), [0, 0, 1])
  lin = schedule.MixtureSchedule([(0, a), (10, b)], interpolate=True).resolve(DOMS)
  np.testing.assert_allclose(lin.probs(0), [0.25, 0.25, 0.5])
  np.testing.assert_allclose(lin.probs(4), [0.15, 0.15, 0.7])  # 0.6 a + 0.4 b
  np.testing.assert_allclose(lin.probs(10), [0, 0, 1])
  np.testing.assert_allclose(lin.probs(50), [0, 0, 1])


@pytest.mark.parametrize("stages,match", [
    ([], "stages is empty"),
    ([(5, {
        "aa": 1
    })], "first stage must start at step 0"),
    ([(0, {
        "aa": 1
    }), (8, {
        "bb": 1
    }), (8, {
        "cc": 1
    })], "steps must increase: 8 follows 8"),
    ([(0, {
        "aa": 1
    }), (20, {
        "bb": 1
    })], "stage at step 20 never runs: the run has TRAIN_STEPS=20"),
    ([(0, {
        "zz": 1
    })], "Unknown domain 'zz'"),
    ([(0, {
        "aa": -1.0,
        "bb": 2
    })], "must be finite and >= 0"),
    ([(0, {
        "aa": 0.0
    })], "sum to 0"),
    ([(0, 0.5)], "must be a {domain: weight} dict or a weights file"),
    ([(-1, {
        "aa": 1
    })], "starts at -1"),
    ([(0,)], r"give \(start_step, weights\)"),
])
def test_schedule_errors(stages, match):
  with pytest.raises(ValueError, match=match):
    schedule.MixtureSchedule(stages).resolve(DOMS, train_steps=20)


def test_schedule_from_a_weights_file(tmp_path):
  path = str(tmp_path / "w.json")
  data_pipelines.write_weights(path, {"aa": 3.0, "cc": 1.0})
  got = schedule.MixtureSchedule([(0, path)]).resolve(DOMS).probs(0)
  np.testing.assert_allclose(got, [0.75, 0, 0.25])


def _domain_of_rows(batch):
  return batch["domain_ids"].max(axis=1)


def test_two_stage_composition_equals_a_hand_computation(packed):
  """Steps 0-3 from {aa: 1}; from step 4, {bb: 0.5, cc: 0.5}: each step's rows are the
  sampler's seeded draw from the weights in force at that step (counts by hand)."""
  sched = schedule.MixtureSchedule([(0, {"aa": 1.0}), (4, {"bb": 1.0, "cc": 1.0})])
  it = data.BatchIterator(packed, global_batch_size=8, seed=3,
                          sampling=sched.resolve(packed.names, train_steps=10))
  for s in range(10):
    rows = _domain_of_rows(next(it))
    counts = np.bincount(rows, minlength=4)[1:]
    if s < 4:
      np.testing.assert_array_equal(counts, [8, 0, 0])
    else:
      want = np.random.default_rng([3, s, 0x5EED]).choice(3, size=8, p=[0, 0.5, 0.5])
      np.testing.assert_array_equal(counts, np.bincount(want, minlength=3))
      assert counts[0] == 0


def test_no_repeat_within_a_pass_across_changes(packed):
  """bb's share changes every 2 steps; its first pass still holds each row exactly once."""
  n_bb = packed.num_sequences["bb"]
  stages = [(2 * i, {"bb": 1.0, "aa": float(i % 3)}) for i in range(12)]
  it = data.BatchIterator(packed, global_batch_size=4, seed=0,
                          sampling=schedule.MixtureSchedule(stages).resolve(packed.names))
  seen = []
  while len(seen) < n_bb:
    b = next(it)
    seen += [r.tobytes() for r, d in zip(b["targets"], _domain_of_rows(b)) if d == 2]
  first = seen[:n_bb]
  assert len(set(first)) == n_bb
  assert set(first) == {r.tobytes() for r in packed.rows("bb", np.arange(n_bb))["targets"]}


def test_schedule_host_slices_and_resume_across_a_change(packed):
  sampling = schedule.MixtureSchedule([(0, {
      "aa": 1.0,
      "bb": 1.0
  }), (3, {
      "cc": 1.0,
      "aa": 0.2
  })]).resolve(packed.names)
  glob = data.BatchIterator(packed, global_batch_size=8, seed=5, sampling=sampling)
  want = [next(glob) for _ in range(6)]
  hosts = [
      data.BatchIterator(packed, global_batch_size=8, seed=5, sampling=sampling, process_index=i,
                         process_count=2) for i in range(2)
  ]
  for s in range(6):
    got = np.concatenate([next(h)["targets"] for h in hosts])
    np.testing.assert_array_equal(got, want[s]["targets"])
  # Resumed at step 2 (before the change at 3) from the input state of step 2.
  it = data.BatchIterator(packed, global_batch_size=8, seed=5, sampling=sampling)
  next(it), next(it)
  saved = it.get_state()
  resumed = data.BatchIterator(packed, global_batch_size=8, seed=5, sampling=sampling)
  resumed.set_state(saved)
  for s in range(2, 6):
    np.testing.assert_array_equal(next(resumed)["targets"], want[s]["targets"])


def test_online_weights_feed(packed):
  feed = data.OnlineWeights(3)
  it = data.BatchIterator(packed, global_batch_size=8, seed=1, sampling="uniform")
  it.follow(feed)
  feed.set(0, [0.0, 0.0, 2.0])
  assert (_domain_of_rows(next(it)) == 3).all()
  with pytest.raises(RuntimeError, match="weights for step 1 are not known yet"):
    next(it)
  with pytest.raises(ValueError, match="not 3 finite non-negative numbers"):
    feed.set(1, [0.5, np.nan, 0.5])
  strat = data.BatchIterator(packed, global_batch_size=8, seed=1, sampling="stratified")
  with pytest.raises(ValueError, match="cannot follow online weights"):
    strat.follow(feed)


def test_mixing_log_feeds_the_sampler_and_flags_a_beaten_reference(packed, tmp_path, caplog):
  """The host side: each step's next weights reach the input; the weights logged are those
  drawn with; 12 trailing steps below the reference on every domain give the flag."""
  cfg = mixing.OnlineConfig(method="doremi")
  state = types.SimpleNamespace(mixing=mixing.init_state(cfg, [0.2, 0.3, 0.5]))
  it = data.BatchIterator(packed, global_batch_size=8, seed=1, sampling="uniform")
  it.follow(data.OnlineWeights(3))
  log = mixing_log.MixingLog(str(tmp_path), packed.names, it, online=cfg, start=0, state=state)
  steps = 20
  with caplog.at_level(logging.WARNING):
    for s in range(steps):
      next(it)  # batch s, drawn with the weights set so far
      w = np.eye(3)[s % 3] * 0.85 + 0.05  # sums to 1
      log.record(s + 1, {
          "next_sampling_weights": w,
          "excess_all_zero": False,
          "reference_beaten": s >= 8
      })
  log.finish(steps, state)
  rows = mixing_log.read(str(tmp_path))
  assert [r["step"] for r in rows] == list(range(1, steps + 1))
  np.testing.assert_allclose(list(rows[0]["weights"].values()), [0.2, 0.3, 0.5], rtol=1e-6)
  np.testing.assert_allclose(list(rows[1]["weights"].values()), [0.2, 0.3, 0.5], rtol=1e-6)
  # Step 3 (index 2) was drawn with what step 1 (index 0) produced.
  np.testing.assert_allclose(list(rows[2]["weights"].values()), np.eye(3)[0] * 0.85 + 0.05)
  online = json.load(open(tmp_path / "online.json"))
  assert online["reference_beaten_from_step"] == 9 and online["steps_with_reference_beaten"] == 12
  assert "below the reference's on every domain since step 9" in caplog.text
  # A streak cut short before the end: no flag, only the count.
  assert mixing_log.beaten_since([{
      "step": 1,
      "reference_beaten": True
  }] * 12 + [{
      "step": 13,
      "reference_beaten": False
  }], min_steps=10) is None
