"""Raw-file reading and tokenizing for the store build (no Beam, no TF).

Parses JSONL(.zst/.gz) and .txt files as data_pipelines.sources does (same
malformed-line policy, dotted fields, hash split), counting every raw line
read, and tokenizes as the SeqIO tasks do (vocabulary, then EOS). TF is
imported only for non-local paths and for vocabularies other than bytes and
SentencePiece.
"""
import gzip
import hashlib
import io
import json
from typing import Any, Iterator, Mapping, Sequence

import numpy as np

from doremi_jax import store

StoreBuildError = store.StoreBuildError
_MAX_SEEN = 64

# -------------------------------------------------------------- tokenizing


class Tokenizer:
  """texts -> token arrays with EOS, as the SeqIO tasks' tokenize+append_eos.

  spec {"kind": "byte", "eos_id"}: seqio.ByteVocabulary's encode_tf (UTF-8
  bytes + 3) in numpy, without TF. spec {"kind": "seqio", "vocabulary",
  "eos_id"}: the vocabulary's own encode_tf, the op the tasks run (imports
  TF). SentencePiece takes this path: sentencepiece's Python encoder and
  tf_text's can disagree on ties (seen on a 200-piece unigram model).
  """

  def __init__(self, spec: Mapping[str, Any]):
    self._spec = dict(spec)
    self._eos = np.array([int(spec["eos_id"])], np.int32)

  def __call__(self, texts: Sequence[str]) -> list[np.ndarray]:
    if self._spec["kind"] == "byte":
      ids = [np.frombuffer(t.encode("utf-8"), np.uint8).astype(np.int32) + 3 for t in texts]
    else:
      ids = self._encode_tf(list(texts))
    return [np.concatenate([x, self._eos]) for x in ids]

  def _encode_tf(self, texts: list[str]) -> list[np.ndarray]:
    import tensorflow as tf  # pylint: disable=g-import-not-at-top
    voc = self._spec["vocabulary"]
    try:
      out = voc.encode_tf(tf.constant(texts))
    except (ValueError, TypeError, tf.errors.OpError):
      out = None
    if isinstance(out, tf.RaggedTensor) and out.shape.rank == 2:
      values = out.flat_values.numpy().astype(np.int32)
      return np.split(values, out.row_splits.numpy()[1:-1])
    return [np.asarray(voc.encode_tf(tf.constant(t)), np.int32).reshape(-1) for t in texts]


# ------------------------------------------------------------ raw records


class _GFileRaw(io.RawIOBase):
  """A binary stream over tf.io.gfile (gs:// etc.) for the io wrappers."""

  def __init__(self, path: str):
    super().__init__()
    self._f = store.gfile().GFile(path, "rb")

  def readable(self):
    return True

  def readinto(self, b):
    got = self._f.read(len(b))
    b[:len(got)] = got
    return len(got)

  def close(self):
    self._f.close()
    super().close()


def open_text(path: str) -> io.TextIOBase:
  """UTF-8 text (errors replaced) of a local or remote .zst/.gz/plain file."""
  try:
    raw = _GFileRaw(path) if store.is_remote(path) else open(path, "rb")
  except Exception as e:  # pylint: disable=broad-except
    raise StoreBuildError(f"Cannot read raw file {path}: {e}") from None
  if path.endswith(".zst"):
    import zstandard  # pylint: disable=g-import-not-at-top
    raw = zstandard.ZstdDecompressor().stream_reader(raw, closefd=True)
  elif path.endswith(".gz"):
    raw = gzip.GzipFile(fileobj=raw)
  return io.TextIOWrapper(raw, encoding="utf-8", errors="replace")


def get_field(obj: Any, dotted: str):
  """obj['a']['b'] for dotted='a.b'; None when missing."""
  for part in dotted.split("."):
    if not isinstance(obj, dict) or part not in obj:
      return None
    obj = obj[part]
  return obj


def in_validation(text: str, val_fraction: float) -> bool:
  """data_pipelines.sources.in_validation: sha256 of the text vs fraction."""
  h = hashlib.sha256(text.encode("utf-8", "replace")).digest()
  return int.from_bytes(h[:8], "big") / 2.0**64 < val_fraction


def _jsonl_docs(path: str, group: Mapping[str, Any],
                stats: dict) -> Iterator[tuple[str, Sequence[str]]]:
  """(text, domains) per valid line; the malformed policy of the sources."""
  field, route = group["domain_field"], group["route"]
  with open_text(path) as f:
    for lineno, line in enumerate(f, 1):
      stats["lines"] += 1
      if not line.strip():
        continue
      try:
        obj = json.loads(line)
        if not isinstance(obj, dict):
          raise ValueError("not a JSON object")
        text = get_field(obj, group["text_field"])
        if not isinstance(text, str):
          raise ValueError(f"no string field {group['text_field']!r}")
      except ValueError as e:
        if group["on_malformed"] == "skip":
          stats["malformed"] += 1
          continue
        raise StoreBuildError(
            f"{path}:{lineno}: malformed JSONL line ({e}). Fix or remove the "
            "line, or register the domain set with on_malformed='skip'.") from None
      if field is None:
        yield text, group["domains"]
        continue
      value = get_field(obj, field)
      domains = route.get(value) if isinstance(value, str) else None
      if len(stats["seen"]) < _MAX_SEEN:
        stats["seen"].add(repr(value) if not isinstance(value, str) else value)
      if domains is None:
        stats["unrouted"] += 1
        continue
      yield text, domains


def _txt_docs(path: str, group: Mapping[str, Any], stats: dict):
  """A .txt file: one document, or blank-line paragraphs."""
  with open_text(path) as f:
    text = f.read()
  stats["lines"] += text.count("\n") + int(bool(text) and not text.endswith("\n"))
  if group["kind"] != "paragraphs":
    if text.strip():
      yield text, group["domains"]
    return
  for para in text.split("\n\n"):
    if para.strip():
      yield para.strip("\n"), group["domains"]


def iter_docs(path: str, group: Mapping[str, Any], stats: dict):
  """(text, domains) of one raw file, after the split filter."""
  docs = (_txt_docs if path.endswith(".txt") else _jsonl_docs)(path, group, stats)
  vf = group["val_fraction"]
  for text, domains in docs:
    if vf is None or in_validation(text, vf) == group["want_validation"]:
      yield text, domains
