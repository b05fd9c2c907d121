"""Have a DoReMi run's weights settled? Diagnostics of the weight trajectory alpha_1..T.

The output is the average of alpha_t, so it is trustworthy only when more steps would not
move it: the paper's averaged weights "stabilize after 50k steps" of 200k (Appendix B).

- half_drift: max_i |mean of the first half - mean of the second half|;
- tail_drift: max_i |mean over all steps - mean over the last 3/4|;
- effective_domains: exp(entropy of alpha_t), averaged over the tail (the last half);
  K means uniform, 1 one-hot;
- leader_changes: how often the largest weight changes domain in the tail;
- tail_excess / tail_loss_gap: per domain, the mean clipped excess and the mean proxy minus
  reference loss over the tail (a proxy that has not caught up with its reference shows a
  positive gap on every domain).

Settled: half_drift <= 0.1 / K, a tenth of a uniform domain's weight. Below it, the
averaged weights would move less than a tenth of a uniform share if the run went on as its
second half did; above it, the reported average is still mostly the transient.
"""
import math
from typing import Mapping, Optional, Sequence

import numpy as np


def settle_threshold(num_domains: int) -> float:
  return 0.1 / num_domains


def _tail(x: np.ndarray, fraction: float) -> np.ndarray:
  return x[int(len(x) * (1 - fraction)):]


def weight_diagnostics(alpha_TxK) -> dict:
  """The weight diagnostics of a trajectory [T, K] (see the module docstring)."""
  a = np.asarray(alpha_TxK, np.float64)
  t, k = a.shape
  if t < 2:
    return {"steps": t, "settled": False, "threshold": settle_threshold(k)}
  half = t // 2
  half_drift = float(np.max(np.abs(a[:half].mean(0) - a[half:].mean(0))))
  tail_drift = float(np.max(np.abs(a.mean(0) - _tail(a, 0.75).mean(0))))
  tail = _tail(a, 0.5)
  p = np.clip(tail, 1e-12, 1.0)
  effective = float(np.mean(np.exp(-np.sum(p * np.log(p), axis=1))))
  leaders = np.argmax(tail, axis=1)
  return {
      "steps": t,
      "half_drift": half_drift,
      "tail_drift": tail_drift,
      "effective_domains": effective,
      "leader_changes": int(np.sum(leaders[1:] != leaders[:-1])),
      "threshold": settle_threshold(k),
      "settled": half_drift <= settle_threshold(k),
  }


def _tail_mean(records: Sequence[Mapping], key: str, domains: Sequence[str]) -> Optional[dict]:
  rows = [r[key] for r in _tail(np.asarray(records, dtype=object), 0.5) if key in r]
  if not rows:
    return None
  return {d: float(np.mean([r[d] for r in rows if d in r])) for d in domains}


def run_diagnostics(trajectory: Sequence[Mapping], metrics: Sequence[Mapping],
                    domains: Sequence[str]) -> dict:
  """Diagnostics of a finished DoReMi run from its trajectory and metrics.jsonl records.

  metrics records carry domain_excess, domain_loss and domain_ref_loss (DoReMi runs).
  """
  out = weight_diagnostics([r["domain_weights"] for r in trajectory])
  out["tail_excess"] = _tail_mean(metrics, "domain_excess", domains)
  loss, ref = (_tail_mean(metrics, key, domains) for key in ("domain_loss", "domain_ref_loss"))
  out["tail_loss_gap"] = ({
      d: loss[d] - ref[d] for d in domains if not (math.isnan(loss[d]) or math.isnan(ref[d]))
  } if loss and ref else None)
  return out


def moving_average(alpha_TxK, window: int) -> np.ndarray:
  """The trailing moving average of the weights (the paper's Fig. 8 style)."""
  a = np.asarray(alpha_TxK, np.float64)
  window = max(1, min(int(window), len(a)))
  c = np.cumsum(np.concatenate([np.zeros((1, a.shape[1])), a]), axis=0)
  idx = np.arange(1, len(a) + 1)
  lo = np.maximum(idx - window, 0)
  return (c[idx] - c[lo]) / (idx - lo)[:, None]
