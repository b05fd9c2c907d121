"""The packed token store: its file format and the train-time reader.

A store holds, per split, one domain set's documents tokenized (vocabulary
plus EOS, exactly as its SeqIO tasks do) and packed within each domain by
`doremi_jax.data.pack_documents`. `python -m data_pipelines.build_store`
writes it (an Apache Beam job); `StoreDomains` reads it at train time as a
drop-in replacement for `doremi_jax.data.PackedDomains`.

Layout of a build's directory, `<store_dir>/<split>/builds/<id>/` (how
builds share a store and publish one of them: doremi_jax/store_builds.py):
  <domain>-<shard:05d>-of-<n:05d>.array_record  rows_per_shard rows each
    (the last shard of a domain holds the rest); written with
    ARRAY_RECORD_OPTIONS (one zstd-compressed record per chunk, so any row
    is one read and one small decompression).
  manifest.json  written last; `"complete": true`. Published as
    `<store_dir>/<split>/manifest.json` with `"build": "builds/<id>"`.
Stores of the first layout (shards and manifest in `<store_dir>/<split>/`)
read as before.

One record is one packed row of length L: `targets` then `segment_ids`,
both int32 little-endian (8 * L bytes before compression). The other
features are functions of these two: `positions` restart at 0 where the
segment id changes, `inputs` are the targets shifted right with 0 at every
segment start, `domain_ids` are the domain's id where `segment_ids > 0`.

Reader choice: array_record's ArrayRecordReader directly, one per shard,
opened on first use with `readahead_buffer_size:0` (random access); a batch's
rows of one shard are one `read(positions)` call (parallel in C++), shards in
parallel on a small thread pool for remote stores. Not Grain: its samplers
and worker processes would replace `BatchIterator`, whose global batch is a
pure function of (seed, step, per-domain draw counters) and whose position
is already a small checkpointed state; all we need is `rows(pool, idx)`.
Not array_record's ArrayRecordDataSource (which Grain re-exports): it starts
a thread pool on every `__getitems__` call, 75% of the time of a small batch.

Memory: row r of a domain is shard r // rows_per_shard, position
r % rows_per_shard, so this module keeps no per-row state. Each opened
shard's reader keeps its chunk index: 8 bytes per row (measured 9.9 bytes
per row with the 32 KiB file buffer of each of 39 shards, 1.6M rows).
`reader_options={"index_storage_option": "offloaded"}` drops it to ~0 but
measured 600x slower random reads. Nothing else grows with the corpus: the
rest is one batch of records.

array_record opens local paths and gs:// natively. Other tf.io.gfile schemes
(e.g. ram:// in tests) are copied once to a local cache directory.
"""
import hashlib
import json
import os
import shlex
import tempfile
import threading
import uuid
from concurrent import futures
from typing import Any, Mapping, Optional, Sequence

import numpy as np

# File helpers (re-exported: callers use store.exists, store.write_atomic, ...).
from doremi_jax.store_files import bounded  # pylint: disable=unused-import
from doremi_jax.store_files import exists  # pylint: disable=unused-import
from doremi_jax.store_files import file_size  # pylint: disable=unused-import
from doremi_jax.store_files import gfile  # pylint: disable=unused-import
from doremi_jax.store_files import is_remote  # pylint: disable=unused-import
from doremi_jax.store_files import makedirs  # pylint: disable=unused-import
from doremi_jax.store_files import open_file  # pylint: disable=unused-import
from doremi_jax.store_files import remove_tree  # pylint: disable=unused-import
from doremi_jax.store_files import REMOTE_TIMEOUT_S  # pylint: disable=unused-import
from doremi_jax.store_files import StoreUnreachableError  # pylint: disable=unused-import
from doremi_jax.store_files import tmp_name  # pylint: disable=unused-import
from doremi_jax.store_files import write_atomic  # pylint: disable=unused-import

FEATURES = ("inputs", "targets", "segment_ids", "positions", "domain_ids")
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
ARRAY_RECORD_OPTIONS = "group_size:1,zstd:3"
RECORD_FORMAT = "int32le targets[L] + int32le segment_ids[L]"


class IncompleteStoreError(FileNotFoundError):
  """The store has no manifest: its build never ran or was interrupted."""


