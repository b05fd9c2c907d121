"""Hand-computed cases of doremi_jax.doremi (DESIGN.md, "The algorithm, exactly")."""
import jax.numpy as jnp
import numpy as np
import pytest

from doremi_jax import doremi


def _np_update(alpha, lam, eta, c):
  """alpha' = alpha * exp(eta * lambda), normalized, smoothed: the paper's formula, float64."""
  alpha, lam = np.asarray(alpha, np.float64), np.asarray(lam, np.float64)
  a = alpha * np.exp(eta * lam)
  return (1 - c) * a / a.sum() + c / len(a)


# A 2 x 4 batch. Position (0, 3) is padding; (1, 2) is a domain-2 token masked out.
VALUES = np.array([[1., 2., 3., 4.], [5., 6., 7., 8.]], np.float32)
IDS = np.array([[1, 1, 2, 0], [3, 2, 2, 1]], np.int32)
MASK = np.array([[1., 1., 1., 0.], [1., 1., 0., 1.]], np.float32)


def test_clipped_excess_clips_and_masks():
  proxy = np.array([[2.0, 1.0, 3.0, 50.0]], np.float32)
  ref = np.array([[1.5, 1.2, 1.0, 0.0]], np.float32)
  mask = np.array([[1., 1., 1., 0.]], np.float32)
  got = doremi.clipped_excess(proxy, ref, mask)
  np.testing.assert_allclose(got, [[0.5, 0.0, 2.0, 0.0]], atol=1e-7)


def test_per_domain_sums_by_hand():
  sums, counts = doremi.per_domain_sums(VALUES, IDS, MASK, 3)
  # d1: 1 + 2 + 8; d2: 3 + 6 (7 is masked); d3: 5. Padding (4) counts nowhere.
  np.testing.assert_allclose(sums, [11.0, 9.0, 5.0], atol=1e-6)
  np.testing.assert_array_equal(counts, [3.0, 2.0, 1.0])


def test_excess_with_padding_excludes_masked_tokens_whatever_their_loss():
  proxy = np.array([[3.0, 2.0, 9.0, 1.0]], np.float32)
  ids = np.array([[1, 1, 1, 2]], np.int32)
  mask = np.array([[1., 1., 0., 1.]], np.float32)
  ref = np.array([[1.0, 1.0, 0.0, 0.5]], np.float32)
  ex = doremi.clipped_excess(proxy, ref, mask)
  sums, counts = doremi.per_domain_sums(ex, ids, mask, 2)
  lam = doremi.domain_excess(sums, counts, jnp.zeros(2))
  # Domain 1: (2 + 1) / 2 tokens; the masked token (excess 9) is excluded. Domain 2: 0.5 / 1.
  np.testing.assert_allclose(lam, [1.5, 0.5], atol=1e-6)
  # Changing the masked token's losses changes nothing.
  proxy2, ref2 = proxy.copy(), ref.copy()
  proxy2[0, 2], ref2[0, 2] = -7.0, 100.0
  ex2 = doremi.clipped_excess(proxy2, ref2, mask)
  np.testing.assert_array_equal(doremi.per_domain_sums(ex2, ids, mask, 2)[0], sums)


def test_domain_excess_absent_keeps_previous_and_all_clipped_is_zero():
  lam = doremi.domain_excess(
      jnp.array([3.0, 0.0, 0.0]), jnp.array([2.0, 0.0, 4.0]), jnp.array([9.0, 7.0, 5.0]))
  np.testing.assert_allclose(lam, [1.5, 7.0, 0.0], atol=1e-6)


def test_step_absent_domain_keeps_lambda_all_clipped_domain_gets_zero():
  state = doremi.init_state(3)._replace(lambda_K=jnp.array([0.4, 0.8, 1.2], jnp.float32))
  proxy = np.array([[2.0, 2.0, 1.0, 1.0]], np.float32)
  ref = np.array([[1.0, 1.5, 3.0, 2.0]], np.float32)  # domain 2: proxy < ref everywhere
  ids = np.array([[1, 1, 2, 2]], np.int32)  # domain 3 absent
  mask = np.ones((1, 4), np.float32)
  ex = doremi.clipped_excess(proxy, ref, mask)
  sums, counts = doremi.per_domain_sums(ex, ids, mask, 3)
  new = doremi.step(state, sums, counts, eta=1.0, smoothing=0.0)
  np.testing.assert_allclose(new.lambda_K, [0.75, 0.0, 1.2], atol=1e-6)
  np.testing.assert_allclose(new.alpha_K, _np_update([1 / 3] * 3, [0.75, 0.0, 1.2], 1.0, 0.0),
                             atol=1e-6)
  assert int(new.num_updates) == 1


