"""SeqIO data sources for text domains: JSONL(.zst|.gz), Parquet, text files, TFDS.

Every source yields {"text": tf.string} examples. Splits:
  * sources built from a split layout (The Pile, SlimPajama) use its files;
  * the others split by document: a document is in "validation" when the
    sha256 of its text falls in the first `val_fraction` of the hash range
    (stable across runs, machines and file order), else in "train".

Malformed JSONL policy: by default a line that is not a JSON object, or lacks
the text field, raises ValueError naming the file and line number. With
on_malformed="skip" such lines are skipped and the count is logged per file.
A Parquet row whose text is not a string (null) follows the same policy; a
Parquet file without the text or domain column fails naming the columns found.
Parquet files are streamed in batches of row groups (doremi_jax.store_raw).
"""
import hashlib
import io
import json
import logging
import os
from typing import Callable, Iterable, Iterator, Mapping, Optional, Sequence, Union

import seqio
import tensorflow as tf

from doremi_jax import store_raw

JSONL_SUFFIXES = (".jsonl", ".jsonl.zst", ".json.zst", ".jsonl.gz", ".json")
PARQUET_SUFFIXES = store_raw.PARQUET_SUFFIXES
DATA_SUFFIXES = JSONL_SUFFIXES + PARQUET_SUFFIXES + (".txt",)
TEXT_SUFFIXES = (".txt",)
DEFAULT_SPLITS = ("train", "validation")
# A domain's value(s) of the domain field: one value, or several mapped onto one domain.
DomainValue = Union[None, str, Sequence[str]]


def in_validation(text: str, val_fraction: float) -> bool:
  """Hash-based document split: True if the document is a validation one."""
  h = hashlib.sha256(text.encode("utf-8", "replace")).digest()
  return int.from_bytes(h[:8], "big") / 2.0**64 < val_fraction


class _GFileRaw(io.RawIOBase):
  """Binary stream over tf.io.gfile (gs:// etc.) usable by io wrappers."""

  def __init__(self, path: str):
    super().__init__()
    self._f = tf.io.gfile.GFile(path, "rb")

  def readable(self):
    return True

  def readinto(self, b):
    data = self._f.read(len(b))
    b[:len(data)] = data
    return len(data)

  def close(self):
    self._f.close()
    super().close()


def open_text(path: str) -> io.TextIOBase:
  if not tf.io.gfile.exists(path):
    raise FileNotFoundError(f"Data file not found: {path}")
  raw = open(path, "rb") if "://" not in path else _GFileRaw(path)
  if path.endswith(".zst"):
    import zstandard  # pylint: disable=g-import-not-at-top
    raw = zstandard.ZstdDecompressor().stream_reader(raw)
  elif path.endswith(".gz"):
    import gzip  # pylint: disable=g-import-not-at-top
    raw = gzip.GzipFile(fileobj=raw)
  return io.TextIOWrapper(raw, encoding="utf-8", errors="replace")


def get_field(obj: Mapping, dotted: str):
  """obj['a']['b'] for dotted='a.b'; None when missing."""
  for part in dotted.split("."):
    if not isinstance(obj, Mapping) or part not in obj:
      return None
    obj = obj[part]
  return obj


def iter_jsonl(path: str, *, text_field: str = "text",
               on_malformed: str = "error") -> Iterator[dict]:
  """Yields JSON objects of a .jsonl(.zst|.gz) file, validated (see module)."""
  if on_malformed not in ("error", "skip"):
    raise ValueError(f"on_malformed must be 'error' or 'skip', got "
                     f"{on_malformed!r}")
  skipped = 0
  with open_text(path) as f:
    for lineno, line in enumerate(f, 1):
      if not line.strip():
        continue
      try:
        obj = json.loads(line)
        if not isinstance(obj, dict):
          raise ValueError("not a JSON object")
        if not isinstance(get_field(obj, text_field), str):
          raise ValueError(f"no string field {text_field!r}; keys found: "
                           f"{store_raw.field_paths(obj)}")
      except ValueError as e:
        if on_malformed == "skip":
          skipped += 1
          continue
        raise ValueError(f"{path}:{lineno}: malformed JSONL line ({e}). Fix or remove the "
                         "line, or pass on_malformed='skip' to skip such lines.") from None
      yield obj
  if skipped:
    logging.warning("%s: skipped %d malformed JSONL lines.", path, skipped)


