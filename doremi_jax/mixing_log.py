"""The host side of a run whose sampling weights change (a schedule or an online method).

- feeds an online run's weights, read from each step's metrics one step late, to the input
  (data.OnlineWeights), and on resume restores the two weights in flight from the state;
- writes the weights in force at every step to MODEL_DIR/sampling_weights.jsonl
  ({"step": n, "weights": {domain: w}} for the n-th step, as metrics.jsonl counts steps);
- online DoReMi: flags a reference that the main model beats on every domain (its mean loss
  below the reference's on each domain of the batch: from then the clipped excess is only the
  positive half of per-token differences, not a lag behind the reference), logs it once a
  streak, and records it in online.json.
"""
import logging
import os
from typing import Optional

import jax
import numpy as np

from doremi_jax import mixing
from doremi_jax import outputs

# Steps in a row with the main model below the reference on every domain of the batch before
# the run says the reference is beaten (online.json: also at least this share of the run).
BEATEN_MIN_STEPS = 10
BEATEN_MIN_FRACTION = 0.05


def initial_state(cfg: mixing.OnlineConfig, weights_K, shardings):
  """The mixing state of a fresh online run, replicated like the rest of the state."""
  # Every leaf its own host copy: two leaves sharing one buffer cannot both be donated.
  leaves = jax.tree.map(np.array, mixing.init_state(cfg, np.asarray(weights_K, np.float32)))
  return jax.device_put(leaves, shardings)


class MixingLog:
  """See the module docstring. `record(step, m)` takes the host metrics of the step-th step."""

  def __init__(self, model_dir: str, domains, batches, *, online: Optional[mixing.OnlineConfig],
               start: int, state=None):
    self.path = os.path.join(model_dir, outputs.SAMPLING_WEIGHTS)
    self.model_dir, self.domains, self.batches, self.online = model_dir, list(
        domains), batches, online
    self._buffer, self._streak = [], 0
    outputs.truncate_jsonl(self.path, start)
    if online is not None:
      pending, nxt = jax.device_get((state.mixing.pending_K, state.mixing.next_K))
      batches.schedule.set(start, pending)
      batches.schedule.set(start + 1, nxt)

  def record(self, step: int, m: dict) -> dict:
    """Feeds the input and logs the step-th step's weights; returns them as {domain: w}."""
    if self.online is not None:
      self.batches.schedule.set(step + 1, m["next_sampling_weights"])
    weights = self.batches.weights_at(step - 1)  # exactly what the sampler drew with
    row = {"step": int(step), "weights": dict(zip(self.domains, map(float, weights)))}
    if "reference_beaten" in m:
      row["excess_all_zero"] = bool(m["excess_all_zero"])
      row["reference_beaten"] = bool(m["reference_beaten"])
      self._streak = self._streak + 1 if row["reference_beaten"] else 0
      if self._streak == BEATEN_MIN_STEPS:  # once per streak
        logging.warning(
            "online DoReMi: the main model's mean loss is below the reference's on every "
            "domain since step %d, so the clipped excess no longer measures a lag behind the "
            "reference; online DoReMi needs a reference at least as strong as the main model.",
            step - BEATEN_MIN_STEPS + 1)
    self._buffer.append(row)
    return row["weights"]

  def flush(self) -> None:
    outputs.append_jsonl(self.path, self._buffer)
    self._buffer = []

  def finish(self, steps: int, state) -> Optional[dict]:
    """online.json for an online run: the method, the final and average weights, the flag."""
    self.flush()
    if self.online is None:
      return None
    rows = outputs.read_jsonl(self.path)
    since = beaten_since(rows, min_steps=max(BEATEN_MIN_STEPS, int(BEATEN_MIN_FRACTION * steps)))
    final = jax.device_get(state.mixing.next_K)
    out = {
        "method": self.online.method,
        "config": dict(vars(self.online)),
        "steps": steps,
        "final_weights": dict(zip(self.domains, map(float, final))),
        "average_weights": mean_weights(rows),
        "reference_beaten_from_step": since,
        "steps_with_reference_beaten": sum(1 for r in rows if r.get("reference_beaten")),
        "steps_with_all_excess_zero": sum(1 for r in rows if r.get("excess_all_zero")),
        "lag_steps": 1,
    }
    outputs.write_json(os.path.join(self.model_dir, outputs.ONLINE), out)
    return out


def beaten_since(rows, *, min_steps: int) -> Optional[int]:
  """The first step of the trailing run of steps with the reference beaten on every domain,
  if it is min_steps long."""
  n = 0
  for r in reversed(rows):
    if not r.get("reference_beaten"):
      break
    n += 1
  return int(rows[-n]["step"]) if n >= min_steps and n > 0 else None


def mean_weights(rows) -> Optional[dict]:
  if not rows:
    return None
  domains = list(rows[0]["weights"])
  return {d: float(np.mean([r["weights"][d] for r in rows])) for d in domains}


def read(model_dir: str) -> list[dict]:
  return outputs.read_jsonl(os.path.join(model_dir, outputs.SAMPLING_WEIGHTS))