def test_update_weights_hand_k3():
  alpha, lam, eta, c = [0.2, 0.3, 0.5], [1.0, 0.5, 0.0], 0.7, 0.1
  got = np.asarray(doremi.update_weights(jnp.array(alpha), jnp.array(lam), eta=eta, smoothing=c))
  a = np.array([0.2 * np.exp(0.7), 0.3 * np.exp(0.35), 0.5])
  want = 0.9 * a / a.sum() + 0.1 / 3
  np.testing.assert_allclose(got, want, atol=1e-6)
  np.testing.assert_allclose(got, [0.3061850, 0.3217463, 0.3720687], atol=1e-6)


@pytest.mark.parametrize("eta,lam,c", [
    (1e3, [50.0, 0.0, 0.1, 3.0], 1e-3),
    (1e6, [1e4, 2e4, 0.0, 7.0], 0.2),
    (1.0, [0.0, 0.0, 0.0, 0.0], 0.5),
    (1e8, [1e30, 0.0, 0.0, 1e30], 0.0),
])
def test_smoothing_bounds_and_no_overflow(eta, lam, c):
  k = len(lam)
  for alpha in ([0.25] * 4, [0.97, 0.01, 0.01, 0.01], [1.0, 0.0, 0.0, 0.0]):
    got = np.asarray(
        doremi.update_weights(
            jnp.array(alpha, jnp.float32), jnp.array(lam, jnp.float32), eta=eta, smoothing=c))
    assert np.all(np.isfinite(got)), got
    assert np.all(got >= c / k - 1e-7), got
    assert np.all(got <= 1 - c + c / k + 1e-6), got
    np.testing.assert_allclose(got.sum(), 1.0, atol=1e-6)


def test_eta_zero_keeps_uniform_uniform():
  got = doremi.update_weights(
      jnp.full((3,), 1 / 3), jnp.array([5.0, 0.0, 2.0]), eta=0.0, smoothing=1e-3)
  np.testing.assert_allclose(got, [1 / 3] * 3, atol=1e-7)


def test_running_average_is_mean_of_alpha_1_to_t():
  rng = np.random.default_rng(0)
  state = doremi.init_state(3, initial_alpha_K=[0.6, 0.3, 0.1])
  alphas = []
  for _ in range(6):
    sums = jnp.asarray(rng.uniform(0, 5, 3), jnp.float32)
    counts = jnp.asarray(rng.integers(1, 4, 3), jnp.float32)
    state = doremi.step(state, sums, counts, eta=1.0, smoothing=1e-3)
    alphas.append(np.asarray(state.alpha_K))
  np.testing.assert_allclose(state.avg_alpha_K, np.mean(alphas, axis=0), atol=1e-6)
  with_alpha0 = np.mean([[0.6, 0.3, 0.1]] + alphas, axis=0)
  assert np.abs(np.asarray(state.avg_alpha_K) - with_alpha0).max() > 1e-3
  assert int(state.num_updates) == 6


# Per-token losses for token_weights: d1 = [1, 3] (mean 2), d2 = [4], d3 = [2, 6, 10] (mean 6);
# a masked domain-1 token has loss 100, and one padding token.
LOSS = np.array([[1.0, 3.0, 100.0, 4.0], [2.0, 6.0, 10.0, 0.0]], np.float32)
LIDS = np.array([[1, 1, 1, 2], [3, 3, 3, 0]], np.int32)
LMASK = np.array([[1., 1., 0., 1.], [1., 1., 1., 0.]], np.float32)
ALPHA = np.array([0.5, 0.3, 0.2], np.float32)


