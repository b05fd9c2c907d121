"""Shared helpers for corpora whose split comes from the directory layout."""
import logging
import os
from typing import Any, Callable, Mapping, Sequence

from data_pipelines import sources

_SUFFIXES = (".jsonl.zst", ".jsonl", ".json.zst", ".jsonl.gz")


def _walk_files(d: str) -> list[str]:
  """Every file under d with a JSONL suffix (local or gs://, via tf.io.gfile)."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  return [
      os.path.join(root, name)
      for root, _, names in tf.io.gfile.walk(d)
      for name in names
      if name.endswith(_SUFFIXES)
  ]


def split_files(data_dir: str, aliases: Mapping[str, Sequence[str]]) -> dict[str, list[str]]:
  """{split: files} from `<dir>/<alias>/**` or `<dir>/<alias>.jsonl[.zst]`, local or gs://.

  Raises:
    FileNotFoundError: no data directory, or no training files in it.
  """
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  if not tf.io.gfile.isdir(data_dir):
    raise FileNotFoundError(f"Data directory not found: {data_dir}.")
  out = {}
  for split, names in aliases.items():
    files = []
    for name in names:
      d = os.path.join(data_dir, name)
      # Listings rather than isdir/exists: object stores answer those for any prefix.
      if tf.io.gfile.glob(os.path.join(d, "*")):
        files += _walk_files(d)
      files += [p for s in _SUFFIXES for p in tf.io.gfile.glob(d + s) if p == d + s]
    if files:
      out[split] = sorted(files)
  if "train" not in out:
    raise FileNotFoundError(f"No training files in {data_dir}: expected {aliases['train'][0]}/"
                            "*.jsonl.zst (or .jsonl).")
  return out


def domain_sources(data_dir: str, aliases, domain_field: str, domain_values: Sequence[str],
                   on_malformed: str = "error"):
  """{domain value: source} filtering every file of the layout by field."""
  files = split_files(data_dir, aliases)
  return {
      v:
          sources.split_files_source(files, domain_field=domain_field, domain_value=v,
                                     on_malformed=on_malformed) for v in domain_values
  }


def register_from_env(env_prefix: str, register: Callable[..., Any]):
  """Calls register(data_dir, vocabulary=...) when $DOREMI_JAX_<PREFIX>_DIR is set.

  $DOREMI_JAX_<PREFIX>_SPM names a SentencePiece model (local or gs://) for real runs;
  bytes when unset. Returns the DomainSet, or None when the corpus is not configured.
  """
  from data_pipelines import vocab  # pylint: disable=g-import-not-at-top
  data_dir = os.environ.get(f"DOREMI_JAX_{env_prefix}_DIR")
  if not data_dir:
    logging.info("%s: set DOREMI_JAX_%s_DIR or call register(data_dir) to register its "
                 "tasks.", register.__module__, env_prefix)
    return None
  spm = os.environ.get(f"DOREMI_JAX_{env_prefix}_SPM")
  return register(data_dir, vocabulary=vocab.get_vocabulary(spm) if spm else None)
