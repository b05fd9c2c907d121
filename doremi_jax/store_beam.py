"""Beam worker code of the store build (see data_pipelines/build_store.py).

Kept free of TensorFlow and SeqIO on the raw-file path: Beam worker
processes import only numpy, zstandard, array_record and this module (TF is
imported lazily for non-local paths, and by the SeqIO-task fallback).

Stages:
  1. ReadFile: one raw file, read once; each record is routed by its domain
     field, tokenized (vocabulary + EOS) and appended to a per-(domain, file)
     chunk of temporary files: int32le tokens and int64le document lengths.
     ReadTask is the fallback for sources without raw files: it reads one
     domain's SeqIO task dataset (already tokenized with EOS).
  2. make_plan: per domain, chunks in (file, line) order give each token a
     global offset; rows are L-token windows of that stream and shards are
     fixed runs of rows_per_shard rows. Depends only on the data, never on
     the number of workers.
  3. WriteShard: packs a shard's token range block by block with
     doremi_jax.data.pack_documents (rows start at shard and block
     boundaries, so packing a range equals packing the whole domain) and
     writes one ArrayRecord file.
  4. write_manifest: last, by atomic rename, in the build's own directory;
     the driver then publishes it (doremi_jax/store_builds.py).
"""
import json
import os
import tempfile
import time
import uuid
from typing import Any, Mapping, Optional, Sequence

import apache_beam as beam
import numpy as np

from doremi_jax import data
from doremi_jax import store
from doremi_jax import store_builds
from doremi_jax import store_raw

NAMESPACE = "doremi_jax.store"
_FLUSH_DOCS = 256
_BLOCK_TOKENS = 1 << 20
_PROGRESS_S = {False: 2.0, True: 10.0}  # seconds between progress writes: local, remote

StoreBuildError = store.StoreBuildError


def counter(name: str):
  return beam.metrics.Metrics.counter(NAMESPACE, name)


class _Progress:
  """A worker's documents so far on one unit (raw file or task), written now and then to
  the build's progress directory for the driver's progress line."""

  def __init__(self, pdir: Optional[str], unit: str):
    self._pdir, self._unit = pdir, unit
    self._every = _PROGRESS_S[bool(pdir) and store.is_remote(pdir)]
    self._last = time.monotonic()
    self.docs = 0

  def add(self, n: int) -> None:
    self.docs += n
    if self._pdir and time.monotonic() - self._last >= self._every:
      store_builds.write_progress(self._pdir, self._unit, self.docs, 0, False)
      self._last = time.monotonic()

  def done(self, size_bytes: int) -> None:
    if self._pdir:
      store_builds.write_progress(self._pdir, self._unit, self.docs, size_bytes, True)


# ------------------------------------------------------------------ chunks


def chunk_paths(tmp_dir: str, domain: str, group: int, file: int) -> tuple[str, str]:
  base = os.path.join(tmp_dir, domain, f"{group:03d}-{file:06d}")
  return base + ".tok", base + ".len"


class _ChunkWriter:
  """Appends documents' tokens and lengths of one (domain, file)."""

  def __init__(self, tok_path: str, len_path: str):
    store.makedirs(os.path.dirname(tok_path))
    self.paths = (tok_path, len_path)
    self._tok = store.open_file(tok_path, "wb")
    self._len = store.open_file(len_path, "wb")
    self.tokens = self.docs = 0

  def add(self, docs_tokens: Sequence[np.ndarray]) -> None:
    lens = np.array([len(t) for t in docs_tokens], "<i8")
    self._tok.write(np.concatenate(docs_tokens).astype("<i4").tobytes())
    self._len.write(lens.tobytes())
    self.tokens += int(lens.sum())
    self.docs += len(lens)

  def close(self) -> None:
    self._tok.close()
    self._len.close()


class _Chunks:
  """Per-domain buffered tokenizing writers for one raw file or task."""

  def __init__(self, tokenizer, tmp_dir: str, group: int, file: int):
    self._tok, self._tmp, self._g, self._f = tokenizer, tmp_dir, group, file
    self._buf: dict[str, list] = {}
    self._writers: dict[str, _ChunkWriter] = {}

  def add_text(self, domain: str, text: str) -> None:
    self._buf.setdefault(domain, []).append(text)
    if len(self._buf[domain]) >= _FLUSH_DOCS:
      self.add_tokens(domain, self._tok(self._buf.pop(domain)))

  def add_tokens(self, domain: str, docs_tokens: Sequence[np.ndarray]) -> None:
    docs_tokens = [t for t in docs_tokens if len(t)]
    if not docs_tokens:
      return
    if domain not in self._writers:
      self._writers[domain] = _ChunkWriter(*chunk_paths(self._tmp, domain, self._g, self._f))
    self._writers[domain].add(docs_tokens)

  def close(self, domains: Sequence[str]) -> list[dict]:
    for d in list(self._buf):
      self.add_tokens(d, self._tok(self._buf.pop(d)))
    out = []
    for d in domains:
      w = self._writers.get(d)
      if w:
        w.close()
      out.append({
          "type": "chunk",
          "domain": d,
          "group": self._g,
          "file": self._f,
          "tokens": w.tokens if w else 0,
          "docs": w.docs if w else 0,
          "paths": list(w.paths) if w else None
      })
    return out