def test_token_weights_domain_mean_by_hand():
  _, counts = doremi.per_domain_sums(LOSS, LIDS, LMASK, 3)
  w = doremi.token_weights(jnp.asarray(ALPHA), LIDS, LMASK, counts, "domain_mean")
  np.testing.assert_allclose(jnp.sum(w * LOSS), 0.5 * 2 + 0.3 * 4 + 0.2 * 6, rtol=1e-6)
  assert float(w[0, 2]) == 0.0 and float(w[1, 3]) == 0.0


def test_token_weights_token_weighted_by_hand():
  _, counts = doremi.per_domain_sums(LOSS, LIDS, LMASK, 3)
  w = doremi.token_weights(jnp.asarray(ALPHA), LIDS, LMASK, counts, "token_weighted")
  want = (0.5 * (1 + 3) + 0.3 * 4 + 0.2 * (2 + 6 + 10)) / (0.5 * 2 + 0.3 * 1 + 0.2 * 3)
  np.testing.assert_allclose(jnp.sum(w * LOSS), want, rtol=1e-6)
  np.testing.assert_allclose(jnp.sum(w), 1.0, rtol=1e-6)


def test_token_weights_absent_domain_contributes_nothing():
  ids = np.where(LIDS == 3, 2, LIDS)  # domain 3 absent
  _, counts = doremi.per_domain_sums(LOSS, ids, LMASK, 3)
  w = doremi.token_weights(jnp.asarray(ALPHA), ids, LMASK, counts, "domain_mean")
  np.testing.assert_allclose(jnp.sum(w), 0.5 + 0.3, rtol=1e-6)


@pytest.mark.parametrize("objective", doremi.OBJECTIVES)
@pytest.mark.parametrize("num_micro", [2, 4])
def test_microbatch_token_weights_sum_to_global_objective(objective, num_micro):
  rng = np.random.default_rng(1)
  loss = rng.uniform(0, 5, (8, 6)).astype(np.float32)
  ids = rng.integers(0, 4, (8, 6)).astype(np.int32)
  mask = (ids > 0).astype(np.float32)
  alpha = jnp.array([0.2, 0.5, 0.3])
  _, counts = doremi.per_domain_sums(loss, ids, mask, 3)
  glob = jnp.sum(doremi.token_weights(alpha, ids, mask, counts, objective) * loss)
  total = 0.0
  for i in range(num_micro):
    rows = slice(i, None, num_micro)
    w = doremi.token_weights(alpha, ids[rows], mask[rows], counts, objective)
    total += float(jnp.sum(w * loss[rows]))
  np.testing.assert_allclose(total, glob, rtol=1e-6)
  # And the global objective is the formula itself, not just self-consistent.
  means = np.array([loss[(ids == d) & (mask > 0)].mean() for d in (1, 2, 3)])
  cnt = np.asarray(counts)
  want = (
      np.dot(alpha, means) if objective == "domain_mean" else np.dot(alpha, means * cnt) /
      np.dot(alpha, cnt))
  np.testing.assert_allclose(glob, want, rtol=1e-5)


def test_token_weights_unknown_objective():
  with pytest.raises(ValueError, match="objective"):
    doremi.token_weights(jnp.asarray(ALPHA), LIDS, LMASK, jnp.ones(3), "bogus")


@pytest.mark.parametrize("kwargs,match", [
    (dict(eta=0.0, smoothing=1e-3), "eta"),
    (dict(eta=-1.0, smoothing=1e-3), "eta"),
    (dict(eta=float("nan"), smoothing=1e-3), "eta"),
    (dict(eta=1.0, smoothing=-0.1), "smoothing"),
    (dict(eta=1.0, smoothing=1.0), "smoothing"),
    (dict(eta=1.0, smoothing=1e-3, objective="mean"), "objective"),
])
def test_validate_errors(kwargs, match):
  with pytest.raises(ValueError, match=match):
    doremi.validate(**kwargs)


def test_validate_accepts_defaults():
  doremi.validate(eta=1.0, smoothing=1e-3)
  doremi.validate(eta=1.0, smoothing=0.0, objective="token_weighted")


def test_init_state():
  s = doremi.init_state(4, initial_lambda=2.0)
  np.testing.assert_allclose(s.alpha_K, [0.25] * 4)
  np.testing.assert_allclose(s.lambda_K, [2.0] * 4)
  assert int(s.num_updates) == 0