class StoreBuildError(ValueError):
  """Bad build input, found before or during the build (names the fix)."""


class StoreMismatchError(ValueError):
  """The store was built for another domain set, vocabulary or length."""


def split_dir(store_dir: str, split: str) -> str:
  return os.path.join(store_dir, split)


def shard_name(domain: str, shard: int, num_shards: int) -> str:
  return f"{domain}-{shard:05d}-of-{num_shards:05d}.array_record"


def build_command(domain_set: str, split: str, sequence_length: int, store_dir: str) -> str:
  return (f"python -m data_pipelines.build_store --domain_set={domain_set} "
          f"--split={split} --sequence_length={sequence_length} "
          f"--store_dir={store_dir}")


def rebuild_command(manifest: Optional[Mapping[str, Any]], store_dir: str, split: str, *,
                    domain_set: Optional[str] = None, sequence_length: Optional[int] = None) -> str:
  """The command that rebuilds the split in place: the build's own arguments (recorded in
  its manifest) with --split, --store_dir and --overwrite."""
  args = list((manifest or {}).get("build_args") or [])
  if not args:
    args = [
        f"--domain_set={domain_set or (manifest or {}).get('domain_set', '<domain set>')}",
        f"--sequence_length={sequence_length or (manifest or {}).get('sequence_length', 0)}"
    ]
  args += [f"--split={split}", f"--store_dir={store_dir}", "--overwrite"]
  return "python -m data_pipelines.build_store " + shlex.join(args)


def data_dir(store_dir: str, split: str, manifest: Mapping[str, Any]) -> str:
  """Where the published build's shards are (the split directory itself in the old layout)."""
  build = manifest.get("build")
  return os.path.join(split_dir(store_dir, split), build) if build else split_dir(store_dir, split)


def read_manifest(store_dir: str, split: str) -> Optional[dict]:
  """The split's manifest, or None when there is none (not built yet)."""
  path = os.path.join(split_dir(store_dir, split), MANIFEST)
  if not exists(path):
    return None
  with open_file(path, "rb") as f:
    return json.loads(f.read().decode("utf-8"))


def build_key(**fields: Any) -> str:
  """A stable hash of what determines a store's bytes."""
  return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:16]


# ----------------------------------------------------------------- records


def encode_rows(rows: Mapping[str, np.ndarray]) -> list[bytes]:
  """One record per packed row: targets then segment_ids, int32le."""
  both_n2l = np.stack([rows["targets"], rows["segment_ids"]], axis=1)
  both_n2l = np.ascontiguousarray(both_n2l, dtype="<i4")
  return [r.tobytes() for r in both_n2l]


def decode_rows(records: Sequence[bytes], domain_id: int, length: int) -> dict[str, np.ndarray]:
  """Every feature of FEATURES as [len(records), L] int32 (module docstring)."""
  n = len(records)
  both_n2l = np.frombuffer(b"".join(records), "<i4").reshape(n, 2, length)
  segment_ids = both_n2l[:, 1].astype(np.int32)
  return row_features(both_n2l[:, 0], segment_ids, np.where(segment_ids > 0, domain_id, 0))


def row_features(targets_NxL: np.ndarray, segment_ids_NxL: np.ndarray,
                 domain_ids_NxL: np.ndarray) -> dict[str, np.ndarray]:
  """Every feature of FEATURES from a packed row's targets, segments and domain ids:
  positions restart at 0 with each segment, inputs are the targets shifted right with 0 at
  each segment start."""
  n, length = targets_NxL.shape
  valid = segment_ids_NxL > 0
  change = np.ones_like(valid)
  change[:, 1:] = segment_ids_NxL[:, 1:] != segment_ids_NxL[:, :-1]
  col = np.broadcast_to(np.arange(length), (n, length))
  start = np.maximum.accumulate(np.where(change, col, 0), axis=1)
  positions = np.where(valid, col - start, 0).astype(np.int32)
  inputs = np.zeros_like(targets_NxL, dtype=np.int32)
  inputs[:, 1:] = targets_NxL[:, :-1]
  inputs = np.where(positions == 0, 0, inputs).astype(np.int32)
  return {
      "inputs": inputs,
      "targets": targets_NxL.astype(np.int32),
      "segment_ids": segment_ids_NxL.astype(np.int32),
      "positions": positions,
      "domain_ids": domain_ids_NxL.astype(np.int32)
  }