def iter_text_file(path: str, *, whole_file: bool) -> Iterator[str]:
  """Documents of a .txt file: the whole file, or blank-line paragraphs."""
  with open_text(path) as f:
    text = f.read()
  if whole_file:
    if text.strip():
      yield text
    return
  for para in text.split("\n\n"):
    if para.strip():
      yield para.strip("\n")


def fingerprint(paths: Sequence[str], *extra) -> str:
  h = hashlib.sha256(repr(extra).encode())
  for p in sorted(paths):
    st = tf.io.gfile.stat(p)
    h.update(f"{p}|{st.length}|{st.mtime_nsec}".encode())
  return h.hexdigest()[:16]


def generator_source(texts_fn: Callable[[str], Iterable[str]],
                     splits: Sequence[str] = DEFAULT_SPLITS, fingerprint: Optional[str] = None,
                     raw_spec: Optional[Callable[[str], dict]] = None) -> seqio.FunctionDataSource:
  """A FunctionDataSource from a python function split -> documents.

  Files are read in a fixed order (shuffle_files is ignored; doremi_jax.data
  shuffles packed sequences itself). `fingerprint` keys on-disk caches.
  """

  def dataset_fn(split, shuffle_files=False, seed=None):
    del shuffle_files, seed
    return tf.data.Dataset.from_generator(lambda: ({
        "text": t
    } for t in texts_fn(split)), output_signature={"text": tf.TensorSpec([], tf.string)})

  src = seqio.FunctionDataSource(dataset_fn, splits=list(splits))
  src.fingerprint = fingerprint  # pytype: disable=attribute-error
  src.iter_texts = texts_fn  # pytype: disable=attribute-error
  # How the token store's one-pass build reads this source's raw files (None: through
  # the task). data_pipelines/build_store.py routes records by domain_field/domain_value.
  src.raw_spec = raw_spec  # pytype: disable=attribute-error
  return src


def _raw_spec(files: Sequence[str], *, kind: str = "jsonl", text_field: str = "text",
              domain_field: Optional[str] = None, domain_value: Optional[str] = None,
              on_malformed: str = "error", val_fraction: Optional[float] = None) -> dict:
  return {
      "kind": kind,
      "files": list(files),
      "text_field": text_field,
      "domain_field": domain_field,
      "domain_value": domain_value,
      "on_malformed": on_malformed,
      "val_fraction": val_fraction
  }


def _check_split(split: str, splits: Sequence[str]):
  if split not in splits:
    raise ValueError(f"Unknown split {split!r}; available: {list(splits)}.")


def files_source(paths: Sequence[str], *, text_field: str = "text",
                 domain_field: Optional[str] = None, domain_value: DomainValue = None,
                 val_fraction: float = 0.05,
                 on_malformed: str = "error") -> seqio.FunctionDataSource:
  """Documents of JSONL/Parquet/text files, hash-split into train/validation.

  Args:
    paths: .jsonl[.zst|.gz], .parquet or .txt files (a .txt file is one document).
    text_field: dotted JSON field (or Parquet column) holding the text.
    domain_field: dotted JSON field (or Parquet column) naming the domain; with
      domain_value, only matching records are this domain's documents.
    domain_value: the domain's value of domain_field, or a list of values (several
      values mapped onto one domain).
    val_fraction: fraction of documents (by hash) in "validation".
    on_malformed: "error" (default) or "skip"; see the module docstring.
  """
  paths = sorted(paths)
  for p in paths:
    if not tf.io.gfile.exists(p):
      raise FileNotFoundError(f"Data file not found: {p}")

  def texts(split):
    _check_split(split, DEFAULT_SPLITS)
    want_val = split == "validation"
    for text in _iter_docs(paths, text_field, domain_field, domain_value, on_malformed):
      if in_validation(text, val_fraction) == want_val:
        yield text

  def raw_spec(split):
    _check_split(split, DEFAULT_SPLITS)
    return _raw_spec(paths, text_field=text_field, domain_field=domain_field,
                     domain_value=domain_value, on_malformed=on_malformed,
                     val_fraction=val_fraction)

  return generator_source(texts, DEFAULT_SPLITS,
                          fingerprint(paths, text_field, domain_field, domain_value, val_fraction),
                          raw_spec)


