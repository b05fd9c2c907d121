r"""Builds the packed token store of a domain set's split with Apache Beam.

  python -m data_pipelines.build_store --domain_set=pile \
      --data_dir=gs://bucket/pile --split=train --sequence_length=1024 \
      --store_dir=gs://bucket/stores/pile_spm_L1024 [--num_workers=8] \
      [Beam options: --runner=DataflowRunner --project=... --region=... \
       --temp_location=gs://... --setup_file=./setup.py]

  # a user corpus, registered from the study's gin file and flags (data_pipelines.corpus):
  python -m data_pipelines.build_store --gin_file=pipelines/custom_280m.gin \
      --gin.PIPELINE_DIR="'gs://bucket/study'" --gin.DATA_FILES="['gs://bucket/c/*.parquet']" \
      --sequence_length=1024 --cache_dir=gs://bucket/stores [Beam options]

The SeqIO tasks stay the one definition of domains, vocabulary and
preprocessing: the build tokenizes with the domain set's vocabulary, appends
EOS as the tasks do, and packs within each domain with
doremi_jax.data.pack_documents, so a small store's rows equal
PackedDomains.build's bit for bit. Format and reader: doremi_jax/store.py.

Reading: domains whose source is made of raw files (data_pipelines.sources:
the Pile and SlimPajama layouts, JSONL or Parquet files with a domain field, a
directory of per-domain files) are grouped by file set; each raw file is read exactly
once, in parallel over files, and every record is routed by its domain field
(local paths, gs:// and other tf.io.gfile schemes). A document's place in
its domain is (file order, line order), as in the sources. Domains without
raw files (the embedded demo corpus, TFDS) fall back to reading their SeqIO
task's dataset once, one domain per worker.

Runner: without --runner (or with --runner=DirectRunner) the build runs on
Beam's Python FnApiRunner, never on the PrismRunner that DirectRunner would
try first (it downloads a binary): in-process for num_workers=1 (small
corpora build in seconds), else `multi_processing` with num_workers
processes (override with --direct_running_mode). Any other --runner
(Dataflow, Flink, Spark) gets the pipeline options as given.

Reruns: a complete store whose build key matches is reused with no work; a
store without manifest (interrupted) is rebuilt from scratch; a complete
store built from other inputs is refused unless overwrite=True.

Sharing: any number of builds of one store may run at once (several jobs, hosts or
users): each writes only its own `<store_dir>/<split>/builds/<id>/`, the first to finish
publishes it by creating `<split>/manifest.json` exclusively, the others remove their work;
readers open only the published build (doremi_jax/store_builds.py). Output: a plan line,
a progress line every few seconds and a summary; Beam's own log goes to a file (named in
the plan line) unless --verbose.
"""
import argparse
import functools
import importlib
import json
import logging
import os
import sys
import time
from typing import Optional, Sequence

from data_pipelines import core
from data_pipelines import sources
from data_pipelines import store_job
from data_pipelines import vocab as vocab_lib
from doremi_jax import store
from doremi_jax import store_builds

DEFAULT_ROWS_PER_SHARD = 1 << 16

StoreBuildError = store.StoreBuildError

# ----------------------------------------------------------------- sources


def raw_spec(source, split: str) -> Optional[dict]:
  """How a source reads raw files (data_pipelines.sources sets `source.raw_spec`); None
  for sources read through their task (the demo corpus, TFDS)."""
  spec = getattr(source, "raw_spec", None)
  return spec(split) if callable(spec) else None


def read_groups(dset: core.DomainSet, split: str) -> tuple[list[dict], list[str]]:
  """(groups of domains sharing raw files, domains read via their task)."""
  groups, by_key, fallback = [], {}, []
  for d in dset.domains:
    spec = raw_spec(dset.sources[d], split)
    if spec is None:
      fallback.append(d)
      continue
    key = json.dumps([
        spec[k]
        for k in ("kind", "files", "text_field", "domain_field", "on_malformed", "val_fraction")
    ])
    if key not in by_key:
      by_key[key] = len(groups)
      groups.append({k: spec[k] for k in spec if k != "domain_value"} | {
          "domains": [],
          "route": {} if spec["domain_field"] else None,
          "want_validation": split == "validation"
      })
    g = groups[by_key[key]]
    g["domains"].append(d)
    if g["route"] is not None:
      value = spec["domain_value"]  # one value, or several mapped onto one domain
      for v in [value] if isinstance(value, str) else value:
        g["route"].setdefault(v, []).append(d)
  return groups, fallback