class ReadFile(beam.DoFn):
  """(group, file index, path) -> chunk records and one file record."""

  def __init__(self, groups: Sequence[Mapping[str, Any]], tokenizer_spec: Mapping[str, Any],
               tmp_dir: str, progress_dir: Optional[str] = None):
    self._groups = [dict(g) for g in groups]
    self._spec = dict(tokenizer_spec)
    self._tmp, self._pdir = tmp_dir, progress_dir
    self._tokenizer = None

  def setup(self):
    self._tokenizer = store_raw.Tokenizer(self._spec)

  def process(self, unit):
    gi, fi, path = unit
    group = self._groups[gi]
    stats = {"lines": 0, "malformed": 0, "unrouted": 0, "seen": set()}
    chunks = _Chunks(self._tokenizer, self._tmp, gi, fi)
    progress = _Progress(self._pdir, f"file-{gi:03d}-{fi:06d}")
    for text, domains in store_raw.iter_docs(path, group, stats):
      progress.add(1)
      for d in domains:
        chunks.add_text(d, text)
    yield from chunks.close(group["domains"])
    docs = progress.docs
    progress.done(store.file_size(path))
    counter("raw_lines").inc(stats["lines"])
    counter("malformed_lines_skipped").inc(stats["malformed"])
    counter("unrouted_lines").inc(stats["unrouted"])
    counter("documents").inc(docs)
    yield {
        "type": "file",
        "path": path,
        "lines": stats["lines"],
        "malformed": stats["malformed"],
        "unrouted": stats["unrouted"],
        "seen": sorted(stats["seen"])
    }


class ReadTask(beam.DoFn):
  """Fallback: task index -> the chunk of that domain's tokenized split."""

  def __init__(self, split: str, tmp_dir: str, group: int, tasks: Sequence[tuple[str, Any]],
               progress_dir: Optional[str] = None):
    self._split, self._tmp, self._group = split, tmp_dir, group
    self._tasks = list(tasks)
    self._pdir = progress_dir

  def process(self, index):
    domain, task = self._tasks[index]
    chunks = _Chunks(None, self._tmp, self._group + index, 0)
    progress = _Progress(self._pdir, f"task-{index:04d}")
    ds = task.get_dataset(None, split=self._split, shuffle=False)
    batch = []
    for ex in ds.as_numpy_iterator():
      batch.append(np.asarray(ex["targets"], np.int32))
      if len(batch) >= _FLUSH_DOCS:
        chunks.add_tokens(domain, batch)
        counter("documents").inc(len(batch))
        progress.add(len(batch))
        batch = []
    chunks.add_tokens(domain, batch)
    counter("documents").inc(len(batch))
    progress.add(len(batch))
    progress.done(0)
    yield from chunks.close([domain])


# -------------------------------------------------------------------- plan