# ------------------------------------------------------------------ reader


def check_manifest(manifest: Optional[Mapping[str, Any]], store_dir: str, split: str, *,
                   domain_set: Optional[str] = None, vocabulary_key: Optional[str] = None,
                   sequence_length: Optional[int] = None) -> None:
  """Raises IncompleteStoreError / StoreMismatchError (naming both sides)."""
  cmd = build_command(domain_set or "<domain set>", split, sequence_length or 0, store_dir)
  if manifest is None or not manifest.get("complete"):
    raise IncompleteStoreError(
        f"No complete store in {split_dir(store_dir, split)}: {MANIFEST} is "
        f"missing (the build never ran or was interrupted). Rerun the build: "
        f"`{cmd}`.")
  cmd = rebuild_command(manifest, store_dir, split, domain_set=domain_set,
                        sequence_length=sequence_length)
  if manifest.get("format_version") != FORMAT_VERSION:
    raise StoreMismatchError(f"Store {split_dir(store_dir, split)} has format version "
                             f"{manifest.get('format_version')}, this reader reads "
                             f"{FORMAT_VERSION}; rebuild it: `{cmd}`.")
  wanted = {
      "domain_set": domain_set,
      "vocabulary_key": vocabulary_key,
      "sequence_length": sequence_length
  }
  for key, want in wanted.items():
    if want is not None and manifest.get(key) != want:
      raise StoreMismatchError(f"Store {split_dir(store_dir, split)} was built with {key}="
                               f"{manifest.get(key)!r}, but this run needs {key}={want!r}. Use the "
                               f"store built for this run, or build one into another directory "
                               f"(another --store_dir), or replace it: `{cmd}`.")


