"""Counter-based permutations (doremi_jax/permute.py): bijections with no per-row state."""
import numpy as np
import pytest

from doremi_jax import permute


@pytest.mark.parametrize("n", [1, 2, 3, 4, 5, 7, 8, 9, 100, 1023, 1024, 1025, 65_537])
def test_a_bijection_of_range_n(n):
  for key in (0, 1, permute.permutation_key(3, 4, 5)):
    perm = permute.permute(np.arange(n), n, key)
    assert sorted(perm.tolist()) == list(range(n))


def test_pointwise_equals_whole_and_keys_differ():
  n = 5000
  key = permute.permutation_key(0, 2, 1)
  whole = permute.permute(np.arange(n), n, key)
  picks = np.array([4999, 0, 17, 2500, 17])
  np.testing.assert_array_equal(permute.permute(picks, n, key), whole[picks])
  other = permute.permute(np.arange(n), n, permute.permutation_key(0, 2, 2))
  assert (whole != other).mean() > 0.99  # another pass over the domain, another order
  assert (whole != np.arange(n)).mean() > 0.99


def test_close_to_uniform():
  """Where position 0 lands, over many keys: every slot about equally often."""
  n, trials = 8, 8000
  slots = np.array(
      [permute.permute(np.array([0]), n, permute.permutation_key(k))[0] for k in range(trials)])
  counts = np.bincount(slots, minlength=n)
  assert np.abs(counts / (trials / n) - 1).max() < 0.15, counts


def test_large_n_without_materializing():
  n = 300_000_000  # the Pile's rows at L=1024 are of this order
  idx = np.arange(123_456_789, 123_456_789 + 4096)
  out = permute.permute(idx, n, permute.permutation_key(1, 2, 3))
  assert out.min() >= 0 and out.max() < n and len(np.unique(out)) == len(idx)


def test_rejects_indices_outside_the_range():
  with pytest.raises(ValueError, match=r"\[0, 10\)"):
    permute.permute(np.array([10]), 10, 0)