def split_files_source(split_paths: Mapping[str, Sequence[str]], *, text_field: str = "text",
                       domain_field: Optional[str] = None, domain_value: DomainValue = None,
                       on_malformed: str = "error") -> seqio.FunctionDataSource:
  """Documents of JSONL/Parquet files whose split comes from the file layout."""
  split_paths = {k: sorted(v) for k, v in split_paths.items()}

  def texts(split):
    _check_split(split, list(split_paths))
    yield from _iter_docs(split_paths[split], text_field, domain_field, domain_value, on_malformed)

  def raw_spec(split):
    _check_split(split, list(split_paths))
    return _raw_spec(split_paths[split], text_field=text_field, domain_field=domain_field,
                     domain_value=domain_value, on_malformed=on_malformed)

  all_paths = [p for v in split_paths.values() for p in v]
  return generator_source(texts, list(split_paths),
                          fingerprint(all_paths, text_field, domain_field, domain_value), raw_spec)


def iter_records(path: str, *, text_field: str = "text", domain_field: Optional[str] = None,
                 on_malformed: str = "error") -> Iterator[tuple[str, Optional[str]]]:
  """(text, domain key) of every valid record of a .jsonl*/.parquet/.txt file; the domain key
  is store_raw.domain_key of the domain field (None when missing, or without domain_field)."""
  if path.endswith(TEXT_SUFFIXES):
    for text in iter_text_file(path, whole_file=True):
      yield text, None
  elif path.endswith(PARQUET_SUFFIXES):
    yield from _parquet_records(path, text_field, domain_field, on_malformed)
  else:
    for obj in iter_jsonl(path, text_field=text_field, on_malformed=on_malformed):
      value = get_field(obj, domain_field) if domain_field else None
      yield get_field(obj, text_field), store_raw.domain_key(value)


def _parquet_records(path, text_field, domain_field, on_malformed):
  skipped = 0
  try:
    for row, text, value in store_raw.iter_parquet(path, text_field, domain_field):
      if not isinstance(text, str):
        if on_malformed == "skip":
          skipped += 1
          continue
        raise ValueError(f"{path}: row {row}: text column {text_field!r} holds "
                         f"{type(text).__name__}, not a string. Fix the row, or pass "
                         "on_malformed='skip' to skip such rows.")
      yield text, store_raw.domain_key(value)
  except store_raw.StoreBuildError as e:
    raise ValueError(str(e)) from None
  if skipped:
    logging.warning("%s: skipped %d Parquet rows without text.", path, skipped)


def _values(domain_value: DomainValue) -> Optional[frozenset]:
  if domain_value is None:
    return None
  if isinstance(domain_value, str):
    return frozenset([domain_value])
  return frozenset(domain_value)


def _iter_docs(paths, text_field, domain_field, domain_value, on_malformed):
  values = _values(domain_value)
  for path in paths:
    for text, key in iter_records(path, text_field=text_field, domain_field=domain_field,
                                  on_malformed=on_malformed):
      if domain_field is None or key in values:
        yield text


def files_with_suffix(d: str, suffixes) -> list[str]:
  """Files under d (recursively; local or gs://) whose names end with a suffix."""
  return sorted(
      os.path.join(root, name)
      for root, _, names in tf.io.gfile.walk(d)
      for name in names
      if name.endswith(suffixes))


