"""Synthetic packed batches for step tests (the data pipeline has its own tests)."""
import numpy as np


def packed_batch(rng: np.random.Generator, batch_size: int, seq_len: int, *, vocab: int = 259,
                 num_domains: int = 3, max_segments: int = 3, pad_fraction: float = 0.2):
  """Rows of up to `max_segments` packed examples, each of one random domain, then padding."""
  out = {k: np.zeros((batch_size, seq_len), np.int32)
         for k in ("inputs", "targets", "segment_ids", "positions", "domain_ids")}
  out["loss_mask"] = np.zeros((batch_size, seq_len), np.float32)
  for b in range(batch_size):
    used = int(seq_len * (1 - pad_fraction * rng.random()))
    cuts = np.sort(rng.choice(np.arange(1, used), size=max_segments - 1, replace=False))
    bounds = [0, *cuts.tolist(), used]
    for s, (lo, hi) in enumerate(zip(bounds[:-1], bounds[1:])):
      toks = rng.integers(3, vocab, size=hi - lo)
      out["targets"][b, lo:hi] = toks
      out["inputs"][b, lo + 1:hi] = toks[:-1]
      out["segment_ids"][b, lo:hi] = s + 1
      out["positions"][b, lo:hi] = np.arange(hi - lo)
      out["domain_ids"][b, lo:hi] = rng.integers(1, num_domains + 1)
      out["loss_mask"][b, lo:hi] = 1.0
  return out
