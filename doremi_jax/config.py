"""Run configuration at the edge: flags and gin, run identity checks, DoReMi outputs."""
import argparse
import dataclasses
import json
import logging
import os
import sys
from typing import Mapping, Optional

import gin
import jax
import numpy as np

from doremi_jax import checkpoint as ckpt_lib
from doremi_jax import distributed
from doremi_jax import metrics as metrics_lib
from doremi_jax.model import TransformerConfig

DEFAULT_GIN_SEARCH_PATHS = (os.path.join(os.path.dirname(os.path.dirname(__file__)), "gin"),
                            os.path.dirname(os.path.dirname(__file__)))


def sequence_length(task_feature_lengths: Mapping[str, int]) -> int:
  """The decoder length from T5X's TASK_FEATURE_LENGTHS ({'targets': L})."""
  if not isinstance(task_feature_lengths, Mapping) or "targets" not in task_feature_lengths:
    raise ValueError(f"TASK_FEATURE_LENGTHS={task_feature_lengths!r}: give {{'targets': L}}.")
  length = int(task_feature_lengths["targets"])
  if length <= 1:
    raise ValueError(f"TASK_FEATURE_LENGTHS targets={length}: must be > 1.")
  return length


def vocabulary_info(mixture_or_task_name: str) -> dict:
  from data_pipelines import core  # pylint: disable=g-import-not-at-top
  task = core.domain_tasks(mixture_or_task_name)[0][1]
  vocab = task.output_features["targets"].vocabulary
  info = {"type": type(vocab).__name__, "vocab_size": int(vocab.vocab_size)}
  model_file = getattr(vocab, "sentencepiece_model_file", None)
  if model_file:
    info["model"] = str(model_file)
  return info


def run_info(model_cfg: TransformerConfig, mixture: str, domains, seq_len: int, *,
             kind: str, batch_size: int, random_seed: int) -> dict:
  """What a run is: checked on restart and by runs that use it as a reference."""
  return {"kind": kind, "model": dataclasses.asdict(model_cfg), "mixture": mixture,
          "domains": list(domains), "vocabulary": vocabulary_info(mixture),
          "sequence_length": seq_len, "batch_size": batch_size, "random_seed": random_seed,
          "num_params": model_cfg.num_params()}


def check_vocabulary(model_cfg: TransformerConfig, vocab: dict) -> None:
  if model_cfg.vocab_size < vocab["vocab_size"]:
    raise ValueError(f"TransformerConfig.vocab_size={model_cfg.vocab_size} is smaller than the "
                     f"mixture's vocabulary ({vocab['type']}, {vocab['vocab_size']} ids); set "
                     f"TransformerConfig.vocab_size = {vocab['vocab_size']}.")


def check_reference(reference_dir: str, info: dict) -> TransformerConfig:
  """The reference run's model config, after checking it shares vocabulary and domains."""
  ref = ckpt_lib.read_run_info(reference_dir)
  if ref is None:
    raise FileNotFoundError(
        f"No reference run in {reference_dir} ({ckpt_lib.RUN_INFO} missing): train the "
        f"reference first (gin/runs/reference.gin) with MODEL_DIR={reference_dir}.")
  for key, what in (("vocabulary", "vocabulary"), ("domains", "set or order of domains")):
    if ref[key] != info[key]:
      raise ValueError(f"The reference in {reference_dir} was trained with another {what}:\n"
                       f"  reference: {ref[key]}\n  this run:  {info[key]}\n"
                       f"Train a reference on this mixture's domain set and vocabulary.")
  return TransformerConfig(**ref["model"])


def write_operative_config(model_dir: str) -> None:
  if jax.process_index() != 0:
    return
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  tf.io.gfile.makedirs(model_dir)
  with tf.io.gfile.GFile(os.path.join(model_dir, "config.gin"), "w") as f:
    f.write(gin.operative_config_str())


