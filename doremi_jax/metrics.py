"""Run metrics: metrics.jsonl, TensorBoard events, DoReMi weights and their trajectory, and
a terminal progress bar.

Only process 0 writes. Values arrive as host numpy/python (the loop reads metrics one step
late to respect async dispatch).
"""
import contextlib
import contextvars
import logging
import math
import os
import sys
import time
from typing import Mapping, Optional, Sequence

import jax
import numpy as np

from doremi_jax import diagnostics as diagnostics_lib
from doremi_jax import outputs


class MetricsWriter:
  """Appends one JSON object per logged step and mirrors scalars to TensorBoard."""

  def __init__(self, model_dir: str, *, tensorboard: bool = True):
    self.active = outputs.is_writer()
    self.path = os.path.join(model_dir, outputs.METRICS)
    self._tb = None
    if not self.active:
      return
    outputs.makedirs(model_dir)
    if tensorboard:
      import tensorflow as tf  # pylint: disable=g-import-not-at-top
      self._tf = tf
      self._tb = tf.summary.create_file_writer(os.path.join(model_dir, outputs.TENSORBOARD))

  def truncate_after(self, step: int) -> None:
    """On resume, drop lines logged after the restored step (they will be logged again)."""
    outputs.truncate_jsonl(self.path, step)

  def write(self, step: int, values: Mapping) -> None:
    if not self.active:
      return
    outputs.append_jsonl(self.path, [{
        "step": int(step),
        **{
            k: _plain(v) for k, v in values.items()
        }
    }])
    if self._tb is not None:
      with self._tb.as_default():
        for name, value in _flatten(values):
          self._tf.summary.scalar(name, value, step=step)
      self._tb.flush()

  def close(self) -> None:
    if self._tb is not None:
      self._tb.close()
      self._tb = None


class Trajectory:
  """Every step's domain weights and running average (domain_weights_trajectory.jsonl).

  On resume, lines after the restored step are dropped (those steps run again). The weights
  so far stay in memory (K floats a step) for the convergence diagnostics.
  """

  def __init__(self, model_dir: str, start_step: int):
    self.path = os.path.join(model_dir, outputs.TRAJECTORY)
    self._buffer = []
    outputs.truncate_jsonl(self.path, start_step)
    self._alphas = [
        r["domain_weights"] for r in outputs.read_jsonl(self.path) if r["step"] <= start_step
    ]

  def append(self, step: int, alpha_K, avg_alpha_K) -> None:
    alpha = np.asarray(alpha_K).tolist()
    self._alphas.append(alpha)
    self._buffer.append({
        "step": int(step),
        "domain_weights": alpha,
        "avg_domain_weights": np.asarray(avg_alpha_K).tolist()
    })

  def flush(self) -> None:
    outputs.append_jsonl(self.path, self._buffer)
    self._buffer = []

  def diagnostics(self) -> dict:
    return diagnostics_lib.weight_diagnostics(self._alphas)


def read_trajectory(model_dir: str) -> list[dict]:
  return outputs.read_jsonl(os.path.join(model_dir, outputs.TRAJECTORY))


def write_domain_weights(model_dir: str, state, info: dict, doremi_cfg, *, reference_dir: str,
                         steps: int) -> dict:
  """MODEL_DIR/domain_weights.json: the averaged weights (the DoReMi output) and metadata."""
  dstate = jax.device_get(state.doremi)
  domains = info["domains"]
  out = {
      "domains":
          dict(zip(domains, map(float, dstate.avg_alpha_K))),
      "final_domain_weights":
          dict(zip(domains, map(float, dstate.alpha_K))),
      "mixture":
          info["mixture"],
      "reference":
          reference_dir,
      "reference_step":
          info.get("reference_step"),
      "proxy_params":
          info["num_params"],
      "proxy_model":
          info["model"],
      "steps":
          steps,
      "eta":
          doremi_cfg.eta,
      "c":
          doremi_cfg.smoothing,
      "objective":
          doremi_cfg.objective,
      "sampling":
          doremi_cfg.sampling,
      "vocabulary":
          info["vocabulary"],
      "sequence_length":
          info["sequence_length"],
      "diagnostics":
          diagnostics_lib.run_diagnostics(
              read_trajectory(model_dir),
              outputs.read_jsonl(os.path.join(model_dir, outputs.METRICS)), domains),
  }
  outputs.write_json(os.path.join(model_dir, outputs.DOMAIN_WEIGHTS), out)
  return out


def _plain(v):
  if isinstance(v, Mapping):
    return {k: _plain(x) for k, x in v.items()}
  if isinstance(v, (np.ndarray, np.generic, jax.Array)):
    v = np.asarray(v)
    return v.tolist() if v.ndim else v.item()
  return v


