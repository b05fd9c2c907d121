"""Run outputs: file names, local or gs:// file access, JSON and JSON-lines files.

Every file a run or study writes is named here, and read and written through these helpers
(tf.io.gfile, so MODEL_DIR and PIPELINE_DIR may be gs:// paths). Writers that take
`all_processes=False` write from process 0 only.
"""
import dataclasses
import json
import os
from typing import Any, Iterable, Optional

import jax
import numpy as np

RUN_INFO = "run_info.json"
CONFIG = "config.gin"
METRICS = "metrics.jsonl"
TENSORBOARD = "tensorboard"
CHECKPOINTS = "checkpoints"
EVAL = "eval.json"
EVAL_HISTORY = "eval_history.jsonl"
DOMAIN_WEIGHTS = "domain_weights.json"
TRAJECTORY = "domain_weights_trajectory.jsonl"
STUDY = "study.json"
REPORT = "report.md"
SUMMARY = "summary.json"


def gfile():
  """tf.io.gfile: local and gs:// paths alike (TensorFlow is imported on first use)."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  return tf.io.gfile


def is_writer() -> bool:
  """Process 0 writes the run's files; the others only read them."""
  return jax.process_index() == 0


def exists(path: str) -> bool:
  return gfile().exists(path)


def makedirs(path: str) -> None:
  gfile().makedirs(path)


def read_text(path: str) -> str:
  with gfile().GFile(path) as f:
    return f.read()


def write_text(path: str, text: str) -> None:
  """Writes text atomically (a temporary file, then rename), from process 0 only."""
  if not is_writer():
    return
  fs = gfile()
  fs.makedirs(os.path.dirname(path) or ".")
  tmp = path + ".tmp"
  with fs.GFile(tmp, "w") as f:
    f.write(text)
  fs.rename(tmp, path, overwrite=True)


def read_json(path: str) -> Any:
  return json.loads(read_text(path))


def read_json_if_exists(path: str) -> Optional[Any]:
  return read_json(path) if exists(path) else None


def write_json(path: str, obj: Any) -> None:
  """Writes JSON atomically, from process 0 only."""
  write_text(path, json.dumps(obj, indent=2, default=_json_default))


def _json_default(x):
  if isinstance(x, (np.generic, np.ndarray)):
    return x.tolist()
  if dataclasses.is_dataclass(x):
    return dataclasses.asdict(x)
  raise TypeError(f"not JSON serializable: {type(x)}")


def append_jsonl(path: str, records: Iterable[dict]) -> None:
  """Appends one JSON object per line, from process 0 only."""
  lines = "".join(json.dumps(r, default=_json_default) + "\n" for r in records)
  if lines and is_writer():
    with gfile().GFile(path, "a") as f:
      f.write(lines)


def read_jsonl(path: str) -> list[dict]:
  """The records of a JSON-lines file; [] when it does not exist."""
  if not exists(path):
    return []
  with gfile().GFile(path) as f:
    return [json.loads(line) for line in f if line.strip()]


def truncate_jsonl(path: str, last_step: int) -> None:
  """Keeps the records of a step log up to last_step (a resumed run rewrites the rest)."""
  if not is_writer() or not exists(path):
    return
  kept = [r for r in read_jsonl(path) if r["step"] <= last_step]
  with gfile().GFile(path, "w") as f:
    f.write("".join(json.dumps(r) + "\n" for r in kept))


def read_run_info(model_dir: str) -> Optional[dict]:
  """What the run in MODEL_DIR is (model, vocabulary, domains, ...), or None."""
  return read_json_if_exists(os.path.join(model_dir, RUN_INFO))
