"""Which files hold which domains of a user corpus (data_pipelines.corpus): glob patterns
resolved (local or gs://), per-domain directories, validation file sets, a first check of
every file's text and domain fields, and each domain's SeqIO source."""
import json
import os
from concurrent import futures
from typing import Optional, Sequence, Union

import seqio
import tensorflow as tf

from data_pipelines import sources
from doremi_jax import store_raw

Patterns = Union[None, str, Sequence[str]]


def as_list(patterns: Patterns) -> list[str]:
  return [patterns] if isinstance(patterns, str) else list(patterns or [])


def resolve_files(patterns: Patterns, what: str = "data_files") -> list[str]:
  """The data files of glob patterns (local or gs://; a directory stands for the data files
  under it). A pattern that is empty or matches no data file fails, naming it."""
  out = []
  for pat in as_list(patterns):
    if not pat or not pat.strip():
      raise ValueError(f"{what} holds an empty pattern {pat!r}; give paths or glob patterns "
                       "such as '/data/*.jsonl.zst' or 'gs://bucket/data/*.parquet'.")
    try:
      matches = sorted(tf.io.gfile.glob(pat))
    except tf.errors.OpError as e:
      raise FileNotFoundError(f"{what}: cannot list {pat!r}: {e.message}") from None
    files = []
    for m in matches:
      if m.endswith(sources.DATA_SUFFIXES):
        files.append(m)
      elif tf.io.gfile.isdir(m):
        files += sources.files_with_suffix(m, sources.DATA_SUFFIXES)
    if not files:
      found = f" (it matches only {matches[:5]})" if matches else ""
      raise FileNotFoundError(f"{what}: no data file matches {pat!r}{found}; expected "
                              ".jsonl, .jsonl.zst, .jsonl.gz, .parquet or .txt files.")
    out += [f for f in files if f not in out]
  return out


def _stem(path: str) -> str:
  base = os.path.basename(path)
  for suf in sorted(sources.DATA_SUFFIXES, key=len, reverse=True):
    if base.endswith(suf):
      return base[:-len(suf)]
  return base


def layout(data_files, data_dir, domain_field, validation_files, text_field) -> dict:
  """{"units": {value or None: train files}, "val_files", "domain_field", ...}: which files
  hold which domain values (None: read from the domain field of each record)."""
  if bool(as_list(data_files)) == bool(data_dir):
    raise ValueError("Give data_files (file patterns, with a domain field or one domain per "
                     "file) or data_dir (one file or subdirectory per domain), not "
                     f"{'both' if data_dir else 'neither'}.")
  val_files = resolve_files(validation_files, "validation_files") if validation_files else []
  paragraphs = set()
  if data_dir:
    domain_field = None
    units = _directory_units(data_dir)
    paragraphs = {
        v[0]
        for v in units.values()
        if os.path.dirname(v[0]) == data_dir.rstrip("/") and v[0].endswith(sources.TEXT_SUFFIXES)
    }
  else:
    files = resolve_files(data_files)
    if domain_field:
      units = {None: files}
    else:
      units = {}
      for f in files:
        units.setdefault(_stem(f), []).append(f)
  val_units = _validation_units(units, val_files, domain_field)
  units = {k: [f for f in v if f not in val_files] for k, v in units.items()}
  units = {k: v for k, v in units.items() if v}
  train_files = sorted({f for v in units.values() for f in v})
  if not train_files:
    raise ValueError("Every data file is also a validation file; leave training files.")
  _check_columns(train_files + [f for f in val_files if f not in train_files], text_field,
                 domain_field)
  return {
      "units": units,
      "val_files": val_files,
      "val_units": val_units,
      "paragraphs": paragraphs,
      "domain_field": domain_field,
      "all_files": train_files + val_files,
      "key": [domain_field, sorted((str(k), v) for k, v in units.items()), val_files]
  }