def _flatten(values: Mapping, prefix: str = ""):
  for k, v in values.items():
    if isinstance(v, Mapping):
      yield from _flatten(v, f"{prefix}{k}/")
    elif isinstance(v, (int, float, np.number)) and math.isfinite(float(v)):
      yield f"{prefix}{k}", float(v)


_STUDY = contextvars.ContextVar("doremi_study_progress", default=None)


class StudyProgress:
  """Where a study (pipeline.py) stands, for the progress line: stage i of n, and the study's
  time left, estimated from each kind of stage's measured length (reference, proxy, main;
  a kind not run yet counts as the mean of those measured; a None kind, a stage that reuses
  a finished run, as 0). `with StudyProgress(kinds):`
  around the study, `with study.stage(kind, label):` around each stage; Progress reads it
  (display only: nothing else depends on it)."""

  def __init__(self, kinds: Sequence[str]):
    self.kinds, self.done, self.seconds = list(kinds), 0, {}
    self.current, self._token = None, None

  def __enter__(self):
    self._token = _STUDY.set(self)
    return self

  def __exit__(self, *exc):
    _STUDY.reset(self._token)

  @contextlib.contextmanager
  def stage(self, kind: str, label: str):
    self.current = (kind, label)
    try:
      yield
    finally:
      self.done, self.current = self.done + 1, None

  def record(self, seconds: float) -> None:
    """The current stage's measured (or projected) length, for the stages of its kind."""
    if self.current:
      self.seconds[self.current[0]] = seconds

  def label(self) -> str:
    total = max(len(self.kinds), self.done + 1)
    return f"stage {self.done + 1}/{total} {self.current[1] if self.current else ''}".rstrip()

  def left(self, stage_left: float, stage_seconds: float) -> float:
    """The study's seconds left: this stage's, then each later stage's estimate."""
    known = dict(self.seconds)
    if self.current:
      known.setdefault(self.current[0], stage_seconds)
    fallback = sum(known.values()) / len(known) if known else stage_seconds
    return stage_left + sum(
        known.get(k, fallback) if k else 0.0 for k in self.kinds[self.done + 1:])


def current_study() -> Optional[StudyProgress]:
  return _STUDY.get()


class Progress:
  """A one-line progress bar with tokens/s and time left, only on an interactive terminal;
  inside a study, the stage (i of n) and the study's time left too."""

  def __init__(self, total_steps: int, start_step: int, *, stream=None):
    self.stream = stream or sys.stderr
    self.enabled = jax.process_index() == 0 and self.stream.isatty()
    self.total, self.start = total_steps, start_step
    self.t0 = time.time()
    self.study = current_study()
    self._projected, self._width = None, 0
    if self.enabled:  # a log line starts below the progress line, not after it
      for handler in logging.getLogger().handlers:
        handler.addFilter(self._end_line)

  def _end_line(self, record) -> bool:
    del record
    if self._width:
      self.stream.write("\n")
      self.stream.flush()
      self._width = 0
    return True

  def update(self, step: int, loss: Optional[float], tokens_per_second: float) -> None:
    done = step - self.start
    elapsed = time.time() - self.t0
    left = elapsed / max(done, 1) * (self.total - step)
    self._projected = elapsed + left if done > 0 else None
    if not self.enabled:
      return
    line = self.line(step, loss, tokens_per_second, left)
    self.stream.write("\r" + line.ljust(self._width))  # blanks what a longer line left
    self._width = len(line)
    self.stream.flush()

  def line(self, step: int, loss: Optional[float], tokens_per_second: float, left: float) -> str:
    frac = step / max(self.total, 1)
    loss_s = f" loss {loss:.4f}" if loss is not None else ""
    if self.study is None:
      bar = "#" * int(30 * frac) + "-" * (30 - int(30 * frac))
      return (f"[{bar}] {step}/{self.total}{loss_s} {tokens_per_second:,.0f} tok/s "
              f"{_hms(left)} left")
    bar = "#" * int(10 * frac) + "-" * (10 - int(10 * frac))
    study_left = self.study.left(left, self._projected or 0.0)
    return (f"{self.study.label()} [{bar}] {step}/{self.total}{loss_s}, {_hms(left)} left; "
            f"study ~{_hms(study_left)}")

  def close(self) -> None:
    if self.study is not None and self._projected is not None:
      self.study.record(self._projected)
    if self.enabled:
      for handler in logging.getLogger().handlers:
        handler.removeFilter(self._end_line)
      if self._width:
        self.stream.write("\n")
      self._width = 0


def _hms(seconds: float) -> str:
  seconds = int(seconds)
  return f"{seconds // 3600:d}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"
