"""Shared test helpers: the repository root, the tiny model, child processes, synthetic batches.

Imported as `from tests import helpers` (pytest.ini puts the repository root on sys.path).
"""
import json
import os
import shlex
import subprocess

import numpy as np
import pytest

from doremi_jax.model import TransformerConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# ------------------------------------------------------------------------------ the tiny model

VOCAB = 259  # the byte vocabulary: 256 bytes and 3 special ids
# The model of the in-process model, loss and step tests (smaller than gin/models/tiny.gin).
TINY_CFG = TransformerConfig(vocab_size=VOCAB, emb_dim=32, num_heads=2, head_dim=16, num_layers=2,
                             mlp_dim=64, max_len=64)

# ------------------------------------------------------------------------- child processes

# Flags of a tiny doremi_jax.train run on the demo mixture (gin/models/tiny.gin).
# A two-stage weight schedule for runs/schedule.gin on the demo's domains: the change at step 7.
SCHEDULE_FLAGS = [
    "--gin.SCHEDULE_STAGES=[(0, {'code': 1.0, 'prose': 1.0}), (7, {'noise': 1.0, 'legal': 3.0})]"
]
TINY_DEMO_FLAGS = [
    "--gin_file=gin/models/tiny.gin", "--gin_file=gin/mixtures/demo.gin",
    "--gin.TASK_FEATURE_LENGTHS={'targets': 32}", "--gin.BATCH_SIZE=16"
]
_TAIL = 4000  # characters of a child's output shown when it fails


def child_env(devices: int = 8) -> dict:
  """This process's environment for a child JAX process: no DOREMI_* variables, `devices` CPUs."""
  env = {k: v for k, v in os.environ.items() if not k.startswith("DOREMI_")}
  env.update(JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="3",
             XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
  return env


def train_args(model_dir, steps: int, *, reference=None, extra=(), run_file=None) -> list:
  """Python arguments of a tiny demo training run: a reference run, or a DoReMi proxy run
  against the reference run in `reference`; run_file (e.g. "runs/online_doremi.gin") takes
  the place of either, with `reference` as its REFERENCE_DIR if given."""
  run_file = run_file or ("runs/doremi.gin" if reference else "runs/reference.gin")
  run = [f"--gin_file=gin/{run_file}"]
  if reference:
    run.append(f"--gin.REFERENCE_DIR='{reference}'")
  return [
      "-m", "doremi_jax.train", *run, *TINY_DEMO_FLAGS, f"--gin.MODEL_DIR='{model_dir}'",
      f"--gin.TRAIN_STEPS={steps}", *extra
  ]


def train_cli_error(argv) -> str:
  """The error message with which `doremi_jax.train`'s entry point exits (run in this process
  on these flags, with a clean gin config before and after); fails the test if it succeeds."""
  import gin  # pylint: disable=g-import-not-at-top
  from doremi_jax import config as config_lib  # pylint: disable=g-import-not-at-top
  from doremi_jax import train as train_lib  # pylint: disable=g-import-not-at-top
  gin.clear_config()
  try:
    with pytest.raises(SystemExit) as e:
      config_lib.run_main(train_lib.train, list(argv))
  finally:
    gin.clear_config()
  assert e.value.code not in (0, None)
  return str(e.value.code)


def _text(output) -> str:
  """A child's captured output as text (TimeoutExpired may hold bytes or None)."""
  if isinstance(output, bytes):
    return output.decode(errors="replace")
  return output or ""


def run(cmd, *, env=None, timeout: float = 300, check: bool = True) -> subprocess.CompletedProcess:
  """Runs `cmd` in ROOT (environment `child_env()` unless `env` is given) and returns it
  finished, with its output as text. A timeout fails the test; so does a non-zero exit status
  if `check`. Either failure shows the end of the command's stderr."""
  cmd = [str(c) for c in cmd]
  try:
    proc = subprocess.run(cmd, cwd=ROOT, env=child_env() if env is None else env,
                          capture_output=True, text=True, timeout=timeout)
  except subprocess.TimeoutExpired as e:
    pytest.fail(f"{shlex.join(cmd)}\nstill running after {timeout}s; stderr:\n"
                f"{_text(e.stderr)[-_TAIL:]}")
  if check:
    assert proc.returncode == 0, (f"{shlex.join(cmd)}\nexited with status {proc.returncode}; "
                                  f"stderr:\n{proc.stderr[-_TAIL:]}")
  return proc


def start(cmd, log_path, *, env=None) -> subprocess.Popen:
  """Starts `cmd` in ROOT in the background, stdout and stderr written to the file `log_path`."""
  with open(log_path, "w") as log:  # the child keeps its own handle
    return subprocess.Popen([str(c) for c in cmd], cwd=ROOT,
                            env=child_env() if env is None else env, stdout=log,
                            stderr=subprocess.STDOUT)


def read_jsonl(path) -> list:
  """The complete lines of a JSON-lines file that a run may still be writing ([] if absent)."""
  if not os.path.exists(path):
    return []
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip() and line.endswith("\n")]