def check_files(groups: Sequence[dict]) -> None:
  """Every raw file exists and is readable, before any compute."""
  for g in groups:
    for path in g["files"]:
      if not store.exists(path):
        raise FileNotFoundError(f"Raw file not found: {path}.")
      if not store.is_remote(path) and not os.access(path, os.R_OK):
        raise PermissionError(f"Raw file not readable: {path}; fix its "
                              "permissions.")


def tokenizer_spec(vocabulary) -> dict:
  """What the workers need to tokenize as the tasks do (store_raw.Tokenizer)."""
  import seqio  # pylint: disable=g-import-not-at-top
  eos = int(vocabulary.eos_id)
  if isinstance(vocabulary, seqio.ByteVocabulary):
    return {"kind": "byte", "eos_id": eos}
  return {"kind": "seqio", "vocabulary": vocabulary, "eos_id": eos}


def source_fingerprint(dset: core.DomainSet) -> str:
  """Hash of the domains' source fingerprints (as PackedDomains keys them)."""
  fps = []
  for d, task in dset.tasks():
    fp = getattr(task.source, "fingerprint", None)
    fp = fp() if callable(fp) else fp
    fps.append((d, str(fp) if fp is not None else repr(task.source)))
  return store.build_key(sources=fps)


# ---------------------------------------------------------------- pipeline


def build_meta(dset: core.DomainSet, split: str, sequence_length: int, rows_per_shard: int) -> dict:
  """The manifest fields that identify a build; build_key hashes its content."""
  meta = {
      "format_version": store.FORMAT_VERSION,
      "domain_set": dset.name,
      "split": split,
      "domains": list(dset.domains),
      "domain_ids": {
          d: dset.domain_id(d) for d in dset.domains
      },
      "vocabulary_key": vocab_lib.vocab_key(dset.vocabulary),
      "sequence_length": int(sequence_length),
      "source_fingerprint": source_fingerprint(dset),
      "rows_per_shard": int(rows_per_shard),
      "record_format": store.RECORD_FORMAT,
      "array_record_options": store.ARRAY_RECORD_OPTIONS
  }
  # The content's key: the shard layout (rows_per_shard) does not change rows.
  meta["build_key"] = store.build_key(**{k: v for k, v in meta.items() if k != "rows_per_shard"})
  return meta


def build_store(domain_set: str, split: str, sequence_length: int, store_dir: str, *,
                num_workers: int = 1, pipeline_args: Sequence[str] = (),
                rows_per_shard: int = DEFAULT_ROWS_PER_SHARD, overwrite: bool = False,
                verbose: bool = False, build_args: Optional[Sequence[str]] = None,
                stale_after_s: float = store_builds.STALE_AFTER_S,
                retain_s: float = store_builds.RETAIN_S) -> dict:
  """Builds (or reuses) the split's store under `store_dir` and returns its manifest.

  Any number of these may run at once on one store, on one machine or many: each builds in
  its own directory and the first to finish publishes (doremi_jax/store_builds.py).

  Args:
    domain_set: a registered domain set, or one of its tasks or mixtures.
    split: e.g. "train" or "validation".
    sequence_length: L, the packed row length.
    store_dir: local or gs:// (any tf.io.gfile scheme; ram:// needs
      num_workers=1, since it lives in one process).
    num_workers: DirectRunner worker processes (1: in-process).
    pipeline_args: extra Beam pipeline options, e.g. ["--runner=Dataflow..."].
    rows_per_shard: rows per ArrayRecord file.
    overwrite: build and publish anew even over a complete store (damaged, or built from
      other inputs); readers that opened the old build keep reading it.
    verbose: Beam's own logs on stderr (else in a file, named in the plan line).
    build_args: the build_store command's arguments, recorded in the manifest for the
      rebuild command that errors name (default: --domain_set and --sequence_length).
    stale_after_s: another build without heartbeat for this long is dead.
    retain_s: a build replaced by --overwrite is removed after this long.

  Returns:
    The manifest, plus "counters" (this run's Beam counters: raw_lines,
    documents, ...) when a build ran.
  """
  dset = core.get_domain_set(domain_set)
  meta = build_meta(dset, split, sequence_length, rows_per_shard)
  sdir = store.split_dir(store_dir, split)
  old = store.bounded(lambda: store.read_manifest(store_dir, split),
                      store.REMOTE_TIMEOUT_S if store.is_remote(sdir) else None,
                      f"Reading the store manifest in {sdir}")
  published = (old or {}).get("build")
  store_builds.clean_dead(sdir, published, stale_after_s, store_job.echo, retain_s)
  if old is not None and old.get("complete") and not overwrite:
    if old.get("build_key") == meta["build_key"]:
      logging.info("Store %s is complete; reusing it.", sdir)
      return old
    diff = sorted(
        k for k in meta if old.get(k) != meta[k] and k not in ("build_key", "rows_per_shard"))
    raise StoreBuildError(f"{sdir} holds a complete store built from other inputs (differs "
                          f"in {diff}). Choose another --store_dir, or replace it: "
                          f"`{store.rebuild_command(old, store_dir, split)}`.")
  if store.is_remote(sdir) and sdir.startswith("ram://") and (num_workers != 1):
    raise StoreBuildError("A ram:// store lives in one process: use "
                          "num_workers=1.")
  groups, fallback = read_groups(dset, split)
  check_files(groups)
  for d, task in dset.tasks():
    if d in fallback and split not in task.source.splits:
      raise StoreBuildError(f"Domain {d!r} has no {split!r} split (splits: "
                            f"{list(task.source.splits)}).")
  build_id = store_builds.new_build_id()
  job = {
      "split": split,
      "store_dir": store_dir,
      "sdir": sdir,
      "bdir": store_builds.build_dir(sdir, build_id),
      "log": None if verbose else store_job.log_path(sdir, build_id),
      "start": time.monotonic()
  }
  job["tokenizer"] = tokenizer_spec(dset.vocabulary)
  built, counters = store_job.run(dset, split, sequence_length, meta, rows_per_shard, num_workers,
                                  pipeline_args, groups, fallback, job)
  args = list(build_args or [f"--domain_set={dset.name}", f"--sequence_length={sequence_length}"])
  return store_job.publish(
      dict(built, build=f"{store_builds.BUILDS}/{build_id}", build_args=args), counters,
      old if overwrite else None, job)


