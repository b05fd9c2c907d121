"""Run metrics: MODEL_DIR/metrics.jsonl, TensorBoard event files, a terminal progress bar.

Only process 0 writes. Values arrive as host numpy/python (the loop reads metrics one step
late to respect async dispatch).
"""
import json
import math
import os
import sys
import time
from typing import Mapping, Optional

import jax
import numpy as np


class MetricsWriter:
  """Appends one JSON object per logged step and mirrors scalars to TensorBoard."""

  def __init__(self, model_dir: str, *, filename: str = "metrics.jsonl",
               tensorboard: bool = True):
    self.active = jax.process_index() == 0
    self.path = os.path.join(model_dir, filename)
    self._tb = None
    if not self.active:
      return
    import tensorflow as tf  # pylint: disable=g-import-not-at-top
    self._tf = tf
    tf.io.gfile.makedirs(model_dir)
    if tensorboard:
      self._tb = tf.summary.create_file_writer(os.path.join(model_dir, "tensorboard"))

  def truncate_after(self, step: int) -> None:
    """On resume, drop lines logged after the restored step (they will be logged again)."""
    if self.active:
      truncate_jsonl(self.path, step)

  def write(self, step: int, values: Mapping) -> None:
    if not self.active:
      return
    record = {"step": int(step), **{k: _plain(v) for k, v in values.items()}}
    with self._tf.io.gfile.GFile(self.path, "a") as f:
      f.write(json.dumps(record) + "\n")
    if self._tb is not None:
      with self._tb.as_default():
        for name, value in _flatten(values):
          self._tf.summary.scalar(name, value, step=step)
      self._tb.flush()

  def close(self) -> None:
    if self._tb is not None:
      self._tb.close()


def truncate_jsonl(path: str, last_step: int) -> None:
  """Keeps the JSON lines of a step log up to last_step (a resumed run rewrites the rest)."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  if not tf.io.gfile.exists(path):
    return
  with tf.io.gfile.GFile(path) as f:
    lines = [l for l in f if l.strip() and json.loads(l)["step"] <= last_step]
  with tf.io.gfile.GFile(path, "w") as f:
    f.write("".join(lines))


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


class Progress:
  """A one-line progress bar with tokens/s and time left, only on an interactive terminal."""

  def __init__(self, total_steps: int, start_step: int, *, stream=None):
    self.stream = stream or sys.stderr
    self.enabled = jax.process_index() == 0 and self.stream.isatty()
    self.total, self.start = total_steps, start_step
    self.t0 = time.time()

  def update(self, step: int, loss: Optional[float], tokens_per_second: float) -> None:
    if not self.enabled:
      return
    done = step - self.start
    elapsed = time.time() - self.t0
    left = elapsed / max(done, 1) * (self.total - step)
    frac = step / max(self.total, 1)
    bar = "#" * int(30 * frac) + "-" * (30 - int(30 * frac))
    loss_s = f"loss {loss:.4f} " if loss is not None else ""
    self.stream.write(f"\r[{bar}] {step}/{self.total} {loss_s}{tokens_per_second:,.0f} tok/s "
                      f"{_hms(left)} left ")
    self.stream.flush()

  def close(self) -> None:
    if self.enabled:
      self.stream.write("\n")


def _hms(seconds: float) -> str:
  seconds = int(seconds)
  return f"{seconds // 3600:d}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"
