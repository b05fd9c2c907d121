"""Counter-based pseudo-random permutations: perm(i) in O(1) memory, for any n.

The input samples row perm_{seed, domain, pass}(k) as the k-th draw of a pass over a
domain. Materializing each permutation costs 8 bytes per row per cached pass (gigabytes
per host at Pile scale); this computes perm(i) for the rows a batch needs only. A
balanced Feistel network on the smallest even-bit domain 2^b >= n is a bijection there;
cycle-walking (apply it again while the value is >= n) restricts it to [0, n), at under
four applications per index on average since 2^b < 4n.
"""
import hashlib

import numpy as np

_ROUNDS = 6


def _mix(x: np.ndarray) -> np.ndarray:
  """splitmix64's finalizer on uint64 arrays (wrapping arithmetic)."""
  with np.errstate(over="ignore"):
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def permutation_key(*parts: int) -> int:
  """A 64-bit key from integers (e.g. seed, domain, pass), stable across platforms."""
  digest = hashlib.blake2b(repr(tuple(int(p) for p in parts)).encode(), digest_size=8)
  return int.from_bytes(digest.digest(), "little")


def permute(index, n: int, key: int) -> np.ndarray:
  """perm(index) for the permutation of [0, n) that `key` selects; int64, index's shape."""
  index = np.asarray(index, np.int64)
  if n <= 0 or (index < 0).any() or (index >= n).any():
    raise ValueError(f"indices must be in [0, {n}).")
  if n == 1:
    return np.zeros_like(index)
  half = max((int(n - 1).bit_length() + 1) // 2, 1)
  mask = np.uint64((1 << half) - 1)
  round_keys = [
      _mix(np.array([key ^ (r * 0x9E3779B97F4A7C15 & (2**64 - 1))], np.uint64))[0]
      for r in range(1, _ROUNDS + 1)
  ]

  def feistel(x):
    left, right = x >> np.uint64(half), x & mask
    for k in round_keys:
      left, right = right, left ^ (_mix(right ^ k) & mask)
    return (left << np.uint64(half)) | right

  out = feistel(index.astype(np.uint64).reshape(-1))
  outside = out >= np.uint64(n)
  while outside.any():
    out[outside] = feistel(out[outside])
    outside = out >= np.uint64(n)
  return out.astype(np.int64).reshape(index.shape)
