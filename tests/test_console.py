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
NOISE = ("apitools", "BigQuery", "read_only=True", "read only=", "logger_cls",
         "longer than necessary")


def test_quiet_hides_unactionable_notices_and_verbose_shows_them():
  # Catches a notice the filter misses (each was printed on every run) and a filter that
  # hides the project's own lines or a library warning outside the known notices.
  quiet = helpers.run([sys.executable, "-c", _NOISY], timeout=120).stderr
  assert "the project's line" in quiet and "a library warning that matters" in quiet
  for text in NOISE:
    assert text not in quiet, (text, quiet)
  loud = helpers.run([sys.executable, "-c", _NOISY, "--verbose"], timeout=120).stderr
  for text in NOISE:
    assert text in loud, (text, loud)


def test_help_lists_gin_flags_a_files_macros_and_its_steps(capsys):
  # Catches a --help that leaves out --gin.NAME=VALUE, the macros a file expects, or how to
  # shorten a study (its steps), and examples that do not use the console scripts.
  import gin  # pylint: disable=g-import-not-at-top
  import pytest  # pylint: disable=g-import-not-at-top
  from doremi_jax import config as config_lib  # pylint: disable=g-import-not-at-top
  from doremi_jax import pipeline  # pylint: disable=g-import-not-at-top
  with pytest.raises(SystemExit) as e:
    config_lib.parse_flags(["--gin_file=pipelines/custom_cpu.gin", "--help"],
                           description=pipeline.__doc__)
  assert e.value.code == 0
  text = capsys.readouterr().out
  for expected in ("--gin.NAME=VALUE", "inner", "doremi-pipeline --gin_file", "--verbose",
                   "--gin.DATA_FILES", "--gin.pipeline.main_steps=300",
                   "--gin.reference/train.train_steps=300", "--gin.proxy/train.train_steps=300"):
    assert expected in text, (expected, text)
  assert any("--gin.DOMAIN_FIELD " in l and l.endswith("= 'domain'") for l in text.splitlines())
  assert "REFERENCE_DIR" not in text  # a macro the file does not use
  assert not gin.config._CONFIG  # pylint: disable=protected-access  # the help left no config