def make_plan(records: Sequence[Mapping[str, Any]], *, domains: Sequence[str],
              domain_ids: Mapping[str, int], sequence_length: int, rows_per_shard: int,
              split: str) -> dict:
  """Shard specs and per-domain totals from stage 1's records (sorted)."""
  files = sorted((r for r in records if r["type"] == "file"), key=lambda r: r["path"])
  chunks = sorted((r for r in records if r["type"] == "chunk"), key=lambda r:
                  (r["domain"], r["group"], r["file"]))
  totals = {d: sum(c["tokens"] for c in chunks if c["domain"] == d) for d in domains}
  empty = [d for d in domains if totals[d] == 0]
  if empty:
    seen = sorted({v for f in files for v in f["seen"]})
    found = (f" Domain values found in the raw files: {seen}." if files else "")
    raise StoreBuildError(f"Domains {empty} have no records in split {split!r}.{found} Check "
                          "the files and the domain field, or remove those domains from the "
                          "domain set.")
  length, per_shard = int(sequence_length), int(rows_per_shard)
  shards, summary = [], {}
  for d in domains:
    offset, listed = 0, []
    for c in chunks:
      if c["domain"] == d and c["tokens"]:
        listed.append({"paths": c["paths"], "offset": offset, "tokens": c["tokens"]})
        offset += c["tokens"]
    rows = -(-offset // length)
    num_shards = -(-rows // per_shard)
    for s in range(num_shards):
      lo, hi = s * per_shard * length, min((s + 1) * per_shard * length, offset)
      shards.append({
          "domain": d,
          "domain_id": domain_ids[d],
          "shard": s,
          "num_shards": num_shards,
          "lo": lo,
          "hi": hi,
          "chunks": [c for c in listed if c["offset"] < hi and c["offset"] + c["tokens"] > lo]
      })
    summary[d] = {
        "tokens": offset,
        "rows": rows,
        "num_shards": num_shards,
        "documents": sum(c["docs"] for c in chunks if c["domain"] == d)
    }
  stats = {k: sum(f[k] for f in files) for k in ("lines", "malformed", "unrouted")}
  return {
      "shards": shards,
      "domains": summary,
      "raw_files": len(files),
      "raw_lines": stats["lines"],
      "malformed_lines_skipped": stats["malformed"],
      "unrouted_lines": stats["unrouted"]
  }


def shard_specs(plan: Mapping[str, Any]) -> list[dict]:
  return plan["shards"]


# ------------------------------------------------------------------ shards


class _TokenRange:
  """Reads [a, b) of a domain's token stream and its document starts."""

  def __init__(self, chunks: Sequence[Mapping[str, Any]]):
    self._chunks = list(chunks)
    self._files = {}
    starts = []
    for c in self._chunks:
      with store.open_file(c["paths"][1], "rb") as f:
        lens = np.frombuffer(f.read(), "<i8")
      starts.append(c["offset"] + np.cumsum(lens) - lens)
    self.doc_starts = np.concatenate(starts) if starts else np.zeros(0, int)

  def tokens(self, a: int, b: int) -> np.ndarray:
    parts = []
    for i, c in enumerate(self._chunks):
      s, e = max(a, c["offset"]), min(b, c["offset"] + c["tokens"])
      if s >= e:
        continue
      if i not in self._files:
        self._files[i] = store.open_file(c["paths"][0], "rb")
      f = self._files[i]
      f.seek(4 * (s - c["offset"]))
      parts.append(np.frombuffer(f.read(4 * (e - s)), "<i4"))
    return np.concatenate(parts).astype(np.int32)

  def close(self):
    for f in self._files.values():
      f.close()


class WriteShard(beam.DoFn):
  """A shard spec -> one ArrayRecord file of packed rows; its stats."""

  def __init__(self, out_dir: str, sequence_length: int):
    self._out, self._length = out_dir, int(sequence_length)

  def process(self, spec):
    from array_record.python import array_record_module  # pylint: disable=g-import-not-at-top
    length = self._length
    name = store.shard_name(spec["domain"], spec["shard"], spec["num_shards"])
    final = os.path.join(self._out, name)
    local = (
        os.path.join(tempfile.gettempdir(), f"{uuid.uuid4().hex}-{name}")
        if store.is_remote(final) else f"{final}.tmp-{uuid.uuid4().hex}")
    writer = array_record_module.ArrayRecordWriter(local, store.ARRAY_RECORD_OPTIONS)
    src = _TokenRange(spec["chunks"])
    block = max(1, _BLOCK_TOKENS // length) * length
    rows = 0
    for a in range(spec["lo"], spec["hi"], block):
      b = min(a + block, spec["hi"])
      starts = src.doc_starts
      cuts = starts[(starts > a) & (starts < b)] - a
      docs = np.split(src.tokens(a, b), cuts)
      packed = data.pack_documents(docs, [spec["domain_id"]] * len(docs), length)
      for rec in store.encode_rows(packed):
        writer.write(rec)
      rows += len(packed["targets"])
    writer.close()
    src.close()
    if store.is_remote(final):
      store.gfile().copy(local, final, overwrite=True)
      os.remove(local)
    else:
      os.replace(local, final)
    counter("rows_written").inc(rows)
    yield {
        "domain": spec["domain"],
        "shard": spec["shard"],
        "file": name,
        "rows": rows,
        "tokens": spec["hi"] - spec["lo"]
    }


def write_manifest(shards: Sequence[Mapping[str, Any]], plan: Mapping[str, Any],
                   meta: Mapping[str, Any], out_dir: str, tmp_dir: Optional[str]) -> dict:
  """Writes the manifest last (atomic rename), after deleting the temp files."""
  per_domain = {}
  for d in meta["domains"]:
    mine = sorted((s for s in shards if s["domain"] == d), key=lambda s: s["shard"])
    want = plan["domains"][d]
    if (len(mine) != want["num_shards"] or sum(s["rows"] for s in mine) != want["rows"]):
      raise StoreBuildError(f"Domain {d!r}: wrote {len(mine)} shards, planned "
                            f"{want['num_shards']}; rerun the build.")
    per_domain[d] = {
        "domain_id": meta["domain_ids"][d],
        "rows": want["rows"],
        "tokens": want["tokens"],
        "documents": want["documents"],
        "shards": [{
            "file": s["file"],
            "rows": s["rows"],
            "tokens": s["tokens"]
        } for s in mine]
    }
  manifest = dict(meta, complete=True, per_domain=per_domain,
                  rows=sum(v["rows"] for v in per_domain.values()),
                  tokens=sum(v["tokens"] for v in per_domain.values()), raw_files=plan["raw_files"],
                  raw_lines=plan["raw_lines"],
                  malformed_lines_skipped=plan["malformed_lines_skipped"],
                  unrouted_lines=plan["unrouted_lines"])
  if tmp_dir:
    store.remove_tree(tmp_dir)
  store.write_atomic(
      os.path.join(out_dir, store.MANIFEST),
      json.dumps(manifest, indent=1, sort_keys=True).encode())
  return manifest