class StoreDomains:
  """Per-domain packed rows read by random access (see module docstring).

  The interface of doremi_jax.data.PackedDomains that BatchIterator and
  eval_batches use: names, pools, num_sequences, num_tokens,
  mixture_rates, mixed, sequence_length, split, rows(pool, idx).
  """

  mixed = False

  def __init__(self, manifest: Mapping[str, Any], directory: str, *,
               reader_options: Optional[Mapping[str, str]] = None,
               num_threads: Optional[int] = None, rebuild: Optional[str] = None):
    self.manifest = dict(manifest)
    self._rebuild = rebuild or rebuild_command(manifest, "<store_dir>", manifest["split"])
    self.names = list(manifest["domains"])
    self.split = manifest["split"]
    self.sequence_length = int(manifest["sequence_length"])
    self.mixture_rates = None
    per = manifest["per_domain"]
    self.num_sequences = {d: int(per[d]["rows"]) for d in self.names}
    self.num_tokens = {d: int(per[d]["tokens"]) for d in self.names}
    self._domain_ids = {d: int(per[d]["domain_id"]) for d in self.names}
    self._per_shard = int(manifest["rows_per_shard"])
    self._files = {
        d: [os.path.join(directory, s["file"]) for s in per[d]["shards"]] for d in self.names
    }
    opts = {"readahead_buffer_size": "0", **dict(reader_options or {})}
    if opts.get("index_storage_option") == "offloaded":
      opts.setdefault("footer_prefetch_bytes", "0")  # required by array_record
    self._options = ",".join(f"{k}:{v}" for k, v in opts.items())
    self._readers: dict[tuple[str, int], Any] = {}
    self._lock = threading.Lock()
    if num_threads is None:  # parallel reads hide remote latency only
      num_threads = 16 if is_remote(directory) else 0
    self._pool = (futures.ThreadPoolExecutor(num_threads) if num_threads else None)

  @classmethod
  def open(cls, store_dir: str, *, split: str = "train", domain_set: Optional[str] = None,
           vocabulary_key: Optional[str] = None, sequence_length: Optional[int] = None,
           cache_dir: Optional[str] = None, reader_options: Optional[Mapping[str, str]] = None,
           remote_timeout_s: Optional[float] = REMOTE_TIMEOUT_S) -> "StoreDomains":
    """Opens a complete store, refusing one built for another run.

    Args:
      store_dir: the build's --store_dir (local, gs://, or another
        tf.io.gfile scheme, copied to `cache_dir` first).
      split: the split subdirectory.
      domain_set / vocabulary_key / sequence_length: what this run needs
        (data_pipelines.vocab.vocab_key); None skips the check.
      cache_dir: local copy of a store on a scheme array_record cannot open
        (default: a fresh temporary directory).
      reader_options: array_record reader options, e.g.
        {"index_storage_option": "offloaded"}.
      remote_timeout_s: bound on the manifest read and first shard open of a
        remote store (StoreUnreachableError, one line, after it).
    """
    where = split_dir(store_dir, split)
    manifest = bounded(lambda: read_manifest(store_dir, split),
                       remote_timeout_s if is_remote(store_dir) else None,
                       f"Reading the store manifest in {where}")
    check_manifest(manifest, store_dir, split, domain_set=domain_set, vocabulary_key=vocabulary_key,
                   sequence_length=sequence_length)
    directory = data_dir(store_dir, split, manifest)
    if is_remote(directory) and not directory.startswith("gs://"):
      directory = _local_copy(directory, manifest, cache_dir)
    st = cls(manifest, directory, reader_options=reader_options,
             rebuild=rebuild_command(manifest, store_dir, split))
    if directory.startswith("gs://"):  # array_record's open of an unreachable gs:// path hangs
      first = manifest["domains"][0]
      bounded(lambda: st._reader(first, 0), remote_timeout_s,
              f"Opening the store shard {st._files[first][0]}")
    return st

  @property
  def pools(self) -> list[str]:
    return list(self.names)

  def rows(self, pool: str, idx: np.ndarray) -> dict[str, np.ndarray]:
    """Rows `idx` of a domain: every feature of FEATURES as [len(idx), L]."""
    idx = np.asarray(idx, np.int64).reshape(-1)
    shard, pos = np.divmod(idx, self._per_shard)
    records = [b""] * len(idx)

    def read(s):
      sel = np.nonzero(shard == s)[0]
      got = self._reader(pool, int(s)).read(pos[sel].tolist())
      for j, rec in zip(sel, got):
        records[j] = rec

    shards = np.unique(shard)
    if self._pool is None or len(shards) == 1:
      for s in shards:
        read(s)
    else:
      list(self._pool.map(read, shards))
    return decode_rows(records, self._domain_ids[pool], self.sequence_length)

  def _reader(self, pool: str, shard: int):
    """The shard's ArrayRecordReader, opened on first use."""
    key = (pool, shard)
    reader = self._readers.get(key)
    if reader is None:
      with self._lock:
        reader = self._readers.get(key)
        if reader is None:
          from array_record.python import array_record_module  # pylint: disable=g-import-not-at-top
          path = self._files[pool][shard]
          reader = array_record_module.ArrayRecordReader(path, self._options,
                                                         file_reader_buffer_size=32768)
          if not reader.ok() or reader.num_records() == 0:
            raise FileNotFoundError(f"Store shard unreadable or empty: {path}; "
                                    f"rebuild the store: `{self._rebuild}`.")
          self._readers[key] = reader
    return reader

  def close(self) -> None:
    with self._lock:
      for r in self._readers.values():
        r.close()
      self._readers.clear()
    if self._pool is not None:
      self._pool.shutdown()


def _local_copy(directory: str, manifest: Mapping[str, Any], cache_dir: Optional[str]) -> str:
  """Copies a store split from a scheme array_record cannot open."""
  local = os.path.join(
      cache_dir or tempfile.mkdtemp(prefix="doremi_store_"), manifest["build_key"],
      manifest["split"])
  os.makedirs(local, exist_ok=True)
  for d in manifest["domains"]:
    for s in manifest["per_domain"][d]["shards"]:
      dst = os.path.join(local, s["file"])
      if not os.path.exists(dst):
        tmp = f"{dst}.tmp-{uuid.uuid4().hex}"
        gfile().copy(os.path.join(directory, s["file"]), tmp, overwrite=True)
        os.replace(tmp, dst)
  return local
