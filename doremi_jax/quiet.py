"""Start-up noise of native libraries, filtered (standard library only: import it first)."""
import contextlib
import os
import re
import sys
import tempfile

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


@contextlib.contextmanager
def filtered_native_stderr():
  """Native (C++) writes to stderr go to a temporary file; afterwards, the lines that are
  not known start-up noise are written to stderr after all."""
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
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  with filtered_native_stderr():
    import tensorflow as tf  # pylint: disable=g-import-not-at-top
    tf.config.set_visible_devices([], "GPU")
