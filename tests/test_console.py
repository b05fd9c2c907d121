"""What a user reads around a run: the quiet log filter (quiet.py) against the libraries' real
notices, --verbose, and --help."""
import sys

from tests import helpers

# Triggers the real notices: Beam's optional BigQuery clients, orbax's read-only manager (as
# for a reference checkpoint), seqio's evaluator notes (absl logging, as seqio logs them).
_NOISY = """
import logging, sys, tempfile
from doremi_jax import quiet
quiet.quiet_logging(show_all=quiet.verbose())
import apache_beam.io.gcp.internal.clients.bigquery
import orbax.checkpoint as ocp
ocp.CheckpointManager(tempfile.mkdtemp(), options=ocp.CheckpointManagerOptions(read_only=True))
from absl import logging as absl_logging
absl_logging.warning("'logger_cls' is empty so seqio.Evaluator will not log its results.")
absl_logging.warning("Given sequence lengths are longer than necessary for some evaluation")
logging.info("the project's line")
logging.getLogger("orbax").warning("a library warning that matters")
"""
_NOISE = ("apitools", "BigQuery", "read_only=True", "read only=", "logger_cls",
          "longer than necessary")


def test_quiet_hides_unactionable_notices_and_verbose_shows_them():
  # Catches a notice the filter misses (each was printed on every run) and a filter that
  # hides the project's own lines or a library warning outside the known notices.
  quiet = helpers.run([sys.executable, "-c", _NOISY], timeout=120).stderr
  assert "the project's line" in quiet and "a library warning that matters" in quiet
  for text in _NOISE:
    assert text not in quiet, (text, quiet)
  loud = helpers.run([sys.executable, "-c", _NOISY, "--verbose"], timeout=120).stderr
  for text in _NOISE:
    assert text in loud, (text, loud)
