"""What a run prints that a user cannot act on, filtered here and only here (standard library
only: import it first): native start-up lines (TensorFlow, libtpu) and library log records
(Beam, orbax, seqio, gin). `--verbose` shows everything (VERBOSE_FLAG, checked in sys.argv
before any flag parsing, since TensorFlow's start-up comes first).
"""
import contextlib
import logging
import os
import re
import sys
import tempfile

VERBOSE_FLAG = "--verbose"

# Native start-up lines of TensorFlow (used here for tf.data and gfile only): its absl
# pre-init notice, the oneDNN notice and the CUDA probe on machines without a GPU;
# and libtpu's probe on a CPU host.
_NOISE = re.compile(
    r"absl::InitializeLog|oneDNN custom operations|cudart_stub|"
    r"Could not find cuda drivers|cuInit|TF-TRT Warning|Unable to register "
    r"cu(DNN|FFT|BLAS) factory|computation_placer|cpu_feature_guard|"
    r"rebuild TensorFlow with the appropriate compiler flags|"
    # libtpu probing for a TPU on a machine without one (jax[tpu] installed on a CPU host).
    r"Failed to find host bounds|could not determine TPU|Logging before InitGoogle|"
    r"TPU_WORKER_HOSTNAMES|Source Location Trace|libtpu_init_utils")

# Log records of libraries that a user cannot act on: Beam's optional GCP clients (imported by
# the store build), orbax's notes on the read-only managers that read a reference or an
# evaluation's checkpoint, seqio's evaluator on the lengths and loggers this project sets;
# the store build's note that a store is complete, repeated at every stage.
_UNACTIONABLE = re.compile(
    r"apitools not found|bigquery|BigQuery|"
    r"CheckpointManagerOptions\.read_only=True|Given directory is read only=|"
    r"Given sequence lengths are longer than necessary|"
    r"'logger_cls' is empty|"
    # the token store, found complete again by each stage of a study
    r"is complete; reusing it")
# Loggers kept at WARNING (their INFO lines are the libraries' internals).
_LIBRARIES = ("absl", "jax", "orbax", "tensorflow", "apache_beam")


def verbose() -> bool:
  return VERBOSE_FLAG in sys.argv[1:]


def unactionable(record: logging.LogRecord) -> bool:
  """A log record to hide: a known library notice, gin's file lookups (every include path
  it misses, logged as an error), or a Beam INFO line logged on the root logger."""
  path = record.pathname
  if f"{os.sep}gin{os.sep}" in path:
    return True
  if f"{os.sep}apache_beam{os.sep}" in path and record.levelno < logging.WARNING:
    return True
  return bool(_UNACTIONABLE.search(record.getMessage()))


def quiet_logging(show_all: bool = False) -> None:
  """INFO logs of this project on stderr; the libraries' at WARNING, less the unactionable
  records above. show_all (--verbose): every logger at INFO, nothing filtered."""
  # absl (imported by jax/tf) installs its own root handler at WARNING; replace it.
  logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s",
                      force=True)
  for name in _LIBRARIES:
    logging.getLogger(name).setLevel(logging.INFO if show_all else logging.WARNING)
  if not show_all:
    for handler in logging.getLogger().handlers:
      handler.addFilter(lambda r: not unactionable(r))


@contextlib.contextmanager
def filtered_native_stderr():
  """Native (C++) writes to stderr go to a temporary file; afterwards, the lines that are
  not known start-up noise are written to stderr after all (all of them with --verbose)."""
  if verbose():
    yield
    return
  sys.stderr.flush()
  saved = os.dup(2)
  with tempfile.TemporaryFile() as tmp:
    os.dup2(tmp.fileno(), 2)
    try:
      yield
    finally:
      sys.stderr.flush()
      os.dup2(saved, 2)
      os.close(saved)
      tmp.seek(0)
      for line in tmp.read().decode(errors="replace").splitlines():
        if line.strip() and not _NOISE.search(line):
          print(line, file=sys.stderr)


def quiet_start() -> None:
  """Imports TensorFlow with its start-up noise filtered, and keeps it off any GPU (JAX
  owns the accelerators; TensorFlow only reads data). Call before anything imports it."""
  if not verbose():
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  with filtered_native_stderr():
    import tensorflow as tf  # pylint: disable=g-import-not-at-top
    tf.config.set_visible_devices([], "GPU")
