"""train_step and proxy_step on the fake 8-device mesh: sharding, accumulation, DoReMi limits.

Trainers are built once per setting (module cache) and every run starts from the same host
copy of one initial state, so runs differ only in what is under test.
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from doremi_jax import doremi
from doremi_jax import losses
from doremi_jax import optim
from doremi_jax import sharding
from doremi_jax import steps
from doremi_jax import trainer as trainer_lib
from doremi_jax.model import Transformer
from tests import helpers

CFG = helpers.TINY_CFG
B, L, K = 8, 32, 3
TOTAL_STEPS = 10
RTOL, ATOL = 1e-5, 1e-6


def _mesh(shape):
  return sharding.make_mesh(shape, devices=jax.devices()[:int(np.prod(shape))])


@functools.lru_cache(maxsize=None)
def _trainer(
    mesh_shape=(1, 1, 1), proxy=False, accum=1, eta=1.0, smoothing=1e-3, objective="domain_mean"):
  hp = doremi.DoReMiConfig(eta=eta, smoothing=smoothing, objective=objective)
  step_cfg = steps.StepConfig(num_domains=K, accum_steps=accum, doremi=hp)
  return trainer_lib.build_trainer(model_cfg=CFG, mesh=_mesh(mesh_shape), global_batch_size=B,
                                   seq_len=L, total_steps=TOTAL_STEPS, step_cfg=step_cfg,
                                   ref_model_cfg=CFG if proxy else None)


@functools.lru_cache(maxsize=None)
def _host_init():
  """(initial TrainState, reference params) as numpy: init keys 0 and 1."""
  tr = _trainer()
  state = jax.tree.map(np.asarray, _init(tr, 0))
  ref = jax.tree.map(np.asarray, _init(tr, 1).params)
  return state, ref


def _batches(n=3, **kwargs):
  return [
      helpers.packed_batch(np.random.default_rng(i), B, L, num_domains=K, **kwargs)
      for i in range(n)
  ]


def _balanced_batches(n=3):
  """Batches of 3 equal-length examples a row, one per domain."""
  return [
      helpers.balanced_batch(
          np.random.default_rng(100 + i), B, L, vocab=CFG.vocab_size, num_domains=K)
      for i in range(n)
  ]


# XLA's CPU backend spends most of these tests compiling; a low LLVM optimization level halves
# that. Every run in a comparison is compiled the same way (same jit, shardings, donation).
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}

_COMPILED_STEPS = {}


def _compiled_step(tr):
  if id(tr) not in _COMPILED_STEPS:  # trainers live in the _trainer cache: ids are stable
    _COMPILED_STEPS[id(tr)] = tr.step_fn.lower(
        *trainer_lib.abstract_step_args(tr)).compile(FAST_COMPILE)
  return _COMPILED_STEPS[id(tr)]


def _init(tr, seed):
  return tr.init_fn.lower(jax.random.key(seed)).compile(FAST_COMPILE)(jax.random.key(seed))


def _run(tr, batches, state=None):
  """Steps from the shared initial state; returns (final host state, list of host metrics)."""
  state0, ref = _host_init()
  if state is None:
    # numpy copy: init_state returns alpha_K and avg_alpha_K as one buffer, donated twice.
    state = (
        state0.replace(
            doremi=jax.tree.map(np.array, doremi.init_state(K))) if tr.is_doremi else state0)
  state = jax.device_put(state, tr.state_shardings)
  ref = jax.device_put(ref, tr.ref_shardings) if tr.is_doremi else None
  metrics = []
  for b in batches:
    state, m = _compiled_step(tr)(*trainer_lib.step_args(tr, state, tr.make_batch(b), ref))
    metrics.append(jax.tree.map(np.asarray, m))
  return jax.tree.map(np.asarray, state), metrics


@functools.lru_cache(maxsize=None)
def _cached_run(proxy, which="random", **trainer_kwargs):
  batches = _balanced_batches() if which == "balanced" else _batches()
  return _run(_trainer(proxy=proxy, **trainer_kwargs), batches)


def _assert_close(a, b, rtol=RTOL, atol=ATOL, what=""):
  la, lb = jax.tree_util.tree_leaves_with_path(a), jax.tree.leaves(b)
  assert len(la) == len(lb)
  for (path, x), y in zip(la, lb):
    np.testing.assert_allclose(x, y, rtol=rtol, atol=atol,
                               err_msg=f"{what}{jax.tree_util.keystr(path)}")


def _assert_params_close(a, b, what, max_outlier_fraction=5e-4, outlier_atol=2.5e-4):
  """Parameters agree to RTOL/ATOL except for a few coordinates, all within a fraction of lr.

  AdamW divides each gradient coordinate by its own RMS: where a coordinate's gradient is
  near 0 on some step, float32 reduction-order noise (other shardings, other microbatch
  sums) becomes an update of up to lr = 1e-3. A handful of such coordinates in ~33k is
  expected; a real bug (a lost shard, a wrong reduction) moves most coordinates by ~lr. The
  gradients themselves are compared tightly through the loss and grad_norm metrics.
  """
  x = np.concatenate([np.ravel(v) for v in jax.tree.leaves(a)])
  y = np.concatenate([np.ravel(v) for v in jax.tree.leaves(b)])
  diff = np.abs(x - y)
  outliers = int(np.sum(diff > ATOL + RTOL * np.abs(y)))
  assert outliers <= max(
      2, max_outlier_fraction *
      x.size), (f"{what}: {outliers} of {x.size} parameters differ beyond rtol={RTOL}, atol={ATOL}")
  assert diff.max() < outlier_atol, f"{what}: a parameter differs by {diff.max():.3g}"


def _assert_runs_match(run_a, run_b, keys, what):
  (sa, ma), (sb, mb) = run_a, run_b
  for i, (x, y) in enumerate(zip(ma, mb)):
    for k in keys:
      np.testing.assert_allclose(x[k], y[k], rtol=RTOL, atol=ATOL,
                                 err_msg=f"{what}: step {i} metric {k}")
  _assert_params_close(sa.params, sb.params, what)
  if sa.doremi is not None and sb.doremi is not None:
    _assert_close(sa.doremi, sb.doremi, what=f"{what}: doremi state")
  assert int(sa.step) == int(sb.step) == len(ma)


TRAIN_KEYS = ("loss", "ce_loss", "grad_norm", "domain_loss_sums", "domain_token_counts")
PROXY_KEYS = TRAIN_KEYS + ("ref_loss", "domain_excess", "domain_weights", "avg_domain_weights")

# ---------------------------------------------------------------- sharded == single device


@pytest.mark.parametrize("proxy", [False, True], ids=["train", "proxy"])
@pytest.mark.parametrize("mesh_shape", [(2, 2, 2), (1, 4, 2), (8, 1, 1)], ids=str)
def test_sharded_equals_single_device(mesh_shape, proxy):
  single = _cached_run(proxy)
  sharded = _run(_trainer(mesh_shape, proxy=proxy), _batches())
  _assert_runs_match(sharded, single, PROXY_KEYS if proxy else TRAIN_KEYS, str(mesh_shape))
  # The runs did something: parameters moved, and the domain weights left uniform.
  init = _host_init()[0].params
  assert np.abs(single[0].params["layer_0"]["mlp"]["wo"]["kernel"] -
                init["layer_0"]["mlp"]["wo"]["kernel"]).max() > 1e-4
  if proxy:
    assert np.abs(single[1][-1]["domain_weights"] - 1 / K).max() > 1e-3


def test_sharded_init_equals_single_device_init():
  state = jax.tree.map(np.asarray, _init(_trainer((2, 2, 2)), 0))
  _assert_close(state, _host_init()[0], rtol=0, atol=0, what="init")


# ---------------------------------------------------------- accumulation == full batch


@pytest.mark.parametrize(
    "mesh_shape,accum,proxy",
    [
        ((1, 1, 1), 2, False),
        ((1, 1, 1), 4, False),
        ((1, 1, 1), 2, True),
        ((1, 1, 1), 4, True),
        ((2, 2, 2), 2, True),  # microbatches stay spread over the batch-sharded devices
    ],
    ids=str)
def test_accumulation_equals_full_batch(mesh_shape, accum, proxy):
  full = _cached_run(proxy)
  accumulated = _run(_trainer(mesh_shape, proxy=proxy, accum=accum), _batches())
  _assert_runs_match(accumulated, full, PROXY_KEYS if proxy else TRAIN_KEYS,
                     f"{mesh_shape} accum={accum}")


# ------------------------------------------------------------- what proxy_step computes


@functools.lru_cache(maxsize=None)
def _per_token_ce(params_key, batch_index):
  """Independent per-token cross-entropy of the initial (0) or reference (1) params."""
  state, ref = _host_init()
  params = state.params if params_key == 0 else ref
  b = _batches()[batch_index]
  logits = jax.jit(Transformer(CFG).apply)({
      "params": params
  }, b["inputs"], b["segment_ids"], b["positions"])
  ce, _, _ = losses.per_token_loss(logits, b["targets"], b["loss_mask"])
  return np.asarray(ce, np.float64)


def test_proxy_step_first_update_by_hand():
  """lambda, alpha_1 and the objective of step 1, recomputed in numpy from the two models."""
  _, metrics = _cached_run(True)
  m = metrics[0]
  b = _batches()[0]
  excess = np.maximum(_per_token_ce(0, 0) - _per_token_ce(1, 0), 0) * b["loss_mask"]
  ce = _per_token_ce(0, 0)
  lam, means, counts = np.zeros(K), np.zeros(K), np.zeros(K)
  for d in range(1, K + 1):
    sel = (b["domain_ids"] == d) & (b["loss_mask"] > 0)
    counts[d - 1] = sel.sum()
    lam[d - 1] = excess[sel].mean()
    means[d - 1] = ce[sel].mean()
  assert np.all(counts > 0) and np.all(lam > 0)
  a = np.exp(lam) / 3
  alpha = (1 - 1e-3) * a / a.sum() + 1e-3 / K
  np.testing.assert_array_equal(m["domain_token_counts"], counts)
  np.testing.assert_allclose(m["domain_excess"], lam, rtol=1e-5)
  np.testing.assert_allclose(m["domain_weights"], alpha, rtol=1e-5)
  np.testing.assert_allclose(m["avg_domain_weights"], alpha, rtol=1e-5)
  np.testing.assert_allclose(m["loss"], np.dot(alpha, means), rtol=1e-5)
  # On every step the objective is sum_i alpha_t[i] * (mean loss of domain i).
  for m in metrics:
    np.testing.assert_allclose(
        m["loss"], np.dot(m["domain_weights"], m["domain_loss_sums"] / m["domain_token_counts"]),
        rtol=1e-5)


def test_absent_domain_keeps_its_lambda_in_the_state():
  tr = _trainer(proxy=True)
  first = _batches(1)[0]
  absent = helpers.packed_batch(np.random.default_rng(7), B, L, num_domains=K - 1)  # no domain 3
  state, (m1, m2) = _run(tr, [first, absent])
  assert m2["domain_token_counts"][K - 1] == 0 and np.all(m2["domain_token_counts"][:-1] > 0)
  assert m1["domain_excess"][K - 1] > 0
  assert m2["domain_excess"][K - 1] == m1["domain_excess"][K - 1]
  assert np.all(m2["domain_excess"][:-1] != m1["domain_excess"][:-1])
  np.testing.assert_array_equal(state.doremi.lambda_K, m2["domain_excess"])
  want = doremi.update_weights(
      jnp.asarray(m1["domain_weights"]), jnp.asarray(m2["domain_excess"]), eta=1.0, smoothing=1e-3)
  np.testing.assert_allclose(m2["domain_weights"], want, rtol=1e-6)
  np.testing.assert_allclose(state.doremi.avg_alpha_K,
                             (m1["domain_weights"] + m2["domain_weights"]) / 2, rtol=1e-6)
  assert int(state.doremi.num_updates) == 2


# ----------------------------------------------- DoReMi with eta -> 0 is a plain train step

TINY = dict(eta=1e-12, smoothing=0.0)


def test_balanced_batch_has_equal_domain_counts():
  for b in _balanced_batches():
    counts = [b["loss_mask"][b["domain_ids"] == d].sum() for d in range(1, K + 1)]
    assert counts[0] == counts[1] == counts[2] > 0


def test_tiny_eta_domain_mean_equals_train_step_on_balanced_batches():
  plain = _cached_run(False, "balanced")
  proxy = _cached_run(True, "balanced", **TINY)
  _assert_runs_match(proxy, plain, ("loss", "grad_norm", "ce_loss"), "domain_mean, balanced")
  for m in proxy[1]:
    np.testing.assert_allclose(m["domain_weights"], [1 / K] * K, atol=1e-7)


def test_tiny_eta_domain_mean_differs_from_train_step_on_unbalanced_batches():
  """The control for the test above: with unequal domain counts the objectives differ."""
  (_, plain), (_, proxy) = _cached_run(False), _cached_run(True, **TINY)
  m, p = proxy[0], plain[0]
  np.testing.assert_allclose(p["loss"], p["domain_loss_sums"].sum() / p["num_tokens"], rtol=1e-6)
  np.testing.assert_allclose(m["loss"], np.mean(m["domain_loss_sums"] / m["domain_token_counts"]),
                             rtol=1e-6)
  assert abs(float(m["loss"]) - float(p["loss"])) > 1e-4


def test_tiny_eta_token_weighted_equals_train_step_on_any_batch():
  plain = _cached_run(False)
  proxy = _cached_run(True, objective="token_weighted", **TINY)
  _assert_runs_match(proxy, plain, ("loss", "grad_norm", "ce_loss"), "token_weighted")
  counts = plain[1][0]["domain_token_counts"]
  assert len(set(counts.tolist())) > 1  # the batch really is unbalanced


# -------------------------------------------------------------- errors before compiling


@pytest.mark.parametrize("mesh_shape,kwargs,match", [
    ((2, 2, 2), dict(global_batch_size=6), r"BATCH_SIZE=6 .*data-parallel size 4"),
    ((8, 1, 1), dict(global_batch_size=12), r"BATCH_SIZE=12 .*data-parallel size 8"),
    ((1, 1, 1), dict(seq_len=128), r"128 .*max_len=64"),
    ((1, 1, 1), dict(total_steps=0), r"TRAIN_STEPS=0"),
    ((1, 1, 1), dict(total_steps=-5), r"TRAIN_STEPS=-5"),
    ((1, 1, 1), dict(accum=3), r"BATCH_SIZE=8 .*accum_steps=3"),
    ((2, 1, 1), dict(accum=8), r"microbatch 1 .*data-parallel size 2"),
])
def test_build_trainer_rejects_bad_shapes_before_building(mesh_shape, kwargs, match, monkeypatch):

  def no_model(*_):
    raise AssertionError("build_trainer built the model before validating the shapes")

  monkeypatch.setattr(trainer_lib, "Transformer", no_model)
  monkeypatch.setattr(jax, "jit", no_model)
  args = dict(model_cfg=CFG, mesh=_mesh(mesh_shape), global_batch_size=B, seq_len=L,
              total_steps=TOTAL_STEPS,
              step_cfg=steps.StepConfig(num_domains=K, accum_steps=kwargs.pop("accum", 1)))
  args.update(kwargs)
  with pytest.raises(ValueError, match=match):
    trainer_lib.build_trainer(**args)


# ------------------------------------------------------------------------- lr schedule


def test_lr_schedule_hand_values():
  s = optim.lr_schedule(100, peak_lr=1e-3, final_lr=1e-4)  # warmup: 6 steps
  got = np.array([float(s(t)) for t in (0, 2, 5, 6, 53, 100, 150)])
  want = [1e-3 / 6, 3e-3 / 6, 1e-3, 1e-3, 1e-3 * 0.1**0.5, 1e-4, 1e-4]
  np.testing.assert_allclose(got, want, rtol=1e-5)
  # Linear during warmup; after it, a constant ratio per step (exponential decay).
  warm = np.array([float(s(t)) for t in range(6)])
  np.testing.assert_allclose(np.diff(warm), 1e-3 / 6, rtol=1e-4)
  decay = np.array([float(s(t)) for t in range(6, 101)])
  np.testing.assert_allclose(decay[1:] / decay[:-1], 0.1**(1 / 94), rtol=1e-5)


def test_trainer_uses_the_schedule():
  s = _trainer().schedule
  np.testing.assert_allclose([float(s(0)), float(s(TOTAL_STEPS))], [1e-3, 1e-4], rtol=1e-5)