def _directory_units(data_dir: str) -> dict[str, list[str]]:
  """{entry: files} of a directory of per-domain files or subdirectories."""
  if not tf.io.gfile.isdir(data_dir):
    raise FileNotFoundError(f"data_dir not found: {data_dir}. Pass a directory holding "
                            "<domain>.jsonl[.zst]/.parquet files or <domain>/ subdirectories.")
  units = {}
  for entry in sorted(e.rstrip("/") for e in tf.io.gfile.listdir(data_dir)):
    path = os.path.join(data_dir, entry)
    if tf.io.gfile.isdir(path):
      files = sources.files_with_suffix(path, sources.DATA_SUFFIXES)
      if not files:
        raise FileNotFoundError(f"data_dir: no data file under {path}; add .jsonl, .jsonl.zst, "
                                ".parquet or .txt files, or remove the directory.")
      units[entry] = files
    elif entry.endswith(sources.DATA_SUFFIXES):
      units.setdefault(_stem(entry), []).append(path)
  if not units:
    raise FileNotFoundError(f"data_dir: no domain files in {data_dir}; expected "
                            "<domain>.jsonl[.zst|.gz], <domain>.parquet or <domain>/.")
  return units


def _check_columns(files: Sequence[str], text_field: str, domain_field: Optional[str]) -> None:
  """Each file is readable and its first record (JSONL) or schema (Parquet) has the text and
  domain fields: a wrong field name fails here naming the file and the fields found."""

  def check(path):
    if path.endswith(sources.PARQUET_SUFFIXES):
      store_raw.check_parquet(path, text_field, domain_field)
    elif path.endswith(sources.TEXT_SUFFIXES):
      if domain_field:
        raise ValueError(f"{path}: a .txt file has no domain field {domain_field!r}; use "
                         "data_dir, or domain_field=None (one domain per file).")
    else:
      _check_first_record(path, text_field, domain_field)

  with futures.ThreadPoolExecutor(min(16, len(files))) as pool:
    list(pool.map(check, files))


def _check_first_record(path: str, text_field: str, domain_field: Optional[str]) -> None:
  with sources.open_text(path) as f:
    line = next((l for l in f if l.strip()), None)
  try:
    obj = json.loads(line) if line is not None else None
  except ValueError:
    return  # a malformed line: the on_malformed policy reports or skips it
  if not isinstance(obj, dict):
    return
  for field, what in ((text_field, "text"), (domain_field, "domain")):
    if field and sources.get_field(obj, field) is None:
      raise ValueError(f"{path}: the first record has no {what} key {field!r}; keys found: "
                       f"{store_raw.field_paths(obj)}. Set the {what} field to one of them "
                       "(dotted for nested keys).")


def source(layout: dict, values: Sequence[str], text_field: str, on_malformed: str,
           val_fraction: float) -> seqio.DataSource:
  """One domain's source: its files (several values: their union), or the routed files."""
  if layout["domain_field"]:
    files, kw = layout["units"][None], {
        "domain_field": layout["domain_field"],
        "domain_value": sorted(values)
    }
  else:
    files, kw = sorted({f for v in values for f in layout["units"][v]}), {}
    if set(files) & layout["paragraphs"]:
      if len(files) > 1:
        raise ValueError(f"Domain values {list(values)}: a top-level .txt file of data_dir "
                         "(paragraphs as documents) cannot be merged with other files.")
      return sources.paragraph_source(files[0], val_fraction)
  kw.update(text_field=text_field, on_malformed=on_malformed)
  if not layout["val_files"]:
    return sources.files_source(files, val_fraction=val_fraction, **kw)
  key = [None] if layout["domain_field"] else values
  val = sorted({f for v in key for f in layout["val_units"].get(v, [])})
  if not val:
    raise ValueError(f"Domain values {list(values)} have no file among validation_files; give "
                     "each domain validation files, or no validation_files (a hash split).")
  return sources.split_files_source({"train": files, "validation": val}, **kw)


def _validation_units(units: dict, val_files: Sequence[str], domain_field: Optional[str]) -> dict:
  """{value or None: validation files}: with a domain field, all of them; else a validation
  file belongs to the per-domain unit that lists it (under data_dir) or shares its name."""
  if domain_field or not val_files:
    return {None: list(val_files)}
  out = {}
  for f in val_files:
    owner = [k for k, v in units.items() if f in v] or [k for k in units if _stem(f) == k]
    if not owner:
      raise ValueError(f"Validation file {f} belongs to no domain: put it under its domain's "
                       f"directory or name it <domain>.<suffix>; domains: {sorted(units)}.")
    out.setdefault(owner[0], []).append(f)
  return out