def read_metrics(model_dir) -> list:
  """The metrics a run has logged so far, one dict a step."""
  return read_jsonl(os.path.join(model_dir, "metrics.jsonl"))


# ------------------------------------------------------------------------ synthetic batches

_INT_KEYS = ("inputs", "targets", "segment_ids", "positions", "domain_ids")


def empty_batch(batch_size: int, seq_len: int) -> dict:
  """A batch of padding only: int32 ids and a float32 loss_mask, all zero."""
  out = {k: np.zeros((batch_size, seq_len), np.int32) for k in _INT_KEYS}
  out["loss_mask"] = np.zeros((batch_size, seq_len), np.float32)
  return out


def put_example(batch: dict, row: int, start: int, tokens, *, segment: int, domain: int = 1):
  """Writes one example into `batch[row]` from `start`: its tokens as targets, the inputs
  shifted right by one within the example, its segment and domain ids, positions and mask."""
  end = start + len(tokens)
  batch["targets"][row, start:end] = tokens
  batch["inputs"][row, start + 1:end] = tokens[:-1]
  batch["segment_ids"][row, start:end] = segment
  batch["positions"][row, start:end] = np.arange(len(tokens))
  batch["domain_ids"][row, start:end] = domain
  batch["loss_mask"][row, start:end] = 1.0


def packed_batch(rng: np.random.Generator, batch_size: int, seq_len: int, *, vocab: int = VOCAB,
                 num_domains: int = 3, max_segments: int = 3, pad_fraction: float = 0.2) -> dict:
  """Rows of up to `max_segments` packed examples, each of one random domain, then padding."""
  out = empty_batch(batch_size, seq_len)
  for b in range(batch_size):
    used = int(seq_len * (1 - pad_fraction * rng.random()))
    cuts = np.sort(rng.choice(np.arange(1, used), size=max_segments - 1, replace=False))
    bounds = [0, *cuts.tolist(), used]
    for s, (lo, hi) in enumerate(zip(bounds[:-1], bounds[1:])):
      tokens = rng.integers(3, vocab, size=hi - lo)
      put_example(out, b, lo, tokens, segment=s + 1, domain=int(rng.integers(1, num_domains + 1)))
  return out


def balanced_batch(rng: np.random.Generator, batch_size: int, seq_len: int, *, vocab: int = VOCAB,
                   num_domains: int = 3) -> dict:
  """Rows of `num_domains` equal-length examples, one per domain (lengths vary by row): every
  domain has exactly the same number of loss tokens."""
  out = empty_batch(batch_size, seq_len)
  for r in range(batch_size):
    n_tok = int(rng.integers(4, seq_len // num_domains + 1))
    for s, d in enumerate(rng.permutation(num_domains) + 1):
      put_example(out, r, s * n_tok, rng.integers(3, vocab, n_tok), segment=s + 1, domain=int(d))
  return out


def packed_row(segment_lengths, seq_len: int, *, seed: int = 0, vocab: int = VOCAB) -> dict:
  """A batch of one row: examples of the given lengths packed from position 0 (domain 1), then
  padding."""
  rng = np.random.default_rng(seed)
  out = empty_batch(1, seq_len)
  start = 0
  for s, n in enumerate(segment_lengths):
    put_example(out, 0, start, rng.integers(3, vocab, n), segment=s + 1)
    start += n
  return out


def whole_rows(tokens, domain: int) -> dict:
  """One example a row filling it, from a [N, L] token array, as data.PackedDomains holds a
  domain's sequences (no loss_mask: the batch iterator derives it)."""
  targets = np.asarray(tokens).astype(np.int32)
  inputs = np.concatenate([np.zeros((len(targets), 1), np.int32), targets[:, :-1]], 1)
  positions = np.broadcast_to(np.arange(targets.shape[1], dtype=np.int32), targets.shape)
  return {
      "inputs": inputs,
      "targets": targets,
      "segment_ids": np.ones_like(targets),
      "positions": positions.copy(),
      "domain_ids": np.full_like(targets, domain)
  }
