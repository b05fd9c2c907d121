"""Raw-file reading and tokenizing for the store build (no Beam, no TF).

Parses JSONL(.zst/.gz), Parquet and .txt files as data_pipelines.sources does
(same malformed-record policy, dotted fields, hash split), counting every raw
line or row read, and tokenizes as the SeqIO tasks do (vocabulary, then EOS).
The Parquet reader here is the only one: data_pipelines.sources uses it too.
TF is imported only for non-local paths and for vocabularies other than bytes
and SentencePiece.
"""
import gzip
import hashlib
import io
import json
from typing import Any, Iterator, Mapping, Optional, Sequence

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
  """A seekable binary stream over tf.io.gfile (gs:// etc.) for the io wrappers and pyarrow."""

  def __init__(self, path: str):
    super().__init__()
    self._f = store.gfile().GFile(path, "rb")

  def readable(self):
    return True

  def seekable(self):
    return True

  def seek(self, offset, whence=io.SEEK_SET):
    self._f.seek(offset, whence)
    return self._f.tell()

  def tell(self):
    return self._f.tell()

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


def domain_key(value) -> Optional[str]:
  """A domain field's value as a routing key: a string as it is, an integer or boolean as its
  str(); None (missing) and other types (floats, lists, objects) route nowhere."""
  if isinstance(value, str):
    return value
  if isinstance(value, (bool, int, np.integer)):
    return str(value)
  return None


def field_paths(obj: Any, prefix: str = "") -> list[str]:
  """The dotted keys of a JSON object's leaves ('meta.source'), for error messages."""
  if not isinstance(obj, dict) or not obj:
    return [prefix[:-1]] if prefix else []
  return [p for k, v in obj.items() for p in field_paths(v, f"{prefix}{k}.")]


def _route(value, group: Mapping[str, Any], stats: dict) -> Optional[Sequence[str]]:
  """The domains a record with this domain-field value goes to (None: unrouted)."""
  key = domain_key(value)
  if len(stats["seen"]) < _MAX_SEEN:
    stats["seen"].add(key if key is not None else repr(value))
  domains = group["route"].get(key) if key is not None else None
  if domains is None:
    stats["unrouted"] += 1
  return domains


def _jsonl_docs(path: str, group: Mapping[str, Any],
                stats: dict) -> Iterator[tuple[str, Sequence[str]]]:
  """(text, domains) per valid line; the malformed policy of the sources."""
  field = group["domain_field"]
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
          raise ValueError(f"no string field {group['text_field']!r}; keys found: "
                           f"{field_paths(obj)}")
      except ValueError as e:
        if group["on_malformed"] == "skip":
          stats["malformed"] += 1
          continue
        raise StoreBuildError(
            f"{path}:{lineno}: malformed JSONL line ({e}). Fix or remove the "
            "line, or register the domain set with on_malformed='skip'.") from None
      domains = group["domains"] if field is None else _route(get_field(obj, field), group, stats)
      if domains is not None:
        yield text, domains


# ----------------------------------------------------------------- Parquet

PARQUET_SUFFIXES = (".parquet", ".pq")
PARQUET_BATCH_ROWS = 1024


def open_parquet(path: str):
  """A pyarrow ParquetFile of a local or remote (tf.io.gfile) path; reads the footer only."""
  import pyarrow as pa  # pylint: disable=g-import-not-at-top
  import pyarrow.parquet as pq  # pylint: disable=g-import-not-at-top
  try:
    if store.is_remote(path):
      return pq.ParquetFile(pa.PythonFile(_GFileRaw(path), mode="r"))
    return pq.ParquetFile(path)
  except Exception as e:  # pylint: disable=broad-except  (pyarrow, OSError, gfile errors)
    raise StoreBuildError(f"Cannot read Parquet file {path}: {e}") from None


def parquet_columns(schema) -> list[str]:
  """The dotted paths of a Parquet schema's leaf columns ('meta.source')."""
  import pyarrow as pa  # pylint: disable=g-import-not-at-top

  def walk(field, prefix):
    name = prefix + field.name
    if pa.types.is_struct(field.type):
      return [
          p for i in range(field.type.num_fields) for p in walk(field.type.field(i), name + ".")
      ]
    return [name]

  return [p for f in schema for p in walk(f, "")]


def _parquet_column(path: str, schema, dotted: str, what: str) -> tuple[str, Optional[str]]:
  """(top-level column, dotted key inside it or None) of a text or domain field."""
  if dotted in schema.names:
    return dotted, None
  cols = parquet_columns(schema)
  top, _, rest = dotted.partition(".")
  if top in schema.names and (dotted in cols or any(c.startswith(dotted + ".") for c in cols)):
    return top, rest
  raise StoreBuildError(f"{path}: no {what} column {dotted!r}; columns found: {cols}. Set the "
                        f"{what} field to one of them (dotted for nested columns).")


def check_parquet(path: str, text_field: str, domain_field: Optional[str] = None) -> None:
  """The file's footer is readable and has the text (and domain) columns."""
  pf = open_parquet(path)
  try:
    _parquet_column(path, pf.schema_arrow, text_field, "text")
    if domain_field:
      _parquet_column(path, pf.schema_arrow, domain_field, "domain")
  finally:
    pf.close()


def iter_parquet(path: str, text_field: str,
                 domain_field: Optional[str] = None) -> Iterator[tuple[int, Any, Any]]:
  """(row, text, domain value) of a Parquet file, streamed in batches of row groups: memory is
  one batch of the two columns read, never the whole file."""
  pf = open_parquet(path)
  schema = pf.schema_arrow
  fields = [(text_field, _parquet_column(path, schema, text_field, "text"))]
  if domain_field:
    fields.append((domain_field, _parquet_column(path, schema, domain_field, "domain")))
  select = sorted({f if sub is None else f"{top}.{sub}" for f, (top, sub) in fields})
  row = 0
  try:
    for batch in pf.iter_batches(batch_size=PARQUET_BATCH_ROWS, columns=select):
      cols = []
      for _, (top, sub) in fields:
        values = batch.column(top).to_pylist()
        cols.append(values if sub is None else [get_field(v, sub) for v in values])
      if len(cols) == 1:
        cols.append([None] * len(cols[0]))
      for text, value in zip(*cols):
        yield row, text, value
        row += 1
  except StoreBuildError:
    raise
  except Exception as e:  # pylint: disable=broad-except  (a corrupt page or row group)
    raise StoreBuildError(f"Cannot read Parquet file {path} (after row {row}): {e}") from None
  finally:
    pf.close()


def _parquet_docs(path: str, group: Mapping[str, Any], stats: dict):
  """(text, domains) per row with a string text; the malformed policy of the sources."""
  field = group["domain_field"]
  for row, text, value in iter_parquet(path, group["text_field"], field):
    stats["lines"] += 1
    if not isinstance(text, str):
      if group["on_malformed"] == "skip":
        stats["malformed"] += 1
        continue
      raise StoreBuildError(f"{path}: row {row}: text column {group['text_field']!r} holds "
                            f"{type(text).__name__}, not a string. Fix the row, or register "
                            "the domain set with on_malformed='skip'.")
    domains = group["domains"] if field is None else _route(value, group, stats)
    if domains is not None:
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
  if path.endswith(".txt"):
    docs = _txt_docs(path, group, stats)
  elif path.endswith(PARQUET_SUFFIXES):
    docs = _parquet_docs(path, group, stats)
  else:
    docs = _jsonl_docs(path, group, stats)
  vf = group["val_fraction"]
  for text, domains in docs:
    if vf is None or in_validation(text, vf) == group["want_validation"]:
      yield text, domains
