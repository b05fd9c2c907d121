"""Run outputs: file names, local or gs:// file access, JSON and JSON-lines files.

Every file a run or study writes is named here, and read and written through these helpers
(tf.io.gfile, so MODEL_DIR and PIPELINE_DIR may be gs:// paths). Writers that take
`all_processes=False` write from process 0 only. A write that fails (disk full, no
permission, quota, a gs:// error) raises OutputError: one line naming the file and the cause.
"""
import contextlib
import dataclasses
import json
import logging
import os
import re
import sys
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
DOWNSTREAM = "downstream.json"
DOWNSTREAM_HISTORY = "downstream_history.jsonl"
DOMAIN_WEIGHTS = "domain_weights.json"
TRAJECTORY = "domain_weights_trajectory.jsonl"
SAMPLING_WEIGHTS = "sampling_weights.jsonl"  # runs whose weights change: each step's in force
ONLINE = "online.json"  # online-mixing main runs: method, weights, reference-beaten flag
STUDY = "study.json"
REPORT = "report.md"
SUMMARY = "summary.json"
# Checkpoints taken out of CHECKPOINTS (never deleted): `<step>.unreadable` (it could not be
# restored) and `<step>.superseded` (newer than the train.restore_step a run went back to).
SET_ASIDE = "checkpoints_set_aside"

WRITE_HINT = ("Free space or restore write access there, then rerun the same command: the run "
              "resumes from its last complete checkpoint.")


class OutputError(OSError):
  """A run output that cannot be written or read back; the message is the whole story."""


def first_line(e: BaseException) -> str:
  """The type and first line of an error's root cause (orbax wraps TensorStore's errors,
  which run to many lines): `ValueError: OUT_OF_RANGE: Error reading ...`."""
  while e.__cause__ is not None:
    e = e.__cause__
  lines = [l.strip() for l in str(e).splitlines() if l.strip()]
  if not lines:
    return type(e).__name__
  # TensorFlow prefixes the op: "{{function_node __wrapped__FlushSummaryWriter_...}} path; ..."
  return f"{type(e).__name__}: {re.sub(r'^{{.*?}} *', '', lines[0])}"


def is_io_error(e: BaseException) -> bool:
  """OSError, or TensorFlow's (tf.io.gfile: local and gs:// paths)."""
  if isinstance(e, OSError):
    return True
  tf = sys.modules.get("tensorflow")
  return tf is not None and isinstance(e, tf.errors.OpError)


@contextlib.contextmanager
def _writing(path: str):
  """Turns a failed write of `path` into one OutputError naming it, the cause and what to do."""
  try:
    yield
  except OutputError:
    raise
  except Exception as e:  # pylint: disable=broad-except
    if not is_io_error(e):
      raise
    raise OutputError(f"could not write {path}: {first_line(e)}. {WRITE_HINT}") from None


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
  with _writing(path):
    gfile().makedirs(path)


def read_text(path: str) -> str:
  with gfile().GFile(path) as f:
    return f.read()


def write_text(path: str, text: str) -> None:
  """Writes text atomically (a temporary file, then rename), from process 0 only."""
  if not is_writer():
    return
  fs = gfile()
  with _writing(path):
    fs.makedirs(os.path.dirname(path) or ".")
    tmp = path + ".tmp"
    with fs.GFile(tmp, "w") as f:
      f.write(text)
    fs.rename(tmp, path, overwrite=True)


def read_json(path: str) -> Any:
  try:
    return json.loads(read_text(path))
  except json.JSONDecodeError as e:
    raise ValueError(f"{path} is not valid JSON ({e}): restore or remove it.") from None


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
    with _writing(path), gfile().GFile(path, "a") as f:
      f.write(lines)


def read_jsonl(path: str, *, drop_partial_last: bool = False) -> list[dict]:
  """The records of a JSON-lines file; [] when it does not exist.

  With drop_partial_last, an unparsable last line without its newline (a run killed while
  appending it) is dropped; any other bad line is an error naming the file and line.
  """
  if not exists(path):
    return []
  lines = read_text(path).split("\n")  # the last element is "" when the file ends in \n
  records = []
  for number, line in enumerate(lines, 1):
    if not line.strip():
      continue
    try:
      records.append(json.loads(line))
    except json.JSONDecodeError as e:
      if drop_partial_last and number == len(lines):
        logging.warning(
            "%s: dropped its unfinished last line (the run stopped while writing "
            "it): %.60s", path, line)
        break
      raise ValueError(f"{path} line {number} is not valid JSON ({e}): restore or remove "
                       f"the line.") from None
  return records


def truncate_jsonl(path: str, last_step: int) -> None:
  """Keeps the records of a step log up to last_step (a resumed run rewrites the rest), and
  drops a last line left unfinished by a crash."""
  if not is_writer() or not exists(path):
    return
  kept = [r for r in read_jsonl(path, drop_partial_last=True) if r["step"] <= last_step]
  with _writing(path), gfile().GFile(path, "w") as f:
    f.write("".join(json.dumps(r) + "\n" for r in kept))


def move_dir(src: str, dst: str) -> None:
  """Moves a directory (a rename locally; gs:// has no directory rename: copy, then remove)."""
  fs = gfile()
  with _writing(dst):
    fs.makedirs(os.path.dirname(dst))
    if "://" not in src:
      fs.rename(src, dst)
      return
    for root, _, files in fs.walk(src):
      target = os.path.join(dst, os.path.relpath(root, src))
      fs.makedirs(target)
      for name in files:
        fs.copy(os.path.join(root, name), os.path.join(target, name))
    fs.rmtree(src)


def read_run_info(model_dir: str) -> Optional[dict]:
  """What the run in MODEL_DIR is (model, vocabulary, domains, ...), or None."""
  return read_json_if_exists(os.path.join(model_dir, RUN_INFO))