def default_store_root() -> str:
  """$DOREMI_JAX_DATA_DIR/store, or ~/.cache/doremi_jax/store."""
  root = os.environ.get("DOREMI_JAX_DATA_DIR") or os.path.join(
      os.path.expanduser("~"), ".cache", "doremi_jax")
  return os.path.join(root, "store")


def store_path(domain_set: str, sequence_length: int, root: Optional[str] = None) -> str:
  """`<root>/<set>_L<L>_<key>`: one store per (domain set, vocabulary, sources, L), shared
  by every stage and every host; the key changes with the vocabulary or the sources."""
  dset = core.get_domain_set(domain_set)
  key = store.build_key(
      vocabulary_key=vocab_lib.vocab_key(dset.vocabulary),
      source_fingerprint=source_fingerprint(dset))
  return os.path.join(root or default_store_root(), f"{dset.name}_L{sequence_length}_{key}")


def open_store(mixture_or_task_name: str, split: str, sequence_length: int, *,
               store_dir: Optional[str] = None, cache_dir: Optional[str] = None, build: bool = True,
               process_index: int = 0, num_workers: int = 1, pipeline_args: Sequence[str] = (),
               wait_timeout_s: float = store_builds.WAIT_TIMEOUT_S) -> store.StoreDomains:
  """The split's token store of the mixture's domain set, opened and checked.

  store_dir: the store (default: store_path(set, L, cache_dir)).
  build: process 0 builds (or reuses) the store with the DirectRunner, or waits while another
    job builds it; the other processes wait for its manifest, saying so every minute, for at
    most wait_timeout_s;
    False: it must exist (built beforehand, e.g. by `python -m data_pipelines.build_store`
    on Dataflow).
  mixture_rates are the mixture's, lazily counted natural rates resolved from the store's
  train token counts.
  """
  dset = core.get_domain_set(mixture_or_task_name)
  store_dir = store_dir or store_path(dset.name, sequence_length, cache_dir)
  meta = build_meta(dset, split, sequence_length, DEFAULT_ROWS_PER_SHARD)
  command = store.build_command(dset.name, split, sequence_length, store_dir)
  wait = functools.partial(store_builds.wait_published, store_dir, split, command=command,
                           timeout_s=wait_timeout_s, poll_s=1.0, echo=store_job.echo)
  if build and process_index == 0:
    wait(while_building=True)  # another job builds it now: rather than build it twice
    # Reuses the published store, or builds it (none was running, or the other one died).
    build_store(dset.name, split, sequence_length, store_dir, num_workers=num_workers,
                pipeline_args=pipeline_args)
  elif build:
    wait()
  st = store.StoreDomains.open(store_dir, split=split, domain_set=dset.name,
                               vocabulary_key=meta["vocabulary_key"],
                               sequence_length=sequence_length)
  cmd = store.rebuild_command(st.manifest, store_dir, split)
  for key in ("source_fingerprint", "domains"):
    if st.manifest.get(key) != meta[key]:
      raise store.StoreMismatchError(
          f"Store {store.split_dir(store_dir, split)} was built with {key}="
          f"{st.manifest.get(key)!r}, the domain set now has {meta[key]!r} "
          f"(its sources changed). Rebuild it: `{cmd}` (or into a new --store_dir).")
  counts = st.num_tokens if split == "train" else None
  st.mixture_rates = core.mixture_rates(mixture_or_task_name, natural_counts=counts)
  return st


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--domain_set", default=None, help="a registered domain set, task or mixture")
  p.add_argument(
      "--gin_file", action="append", default=[], help="a user corpus: gin files binding "
      "register_corpus (e.g. pipelines/custom_280m.gin) and --gin.NAME=VALUE bindings, as "
      "given to the pipeline; the domain set is the corpus's")
  p.add_argument("--split", default="train,validation", help="comma-separated splits")
  p.add_argument("--sequence_length", type=int, required=True)
  p.add_argument("--store_dir", default=None,
                 help="the store (default: the one training reads, under --cache_dir)")
  p.add_argument(
      "--cache_dir", default=None,
      help="stores' root, as train.cache_dir (default: $DOREMI_JAX_DATA_DIR/store "
      "or ~/.cache/doremi_jax/store)")
  p.add_argument("--num_workers", type=int, default=1)
  p.add_argument("--rows_per_shard", type=int, default=DEFAULT_ROWS_PER_SHARD)
  p.add_argument("--overwrite", action="store_true",
                 help="build and publish anew over a complete store (damaged, other inputs)")
  p.add_argument("--verbose", action="store_true",
                 help="Beam's and TensorFlow's own logs on stderr (else in a file)")
  p.add_argument(
      "--module", default=None, help="modules registering the set, comma-separated "
      "(default: data_pipelines.<domain_set>)")
  p.add_argument("--data_dir", default=None,
                 help="calls <module>.register(data_dir) (Pile, SlimPajama)")
  p.add_argument("--spm", default=None, help="SentencePiece model for "
                 "register(data_dir, vocabulary=...)")
  argv = sys.argv[1:] if argv is None else list(argv)
  args, rest = p.parse_known_args(argv)
  beam_args = [a for a in rest if not a.startswith("--gin.")]
  logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING)
  if args.gin_file:
    from data_pipelines import corpus  # pylint: disable=g-import-not-at-top
    args.domain_set = corpus.register_from_gin(
        args.gin_file, [a[len("--gin."):] for a in rest if a not in beam_args])
  elif not args.domain_set:
    p.error("give --domain_set, or --gin_file for a corpus registered from gin")
  modules = [] if args.gin_file else (args.module or f"data_pipelines.{args.domain_set}").split(",")
  for name in modules:
    mod = importlib.import_module(name)
    if args.data_dir and hasattr(mod, "register"):
      mod.register(args.data_dir, vocabulary=vocab_lib.get_vocabulary(args.spm))
  store_dir = args.store_dir or store_path(args.domain_set, args.sequence_length, args.cache_dir)
  for split in args.split.split(","):
    manifest = build_store(args.domain_set, split, args.sequence_length, store_dir,
                           num_workers=args.num_workers, pipeline_args=beam_args,
                           rows_per_shard=args.rows_per_shard, overwrite=args.overwrite,
                           verbose=args.verbose, build_args=_rebuild_args(argv))
    print(
        json.dumps({
            "store_dir": store_dir,
            **{
                k: manifest[k] for k in ("domain_set", "split", "rows", "tokens", "raw_lines")
            }
        }))


def _rebuild_args(argv: Sequence[str]) -> list[str]:
  """The command's arguments without those store.rebuild_command sets."""
  out, skip = [], False
  for a in argv:
    name = a.split("=")[0]
    if skip or name in ("--overwrite", "--verbose"):
      skip = False
    elif name in ("--split", "--store_dir", "--cache_dir"):
      skip = "=" not in a  # "--split train": drop its value too
    else:
      out.append(a)
  return out


if __name__ == "__main__":
  main()