class Trajectory:
  """Every step's domain weights and running average (domain_weights_trajectory.jsonl).

  On resume, lines after the restored step are dropped (those steps run again).
  """

  def __init__(self, model_dir: str, start_step: int):
    self.active = jax.process_index() == 0
    self.path = os.path.join(model_dir, "domain_weights_trajectory.jsonl")
    self._buffer = []
    if not self.active:
      return
    import tensorflow as tf  # pylint: disable=g-import-not-at-top
    self._gfile = tf.io.gfile
    metrics_lib.truncate_jsonl(self.path, start_step)

  def append(self, step: int, alpha_K, avg_alpha_K) -> None:
    if self.active:
      self._buffer.append(json.dumps({"step": int(step),
                                      "domain_weights": np.asarray(alpha_K).tolist(),
                                      "avg_domain_weights": np.asarray(avg_alpha_K).tolist()})
                          + "\n")

  def flush(self) -> None:
    if self.active and self._buffer:
      with self._gfile.GFile(self.path, "a") as f:
        f.write("".join(self._buffer))
      self._buffer = []


def read_trajectory(model_dir: str) -> list[dict]:
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  with tf.io.gfile.GFile(os.path.join(model_dir, "domain_weights_trajectory.jsonl")) as f:
    return [json.loads(l) for l in f if l.strip()]


def write_domain_weights(model_dir: str, state, info: dict, doremi_cfg, *, steps: int) -> dict:
  """MODEL_DIR/domain_weights.json: the averaged weights (the DoReMi output) and metadata."""
  dstate = jax.device_get(state.doremi)
  domains = info["domains"]
  out = {
      "domains": dict(zip(domains, map(float, dstate.avg_alpha_K))),
      "final_domain_weights": dict(zip(domains, map(float, dstate.alpha_K))),
      "mixture": info["mixture"], "reference": doremi_cfg.reference_dir,
      "reference_step": info.get("reference_step"), "proxy_params": info["num_params"],
      "proxy_model": info["model"], "steps": steps, "eta": doremi_cfg.eta,
      "c": doremi_cfg.smoothing, "objective": doremi_cfg.objective,
      "sampling": doremi_cfg.sampling, "vocabulary": info["vocabulary"],
      "sequence_length": info["sequence_length"],
  }
  ckpt_lib.write_json(os.path.join(model_dir, "domain_weights.json"), out)
  return out


def parse_flags(argv, extra=None):
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument("--gin_file", action="append", default=[],
                      help="gin file (repeatable); searched in --gin_search_paths")
  parser.add_argument("--gin_search_paths", default="",
                      help="comma-separated directories to look for gin files in")
  distributed.add_flags(parser)
  if extra:
    extra(parser)
  args, rest = parser.parse_known_args(argv)
  bindings = []
  for arg in rest:
    if not arg.startswith("--gin."):
      parser.error(f"unknown flag {arg!r}; gin bindings are --gin.NAME=VALUE")
    bindings.append(arg[len("--gin."):])
  return args, bindings


def parse_gin(gin_files, bindings, search_paths: str = "") -> None:
  """Parses gin files and bindings; an unknown name fails here, before any compute."""
  for path in [p for p in search_paths.split(",") if p] + list(DEFAULT_GIN_SEARCH_PATHS):
    gin.add_config_file_search_path(path)
  if not gin_files:
    raise SystemExit("error: give at least one --gin_file (for example gin/runs/reference.gin)")
  try:
    gin.parse_config_files_and_bindings(gin_files, bindings, finalize_config=False)
  except (ValueError, KeyError, ImportError, IOError) as e:
    raise SystemExit(f"error: bad gin configuration: {e}\n(check the --gin_file paths and "
                     f"--gin.NAME=VALUE bindings; string values need inner quotes: "
                     f"--gin.MODEL_DIR=\"'/tmp/run'\")") from None


def run_main(fn, argv=None, extra=None):
  """Entry point shared by train/evaluate/pipeline: flags, distributed init, gin, fn()."""
  # absl (imported by jax/tf) installs its own root handler at WARNING; replace it.
  logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s",
                      force=True)
  for noisy in ("absl", "jax._src", "orbax", "tensorflow"):
    logging.getLogger(noisy).setLevel(logging.WARNING)
  # gin logs its file lookups on the root logger (each include path miss as an error).
  for handler in logging.getLogger().handlers:
    handler.addFilter(lambda r: f"{os.sep}gin{os.sep}" not in r.pathname)
  args, bindings = parse_flags(sys.argv[1:] if argv is None else argv, extra)
  distributed.initialize_from_flags(args)
  parse_gin(args.gin_file, bindings, args.gin_search_paths)
  try:
    return fn(args) if extra else fn()
  except (ValueError, FileNotFoundError, FloatingPointError) as e:
    logging.error("%s", e)
    raise SystemExit(f"error: {e}") from None
