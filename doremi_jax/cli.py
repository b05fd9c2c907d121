"""Console entry points (doremi-train, doremi-evaluate, ...), also behind `python -m`.

Each starts quietly (TensorFlow's native start-up lines filtered, see quiet.py) before
TensorFlow or JAX is imported, then runs the tool's main and returns its exit status.
"""
import importlib
import sys

from doremi_jax import quiet


def _entry(module: str, doc: str):
  """An entry point that runs `module.main(argv)`; a non-int result means success."""

  def main(argv=None) -> int:
    quiet.quiet_start()
    result = importlib.import_module(module).main(sys.argv[1:] if argv is None else argv)
    return result if isinstance(result, int) else 0

  main.__doc__ = doc
  return main


train = _entry("doremi_jax.train", "doremi-train: one stage (reference, proxy or main).")
evaluate = _entry("doremi_jax.evaluate", "doremi-evaluate: per-domain log-perplexity.")
pipeline = _entry("doremi_jax.pipeline", "doremi-pipeline: the whole study from one gin file.")
compile_check = _entry("doremi_jax.compile_check",
                       "doremi-compile-check: a step compiled for a TPU topology here.")
train_spm = _entry("data_pipelines.train_spm",
                   "doremi-train-spm: a SentencePiece model from a domain set's text.")
build_store = _entry("data_pipelines.build_store",
                     "doremi-build-store: a domain set's token store (Apache Beam).")
