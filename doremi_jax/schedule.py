"""Sampling weights as a function of the step: stages and linear interpolation.

  MixtureSchedule(stages=[(0, "natural.json"), (1000, {"code": 0.5, "prose": 0.5})])
  MixtureSchedule(stages=[(0, weights_a), (5000, weights_b)], interpolate=True)

Each stage is (start_step, weights); weights are a {domain: weight} dict or a weights file
(local, gs://, or a shipped name such as "pile_doremi_280m"). Piecewise constant: the weights
of the last stage whose start is <= the step. interpolate=True: linear between consecutive
stages, constant after the last. The first stage starts at step 0.

The input (data.BatchIterator) draws step s's batch from `probs(s)`; the weights change
between steps only, and the per-domain draw counters carry over, so no sequence repeats
within a pass over its domain across a change.
"""
import dataclasses
from typing import Any, Mapping, Optional, Sequence, Union

import numpy as np

from data_pipelines import core
from data_pipelines import weights as weights_lib

Weights = Union[str, Mapping[str, float]]


@dataclasses.dataclass(frozen=True)
class MixtureSchedule:
  """Stages [(start_step, weights), ...] (gin: `MixtureSchedule.stages`)."""
  stages: Sequence[tuple[int, Any]]
  interpolate: bool = False

  def resolve(self, domains: Sequence[str], *, train_steps: Optional[int] = None) -> "Resolved":
    """Checked and normalized, as arrays in `domains` order; clear errors for bad input."""
    if not self.stages:
      raise ValueError("MixtureSchedule.stages is empty: give [(0, weights), ...].")
    starts, rows = [], []
    for i, stage in enumerate(self.stages):
      if not (isinstance(stage, (tuple, list)) and len(stage) == 2):
        raise ValueError(f"MixtureSchedule.stages[{i}]={stage!r}: give (start_step, weights).")
      start, w = stage
      if not isinstance(start, (int, np.integer)) or isinstance(start, bool) or start < 0:
        raise ValueError(f"MixtureSchedule.stages[{i}] starts at {start!r}: give a step >= 0.")
      starts.append(int(start))
      rows.append(_weights_row(w, domains, f"MixtureSchedule.stages[{i}]"))
    if starts[0] != 0:
      raise ValueError(f"MixtureSchedule.stages start at step {starts[0]}: the first stage "
                       f"must start at step 0.")
    bad = [(a, b) for a, b in zip(starts, starts[1:]) if b <= a]
    if bad:
      raise ValueError(f"MixtureSchedule.stages' steps must increase: {bad[0][1]} follows "
                       f"{bad[0][0]} (steps: {starts}).")
    if train_steps is not None and starts[-1] >= train_steps:
      raise ValueError(f"MixtureSchedule stage at step {starts[-1]} never runs: the run has "
                       f"TRAIN_STEPS={train_steps} (steps 0..{train_steps - 1}).")
    return Resolved(np.array(starts, np.int64), np.stack(rows), self.interpolate)


def _weights_row(w: Weights, domains: Sequence[str], where: str) -> np.ndarray:
  """A stage's weights as a normalized float64 row in domain order."""
  if isinstance(w, str):
    where = f"{where} ({w})"
    w = weights_lib.read_weights(w, domains=domains)
  elif not isinstance(w, Mapping):
    raise ValueError(f"{where}: weights {w!r} must be a {{domain: weight}} dict or a weights "
                     f"file.")
  w = weights_lib.validate_weights(w, domains=domains, source=where)
  by_name = {(d if d in domains else core.sanitize(d)): v for d, v in w.items()}
  row = np.array([by_name.get(d, 0.0) for d in domains], np.float64)
  return row / row.sum()


@dataclasses.dataclass(frozen=True)
class Resolved:
  """A checked schedule: probs(step) is a normalized float64 vector in domain order."""
  starts: np.ndarray  # [S] increasing, starts[0] == 0
  weights: np.ndarray  # [S, K]
  interpolate: bool

  def probs(self, step: int) -> np.ndarray:
    i = int(np.searchsorted(self.starts, step, side="right")) - 1
    if not self.interpolate or i + 1 >= len(self.starts):
      return self.weights[i]
    a, b = self.starts[i], self.starts[i + 1]
    f = (step - a) / (b - a)
    p = (1.0 - f) * self.weights[i] + f * self.weights[i + 1]
    return p / p.sum()