def directory_domains(data_dir: str, **kwargs) -> dict[str, seqio.FunctionDataSource]:
  """{domain: source} for a directory of per-domain files.

  Layouts (both may be mixed): `data_dir/<domain>.jsonl[.zst|.gz]`,
  `data_dir/<domain>.parquet` or `data_dir/<domain>.txt` (a top-level .txt
  holds documents separated by blank lines); or `data_dir/<domain>/**` with
  .jsonl[.zst|.gz], .parquet and/or .txt files (one document per .txt file there).
  """
  if not tf.io.gfile.isdir(data_dir):
    raise FileNotFoundError(f"Domain directory not found: {data_dir}. Pass a directory holding "
                            "<domain>.jsonl files or <domain>/ subdirectories.")
  out = {}
  for entry in sorted(e.rstrip("/") for e in tf.io.gfile.listdir(data_dir)):
    path = os.path.join(data_dir, entry)
    if tf.io.gfile.isdir(path):
      files = files_with_suffix(path, DATA_SUFFIXES)
      if not files:
        raise ValueError(f"Domain {entry!r}: no .jsonl/.jsonl.zst/.parquet/.txt files "
                         f"under {path}; add files or remove the directory.")
      out[entry] = files_source(files, **kwargs)
    elif entry.endswith(TEXT_SUFFIXES):
      out[entry[:-4]] = paragraph_source(path, kwargs.get("val_fraction", 0.05))
    else:
      for suf in JSONL_SUFFIXES + PARQUET_SUFFIXES:
        if entry.endswith(suf):
          out[entry[:-len(suf)]] = files_source([path], **kwargs)
          break
  if not out:
    raise ValueError(f"No domain files in {data_dir}: expected "
                     "<domain>.jsonl[.zst], <domain>.txt or <domain>/.")
  return out


def paragraph_source(path: str, val_fraction: float):
  """A .txt file whose blank-line paragraphs are the documents, hash-split."""

  def texts(split):
    _check_split(split, DEFAULT_SPLITS)
    for t in iter_text_file(path, whole_file=False):
      if in_validation(t, val_fraction) == (split == "validation"):
        yield t

  def raw_spec(split):
    _check_split(split, DEFAULT_SPLITS)
    return _raw_spec([path], kind="paragraphs", val_fraction=val_fraction)

  return generator_source(texts, DEFAULT_SPLITS, fingerprint([path], val_fraction), raw_spec)


def jsonl_field_domains(paths: Sequence[str], domain_field: str, *,
                        domains: Optional[Sequence[str]] = None,
                        **kwargs) -> dict[str, seqio.FunctionDataSource]:
  """{domain: source} for JSONL or Parquet files whose records carry a domain field.

  Without `domains`, the files are scanned once for the field's values.
  """
  if isinstance(paths, str):
    paths = [paths]
  if domains is None:
    found = set()
    for p in paths:
      for _, key in iter_records(p, text_field=kwargs.get("text_field",
                                                          "text"), domain_field=domain_field,
                                 on_malformed=kwargs.get("on_malformed", "error")):
        if key is not None:
          found.add(key)
    if not found:
      raise ValueError(f"No line of {list(paths)} has the domain field "
                       f"{domain_field!r}; set domain_field to the right key.")
    domains = sorted(found)
  return {
      d: files_source(paths, domain_field=domain_field, domain_value=d, **kwargs) for d in domains
  }


def tfds_source(name: str, *, data_dir: Optional[str] = None,
                splits: Optional[Mapping[str, str]] = None) -> seqio.TfdsDataSource:
  """A thin seqio.TfdsDataSource for a prepared TFDS dataset ('name:version').

  Use with register_domain_set(..., text_key=<the dataset's text feature>).
  """
  return seqio.TfdsDataSource(tfds_name=name, tfds_data_dir=data_dir, splits=splits)
